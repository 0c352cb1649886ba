//! The scenario file (`scenarios/NAME.toml`, documented for users in
//! `scenarios/README.md`): what it may say, and its validation. A syntax
//! error, an unknown field or a value of the wrong type is the TOML parser's
//! (serde `deny_unknown_fields`), with the line and column; everything else
//! (a bad duration, a process the domain does not have, a wait on a task no
//! earlier step submitted) names the line and the field or step.
//!
//! ```toml
//! description = "kill -9 of the owning driver under a writer: nothing lost"
//! seed = 7
//! timeout = "60s"
//!
//! [domain]                   # inline domain keys, or file = "x.toml"; none: the default
//! servers = { a = "s0/c0", b = "s0/c1" }
//! [[domain.systems]]
//! disks = 5
//! disk_size = "64MiB"
//! spares = 1
//!
//! [[workloads]]
//! name = "w"
//! volume = "vol0"
//! fua_every = 7
//!
//! [[steps]]
//! wait = "workload w writes >= 300"
//! [[steps]]
//! kill = "s0/c0/driver"
//! [[steps]]
//! wait = "volume vol0 owner s0/c1"
//! within = "10s"
//!
//! assertions = ["no loss", "scrub clean"]   # (top-level keys go before the tables)
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use toml::Spanned;

use super::condition::{parse_check, parse_condition, Check, Condition};
use super::ScenarioError;
use crate::domain::{ClusterName, Domain, Pair, Placement, DEFAULT_CONFIG};
use crate::fault::FaultSpec;

/// How long a whole scenario may take unless it says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a wait may take unless it says otherwise (`within`).
pub const DEFAULT_WITHIN: Duration = Duration::from_secs(30);

/// Whether the scenario is meant to pass or to fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Expect {
    /// Every assertion holds.
    #[default]
    Pass,
    /// At least one assertion fails (a scenario that shows the checks bite).
    Fail,
}

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSection {
    #[serde(default)]
    name: Option<Spanned<String>>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    timeout: Option<Spanned<String>>,
    #[serde(default)]
    expect: Option<Expect>,
    #[serde(default)]
    domain: Option<Spanned<toml::Table>>,
    #[serde(default)]
    disk_space: Option<Spanned<String>>,
    #[serde(default)]
    workloads: Vec<Spanned<WorkloadSection>>,
    #[serde(default)]
    steps: Vec<Spanned<StepSection>>,
    #[serde(default)]
    assertions: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkloadSection {
    #[serde(default)]
    name: Option<String>,
    volume: Spanned<String>,
    #[serde(default = "default_qd")]
    qd: usize,
    #[serde(default)]
    fua_every: u64,
    #[serde(default = "default_flush_every")]
    flush_every: u64,
    #[serde(default = "default_block_size")]
    block_size: u32,
    #[serde(default = "default_max_blocks")]
    max_blocks: u32,
    #[serde(default)]
    duration: Option<Spanned<String>>,
    #[serde(default = "default_true")]
    autostart: bool,
    #[serde(default)]
    reconnect_timeout: Option<Spanned<String>>,
    #[serde(default)]
    request_timeout: Option<Spanned<String>>,
}

fn default_qd() -> usize {
    16
}
fn default_flush_every() -> u64 {
    32
}
fn default_block_size() -> u32 {
    4096
}
fn default_max_blocks() -> u32 {
    16
}
fn default_true() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StepSection {
    #[serde(default)]
    at: Option<Spanned<String>>,
    #[serde(default)]
    after: Option<Spanned<String>>,
    #[serde(default)]
    note: Option<String>,
    #[serde(default)]
    inject: Option<Spanned<FaultSpec>>,
    #[serde(default)]
    label: Option<Spanned<String>>,
    #[serde(default)]
    clear: Option<Spanned<String>>,
    #[serde(default)]
    kill: Option<Spanned<String>>,
    #[serde(default)]
    hang: Option<Spanned<String>>,
    #[serde(default)]
    resume: Option<Spanned<String>>,
    #[serde(default)]
    restart: Option<Spanned<String>>,
    #[serde(default)]
    task: Option<Spanned<TaskSection>>,
    #[serde(default)]
    start: Option<Spanned<String>>,
    #[serde(default)]
    stop: Option<Spanned<String>>,
    #[serde(default)]
    wait: Option<Spanned<String>>,
    #[serde(default)]
    within: Option<Spanned<String>>,
    #[serde(default)]
    assert: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TaskSection {
    #[serde(default)]
    label: Option<String>,
    kind: String,
    cluster: String,
    #[serde(default)]
    server: Option<String>,
    #[serde(default)]
    args: Option<toml::Table>,
}

/// A validated scenario.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// The file.
    pub path: PathBuf,
    /// Its name (the file name without `.toml`).
    pub name: String,
    /// What it shows.
    pub description: String,
    /// The seed of a run not given `--seed`.
    pub seed: u64,
    /// How long the whole run may take (domain start to verdict).
    pub timeout: Duration,
    /// Pass or fail.
    pub expect: Expect,
    /// The domain configuration it starts (TOML, ports 0).
    pub domain_config: String,
    /// The same, parsed.
    pub domain: Domain,
    /// The size of the host file system each system's disks live on (a tmpfs
    /// of that size mounted for the run), when the scenario fills it up.
    pub disk_space: Option<u64>,
    /// The workloads.
    pub workloads: Vec<WorkloadSpec>,
    /// The timeline.
    pub steps: Vec<Step>,
    /// Checked once the timeline ended and the workloads stopped.
    pub assertions: Vec<Asserted>,
}

/// A workload of the write oracle.
#[derive(Debug, Clone)]
pub struct WorkloadSpec {
    /// Its name (`w`), for steps and assertions.
    pub name: String,
    /// System index.
    pub system: usize,
    /// Volume name.
    pub volume: String,
    /// Requests in flight.
    pub qd: usize,
    /// Every K-th write with FUA (0: none).
    pub fua_every: u64,
    /// A FLUSH every K writes.
    pub flush_every: u64,
    /// Block size.
    pub block_size: u32,
    /// Longest request, in blocks.
    pub max_blocks: u32,
    /// How long (None: until the timeline ends or a `stop` step).
    pub duration: Option<Duration>,
    /// Starts with the timeline (else: a `start` step starts it).
    pub autostart: bool,
    /// How long to keep trying to connect.
    pub reconnect_timeout: Duration,
    /// How long a request may take before the connection is taken for dead.
    pub request_timeout: Duration,
}

/// An assertion and where it was written.
#[derive(Debug, Clone)]
pub struct Asserted {
    /// As written.
    pub text: String,
    /// Parsed.
    pub check: Check,
    /// Its line.
    pub line: usize,
}

/// When a step runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timing {
    /// Right after the previous step.
    Next,
    /// At this offset from the start of the timeline (at once if that has
    /// passed).
    At(Duration),
    /// This long after the previous step ended.
    After(Duration),
}

/// A process action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessAction {
    /// SIGKILL.
    Kill,
    /// SIGSTOP.
    Hang,
    /// SIGCONT.
    Resume,
    /// Started again by the supervisor.
    Restart,
}

/// What a step does.
#[derive(Debug, Clone)]
pub enum Action {
    /// Injects a fault (process faults included).
    Inject {
        /// The fault.
        spec: FaultSpec,
        /// A name for `clear`.
        label: Option<String>,
    },
    /// Clears a standing fault by its label (None: every standing fault).
    Clear {
        /// The label.
        label: Option<String>,
    },
    /// Kill, hang, resume or restart a process (a process fault).
    Process {
        /// Which.
        action: ProcessAction,
        /// `s0/c0/driver`.
        process: String,
    },
    /// Submits a task through a server.
    Task {
        /// Its label.
        label: String,
        /// Through which server.
        server: Pair,
        /// `s0`.
        system: String,
        /// `c1`.
        cluster: String,
        /// Its kind.
        kind: String,
        /// Its arguments (a JSON object).
        args: Value,
    },
    /// Starts a workload.
    Start {
        /// Its name.
        workload: String,
    },
    /// Stops a workload (it drains, flushes and ends).
    Stop {
        /// Its name.
        workload: String,
    },
    /// Waits until a condition holds.
    Wait {
        /// As written.
        text: String,
        /// Parsed.
        condition: Condition,
        /// The bound.
        within: Duration,
    },
    /// Checks something now.
    Assert(Asserted),
}

/// One step of the timeline.
#[derive(Debug, Clone)]
pub struct Step {
    /// 1-based, in file order.
    pub number: usize,
    /// The line of its `[[steps]]` table.
    pub line: usize,
    /// When.
    pub timing: Timing,
    /// What.
    pub action: Action,
    /// The author's note, shown in the timeline.
    pub note: Option<String>,
}

impl Action {
    /// The action's name, as the file writes it.
    pub fn keyword(&self) -> &'static str {
        match self {
            Self::Inject { .. } => "inject",
            Self::Clear { .. } => "clear",
            Self::Process { action, .. } => match action {
                ProcessAction::Kill => "kill",
                ProcessAction::Hang => "hang",
                ProcessAction::Resume => "resume",
                ProcessAction::Restart => "restart",
            },
            Self::Task { .. } => "task",
            Self::Start { .. } => "start",
            Self::Stop { .. } => "stop",
            Self::Wait { .. } => "wait",
            Self::Assert(_) => "assert",
        }
    }
}

/// Parses `30s`, `500ms`, `2m`, `1h`, `1.5s` or plain seconds; zero is
/// allowed (callers that need a positive one check).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration such as 30s, 500ms or 2m"))?;
    let seconds = match unit.trim() {
        "" | "s" => value,
        "ms" => value / 1000.0,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        unit => return Err(format!("{text:?}: unknown unit {unit:?} (ms, s, m, h)")),
    };
    if !seconds.is_finite() || !(0.0..=86400.0).contains(&seconds) {
        return Err(format!("{text:?}: a duration must be from 0 to a day"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// 1-based line and column of byte `offset` of `text`.
pub fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// What validation needs to say where a problem is.
struct Context<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Context<'_> {
    fn line(&self, span: Range<usize>) -> usize {
        line_column(self.text, span.start).0
    }

    fn invalid(
        &self,
        span: Range<usize>,
        field: impl Into<String>,
        problem: impl Into<String>,
    ) -> ScenarioError {
        ScenarioError::Invalid {
            path: self.path.to_path_buf(),
            line: self.line(span),
            field: field.into(),
            problem: problem.into(),
        }
    }

    fn duration(
        &self,
        value: &Spanned<String>,
        field: &str,
        positive: bool,
    ) -> Result<Duration, ScenarioError> {
        let duration = parse_duration(value.get_ref())
            .map_err(|problem| self.invalid(value.span(), field, problem))?;
        if positive && duration.is_zero() {
            return Err(self.invalid(value.span(), field, "must be more than zero"));
        }
        Ok(duration)
    }
}

impl Scenario {
    /// Reads and validates the scenario file at `path`.
    pub fn load(path: &Path) -> Result<Self, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Validates a scenario given as text (`path` is where it came from: it
    /// names the scenario and anchors a `domain.file`).
    pub fn parse(path: &Path, text: &str) -> Result<Self, ScenarioError> {
        let file: FileSection = toml::from_str(text).map_err(|err| syntax(path, text, &err))?;
        let cx = Context { path, text };
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "scenario".into());
        if let Some(name) = &file.name {
            if name.get_ref() != &stem {
                return Err(cx.invalid(
                    name.span(),
                    "name",
                    format!(
                        "{:?} differs from the file's name {stem:?} (the file name names the scenario: `make scenario-{stem}`)",
                        name.get_ref()
                    ),
                ));
            }
        }
        let timeout = match &file.timeout {
            Some(value) => cx.duration(value, "timeout", true)?,
            None => DEFAULT_TIMEOUT,
        };
        let (domain_config, domain) = resolve_domain(&cx, file.domain.as_ref())?;
        let disk_space = match &file.disk_space {
            None => None,
            Some(value) => Some(
                crate::cli::units::parse_size(value.get_ref())
                    .map_err(|problem| cx.invalid(value.span(), "disk_space", problem))?,
            ),
        };

        // Names the timeline may refer to.
        let processes = process_names(&domain);
        let mut workloads = Vec::new();
        for (index, section) in file.workloads.iter().enumerate() {
            workloads.push(workload(&cx, index, section, &domain, &workloads)?);
        }
        let workload_names: BTreeSet<String> = workloads.iter().map(|w| w.name.clone()).collect();
        let mut started: BTreeSet<String> = workloads
            .iter()
            .filter(|w| w.autostart)
            .map(|w| w.name.clone())
            .collect();
        let mut volumes: Vec<BTreeSet<String>> = domain
            .systems
            .iter()
            .map(|s| (0..s.volumes).map(|v| format!("vol{v}")).collect())
            .collect();
        let mut fault_labels: BTreeSet<String> = BTreeSet::new();
        let mut task_labels: BTreeMap<String, Pair> = BTreeMap::new();
        let mut steps = Vec::new();
        for (index, section) in file.steps.iter().enumerate() {
            let number = index + 1;
            let span = section.span();
            let line = cx.line(span.clone());
            let step_field = |what: &str| format!("step {number} ({what})");
            let s = section.get_ref();
            let timing = match (&s.at, &s.after) {
                (Some(_), Some(after)) => {
                    return Err(cx.invalid(
                        after.span(),
                        step_field("after"),
                        "give `at` or `after`, not both",
                    ))
                }
                (Some(at), None) => Timing::At(cx.duration(at, &step_field("at"), false)?),
                (None, Some(after)) => {
                    Timing::After(cx.duration(after, &step_field("after"), false)?)
                }
                (None, None) => Timing::Next,
            };
            let given: Vec<&str> = [
                ("inject", s.inject.is_some()),
                ("clear", s.clear.is_some()),
                ("kill", s.kill.is_some()),
                ("hang", s.hang.is_some()),
                ("resume", s.resume.is_some()),
                ("restart", s.restart.is_some()),
                ("task", s.task.is_some()),
                ("start", s.start.is_some()),
                ("stop", s.stop.is_some()),
                ("wait", s.wait.is_some()),
                ("assert", s.assert.is_some()),
            ]
            .into_iter()
            .filter_map(|(name, there)| there.then_some(name))
            .collect();
            if given.len() != 1 {
                return Err(cx.invalid(
                    span,
                    format!("step {number}"),
                    format!(
                        "a step does exactly one of inject, clear, kill, hang, resume, restart, task, start, stop, wait, assert; this one {}",
                        if given.is_empty() { "does none".to_string() } else { format!("has {}", given.join(" and ")) }
                    ),
                ));
            }
            let keyword = given[0];
            let field = step_field(keyword);
            if let Some(label) = &s.label {
                if keyword != "inject" {
                    return Err(cx.invalid(label.span(), step_field("label"), "`label` names an injected fault (for `clear`); tasks take `label` inside `task = { … }`"));
                }
            }
            if let Some(within) = &s.within {
                if keyword != "wait" {
                    return Err(cx.invalid(
                        within.span(),
                        step_field("within"),
                        "`within` bounds a `wait`",
                    ));
                }
            }
            let check_workload = |name: &str, at: Range<usize>| -> Result<(), ScenarioError> {
                if workload_names.contains(name) {
                    Ok(())
                } else {
                    Err(cx.invalid(
                        at,
                        field.clone(),
                        format!(
                            "no workload {name:?} (workloads: {})",
                            list(&workload_names)
                        ),
                    ))
                }
            };
            let action = match keyword {
                "inject" => {
                    let spec = s
                        .inject
                        .as_ref()
                        .map(Spanned::get_ref)
                        .cloned()
                        .ok_or_else(|| cx.invalid(span.clone(), field.clone(), "missing"))?;
                    check_fault(
                        &cx,
                        s.inject.as_ref().map_or(span.clone(), Spanned::span),
                        &field,
                        &spec,
                        &domain,
                        &processes,
                    )?;
                    let label = match &s.label {
                        Some(label) => {
                            if !fault_labels.insert(label.get_ref().clone())
                                || label.get_ref() == "all"
                            {
                                return Err(cx.invalid(
                                    label.span(),
                                    step_field("label"),
                                    format!(
                                        "{:?} is already a fault's label (or is `all`)",
                                        label.get_ref()
                                    ),
                                ));
                            }
                            Some(label.get_ref().clone())
                        }
                        None => None,
                    };
                    Action::Inject { spec, label }
                }
                "clear" => {
                    let value = s
                        .clear
                        .as_ref()
                        .ok_or_else(|| cx.invalid(span.clone(), field.clone(), "missing"))?;
                    let label = value.get_ref();
                    if label == "all" {
                        Action::Clear { label: None }
                    } else if fault_labels.contains(label) {
                        Action::Clear {
                            label: Some(label.clone()),
                        }
                    } else {
                        return Err(cx.invalid(value.span(), field, format!("no earlier step injected a fault labelled {label:?} (labels: {}; or `all`)", list(&fault_labels))));
                    }
                }
                "kill" | "hang" | "resume" | "restart" => {
                    let (value, action) = match keyword {
                        "kill" => (&s.kill, ProcessAction::Kill),
                        "hang" => (&s.hang, ProcessAction::Hang),
                        "resume" => (&s.resume, ProcessAction::Resume),
                        _ => (&s.restart, ProcessAction::Restart),
                    };
                    let value = value
                        .as_ref()
                        .ok_or_else(|| cx.invalid(span.clone(), field.clone(), "missing"))?;
                    check_process(&cx, value.span(), &field, value.get_ref(), &processes)?;
                    Action::Process {
                        action,
                        process: value.get_ref().clone(),
                    }
                }
                "task" => {
                    let value = s
                        .task
                        .as_ref()
                        .ok_or_else(|| cx.invalid(span.clone(), field.clone(), "missing"))?;
                    let task = value.get_ref();
                    let at = value.span();
                    let label = task.label.clone().unwrap_or_else(|| format!("t{number}"));
                    let server = Pair::parse(task.server.as_deref().unwrap_or("A"))
                        .map_err(|p| cx.invalid(at.clone(), format!("{field}.server"), p))?;
                    if domain.server(server).is_none() {
                        return Err(cx.invalid(
                            at,
                            format!("{field}.server"),
                            format!("the domain has no server {server}"),
                        ));
                    }
                    let cluster = ClusterName::parse(&task.cluster)
                        .map_err(|p| cx.invalid(at.clone(), format!("{field}.cluster"), p))?;
                    if cluster.system >= domain.systems.len() {
                        return Err(cx.invalid(
                            at,
                            format!("{field}.cluster"),
                            format!("the domain has no system s{}", cluster.system),
                        ));
                    }
                    let args = match &task.args {
                        Some(table) => serde_json::to_value(table).map_err(|err| {
                            cx.invalid(at.clone(), format!("{field}.args"), err.to_string())
                        })?,
                        None => Value::Object(Default::default()),
                    };
                    crate::task::Task::parse(&task.kind, &args)
                        .map_err(|p| cx.invalid(at.clone(), field.clone(), p))?;
                    if task.kind == "volume-create" {
                        if let Some(name) = args["name"].as_str() {
                            volumes[cluster.system].insert(name.to_string());
                        }
                    }
                    if task_labels.insert(label.clone(), server).is_some() {
                        return Err(cx.invalid(
                            at,
                            format!("{field}.label"),
                            format!("{label:?} labels an earlier task too"),
                        ));
                    }
                    Action::Task {
                        label,
                        server,
                        system: format!("s{}", cluster.system),
                        cluster: format!("c{}", cluster.cluster),
                        kind: task.kind.clone(),
                        args,
                    }
                }
                "start" | "stop" => {
                    let value = if keyword == "start" {
                        &s.start
                    } else {
                        &s.stop
                    };
                    let value = value
                        .as_ref()
                        .ok_or_else(|| cx.invalid(span.clone(), field.clone(), "missing"))?;
                    let name = value.get_ref().clone();
                    check_workload(&name, value.span())?;
                    if keyword == "start" {
                        if !started.insert(name.clone()) {
                            return Err(cx.invalid(value.span(), field, format!("workload {name:?} is already started (it has autostart = true, or an earlier step starts it); a workload runs once")));
                        }
                        Action::Start { workload: name }
                    } else {
                        if !started.contains(&name) {
                            return Err(cx.invalid(value.span(), field, format!("workload {name:?} is not started by then (autostart = false and no earlier `start`)")));
                        }
                        Action::Stop { workload: name }
                    }
                }
                "wait" => {
                    let value = s
                        .wait
                        .as_ref()
                        .ok_or_else(|| cx.invalid(span.clone(), field.clone(), "missing"))?;
                    let condition = parse_condition(value.get_ref())
                        .map_err(|p| cx.invalid(value.span(), field.clone(), p))?;
                    check_condition(
                        &cx,
                        value.span(),
                        &field,
                        &condition,
                        &domain,
                        &processes,
                        &volumes,
                        &task_labels,
                        &workload_names,
                    )?;
                    let within = match &s.within {
                        Some(within) => cx.duration(within, &step_field("within"), true)?,
                        None => DEFAULT_WITHIN,
                    };
                    Action::Wait {
                        text: value.get_ref().clone(),
                        condition,
                        within,
                    }
                }
                _ => {
                    let value = s
                        .assert
                        .as_ref()
                        .ok_or_else(|| cx.invalid(span.clone(), field.clone(), "missing"))?;
                    let check = check_assertion(
                        &cx,
                        value,
                        &field,
                        &domain,
                        &processes,
                        &volumes,
                        &task_labels,
                        &workload_names,
                    )?;
                    Action::Assert(check)
                }
            };
            steps.push(Step {
                number,
                line,
                timing,
                action,
                note: s.note.clone(),
            });
        }
        let mut assertions = Vec::new();
        for (index, value) in file.assertions.iter().enumerate() {
            assertions.push(check_assertion(
                &cx,
                value,
                &format!("assertions[{index}]"),
                &domain,
                &processes,
                &volumes,
                &task_labels,
                &workload_names,
            )?);
        }
        Ok(Self {
            path: path.to_path_buf(),
            name: stem,
            description: file.description.unwrap_or_default(),
            seed: file.seed.unwrap_or(1),
            timeout,
            expect: file.expect.unwrap_or_default(),
            domain_config,
            disk_space,
            domain,
            workloads,
            steps,
            assertions,
        })
    }
}

fn list(names: &BTreeSet<String>) -> String {
    if names.is_empty() {
        "none".into()
    } else {
        names.iter().cloned().collect::<Vec<_>>().join(", ")
    }
}

/// A TOML or serde error with its line and column.
fn syntax(path: &Path, text: &str, err: &toml::de::Error) -> ScenarioError {
    let (line, column) = err
        .span()
        .map_or((0, 0), |span| line_column(text, span.start));
    ScenarioError::Syntax {
        path: path.to_path_buf(),
        line,
        column,
        message: err.message().trim().replace('\n', " "),
    }
}

/// The domain's configuration text (ports forced to 0, so a scenario runs
/// beside anything) and the domain.
fn resolve_domain(
    cx: &Context<'_>,
    section: Option<&Spanned<toml::Table>>,
) -> Result<(String, Domain), ScenarioError> {
    let (mut table, span) = match section {
        None => (
            toml::from_str::<toml::Table>(DEFAULT_CONFIG)
                .map_err(|err| syntax(Path::new("the default domain"), DEFAULT_CONFIG, &err))?,
            0..0,
        ),
        Some(section) => {
            let table = section.get_ref();
            match table.get("file") {
                Some(file) => {
                    let Some(name) = file.as_str().filter(|_| table.len() == 1) else {
                        return Err(cx.invalid(
                            section.span(),
                            "domain.file",
                            "`file` is a path (a string), and then the only key of [domain]",
                        ));
                    };
                    let base = cx.path.parent().unwrap_or(Path::new("."));
                    let path = base.join(name);
                    let text =
                        std::fs::read_to_string(&path).map_err(|source| ScenarioError::Read {
                            path: path.clone(),
                            source,
                        })?;
                    (
                        toml::from_str::<toml::Table>(&text)
                            .map_err(|err| syntax(&path, &text, &err))?,
                        section.span(),
                    )
                }
                None => (table.clone(), section.span()),
            }
        }
    };
    let mut ports = toml::Table::new();
    ports.insert("nbd".into(), toml::Value::Integer(0));
    ports.insert("http".into(), toml::Value::Integer(0));
    table.insert("ports".into(), toml::Value::Table(ports));
    let text = toml::to_string(&table)
        .map_err(|err| cx.invalid(span.clone(), "domain", err.to_string()))?;
    let domain = Domain::parse(&text).map_err(|err| match err {
        crate::domain::ConfigError::Invalid { field, problem } => {
            cx.invalid(span.clone(), format!("domain.{field}"), problem)
        }
        crate::domain::ConfigError::Syntax { source } => cx.invalid(
            span.clone(),
            "domain",
            source.message().trim().replace('\n', " "),
        ),
        other => cx.invalid(span.clone(), "domain", other.to_string()),
    })?;
    Ok((text, domain))
}

/// Every process of the domain, by name.
pub fn process_names(domain: &Domain) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for cluster in domain.clusters() {
        names.insert(format!("{cluster}/driver"));
        for pair in domain.pairs() {
            names.insert(format!("{cluster}/agent-{}", pair.lower()));
        }
    }
    for pair in domain.pairs() {
        match domain.server(pair) {
            Some(Placement::Cluster(cluster)) => {
                names.insert(format!("{cluster}/server-{}", pair.lower()))
            }
            _ => names.insert(format!("host/server-{}", pair.lower())),
        };
    }
    names
}

fn check_process(
    cx: &Context<'_>,
    span: Range<usize>,
    field: &str,
    name: &str,
    processes: &BTreeSet<String>,
) -> Result<(), ScenarioError> {
    if processes.contains(name) {
        Ok(())
    } else {
        Err(cx.invalid(
            span,
            field,
            format!(
                "the domain has no process {name:?} (it has: {})",
                list(processes)
            ),
        ))
    }
}

fn check_fault(
    cx: &Context<'_>,
    span: Range<usize>,
    field: &str,
    spec: &FaultSpec,
    domain: &Domain,
    processes: &BTreeSet<String>,
) -> Result<(), ScenarioError> {
    // The spec's own shape was checked by serde; here: what it names.
    let value = serde_json::to_value(spec)
        .map_err(|err| cx.invalid(span.clone(), field, err.to_string()))?;
    if let Some(process) = value["process"].as_str() {
        return check_process(cx, span, field, process, processes);
    }
    if let Some(link) = value["link"].as_str() {
        return crate::fault::LinkName::parse(link)
            .and_then(|name| name.check(domain))
            .map_err(|problem| cx.invalid(span, format!("{field}.link"), problem));
    }
    let system = value["system"].as_str().unwrap_or("s0");
    let index = system
        .strip_prefix('s')
        .and_then(|n| n.parse::<usize>().ok())
        .filter(|n| *n < domain.systems.len());
    let Some(index) = index else {
        return Err(cx.invalid(
            span,
            format!("{field}.system"),
            format!("the domain has no system {system:?}"),
        ));
    };
    let disks = domain.systems[index].disks;
    match value["disk"].as_u64() {
        Some(disk) if (disk as usize) < disks => Ok(()),
        Some(disk) => Err(cx.invalid(
            span,
            format!("{field}.disk"),
            format!(
                "{system} has disks 0 to {} (members first, then spares), not {disk}",
                disks - 1
            ),
        )),
        None => Ok(()),
    }
}

#[allow(clippy::too_many_arguments)]
fn check_condition(
    cx: &Context<'_>,
    span: Range<usize>,
    field: &str,
    condition: &Condition,
    domain: &Domain,
    processes: &BTreeSet<String>,
    volumes: &[BTreeSet<String>],
    tasks: &BTreeMap<String, Pair>,
    workloads: &BTreeSet<String>,
) -> Result<(), ScenarioError> {
    let bad = |problem: String| cx.invalid(span.clone(), field, problem);
    if let Some(process) = condition.process() {
        check_process(cx, span.clone(), field, process, processes)?;
    }
    if let Some(label) = condition.task_label() {
        if !tasks.contains_key(label) {
            let labels: BTreeSet<String> = tasks.keys().cloned().collect();
            return Err(bad(format!(
                "no earlier step submitted a task labelled {label:?} (labels: {})",
                list(&labels)
            )));
        }
    }
    if let Some(name) = condition.workload() {
        if !workloads.contains(name) {
            return Err(bad(format!(
                "no workload {name:?} (workloads: {})",
                list(workloads)
            )));
        }
    }
    if let Some((system, disk)) = condition.system_and_disk() {
        let Some(found) = domain.systems.get(system) else {
            return Err(bad(format!("the domain has no system s{system}")));
        };
        if let Some(disk) = disk.filter(|d| *d >= found.disks) {
            return Err(bad(format!(
                "s{system} has disks 0 to {}, not {disk}",
                found.disks - 1
            )));
        }
    }
    if let Some((system, volume)) = condition.volume() {
        if !volumes.get(system).is_some_and(|v| v.contains(volume)) {
            return Err(bad(format!(
                "s{system} has no volume {volume:?} (it has: {})",
                volumes
                    .get(system)
                    .map(list)
                    .unwrap_or_else(|| "none".into())
            )));
        }
    }
    if let Some(cluster) = condition.cluster() {
        if cluster.system >= domain.systems.len() {
            return Err(bad(format!("the domain has no system s{}", cluster.system)));
        }
    }
    if let Condition::Agent { pair, .. } = condition {
        if domain.server(*pair).is_none() {
            return Err(bad(format!(
                "the domain has no server {pair}, so no agents {pair}"
            )));
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn check_assertion(
    cx: &Context<'_>,
    value: &Spanned<String>,
    field: &str,
    domain: &Domain,
    processes: &BTreeSet<String>,
    volumes: &[BTreeSet<String>],
    tasks: &BTreeMap<String, Pair>,
    workloads: &BTreeSet<String>,
) -> Result<Asserted, ScenarioError> {
    let check = parse_check(value.get_ref()).map_err(|p| cx.invalid(value.span(), field, p))?;
    match &check {
        Check::Condition(condition) => check_condition(
            cx,
            value.span(),
            field,
            condition,
            domain,
            processes,
            volumes,
            tasks,
            workloads,
        )?,
        Check::ScrubClean(system) if *system >= domain.systems.len() => {
            return Err(cx.invalid(
                value.span(),
                field,
                format!("the domain has no system s{system}"),
            ))
        }
        Check::EveryTaskVia(pair) if domain.server(*pair).is_none() => {
            return Err(cx.invalid(
                value.span(),
                field,
                format!("the domain has no server {pair}"),
            ))
        }
        _ => {
            if let Some(name) = check.workload() {
                if !workloads.contains(name) {
                    return Err(cx.invalid(
                        value.span(),
                        field,
                        format!("no workload {name:?} (workloads: {})", list(workloads)),
                    ));
                }
            }
            if matches!(check, Check::NoLoss(None) | Check::NoGarbage(None)) && workloads.is_empty()
            {
                return Err(cx.invalid(
                    value.span(),
                    field,
                    "the scenario has no workload to check",
                ));
            }
        }
    }
    Ok(Asserted {
        text: value.get_ref().clone(),
        check,
        line: cx.line(value.span()),
    })
}

fn workload(
    cx: &Context<'_>,
    index: usize,
    section: &Spanned<WorkloadSection>,
    domain: &Domain,
    before: &[WorkloadSpec],
) -> Result<WorkloadSpec, ScenarioError> {
    let w = section.get_ref();
    let field = |name: &str| format!("workloads[{index}].{name}");
    let name = w.name.clone().unwrap_or_else(|| format!("w{index}"));
    if name.is_empty() || name.contains(char::is_whitespace) || name.contains('/') {
        return Err(cx.invalid(
            section.span(),
            field("name"),
            format!("{name:?}: a workload's name is one word"),
        ));
    }
    if before.iter().any(|b| b.name == name) {
        return Err(cx.invalid(
            section.span(),
            field("name"),
            format!("{name:?} names an earlier workload too"),
        ));
    }
    let (system, volume) = match w.volume.get_ref().split_once('/') {
        Some((system, volume)) => (
            system
                .strip_prefix('s')
                .and_then(|n| n.parse::<usize>().ok())
                .ok_or_else(|| {
                    cx.invalid(
                        w.volume.span(),
                        field("volume"),
                        format!("{system:?} is not a system (s0, s1, …)"),
                    )
                })?,
            volume.to_string(),
        ),
        None => (0, w.volume.get_ref().clone()),
    };
    let Some(found) = domain.systems.get(system) else {
        return Err(cx.invalid(
            w.volume.span(),
            field("volume"),
            format!("the domain has no system s{system}"),
        ));
    };
    let known: BTreeSet<String> = (0..found.volumes).map(|v| format!("vol{v}")).collect();
    if !known.contains(&volume) {
        return Err(cx.invalid(
            w.volume.span(),
            field("volume"),
            format!(
                "s{system} starts with volumes {} (not {volume:?})",
                list(&known)
            ),
        ));
    }
    if w.qd == 0 || w.qd > 1024 {
        return Err(cx.invalid(section.span(), field("qd"), "from 1 to 1024"));
    }
    let duration = w
        .duration
        .as_ref()
        .map(|d| cx.duration(d, &field("duration"), true))
        .transpose()?;
    let reconnect_timeout = match &w.reconnect_timeout {
        Some(d) => cx.duration(d, &field("reconnect_timeout"), true)?,
        None => Duration::from_secs(30),
    };
    let request_timeout = match &w.request_timeout {
        Some(d) => cx.duration(d, &field("request_timeout"), true)?,
        None => Duration::from_secs(30),
    };
    Ok(WorkloadSpec {
        name,
        system,
        volume,
        qd: w.qd,
        fua_every: w.fua_every,
        flush_every: w.flush_every,
        block_size: w.block_size,
        max_blocks: w.max_blocks,
        duration,
        autostart: w.autostart,
        reconnect_timeout,
        request_timeout,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: &str = r#"
description = "test"
seed = 7
timeout = "45s"

[domain]
servers = { a = "s0/c0", b = "s0/c1" }
[[domain.systems]]
disks = 5
disk_size = "16MiB"
spares = 1

[[workloads]]
name = "w"
volume = "vol0"
fua_every = 7

[[steps]]
wait = "workload w writes >= 100"
within = "20s"

[[steps]]
at = "2s"
kill = "s0/c0/driver"

[[steps]]
task = { label = "r", kind = "scrub", cluster = "s0/c1", server = "B", args = { repair = true } }

[[steps]]
wait = "task r complete"

[[steps]]
inject = { fault = "process-hang", process = "s0/c1/agent-a" }
label = "h"

[[steps]]
after = "500ms"
clear = "h"

[[steps]]
assert = "task r clean"
"#;

    fn parse(text: &str) -> Result<Scenario, ScenarioError> {
        Scenario::parse(Path::new("scenarios/sample.toml"), text)
    }

    fn error(text: &str) -> String {
        parse(text).expect_err("should be refused").to_string()
    }

    #[test]
    fn a_good_file_parses_with_its_defaults() {
        let scenario = parse(&format!("{SMALL}\n")).expect("parses");
        assert_eq!(scenario.name, "sample");
        assert_eq!(scenario.seed, 7);
        assert_eq!(scenario.timeout, Duration::from_secs(45));
        assert_eq!(scenario.expect, Expect::Pass);
        assert_eq!(scenario.workloads.len(), 1);
        assert_eq!(scenario.workloads[0].qd, 16);
        assert_eq!(scenario.workloads[0].duration, None);
        assert_eq!(scenario.steps.len(), 7);
        assert_eq!(scenario.steps[1].timing, Timing::At(Duration::from_secs(2)));
        assert_eq!(
            scenario.steps[5].timing,
            Timing::After(Duration::from_millis(500))
        );
        assert_eq!(scenario.steps[0].line, 18);
        assert!(
            matches!(&scenario.steps[2].action, Action::Task { server: Pair::B, cluster, .. } if cluster == "c1")
        );
        // Ports are forced to 0 whatever the file says.
        assert_eq!(
            (
                scenario.domain.nbd_base_port,
                scenario.domain.http_base_port
            ),
            (0, 0)
        );
        assert_eq!(scenario.domain.systems[0].disk_bytes, 16 << 20);
    }

    #[test]
    fn no_domain_is_the_default_domain_on_any_free_port() {
        let scenario = parse("[[steps]]\nwait = \"array optimal\"\n").expect("parses");
        assert_eq!(scenario.domain.systems.len(), 1);
        assert_eq!(scenario.domain.systems[0].disk_bytes, 256 << 20);
        assert_eq!(scenario.domain.nbd_base_port, 0);
        assert_eq!(scenario.timeout, DEFAULT_TIMEOUT);
    }

    #[test]
    fn syntax_errors_name_line_column_and_field() {
        // An unknown field in a step: serde's message names it; the line is the step's.
        let text = SMALL.replace("within = \"20s\"", "witin = \"20s\"");
        match parse(&text).expect_err("unknown field") {
            ScenarioError::Syntax {
                line,
                column,
                message,
                ..
            } => {
                assert_eq!(line, 20, "{message}");
                assert_eq!(column, 1);
                assert!(message.contains("unknown field `witin`"), "{message}");
            }
            other => panic!("{other}"),
        }
        // A value of the wrong type.
        let err = error(&SMALL.replace("seed = 7", "seed = \"seven\""));
        assert!(
            err.starts_with("scenarios/sample.toml: line 3, column 8:"),
            "{err}"
        );
        // Not TOML at all.
        let err = error("steps = [\n  { wait = \"array optimal\" \n");
        assert!(err.contains("line 2") || err.contains("line 3"), "{err}");
        // A fault of an unknown kind or with a field its kind does not take.
        let err = error("[[steps]]\ninject = { fault = \"disk-melt\", disk = 1 }\n");
        assert!(err.contains("line 2") && err.contains("disk-melt"), "{err}");
        let err =
            error("[[steps]]\ninject = { fault = \"disk-error\", disk = 1, colour = \"red\" }\n");
        assert!(err.contains("line 2") && err.contains("colour"), "{err}");
        // A top-level typo.
        let err = error("seeed = 3\n");
        assert!(
            err.contains("line 1, column 1") && err.contains("unknown field `seeed`"),
            "{err}"
        );
    }

    #[test]
    fn semantic_errors_name_the_step_and_its_line() {
        let cases: Vec<(String, &str, &str)> = vec![
            (
                SMALL.replace("kill = \"s0/c0/driver\"", "kill = \"s0/c7/driver\""),
                "line 24: step 2 (kill)",
                "has no process \"s0/c7/driver\"",
            ),
            (
                SMALL.replace("kill = \"s0/c0/driver\"", "kill = \"s1/c0/driver\""),
                "line 24: step 2 (kill)",
                "has no process \"s1/c0/driver\"",
            ),
            (
                SMALL.replace("wait = \"task r complete\"", "wait = \"task q complete\""),
                "line 30: step 4 (wait)",
                "no earlier step submitted a task labelled \"q\"",
            ),
            (
                SMALL.replace("at = \"2s\"", "at = \"2 parsecs\""),
                "line 23: step 2 (at)",
                "unknown unit",
            ),
            (
                SMALL.replace("within = \"20s\"", "within = \"0s\""),
                "line 20: step 1 (within)",
                "more than zero",
            ),
            (
                SMALL.replace("timeout = \"45s\"", "timeout = \"soon\""),
                "line 4: timeout",
                "not a duration",
            ),
            (
                SMALL.replace("clear = \"h\"", "clear = \"g\""),
                "step 6 (clear)",
                "labelled \"g\"",
            ),
            (
                SMALL.replace(
                    "wait = \"workload w writes >= 100\"",
                    "wait = \"workload v writes >= 100\"",
                ),
                "step 1 (wait)",
                "no workload \"v\"",
            ),
            (
                SMALL.replace("volume = \"vol0\"", "volume = \"vol3\""),
                "line 15: workloads[0].volume",
                "not \"vol3\"",
            ),
            (
                SMALL.replace("kind = \"scrub\"", "kind = \"polish\""),
                "step 3 (task)",
                "unknown task kind",
            ),
            (
                SMALL.replace(
                    "args = { repair = true }",
                    "args = { repair = true, speed = 3 }",
                ),
                "step 3 (task)",
                "speed",
            ),
            (
                SMALL.replace("assert = \"task r clean\"", "assert = \"everything fine\""),
                "line 41: step 7 (assert)",
                "not an assertion",
            ),
            (
                SMALL.replace("wait = \"task r complete\"", "wait = \"disk 9 available\""),
                "step 4 (wait)",
                "disks 0 to 4",
            ),
            (
                SMALL.replace(
                    "wait = \"task r complete\"",
                    "wait = \"task r complete\"\nkill = \"s0/c0/driver\"",
                ),
                "step 4",
                "has kill and wait",
            ),
            (
                SMALL.replace("disks = 5", "disks = 2"),
                "domain.systems[0].disks",
                "needs at least",
            ),
            (
                SMALL.replace(
                    "inject = { fault = \"process-hang\", process = \"s0/c1/agent-a\" }",
                    "inject = { fault = \"disk-fail\", disk = 5 }",
                ),
                "step 5 (inject).disk",
                "not 5",
            ),
            (
                SMALL.replace(
                    "inject = { fault = \"process-hang\", process = \"s0/c1/agent-a\" }",
                    "inject = { fault = \"host-fs-full\", system = \"s3\" }",
                ),
                "step 5 (inject).system",
                "no system \"s3\"",
            ),
            (
                SMALL.replace(
                    "inject = { fault = \"process-hang\", process = \"s0/c1/agent-a\" }",
                    "inject = { fault = \"host-fs-full\", disk = 1 }",
                ),
                "line 33, column 10",
                "unknown field `disk`, expected `system`",
            ),
            (
                format!("{SMALL}\n[[steps]]\nwait = \"rebuild >= 50%\"\nlabel = \"x\"\n"),
                "step 8 (label)",
                "names an injected fault",
            ),
        ];
        for (text, place, problem) in cases {
            let err = error(&text);
            assert!(err.contains(place), "expected {place:?} in: {err}");
            assert!(err.contains(problem), "expected {problem:?} in: {err}");
        }
        // A top-level assertion names its index and line.
        let err = error(&format!("assertions = [\"no loss in x\"]\n{SMALL}"));
        assert!(
            err.contains("line 1: assertions[0]") && err.contains("no workload \"x\""),
            "{err}"
        );
        // The name must be the file's.
        let err = error(&format!("name = \"other\"\n{SMALL}"));
        assert!(
            err.contains("line 1: name") && err.contains("make scenario-sample"),
            "{err}"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("2d").is_err());
        assert!(parse_duration("25h").is_err());
    }

    #[test]
    fn line_and_column_of_an_offset() {
        assert_eq!(line_column("ab\ncd\n", 0), (1, 1));
        assert_eq!(line_column("ab\ncd\n", 4), (2, 2));
        assert_eq!(line_column("ab\ncd\n", 99), (3, 1));
    }
}
