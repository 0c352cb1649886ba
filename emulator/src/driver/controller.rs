//! The driver as one of its server system's two controllers (seed 004): it
//! watches the system's array for task coordination objects and works on every
//! one it finds, as controller N for cluster cN: it claims READY partitions (and
//! those of a controller that died, once their lease runs out), and runs the
//! completion actions when it initiated the task, or when the initiator did
//! not within a lease. A task initiated by one driver is thus split across both
//! drivers, and finished by either.
//!
//! The controller that completes a task's last partition tells the initiator
//! at once, over a Unix datagram socket ([`Notices`]); the initiator also
//! looks a few times per lease, for partitions of a controller that died.
//!
//! It also keeps hot spares hot: when a member has failed, a spare is there and
//! nothing is being rebuilt, it puts the spare in place and starts a rebuild
//! (cluster c0 at once; cluster c1 if the condition still holds a lease later,
//! when c0's driver is gone).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use controllers::array::{read_metadata, Array};
use controllers::coordination::TaskFile;
use controllers::raid::{MemberState, RaidEngine};

use crate::controller::{self, task_path, TaskKind, DEFAULT_LEASE_MS};
use crate::task::CONTROLLERS;

/// How often the driver looks for coordination objects and failed disks.
const LOOK_INTERVAL: Duration = Duration::from_millis(100);
/// How long after a failed attempt the driver tries a task again.
const RETRY_AFTER: Duration = Duration::from_secs(5);

/// The drivers' notice channel: a Unix datagram socket per controller and task
/// kind (`RUN/sN/cM/notice-KIND.sock`), on which the controller that completes
/// a task's last partition tells the initiator.
pub(super) struct Notices {
    /// This controller's sockets, by kind.
    own: HashMap<TaskKind, std::os::unix::net::UnixDatagram>,
    /// Where controller N of the system listens for notices of a kind.
    peer: Box<dyn Fn(u8, TaskKind) -> PathBuf + Send + Sync>,
}

impl Notices {
    /// Binds this controller's sockets, `path(kind)` each.
    pub(super) fn bind(
        path: impl Fn(TaskKind) -> PathBuf,
        peer: impl Fn(u8, TaskKind) -> PathBuf + Send + Sync + 'static,
    ) -> std::io::Result<Self> {
        let mut own = HashMap::new();
        for kind in [TaskKind::Rebuild, TaskKind::Scrub] {
            let path = path(kind);
            let _ = std::fs::remove_file(&path);
            own.insert(kind, std::os::unix::net::UnixDatagram::bind(&path)?);
        }
        Ok(Self {
            own,
            peer: Box::new(peer),
        })
    }
}

impl controller::CompletionNotice for Notices {
    fn notify(&self, initiator: u8, kind: TaskKind) {
        let target = (self.peer)(initiator, kind);
        if let Some(socket) = self.own.get(&kind) {
            match socket.send_to(kind.name().as_bytes(), &target) {
                Ok(_) => tracing::info!(
                    initiator,
                    task = kind.name(),
                    "told the initiator every partition is COMPLETE"
                ),
                // Gone: it will be taken over (see the worker's completion).
                Err(err) => tracing::info!(initiator, %err, "cannot tell the initiator"),
            }
        }
    }

    fn wait(&self, kind: TaskKind, timeout: Duration) {
        if let Some(socket) = self.own.get(&kind) {
            let mut buf = [0u8; 16];
            let _ = socket.set_read_timeout(Some(timeout));
            let _ = socket.recv(&mut buf);
        }
    }
}

/// Works on every coordination object of the array in `disks` as controller
/// `id`, until `stop`.
pub(super) fn run(
    disks: PathBuf,
    engine: Arc<RaidEngine>,
    id: u8,
    auto_rebuild: bool,
    notices: Arc<Notices>,
    stop: Arc<AtomicBool>,
) {
    let mut workers: HashMap<TaskKind, JoinHandle<bool>> = HashMap::new();
    // The task instance (its creation time) each kind's worker last ran, and
    // when it failed: a worker is started again only for a new task, or after
    // RETRY_AFTER.
    let mut handled: HashMap<TaskKind, (u64, Option<Instant>)> = HashMap::new();
    let mut failed_since: Option<Instant> = None;
    while !stop.load(Ordering::Acquire) {
        for kind in [TaskKind::Rebuild, TaskKind::Scrub] {
            if workers.get(&kind).is_some_and(JoinHandle::is_finished) {
                let ok = workers
                    .remove(&kind)
                    .and_then(|worker| worker.join().ok())
                    .unwrap_or(false);
                if let Some((_, failed)) = handled.get_mut(&kind) {
                    *failed = (!ok).then(Instant::now);
                }
            }
            if workers.contains_key(&kind) {
                continue;
            }
            let Ok(task) = TaskFile::open(&task_path(&disks, kind)) else {
                continue;
            };
            let instance = task.created_ms();
            drop(task);
            let due = match handled.get(&kind) {
                Some((seen, None)) => *seen != instance,
                Some((seen, Some(failed))) => *seen != instance || failed.elapsed() >= RETRY_AFTER,
                None => true,
            };
            if !due {
                continue;
            }
            handled.insert(kind, (instance, None));
            let (disks, engine, notices) =
                (disks.clone(), Arc::clone(&engine), Arc::clone(&notices));
            let spawned = std::thread::Builder::new()
                .name(format!("controller-{}", kind.name()))
                .spawn(move || {
                    tracing::info!(controller = id, task = kind.name(), "joining the task");
                    let notice: &dyn controller::CompletionNotice = notices.as_ref();
                    match controller::run_partitions(&disks, kind, id, DEFAULT_LEASE_MS, &engine, Some(notice)) {
                        Ok(()) => true,
                        Err(err) => {
                            tracing::warn!(controller = id, task = kind.name(), %err, "working on the task failed");
                            false
                        }
                    }
                });
            match spawned {
                Ok(worker) => {
                    workers.insert(kind, worker);
                }
                Err(err) => tracing::warn!(%err, "cannot start a controller thread"),
            }
        }
        if auto_rebuild {
            keep_spares_hot(&disks, id, &mut failed_since);
        }
        std::thread::sleep(LOOK_INTERVAL);
    }
}

/// Puts a hot spare in place of a failed member and starts its rebuild, when
/// there is one to use and nothing is being rebuilt.
fn keep_spares_hot(disks: &std::path::Path, id: u8, failed_since: &mut Option<Instant>) {
    let Ok(metadata) = read_metadata(disks) else {
        return;
    };
    let failed = metadata
        .members
        .iter()
        .position(|member| member.state == MemberState::Failed);
    let rebuilding = metadata
        .members
        .iter()
        .any(|member| member.state == MemberState::Rebuilding);
    let Some(failed) = failed.filter(|_| !rebuilding && !metadata.spares.is_empty()) else {
        *failed_since = None;
        return;
    };
    let since = *failed_since.get_or_insert_with(Instant::now);
    // Cluster c0's driver acts at once; c1's only when c0's has not, a lease
    // later (it is gone).
    if id != 0 && since.elapsed() < Duration::from_millis(DEFAULT_LEASE_MS) {
        return;
    }
    let outcome = Array::open(disks)
        .and_then(|mut array| array.replace(failed))
        .map_err(|err| err.to_string())
        .and_then(|file| {
            controller::begin(disks, TaskKind::Rebuild, false, None, CONTROLLERS, id)
                .map(|_| file)
                .map_err(|err| err.to_string())
        });
    match outcome {
        Ok(file) => tracing::warn!(
            controller = id,
            disk = failed,
            spare = %file,
            "disk failed: hot spare put in its place, rebuild started"
        ),
        // Most likely the other driver got there first.
        Err(err) => {
            tracing::info!(controller = id, disk = failed, %err, "no hot spare put in place")
        }
    }
    *failed_since = None;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::CompletionNotice;

    #[test]
    fn the_initiator_hears_the_notice_at_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = |id: u8, kind: TaskKind| dir.path().join(format!("c{id}-{}.sock", kind.name()));
        let root = dir.path().to_path_buf();
        let peer = move |id: u8, kind: TaskKind| root.join(format!("c{id}-{}.sock", kind.name()));
        let initiator = Notices::bind(|kind| path(0, kind), peer.clone()).expect("bind c0");
        let partner = Notices::bind(|kind| path(1, kind), peer).expect("bind c1");
        let waiter = std::thread::spawn(move || {
            let started = Instant::now();
            initiator.wait(TaskKind::Scrub, Duration::from_secs(30));
            started.elapsed()
        });
        // Sent once; a datagram sent before the waiter blocks is queued, not
        // lost. Without it the wait would last its whole 30 s.
        partner.notify(0, TaskKind::Scrub);
        let waited = waiter.join().expect("waiter");
        assert!(
            waited < Duration::from_secs(5),
            "waited {waited:?} for the notice"
        );
    }
}
