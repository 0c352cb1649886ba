//! What a scenario run reports: the timeline as it happened, every fault
//! injected (from the run's fault log), every assertion and wait with its
//! outcome, the workloads, and the verdict (`--json` prints it whole).

use std::path::PathBuf;

use serde::Serialize;

use super::file::Expect;
use crate::fault::FaultSpec;
use crate::workload::{RunSummary, VerifyReport};

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// As expected: every assertion held (or, for `expect = "fail"`, one
    /// failed). Exit status 0.
    Pass,
    /// Not as expected. Exit status 1.
    Fail,
    /// The scenario could not run (bad file, the domain did not start, a
    /// fault could not be injected, interrupted). Exit status 2.
    Error,
}

impl Verdict {
    /// The exit status it maps to.
    pub fn exit_code(self) -> u8 {
        match self {
            Self::Pass => 0,
            Self::Fail => 1,
            Self::Error => 2,
        }
    }
}

/// How one line of the timeline turned out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Done, or held.
    Ok,
    /// A wait ran out or an assertion did not hold.
    Failed,
    /// Could not be done.
    Error,
}

/// One line of the timeline.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    /// Since the run started, ms.
    pub t_ms: u64,
    /// The step (None: set-up, the end).
    pub step: Option<usize>,
    /// `domain`, `workload`, `inject`, `kill`, `task`, `wait`, `assert`, …
    pub kind: String,
    /// What, as written (`rebuild >= 50%`, `s0/c0/driver`).
    pub what: String,
    /// How it went.
    pub outcome: Outcome,
    /// What happened or was seen.
    pub detail: String,
}

/// A fault of the run's fault log.
#[derive(Debug, Clone, Serialize)]
pub struct FaultEntry {
    /// `f1`, …
    pub id: String,
    /// The kind.
    pub kind: String,
    /// What was injected.
    pub spec: FaultSpec,
    /// When, ms since the run started.
    pub t_ms: u64,
    /// What it did.
    pub effect: String,
    /// When it was cleared, ms since the run started (standing faults).
    pub cleared_t_ms: Option<u64>,
}

/// An assertion (or a wait) and whether it held.
#[derive(Debug, Clone, Serialize)]
pub struct AssertionResult {
    /// The step (None: the final `assertions`).
    pub step: Option<usize>,
    /// Its line in the file.
    pub line: usize,
    /// `assert` or `wait`.
    pub kind: String,
    /// As written.
    pub assertion: String,
    /// Whether it held.
    pub passed: bool,
    /// What was seen (for the oracle: which bytes were lost).
    pub detail: String,
}

/// A workload of the run.
#[derive(Debug, Clone, Serialize)]
pub struct WorkloadReport {
    /// Its name.
    pub name: String,
    /// `s0/vol0`.
    pub volume: String,
    /// The URI it wrote.
    pub uri: String,
    /// Its seed (derived from the scenario's).
    pub seed: u64,
    /// Its record file.
    pub record: PathBuf,
    /// What it did (None: it never ran or did not end).
    pub summary: Option<RunSummary>,
    /// Why it could not run.
    pub error: Option<String>,
    /// The oracle's last verdict on it, if an assertion asked.
    pub verify: Option<VerifyReport>,
}

/// The report of one run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The scenario's name.
    pub scenario: String,
    /// Its file.
    pub file: PathBuf,
    /// What it shows.
    pub description: String,
    /// The seed of this run (replay with `--seed`).
    pub seed: u64,
    /// Whether it was meant to pass or to fail.
    pub expect: Expect,
    /// What happened: `pass` (every assertion held), `fail` (one did not),
    /// `error` (it could not run).
    pub outcome: Verdict,
    /// Measured against `expect`: what the exit status says.
    pub verdict: Verdict,
    /// The exit status.
    pub exit_code: u8,
    /// Why it could not run.
    pub error: Option<String>,
    /// Its run directory.
    pub run_dir: PathBuf,
    /// Whether the run directory was kept.
    pub run_dir_kept: bool,
    /// How long it took, ms.
    pub elapsed_ms: u64,
    /// Everything that happened, in order.
    pub timeline: Vec<Entry>,
    /// Every fault injected.
    pub faults: Vec<FaultEntry>,
    /// Every wait and assertion.
    pub assertions: Vec<AssertionResult>,
    /// The workloads.
    pub workloads: Vec<WorkloadReport>,
}

impl Report {
    /// The assertions (and waits) that did not hold.
    pub fn failed(&self) -> impl Iterator<Item = &AssertionResult> {
        self.assertions.iter().filter(|a| !a.passed)
    }
}

/// `2026-12-07T10:15:30.123Z` for a Unix time in ms.
pub fn utc_timestamp(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let (days, rest) = (secs / 86400, secs % 86400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60,
        unix_ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(utc_timestamp(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(utc_timestamp(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(utc_timestamp(1_796_645_730_500), "2026-12-07T12:15:30.500Z");
    }
}
