//! The one crash point below the fault layer, for crash-consistency tests: a
//! point in the code where a process aborts the N-th time it passes, N taken
//! from an environment variable (unset: never). Used half-way through a block
//! write (`EMULATOR_FAULT_CRASH_IN_BLOCK_WRITE`), which no layer around an
//! image can reach; every other crash point is a rule of `controllers::faults`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// A point where a process can be made to die, armed by the environment
/// variable `var` (`var=N`: the N-th pass aborts).
#[derive(Debug)]
pub struct CrashPoint {
    var: &'static str,
    at: OnceLock<Option<u64>>,
    passed: AtomicU64,
}

impl CrashPoint {
    /// A point armed by environment variable `var`.
    pub const fn new(var: &'static str) -> Self {
        Self {
            var,
            at: OnceLock::new(),
            passed: AtomicU64::new(0),
        }
    }

    /// Counts this pass; true if it is the one to die at. When the variable
    /// is unset this is one load of an initialised `OnceLock`.
    pub fn due(&self) -> bool {
        let at = self.at.get_or_init(|| {
            std::env::var(self.var)
                .ok()
                .and_then(|value| value.parse().ok())
        });
        at.is_some_and(|at| self.passed.fetch_add(1, Ordering::SeqCst) + 1 == at)
    }

    /// Aborts the process, saying where (`what`) on stderr.
    pub fn abort(&self, what: &str) -> ! {
        eprintln!("{}: aborting {what}", self.var);
        std::process::abort()
    }
}
