//! Long array tasks (rebuild, scrub) split across controller processes through
//! the task coordination object (`controllers::coordination`): this module owns
//! starting a task, one controller's share of it, its completion actions, and
//! the operator's adjustments (pause, resume, cancel, rate). Printing and
//! progress bars are the command line's (`crate::cli`).
//!
//! `emulator array rebuild|scrub` writes the coordination file
//! (`DIR/task-rebuild.coord` or `DIR/task-scrub.coord`) and starts one
//! `emulator controller` process per controller. Each claims READY partitions
//! (or ones whose owner stopped renewing its lease), works through them in 1 MiB
//! steps, renewing its lease and recording progress after each, and marks them
//! COMPLETE. Controller 0 is the initiator: when every partition is COMPLETE it
//! runs the completion actions (a rebuilt disk becomes active; a scrub's findings
//! are written to `DIR/scrub-report.json`) and removes the coordination file.
//! Running the command again while a coordination file exists resumes that task.
//!
//! - [`files`]: the files a task keeps in the array directory.
//! - [`worker`]: one controller's share ([`run_controller`]).
//! - [`completion`]: the initiator's completion actions and the report.
//! - [`operator`]: starting, following and adjusting a task.

mod completion;
mod files;
mod operator;
mod worker;

use std::path::PathBuf;

use controllers::array::ArrayError;
use controllers::coordination::{CoordinationError, Operation};
use controllers::raid::RaidError;
use controllers::work::WorkError;
use serde::{Deserialize, Serialize};

pub use completion::{PartitionReport, TaskReport};
pub use files::{report_path, task_path};
pub use operator::{
    adjust, begin, in_progress, prepare, start, Adjust, StartOptions, Started, TaskProgress,
};
pub use worker::{run_controller, run_partitions, CompletionNotice};

/// Default lease: a partition whose owner has not renewed for this long goes to
/// another controller.
pub const DEFAULT_LEASE_MS: u64 = 5_000;
/// Most controllers a task may be split across.
/// (Each has the array open, and at most `controllers::live::SLOTS` = 8 processes may:
/// this leaves room for servers and the CLI.)
pub const MAX_CONTROLLERS: u8 = 4;

/// The tasks the CLI starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TaskKind {
    /// Rebuild the member being rebuilt.
    Rebuild,
    /// Scrub the array.
    Scrub,
}

impl TaskKind {
    fn operation(self) -> Operation {
        match self {
            Self::Rebuild => Operation::Rebuild,
            Self::Scrub => Operation::Scrub,
        }
    }

    /// The task's name, as in its files and messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::Rebuild => "rebuild",
            Self::Scrub => "scrub",
        }
    }
}

/// Why a task could not be started, run, completed or adjusted.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    /// The array (its metadata or a change to it).
    #[error(transparent)]
    Array(#[from] ArrayError),
    /// The coordination object.
    #[error(transparent)]
    Coordination(#[from] CoordinationError),
    /// The RAID engine.
    #[error(transparent)]
    Raid(#[from] RaidError),
    /// A member image.
    #[error(transparent)]
    Image(#[from] disk_images::ImageError),
    /// The work on a partition stopped.
    #[error("partition {partition}: {source}")]
    Work {
        /// The partition.
        partition: u32,
        /// Why.
        #[source]
        source: WorkError,
    },
    /// A file of the task.
    #[error("{operation} {path}: {source}", path = path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        operation: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A file of the task that is not what it should be.
    #[error("{path}: {source}", path = path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: serde_json::Error,
    },
    /// Not possible as things stand; the message says why and what to do.
    #[error("{0}")]
    Refused(String),
}

impl ControllerError {
    fn io(
        path: impl Into<PathBuf>,
        operation: &'static str,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io {
            path,
            operation,
            source,
        }
    }
}
