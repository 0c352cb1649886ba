//! Volume ownership between the two controllers of a server system:
//! `DIR/ownership.live` in the array directory, mapped `MAP_SHARED` by both
//! drivers (the storage both controllers map, next to the stripe locks of
//! [`crate::live`]).
//!
//! Every volume has a *home* controller ([`crate::array::VolumeRecord::owner`]).
//! Each controller has a host-facing NBD address, and the volumes it is home to
//! are served there. What this file records, per controller `c`:
//!
//! - **who is controller `c`**: the identity (pid and start time) of the driver
//!   process that joined as `c`, and its **heartbeat** (a `CLOCK_MONOTONIC`
//!   time in ms, renewed every [`HEARTBEAT`]). A heartbeat older than
//!   [`LEASE`] means the lease ran out: the process is dead or hung.
//! - **who serves `c`'s volumes and address now** (`serving`): `c` itself, or
//!   its partner after a failover, plus an `epoch` bumped at every change, so
//!   an observer can tell two failovers apart.
//! - **`c`'s address** (`127.0.0.1:10809`), so the partner can bind it when it
//!   takes over (address takeover, as clusters move a service IP) and a
//!   restarted `c` binds the same one again.
//!
//! Every change of `serving` is a compare-and-swap, so the two controllers can
//! never both believe they serve one controller's volumes. The survivor takes
//! over only a controller that is dead: one whose lease ran out but whose
//! process still runs (hung: SIGSTOP) must be *fenced* first (killed; the
//! emulator's driver does that, this module only says so), because a hung
//! process that woke up could otherwise finish a write it had started over the
//! survivor's newer data.
//!
//! This module owns the file's format and its state transitions. It never
//! waits, binds sockets or kills anything.
//!
//! ## File format (little-endian), 4 KiB
//!
//! | offset | size | field    | meaning                                              |
//! |-------:|-----:|----------|------------------------------------------------------|
//! | 0      | 8    | magic    | ASCII `EMUOWNR1`                                     |
//! | 8      | 4    | version  | `1`                                                  |
//! | 512·(c+1) | 8 | identity | atomic: driver that joined as controller `c`, 0 none |
//! | +8     | 8    | heartbeat| atomic: its last heartbeat, `CLOCK_MONOTONIC` ms      |
//! | +16    | 8    | serving  | atomic: 1 + the controller serving `c`'s volumes, 0 nobody yet |
//! | +24    | 8    | epoch    | atomic: bumped at every change of `serving`          |
//! | +32    | 8    | changed  | atomic: `CLOCK_MONOTONIC` ms of the last change       |
//! | +40    | 4    | addr_len | length of `address`                                  |
//! | +44    | 212  | address  | UTF-8 host-facing address (`host:port`)              |

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use disk_images::mapping::SharedMapping;
use disk_images::process::{alive, my_identity};

use crate::live::MappedError;

/// The file in an array directory.
pub const OWNERSHIP_FILE: &str = "ownership.live";
/// Controllers per server system.
pub const CONTROLLERS: u8 = 2;
/// How often a controller renews its heartbeat.
pub const HEARTBEAT: Duration = Duration::from_millis(100);
/// A heartbeat older than this: the controller is dead or hung.
pub const LEASE: Duration = Duration::from_millis(1000);
/// The longest host-facing address the file holds.
pub const MAX_ADDRESS: usize = 212;

const MAGIC: [u8; 8] = *b"EMUOWNR1";
const VERSION: u32 = 1;
const FILE_BYTES: usize = 4096;
const RECORD: usize = 512;
const IDENTITY: usize = 0;
const BEAT: usize = 8;
const SERVING: usize = 16;
const EPOCH: usize = 24;
const CHANGED: usize = 32;
const ADDR_LEN: usize = 40;
const ADDRESS: usize = 44;

/// Errors of the ownership file.
#[derive(Debug, thiserror::Error)]
pub enum OwnershipError {
    /// Not an ownership file.
    #[error("{path} is not a valid ownership file ({problem}); with no driver running, remove it", path = path.display())]
    Corrupt {
        /// File.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// Another live process already is this controller.
    #[error("controller {controller} is already running (pid {pid})")]
    Taken {
        /// Controller id.
        controller: u8,
        /// Its process.
        pid: u32,
    },
    /// A controller id out of range.
    #[error("controller {0} does not exist (a server system has controllers 0 and 1)")]
    NoController(u8),
    /// An address too long for the file.
    #[error("address {0:?} is longer than {MAX_ADDRESS} bytes")]
    AddressTooLong(String),
    /// The OS refused.
    #[error("{operation} {path}: {source}", path = path.display())]
    Io {
        /// File.
        path: PathBuf,
        /// What was being done.
        operation: &'static str,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
}

/// How a controller looks from its partner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// No process has joined as this controller since the file was made.
    NeverJoined,
    /// Its process is gone.
    Dead,
    /// Its process runs but its lease ran out: hung. Fence it (kill `identity`)
    /// before taking over.
    Hung {
        /// The process to fence.
        identity: u64,
    },
    /// Running, lease fresh.
    Alive {
        /// The process.
        identity: u64,
    },
}

/// One controller's record, as read now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerRecord {
    /// Controller id.
    pub id: u8,
    /// Its health.
    pub health: Health,
    /// Who serves its volumes and address (None: nobody yet).
    pub serving: Option<u8>,
    /// Changes of `serving` so far.
    pub epoch: u64,
    /// Ms since the last change of `serving` (None: never changed).
    pub since_change_ms: Option<u64>,
    /// Its host-facing address, once recorded.
    pub address: Option<String>,
}

/// `CLOCK_MONOTONIC` in ms: the same clock in every process of the machine.
pub fn monotonic_ms() -> u64 {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always available");
    now.tv_sec() as u64 * 1000 + now.tv_nsec() as u64 / 1_000_000
}

/// This process's handle on the ownership file.
#[derive(Debug)]
pub struct Ownership {
    path: PathBuf,
    _file: File,
    map: SharedMapping,
    me: u64,
}

impl Ownership {
    /// Opens `dir/ownership.live`, creating it if missing.
    pub fn open(dir: &Path) -> Result<Self, OwnershipError> {
        let path = dir.join(OWNERSHIP_FILE);
        let io = |operation| {
            let path = path.clone();
            move |source| OwnershipError::Io {
                path,
                operation,
                source,
            }
        };
        let (file, map) = crate::live::open_or_create_mapped(&path, FILE_BYTES, &MAGIC, VERSION)
            .map_err(|err| match err {
                MappedError::Io(operation, source) => io(operation)(source),
                MappedError::Corrupt(problem) => OwnershipError::Corrupt {
                    path: path.clone(),
                    problem,
                },
            })?;
        let me = my_identity().map_err(io("read this process's identity"))?;
        Ok(Self {
            path,
            _file: file,
            map,
            me,
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn at(controller: u8, field: usize) -> Result<usize, OwnershipError> {
        if controller >= CONTROLLERS {
            return Err(OwnershipError::NoController(controller));
        }
        Ok(RECORD * (usize::from(controller) + 1) + field)
    }

    /// Joins as controller `id`: takes its record if it is free or its last
    /// process is dead, and starts the heartbeat.
    pub fn join(&self, id: u8) -> Result<(), OwnershipError> {
        let at = Self::at(id, IDENTITY)?;
        loop {
            let current = self.map.load_u64_le(at);
            if current != 0 && current != self.me && alive(current) {
                return Err(OwnershipError::Taken {
                    controller: id,
                    pid: current as u32,
                });
            }
            self.map.store_u64_le(at + BEAT - IDENTITY, monotonic_ms());
            if self
                .map
                .compare_exchange_u64_le(at, current, self.me)
                .is_ok()
            {
                return Ok(());
            }
        }
    }

    /// Renews controller `id`'s heartbeat, if this process still is `id`
    /// (false: it was replaced, and must stop acting as `id`).
    pub fn beat(&self, id: u8) -> Result<bool, OwnershipError> {
        let at = Self::at(id, 0)?;
        if self.map.load_u64_le(at + IDENTITY) != self.me {
            return Ok(false);
        }
        self.map.store_u64_le(at + BEAT, monotonic_ms());
        Ok(true)
    }

    /// Leaves controller `id`'s record (a clean stop): its partner may take
    /// over at once.
    pub fn leave(&self, id: u8) -> Result<(), OwnershipError> {
        let at = Self::at(id, IDENTITY)?;
        let _ = self.map.compare_exchange_u64_le(at, self.me, 0);
        Ok(())
    }

    /// Records `address` as controller `id`'s host-facing address.
    pub fn set_address(&self, id: u8, address: &str) -> Result<(), OwnershipError> {
        let at = Self::at(id, 0)?;
        if address.len() > MAX_ADDRESS {
            return Err(OwnershipError::AddressTooLong(address.to_string()));
        }
        let mut field = [0u8; MAX_ADDRESS];
        field[..address.len()].copy_from_slice(address.as_bytes());
        self.map.write_from(at + ADDRESS, &field);
        self.map.store_u32_le(at + ADDR_LEN, address.len() as u32);
        Ok(())
    }

    /// Controller `id`'s record now.
    pub fn record(&self, id: u8) -> Result<ControllerRecord, OwnershipError> {
        let at = Self::at(id, 0)?;
        let identity = self.map.load_u64_le(at + IDENTITY);
        let beat = self.map.load_u64_le(at + BEAT);
        let now = monotonic_ms();
        let health = if identity == 0 {
            if beat == 0 {
                Health::NeverJoined
            } else {
                Health::Dead
            }
        } else if !alive(identity) {
            Health::Dead
        } else if now.saturating_sub(beat) > LEASE.as_millis() as u64 {
            Health::Hung { identity }
        } else {
            Health::Alive { identity }
        };
        let serving = match self.map.load_u64_le(at + SERVING) {
            0 => None,
            n => Some((n - 1) as u8),
        };
        let changed = self.map.load_u64_le(at + CHANGED);
        let len = (self.map.load_u32_le(at + ADDR_LEN) as usize).min(MAX_ADDRESS);
        let address = (len > 0).then(|| {
            let mut bytes = vec![0u8; len];
            self.map.read_into(at + ADDRESS, &mut bytes);
            String::from_utf8_lossy(&bytes).into_owned()
        });
        Ok(ControllerRecord {
            id,
            health,
            serving,
            epoch: self.map.load_u64_le(at + EPOCH),
            since_change_ms: (changed != 0).then(|| now.saturating_sub(changed)),
            address,
        })
    }

    /// Moves the serving of controller `of`'s volumes from `from` to `to`
    /// with one compare-and-swap; false if it was not `from` (someone else
    /// moved it first).
    pub fn move_serving(&self, of: u8, from: Option<u8>, to: u8) -> Result<bool, OwnershipError> {
        let at = Self::at(of, 0)?;
        Self::at(to, 0)?;
        let encode = |serving: Option<u8>| serving.map_or(0, |c| u64::from(c) + 1);
        let moved = self
            .map
            .compare_exchange_u64_le(at + SERVING, encode(from), encode(Some(to)))
            .is_ok();
        if moved && from != Some(to) {
            self.map.fetch_add_u64_le(at + EPOCH, 1);
            self.map.store_u64_le(at + CHANGED, monotonic_ms());
        }
        Ok(moved)
    }
}

/// What controller `me` should do about controller `of`'s volumes, from the
/// two records: the decision of the failover state machine, kept pure so it
/// can be tested without processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Serve them (they are ours, or we took them over).
    Serve,
    /// Not ours, and their controller is up: leave them.
    Leave,
    /// Ours to take (its controller is dead, or never came within the
    /// grace): move `serving` from `from` to `me`, then serve.
    TakeOver {
        /// What `serving` holds now.
        from: Option<u8>,
    },
    /// The controller is hung: fence (kill) `identity` first.
    Fence {
        /// The process.
        identity: u64,
    },
    /// We serve a partner's volumes and the partner is back: stop serving them,
    /// then hand them back.
    HandBack,
    /// Our own volumes, served by the partner: wait for it to hand them back.
    WaitForHandBack,
    /// Our own volumes, served by nobody or by a partner that is dead: claim.
    Claim {
        /// What `serving` holds now.
        from: Option<u8>,
    },
}

/// The decision for `me` about `record` (controller `record.id`'s volumes).
/// `server_health`: the health of the controller serving them now, when that
/// is neither `me` nor `record.id`. `grace_over`: the partner had time to
/// join since this controller started.
pub fn decide(
    me: u8,
    record: &ControllerRecord,
    server_health: Option<Health>,
    grace_over: bool,
) -> Decision {
    if record.id == me {
        return match (record.serving, server_health) {
            (Some(c), _) if c == me => Decision::Serve,
            // The partner that took them over is gone too: nobody will hand
            // them back.
            (Some(c), Some(Health::Dead | Health::NeverJoined)) => {
                Decision::Claim { from: Some(c) }
            }
            (Some(_), _) => Decision::WaitForHandBack,
            (None, _) => Decision::Claim { from: None },
        };
    }
    match (record.serving, record.health) {
        // Ours since a takeover.
        (Some(c), Health::Alive { .. }) if c == me => Decision::HandBack,
        (Some(c), _) if c == me => Decision::Serve,
        (_, Health::Alive { .. }) => Decision::Leave,
        (_, Health::Hung { identity }) => Decision::Fence { identity },
        (from, Health::Dead) => Decision::TakeOver { from },
        (from, Health::NeverJoined) if grace_over => Decision::TakeOver { from },
        (_, Health::NeverJoined) => Decision::Leave,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: u8, health: Health, serving: Option<u8>) -> ControllerRecord {
        ControllerRecord {
            id,
            health,
            serving,
            epoch: 0,
            since_change_ms: None,
            address: None,
        }
    }

    #[test]
    fn decisions_of_the_failover_state_machine() {
        let alive = Health::Alive { identity: 7 };
        let hung = Health::Hung { identity: 7 };
        // Our own volumes.
        assert_eq!(
            decide(0, &record(0, alive, Some(0)), None, false),
            Decision::Serve
        );
        assert_eq!(
            decide(0, &record(0, alive, None), None, false),
            Decision::Claim { from: None }
        );
        assert_eq!(
            decide(0, &record(0, alive, Some(1)), None, true),
            Decision::WaitForHandBack
        );
        // Taken over by a partner that died since: nobody will hand them
        // back. One now hung: wait (the partner's own record says fence it).
        assert_eq!(
            decide(0, &record(0, alive, Some(1)), Some(Health::Dead), true),
            Decision::Claim { from: Some(1) }
        );
        assert_eq!(
            decide(0, &record(0, alive, Some(1)), Some(hung), true),
            Decision::WaitForHandBack
        );
        // The partner's.
        assert_eq!(
            decide(0, &record(1, alive, Some(1)), None, true),
            Decision::Leave
        );
        assert_eq!(
            decide(0, &record(1, hung, Some(1)), None, true),
            Decision::Fence { identity: 7 }
        );
        assert_eq!(
            decide(0, &record(1, Health::Dead, Some(1)), None, false),
            Decision::TakeOver { from: Some(1) }
        );
        assert_eq!(
            decide(0, &record(1, Health::Dead, Some(0)), None, false),
            Decision::Serve
        );
        assert_eq!(
            decide(0, &record(1, alive, Some(0)), None, false),
            Decision::HandBack
        );
        assert_eq!(
            decide(0, &record(1, Health::NeverJoined, None), None, false),
            Decision::Leave
        );
        assert_eq!(
            decide(0, &record(1, Health::NeverJoined, None), None, true),
            Decision::TakeOver { from: None }
        );
    }

    #[test]
    fn join_beat_move_and_read_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ownership = Ownership::open(dir.path()).expect("open");
        assert_eq!(
            ownership.record(1).expect("record").health,
            Health::NeverJoined
        );
        ownership.join(0).expect("join");
        ownership
            .set_address(0, "127.0.0.1:10809")
            .expect("address");
        let again = Ownership::open(dir.path()).expect("open again");
        let zero = again.record(0).expect("record");
        assert!(matches!(zero.health, Health::Alive { .. }), "{zero:?}");
        assert_eq!(zero.address.as_deref(), Some("127.0.0.1:10809"));
        assert!(ownership.move_serving(0, None, 0).expect("claim"));
        // A second claim from the old value fails: the swap is atomic.
        assert!(!again.move_serving(0, None, 1).expect("lost race"));
        assert!(again.move_serving(0, Some(0), 1).expect("take over"));
        let moved = ownership.record(0).expect("record");
        assert_eq!((moved.serving, moved.epoch), (Some(1), 2));
        assert!(ownership.beat(0).expect("beat"));
        ownership.leave(0).expect("leave");
        assert_eq!(again.record(0).expect("record").health, Health::Dead);
        assert!(!ownership.beat(0).expect("beat after leaving"));
        assert!(matches!(
            Ownership::open(dir.path()).expect("open").join(2),
            Err(OwnershipError::NoController(2))
        ));
    }

    #[test]
    fn a_live_controller_cannot_be_joined_twice_but_a_dead_ones_record_can() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ownership = Ownership::open(dir.path()).expect("open");
        // A process that is certainly not running: pid 0x7fff_fffe.
        let at = Ownership::at(1, IDENTITY).expect("at");
        ownership.map.store_u64_le(at, 0x7fff_fffe);
        ownership.join(1).expect("a dead process's record is free");
        // This process is alive: another identity cannot take it.
        let mut other = Ownership::open(dir.path()).expect("open");
        other.me = 0x7fff_fffd;
        assert!(matches!(
            other.join(1),
            Err(OwnershipError::Taken { controller: 1, .. })
        ));
    }
}
