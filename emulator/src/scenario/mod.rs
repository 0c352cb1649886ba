//! Scenarios: declarative, seeded, replayable runs of a whole domain
//! (`emulator scenario run|check|list`, the files in `scenarios/`).
//!
//! This module owns:
//! - the scenario file format ([`file`]): TOML with a topology (the default
//!   domain, an inline one or a configuration file, ports always 0), write
//!   oracle workloads, a timeline of steps (actions at a time offset or one
//!   after the other, waits for conditions with a bound, assertions) and final
//!   assertions; its validation, with every error naming the line and the
//!   field or step (`scenarios/README.md` documents it for users);
//! - the conditions and assertions and their evaluation on what the domain
//!   shows ([`condition`]: a pure function of a [`condition::Snapshot`], so it
//!   is tested on sample JSON);
//! - running one ([`runner`]): its own run directory, the domain up, the
//!   workloads in-process (`crate::workload`), faults through `crate::fault`,
//!   tasks through `crate::client`, the domain always brought down (also on an
//!   error or Ctrl-C); and the [`report::Report`] with every fault injected
//!   (from the run's fault log) and every assertion.
//!
//! It never prints: the runner tells an observer what happens (the CLI,
//! `cli/scenario.rs`, prints it and maps the verdict to the exit status: 0
//! pass, 1 fail, 2 error).
//!
//! Everything random is derived from the scenario's seed ([`derive_seed`]):
//! a run replays with `--seed N`.

pub mod condition;
pub mod file;
pub mod report;
pub mod runner;

use std::path::PathBuf;

pub use file::{Scenario, DEFAULT_TIMEOUT};
pub use report::{Report, Verdict};
pub use runner::{run, Options};

/// Why a scenario file cannot be used, or a run could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// The file (or a configuration file it names) could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Not TOML, or not this format: what the TOML parser said, where.
    #[error("{}: line {line}, column {column}: {message}", path.display())]
    Syntax {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong (names the field: "unknown field `wiat`, expected …").
        message: String,
    },
    /// A value that parses but cannot work: names the field or step.
    #[error("{}: line {line}: {field}: {problem}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// 1-based line (of the field, or of the step's table).
        line: usize,
        /// `timeout`, `workloads[1].volume`, `step 3 (wait)`.
        field: String,
        /// What is wrong.
        problem: String,
    },
    /// A directory of scenarios could not be listed.
    #[error("cannot list {}: {source}", path.display())]
    List {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A seed for one random thing of a run (a workload, a fault), derived from
/// the scenario's seed and what it is for (splitmix64): the same scenario
/// seed gives every workload and fault the same seed again.
pub fn derive_seed(seed: u64, purpose: u64) -> u64 {
    let mut z = seed ^ purpose.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_seeds_are_stable_and_differ_by_purpose() {
        assert_eq!(derive_seed(7, 1), derive_seed(7, 1));
        assert_ne!(derive_seed(7, 1), derive_seed(7, 2));
        assert_ne!(derive_seed(7, 1), derive_seed(8, 1));
    }
}
