//! Running a scenario: a run directory of its own, the domain up
//! (`supervisor::prepare|start_daemon|wait_ready`), the workloads in-process
//! on a tokio runtime (`workload::run_until`), the timeline step by step,
//! the final assertions, the fault log read back into the report, and the
//! domain always brought down (also after an error or Ctrl-C, which only
//! sets a flag the runner looks at between polls).
//!
//! Waits poll what the domain shows (servers' API, the process table) every
//! [`POLL`] until the condition holds or the bound runs out; nothing here
//! sleeps to synchronise.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::condition::{self, Check, Condition, Evaluation, ProcessSeen, Snapshot, WorkloadSeen};
use super::file::{Action, Asserted, Expect, ProcessAction, Scenario, Timing, WorkloadSpec};
use super::report::{
    utc_timestamp, AssertionResult, Entry, FaultEntry, Outcome, Report, Verdict, WorkloadReport,
};
use super::{derive_seed, ScenarioError};
use crate::client::Client;
use crate::domain::Pair;
use crate::fault::{self, FaultEvent, FaultSpec, ProcessFault};
use crate::persist::now_ms;
use crate::rundir::{liveness, RunDir};
use crate::supervisor;
use crate::workload::{self, RunConfig, RunSummary, VerifyReport, WorkloadError};

/// How often a wait looks again.
const POLL: Duration = Duration::from_millis(50);
/// What a final check (a scrub, the oracle) gets at least, even when the
/// scenario's timeout is nearly out.
const FINAL_GRACE: Duration = Duration::from_secs(30);
/// Lost ranges a report names (all are counted).
const LOST_RANGES_SHOWN: usize = 8;

/// How to run.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// The seed (None: the scenario's).
    pub seed: Option<u64>,
    /// The run directory (None: `run/scenarios/NAME-<time>-<pid>`).
    pub run_dir: Option<PathBuf>,
    /// Keep the run directory also when the scenario passes.
    pub keep: bool,
}

/// What the runner tells its observer as it goes.
#[derive(Debug)]
pub enum Event<'a> {
    /// The run begins.
    Begin {
        /// The seed.
        seed: u64,
        /// The run directory.
        run_dir: &'a Path,
    },
    /// Something happened (one line of the timeline).
    Entry(&'a Entry),
    /// A wait (or a long check) begins; an `Entry` ends it.
    Waiting {
        /// Since the run started.
        t: Duration,
        /// What is awaited.
        what: &'a str,
    },
}

/// A workload of the run.
struct WorkloadRun {
    spec: WorkloadSpec,
    seed: u64,
    uri: String,
    record: PathBuf,
    stop: Arc<AtomicBool>,
    handle: Option<tokio::task::JoinHandle<Result<RunSummary, WorkloadError>>>,
    /// Its end: the summary, or why it could not run.
    ended: Option<Result<RunSummary, String>>,
    /// How far the record file was read, and the `acked` and `connected`
    /// lines in it.
    read_to: u64,
    acked: u64,
    connected: u64,
    verify: Option<VerifyReport>,
}

/// Why the timeline stops early.
enum Stop {
    /// A wait ran out or a task was refused: later steps would be meaningless.
    Failed,
    /// The scenario could not go on (its message).
    Error(String),
}

struct Runner<'a> {
    scenario: &'a Scenario,
    seed: u64,
    run: RunDir,
    started: Instant,
    started_unix_ms: u64,
    deadline: Instant,
    runtime: tokio::runtime::Runtime,
    interrupted: Arc<AtomicBool>,
    observer: &'a mut dyn FnMut(Event<'_>),
    timeline: Vec<Entry>,
    assertions: Vec<AssertionResult>,
    workloads: Vec<WorkloadRun>,
    /// Label → (server, task id), in submission order.
    tasks: Vec<(String, Pair, String)>,
    /// Fault label → fault id.
    fault_ids: BTreeMap<String, String>,
    timed_out: bool,
    /// The file systems mounted for the systems' disks (`disk_space`).
    mounted: Vec<PathBuf>,
    /// Moved before and after each power-loss fault (see
    /// `workload::RunConfig::power_cuts`).
    power_cuts: Arc<std::sync::atomic::AtomicU64>,
}

/// Runs `scenario`, telling `observer` what happens; the report. Never
/// panics on a domain that misbehaves: what could not be done is the
/// report's `error` (verdict `error`). Installs SIGINT/SIGTERM handlers for
/// its duration (Ctrl-C: the domain is brought down, the verdict is error).
pub fn run(scenario: &Scenario, options: &Options, observer: &mut dyn FnMut(Event<'_>)) -> Report {
    let seed = options.seed.unwrap_or(scenario.seed);
    let run_dir = options
        .run_dir
        .clone()
        .unwrap_or_else(|| default_run_dir(&scenario.name));
    let started = Instant::now();
    let started_unix_ms = now_ms();
    let bare = |error: String| Report {
        scenario: scenario.name.clone(),
        file: scenario.path.clone(),
        description: scenario.description.clone(),
        seed,
        expect: scenario.expect,
        outcome: Verdict::Error,
        verdict: Verdict::Error,
        exit_code: Verdict::Error.exit_code(),
        error: Some(error),
        run_dir: run_dir.clone(),
        run_dir_kept: run_dir.exists(),
        elapsed_ms: started.elapsed().as_millis() as u64,
        timeline: Vec::new(),
        faults: Vec::new(),
        assertions: Vec::new(),
        workloads: Vec::new(),
    };
    if let Err(problem) = fresh_dir(&run_dir) {
        return bare(problem);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => return bare(format!("cannot start a tokio runtime: {err}")),
    };
    let interrupted = Arc::new(AtomicBool::new(false));
    if let Err(err) = watch_signals(&runtime, Arc::clone(&interrupted)) {
        return bare(format!("cannot handle signals: {err}"));
    }
    observer(Event::Begin {
        seed,
        run_dir: &run_dir,
    });
    let mut runner = Runner {
        scenario,
        seed,
        run: RunDir::new(&run_dir),
        started,
        started_unix_ms,
        deadline: started + scenario.timeout,
        runtime,
        interrupted,
        observer,
        timeline: Vec::new(),
        assertions: Vec::new(),
        workloads: Vec::new(),
        tasks: Vec::new(),
        fault_ids: BTreeMap::new(),
        timed_out: false,
        mounted: Vec::new(),
        power_cuts: Arc::new(std::sync::atomic::AtomicU64::new(0)),
    };
    let error = runner.go();
    runner.finish(error, options.keep)
}

/// Mounts a tmpfs of `bytes` at `dir` (created): the small host file system
/// a scenario fills up. Needs root (CAP_SYS_ADMIN).
fn mount_tmpfs(dir: &Path, bytes: u64) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|err| format!("create {}: {err}", dir.display()))?;
    nix::mount::mount(
        Some("emulator-scenario"),
        dir,
        Some("tmpfs"),
        nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
        Some(format!("size={bytes},mode=0700").as_str()),
    )
    .map_err(|err| {
        format!(
            "disk_space: cannot mount a {} MiB tmpfs at {} ({err}); it needs root",
            bytes >> 20,
            dir.display()
        )
    })
}

/// `run/scenarios/NAME-YYYYmmdd-HHMMSS-PID` (UTC).
fn default_run_dir(name: &str) -> PathBuf {
    let stamp: String = utc_timestamp(now_ms())
        .chars()
        .filter(char::is_ascii_digit)
        .take(14)
        .collect();
    PathBuf::from("run/scenarios").join(format!(
        "{name}-{}-{}-{}",
        &stamp[..8],
        &stamp[8..],
        std::process::id()
    ))
}

/// Creates the run directory; one that exists must be empty (a scenario
/// starts from fresh disks).
fn fresh_dir(dir: &Path) -> Result<(), String> {
    if let Ok(mut entries) = std::fs::read_dir(dir) {
        if entries.next().is_some() {
            return Err(format!(
                "the run directory {} exists and is not empty (a scenario starts from fresh disks): remove it or choose another --run-dir",
                dir.display()
            ));
        }
    }
    std::fs::create_dir_all(dir).map_err(|err| format!("cannot create {}: {err}", dir.display()))
}

fn watch_signals(runtime: &tokio::runtime::Runtime, flag: Arc<AtomicBool>) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let _entered = runtime.enter();
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    runtime.spawn(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        flag.store(true, Ordering::SeqCst);
    });
    Ok(())
}

impl Runner<'_> {
    fn t(&self) -> Duration {
        self.started.elapsed()
    }

    fn entry(
        &mut self,
        step: Option<usize>,
        kind: &str,
        what: impl Into<String>,
        outcome: Outcome,
        detail: impl Into<String>,
    ) {
        let entry = Entry {
            t_ms: self.t().as_millis() as u64,
            step,
            kind: kind.to_string(),
            what: what.into(),
            outcome,
            detail: detail.into(),
        };
        (self.observer)(Event::Entry(&entry));
        self.timeline.push(entry);
    }

    fn waiting(&mut self, what: &str) {
        let t = self.t();
        (self.observer)(Event::Waiting { t, what });
    }

    fn check_interrupted(&self) -> Result<(), String> {
        if self.interrupted.load(Ordering::SeqCst) {
            Err("interrupted (SIGINT or SIGTERM)".into())
        } else {
            Ok(())
        }
    }

    /// Sleeps until `until` in short naps, noticing Ctrl-C and workloads
    /// that end.
    fn pause_until(&mut self, until: Instant) -> Result<(), String> {
        loop {
            self.check_interrupted()?;
            self.reap_workloads();
            let now = Instant::now();
            if now >= until {
                return Ok(());
            }
            std::thread::sleep(POLL.min(until - now));
        }
    }

    /// The whole run up to the final checks; the error that stopped it.
    fn go(&mut self) -> Option<String> {
        let scenario = self.scenario;
        // The domain.
        let views = match self.domain_up() {
            Ok(views) => views,
            Err(err) => return Some(err),
        };
        let uris = volume_uris(&views);
        for (index, spec) in scenario.workloads.iter().enumerate() {
            let key = format!("s{}/{}", spec.system, spec.volume);
            let Some(uri) = uris.get(&key).cloned() else {
                return Some(format!(
                    "the domain shows no volume {key} for workload {}",
                    spec.name
                ));
            };
            self.workloads.push(WorkloadRun {
                spec: spec.clone(),
                seed: derive_seed(self.seed, index as u64 + 1),
                uri,
                record: self
                    .run
                    .root()
                    .join(format!("workload-{}.jsonl", spec.name)),
                stop: Arc::new(AtomicBool::new(false)),
                handle: None,
                ended: None,
                read_to: 0,
                acked: 0,
                connected: 0,
                verify: None,
            });
        }
        for index in 0..self.workloads.len() {
            if self.workloads[index].spec.autostart {
                self.start_workload(index, None);
            }
        }
        // The timeline.
        let timeline_started = Instant::now();
        for step in &scenario.steps {
            let until = match step.timing {
                Timing::Next => Instant::now(),
                Timing::At(offset) => timeline_started + offset,
                Timing::After(delay) => Instant::now() + delay,
            };
            if until > self.deadline {
                self.timeout(step.number);
                return None;
            }
            if let Err(err) = self.pause_until(until) {
                return Some(err);
            }
            if let Some(note) = &step.note {
                self.entry(Some(step.number), "note", note.clone(), Outcome::Ok, "");
            }
            match self.step(step.number, step.line, &step.action) {
                Ok(()) => {}
                Err(Stop::Failed) => {
                    let left = scenario.steps.len() - step.number;
                    if left > 0 {
                        self.entry(
                            None,
                            "timeline",
                            "stopped",
                            Outcome::Failed,
                            format!(
                                "step {} failed: the {left} later step(s) are not run",
                                step.number
                            ),
                        );
                    }
                    break;
                }
                Err(Stop::Error(err)) => return Some(err),
            }
            if Instant::now() >= self.deadline {
                self.timeout(step.number);
                return None;
            }
        }
        // The end: workloads without a duration stop, the others finish.
        for index in 0..self.workloads.len() {
            if self.workloads[index].handle.is_some()
                && self.workloads[index].spec.duration.is_none()
            {
                self.workloads[index].stop.store(true, Ordering::SeqCst);
            }
        }
        for index in 0..self.workloads.len() {
            if let Err(err) = self.join_workload(index, None) {
                return Some(err);
            }
        }
        for asserted in &scenario.assertions {
            if let Err(err) = self.assert(None, asserted) {
                return Some(err);
            }
        }
        None
    }

    fn timeout(&mut self, step: usize) {
        self.timed_out = true;
        let what = format!(
            "the scenario's timeout of {} s",
            self.scenario.timeout.as_secs_f64()
        );
        let detail = format!("ran out at step {step}; the final assertions are not checked");
        self.assertions.push(AssertionResult {
            step: Some(step),
            line: 0,
            kind: "timeout".into(),
            assertion: what.clone(),
            passed: false,
            detail: detail.clone(),
        });
        self.entry(Some(step), "timeout", what, Outcome::Failed, detail);
    }

    fn domain_up(&mut self) -> Result<Vec<(Pair, Value)>, String> {
        let scenario = self.scenario;
        self.waiting("the domain to start");
        let began = Instant::now();
        if let Some(bytes) = scenario.disk_space {
            for system in 0..scenario.domain.systems.len() {
                let dir = self.run.disks(system);
                mount_tmpfs(&dir, bytes)?;
                self.mounted.push(dir.clone());
                self.entry(
                    None,
                    "disk space",
                    format!("s{system}'s disks on a {} MiB file system", bytes >> 20),
                    Outcome::Ok,
                    format!("a tmpfs at {}", dir.display()),
                );
            }
        }
        let domain = supervisor::prepare(&self.run, &scenario.domain_config)
            .map_err(|err| format!("the domain: {err}"))?;
        let mut daemon =
            supervisor::start_daemon(&self.run).map_err(|err| format!("the domain: {err}"))?;
        let views = supervisor::wait_ready(&self.run, &domain, &mut daemon);
        // The supervisor is a child: reaped in the background once it exits.
        std::thread::spawn(move || {
            let _ = daemon.wait();
        });
        let views = views.map_err(|err| format!("the domain did not start: {err}"))?;
        let systems: Vec<String> = scenario
            .domain
            .systems
            .iter()
            .map(|s| {
                format!(
                    "{} {} {}×{} MiB ({} spare{})",
                    s.name,
                    format!("{:?}", s.level).to_lowercase(),
                    s.disks,
                    s.disk_bytes >> 20,
                    s.spares,
                    if s.spares == 1 { "" } else { "s" }
                )
            })
            .collect();
        let servers: Vec<String> = scenario
            .domain
            .pairs()
            .iter()
            .map(ToString::to_string)
            .collect();
        self.entry(
            None,
            "domain",
            "up",
            Outcome::Ok,
            format!(
                "{}; servers {} ({:.1} s)",
                systems.join(", "),
                servers.join(", "),
                began.elapsed().as_secs_f64()
            ),
        );
        Ok(views)
    }

    fn start_workload(&mut self, index: usize, step: Option<usize>) {
        let remaining = self
            .deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(1));
        let w = &mut self.workloads[index];
        let config = RunConfig {
            uris: vec![w.uri.clone()],
            seed: w.seed,
            duration: w.spec.duration.unwrap_or(remaining),
            queue_depth: w.spec.qd,
            fua_every: w.spec.fua_every,
            flush_every: w.spec.flush_every,
            block_size: w.spec.block_size,
            max_blocks: w.spec.max_blocks,
            reconnect_timeout: w.spec.reconnect_timeout,
            request_timeout: w.spec.request_timeout,
            record: w.record.clone(),
            power_cuts: Some(Arc::clone(&self.power_cuts)),
        };
        w.handle = Some(
            self.runtime
                .spawn(workload::run_until(config, Arc::clone(&w.stop))),
        );
        let detail = format!(
            "s{}/{} at {}, seed {}, qd {}, fua every {}, flush every {}, {}",
            w.spec.system,
            w.spec.volume,
            w.uri,
            w.seed,
            w.spec.qd,
            w.spec.fua_every,
            w.spec.flush_every,
            match w.spec.duration {
                Some(d) => format!("for {} s", d.as_secs_f64()),
                None => "until the timeline ends".into(),
            }
        );
        let name = w.spec.name.clone();
        self.entry(
            step,
            "start",
            format!("workload {name}"),
            Outcome::Ok,
            detail,
        );
    }

    /// Notes workloads that ended by themselves.
    fn reap_workloads(&mut self) {
        for index in 0..self.workloads.len() {
            if self.workloads[index]
                .handle
                .as_ref()
                .is_some_and(|h| h.is_finished())
            {
                let _ = self.join_workload(index, None);
            }
        }
    }

    /// Waits for workload `index` to end (bounded) and records its end.
    fn join_workload(&mut self, index: usize, step: Option<usize>) -> Result<(), String> {
        let Some(handle) = self.workloads[index].handle.take() else {
            return Ok(());
        };
        let bound = self.deadline.saturating_duration_since(Instant::now()) + FINAL_GRACE;
        let name = self.workloads[index].spec.name.clone();
        if !handle.is_finished() {
            self.waiting(&format!("workload {name} to end"));
        }
        let joined = self.runtime.block_on(async {
            let abort = handle.abort_handle();
            match tokio::time::timeout(bound, handle).await {
                Ok(joined) => Some(joined),
                Err(_) => {
                    abort.abort();
                    None
                }
            }
        });
        let ended = match joined {
            Some(Ok(Ok(summary))) => Ok(summary),
            Some(Ok(Err(err))) => Err(err.to_string()),
            Some(Err(err)) => Err(format!("the workload's task: {err}")),
            None => Err(format!(
                "it did not end within {} s: abandoned",
                bound.as_secs()
            )),
        };
        let (outcome, detail) = match &ended {
            Ok(s) => (
                if s.mismatches == 0 { Outcome::Ok } else { Outcome::Failed },
                format!(
                    "{} writes acknowledged ({} failed, {} with FUA), {} flushes acknowledged ({} failed), {} read-backs ({} failed, {} mismatches), {} reconnects (longest stall {:.0} ms){}",
                    s.writes_acked,
                    s.writes_failed,
                    s.fua_writes,
                    s.flushes_acked,
                    s.flushes_failed,
                    s.reads,
                    s.reads_failed,
                    s.mismatches,
                    s.reconnects,
                    s.stall_ms_max,
                    s.gave_up.as_ref().map(|g| format!("; gave up: {g}")).unwrap_or_default()
                ),
            ),
            Err(err) => (Outcome::Error, err.clone()),
        };
        self.workloads[index].ended = Some(ended);
        self.count_acked(index);
        self.entry(step, "end", format!("workload {name}"), outcome, detail);
        Ok(())
    }

    /// Counts the `acked` lines the workload's record has now.
    fn count_acked(&mut self, index: usize) {
        use std::io::{Read, Seek, SeekFrom};
        let w = &mut self.workloads[index];
        let Ok(mut file) = std::fs::File::open(&w.record) else {
            return;
        };
        if file.seek(SeekFrom::Start(w.read_to)).is_err() {
            return;
        }
        let mut bytes = Vec::new();
        if file.read_to_end(&mut bytes).is_err() {
            return;
        }
        // Whole lines only: the last one may still be being written.
        let Some(end) = bytes.iter().rposition(|b| *b == b'\n') else {
            return;
        };
        let whole = &bytes[..=end];
        w.acked += whole.windows(9).filter(|win| win == b"{\"acked\":").count() as u64;
        w.connected += whole
            .windows(13)
            .filter(|win| win == b"{\"connected\":")
            .count() as u64;
        w.read_to += whole.len() as u64;
    }

    fn step(&mut self, number: usize, line: usize, action: &Action) -> Result<(), Stop> {
        let step = Some(number);
        match action {
            Action::Inject { spec, label } => {
                let record = self.inject(number, spec)?;
                if let Some(label) = label {
                    self.fault_ids.insert(label.clone(), record.id.clone());
                }
                let what = match label {
                    Some(label) => format!("{} ({label})", spec.kind()),
                    None => spec.kind().to_string(),
                };
                self.entry(
                    step,
                    "inject",
                    what,
                    Outcome::Ok,
                    format!("{}: {}", record.id, record.effect),
                );
            }
            Action::Clear { label } => {
                let id = label.as_ref().and_then(|l| self.fault_ids.get(l)).cloned();
                let cleared = fault::clear(&self.run, id.as_deref()).map_err(|err| {
                    Stop::Error(format!("step {number}: clearing a fault: {err}"))
                })?;
                let what = label.clone().unwrap_or_else(|| "all".into());
                let detail = if cleared.is_empty() {
                    "no standing fault".to_string()
                } else {
                    format!("cleared {}", cleared.join(", "))
                };
                self.entry(step, "clear", what, Outcome::Ok, detail);
            }
            Action::Process { action, process } => {
                let target = ProcessFault {
                    process: process.clone(),
                };
                let spec = match action {
                    ProcessAction::Kill => FaultSpec::ProcessKill(target),
                    ProcessAction::Hang => FaultSpec::ProcessHang(target),
                    ProcessAction::Resume => FaultSpec::ProcessResume(target),
                    ProcessAction::Restart => FaultSpec::ProcessRestart(target),
                };
                let record = self.inject(number, &spec)?;
                self.entry(
                    step,
                    action_word(*action),
                    process.clone(),
                    Outcome::Ok,
                    format!("{}: {}", record.id, record.effect),
                );
            }
            Action::Task {
                label,
                server,
                system,
                cluster,
                kind,
                args,
            } => {
                let what = format!(
                    "{label}: {kind} on {system}/{cluster} via {server}{}",
                    if args.as_object().is_some_and(|a| !a.is_empty()) {
                        format!(" {args}")
                    } else {
                        String::new()
                    }
                );
                let submitted = Client::new(&self.run, *server).and_then(|client| {
                    client.post::<Value>("/api/v1/tasks", &json!({ "system": system, "cluster": cluster, "kind": kind, "args": args }))
                });
                match submitted {
                    Ok(task) => {
                        let id = task["id"].as_str().unwrap_or_default().to_string();
                        self.tasks.push((label.clone(), *server, id.clone()));
                        self.entry(
                            step,
                            "task",
                            what,
                            Outcome::Ok,
                            format!("accepted by server {server} as {id}"),
                        );
                    }
                    Err(err) => {
                        let detail = format!("not accepted: {err}");
                        self.assertions.push(AssertionResult {
                            step,
                            line,
                            kind: "task".into(),
                            assertion: what.clone(),
                            passed: false,
                            detail: detail.clone(),
                        });
                        self.entry(step, "task", what, Outcome::Failed, detail);
                        return Err(Stop::Failed);
                    }
                }
            }
            Action::Start { workload } => {
                let index = self.workload_index(workload);
                self.start_workload(index, step);
            }
            Action::Stop { workload } => {
                let index = self.workload_index(workload);
                self.workloads[index].stop.store(true, Ordering::SeqCst);
                self.join_workload(index, step).map_err(Stop::Error)?;
            }
            Action::Wait {
                text,
                condition,
                within,
            } => {
                let began = Instant::now();
                let until = (began + *within).min(self.deadline);
                self.waiting(text);
                let (met, seen) = self.wait_for(condition, until).map_err(Stop::Error)?;
                let took = began.elapsed().as_secs_f64();
                let detail = if met {
                    format!("after {took:.2} s: {seen}")
                } else if until == self.deadline && began + *within > self.deadline {
                    format!("the scenario's timeout ran out after {took:.1} s; last seen: {seen}")
                } else {
                    format!("not within {} s; last seen: {seen}", within.as_secs_f64())
                };
                self.assertions.push(AssertionResult {
                    step,
                    line,
                    kind: "wait".into(),
                    assertion: text.clone(),
                    passed: met,
                    detail: detail.clone(),
                });
                self.entry(
                    step,
                    "wait",
                    text.clone(),
                    if met { Outcome::Ok } else { Outcome::Failed },
                    detail,
                );
                if !met {
                    return Err(Stop::Failed);
                }
            }
            Action::Assert(asserted) => self.assert(step, asserted).map_err(Stop::Error)?,
        }
        Ok(())
    }

    fn inject(&mut self, number: usize, spec: &FaultSpec) -> Result<fault::FaultRecord, Stop> {
        // The workloads learn that a power cut may come (the count is odd
        // while one may be under way), so that their read-backs after it do
        // not expect writes that were never durable.
        let power = matches!(spec, FaultSpec::PowerLoss(_));
        if power {
            self.power_cuts.fetch_add(1, Ordering::SeqCst);
        }
        let injected = fault::inject(
            &self.run,
            spec,
            derive_seed(self.seed, 1000 + number as u64),
        );
        if power {
            self.power_cuts.fetch_add(1, Ordering::SeqCst);
        }
        injected
            .map_err(|err| Stop::Error(format!("step {number}: injecting {}: {err}", spec.kind())))
    }

    fn workload_index(&self, name: &str) -> usize {
        self.workloads
            .iter()
            .position(|w| w.spec.name == name)
            .expect("validated: the workload exists")
    }

    /// Polls until `condition` holds or `until`; whether it held and what
    /// was seen last.
    fn wait_for(
        &mut self,
        condition: &Condition,
        until: Instant,
    ) -> Result<(bool, String), String> {
        loop {
            self.check_interrupted()?;
            self.reap_workloads();
            let Evaluation { met, seen } =
                condition::evaluate(condition, &self.snapshot(condition));
            if met {
                return Ok((true, seen));
            }
            if Instant::now() >= until {
                return Ok((false, seen));
            }
            std::thread::sleep(POLL);
        }
    }

    /// What `condition` needs to be judged, now.
    fn snapshot(&mut self, condition: &Condition) -> Snapshot {
        let mut snapshot = Snapshot::default();
        if condition.needs_views() {
            for pair in self.scenario.domain.pairs() {
                snapshot.views[pair.index()] = Client::new(&self.run, pair)
                    .and_then(|client| client.get::<Value>("/api/v1/domain"))
                    .ok();
            }
        }
        snapshot.processes = self
            .run
            .read_processes()
            .into_iter()
            .map(|p| {
                let state = match (&p.ended, liveness(p.pid)) {
                    (Some(_), _) | (None, "gone") => "ended",
                    (None, state) => state,
                };
                ProcessSeen {
                    name: p.name,
                    pid: p.pid,
                    state: state.to_string(),
                }
            })
            .collect();
        if let Some(label) = condition.task_label() {
            if let Some(found) = self.fetch_task(label) {
                snapshot.tasks.insert(label.to_string(), found);
            }
        }
        for index in 0..self.workloads.len() {
            self.count_acked(index);
            let w = &self.workloads[index];
            snapshot.workloads.insert(
                w.spec.name.clone(),
                WorkloadSeen {
                    running: w.handle.is_some(),
                    ended: w.ended.is_some(),
                    acked: w.acked,
                    reconnects: w.connected.saturating_sub(1),
                },
            );
        }
        snapshot
    }

    /// The server's view of the task labelled `label` (None: never submitted).
    fn fetch_task(&self, label: &str) -> Option<Result<Value, String>> {
        let (_, pair, id) = self.tasks.iter().find(|(l, _, _)| l == label)?;
        Some(
            Client::new(&self.run, *pair)
                .and_then(|client| client.get::<Value>(&format!("/api/v1/tasks/{id}")))
                .map_err(|err| err.to_string()),
        )
    }

    /// Checks an assertion and records it; `Err` only if the scenario cannot
    /// go on (interrupted).
    fn assert(&mut self, step: Option<usize>, asserted: &Asserted) -> Result<(), String> {
        self.check_interrupted()?;
        let (passed, detail) = match &asserted.check {
            Check::Condition(condition) => {
                let Evaluation { met, seen } =
                    condition::evaluate(condition, &self.snapshot(condition));
                (met, seen)
            }
            Check::NoLoss(name) => self.oracle(step, name.as_deref(), true),
            Check::Loss(name) => self.oracle(step, Some(name), false),
            Check::NoGarbage(name) => {
                let mut all = true;
                let mut said = Vec::new();
                for index in self.targets(name.as_deref()) {
                    self.stop_and_join(index, step)?;
                    let w = &self.workloads[index];
                    match &w.ended {
                        Some(Ok(s)) if s.mismatches == 0 && s.blocks_checked > 0 => said.push(format!(
                            "{}: {} blocks read back, none held other data than the last acknowledged write ({} reads failed)",
                            w.spec.name, s.blocks_checked, s.reads_failed
                        )),
                        Some(Ok(s)) if s.mismatches == 0 => {
                            all = false;
                            said.push(format!("{}: no block was read back (nothing to judge)", w.spec.name));
                        }
                        Some(Ok(s)) => {
                            all = false;
                            let shown: Vec<String> = s
                                .mismatch_details
                                .iter()
                                .take(LOST_RANGES_SHOWN)
                                .map(|m| format!("offset {} (block {}): expected write {}, found {}", m.offset, m.block, m.expected_seq, m.found))
                                .collect();
                            said.push(format!("{}: {} read-backs returned other data: {}", w.spec.name, s.mismatches, shown.join("; ")));
                        }
                        Some(Err(err)) => {
                            all = false;
                            said.push(format!("{}: did not run: {err}", w.spec.name));
                        }
                        None => {
                            all = false;
                            said.push(format!("{}: never started", w.spec.name));
                        }
                    }
                }
                (all, said.join("; "))
            }
            Check::SawErrors(name, expected) => {
                let index = self.workload_index(name);
                self.stop_and_join(index, step)?;
                match &self.workloads[index].ended {
                    Some(Ok(s)) => {
                        let errors = s.writes_failed + s.reads_failed + s.flushes_failed;
                        (
                            (errors > 0) == *expected,
                            format!(
                                "{name}: {} writes, {} reads and {} flushes failed",
                                s.writes_failed, s.reads_failed, s.flushes_failed
                            ),
                        )
                    }
                    Some(Err(err)) => (false, format!("{name}: did not run: {err}")),
                    None => (false, format!("{name}: never started")),
                }
            }
            Check::ScrubClean(system) => self.scrub_clean(*system)?,
            Check::EveryTaskVia(pair) => {
                let via: Vec<(String, String)> = self
                    .tasks
                    .iter()
                    .filter(|(_, p, _)| p == pair)
                    .map(|(l, _, id)| (l.clone(), id.clone()))
                    .collect();
                if via.is_empty() {
                    (
                        false,
                        format!("the scenario submitted no task through server {pair}"),
                    )
                } else {
                    let mut all = true;
                    let mut said = Vec::new();
                    for (label, _) in via {
                        match self.fetch_task(&label) {
                            Some(Ok(task)) => {
                                let state = task["state"].as_str().unwrap_or("unknown");
                                all &= state == "complete";
                                said.push(format!(
                                    "{label} {state}{}",
                                    task["failure"]
                                        .as_str()
                                        .map(|f| format!(" ({f})"))
                                        .unwrap_or_default()
                                ));
                            }
                            Some(Err(err)) => {
                                all = false;
                                said.push(format!("{label}: {err}"));
                            }
                            None => all = false,
                        }
                    }
                    (all, said.join(", "))
                }
            }
        };
        self.assertions.push(AssertionResult {
            step,
            line: asserted.line,
            kind: "assert".into(),
            assertion: asserted.text.clone(),
            passed,
            detail: detail.clone(),
        });
        self.entry(
            step,
            "assert",
            asserted.text.clone(),
            if passed { Outcome::Ok } else { Outcome::Failed },
            detail,
        );
        Ok(())
    }

    /// The workloads an assertion is about (None: all).
    fn targets(&self, name: Option<&str>) -> Vec<usize> {
        match name {
            Some(name) => vec![self.workload_index(name)],
            None => (0..self.workloads.len()).collect(),
        }
    }

    fn stop_and_join(&mut self, index: usize, step: Option<usize>) -> Result<(), String> {
        if self.workloads[index].handle.is_some() {
            self.workloads[index].stop.store(true, Ordering::SeqCst);
            self.join_workload(index, step)?;
        }
        Ok(())
    }

    /// The write oracle on the workloads: with `want_clean`, passes when
    /// nothing durable was lost (and something was durable); without, when
    /// it caught a loss. The detail names the bytes lost.
    fn oracle(
        &mut self,
        step: Option<usize>,
        name: Option<&str>,
        want_clean: bool,
    ) -> (bool, String) {
        let mut all = true;
        let mut said = Vec::new();
        for index in self.targets(name) {
            if let Err(err) = self.stop_and_join(index, step) {
                return (false, err);
            }
            let label = self.workloads[index].spec.name.clone();
            let summary = match &self.workloads[index].ended {
                Some(Ok(summary)) => summary.clone(),
                Some(Err(err)) => {
                    all = false;
                    said.push(format!("{label}: did not run: {err}"));
                    continue;
                }
                None => {
                    all = false;
                    said.push(format!("{label}: never started"));
                    continue;
                }
            };
            self.waiting(&format!("the oracle to verify {label}"));
            let (uri, record) = (
                self.workloads[index].uri.clone(),
                self.workloads[index].record.clone(),
            );
            let bound = self
                .deadline
                .saturating_duration_since(Instant::now())
                .max(FINAL_GRACE);
            let verified: Result<VerifyReport, (bool, String)> =
                workload::record::Record::read(&record)
                    .map_err(|err| (false, err.to_string()))
                    .and_then(|parsed| {
                        self.runtime
                            .block_on(async {
                                tokio::time::timeout(bound, workload::verify(&parsed, &uri)).await
                            })
                            .map_err(|_| {
                                (
                                    false,
                                    format!("verify did not finish within {} s", bound.as_secs()),
                                )
                            })?
                            .map_err(|err| {
                                (matches!(err, WorkloadError::Read { .. }), err.to_string())
                            })
                    });
            let report = match verified {
                Ok(report) => report,
                Err((unreadable, err)) => {
                    // A durable write that cannot be read back (an I/O error)
                    // is lost too: a catch for `loss in W`, a failure for
                    // `no loss`. Anything else proves nothing either way.
                    all &= unreadable && !want_clean;
                    said.push(format!(
                        "{label}: the oracle could not read the volume back: {err}"
                    ));
                    continue;
                }
            };
            let lost = report.lost_blocks > 0 || summary.mismatches > 0;
            let mut words =
                format!(
                "{label}: {} writes durable, {} blocks checked, {} lost, {} read-back mismatches",
                report.writes_durable, report.blocks_checked, report.lost_blocks, summary.mismatches
            );
            for range in report.lost_ranges.iter().take(LOST_RANGES_SHOWN) {
                words.push_str(&format!(
                    "; LOST bytes {}..{} ({} blocks{})",
                    range.offset,
                    range.offset + range.length,
                    range.block_count,
                    range
                        .blocks
                        .first()
                        .map(|b| format!(
                            ", e.g. block {} expected write {}, found {}",
                            b.block, b.expected.seq, b.found
                        ))
                        .unwrap_or_default()
                ));
            }
            if report.lost_ranges.len() > LOST_RANGES_SHOWN {
                words.push_str(&format!(
                    "; … {} more lost ranges",
                    report.lost_ranges.len() - LOST_RANGES_SHOWN
                ));
            }
            let ok = if want_clean {
                if report.writes_durable == 0 {
                    words.push_str(" (nothing was durable: the check proves nothing)");
                }
                !lost && report.writes_durable > 0
            } else {
                lost
            };
            all &= ok;
            self.workloads[index].verify = Some(report);
            said.push(words);
        }
        (all, said.join("; "))
    }

    /// Submits a scrub without repair (through server A, or B) and waits for
    /// it; whether it completed and found nothing.
    fn scrub_clean(&mut self, system: usize) -> Result<(bool, String), String> {
        let pairs = self.scenario.domain.pairs();
        let mut refused = Vec::new();
        for pair in pairs {
            let submitted = Client::new(&self.run, pair).and_then(|client| {
                client.post::<Value>("/api/v1/tasks", &json!({ "system": format!("s{system}"), "cluster": "c0", "kind": "scrub", "args": {} }))
            });
            let id = match submitted {
                Ok(task) => task["id"].as_str().unwrap_or_default().to_string(),
                Err(err) => {
                    refused.push(err.to_string());
                    continue;
                }
            };
            let label = format!("scrub-check-{}", self.tasks.len() + 1);
            self.tasks.push((label.clone(), pair, id.clone()));
            self.waiting(&format!("the scrub {id} to end"));
            let until = Instant::now()
                + self
                    .deadline
                    .saturating_duration_since(Instant::now())
                    .max(FINAL_GRACE);
            let condition = Condition::Task {
                label: label.clone(),
                want: condition::TaskWant::Ended,
            };
            let (ended, seen) = self.wait_for(&condition, until)?;
            if !ended {
                return Ok((
                    false,
                    format!("scrub {id} (via {pair}) did not end in time: {seen}"),
                ));
            }
            let task = match self.fetch_task(&label) {
                Some(Ok(task)) => task,
                Some(Err(err)) => return Ok((false, err)),
                None => return Ok((false, "the scrub vanished".into())),
            };
            if task["state"] != "complete" {
                return Ok((
                    false,
                    format!(
                        "scrub {id} (via {pair}) failed: {}",
                        task["failure"].as_str().unwrap_or("?")
                    ),
                ));
            }
            let result = &task["result"];
            return Ok((
                condition::result_is_clean(result),
                format!("scrub {id} (via {pair}): {}", condition::findings(result)),
            ));
        }
        Ok((
            false,
            format!("no server took the scrub: {}", refused.join("; ")),
        ))
    }

    /// Stops what still runs, reads the fault log, brings the domain down,
    /// decides the verdict, removes or keeps the run directory.
    fn finish(mut self, mut error: Option<String>, keep: bool) -> Report {
        if let Some(err) = &error {
            self.entry(None, "error", err.clone(), Outcome::Error, "");
        }
        for w in &self.workloads {
            w.stop.store(true, Ordering::SeqCst);
        }
        for index in 0..self.workloads.len() {
            if self.workloads[index].handle.is_some() {
                let _ = self.join_workload(index, None);
            }
        }
        let faults = self.faults();
        match supervisor::down(&self.run) {
            Ok(true) => self.entry(None, "domain", "down", Outcome::Ok, ""),
            Ok(false) => {}
            Err(err) => {
                let err = format!("bringing the domain down: {err}");
                self.entry(None, "domain", "down", Outcome::Error, err.clone());
                error.get_or_insert(err);
            }
        }
        for dir in std::mem::take(&mut self.mounted) {
            if let Err(err) = nix::mount::umount(&dir) {
                let err = format!("unmounting {}: {err}", dir.display());
                self.entry(None, "disk space", "unmount", Outcome::Error, err.clone());
                error.get_or_insert(err);
            }
        }
        let failed = self.assertions.iter().any(|a| !a.passed);
        let outcome = match (&error, failed) {
            (Some(_), _) => Verdict::Error,
            (None, true) => Verdict::Fail,
            (None, false) => Verdict::Pass,
        };
        let verdict = match (outcome, self.scenario.expect) {
            (Verdict::Error, _) => Verdict::Error,
            (Verdict::Pass, Expect::Pass) | (Verdict::Fail, Expect::Fail) => Verdict::Pass,
            _ => Verdict::Fail,
        };
        let run_dir = self.run.root().to_path_buf();
        let kept = keep || verdict != Verdict::Pass || std::fs::remove_dir_all(&run_dir).is_err();
        let workloads = self
            .workloads
            .iter()
            .map(|w| WorkloadReport {
                name: w.spec.name.clone(),
                volume: format!("s{}/{}", w.spec.system, w.spec.volume),
                uri: w.uri.clone(),
                seed: w.seed,
                record: w.record.clone(),
                summary: w.ended.as_ref().and_then(|e| e.as_ref().ok()).cloned(),
                error: w.ended.as_ref().and_then(|e| e.as_ref().err()).cloned(),
                verify: w.verify.clone(),
            })
            .collect();
        Report {
            scenario: self.scenario.name.clone(),
            file: self.scenario.path.clone(),
            description: self.scenario.description.clone(),
            seed: self.seed,
            expect: self.scenario.expect,
            outcome,
            verdict,
            exit_code: verdict.exit_code(),
            error,
            run_dir,
            run_dir_kept: kept,
            elapsed_ms: self.started.elapsed().as_millis() as u64,
            timeline: self.timeline,
            faults,
            assertions: self.assertions,
            workloads,
        }
    }

    /// Every fault of the run's fault log, with times since the start.
    fn faults(&mut self) -> Vec<FaultEntry> {
        let since = |ms: u64| ms.saturating_sub(self.started_unix_ms);
        let events = match fault::read_log(&self.run) {
            Ok(events) => events,
            Err(err) => {
                self.entry(
                    None,
                    "faults",
                    "the fault log",
                    Outcome::Error,
                    err.to_string(),
                );
                return Vec::new();
            }
        };
        let mut faults: Vec<FaultEntry> = Vec::new();
        for event in events {
            match event {
                FaultEvent::Injected(record) => faults.push(FaultEntry {
                    id: record.id,
                    kind: record.spec.kind().to_string(),
                    spec: record.spec,
                    t_ms: since(record.injected_ms),
                    effect: record.effect,
                    cleared_t_ms: None,
                }),
                FaultEvent::Cleared { id, cleared_ms } => {
                    if let Some(fault) = faults.iter_mut().find(|f| f.id == id) {
                        fault.cleared_t_ms = Some(since(cleared_ms));
                    }
                }
            }
        }
        faults
    }
}

fn action_word(action: ProcessAction) -> &'static str {
    match action {
        ProcessAction::Kill => "kill",
        ProcessAction::Hang => "hang",
        ProcessAction::Resume => "resume",
        ProcessAction::Restart => "restart",
    }
}

/// `s0/vol0` → URI, from the servers' views.
fn volume_uris(views: &[(Pair, Value)]) -> BTreeMap<String, String> {
    let mut uris = BTreeMap::new();
    for (_, view) in views {
        for system in view["systems"].as_array().into_iter().flatten() {
            let name = system["name"].as_str().unwrap_or_default();
            for volume in system["volumes"].as_array().into_iter().flatten() {
                if let (Some(volume), Some(uri)) = (volume["name"].as_str(), volume["uri"].as_str())
                {
                    uris.entry(format!("{name}/{volume}"))
                        .or_insert_with(|| uri.to_string());
                }
            }
        }
    }
    uris
}

/// Every `*.toml` of `dir` that parses, by name; and the ones that do not,
/// with why.
pub fn list(dir: &Path) -> Result<Vec<Result<Scenario, ScenarioError>>, ScenarioError> {
    let entries = std::fs::read_dir(dir).map_err(|source| ScenarioError::List {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    paths.sort();
    Ok(paths.iter().map(|p| Scenario::load(p)).collect())
}
