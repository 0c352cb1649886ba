//! The task coordination object (seed 004): a file that every controller process
//! maps shared, naming an operation (rebuild, scrub, resync), the data set it
//! runs on, and its partitions, each READY, IN PROGRESS or COMPLETE.
//!
//! A free controller examines the partitions, picks a READY one and claims it
//! with a compare-and-swap on that partition's state word: the states are the
//! semaphore, so a partition can never have two owners (claims 1-9). When every
//! partition is COMPLETE the initiating controller runs the completion actions,
//! exactly once (claim 10). The header names the operation and the data set
//! (claim 11).
//!
//! Beyond the patent: a claim carries a lease deadline inside the same state
//! word. The owner renews it while it works; a partition whose owner stopped
//! renewing (it died) can be taken over by another controller with the same
//! compare-and-swap, and is resumed from the progress offset its last owner
//! recorded. Everything lives in the file, so a task survives both controllers
//! restarting. The work a partition stands for must be idempotent (rebuilding or
//! scrubbing a range twice gives the same result), because an owner that stalls
//! past its lease may finish a chunk its successor redoes.
//!
//! This module owns the file's format and the state machine of a partition. It
//! never does the work itself (RAID code does) and never sleeps or waits.
//!
//! ## File format (little-endian)
//!
//! Header, 4096 bytes:
//!
//! | offset | size | field            | meaning                                             |
//! |-------:|-----:|------------------|-----------------------------------------------------|
//! | 0      | 8    | magic            | ASCII `EMUTASK1`                                    |
//! | 8      | 4    | version          | `1`                                                 |
//! | 12     | 4    | operation        | 1 rebuild, 2 scrub, 3 resync                        |
//! | 16     | 4    | flags            | bit 0: scrub repairs what it can                    |
//! | 20     | 4    | initiator        | controller id (0..63) that created the task         |
//! | 24     | 4    | target           | disk index for a rebuild, `u32::MAX` otherwise      |
//! | 28     | 4    | partition_count  | number of partitions (1..=65536)                    |
//! | 32     | 8    | partition_bytes  | bytes per partition (the last may be shorter)       |
//! | 40     | 8    | data_set_bytes   | bytes the task covers                               |
//! | 48     | 8    | epoch_ms         | creation time, Unix ms; lease deadlines count from it|
//! | 56     | 64   | data_set         | UTF-8 name of the data set, zero-padded             |
//! | 120    | 4    | header_crc       | CRC32 of bytes 0..120                               |
//! | 128    | 8    | completion       | atomic: 0 pending, 2 done, or running: 1, owner id in bits 8..16, a deadline (ms after epoch_ms) in bits 16..64 after which another may take it over |
//! | 136    | 8    | control          | atomic: 0 run, 1 pause, 2 cancel (set by an operator, read by every controller) |
//! | 144    | 8    | rate             | atomic: total rate limit in KiB/s across controllers, 0 none |
//! | 152    | 8    | controllers      | atomic: controllers the rate is shared by (at least 1) |
//! | 160..  |      | reserved         | zero                                                |
//!
//! Partition *i*, 64 bytes at `4096 + 64·i`:
//!
//! | offset | size | field          | meaning                                             |
//! |-------:|-----:|----------------|-----------------------------------------------------|
//! | 0      | 8    | state word     | atomic; see below                                   |
//! | 8      | 8    | progress_bytes | bytes of this partition done (resume point)         |
//! | 16     | 8    | checked        | findings: units checked                             |
//! | 24     | 8    | errors         | findings: checksum or consistency errors found      |
//! | 32     | 8    | repaired       | findings: errors repaired                           |
//! | 40     | 8    | unrecoverable  | findings: errors that could not be repaired         |
//! | 48     | 16   | reserved       | zero                                                |
//!
//! State word: bits 0..2 state (0 READY, 1 IN PROGRESS, 2 COMPLETE), bits 2..8
//! owner controller id, bits 8..32 generation (incremented by every claim, so a
//! stale owner's compare-and-swap fails), bits 32..64 lease deadline in ms after
//! `epoch_ms` (about 49 days of task lifetime).

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use disk_images::mapping::SharedMapping;
use serde::Serialize;

/// Bytes in the header.
pub const HEADER_BYTES: usize = 4096;
/// Bytes per partition slot.
pub const SLOT_BYTES: usize = 64;
/// Most partitions a task may have.
pub const MAX_PARTITIONS: u32 = 65_536;
/// Highest controller id (ids are 6 bits).
pub const MAX_CONTROLLER_ID: u8 = 63;
const MAGIC: [u8; 8] = *b"EMUTASK1";
const VERSION: u32 = 1;
const DATA_SET_BYTES: usize = 64;
const COMPLETION_OFFSET: usize = 128;
/// The largest completion deadline (48 bits): never reached.
const COMPLETION_NEVER_EXPIRES: u64 = (1 << 48) - 1;
const CONTROL_OFFSET: usize = 136;
const RATE_OFFSET: usize = 144;
const CONTROLLERS_OFFSET: usize = 152;

/// What an operator asked a running task to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Control {
    /// Work.
    Run,
    /// Hold every partition (leases kept) until resumed or cancelled.
    Pause,
    /// Stop: controllers release their partitions (progress kept) and exit.
    Cancel,
}

/// What a task does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    /// Reconstruct a disk's contents from the others.
    Rebuild,
    /// Verify checksums and redundancy.
    Scrub,
    /// Resynchronise stripes marked dirty by a crash.
    Resync,
}

impl Operation {
    fn code(self) -> u32 {
        match self {
            Self::Rebuild => 1,
            Self::Scrub => 2,
            Self::Resync => 3,
        }
    }

    fn from_code(code: u32) -> Option<Self> {
        match code {
            1 => Some(Self::Rebuild),
            2 => Some(Self::Scrub),
            3 => Some(Self::Resync),
            _ => None,
        }
    }
}

/// The task a coordination object describes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TaskSpec {
    /// The operation.
    pub operation: Operation,
    /// Name of the data set (e.g. the array's directory).
    pub data_set: String,
    /// Disk being rebuilt, for a rebuild.
    pub target_disk: Option<u32>,
    /// Bytes the task covers.
    pub data_set_bytes: u64,
    /// Bytes per partition.
    pub partition_bytes: u64,
    /// Controller that created the task and runs its completion actions.
    pub initiator: u8,
    /// For a scrub: repair what redundancy can fix.
    pub repair: bool,
}

/// A partition's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PartitionState {
    /// Nobody owns it; work remains.
    Ready,
    /// A controller owns it.
    InProgress,
    /// Done.
    Complete,
}

/// The counts of what a partition's work found ([`crate::findings::Findings`]
/// holds the rest), kept in its slot of the coordination object.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct FindingCounts {
    /// Units checked.
    pub checked: u64,
    /// Errors found.
    pub errors: u64,
    /// Errors repaired.
    pub repaired: u64,
    /// Errors that could not be repaired.
    pub unrecoverable: u64,
}

/// A snapshot of one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PartitionView {
    /// Index.
    pub index: u32,
    /// State.
    pub state: PartitionState,
    /// Owner (while in progress) or completer (when complete).
    pub owner: Option<u8>,
    /// Claim generation.
    pub generation: u32,
    /// Lease deadline, Unix ms (meaningful while in progress).
    pub lease_deadline_ms: u64,
    /// First byte of the data set this partition covers.
    pub start: u64,
    /// Bytes it covers.
    pub length: u64,
    /// Bytes done (resume point).
    pub progress_bytes: u64,
    /// What its work found.
    pub findings: FindingCounts,
}

/// A controller's hold on a partition. Not `Clone`: one owner, one claim.
#[derive(Debug, PartialEq, Eq)]
pub struct Claim {
    /// Partition index.
    pub partition: u32,
    /// First byte of the partition in the data set.
    pub start: u64,
    /// Bytes in the partition.
    pub length: u64,
    /// Where to resume within the partition (progress of an earlier owner).
    pub resume_from: u64,
    /// Whether this claim took over an expired lease.
    pub took_over: bool,
    controller: u8,
    word: u64,
}

impl Claim {
    /// The claim's generation: what [`PartitionView::generation`] shows once
    /// this claim completed the partition.
    pub fn generation(&self) -> u32 {
        unpack(self.word).2
    }
}

/// Errors of the coordination object.
#[derive(Debug, thiserror::Error)]
pub enum CoordinationError {
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
    /// The file exists already (a task is in progress or was left behind).
    #[error("{path} already exists: a task is already coordinated there", path = path.display())]
    Exists {
        /// File.
        path: PathBuf,
    },
    /// The file is not a valid coordination object.
    #[error("{path} is not a valid task coordination file: {problem}", path = path.display())]
    Invalid {
        /// File.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// A spec that cannot be represented.
    #[error("invalid task: {0}")]
    BadSpec(String),
    /// The claim is no longer ours: its lease expired and another controller took
    /// the partition over (or it was already completed).
    #[error("partition {partition} is no longer held by controller {controller}")]
    Lost {
        /// Partition.
        partition: u32,
        /// The controller that thought it held it.
        controller: u8,
    },
}

const STATE_READY: u64 = 0;
const STATE_IN_PROGRESS: u64 = 1;
const STATE_COMPLETE: u64 = 2;

fn pack(state: u64, owner: u8, generation: u32, lease_ms: u32) -> u64 {
    state
        | (u64::from(owner) << 2)
        | (u64::from(generation & 0x00ff_ffff) << 8)
        | (u64::from(lease_ms) << 32)
}

fn unpack(word: u64) -> (u64, u8, u32, u32) {
    (
        word & 0b11,
        ((word >> 2) & 0x3f) as u8,
        ((word >> 8) & 0x00ff_ffff) as u32,
        (word >> 32) as u32,
    )
}

/// A mapped task coordination file.
#[derive(Debug)]
pub struct TaskFile {
    path: PathBuf,
    map: SharedMapping,
    spec: TaskSpec,
    partition_count: u32,
    epoch_ms: u64,
}

fn io<'a>(
    path: &'a Path,
    operation: &'static str,
) -> impl FnOnce(std::io::Error) -> CoordinationError + 'a {
    move |source| CoordinationError::Io {
        path: path.to_path_buf(),
        operation,
        source,
    }
}

impl TaskFile {
    /// Creates the coordination object for `spec` at `path` (which must not exist),
    /// every partition READY. `now_ms` is the current Unix time in ms.
    pub fn create(path: &Path, spec: &TaskSpec, now_ms: u64) -> Result<Self, CoordinationError> {
        if spec.partition_bytes == 0 || spec.data_set_bytes == 0 {
            return Err(CoordinationError::BadSpec(
                "data set and partition sizes must be positive".into(),
            ));
        }
        let count = spec.data_set_bytes.div_ceil(spec.partition_bytes);
        if count > u64::from(MAX_PARTITIONS) {
            return Err(CoordinationError::BadSpec(format!(
                "{count} partitions; at most {MAX_PARTITIONS} (use larger partitions)"
            )));
        }
        if spec.initiator > MAX_CONTROLLER_ID {
            return Err(CoordinationError::BadSpec(format!(
                "controller id {} > {MAX_CONTROLLER_ID}",
                spec.initiator
            )));
        }
        if spec.data_set.len() > DATA_SET_BYTES || spec.data_set.contains('\0') {
            return Err(CoordinationError::BadSpec(format!(
                "data set name longer than {DATA_SET_BYTES} bytes"
            )));
        }
        let mut header = vec![0u8; HEADER_BYTES];
        header[0..8].copy_from_slice(&MAGIC);
        header[8..12].copy_from_slice(&VERSION.to_le_bytes());
        header[12..16].copy_from_slice(&spec.operation.code().to_le_bytes());
        header[16..20].copy_from_slice(&u32::from(spec.repair).to_le_bytes());
        header[20..24].copy_from_slice(&u32::from(spec.initiator).to_le_bytes());
        header[24..28].copy_from_slice(&spec.target_disk.unwrap_or(u32::MAX).to_le_bytes());
        header[28..32].copy_from_slice(&(count as u32).to_le_bytes());
        header[32..40].copy_from_slice(&spec.partition_bytes.to_le_bytes());
        header[40..48].copy_from_slice(&spec.data_set_bytes.to_le_bytes());
        header[48..56].copy_from_slice(&now_ms.to_le_bytes());
        header[56..56 + spec.data_set.len()].copy_from_slice(spec.data_set.as_bytes());
        let crc = crc32fast::hash(&header[0..120]);
        header[120..124].copy_from_slice(&crc.to_le_bytes());

        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|source| match source.kind() {
                std::io::ErrorKind::AlreadyExists => CoordinationError::Exists {
                    path: path.to_path_buf(),
                },
                _ => CoordinationError::Io {
                    path: path.to_path_buf(),
                    operation: "create",
                    source,
                },
            })?;
        let length = (HEADER_BYTES + count as usize * SLOT_BYTES) as u64;
        let written = (|| {
            use std::io::Write;
            file.set_len(length)?;
            // Mapped shared: no hole a store could meet on a full disk.
            crate::live::allocate(&file, length)?;
            (&file).write_all(&header)?;
            file.sync_all()
        })();
        if let Err(source) = written {
            let _ = std::fs::remove_file(path);
            return Err(CoordinationError::Io {
                path: path.to_path_buf(),
                operation: "write",
                source,
            });
        }
        drop(file);
        Self::open(path)
    }

    /// Opens an existing coordination object, validating it.
    pub fn open(path: &Path) -> Result<Self, CoordinationError> {
        let file: File = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io(path, "open"))?;
        let length = file.metadata().map_err(io(path, "stat"))?.len();
        let invalid = |problem: String| CoordinationError::Invalid {
            path: path.to_path_buf(),
            problem,
        };
        if length < HEADER_BYTES as u64 {
            return Err(invalid(format!(
                "{length} bytes, shorter than the {HEADER_BYTES}-byte header"
            )));
        }
        let map = SharedMapping::map_writable(&file, length).map_err(io(path, "map"))?;
        let mut header = vec![0u8; 128];
        map.read_into(0, &mut header);
        if header[0..8] != MAGIC {
            return Err(invalid("bad magic".into()));
        }
        let u32_at = |at: usize| {
            u32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
        };
        let u64_at = |at: usize| {
            let mut raw = [0u8; 8];
            raw.copy_from_slice(&header[at..at + 8]);
            u64::from_le_bytes(raw)
        };
        if u32_at(8) != VERSION {
            return Err(invalid(format!("unknown version {}", u32_at(8))));
        }
        let computed = crc32fast::hash(&header[0..120]);
        if u32_at(120) != computed {
            return Err(invalid(format!(
                "header checksum {:#010x} != {computed:#010x}",
                u32_at(120)
            )));
        }
        let operation = Operation::from_code(u32_at(12))
            .ok_or_else(|| invalid(format!("unknown operation {}", u32_at(12))))?;
        let partition_count = u32_at(28);
        let partition_bytes = u64_at(32);
        let data_set_bytes = u64_at(40);
        let expected = HEADER_BYTES as u64 + u64::from(partition_count) * SLOT_BYTES as u64;
        if partition_count == 0
            || partition_count > MAX_PARTITIONS
            || partition_bytes == 0
            || data_set_bytes.div_ceil(partition_bytes) != u64::from(partition_count)
        {
            return Err(invalid("partition geometry does not add up".into()));
        }
        if length != expected {
            return Err(invalid(format!(
                "{length} bytes, expected {expected} (truncated?)"
            )));
        }
        let name_end = header[56..120]
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(DATA_SET_BYTES);
        let data_set = String::from_utf8(header[56..56 + name_end].to_vec())
            .map_err(|_| invalid("data set name is not UTF-8".into()))?;
        let target = u32_at(24);
        let initiator = u32_at(20);
        if initiator > u32::from(MAX_CONTROLLER_ID) {
            return Err(invalid(format!("initiator {initiator} out of range")));
        }
        let spec = TaskSpec {
            operation,
            data_set,
            target_disk: (target != u32::MAX).then_some(target),
            data_set_bytes,
            partition_bytes,
            initiator: initiator as u8,
            repair: u32_at(16) & 1 != 0,
        };
        Ok(Self {
            path: path.to_path_buf(),
            map,
            spec,
            partition_count,
            epoch_ms: u64_at(48),
        })
    }

    /// The task.
    pub fn spec(&self) -> &TaskSpec {
        &self.spec
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of partitions.
    pub fn partition_count(&self) -> u32 {
        self.partition_count
    }

    fn slot(&self, index: u32) -> usize {
        assert!(
            index < self.partition_count,
            "partition {index} out of range"
        );
        HEADER_BYTES + index as usize * SLOT_BYTES
    }

    fn range(&self, index: u32) -> (u64, u64) {
        let start = u64::from(index) * self.spec.partition_bytes;
        (
            start,
            self.spec
                .partition_bytes
                .min(self.spec.data_set_bytes - start),
        )
    }

    /// Lease deadline `lease_ms` from `now_ms`, as stored (ms after the epoch,
    /// saturating).
    fn deadline(&self, now_ms: u64, lease_ms: u64) -> u32 {
        (now_ms
            .saturating_add(lease_ms)
            .saturating_sub(self.epoch_ms))
        .min(u64::from(u32::MAX)) as u32
    }

    fn expired(&self, lease: u32, now_ms: u64) -> bool {
        self.epoch_ms + u64::from(lease) <= now_ms
    }

    /// A snapshot of partition `index`.
    pub fn partition(&self, index: u32) -> PartitionView {
        let slot = self.slot(index);
        let (state, owner, generation, lease) = unpack(self.map.load_u64_le(slot));
        let (start, length) = self.range(index);
        PartitionView {
            index,
            state: match state {
                STATE_READY => PartitionState::Ready,
                STATE_IN_PROGRESS => PartitionState::InProgress,
                _ => PartitionState::Complete,
            },
            owner: (state != STATE_READY).then_some(owner),
            generation,
            lease_deadline_ms: self.epoch_ms + u64::from(lease),
            start,
            length,
            progress_bytes: self.map.load_u64_le(slot + 8).min(length),
            findings: FindingCounts {
                checked: self.map.load_u64_le(slot + 16),
                errors: self.map.load_u64_le(slot + 24),
                repaired: self.map.load_u64_le(slot + 32),
                unrecoverable: self.map.load_u64_le(slot + 40),
            },
        }
    }

    /// Every partition.
    pub fn partitions(&self) -> Vec<PartitionView> {
        (0..self.partition_count)
            .map(|i| self.partition(i))
            .collect()
    }

    /// A free controller selects work: the first READY partition, or failing
    /// that, the first IN PROGRESS one whose lease has expired (its owner died).
    /// The claim is a compare-and-swap on the partition's state word, so two
    /// controllers racing for one partition get it once between them.
    pub fn claim_next(&self, controller: u8, now_ms: u64, lease_ms: u64) -> Option<Claim> {
        assert!(
            controller <= MAX_CONTROLLER_ID,
            "controller id {controller} out of range"
        );
        let deadline = self.deadline(now_ms, lease_ms);
        for take_over in [false, true] {
            for index in 0..self.partition_count {
                let slot = self.slot(index);
                let mut current = self.map.load_u64_le(slot);
                loop {
                    let (state, _, generation, lease) = unpack(current);
                    let eligible = match state {
                        STATE_READY => !take_over,
                        STATE_IN_PROGRESS => take_over && self.expired(lease, now_ms),
                        _ => false,
                    };
                    if !eligible {
                        break;
                    }
                    let word = pack(
                        STATE_IN_PROGRESS,
                        controller,
                        generation.wrapping_add(1),
                        deadline,
                    );
                    match self.map.compare_exchange_u64_le(slot, current, word) {
                        Ok(_) => {
                            let (start, length) = self.range(index);
                            return Some(Claim {
                                partition: index,
                                start,
                                length,
                                resume_from: self.map.load_u64_le(slot + 8).min(length),
                                took_over: take_over,
                                controller,
                                word,
                            });
                        }
                        // Someone changed it first: look again at what is there now.
                        Err(found) => current = found,
                    }
                }
            }
        }
        None
    }

    fn check_held(&self, claim: &Claim) -> Result<(), CoordinationError> {
        if self.map.load_u64_le(self.slot(claim.partition)) == claim.word {
            Ok(())
        } else {
            Err(CoordinationError::Lost {
                partition: claim.partition,
                controller: claim.controller,
            })
        }
    }

    /// Records progress and extends the lease. `Err(Lost)` means another
    /// controller took the partition over: stop working on it.
    pub fn renew(
        &self,
        claim: &mut Claim,
        progress_bytes: u64,
        now_ms: u64,
        lease_ms: u64,
    ) -> Result<(), CoordinationError> {
        let slot = self.slot(claim.partition);
        self.check_held(claim)?;
        self.map
            .store_u64_le(slot + 8, progress_bytes.min(claim.length));
        let (_, owner, generation, _) = unpack(claim.word);
        let renewed = pack(
            STATE_IN_PROGRESS,
            owner,
            generation,
            self.deadline(now_ms, lease_ms),
        );
        match self.map.compare_exchange_u64_le(slot, claim.word, renewed) {
            Ok(_) => {
                claim.word = renewed;
                Ok(())
            }
            Err(_) => Err(CoordinationError::Lost {
                partition: claim.partition,
                controller: claim.controller,
            }),
        }
    }

    /// Marks the partition COMPLETE with what its work found.
    pub fn complete(&self, claim: Claim, findings: FindingCounts) -> Result<(), CoordinationError> {
        let slot = self.slot(claim.partition);
        self.check_held(&claim)?;
        self.map.store_u64_le(slot + 8, claim.length);
        self.map.store_u64_le(slot + 16, findings.checked);
        self.map.store_u64_le(slot + 24, findings.errors);
        self.map.store_u64_le(slot + 32, findings.repaired);
        self.map.store_u64_le(slot + 40, findings.unrecoverable);
        let (_, owner, generation, lease) = unpack(claim.word);
        self.map
            .compare_exchange_u64_le(
                slot,
                claim.word,
                pack(STATE_COMPLETE, owner, generation, lease),
            )
            .map(|_| ())
            .map_err(|_| CoordinationError::Lost {
                partition: claim.partition,
                controller: claim.controller,
            })
    }

    /// Gives a partition back (pause, cancel, shutdown): READY again, resumable
    /// from `progress_bytes`.
    pub fn release(&self, claim: Claim, progress_bytes: u64) -> Result<(), CoordinationError> {
        let slot = self.slot(claim.partition);
        self.check_held(&claim)?;
        self.map
            .store_u64_le(slot + 8, progress_bytes.min(claim.length));
        let (_, owner, generation, _) = unpack(claim.word);
        self.map
            .compare_exchange_u64_le(slot, claim.word, pack(STATE_READY, owner, generation, 0))
            .map(|_| ())
            .map_err(|_| CoordinationError::Lost {
                partition: claim.partition,
                controller: claim.controller,
            })
    }

    /// Whether every partition is COMPLETE.
    pub fn all_complete(&self) -> bool {
        (0..self.partition_count)
            .all(|i| unpack(self.map.load_u64_le(self.slot(i))).0 == STATE_COMPLETE)
    }

    /// The initiator's notification (claim 10): `true` exactly once, to the
    /// first caller after every partition is COMPLETE, who must then run the
    /// completion actions and call [`Self::finish_completion`].
    pub fn begin_completion(&self, controller: u8) -> bool {
        self.begin_completion_with_deadline(controller, COMPLETION_NEVER_EXPIRES, 0)
    }

    /// [`Self::begin_completion`] with a lease: a completion begun by a process
    /// that died (or failed, see [`Self::abort_completion`]) before finishing
    /// is taken over once `lease_ms` after it began has passed. The completion
    /// actions must therefore be safe to run again.
    pub fn begin_completion_leased(&self, controller: u8, now_ms: u64, lease_ms: u64) -> bool {
        let now = now_ms.saturating_sub(self.created_ms());
        let deadline = now.saturating_add(lease_ms).min(COMPLETION_NEVER_EXPIRES);
        self.begin_completion_with_deadline(controller, deadline, now)
    }

    fn begin_completion_with_deadline(&self, controller: u8, deadline: u64, now: u64) -> bool {
        let running = 1 | (u64::from(controller) << 8) | (deadline << 16);
        loop {
            if !self.all_complete() {
                return false;
            }
            let word = self.map.load_u64_le(COMPLETION_OFFSET);
            let free = match word & 0xff {
                0 => true,
                1 => (word >> 16) < now,
                _ => false,
            };
            if !free {
                return false;
            }
            if self
                .map
                .compare_exchange_u64_le(COMPLETION_OFFSET, word, running)
                .is_ok()
            {
                return true;
            }
        }
    }

    /// The completion actions failed: another caller of
    /// [`Self::begin_completion_leased`] may run them again.
    pub fn abort_completion(&self) {
        self.map.store_u64_le(COMPLETION_OFFSET, 0);
    }

    /// Records that the completion actions are done.
    pub fn finish_completion(&self) {
        self.map.store_u64_le(COMPLETION_OFFSET, 2);
    }

    /// Whether the completion actions have run.
    pub fn completion_done(&self) -> bool {
        self.map.load_u64_le(COMPLETION_OFFSET) == 2
    }

    /// Sum of every partition's findings.
    pub fn findings(&self) -> FindingCounts {
        self.partitions()
            .iter()
            .fold(FindingCounts::default(), |sum, p| FindingCounts {
                checked: sum.checked + p.findings.checked,
                errors: sum.errors + p.findings.errors,
                repaired: sum.repaired + p.findings.repaired,
                unrecoverable: sum.unrecoverable + p.findings.unrecoverable,
            })
    }

    /// What an operator asked the task to do.
    pub fn control(&self) -> Control {
        match self.map.load_u64_le(CONTROL_OFFSET) {
            1 => Control::Pause,
            2 => Control::Cancel,
            _ => Control::Run,
        }
    }

    /// Asks every controller to run, pause or cancel (a cancel is final).
    pub fn set_control(&self, control: Control) {
        let code = match control {
            Control::Run => 0,
            Control::Pause => 1,
            Control::Cancel => 2,
        };
        let mut current = self.map.load_u64_le(CONTROL_OFFSET);
        while current != 2 {
            match self
                .map
                .compare_exchange_u64_le(CONTROL_OFFSET, current, code)
            {
                Ok(_) => return,
                Err(found) => current = found,
            }
        }
    }

    /// The total rate limit in KiB/s (`None`: unlimited).
    pub fn rate_kib_s(&self) -> Option<u64> {
        Some(self.map.load_u64_le(RATE_OFFSET)).filter(|&r| r != 0)
    }

    /// Sets the total rate limit; running controllers follow it from their next
    /// step.
    pub fn set_rate_kib_s(&self, rate: Option<u64>) {
        self.map.store_u64_le(RATE_OFFSET, rate.unwrap_or(0));
    }

    /// Controllers the rate limit is shared by.
    pub fn controllers(&self) -> u64 {
        self.map.load_u64_le(CONTROLLERS_OFFSET).max(1)
    }

    /// Records how many controllers share the rate limit.
    pub fn set_controllers(&self, controllers: u64) {
        self.map
            .store_u64_le(CONTROLLERS_OFFSET, controllers.max(1));
    }

    /// When the task was created (Unix ms).
    pub fn created_ms(&self) -> u64 {
        self.epoch_ms
    }

    /// Bytes of the data set done so far.
    pub fn bytes_done(&self) -> u64 {
        self.partitions()
            .iter()
            .map(|p| {
                if p.state == PartitionState::Complete {
                    p.length
                } else {
                    p.progress_bytes
                }
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_word_round_trips() {
        for (state, owner, generation, lease) in [
            (0, 0, 0, 0),
            (1, 63, 0x00ff_ffff, u32::MAX),
            (2, 7, 12345, 99),
        ] {
            assert_eq!(
                unpack(pack(state, owner, generation, lease)),
                (state, owner, generation, lease)
            );
        }
    }
}
