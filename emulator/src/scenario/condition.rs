//! Conditions a scenario waits for or asserts, written as short phrases
//! (`rebuild >= 50%`, `agent A of s0/c1 registered`, `task r1 failed with
//! "lost"`), and their evaluation on a [`Snapshot`] of what the domain shows
//! (servers' `/api/v1/domain`, the process table, the scenario's tasks and
//! workloads). Evaluation is a pure function: what was seen is returned in
//! words, for the timeline and for a failed wait.
//!
//! [`Check`]s are what an `assert` may say beyond a condition: the write
//! oracle's verdicts, a scrub that finds nothing, every task through a server
//! complete. The runner carries those out (they act); conditions only look.

use std::collections::BTreeMap;
use std::fmt;

use serde_json::Value;

use crate::domain::{ClusterName, Pair, ProcessName};

/// Every form, for error messages (`scenarios/README.md` has an example of
/// each).
pub const CONDITION_FORMS: &str = "rebuild|scrub running, rebuild|scrub >= N%, no rebuild|scrub, \
agent A|B of sN/cM registered|lost, agents registered, agents of sN/cM registered, \
process NAME running|stopped|ended, volume [sN/]VOL owner sN/cM|none, \
volume [sN/]VOL path optimized|failed-over|transitioning|offline, \
array [sN] optimal|degraded|failed, disk [sN/]N available|unavailable|rebuilding, disk [sN/]N file NAME, \
task T queued|running|complete|failed|ended, task T failed with \"TEXT\", task T clean, \
task T found problems, task T result.FIELD >=|<=|==|>|< NUMBER, \
workload W running|ended, workload W writes >= N";

/// What `assert` may say beyond a condition.
pub const CHECK_FORMS: &str = "no loss [in W], loss in W, no garbage [in W], \
workload W saw [no] errors, scrub clean [on sN], every task via A|B complete";

/// A rebuild or a scrub.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// A rebuild.
    Rebuild,
    /// A scrub.
    Scrub,
}

impl OpKind {
    fn name(self) -> &'static str {
        match self {
            Self::Rebuild => "rebuild",
            Self::Scrub => "scrub",
        }
    }
}

/// What is asked of a rebuild or scrub.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OpTest {
    /// One is under way.
    Running,
    /// One is under way and at least this many percent done.
    AtLeast(f64),
    /// None is under way.
    None,
}

/// How a comparison compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmp {
    /// `>=`
    Ge,
    /// `<=`
    Le,
    /// `==`
    Eq,
    /// `>`
    Gt,
    /// `<`
    Lt,
}

impl Cmp {
    fn parse(text: &str) -> Option<Self> {
        Some(match text {
            ">=" => Self::Ge,
            "<=" => Self::Le,
            "==" | "=" => Self::Eq,
            ">" => Self::Gt,
            "<" => Self::Lt,
            _ => return None,
        })
    }

    fn holds(self, left: f64, right: f64) -> bool {
        match self {
            Self::Ge => left >= right,
            Self::Le => left <= right,
            Self::Eq => left == right,
            Self::Gt => left > right,
            Self::Lt => left < right,
        }
    }
}

/// What is asked of a task.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskWant {
    /// It is in this state (`queued`, `running`, `complete`, `failed`).
    State(String),
    /// It ended (complete or failed).
    Ended,
    /// It failed, and its failure information contains the text.
    FailedWith(String),
    /// It completed and its report found nothing wrong (a scrub or rebuild).
    Clean,
    /// It completed and its report found something wrong.
    FoundProblems,
    /// A number in its result compares so (`result.repaired >= 1`).
    Result {
        /// Dotted path below `result`.
        field: String,
        /// How.
        cmp: Cmp,
        /// With what.
        value: f64,
    },
}

/// What is asked of a workload.
#[derive(Debug, Clone, PartialEq)]
pub enum WorkloadWant {
    /// It runs.
    Running,
    /// It ended.
    Ended,
    /// At least this many writes were acknowledged.
    WritesAtLeast(u64),
    /// It connected again at least this many times (its connection died).
    ReconnectsAtLeast(u64),
}

/// A condition on the domain, a task or a workload.
#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    /// A rebuild or scrub of system 0 (the domain's first system).
    Operation {
        /// System index.
        system: usize,
        /// Which.
        kind: OpKind,
        /// What of it.
        test: OpTest,
    },
    /// One agent, as its own server sees it.
    Agent {
        /// Its pair (the server it registers with).
        pair: Pair,
        /// Its cluster.
        cluster: ClusterName,
        /// Registered (and reported, with the pid it runs as now), or lost.
        registered: bool,
    },
    /// Every agent (of one cluster, or of the domain) registered with its
    /// server and reported, each with the pid it runs as now.
    Agents {
        /// One cluster, or all.
        cluster: Option<ClusterName>,
    },
    /// A process of the domain, as the supervisor's table and /proc say.
    Process {
        /// `s0/c0/driver`.
        name: String,
        /// `running`, `stopped` (hangs) or `ended`.
        state: String,
    },
    /// Which controller serves a volume (None: nobody).
    VolumeOwner {
        /// System index.
        system: usize,
        /// Volume name.
        volume: String,
        /// `s0/c1`, or None.
        owner: Option<String>,
    },
    /// A volume's path state.
    VolumePath {
        /// System index.
        system: usize,
        /// Volume name.
        volume: String,
        /// `optimized`, `failed-over`, `transitioning`, `offline`.
        path: String,
    },
    /// The array's state.
    Array {
        /// System index.
        system: usize,
        /// `optimal`, `degraded`, `failed`.
        state: String,
    },
    /// A disk's state.
    Disk {
        /// System index.
        system: usize,
        /// Its index (members first, then spares).
        index: usize,
        /// `available`, `unavailable`, `rebuilding`; or `file NAME`: the
        /// image file in that slot (`spare0.img` once a spare replaced it).
        state: String,
    },
    /// A task the scenario submitted, by its label.
    Task {
        /// The label.
        label: String,
        /// What of it.
        want: TaskWant,
    },
    /// A workload of the scenario, by its name.
    Workload {
        /// The name.
        name: String,
        /// What of it.
        want: WorkloadWant,
    },
}

/// What an `assert` checks.
#[derive(Debug, Clone, PartialEq)]
pub enum Check {
    /// A condition, evaluated once.
    Condition(Condition),
    /// The write oracle: no acknowledged-and-flushed write of the workload
    /// (every workload: None) was lost, no read-back found other data, and
    /// something was durable at all.
    NoLoss(Option<String>),
    /// The write oracle caught lost writes (it names the bytes).
    Loss(String),
    /// No read-back of the workload (every one: None) returned other data
    /// than the last acknowledged write (errors are allowed).
    NoGarbage(Option<String>),
    /// The workload saw I/O errors (failed writes, reads or flushes), or
    /// (`false`) saw none.
    SawErrors(String, bool),
    /// A scrub (no repair) of the system, submitted now, finds nothing.
    ScrubClean(usize),
    /// Every task the scenario submitted through this server completed
    /// (and there was at least one).
    EveryTaskVia(Pair),
}

impl Condition {
    /// The task label it refers to.
    pub fn task_label(&self) -> Option<&str> {
        match self {
            Self::Task { label, .. } => Some(label),
            _ => None,
        }
    }

    /// The workload it refers to.
    pub fn workload(&self) -> Option<&str> {
        match self {
            Self::Workload { name, .. } => Some(name),
            _ => None,
        }
    }

    /// The process it names.
    pub fn process(&self) -> Option<&str> {
        match self {
            Self::Process { name, .. } => Some(name),
            _ => None,
        }
    }

    /// Whether it looks at a server's view of the domain.
    pub fn needs_views(&self) -> bool {
        matches!(
            self,
            Self::Operation { .. }
                | Self::Agent { .. }
                | Self::Agents { .. }
                | Self::VolumeOwner { .. }
                | Self::VolumePath { .. }
                | Self::Array { .. }
                | Self::Disk { .. }
        )
    }

    /// The (system, volume) it names.
    pub fn volume(&self) -> Option<(usize, &str)> {
        match self {
            Self::VolumeOwner { system, volume, .. } | Self::VolumePath { system, volume, .. } => {
                Some((*system, volume))
            }
            _ => None,
        }
    }

    /// The systems and disks it names.
    pub fn system_and_disk(&self) -> Option<(usize, Option<usize>)> {
        match self {
            Self::Operation { system, .. } | Self::Array { system, .. } => Some((*system, None)),
            Self::Disk { system, index, .. } => Some((*system, Some(*index))),
            Self::VolumeOwner { system, .. } | Self::VolumePath { system, .. } => {
                Some((*system, None))
            }
            _ => None,
        }
    }

    /// The clusters it names.
    pub fn cluster(&self) -> Option<ClusterName> {
        match self {
            Self::Agent { cluster, .. } => Some(*cluster),
            Self::Agents { cluster } => *cluster,
            _ => None,
        }
    }
}

impl Check {
    /// The workloads it refers to by name.
    pub fn workload(&self) -> Option<&str> {
        match self {
            Self::Condition(condition) => condition.workload(),
            Self::NoLoss(name) | Self::NoGarbage(name) => name.as_deref(),
            Self::Loss(name) | Self::SawErrors(name, _) => Some(name),
            _ => None,
        }
    }
}

/// Splits a phrase into words; `"double quoted text"` is one word.
fn words(text: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
        } else if c == '"' {
            chars.next();
            let mut word = String::new();
            loop {
                match chars.next() {
                    Some('"') => break,
                    Some('\\') => match chars.next() {
                        Some(escaped) => word.push(escaped),
                        None => return Err("a quoted text ends with a backslash".into()),
                    },
                    Some(c) => word.push(c),
                    None => return Err("a quoted text is not closed (missing \")".into()),
                }
            }
            out.push(word);
        } else {
            let mut word = String::new();
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                word.push(c);
                chars.next();
            }
            out.push(word);
        }
    }
    Ok(out)
}

fn system_index(text: &str) -> Result<usize, String> {
    text.strip_prefix('s')
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("{text:?} is not a system (s0, s1, …)"))
}

/// `vol0` (system s0) or `s1/vol0`.
fn system_and_name(text: &str) -> Result<(usize, String), String> {
    match text.split_once('/') {
        Some((system, name)) => Ok((system_index(system)?, name.to_string())),
        None => Ok((0, text.to_string())),
    }
}

fn number(text: &str, what: &str) -> Result<f64, String> {
    text.trim_end_matches('%')
        .parse::<f64>()
        .ok()
        .filter(|n| n.is_finite())
        .ok_or_else(|| format!("{text:?} is not a number ({what})"))
}

fn one_of(text: &str, choices: &[&str], what: &str) -> Result<String, String> {
    if choices.contains(&text) {
        Ok(text.to_string())
    } else {
        Err(format!("{text:?} is not a {what} ({})", choices.join(", ")))
    }
}

/// Parses a condition (`wait = "…"`).
pub fn parse_condition(text: &str) -> Result<Condition, String> {
    let words = words(text)?;
    let w: Vec<&str> = words.iter().map(String::as_str).collect();
    let op_kind = |word: &str| match word {
        "rebuild" => Some(OpKind::Rebuild),
        "scrub" => Some(OpKind::Scrub),
        _ => None,
    };
    let unknown = || {
        format!("{text:?} is not a condition; the forms are: {CONDITION_FORMS} (see scenarios/README.md)")
    };
    Ok(match w.as_slice() {
        [kind, "running"] if op_kind(kind).is_some() => Condition::Operation {
            system: 0,
            kind: op_kind(kind).ok_or_else(unknown)?,
            test: OpTest::Running,
        },
        [kind, ">=", percent] if op_kind(kind).is_some() => {
            let percent = number(percent, "percent done")?;
            if !(0.0..=100.0).contains(&percent) {
                return Err(format!("{percent}% is not a percentage (0 to 100)"));
            }
            Condition::Operation {
                system: 0,
                kind: op_kind(kind).ok_or_else(unknown)?,
                test: OpTest::AtLeast(percent),
            }
        }
        ["no", kind] if op_kind(kind).is_some() => Condition::Operation {
            system: 0,
            kind: op_kind(kind).ok_or_else(unknown)?,
            test: OpTest::None,
        },
        ["agent", pair, "of", cluster, state] => Condition::Agent {
            pair: Pair::parse(pair)?,
            cluster: ClusterName::parse(cluster)?,
            registered: one_of(state, &["registered", "lost"], "agent state")? == "registered",
        },
        ["agents", "registered"] => Condition::Agents { cluster: None },
        ["agents", "of", cluster, "registered"] => Condition::Agents {
            cluster: Some(ClusterName::parse(cluster)?),
        },
        ["process", name, state] => Condition::Process {
            name: ProcessName::parse(name)?.to_string(),
            state: one_of(state, &["running", "stopped", "ended"], "process state")?,
        },
        ["volume", volume, "owner", owner] => {
            let (system, volume) = system_and_name(volume)?;
            let owner = match *owner {
                "none" => None,
                owner => Some(ClusterName::parse(owner)?.to_string()),
            };
            Condition::VolumeOwner {
                system,
                volume,
                owner,
            }
        }
        ["volume", volume, "path", path] => {
            let (system, volume) = system_and_name(volume)?;
            Condition::VolumePath {
                system,
                volume,
                path: one_of(
                    path,
                    &["optimized", "failed-over", "transitioning", "offline"],
                    "path state",
                )?,
            }
        }
        ["array", state] => Condition::Array {
            system: 0,
            state: one_of(state, &["optimal", "degraded", "failed"], "array state")?,
        },
        ["array", system, state] => Condition::Array {
            system: system_index(system)?,
            state: one_of(state, &["optimal", "degraded", "failed"], "array state")?,
        },
        ["disk", disk, state] => {
            let (system, index) = system_and_name(disk)?;
            Condition::Disk {
                system,
                index: index
                    .parse()
                    .map_err(|_| format!("{index:?} is not a disk number (0, 1, …)"))?,
                state: one_of(
                    state,
                    &["available", "unavailable", "rebuilding"],
                    "disk state",
                )?,
            }
        }
        ["disk", disk, "file", file] => {
            let (system, index) = system_and_name(disk)?;
            Condition::Disk {
                system,
                index: index
                    .parse()
                    .map_err(|_| format!("{index:?} is not a disk number (0, 1, …)"))?,
                state: format!("file {file}"),
            }
        }
        ["task", label, "ended"] => Condition::Task {
            label: label.to_string(),
            want: TaskWant::Ended,
        },
        ["task", label, "clean"] => Condition::Task {
            label: label.to_string(),
            want: TaskWant::Clean,
        },
        ["task", label, "found", "problems"] => Condition::Task {
            label: label.to_string(),
            want: TaskWant::FoundProblems,
        },
        ["task", label, "failed", "with", text] => Condition::Task {
            label: label.to_string(),
            want: TaskWant::FailedWith(text.to_string()),
        },
        ["task", label, state] => Condition::Task {
            label: label.to_string(),
            want: TaskWant::State(one_of(
                state,
                &["queued", "running", "complete", "failed"],
                "task state",
            )?),
        },
        ["task", label, field, cmp, value] if field.starts_with("result.") => Condition::Task {
            label: label.to_string(),
            want: TaskWant::Result {
                field: field.trim_start_matches("result.").to_string(),
                cmp: Cmp::parse(cmp)
                    .ok_or_else(|| format!("{cmp:?} is not a comparison (>=, <=, ==, >, <)"))?,
                value: number(value, "the value compared with")?,
            },
        },
        ["workload", name, "running"] => Condition::Workload {
            name: name.to_string(),
            want: WorkloadWant::Running,
        },
        ["workload", name, "ended"] => Condition::Workload {
            name: name.to_string(),
            want: WorkloadWant::Ended,
        },
        ["workload", name, "writes", ">=", count] => Condition::Workload {
            name: name.to_string(),
            want: WorkloadWant::WritesAtLeast(
                count
                    .parse()
                    .map_err(|_| format!("{count:?} is not a number of writes"))?,
            ),
        },
        ["workload", name, "reconnects", ">=", count] => Condition::Workload {
            name: name.to_string(),
            want: WorkloadWant::ReconnectsAtLeast(
                count
                    .parse()
                    .map_err(|_| format!("{count:?} is not a number of reconnects"))?,
            ),
        },
        _ => return Err(unknown()),
    })
}

/// Parses an assertion (`assert = "…"`, `assertions = […]`).
pub fn parse_check(text: &str) -> Result<Check, String> {
    let words = words(text)?;
    let w: Vec<&str> = words.iter().map(String::as_str).collect();
    Ok(match w.as_slice() {
        ["no", "loss"] => Check::NoLoss(None),
        ["no", "loss", "in", name] => Check::NoLoss(Some(name.to_string())),
        ["loss", "in", name] => Check::Loss(name.to_string()),
        ["no", "garbage"] => Check::NoGarbage(None),
        ["no", "garbage", "in", name] => Check::NoGarbage(Some(name.to_string())),
        ["workload", name, "saw", "errors"] => Check::SawErrors(name.to_string(), true),
        ["workload", name, "saw", "no", "errors"] => Check::SawErrors(name.to_string(), false),
        ["scrub", "clean"] => Check::ScrubClean(0),
        ["scrub", "clean", "on", system] => Check::ScrubClean(system_index(system)?),
        ["every", "task", "via", pair, "complete"] => Check::EveryTaskVia(Pair::parse(pair)?),
        _ => match parse_condition(text) {
            Ok(condition) => Check::Condition(condition),
            Err(err) if err.contains("is not a condition") => {
                return Err(format!(
                    "{text:?} is not an assertion; the forms are: {CHECK_FORMS}, or any condition: {CONDITION_FORMS} (see scenarios/README.md)"
                ))
            }
            Err(err) => return Err(err),
        },
    })
}

/// A process as the snapshot saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessSeen {
    /// `s0/c0/driver`.
    pub name: String,
    /// Its (latest) pid.
    pub pid: u32,
    /// `running`, `stopped` or `ended`.
    pub state: String,
}

/// A workload as the snapshot saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WorkloadSeen {
    /// Started and not ended.
    pub running: bool,
    /// Ended.
    pub ended: bool,
    /// Writes acknowledged so far.
    pub acked: u64,
    /// Connections made again after one died, so far.
    pub reconnects: u64,
}

/// What the domain shows at one moment (only what a condition needs is
/// filled in).
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// `/api/v1/domain` of server A and server B, where they answered.
    pub views: [Option<Value>; 2],
    /// The process table.
    pub processes: Vec<ProcessSeen>,
    /// The scenario's tasks by label: the server's view of it, or why it
    /// could not be had.
    pub tasks: BTreeMap<String, Result<Value, String>>,
    /// The scenario's workloads by name.
    pub workloads: BTreeMap<String, WorkloadSeen>,
}

/// Whether a condition holds, and what was seen, in words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evaluation {
    /// It holds.
    pub met: bool,
    /// What was seen (`rebuild at 12.5%`).
    pub seen: String,
}

fn eval(met: bool, seen: impl Into<String>) -> Evaluation {
    Evaluation {
        met,
        seen: seen.into(),
    }
}

impl Snapshot {
    /// The view of the domain: server A's, or B's when A did not answer.
    fn view(&self) -> Option<&Value> {
        self.views[0].as_ref().or(self.views[1].as_ref())
    }

    fn system(&self, system: usize) -> Result<&Value, Evaluation> {
        let view = self
            .view()
            .ok_or_else(|| eval(false, "neither server answered"))?;
        match view["systems"].get(system) {
            Some(value) if !value["array"].is_null() => Ok(value),
            Some(_) => Err(eval(false, format!("s{system} has not reported yet"))),
            None => Err(eval(false, format!("the domain has no system s{system}"))),
        }
    }
}

/// Evaluates `condition` on `snapshot`.
pub fn evaluate(condition: &Condition, snapshot: &Snapshot) -> Evaluation {
    match evaluate_inner(condition, snapshot) {
        Ok(evaluation) | Err(evaluation) => evaluation,
    }
}

fn evaluate_inner(condition: &Condition, snapshot: &Snapshot) -> Result<Evaluation, Evaluation> {
    Ok(match condition {
        Condition::Operation { system, kind, test } => {
            let system = snapshot.system(*system)?;
            let operation = system["operations"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|op| op["kind"] == kind.name());
            let percent = operation.map(|op| op["percent"].as_f64().unwrap_or_default());
            let seen = match percent {
                Some(percent) => format!("{} at {percent:.1}%", kind.name()),
                None => format!("no {} under way", kind.name()),
            };
            let met = match (test, percent) {
                (OpTest::Running, Some(_)) => true,
                (OpTest::AtLeast(want), Some(percent)) => percent >= *want,
                (OpTest::None, None) => true,
                _ => false,
            };
            eval(met, seen)
        }
        Condition::Agent {
            pair,
            cluster,
            registered,
        } => {
            let name = format!("{cluster}/agent-{}", pair.lower());
            let view = snapshot.views[pair.index()]
                .as_ref()
                .ok_or_else(|| eval(false, format!("server {pair} did not answer")))?;
            let (met, seen) = agent_state(view, &name, &snapshot.processes);
            eval(met == *registered, seen)
        }
        Condition::Agents { cluster } => {
            let prefix = cluster.map(|c| format!("{c}/"));
            let agents: Vec<&ProcessSeen> = snapshot
                .processes
                .iter()
                .filter(|p| p.name.contains("/agent-"))
                .filter(|p| {
                    prefix
                        .as_ref()
                        .is_none_or(|prefix| p.name.starts_with(prefix))
                })
                .collect();
            if agents.is_empty() {
                return Err(eval(false, "no such agent in the process table"));
            }
            let mut not = Vec::new();
            for agent in &agents {
                let pair = if agent.name.ends_with("agent-a") {
                    0
                } else {
                    1
                };
                let seen = match snapshot.views[pair].as_ref() {
                    Some(view) => agent_state(view, &agent.name, &snapshot.processes),
                    None => (
                        false,
                        format!(
                            "server {} did not answer",
                            if pair == 0 { "A" } else { "B" }
                        ),
                    ),
                };
                if !seen.0 {
                    not.push(seen.1);
                }
            }
            if !not.is_empty() {
                eval(false, not.join("; "))
            } else {
                eval(
                    true,
                    format!("{} agents registered and reported", agents.len()),
                )
            }
        }
        Condition::Process { name, state } => {
            match snapshot.processes.iter().find(|p| &p.name == name) {
                Some(process) => eval(
                    &process.state == state,
                    format!("{name} (pid {}) {}", process.pid, process.state),
                ),
                None => eval(false, format!("{name} is not in the process table")),
            }
        }
        Condition::VolumeOwner {
            system,
            volume,
            owner,
        } => {
            let found = find_volume(snapshot.system(*system)?, volume)?;
            let now = found["owner"].as_str().map(str::to_string);
            eval(
                &now == owner,
                format!("{volume} owned by {}", now.as_deref().unwrap_or("none")),
            )
        }
        Condition::VolumePath {
            system,
            volume,
            path,
        } => {
            let found = find_volume(snapshot.system(*system)?, volume)?;
            let now = found["path"].as_str().unwrap_or("unknown");
            eval(now == path, format!("{volume} path {now}"))
        }
        Condition::Array { system, state } => {
            let now = snapshot.system(*system)?["array"]["state"]
                .as_str()
                .unwrap_or("unknown")
                .to_string();
            eval(&now == state, format!("array {now}"))
        }
        Condition::Disk {
            system,
            index,
            state,
        } => {
            let disks = &snapshot.system(*system)?["disks"];
            match disks
                .as_array()
                .into_iter()
                .flatten()
                .find(|d| d["index"].as_u64() == Some(*index as u64))
            {
                Some(disk) => {
                    let now = disk["state"].as_str().unwrap_or("unknown");
                    let file = disk["file"].as_str().unwrap_or("?");
                    eval(
                        now == state || state.strip_prefix("file ") == Some(file),
                        format!(
                            "disk {index} ({}, {}) {now}",
                            disk["file"].as_str().unwrap_or("?"),
                            disk["role"].as_str().unwrap_or("?")
                        ),
                    )
                }
                None => eval(false, format!("no disk {index}")),
            }
        }
        Condition::Task { label, want } => {
            let task = match snapshot.tasks.get(label) {
                Some(Ok(task)) => task,
                Some(Err(why)) => return Err(eval(false, format!("task {label}: {why}"))),
                None => return Err(eval(false, format!("task {label} was not submitted"))),
            };
            task_holds(label, task, want)
        }
        Condition::Workload { name, want } => {
            let seen = snapshot.workloads.get(name).copied().unwrap_or_default();
            let words = format!(
                "workload {name} {} ({} writes acknowledged, {} reconnects)",
                if seen.running {
                    "running"
                } else if seen.ended {
                    "ended"
                } else {
                    "not started"
                },
                seen.acked,
                seen.reconnects
            );
            let met = match want {
                WorkloadWant::Running => seen.running,
                WorkloadWant::Ended => seen.ended,
                WorkloadWant::WritesAtLeast(n) => seen.acked >= *n,
                WorkloadWant::ReconnectsAtLeast(n) => seen.reconnects >= *n,
            };
            eval(met, words)
        }
    })
}

/// Whether agent `name` is registered with the server of `view` and has
/// reported, running as the pid the process table has now; in words.
fn agent_state(view: &Value, name: &str, processes: &[ProcessSeen]) -> (bool, String) {
    let server = view["server"]["pair"].as_str().unwrap_or("?");
    let Some(agent) = view["agents"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|a| a["name"] == name)
    else {
        return (
            false,
            format!("{name} never registered with server {server}"),
        );
    };
    let state = agent["state"].as_str().unwrap_or("unknown");
    let pid = agent["pid"].as_u64().unwrap_or_default();
    let process = processes.iter().find(|p| p.name == name);
    let current = process.map(|p| p.pid);
    if let Some(process) = process.filter(|p| p.state != "running") {
        return (
            false,
            format!(
                "{name} (pid {}) {}, server {server} has it {state}",
                process.pid, process.state
            ),
        );
    }
    if state != "registered" {
        return (
            false,
            format!(
                "{name} {state} at server {server}{}",
                agent["lost_reason"]
                    .as_str()
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default()
            ),
        );
    }
    if agent["revision"].is_null() {
        return (
            false,
            format!("{name} registered with server {server}, not reported yet"),
        );
    }
    if current.is_some_and(|current| u64::from(current) != pid) {
        return (
            false,
            format!(
                "server {server} has {name} as pid {pid}, which is not the one running now ({})",
                current.unwrap_or_default()
            ),
        );
    }
    (
        true,
        format!("{name} (pid {pid}) registered with server {server} and reported"),
    )
}

fn find_volume<'a>(system: &'a Value, volume: &str) -> Result<&'a Value, Evaluation> {
    system["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["name"] == volume)
        .ok_or_else(|| eval(false, format!("no volume {volume}")))
}

/// Whether a task's report (its result) found nothing wrong.
pub fn result_is_clean(result: &Value) -> bool {
    let zero = |field: &str| result[field].as_u64().unwrap_or(0) == 0;
    zero("checksum_errors")
        && zero("parity_mismatches")
        && result["unrecoverable"]
            .as_array()
            .is_none_or(|list| list.is_empty())
}

/// What a task's report found, in words.
pub fn findings(result: &Value) -> String {
    let n = |field: &str| result[field].as_u64().unwrap_or(0);
    format!(
        "{} rows checked, {} checksum errors, {} parity mismatches, {} repaired, {} unrecoverable",
        n("rows_checked"),
        n("checksum_errors"),
        n("parity_mismatches"),
        n("repaired"),
        result["unrecoverable"].as_array().map_or(0, Vec::len)
    )
}

fn task_holds(label: &str, task: &Value, want: &TaskWant) -> Evaluation {
    let state = task["state"].as_str().unwrap_or("unknown");
    let id = task["id"].as_str().unwrap_or("?");
    let failure = task["failure"].as_str();
    let mut seen = format!("task {label} ({id}) {state}");
    if let Some(failure) = failure {
        seen.push_str(&format!(": {failure}"));
    }
    if let Some(percent) = task["progress"]["percent"]
        .as_f64()
        .filter(|_| state == "running")
    {
        seen.push_str(&format!(" at {percent:.1}%"));
    }
    let result = &task["result"];
    let met = match want {
        TaskWant::State(want) => state == want,
        TaskWant::Ended => state == "complete" || state == "failed",
        TaskWant::FailedWith(text) => {
            state == "failed" && failure.is_some_and(|f| f.contains(text.as_str()))
        }
        TaskWant::Clean | TaskWant::FoundProblems => {
            if state == "complete" {
                seen.push_str(&format!(": {}", findings(result)));
            }
            state == "complete" && (result_is_clean(result) == (*want == TaskWant::Clean))
        }
        TaskWant::Result { field, cmp, value } => {
            let mut at = result;
            for part in field.split('.') {
                at = &at[part];
            }
            match at.as_f64() {
                Some(number) => {
                    seen.push_str(&format!(": result.{field} = {number}"));
                    state == "complete" && cmp.holds(number, *value)
                }
                None => {
                    if state == "complete" {
                        seen.push_str(&format!(": its result has no number at result.{field}"));
                    }
                    false
                }
            }
        }
    };
    eval(met, seen)
}

impl fmt::Display for OpKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> Snapshot {
        let system = json!({
            "name": "s0",
            "health": "degraded",
            "array": { "state": "degraded", "members": 4 },
            "disks": [
                { "index": 0, "file": "disk0.img", "role": "member", "state": "available" },
                { "index": 1, "file": "spare0.img", "role": "member", "state": "rebuilding" },
            ],
            "operations": [ { "kind": "rebuild", "control": "run", "percent": 62.5, "mib_per_s": 20.0 } ],
            "volumes": [ { "name": "vol0", "owner": "s0/c1", "home": "s0/c0", "path": "failed-over", "uri": "nbd://x/vol0" } ],
        });
        let view = |pair: &str, agents: Value| json!({ "server": { "pair": pair }, "systems": [system.clone()], "agents": agents });
        let a = view(
            "A",
            json!([
                { "name": "s0/c0/agent-a", "pid": 10, "state": "registered", "revision": 3 },
                { "name": "s0/c1/agent-a", "pid": 11, "state": "lost", "lost_reason": "link closed", "revision": 2 },
            ]),
        );
        let b = view(
            "B",
            json!([
                { "name": "s0/c0/agent-b", "pid": 20, "state": "registered", "revision": 3 },
                { "name": "s0/c1/agent-b", "pid": 21, "state": "registered", "revision": null },
            ]),
        );
        let process = |name: &str, pid: u32, state: &str| ProcessSeen {
            name: name.into(),
            pid,
            state: state.into(),
        };
        let mut tasks = BTreeMap::new();
        tasks.insert(
            "s1".to_string(),
            Ok(json!({ "id": "t1", "state": "complete", "result": { "rows_checked": 10, "checksum_errors": 2, "parity_mismatches": 0, "repaired": 2, "unrecoverable": [] } })),
        );
        tasks.insert(
            "f".to_string(),
            Ok(json!({ "id": "t2", "state": "failed", "failure": "agent s0/c0/agent-a was lost: link closed" })),
        );
        tasks.insert("gone".to_string(), Err("server A unreachable".to_string()));
        let mut workloads = BTreeMap::new();
        workloads.insert(
            "w".to_string(),
            WorkloadSeen {
                running: true,
                ended: false,
                acked: 500,
                reconnects: 1,
            },
        );
        Snapshot {
            views: [Some(a), Some(b)],
            processes: vec![
                process("s0/c0/driver", 1, "ended"),
                process("s0/c1/driver", 2, "stopped"),
                process("s0/c0/agent-a", 10, "running"),
                process("s0/c1/agent-a", 11, "ended"),
                process("s0/c0/agent-b", 20, "running"),
                process("s0/c1/agent-b", 21, "running"),
            ],
            tasks,
            workloads,
        }
    }

    fn holds(text: &str) -> bool {
        let condition = parse_condition(text).expect(text);
        let evaluation = evaluate(&condition, &sample());
        eprintln!("{text}: {evaluation:?}");
        evaluation.met
    }

    #[test]
    fn conditions_evaluate_on_sample_json() {
        for yes in [
            "rebuild running",
            "rebuild >= 50%",
            "rebuild >= 62.5",
            "no scrub",
            "agent A of s0/c0 registered",
            "agent A of s0/c1 lost",
            "agents of s0/c0 registered",
            "process s0/c0/driver ended",
            "process s0/c1/driver stopped",
            "volume vol0 owner s0/c1",
            "volume s0/vol0 path failed-over",
            "array degraded",
            "array s0 degraded",
            "disk 1 rebuilding",
            "disk s0/0 available",
            "disk 1 file spare0.img",
            "task s1 complete",
            "task s1 ended",
            "task s1 found problems",
            "task s1 result.repaired >= 1",
            "task s1 result.checksum_errors == 2",
            "task f failed",
            "task f failed with \"was lost\"",
            "workload w running",
            "workload w writes >= 500",
            "workload w reconnects >= 1",
        ] {
            assert!(holds(yes), "{yes} should hold");
        }
        for no in [
            "rebuild >= 70%",
            "no rebuild",
            "scrub running",
            "agent A of s0/c1 registered",
            "agent B of s0/c1 registered",
            "agents registered",
            "agents of s0/c1 registered",
            "process s0/c0/driver running",
            "volume vol0 owner s0/c0",
            "volume vol0 owner none",
            "volume vol0 path optimized",
            "volume vol9 path optimized",
            "array optimal",
            "disk 1 available",
            "disk 7 available",
            "disk 0 file spare0.img",
            "task s1 clean",
            "task s1 failed",
            "task s1 result.repaired > 2",
            "task s1 result.nothing >= 0",
            "task f complete",
            "task f failed with \"timeout\"",
            "task gone ended",
            "task never complete",
            "workload w ended",
            "workload w writes >= 501",
            "workload w reconnects >= 2",
            "workload other running",
        ] {
            assert!(!holds(no), "{no} should not hold");
        }
    }

    #[test]
    fn what_was_seen_is_said() {
        let seen = |text: &str| evaluate(&parse_condition(text).expect(text), &sample()).seen;
        assert_eq!(seen("rebuild >= 70%"), "rebuild at 62.5%");
        assert_eq!(seen("array optimal"), "array degraded");
        assert!(seen("agent A of s0/c1 registered").contains("ended, server A has it lost"));
        assert!(seen("agent B of s0/c1 registered").contains("not reported yet"));
        assert!(seen("task gone ended").contains("server A unreachable"));
        assert!(seen("task s1 clean").contains("2 checksum errors"));
        // A stale registration (another pid than the one running now).
        let mut snapshot = sample();
        snapshot.processes[2].pid = 99;
        snapshot.processes[4].state = "ended".into();
        let evaluation = evaluate(
            &parse_condition("agent B of s0/c0 registered").expect("parses"),
            &snapshot,
        );
        assert!(
            !evaluation.met,
            "a dead agent is not registered, whatever its server says"
        );
        assert!(
            evaluation
                .seen
                .contains("ended, server B has it registered"),
            "{}",
            evaluation.seen
        );
        let evaluation = evaluate(
            &parse_condition("agent A of s0/c0 registered").expect("parses"),
            &snapshot,
        );
        assert!(!evaluation.met);
        assert!(
            evaluation.seen.contains("not the one running now (99)"),
            "{}",
            evaluation.seen
        );
        // With server A silent, the domain is read from B; A's agents cannot be judged.
        snapshot.views[0] = None;
        assert!(
            evaluate(
                &parse_condition("array degraded").expect("parses"),
                &snapshot
            )
            .met
        );
        let evaluation = evaluate(
            &parse_condition("agent A of s0/c0 registered").expect("parses"),
            &snapshot,
        );
        assert_eq!(evaluation.seen, "server A did not answer");
    }

    #[test]
    fn bad_phrases_are_refused_with_the_forms() {
        for (bad, says) in [
            ("rebuild is fast", "is not a condition"),
            ("rebuild >= 150%", "not a percentage"),
            ("array sideways", "not a array state"),
            ("agent C of s0/c0 registered", "C"),
            ("process s0/c9/driver ended", "not a process"),
            ("task t1 result.repaired ~ 3", "not a comparison"),
            ("task t1 failed with \"open", "not closed"),
            ("disk x available", "not a disk number"),
        ] {
            let err = parse_condition(bad).expect_err(bad);
            assert!(err.contains(says), "{bad}: {err}");
        }
        let err = parse_check("nothing lost").expect_err("not a check");
        assert!(err.contains("no loss [in W]"), "{err}");
        assert_eq!(
            parse_check("no loss in w"),
            Ok(Check::NoLoss(Some("w".into())))
        );
        assert_eq!(parse_check("scrub clean on s1"), Ok(Check::ScrubClean(1)));
        assert_eq!(
            parse_check("every task via B complete"),
            Ok(Check::EveryTaskVia(Pair::B))
        );
        assert!(matches!(
            parse_check("array optimal"),
            Ok(Check::Condition(_))
        ));
    }
}
