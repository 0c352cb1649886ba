//! `emulator scenario run|check|list`: the scenario runner's command line
//! (the work is `crate::scenario`'s). `run` prints the timeline as it
//! happens (a spinner while it waits, on a terminal), then the report; exit
//! status 0 pass, 1 fail, 2 error (the scenario could not run).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;

use crate::scenario::file::Expect;
use crate::scenario::report::{Entry, Outcome};
use crate::scenario::runner::{self, Event};
use crate::scenario::{Options, Report, Scenario, Verdict};

#[derive(Debug, Subcommand)]
pub(super) enum ScenarioCommand {
    /// Run a scenario: a domain of its own, its workloads, its timeline of
    /// faults, actions and waits, its assertions; then a pass/fail report.
    /// Exit 0 pass, 1 fail (an assertion did not hold, or a scenario that
    /// expects to fail passed), 2 error (it could not run).
    Run {
        /// The scenario file (scenarios/NAME.toml).
        file: PathBuf,
        /// Seed of everything random (workloads, faults); default: the
        /// file's. The run prints it: the same seed replays the run.
        #[arg(long)]
        seed: Option<u64>,
        /// Print the report as JSON on stdout (the timeline goes to stderr).
        #[arg(long)]
        json: bool,
        /// Run directory (must be empty or missing; default
        /// run/scenarios/NAME-<time>-<pid>). Kept when the run fails.
        #[arg(long)]
        run_dir: Option<PathBuf>,
        /// Keep the run directory also when the scenario passes.
        #[arg(long)]
        keep: bool,
    },
    /// Parse and validate scenario files without running them (exit 2 at the
    /// first bad one, naming its line and field).
    Check {
        /// Scenario files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// List the scenarios of a directory, one line each.
    List {
        /// The directory.
        #[arg(default_value = "scenarios")]
        dir: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

pub(super) fn run(command: ScenarioCommand) -> anyhow::Result<ExitCode> {
    match command {
        ScenarioCommand::Run {
            file,
            seed,
            json,
            run_dir,
            keep,
        } => {
            let scenario = Scenario::load(&file)?;
            let options = Options {
                seed,
                run_dir,
                keep,
            };
            let report = run_scenario(&scenario, &options, json);
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print_report(&report);
            }
            Ok(ExitCode::from(report.exit_code))
        }
        ScenarioCommand::Check { files } => {
            for file in files {
                let scenario = Scenario::load(&file)?;
                println!(
                    "{}: ok ({} workload(s), {} step(s), {} final assertion(s){})",
                    file.display(),
                    scenario.workloads.len(),
                    scenario.steps.len(),
                    scenario.assertions.len(),
                    if scenario.expect == Expect::Fail {
                        "; expected to fail"
                    } else {
                        ""
                    }
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        ScenarioCommand::List { dir, json } => {
            let found = runner::list(&dir)?;
            let mut bad = 0;
            let mut rows = Vec::new();
            for entry in &found {
                match entry {
                    Ok(scenario) => rows.push(serde_json::json!({
                        "name": scenario.name,
                        "file": scenario.path,
                        "description": scenario.description,
                        "expect": scenario.expect,
                        "seed": scenario.seed,
                        "timeout_s": scenario.timeout.as_secs_f64(),
                    })),
                    Err(err) => {
                        bad += 1;
                        eprintln!("emulator: error: {err}");
                    }
                }
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                let width = rows
                    .iter()
                    .map(|r| r["name"].as_str().unwrap_or_default().len())
                    .max()
                    .unwrap_or(0);
                for row in &rows {
                    println!(
                        "{:width$}  {}{}",
                        row["name"].as_str().unwrap_or_default(),
                        row["description"].as_str().unwrap_or_default(),
                        if row["expect"] == "fail" {
                            " [expected to fail]"
                        } else {
                            ""
                        }
                    );
                }
            }
            Ok(if bad > 0 {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            })
        }
    }
}

/// Runs it, printing the timeline as it happens (to stderr with `--json`).
fn run_scenario(scenario: &Scenario, options: &Options, json: bool) -> Report {
    let terminal = if json {
        std::io::stderr().is_terminal()
    } else {
        std::io::stdout().is_terminal()
    };
    let say = |line: String| {
        if json {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    };
    say(format!(
        "scenario {} ({}){}",
        scenario.name,
        scenario.path.display(),
        if scenario.description.is_empty() {
            String::new()
        } else {
            format!(": {}", scenario.description)
        }
    ));
    let mut spinner: Option<indicatif::ProgressBar> = None;
    let mut observer = |event: Event<'_>| match event {
        Event::Begin { seed, run_dir } => {
            say(format!("seed {seed}: replay with --seed {seed}"));
            say(format!("run directory: {}", run_dir.display()));
        }
        Event::Waiting { t, what } => {
            if terminal {
                let bar = indicatif::ProgressBar::new_spinner();
                if json {
                    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
                }
                bar.set_message(format!("[{:7.2} s] waiting for {what}", t.as_secs_f64()));
                bar.enable_steady_tick(Duration::from_millis(100));
                if let Some(old) = spinner.replace(bar) {
                    old.finish_and_clear();
                }
            }
        }
        Event::Entry(entry) => {
            if let Some(bar) = spinner.take() {
                bar.finish_and_clear();
            }
            say(timeline_line(entry));
        }
    };
    let report = crate::scenario::run(scenario, options, &mut observer);
    if let Some(bar) = spinner.take() {
        bar.finish_and_clear();
    }
    report
}

fn timeline_line(entry: &Entry) -> String {
    let mark = match entry.outcome {
        Outcome::Ok => "",
        Outcome::Failed => "FAILED ",
        Outcome::Error => "ERROR ",
    };
    let step = entry
        .step
        .map(|n| format!("step {n}: "))
        .unwrap_or_default();
    format!(
        "[{:7.2} s] {step}{mark}{} {}{}",
        entry.t_ms as f64 / 1000.0,
        entry.kind,
        entry.what,
        if entry.detail.is_empty() {
            String::new()
        } else {
            format!(" — {}", entry.detail)
        }
    )
}

fn print_report(report: &Report) {
    println!();
    println!("faults injected ({}):", report.faults.len());
    for fault in &report.faults {
        println!(
            "  {} at {:.2} s: {} — {}{}",
            fault.id,
            fault.t_ms as f64 / 1000.0,
            fault.kind,
            fault.effect,
            fault
                .cleared_t_ms
                .map(|t| format!(" (cleared at {:.2} s)", t as f64 / 1000.0))
                .unwrap_or_default()
        );
    }
    println!("assertions ({}):", report.assertions.len());
    for assertion in &report.assertions {
        println!(
            "  {} {}{} {}: {} — {}",
            if assertion.passed { "ok  " } else { "FAIL" },
            assertion
                .step
                .map(|n| format!("step {n}"))
                .unwrap_or_else(|| "end".into()),
            if assertion.line > 0 {
                format!(" (line {})", assertion.line)
            } else {
                String::new()
            },
            assertion.kind,
            assertion.assertion,
            assertion.detail
        );
    }
    if let Some(error) = &report.error {
        println!("error: {error}");
    }
    let failed = report.failed().count();
    let how = match (report.verdict, report.expect, report.outcome) {
        (Verdict::Pass, Expect::Fail, _) => {
            format!("PASS (expected to fail, and {failed} assertion(s) failed)")
        }
        (Verdict::Pass, _, _) => "PASS".to_string(),
        (Verdict::Fail, Expect::Fail, _) => {
            "FAIL (expected to fail, but every assertion held)".to_string()
        }
        (Verdict::Fail, _, _) => format!("FAIL ({failed} assertion(s) did not hold)"),
        (Verdict::Error, _, _) => "ERROR (the scenario could not run)".to_string(),
    };
    println!(
        "{how}: {} in {:.1} s, seed {} (replay: emulator scenario run {} --seed {})",
        report.scenario,
        report.elapsed_ms as f64 / 1000.0,
        report.seed,
        report.file.display(),
        report.seed
    );
    if report.run_dir_kept {
        println!("run directory kept: {}", report.run_dir.display());
    }
}
