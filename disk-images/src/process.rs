//! Who holds a cross-process lock, and whether it is still running.
//!
//! Locks in memory shared between processes (this crate's block locks, the
//! controllers' stripe locks and process slots) record their holder as an
//! *identity* word: `pid | (start_time & 0x7fff_ffff) << 32`, the start time
//! being field 22 of `/proc/<pid>/stat`. A waiter that finds the holder gone
//! can take the lock over; the start time keeps a reused pid from being taken
//! for the process that died.

use std::time::{Duration, Instant};

/// How often a waiter checks whether the holder of its lock is still alive.
pub const LIVENESS_CHECK: Duration = Duration::from_millis(10);

/// The identity word of `pid`, or `None` if it is not running (gone, or a zombie).
/// Unknown (an unreadable `/proc`) is `Some(u64::MAX)`: it counts as running, so
/// a live process is never taken for dead.
pub fn identity_of(pid: u32) -> Option<u64> {
    let stat = match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return None,
        Err(_) => return Some(u64::MAX),
    };
    parse_identity(pid, &stat)
}

/// The identity word from the text of `/proc/<pid>/stat`; `None` for a zombie
/// or text that does not parse.
fn parse_identity(pid: u32, stat: &str) -> Option<u64> {
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map(|(_, rest)| rest)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state); field 22 (start time) is fields[19].
    if matches!(fields.first(), Some(&"Z") | Some(&"X") | None) {
        return None;
    }
    let start: u64 = fields.get(19)?.parse().ok()?;
    Some(u64::from(pid) | (start & 0x7fff_ffff) << 32)
}

/// This process's identity word, read from `/proc/self/stat` once and kept. An
/// error when it cannot be read (no `/proc`, no file descriptor left): a lock
/// must never publish a bare pid, which every other process would take for a
/// dead holder (its start time would not match).
pub fn my_identity() -> std::io::Result<u64> {
    static ME: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    if let Some(&me) = ME.get() {
        return Ok(me);
    }
    let pid = std::process::id();
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    let identity = parse_identity(pid, &stat).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("cannot read this process's start time from /proc/self/stat: {stat:?}"),
        )
    })?;
    Ok(*ME.get_or_init(|| identity))
}

/// Whether the process an identity word names is still running.
pub fn alive(identity: u64) -> bool {
    match identity_of(identity as u32) {
        None => false,
        Some(u64::MAX) => true,
        Some(now) => now == identity,
    }
}

/// Waiting for a cross-process lock: spin briefly, then yield, then sleep in
/// growing steps (up to ~1.3 ms; contention is rare and short), and say every
/// [`LIVENESS_CHECK`] when it is time to check the holder.
#[derive(Debug)]
pub struct Backoff {
    round: u32,
    last_check: Instant,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

impl Backoff {
    /// A fresh wait.
    pub fn new() -> Self {
        Self {
            round: 0,
            last_check: Instant::now(),
        }
    }

    /// Waits a little longer than last time.
    pub fn snooze(&mut self) {
        self.round += 1;
        match self.round {
            0..=6 => (0..1u32 << self.round).for_each(|_| std::hint::spin_loop()),
            7..=20 => std::thread::yield_now(),
            n => std::thread::sleep(Duration::from_micros(20u64 << (n - 20).min(6))),
        }
    }

    /// Whether [`LIVENESS_CHECK`] has passed since the last time this said so.
    pub fn liveness_due(&mut self) -> bool {
        if self.last_check.elapsed() >= LIVENESS_CHECK {
            self.last_check = Instant::now();
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_of_this_process_is_alive_and_stable() {
        let me = identity_of(std::process::id()).expect("running");
        assert_eq!(me as u32, std::process::id());
        assert_eq!(my_identity().expect("own identity"), me);
        assert!(alive(me));
        // Same pid, other start time: a reused pid is not the same process.
        assert!(!alive(me ^ (1 << 40)));
    }

    #[test]
    fn an_exited_process_is_not_alive() {
        let mut child = std::process::Command::new("true")
            .spawn()
            .expect("spawn true");
        let identity = identity_of(child.id());
        child.wait().expect("wait");
        let identity = identity.unwrap_or(u64::from(child.id()));
        assert!(!alive(identity));
    }
}
