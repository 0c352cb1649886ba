//! The RAID engine: RAID-1 (n-way mirror), RAID-5 (rotating parity) and RAID-6
//! (rotating P and Q) over [`DiskImage`]s, in one process.
//!
//! [`RaidEngine`] turns array offsets into member I/O. It keeps redundancy for
//! whatever members survive, reconstructs the data of a failed member (or of a
//! block whose CRC does not match, which `disk-images` reports as a media error)
//! from the others, and rewrites such a block with the reconstructed bytes. With
//! one failure too many (every member of a mirror, two members of a RAID-5,
//! three of a RAID-6) the
//! array is failed: every read and write returns [`RaidError::ArrayFailed`] without
//! touching the members, so nothing on the survivors is destroyed and no garbage
//! is ever returned.
//!
//! Member states live in memory here; persisting them (array metadata) is the
//! caller's job.
//!
//! # RAID-5 layout: left-symmetric
//!
//! The array's data is cut into *chunks* of `chunk_bytes`. Stripe `s` holds
//! `disks - 1` data chunks and one parity chunk, each at member offset
//! `s * chunk_bytes`. The parity chunk of stripe `s` is on disk
//! `p(s) = disks - 1 - s % disks`, and data chunk `k` of the stripe is on disk
//! `(p(s) + 1 + k) % disks`, so consecutive chunks rotate across the disks
//! (Linux md's default). Four disks, `Dn` = data chunk `n` of the array:
//!
//! | stripe | disk 0 | disk 1 | disk 2 | disk 3 |
//! |-------:|:------:|:------:|:------:|:------:|
//! | 0      | D0     | D1     | D2     | P      |
//! | 1      | D4     | D5     | P      | D3     |
//! | 2      | D8     | P      | D6     | D7     |
//! | 3      | P      | D9     | D10    | D11    |
//! | 4      | D12    | D13    | D14    | P      |
//!
//! Parity is the XOR of the stripe's data chunks: the XOR of all `disks` chunks of
//! a stripe is zero, so any one chunk is the XOR of the others.
//!
//! # RAID-6 layout: left-symmetric, P then Q
//!
//! As RAID-5 with two parity chunks per stripe (Linux md's RAID-6 default):
//! P on disk `p(s) = disks - 1 - s % disks`, Q on the next disk
//! `(p(s) + 1) % disks`, data chunk `k` on `(p(s) + 2 + k) % disks`. Five
//! disks:
//!
//! | stripe | disk 0 | disk 1 | disk 2 | disk 3 | disk 4 |
//! |-------:|:------:|:------:|:------:|:------:|:------:|
//! | 0      | Q      | D0     | D1     | D2     | P      |
//! | 1      | D3     | D4     | D5     | P      | Q      |
//! | 2      | D7     | D8     | P      | Q      | D6     |
//! | 3      | D11    | P      | Q      | D9     | D10    |
//!
//! P is the XOR of the data, Q their Reed-Solomon syndrome over GF(2^8)
//! ([`crate::pq`]); any two chunks of a stripe follow from the others. Writes
//! compute P and Q from the whole stripe's data (the chunks a write does not
//! change are read), never by read-modify-write.
//!
//! RAID-1: every member holds the same bytes at the same offsets; reads go to the
//! first active member, and to the next ones only for blocks that fail their CRC.
//!
//! # Concurrency
//!
//! A table of 1024 reader-writer locks (`LOCK_STRIPES`): stripe `s` (for RAID-1:
//! region `offset / chunk_bytes`) is guarded by lock `s % 1024`. A write holds its
//! stripe's lock exclusively while it reads old data/parity and writes new data
//! and parity, one stripe at a time, so concurrent writers in one process never
//! leave parity inconsistent. Reads hold the lock shared (a reconstruction sees a
//! consistent stripe); a read that meets a media error retries under the exclusive
//! lock, which is where blocks are repaired (so a block is repaired once).
//!
//! All member writes are of whole, aligned 4 KiB blocks: an unaligned array write
//! first reads the edge blocks (recovering them if needed). A whole-block write is
//! what heals a block with a bad CRC, and it never trips over one.
//!
//! Work is done in pieces of at most 128 KiB (`WORK_BYTES`) per buffer, whatever
//! the chunk size or I/O size.

use std::borrow::Cow;
use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use disk_images::{DiskImage, ImageError, BLOCK_BYTES};

use crate::member::Member;

use crate::journal::{Journal, JOURNAL_FILE};
use crate::live::Live;
use crate::pq::{self, Role};
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};

/// The checksummed block size of the members, as a `u64`.
const BLOCK: u64 = BLOCK_BYTES as u64;
/// Smallest chunk size.
const MIN_CHUNK: u64 = 4096;
/// Largest chunk size.
const MAX_CHUNK: u64 = 16 << 20;
/// Number of stripe locks; stripe `s` is guarded by lock `s % LOCK_STRIPES`.
const LOCK_STRIPES: usize = crate::live::LOCKS;
/// Largest buffer one step of a read reconstruction or a write works with.
const WORK_BYTES: u64 = 128 * 1024;
/// Largest zero buffer [`RaidEngine::write_zeroes`] writes from.
const ZERO_BYTES: u64 = 1 << 20;

/// RAID level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// N-way mirror.
    Raid1,
    /// Striping with one rotating parity chunk per stripe (left-symmetric).
    Raid5,
    /// Striping with two rotating parity chunks per stripe, P and Q
    /// (left-symmetric, see [`crate::pq`]).
    Raid6,
}

/// State of one member disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberState {
    /// In service: read and written.
    Active,
    /// Out of service: never read or written; its data is reconstructed.
    Failed,
    /// A replacement being rebuilt: written like an active member, never read
    /// (its data is reconstructed) until the rebuild completes.
    Rebuilding,
}

/// State of the array as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ArrayState {
    /// Every member active.
    Optimal,
    /// Some member failed, but every byte is still available.
    Degraded,
    /// Too many members failed: I/O is refused.
    Failed,
}

/// Shape of an array.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Geometry {
    /// RAID level.
    pub level: Level,
    /// Number of member disks.
    pub disks: usize,
    /// Chunk size in bytes (RAID-5 striping unit; RAID-1 locking unit).
    pub chunk_bytes: u64,
    /// Bytes used on each member, from offset 0.
    pub disk_bytes: u64,
}

impl Geometry {
    /// Checks the geometry: RAID-1 needs at least 2 disks, RAID-5 at least 3,
    /// RAID-6 at least 4; the
    /// chunk is a power of two from 4 KiB to 16 MiB; `disk_bytes` is a positive
    /// multiple of the chunk; the data size fits in a `u64`.
    pub fn validate(&self) -> Result<(), RaidError> {
        let invalid = |why: String| Err(RaidError::InvalidGeometry(why));
        let min_disks = match self.level {
            Level::Raid1 => 2,
            Level::Raid5 => 3,
            Level::Raid6 => 4,
        };
        if self.disks < min_disks {
            return invalid(format!(
                "{} needs at least {min_disks} disks, got {}",
                self.level.name(),
                self.disks
            ));
        }
        if !self.chunk_bytes.is_power_of_two()
            || !(MIN_CHUNK..=MAX_CHUNK).contains(&self.chunk_bytes)
        {
            return invalid(format!(
                "chunk size {} bytes must be a power of two from 4 KiB to 16 MiB",
                self.chunk_bytes
            ));
        }
        if self.disk_bytes == 0 || !self.disk_bytes.is_multiple_of(self.chunk_bytes) {
            return invalid(format!(
                "disk size {} bytes must be a positive multiple of the chunk size ({} bytes)",
                self.disk_bytes, self.chunk_bytes
            ));
        }
        if (self.disks as u64 - 1)
            .checked_mul(self.disk_bytes)
            .is_none()
        {
            return invalid(format!(
                "{} disks of {} bytes are too large an array",
                self.disks, self.disk_bytes
            ));
        }
        Ok(())
    }

    /// Bytes of data the array holds: RAID-1 `disk_bytes`, RAID-5
    /// `(disks - 1) * disk_bytes`, RAID-6 `(disks - 2) * disk_bytes`.
    pub fn data_bytes(&self) -> u64 {
        match self.level {
            Level::Raid1 => self.disk_bytes,
            Level::Raid5 | Level::Raid6 => self.data_disks() as u64 * self.disk_bytes,
        }
    }

    /// Parity chunks per stripe: 0 (RAID-1), 1 (RAID-5), 2 (RAID-6).
    pub fn parity_chunks(&self) -> usize {
        match self.level {
            Level::Raid1 => 0,
            Level::Raid5 => 1,
            Level::Raid6 => 2,
        }
    }

    /// RAID-5/6: data chunks per stripe.
    pub fn data_disks(&self) -> usize {
        self.disks.saturating_sub(self.parity_chunks())
    }

    /// RAID-5/6: the disk holding stripe `stripe`'s parity (RAID-6: P).
    pub fn parity_disk(&self, stripe: u64) -> usize {
        self.disks - 1 - (stripe % self.disks as u64) as usize
    }

    /// RAID-6: the disk holding stripe `stripe`'s Q, just after P's.
    pub fn q_disk(&self, stripe: u64) -> Option<usize> {
        (self.level == Level::Raid6).then(|| (self.parity_disk(stripe) + 1) % self.disks)
    }

    /// RAID-5/6: the disk holding data chunk `k` of stripe `stripe`.
    pub fn data_disk(&self, stripe: u64, k: usize) -> usize {
        (self.parity_disk(stripe) + self.parity_chunks() + k) % self.disks
    }

    /// RAID-5/6: which data chunk of stripe `stripe` disk `disk` holds (`None`:
    /// a parity chunk).
    pub fn data_index(&self, stripe: u64, disk: usize) -> Option<usize> {
        let first = self.parity_disk(stripe) + self.parity_chunks();
        let k = (disk + 2 * self.disks - first) % self.disks;
        (k < self.data_disks()).then_some(k)
    }

    /// RAID-6: the role of disk `disk` in stripe `stripe`.
    pub fn role(&self, stripe: u64, disk: usize) -> crate::pq::Role {
        match self.data_index(stripe, disk) {
            Some(k) => crate::pq::Role::Data(k),
            None if disk == self.parity_disk(stripe) => crate::pq::Role::P,
            None => crate::pq::Role::Q,
        }
    }

    /// Data bytes of one RAID-5/6 stripe.
    pub fn row_bytes(&self) -> u64 {
        self.data_disks() as u64 * self.chunk_bytes
    }
}

impl Level {
    fn name(self) -> &'static str {
        match self {
            Level::Raid1 => "raid1",
            Level::Raid5 => "raid5",
            Level::Raid6 => "raid6",
        }
    }
}

/// Everything that can go wrong with array I/O.
#[derive(Debug, thiserror::Error)]
pub enum RaidError {
    /// The geometry is unusable.
    #[error("invalid array geometry: {0}")]
    InvalidGeometry(String),
    /// An access beyond the end of the array.
    #[error("range {offset}+{length} is outside the array ({size} bytes)")]
    OutOfRange {
        /// Start of the access.
        offset: u64,
        /// Its length.
        length: u64,
        /// Array data size.
        size: u64,
    },
    /// Too many members failed: I/O is refused.
    #[error("the array has failed (too many members failed): I/O refused")]
    ArrayFailed,
    /// Data that failed its checksum with no redundancy left to rebuild it from.
    #[error("unrecoverable media error at array offset {offset}: {detail}")]
    Unrecoverable {
        /// Array offset of the lost block (for a lost RAID-5 parity block: the
        /// offset of the first data chunk of its stripe at the same position).
        offset: u64,
        /// What was found.
        detail: String,
    },
    /// A member's I/O failed (other than a media error, which is recovered).
    #[error("member {index}: {source}")]
    Member {
        /// Member index.
        index: usize,
        /// The image error.
        source: ImageError,
    },
    /// Members that do not fit the geometry, or a member index out of range.
    #[error("bad member: {0}")]
    BadMember(String),
    /// The array's configuration could not be (re)loaded.
    #[error("array configuration: {0}")]
    Config(String),
}

/// Optimal, Degraded or Failed for members in `states` (RAID-5: 2 or more
/// members not active; RAID-6: 3 or more; RAID-1: no member active). A member
/// being rebuilt does not count as redundancy yet.
pub fn array_state(geometry: Geometry, states: &[MemberState]) -> ArrayState {
    let count = states.iter().filter(|s| **s != MemberState::Active).count();
    let tolerated = match geometry.level {
        Level::Raid1 => geometry.disks - 1,
        Level::Raid5 | Level::Raid6 => geometry.parity_chunks(),
    };
    match count {
        0 => ArrayState::Optimal,
        n if n <= tolerated => ArrayState::Degraded,
        _ => ArrayState::Failed,
    }
}

/// A failed read or write of the degraded-write journal.
fn journal_error(journal: &Journal, err: std::io::Error) -> RaidError {
    RaidError::Config(format!("{}: {err}", journal.path().display()))
}

/// Internal outcome of one stripe step.
enum Fault {
    /// A media error was met under the shared lock: redo under the exclusive one.
    NeedExclusive,
    /// A real error.
    Raid(RaidError),
}

impl From<RaidError> for Fault {
    fn from(err: RaidError) -> Self {
        Fault::Raid(err)
    }
}

type StepResult<T> = Result<T, Fault>;

/// The members as one I/O sees them: images and states, sampled under the
/// stripe lock. Replaced as a whole when the configuration changes.
#[derive(Debug, Clone)]
pub struct View {
    /// Member disks, in disk order.
    pub images: Vec<Arc<dyn Member>>,
    /// Member states, in disk order.
    pub states: Vec<MemberState>,
    /// The live-state generation this view was loaded at.
    generation: u64,
}

impl View {
    /// Whether member `index` may be read (it is active).
    pub fn readable(&self, index: usize) -> bool {
        self.states[index] == MemberState::Active
    }

    /// Whether member `index` is written (active, or being rebuilt).
    pub fn writable(&self, index: usize) -> bool {
        self.states[index] != MemberState::Failed
    }

    fn first_readable(&self) -> Option<usize> {
        (0..self.states.len()).find(|&i| self.readable(i))
    }
}

/// Loads the current member images and states (from the array's metadata) when
/// another process changed them.
pub type ViewSource =
    Box<dyn Fn() -> Result<(Vec<Arc<dyn Member>>, Vec<MemberState>), RaidError> + Send + Sync>;

/// Records member `index` failed for every process that has the array open
/// (what `Array::fail` does). Called by the engine with no stripe lock held,
/// after a member failed a write (see [`RaidEngine::fail_members_with`]).
pub type MemberFailer = Box<dyn Fn(&RaidEngine, usize) -> Result<(), RaidError> + Send + Sync>;

/// Whether a member write that failed with `err` fails the member (md's rule:
/// a disk that cannot store a write is out of the array). Not a full host file
/// system (ENOSPC: the disk is fine, there is no room for its file to grow;
/// arrays reserve before writing, so it stores nothing anywhere), and not a
/// range or mode the caller got wrong.
fn fails_member(err: &ImageError) -> bool {
    match err {
        ImageError::Io { source, .. } => {
            source.raw_os_error() != Some(nix::errno::Errno::ENOSPC as i32)
                && source.kind() != std::io::ErrorKind::StorageFull
        }
        ImageError::Media(_) => true,
        _ => false,
    }
}

/// The cross-process side: live state shared with the other processes that have
/// the array open, and where to reload the configuration from.
struct Shared {
    live: Live,
    source: ViewSource,
}

/// RAID-1/RAID-5 over shared [`DiskImage`]s. `Send + Sync`: share it in an `Arc`.
pub struct RaidEngine {
    geometry: Geometry,
    view: RwLock<Arc<View>>,
    shared: Option<Shared>,
    /// The degraded-write journal of a shared engine (see [`crate::journal`]).
    journal: Option<Journal>,
    locks: Box<[RwLock<()>]>,
    repaired: AtomicU64,
    /// Records a member that failed a write failed for every process.
    failer: Option<MemberFailer>,
    /// Members that failed a write, failed in this engine's view under the
    /// stripe lock and recorded through `failer` once no lock is held.
    broken: parking_lot::Mutex<Vec<usize>>,
}

impl fmt::Debug for RaidEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let view = self.view.read().clone();
        f.debug_struct("RaidEngine")
            .field("geometry", &self.geometry)
            .field(
                "members",
                &view.images.iter().map(|m| m.path()).collect::<Vec<_>>(),
            )
            .field("states", &view.states)
            .field("repaired_blocks", &self.repaired_blocks())
            .field("live", &self.shared.as_ref().map(|s| s.live.path()))
            .finish()
    }
}

fn align_down(x: u64) -> u64 {
    x - x % BLOCK
}

fn align_up(x: u64) -> u64 {
    x.div_ceil(BLOCK) * BLOCK
}

/// `dst ^= src`, in a form the compiler vectorises.
pub(crate) fn xor_into(dst: &mut [u8], src: &[u8]) {
    assert_eq!(dst.len(), src.len(), "xor of unequal lengths");
    for (d, s) in dst.iter_mut().zip(src) {
        *d ^= *s;
    }
}

/// A data chunk a RAID-5 write segment touches: its disk and its new bytes.
struct Touched<'a> {
    disk: usize,
    new: Cow<'a, [u8]>,
    /// The old bytes, when they had to be read to build `new`.
    old: Option<Vec<u8>>,
}

/// A stripe lock held by this process: the in-process lock and, for an engine
/// with live state, the cross-process one. Released on drop.
pub struct StripeGuard<'a> {
    engine: &'a RaidEngine,
    lock: usize,
    exclusive: bool,
    _local: LocalGuard<'a>,
}

enum LocalGuard<'a> {
    Shared(#[allow(dead_code)] parking_lot::RwLockReadGuard<'a, ()>),
    Exclusive(#[allow(dead_code)] parking_lot::RwLockWriteGuard<'a, ()>),
}

impl fmt::Debug for StripeGuard<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StripeGuard")
            .field("lock", &self.lock)
            .field("exclusive", &self.exclusive)
            .finish()
    }
}

impl Drop for StripeGuard<'_> {
    fn drop(&mut self) {
        // The cross-process hold goes first, then (field drop) the local one.
        if let Some(shared) = &self.engine.shared {
            if self.exclusive {
                shared.live.unlock_exclusive(self.lock);
            } else {
                shared.live.unlock_shared(self.lock);
            }
        }
    }
}

impl RaidEngine {
    /// An engine over `members` (in disk order) with the given states, private to
    /// this process. Checks the geometry, the counts, and that every member is at
    /// least `disk_bytes` long.
    pub fn new(
        geometry: Geometry,
        members: Vec<Arc<DiskImage>>,
        states: Vec<MemberState>,
    ) -> Result<Self, RaidError> {
        let members = members
            .into_iter()
            .map(|image| image as Arc<dyn Member>)
            .collect();
        Self::over(geometry, members, states)
    }

    /// Like [`Self::new`], over any [`Member`]s (fault layers, say).
    pub fn over(
        geometry: Geometry,
        members: Vec<Arc<dyn Member>>,
        states: Vec<MemberState>,
    ) -> Result<Self, RaidError> {
        geometry.validate()?;
        Self::check_members(&geometry, &members, &states)?;
        Ok(Self {
            geometry,
            view: RwLock::new(Arc::new(View {
                images: members,
                states,
                generation: 0,
            })),
            shared: None,
            journal: None,
            locks: (0..LOCK_STRIPES).map(|_| RwLock::new(())).collect(),
            repaired: AtomicU64::new(0),
            failer: None,
            broken: parking_lot::Mutex::new(Vec::new()),
        })
    }

    /// An engine shared with other processes through `live`: member states and
    /// images come from `source` (re-read whenever the live generation moves),
    /// and stripe locks are held across processes. First recovers the slot of
    /// any process that died with the array open (resyncing the stripes it was
    /// writing), then registers this process.
    pub fn shared(
        geometry: Geometry,
        mut live: Live,
        source: ViewSource,
    ) -> Result<Self, RaidError> {
        geometry.validate()?;
        let generation = live.generation();
        let (images, states) = source()?;
        Self::check_members(&geometry, &images, &states)?;
        // Recovery runs before this process takes a slot or a lock: the dead
        // holder's locks keep everyone else off the stripes being resynced.
        let mut engine = Self::over(geometry, images, states)?;
        Arc::make_mut(engine.view.get_mut()).generation = generation;
        let dir = live.path().parent().unwrap_or(Path::new("."));
        engine.journal = Some(Journal::open(dir).map_err(|err| {
            RaidError::Config(format!(
                "cannot open {}: {err}",
                dir.join(JOURNAL_FILE).display()
            ))
        })?);
        live.recover_dead(&|stripe| engine.resync_stripe(stripe));
        live.register()
            .map_err(|err| RaidError::Config(err.to_string()))?;
        engine.shared = Some(Shared { live, source });
        engine.resync_after_power_loss();
        Ok(engine)
    }

    fn check_members(
        geometry: &Geometry,
        members: &[Arc<dyn Member>],
        states: &[MemberState],
    ) -> Result<(), RaidError> {
        if members.len() != geometry.disks {
            return Err(RaidError::BadMember(format!(
                "the geometry has {} disks but {} member images were given",
                geometry.disks,
                members.len()
            )));
        }
        if states.len() != geometry.disks {
            return Err(RaidError::BadMember(format!(
                "the geometry has {} disks but {} member states were given",
                geometry.disks,
                states.len()
            )));
        }
        for (index, member) in members.iter().enumerate() {
            if member.size() < geometry.disk_bytes {
                return Err(RaidError::BadMember(format!(
                    "member {index} ({}) is {} bytes, smaller than the array's disk size {}",
                    member.path().display(),
                    member.size(),
                    geometry.disk_bytes
                )));
            }
        }
        Ok(())
    }

    /// The array's geometry.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// Gives the degraded-write journal the array's fault layer, for its
    /// crash points (see [`crate::journal`]).
    pub fn journal_faults(&mut self, faults: Arc<crate::faults::FaultLayer>) {
        self.journal = self
            .journal
            .take()
            .map(|journal| journal.with_faults(faults));
    }

    /// How a member that fails a write is recorded failed for every process
    /// (without one, it is failed in this engine's view only).
    pub fn fail_members_with(&mut self, failer: MemberFailer) {
        self.failer = Some(failer);
    }

    /// The live state, for an engine shared with other processes.
    pub fn live(&self) -> Option<&Live> {
        self.shared.as_ref().map(|s| &s.live)
    }

    /// Recovers every process that died with the array open (resyncing the
    /// stripes it was writing), waiting for a recovery another process runs:
    /// on return no dead process holds a stripe. What a controller taking over
    /// a dead partner's volumes does before it serves them. Nothing for an
    /// engine not shared with other processes.
    pub fn recover_dead_processes(&self) {
        if let Some(live) = self.live() {
            live.recover_all_dead(&|stripe| self.resync_stripe(stripe));
        }
    }

    /// Marks member `index` failed in this engine's view: it is no longer read or
    /// written. (For an array on disk, `Array::fail` records it for every process.)
    pub fn fail_member(&self, index: usize) -> Result<(), RaidError> {
        self.set_member_state(index, MemberState::Failed)
    }

    /// Sets member `index`'s state in this engine's view.
    pub fn set_member_state(&self, index: usize, state: MemberState) -> Result<(), RaidError> {
        let mut view = self.view.write();
        if index >= view.states.len() {
            return Err(RaidError::BadMember(format!(
                "disk index {index} is out of range (the array has {} members)",
                self.geometry.disks
            )));
        }
        Arc::make_mut(&mut view).states[index] = state;
        Ok(())
    }

    /// The current view of the members (reloaded first if the configuration
    /// changed in another process). A member that does not answer (see
    /// [`Member::present`]) is failed in it, whatever the configuration says.
    pub fn view(&self) -> Result<Arc<View>, RaidError> {
        loop {
            let configured = self.configured_view()?;
            let absent: Vec<usize> = (0..configured.images.len())
                .filter(|&i| {
                    configured.states[i] != MemberState::Failed && !configured.images[i].present()
                })
                .collect();
            if absent.is_empty() {
                return Ok(configured);
            }
            // Looked at under this configuration: one that changed meanwhile
            // (a disk recorded failed before it answers again) is looked at
            // anew, so a disk that comes back is never taken as it was.
            if self
                .shared
                .as_ref()
                .is_some_and(|shared| shared.live.generation() != configured.generation)
            {
                continue;
            }
            let mut view = (*configured).clone();
            for index in absent {
                view.states[index] = MemberState::Failed;
            }
            return Ok(Arc::new(view));
        }
    }

    fn configured_view(&self) -> Result<Arc<View>, RaidError> {
        let current = self.view.read().clone();
        let Some(shared) = &self.shared else {
            return Ok(current);
        };
        let generation = shared.live.generation();
        if current.generation == generation {
            return Ok(current);
        }
        let mut slot = self.view.write();
        if slot.generation != generation {
            // Read the generation before the metadata: a change racing with this
            // reload bumps it again, and the next I/O reloads once more.
            let (images, states) = (shared.source)()?;
            Self::check_members(&self.geometry, &images, &states)?;
            tracing::info!(?states, generation, "array configuration reloaded");
            *slot = Arc::new(View {
                images,
                states,
                generation,
            });
        }
        Ok(slot.clone())
    }

    /// Each member's state, in disk order (as this engine last saw them).
    pub fn member_states(&self) -> Vec<MemberState> {
        match self.view() {
            Ok(view) => view.states.clone(),
            Err(_) => self.view.read().states.clone(),
        }
    }

    /// Optimal, Degraded or Failed (RAID-5: 2 or more members not active; RAID-1:
    /// no member active). A member being rebuilt does not count as redundancy yet.
    pub fn state(&self) -> ArrayState {
        self.state_of(&self.member_states())
    }

    /// Member blocks rewritten with reconstructed bytes after a media error.
    pub fn repaired_blocks(&self) -> u64 {
        self.repaired.load(Ordering::Relaxed)
    }

    fn state_of(&self, states: &[MemberState]) -> ArrayState {
        array_state(self.geometry, states)
    }

    fn refuse_if_failed(&self, view: &View) -> Result<(), RaidError> {
        if self.state_of(&view.states) == ArrayState::Failed {
            Err(RaidError::ArrayFailed)
        } else {
            Ok(())
        }
    }

    fn check_range(&self, offset: u64, length: u64) -> Result<(), RaidError> {
        let size = self.geometry.data_bytes();
        match offset.checked_add(length) {
            Some(end) if end <= size => Ok(()),
            _ => Err(RaidError::OutOfRange {
                offset,
                length,
                size,
            }),
        }
    }

    fn lock_index(stripe: u64) -> usize {
        (stripe % LOCK_STRIPES as u64) as usize
    }

    /// Takes stripe `stripe`'s lock shared: member bytes of the stripe (member
    /// offsets `stripe * chunk_bytes ..`) do not change while it is held.
    pub fn lock_stripe_shared(&self, stripe: u64) -> StripeGuard<'_> {
        let lock = Self::lock_index(stripe);
        let local = LocalGuard::Shared(self.locks[lock].read());
        if let Some(shared) = &self.shared {
            shared
                .live
                .lock_shared(lock, &|dirty| self.resync_stripe(dirty));
        }
        StripeGuard {
            engine: self,
            lock,
            exclusive: false,
            _local: local,
        }
    }

    /// Takes stripe `stripe`'s lock exclusively, to change its member bytes.
    pub fn lock_stripe_exclusive(&self, stripe: u64) -> StripeGuard<'_> {
        self.lock_exclusive(Self::lock_index(stripe), Some(stripe))
    }

    /// Takes lock `lock` exclusively, in this process and across processes, to
    /// write `stripe` (recorded for crash recovery) or, with `None`, only to
    /// keep writers out.
    fn lock_exclusive(&self, lock: usize, stripe: Option<u64>) -> StripeGuard<'_> {
        let local = LocalGuard::Exclusive(self.locks[lock].write());
        if let Some(shared) = &self.shared {
            shared
                .live
                .lock_exclusive(lock, stripe, &|dirty| self.resync_stripe(dirty));
        }
        StripeGuard {
            engine: self,
            lock,
            exclusive: true,
            _local: local,
        }
    }

    /// Takes every stripe lock exclusively, in order: while the guards are
    /// held no member write of this or any other process is in flight, and
    /// the next one samples the configuration afresh. For configuration
    /// changes (see `Array`), so that every write runs whole under one
    /// configuration: one that started before a disk failed finishes (or is
    /// resynced, if its process died) before the disk is marked failed.
    pub fn quiesce(&self) -> Vec<StripeGuard<'_>> {
        (0..LOCK_STRIPES)
            .map(|lock| self.lock_exclusive(lock, None))
            .collect()
    }

    /// Runs `step(view, exclusive)` under stripe `stripe`'s lock, shared first;
    /// if it asks for exclusivity (to repair a block), again under the exclusive
    /// lock. The view is sampled under the lock.
    fn under_shared(
        &self,
        stripe: u64,
        mut step: impl FnMut(&View, bool) -> StepResult<()>,
    ) -> Result<(), RaidError> {
        {
            let _guard = self.lock_stripe_shared(stripe);
            let view = self.view()?;
            self.refuse_if_failed(&view)?;
            match step(&view, false) {
                Ok(()) => return Ok(()),
                Err(Fault::Raid(err)) => return Err(err),
                Err(Fault::NeedExclusive) => {}
            }
        }
        self.under_exclusive(stripe, |view| step(view, true))
    }

    /// Runs `step(view)` under stripe `stripe`'s exclusive lock.
    fn under_exclusive(
        &self,
        stripe: u64,
        step: impl FnOnce(&View) -> StepResult<()>,
    ) -> Result<(), RaidError> {
        let _guard = self.lock_stripe_exclusive(stripe);
        let view = self.view()?;
        self.refuse_if_failed(&view)?;
        match step(&view) {
            Ok(()) => Ok(()),
            Err(Fault::Raid(err)) => Err(err),
            Err(Fault::NeedExclusive) => {
                unreachable!("a step under the exclusive lock never asks for it")
            }
        }
    }

    fn member_error(index: usize, source: ImageError) -> Fault {
        Fault::Raid(RaidError::Member { index, source })
    }

    /// Reads `buf.len()` bytes at array offset `offset`. On error `buf` is zeroed:
    /// nothing half-reconstructed is ever left in it.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), RaidError> {
        self.refuse_if_failed(&*self.view()?)?;
        self.check_range(offset, buf.len() as u64)?;
        self.read_pieces(offset, buf).inspect_err(|_| buf.fill(0))
    }

    fn read_pieces(&self, offset: u64, buf: &mut [u8]) -> Result<(), RaidError> {
        // Reads go one chunk at a time: each piece is on one member.
        let chunk = self.geometry.chunk_bytes;
        for (position, done, step) in split(offset, buf.len(), chunk) {
            let piece = &mut buf[done..done + step];
            match self.geometry.level {
                Level::Raid1 => self.under_shared(position / chunk, |view, exclusive| {
                    self.r1_read(view, position, piece, exclusive)
                })?,
                Level::Raid5 | Level::Raid6 => {
                    let row = self.geometry.row_bytes();
                    let stripe = position / row;
                    let within = position % row;
                    let disk = self.geometry.data_disk(stripe, (within / chunk) as usize);
                    self.under_shared(stripe, |view, exclusive| {
                        self.r5_read_member(view, stripe, disk, within % chunk, piece, exclusive)
                    })?
                }
            }
        }
        Ok(())
    }

    /// Writes `data` at array offset `offset`.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), RaidError> {
        self.refuse_if_failed(&*self.view()?)?;
        self.check_range(offset, data.len() as u64)?;
        // Writes go one lock region at a time: a chunk of a mirror, or a whole
        // RAID-5 stripe row (its parity covers the row).
        let unit = match self.geometry.level {
            Level::Raid1 => self.geometry.chunk_bytes,
            Level::Raid5 | Level::Raid6 => self.geometry.row_bytes(),
        };
        for (position, done, step) in split(offset, data.len(), unit) {
            let piece = &data[done..done + step];
            let region = position / unit;
            let written = match self.geometry.level {
                Level::Raid1 => {
                    self.under_exclusive(region, |view| self.r1_write(view, position, piece))
                }
                Level::Raid5 | Level::Raid6 => self.under_exclusive(region, |view| {
                    self.r5_write_stripe(view, region, position % unit, piece)
                }),
            };
            self.record_broken();
            written?;
        }
        Ok(())
    }

    /// Writes `len` zero bytes at array offset `offset` (with ordinary writes).
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), RaidError> {
        self.refuse_if_failed(&*self.view()?)?;
        self.check_range(offset, len)?;
        let zeros = vec![0u8; len.min(ZERO_BYTES) as usize];
        let end = offset + len;
        let mut position = offset;
        while position < end {
            // Steps end on ZERO_BYTES boundaries, so large zeroings write whole
            // stripes whenever a stripe fits.
            let step = (ZERO_BYTES - position % ZERO_BYTES)
                .min(end - position)
                .min(zeros.len() as u64);
            self.write_at(position, &zeros[..step as usize])?;
            position += step;
        }
        Ok(())
    }

    /// Makes everything written so far durable on every written member, by
    /// any process: the members that anyone wrote since their last flush start
    /// writing back together, then each is synced (see
    /// [`DiskImage::flush`]); the others are skipped.
    pub fn flush(&self) -> Result<(), RaidError> {
        let view = self.view()?;
        let started: Vec<_> = view
            .images
            .iter()
            .enumerate()
            .map(|(index, member)| view.writable(index).then(|| member.start_flush()).flatten())
            .collect();
        for (index, (member, started)) in view.images.iter().zip(started).enumerate() {
            // A failed member is not flushed: it holds nothing the array
            // needs, and a disk that stopped answering would fail the flush.
            if !view.writable(index) {
                continue;
            }
            member
                .finish_flush(started)
                .map_err(|source| RaidError::Member { index, source })?;
        }
        // A degraded array's journal clears, once the writes they end are:
        // an entry left on the device could undo a flushed write to a missing
        // member (see `crate::journal`).
        if let Some(journal) = &self.journal {
            if self.geometry.level != Level::Raid1
                && (0..self.geometry.disks).any(|disk| !view.readable(disk))
            {
                journal.sync().map_err(|err| journal_error(journal, err))?;
            }
        }
        Ok(())
    }

    /// Brings stripe `stripe` (RAID-1: chunk region `stripe`) back to a
    /// consistent state after a process died while writing it: RAID-5 parity is
    /// recomputed from the data, a mirror's first readable copy is written to the
    /// other members. Called with the stripe's cross-process lock held by the dead
    /// process, so it takes no lock itself. On a degraded RAID-5 the missing
    /// member's bytes are restored from the journal entry the dead writer left
    /// (see [`crate::journal`]). A member block the dead writer left half-written
    /// is read as it was left (see `disk_images::DiskImage`'s pending writes),
    /// never rebuilt from the parity it had not updated yet. Rewrites use
    /// [`DiskImage::rewrite_at`]. A resync that fails is logged, and its journal
    /// entry cleared.
    pub(crate) fn resync_stripe(&self, stripe: u64) {
        if self.resync_or_log(stripe) {
            tracing::warn!(stripe, "resynced a stripe a dead process was writing");
        }
    }

    /// [`Self::try_resync_stripe`]; a failure is logged and the stripe's
    /// journal entry cleared (the stripe's lock is released after this either
    /// way, and an entry left behind would later be applied to a stripe that
    /// has moved on). Whether it succeeded.
    fn resync_or_log(&self, stripe: u64) -> bool {
        let Err(err) = self.try_resync_stripe(stripe) else {
            return true;
        };
        tracing::error!(stripe, %err, "could not resync a stripe");
        if let Some(journal) = &self.journal {
            if let Err(err) = journal.clear(Self::lock_index(stripe)) {
                tracing::error!(stripe, %err, "could not clear the stripe's journal entry");
            }
        }
        false
    }

    /// The work of [`Self::resync_stripe`].
    fn try_resync_stripe(&self, stripe: u64) -> Result<(), RaidError> {
        self.view().and_then(|view| {
            let chunk = self.geometry.chunk_bytes;
            if stripe >= self.geometry.disk_bytes / chunk {
                return Ok(());
            }
            let missing = self.missing_data_members(&view, stripe);
            if self.geometry.level != Level::Raid1 && !missing.is_empty() {
                return match self.r5_resync_degraded(&view, stripe, &missing) {
                    Ok(()) => Ok(()),
                    Err(Fault::Raid(err)) => Err(err),
                    Err(Fault::NeedExclusive) => unreachable!("resync reads repair in place"),
                };
            }
            let base = stripe * chunk;
            let mut done = 0;
            while done < chunk {
                let len = (chunk - done).min(WORK_BYTES);
                let step = match self.geometry.level {
                    Level::Raid1 => self.r1_resync(&view, base + done, len),
                    Level::Raid5 | Level::Raid6 => self.r5_resync(&view, stripe, done, len),
                };
                match step {
                    Ok(()) => {}
                    Err(Fault::Raid(err)) => return Err(err),
                    Err(Fault::NeedExclusive) => unreachable!("resync reads repair in place"),
                }
                done += len;
            }
            // A degraded write's entry cannot be left behind here (recovery runs
            // before the array changes), but a stale one must never be applied.
            if let Some(journal) = &self.journal {
                journal
                    .clear(Self::lock_index(stripe))
                    .map_err(|err| journal_error(journal, err))?;
            }
            Ok(())
        })
    }

    /// After a power loss (or a crash of the host's kernel), a write that was
    /// not flushed may have reached one member and not another: data without
    /// its parity, one mirror and not the other. Each member's write-intent
    /// record names the regions that were being written when it happened (see
    /// `disk_images::intent`; members are opened with
    /// [`DiskImage::open_member`], which leaves the record to this). Every
    /// stripe there is resynced under its exclusive lock, as after the death of
    /// a process, the members are flushed, and their records released. Until
    /// then, every process that opens the array does it again: a process that
    /// dies half-way leaves the records for the next.
    fn resync_after_power_loss(&self) {
        // The view as opened: asking the members whether they answer (as
        // `view()` does) would load the fault book for nothing.
        let view = self.view.read().clone();
        let chunk = self.geometry.chunk_bytes;
        let stripe_count = self.geometry.disk_bytes / chunk;
        let mut stripes = std::collections::BTreeSet::new();
        for member in &view.images {
            for range in member.power_lost() {
                stripes.extend(range.start / chunk..range.end.div_ceil(chunk).min(stripe_count));
            }
        }
        if stripes.is_empty() {
            return;
        }
        tracing::warn!(
            stripes = stripes.len(),
            "the array was being written when the power went (the host's, an injected power-loss's, or a kernel crash): \
             resyncing the stripes its members' write-intent records name"
        );
        let mut failed = 0usize;
        for &stripe in &stripes {
            let _guard = self.lock_stripe_exclusive(stripe);
            failed += usize::from(!self.resync_or_log(stripe));
        }
        if failed > 0 {
            tracing::error!(
                failed,
                "stripes not resynced after the power loss: they are tried again at the next open"
            );
            return;
        }
        let released = self.flush().map_err(|err| err.to_string()).and_then(|()| {
            view.images
                .iter()
                .try_for_each(|member| member.power_loss_handled())
                .map_err(|err| err.to_string())
        });
        match released {
            Ok(()) => tracing::info!(stripes = stripes.len(), "resynced after the power loss"),
            Err(err) => {
                tracing::error!(%err, "resynced after the power loss, but cannot say so: it is done again at the next open")
            }
        }
    }

    fn r1_resync(&self, view: &View, offset: u64, len: u64) -> StepResult<()> {
        let mut buf = vec![0u8; len as usize];
        self.r1_read(view, offset, &mut buf, true)?;
        let first = view.first_readable();
        for (index, member) in view.images.iter().enumerate() {
            if view.writable(index) && Some(index) != first {
                member
                    .rewrite_at(offset, &buf)
                    .map_err(|source| Self::member_error(index, source))?;
            }
        }
        Ok(())
    }

    /// The data members of `stripe` that cannot be read (failed, or being
    /// rebuilt): their bytes there exist only through the parity.
    fn missing_data_members(&self, view: &View, stripe: u64) -> Vec<usize> {
        (0..self.geometry.disks)
            .filter(|&d| self.geometry.data_index(stripe, d).is_some() && !view.readable(d))
            .collect()
    }

    /// Fills in the parity chunks (RAID-5: P; RAID-6: P and Q) of `chunks`
    /// (one buffer per disk, the data ones filled) from its data chunks.
    fn compute_parity(&self, stripe: u64, chunks: &mut [Vec<u8>]) {
        let g = &self.geometry;
        match g.level {
            Level::Raid1 => {}
            Level::Raid5 => {
                let parity_disk = g.parity_disk(stripe);
                let mut parity = std::mem::take(&mut chunks[parity_disk]);
                parity.fill(0);
                for k in 0..g.data_disks() {
                    xor_into(&mut parity, &chunks[g.data_disk(stripe, k)]);
                }
                chunks[parity_disk] = parity;
            }
            Level::Raid6 => {
                let len = chunks[0].len();
                let mut roles = pq_stripe(g, stripe, chunks, len);
                pq::recover(&mut roles, &[Role::P, Role::Q]);
            }
        }
    }

    /// The parity disks of `stripe` (RAID-5: P; RAID-6: P and Q).
    fn parity_disks(&self, stripe: u64) -> impl Iterator<Item = usize> {
        std::iter::once(self.geometry.parity_disk(stripe)).chain(self.geometry.q_disk(stripe))
    }

    /// Resync of a degraded RAID-5/6 stripe: the parity is recomputed from the
    /// surviving data and the missing members' bytes saved in the journal before
    /// the interrupted write (see [`crate::journal`]). No valid entry means the
    /// write had not touched a member yet, or had finished: nothing to do.
    fn r5_resync_degraded(&self, view: &View, stripe: u64, missing: &[usize]) -> StepResult<()> {
        let g = &self.geometry;
        let lock = Self::lock_index(stripe);
        let Some(journal) = &self.journal else {
            tracing::error!(
                stripe,
                members = ?missing,
                "a write to this stripe of a degraded array was cut short and there is \
                 no journal: the missing members' data in it may be lost (the write hole)"
            );
            return Ok(());
        };
        let fault = |err| Fault::Raid(journal_error(journal, err));
        let Some(saved) = journal.saved(lock, stripe).map_err(fault)? else {
            return Ok(());
        };
        let len = saved.bytes.len() / missing.len();
        if len == 0
            || saved.bytes.len() % missing.len() != 0
            || saved.offset + len as u64 > g.chunk_bytes
        {
            // Recovery runs before any configuration change, so the entry was
            // written with these members missing; anything else is not ours.
            tracing::error!(stripe, members = ?missing, "a journal entry that does not fit the stripe; ignored");
            journal.clear(lock).map_err(fault)?;
            return Ok(());
        }
        let mut chunks = vec![vec![0u8; len]; g.disks];
        for k in 0..g.data_disks() {
            let disk = g.data_disk(stripe, k);
            match missing.iter().position(|&m| m == disk) {
                Some(i) => chunks[disk].copy_from_slice(&saved.bytes[i * len..(i + 1) * len]),
                None => {
                    self.r5_read_member(view, stripe, disk, saved.offset, &mut chunks[disk], true)?
                }
            }
        }
        self.compute_parity(stripe, &mut chunks);
        let offset = stripe * g.chunk_bytes + saved.offset;
        for disk in self.parity_disks(stripe).chain(missing.iter().copied()) {
            // A missing member being rebuilt holds what the interrupted write
            // gave it: it gets its saved bytes back.
            if view.writable(disk) {
                view.images[disk]
                    .rewrite_at(offset, &chunks[disk])
                    .map_err(|source| Self::member_error(disk, source))?;
            }
        }
        journal.clear(lock).map_err(fault)?;
        tracing::warn!(
            stripe,
            members = ?missing,
            "restored the missing members' data in a stripe a dead process was writing, \
             from the journal"
        );
        Ok(())
    }

    /// Recomputes the parity of `[in_chunk, in_chunk+len)` of `stripe` from its
    /// data.
    fn r5_resync(&self, view: &View, stripe: u64, in_chunk: u64, len: u64) -> StepResult<()> {
        let g = &self.geometry;
        if !self.parity_disks(stripe).any(|d| view.writable(d)) {
            return Ok(());
        }
        let mut chunks = vec![vec![0u8; len as usize]; g.disks];
        for k in 0..g.data_disks() {
            let disk = g.data_disk(stripe, k);
            self.r5_read_member(view, stripe, disk, in_chunk, &mut chunks[disk], true)?;
        }
        self.compute_parity(stripe, &mut chunks);
        for disk in self.parity_disks(stripe).filter(|&d| view.writable(d)) {
            view.images[disk]
                .rewrite_at(stripe * g.chunk_bytes + in_chunk, &chunks[disk])
                .map_err(|source| Self::member_error(disk, source))?;
        }
        Ok(())
    }
    // ---------------------------------------------------------------- RAID-1

    /// Reads `buf.len()` bytes at `offset` (within one lock region) from the first
    /// active member; a media error asks for the exclusive lock, under which the
    /// affected blocks are read from the other members and repaired.
    fn r1_read(&self, view: &View, offset: u64, buf: &mut [u8], exclusive: bool) -> StepResult<()> {
        let Some(first) = view.first_readable() else {
            return Err(RaidError::ArrayFailed.into());
        };
        match view.images[first].read_at(offset, buf) {
            Ok(()) => Ok(()),
            Err(ImageError::Media(_)) if !exclusive => Err(Fault::NeedExclusive),
            Err(ImageError::Media(_)) => self.r1_read_repairing(view, offset, buf),
            Err(source) => Err(Self::member_error(first, source)),
        }
    }

    /// Block by block: the first active member whose copy passes its CRC supplies
    /// the block; every member that failed the CRC before it is rewritten.
    fn r1_read_repairing(&self, view: &View, offset: u64, buf: &mut [u8]) -> StepResult<()> {
        let end = offset + buf.len() as u64;
        let mut block = [0u8; BLOCK_BYTES];
        let mut bad = Vec::new();
        let mut start = align_down(offset);
        while start < end {
            bad.clear();
            let mut found = false;
            for (index, member) in view.images.iter().enumerate() {
                if !view.readable(index) {
                    continue;
                }
                match member.read_at(start, &mut block) {
                    Ok(()) => {
                        found = true;
                        break;
                    }
                    Err(ImageError::Media(err)) => bad.push((index, err)),
                    Err(source) => return Err(Self::member_error(index, source)),
                }
            }
            if !found {
                let detail = bad
                    .iter()
                    .map(|(_, err)| err.to_string())
                    .collect::<Vec<_>>()
                    .join("; ");
                return Err(RaidError::Unrecoverable {
                    offset: start,
                    detail: format!("no active mirror holds a good copy: {detail}"),
                }
                .into());
            }
            for (index, _) in &bad {
                view.images[*index]
                    .rewrite_at(start, &block)
                    .map_err(|source| Self::member_error(*index, source))?;
                self.repaired.fetch_add(1, Ordering::Relaxed);
            }
            let from = start.max(offset);
            let to = (start + BLOCK).min(end);
            buf[(from - offset) as usize..(to - offset) as usize]
                .copy_from_slice(&block[(from - start) as usize..(to - start) as usize]);
            start += BLOCK;
        }
        Ok(())
    }

    /// Writes `data` at `offset` (within one lock region) to every active member,
    /// in whole blocks: unaligned edges are completed from the current contents.
    fn r1_write(&self, view: &View, offset: u64, data: &[u8]) -> StepResult<()> {
        let end = offset + data.len() as u64;
        let mut window_start = offset;
        let mut buf = Vec::new();
        while window_start < end {
            let window_end = (align_down(window_start) + WORK_BYTES).min(end);
            let window = &data[(window_start - offset) as usize..(window_end - offset) as usize];
            let lo = align_down(window_start);
            let hi = align_up(window_end);
            let bytes: &[u8] = if lo == window_start && hi == window_end {
                window
            } else {
                buf.clear();
                buf.resize((hi - lo) as usize, 0);
                let len = buf.len();
                if lo != window_start {
                    self.r1_read(view, lo, &mut buf[..BLOCK_BYTES], true)?;
                }
                if hi != window_end && (lo == window_start || hi - lo > BLOCK) {
                    self.r1_read(view, hi - BLOCK, &mut buf[len - BLOCK_BYTES..], true)?;
                }
                buf[(window_start - lo) as usize..(window_end - lo) as usize]
                    .copy_from_slice(window);
                &buf
            };
            let writing = (0..view.images.len()).filter(|&i| view.writable(i));
            self.reserve(view, writing.clone(), lo, bytes.len())?;
            let writes = writing.map(|index| (index, bytes));
            self.write_members(view, writes, lo, &mut Vec::new())?;
            window_start = window_end;
        }
        Ok(())
    }

    // ---------------------------------------------------------------- RAID-5

    /// The error for a lost block: `disk`'s bytes at `in_chunk` of `stripe`.
    fn unrecoverable(&self, stripe: u64, disk: usize, in_chunk: u64, detail: String) -> Fault {
        let g = &self.geometry;
        let k = g.data_index(stripe, disk).unwrap_or(0) as u64;
        let in_chunk = align_down(in_chunk);
        Fault::Raid(RaidError::Unrecoverable {
            offset: stripe * g.row_bytes() + k * g.chunk_bytes + in_chunk,
            detail,
        })
    }

    /// Reads `buf.len()` bytes of member `disk` at `in_chunk` of stripe `stripe`
    /// (within one chunk): directly if it is active, else reconstructed. A media
    /// error asks for the exclusive lock, under which the block is reconstructed
    /// and rewritten.
    fn r5_read_member(
        &self,
        view: &View,
        stripe: u64,
        disk: usize,
        in_chunk: u64,
        buf: &mut [u8],
        exclusive: bool,
    ) -> StepResult<()> {
        if !view.readable(disk) {
            return self.r5_reconstruct(view, stripe, disk, in_chunk, buf);
        }
        let offset = stripe * self.geometry.chunk_bytes + in_chunk;
        match view.images[disk].read_at(offset, buf) {
            Ok(()) => Ok(()),
            Err(ImageError::Media(_)) if !exclusive => Err(Fault::NeedExclusive),
            Err(ImageError::Media(_)) => self.r5_read_repairing(view, stripe, disk, in_chunk, buf),
            Err(source) => Err(Self::member_error(disk, source)),
        }
    }

    /// `buf` := XOR of every other member's bytes at the same place. Any of them
    /// failed or failing its CRC means the bytes are lost.
    fn r5_reconstruct(
        &self,
        view: &View,
        stripe: u64,
        disk: usize,
        in_chunk: u64,
        buf: &mut [u8],
    ) -> StepResult<()> {
        if self.geometry.level == Level::Raid6 {
            return self.r6_reconstruct(view, stripe, disk, in_chunk, buf, true);
        }
        if let Some(other) = (0..self.geometry.disks).find(|&m| m != disk && !view.readable(m)) {
            return Err(self.unrecoverable(
                stripe,
                disk,
                in_chunk,
                format!("member {disk}'s data is needed while member {other} is failed or being rebuilt"),
            ));
        }
        let base = stripe * self.geometry.chunk_bytes + in_chunk;
        let mut scratch = vec![0u8; (buf.len() as u64).min(WORK_BYTES) as usize];
        for (window_index, window) in buf.chunks_mut(WORK_BYTES as usize).enumerate() {
            let window_offset = window_index as u64 * WORK_BYTES;
            window.fill(0);
            let scratch = &mut scratch[..window.len()];
            for (index, member) in view.images.iter().enumerate() {
                if index == disk {
                    continue;
                }
                match member.read_at(base + window_offset, scratch) {
                    Ok(()) => xor_into(window, scratch),
                    Err(ImageError::Media(err)) => {
                        let bad_in_chunk = (err.block * BLOCK)
                            .max(base + window_offset)
                            .saturating_sub(stripe * self.geometry.chunk_bytes);
                        return Err(self.unrecoverable(
                            stripe,
                            disk,
                            bad_in_chunk,
                            format!(
                                "member {disk}'s data must be rebuilt but member {index} \
                                 has a media error there: {err}"
                            ),
                        ));
                    }
                    Err(source) => return Err(Self::member_error(index, source)),
                }
            }
        }
        Ok(())
    }

    /// Block by block: a block that fails its CRC is reconstructed from the other
    /// members and rewritten.
    fn r5_read_repairing(
        &self,
        view: &View,
        stripe: u64,
        disk: usize,
        in_chunk: u64,
        buf: &mut [u8],
    ) -> StepResult<()> {
        let chunk_start = stripe * self.geometry.chunk_bytes;
        let offset = chunk_start + in_chunk;
        let end = offset + buf.len() as u64;
        let member = &view.images[disk];
        let mut block = [0u8; BLOCK_BYTES];
        let mut start = align_down(offset);
        while start < end {
            match member.read_at(start, &mut block) {
                Ok(()) => {}
                Err(ImageError::Media(_)) => {
                    self.r5_reconstruct(view, stripe, disk, start - chunk_start, &mut block)?;
                    member
                        .rewrite_at(start, &block)
                        .map_err(|source| Self::member_error(disk, source))?;
                    self.repaired.fetch_add(1, Ordering::Relaxed);
                }
                Err(source) => return Err(Self::member_error(disk, source)),
            }
            let from = start.max(offset);
            let to = (start + BLOCK).min(end);
            buf[(from - offset) as usize..(to - offset) as usize]
                .copy_from_slice(&block[(from - start) as usize..(to - start) as usize]);
            start += BLOCK;
        }
        Ok(())
    }

    /// RAID-6: `buf` := member `disk`'s bytes at `in_chunk` of `stripe`, from
    /// the other members (any two chunks of a stripe follow from the rest, see
    /// [`crate::pq`]). A member that is failed, being rebuilt, or has a media
    /// error in the window counts as missing too; with more than two missing,
    /// a window of several blocks is tried again block by block (`split`),
    /// and what is still lost is unrecoverable.
    fn r6_reconstruct(
        &self,
        view: &View,
        stripe: u64,
        disk: usize,
        in_chunk: u64,
        buf: &mut [u8],
        split: bool,
    ) -> StepResult<()> {
        let g = &self.geometry;
        let chunk_start = stripe * g.chunk_bytes;
        let mut done = 0usize;
        while done < buf.len() {
            let at = in_chunk + done as u64;
            let window = (buf.len() - done).min(WORK_BYTES as usize);
            let mut chunks = vec![vec![0u8; window]; g.disks];
            let mut missing = vec![g.role(stripe, disk)];
            let mut bad = None;
            for member in (0..g.disks).filter(|&m| m != disk) {
                if !view.readable(member) {
                    missing.push(g.role(stripe, member));
                    continue;
                }
                match view.images[member].read_at(chunk_start + at, &mut chunks[member]) {
                    Ok(()) => {}
                    Err(ImageError::Media(err)) => {
                        missing.push(g.role(stripe, member));
                        bad.get_or_insert((member, err));
                    }
                    Err(source) => return Err(Self::member_error(member, source)),
                }
            }
            if missing.len() > 2 {
                let first_block = align_down(at);
                if split && bad.is_some() && align_up(at + window as u64) - first_block > BLOCK {
                    // Media errors in different blocks of different members
                    // may each still leave a block recoverable.
                    let mut position = at;
                    while position < at + window as u64 {
                        let end = (align_down(position) + BLOCK).min(at + window as u64);
                        let from = (position - in_chunk) as usize;
                        let to = (end - in_chunk) as usize;
                        self.r6_reconstruct(
                            view,
                            stripe,
                            disk,
                            position,
                            &mut buf[from..to],
                            false,
                        )?;
                        position = end;
                    }
                    done += window;
                    continue;
                }
                let bad_at = bad.as_ref().map_or(at, |(_, err)| {
                    (err.block * BLOCK).max(chunk_start + at) - chunk_start
                });
                let detail = match bad {
                    Some((member, err)) => format!(
                        "member {disk}'s data must be rebuilt but too many others are missing there, \
                         member {member} with a media error: {err}"
                    ),
                    None => format!(
                        "member {disk}'s data is needed while two other members are failed or being rebuilt"
                    ),
                };
                return Err(self.unrecoverable(stripe, disk, bad_at, detail));
            }
            let mut roles = pq_stripe(g, stripe, &mut chunks, window);
            pq::recover(&mut roles, &missing);
            buf[done..done + window].copy_from_slice(&chunks[disk]);
            done += window;
        }
        Ok(())
    }

    /// Writes `data` at `within` of stripe `stripe`'s data (all inside the stripe).
    ///
    /// The chunk offsets are cut into segments of at most `WORK_BYTES`, with cuts
    /// at the block boundaries around where the write starts and ends, so in
    /// each segment every touched data chunk is either wholly new or new in part
    /// of a single block.
    fn r5_write_stripe(
        &self,
        view: &View,
        stripe: u64,
        within: u64,
        data: &[u8],
    ) -> StepResult<()> {
        if data.is_empty() {
            return Ok(());
        }
        let chunk = self.geometry.chunk_bytes;
        let end = within + data.len() as u64;
        let first = (within / chunk) as usize;
        let last = ((end - 1) / chunk) as usize;
        let start_in_chunk = within % chunk;
        let end_in_chunk = end - last as u64 * chunk;
        let mut cuts = vec![
            0,
            chunk,
            align_down(start_in_chunk),
            align_up(start_in_chunk),
            align_down(end_in_chunk),
            align_up(end_in_chunk),
        ];
        cuts.sort_unstable();
        cuts.dedup();
        for pair in cuts.windows(2) {
            let mut lo = pair[0];
            while lo < pair[1] {
                // A RAID-6 segment may journal two missing members' bytes.
                let hi = (lo + WORK_BYTES / self.geometry.parity_chunks() as u64).min(pair[1]);
                self.r5_write_segment(view, stripe, within, data, first..=last, lo, hi)?;
                lo = hi;
            }
        }
        Ok(())
    }

    /// One segment `[lo, hi)` (chunk offsets, block aligned) of a stripe write.
    #[allow(clippy::too_many_arguments)]
    fn r5_write_segment(
        &self,
        view: &View,
        stripe: u64,
        within: u64,
        data: &[u8],
        chunks: std::ops::RangeInclusive<usize>,
        lo: u64,
        hi: u64,
    ) -> StepResult<()> {
        let g = &self.geometry;
        let chunk = g.chunk_bytes;
        let end = within + data.len() as u64;
        let len = (hi - lo) as usize;
        let mut touched = Vec::new();
        for k in chunks {
            // The new bytes of chunk k, in stripe data offsets, clipped to [lo, hi).
            let chunk_base = k as u64 * chunk;
            let from = within.max(chunk_base + lo);
            let to = end.min(chunk_base + hi);
            if from >= to {
                continue;
            }
            let disk = g.data_disk(stripe, k);
            let new_bytes = &data[(from - within) as usize..(to - within) as usize];
            if from == chunk_base + lo && to == chunk_base + hi {
                touched.push(Touched {
                    disk,
                    new: Cow::Borrowed(new_bytes),
                    old: None,
                });
            } else {
                let mut old = vec![0u8; len];
                self.r5_read_member(view, stripe, disk, lo, &mut old, true)?;
                let mut new = old.clone();
                let at = (from - chunk_base - lo) as usize;
                new[at..at + new_bytes.len()].copy_from_slice(new_bytes);
                touched.push(Touched {
                    disk,
                    new: Cow::Owned(new),
                    old: Some(old),
                });
            }
        }
        if touched.is_empty() {
            return Ok(());
        }
        if g.level == Level::Raid6 {
            return self.r6_write_segment(view, stripe, &touched, lo, len);
        }

        let parity_disk = g.parity_disk(stripe);
        let parity = if !view.writable(parity_disk) {
            None
        } else {
            let untouched: Vec<usize> = (0..g.disks - 1)
                .map(|k| g.data_disk(stripe, k))
                .filter(|d| touched.iter().all(|t| t.disk != *d))
                .collect();
            // A member being rebuilt is written but cannot be read yet.
            let touched_failed = touched.iter().any(|t| !view.readable(t.disk));
            let untouched_failed = untouched.iter().any(|d| !view.readable(*d));
            // Reconstruct-write reads the untouched chunks; read-modify-write reads
            // the touched ones and the parity. A failed touched chunk forces the
            // first, a failed untouched one the second; else the fewer reads win.
            let reconstruct_write = !view.readable(parity_disk)
                || touched_failed
                || (!untouched_failed && untouched.len() < touched.len() + 1);
            let mut acc = vec![0u8; len];
            let mut scratch = vec![0u8; len];
            if reconstruct_write {
                for t in &touched {
                    xor_into(&mut acc, &t.new);
                }
                for disk in untouched {
                    self.r5_read_member(view, stripe, disk, lo, &mut scratch, true)?;
                    xor_into(&mut acc, &scratch);
                }
            } else {
                self.r5_read_member(view, stripe, parity_disk, lo, &mut acc, true)?;
                for t in &touched {
                    match &t.old {
                        Some(old) => xor_into(&mut acc, old),
                        None => {
                            self.r5_read_member(view, stripe, t.disk, lo, &mut scratch, true)?;
                            xor_into(&mut acc, &scratch);
                        }
                    }
                    xor_into(&mut acc, &t.new);
                }
            }
            Some(acc)
        };

        let offset = stripe * chunk + lo;
        let writing = touched
            .iter()
            .map(|t| t.disk)
            .filter(|&d| view.writable(d))
            .chain(parity.as_ref().map(|_| parity_disk));
        self.reserve(view, writing, offset, len)?;
        let journaled = match &parity {
            Some(_) => self.journal_missing(view, stripe, lo, len)?,
            None => None,
        };
        let mut written_disks = Vec::with_capacity(touched.len() + 1);
        let writes = touched
            .iter()
            .filter(|t| view.writable(t.disk))
            .map(|t| (t.disk, &*t.new))
            .chain(parity.as_deref().map(|parity| (parity_disk, parity)));
        let written = self.write_members(view, writes, offset, &mut written_disks);
        self.clear_journal(view, journaled, written, &written_disks, offset, len)
    }

    /// RAID-6: the rest of a segment write, once `touched` holds the new bytes
    /// of the data chunks it changes. P and Q are computed from the whole
    /// segment's data (the untouched chunks are read, or reconstructed), then
    /// data, P and Q are written.
    fn r6_write_segment(
        &self,
        view: &View,
        stripe: u64,
        touched: &[Touched<'_>],
        lo: u64,
        len: usize,
    ) -> StepResult<()> {
        let g = &self.geometry;
        let mut chunks = vec![vec![0u8; len]; g.disks];
        for k in 0..g.data_disks() {
            let disk = g.data_disk(stripe, k);
            match touched.iter().find(|t| t.disk == disk) {
                Some(t) => chunks[disk].copy_from_slice(&t.new),
                None => self.r5_read_member(view, stripe, disk, lo, &mut chunks[disk], true)?,
            }
        }
        self.compute_parity(stripe, &mut chunks);
        let offset = stripe * g.chunk_bytes + lo;
        let writing = touched
            .iter()
            .map(|t| t.disk)
            .chain(self.parity_disks(stripe))
            .filter(|&d| view.writable(d));
        self.reserve(view, writing, offset, len)?;
        let journaled = if self.parity_disks(stripe).any(|d| view.writable(d)) {
            self.journal_missing(view, stripe, lo, len)?
        } else {
            None
        };
        let mut written_disks = Vec::with_capacity(g.disks);
        let writes = touched
            .iter()
            .filter(|t| view.writable(t.disk))
            .map(|t| (t.disk, &*t.new))
            .chain(
                self.parity_disks(stripe)
                    .filter(|&d| view.writable(d))
                    .map(|disk| (disk, &chunks[disk][..])),
            );
        let written = self.write_members(view, writes, offset, &mut written_disks);
        self.clear_journal(view, journaled, written, &written_disks, offset, len)
    }

    /// Writes each `(disk, bytes)` at `offset`, in order, noting each disk in
    /// `written` before its write. A member that fails its write (see
    /// [`fails_member`]) while it answers is failed, md's rule: at once in
    /// this engine's view, for every process once the stripe lock is released
    /// ([`Self::record_broken`]). The other members are still written, so the
    /// row ends in step without it (new data, parity for the new data) and
    /// nothing reconstructed later from the row is stale; they are made
    /// durable at once, since the row is now degraded without a journal entry
    /// for the member that left. The write succeeds if the array can go on
    /// without the members that failed it, as a write to a degraded array
    /// does; else it fails with the first member's error.
    fn write_members<'d>(
        &self,
        view: &View,
        writes: impl Iterator<Item = (usize, &'d [u8])>,
        offset: u64,
        written: &mut Vec<usize>,
    ) -> StepResult<()> {
        let mut broken: Vec<(usize, ImageError)> = Vec::new();
        let mut len = 0;
        for (disk, bytes) in writes {
            written.push(disk);
            len = bytes.len() as u64;
            if let Err(source) = view.images[disk].write_at(offset, bytes) {
                if !fails_member(&source) || !view.images[disk].present() {
                    return Err(Self::member_error(disk, source));
                }
                tracing::error!(disk, offset, %source, "a member failed a write: it is failed");
                broken.push((disk, source));
            }
        }
        if broken.is_empty() {
            return Ok(());
        }
        let mut states = view.states.clone();
        for &(disk, _) in &broken {
            states[disk] = MemberState::Failed;
            self.set_member_state(disk, MemberState::Failed)?;
            self.broken.lock().push(disk);
        }
        written.retain(|&disk| states[disk] != MemberState::Failed);
        for &disk in written.iter() {
            view.images[disk]
                .flush_range(offset, len)
                .map_err(|source| Self::member_error(disk, source))?;
        }
        if self.state_of(&states) == ArrayState::Failed {
            let (disk, source) = broken.swap_remove(0);
            return Err(Self::member_error(disk, source));
        }
        Ok(())
    }

    /// Records the members that failed a write ([`Self::write_members`])
    /// failed for every process, through the engine's [`MemberFailer`].
    /// Called with no stripe lock held: recording a change quiesces the
    /// engine.
    fn record_broken(&self) {
        let mut broken = std::mem::take(&mut *self.broken.lock());
        broken.sort_unstable();
        broken.dedup();
        for disk in broken {
            let Some(failer) = &self.failer else {
                continue;
            };
            match failer(self, disk) {
                Ok(()) => tracing::error!(
                    disk,
                    "disk failed: it could not store a write; the array goes on without it"
                ),
                Err(err) => tracing::warn!(disk, %err, "recording a disk that failed a write"),
            }
        }
    }

    /// Reserves `[offset, offset+len)` on every member of `disks` before any
    /// of them is written (see [`DiskImage::reserve`]): on a full host file
    /// system the write then fails before it stores anything, instead of
    /// after one member stored its part and another could not, which would
    /// leave the row's redundancy out of step with its data (a later disk
    /// failure would reconstruct acknowledged data wrong).
    fn reserve(
        &self,
        view: &View,
        disks: impl Iterator<Item = usize>,
        offset: u64,
        len: usize,
    ) -> StepResult<()> {
        for disk in disks {
            view.images[disk]
                .reserve(offset, len as u64)
                .map_err(|source| Self::member_error(disk, source))?;
        }
        Ok(())
    }

    /// Ends the journal entry a segment write made (if any): the members it
    /// wrote (`disks`, at `[offset, offset+len)`) are made durable first, so
    /// that the clear cannot reach the device before the writes it ends (a
    /// power cut in between would leave a half-written stripe and no entry:
    /// the write hole; see [`crate::journal`]). The entry is cleared whether or
    /// not the writes succeeded: an entry is only ever for a process that died
    /// holding the stripe's lock (or for the power cut); left behind by one
    /// that returned, it would later be applied to a stripe that has moved on.
    fn clear_journal(
        &self,
        view: &View,
        journaled: Option<usize>,
        written: StepResult<()>,
        disks: &[usize],
        offset: u64,
        len: usize,
    ) -> StepResult<()> {
        let (Some(lock), Some(journal)) = (journaled, &self.journal) else {
            return written;
        };
        let written = written.and_then(|()| {
            disks.iter().try_for_each(|&disk| {
                view.images[disk]
                    .flush_range(offset, len as u64)
                    .map_err(|source| Self::member_error(disk, source))
            })
        });
        let cleared = journal
            .clear(lock)
            .map_err(|err| Fault::Raid(journal_error(journal, err)));
        written.and(cleared)
    }

    /// Before a write to `[lo, lo+len)` of a degraded RAID-5/6 stripe changes
    /// any member: saves the missing data members' bytes there (one after the
    /// other, in disk order) in the journal entry of the stripe's lock (held
    /// exclusively), so that a resync after this process dies half-way can
    /// restore them. Returns the entry's lock.
    fn journal_missing(
        &self,
        view: &View,
        stripe: u64,
        lo: u64,
        len: usize,
    ) -> StepResult<Option<usize>> {
        let Some(journal) = &self.journal else {
            return Ok(None);
        };
        let missing = self.missing_data_members(view, stripe);
        if missing.is_empty() {
            return Ok(None);
        }
        let mut saved = vec![0u8; len * missing.len()];
        for (disk, bytes) in missing.iter().zip(saved.chunks_exact_mut(len)) {
            self.r5_reconstruct(view, stripe, *disk, lo, bytes)?;
        }
        let lock = Self::lock_index(stripe);
        journal
            .record(lock, stripe, lo, &saved)
            .map_err(|err| Fault::Raid(journal_error(journal, err)))?;
        Ok(Some(lock))
    }
}

/// The first `len` bytes of each chunk of RAID-6 stripe `stripe` (one buffer
/// per disk), by role.
pub(crate) fn pq_stripe<'a>(
    g: &Geometry,
    stripe: u64,
    chunks: &'a mut [Vec<u8>],
    len: usize,
) -> pq::Stripe<'a> {
    let mut data: Vec<Option<&'a mut [u8]>> = (0..g.data_disks()).map(|_| None).collect();
    let (mut p, mut q) = (None, None);
    for (disk, chunk) in chunks.iter_mut().enumerate() {
        match g.role(stripe, disk) {
            Role::Data(k) => data[k] = Some(&mut chunk[..len]),
            Role::P => p = Some(&mut chunk[..len]),
            Role::Q => q = Some(&mut chunk[..len]),
        }
    }
    pq::Stripe {
        data: data
            .into_iter()
            .map(|d| d.expect("a disk for every data chunk"))
            .collect(),
        p: p.expect("a P disk"),
        q: q.expect("a Q disk"),
    }
}

/// Splits the access `[offset, offset+len)` at multiples of `unit`: yields
/// `(array position, bytes before it, bytes in this piece)`.
fn split(offset: u64, len: usize, unit: u64) -> impl Iterator<Item = (u64, usize, usize)> {
    let mut done = 0usize;
    std::iter::from_fn(move || {
        if done >= len {
            return None;
        }
        let position = offset + done as u64;
        let step = (unit - position % unit).min((len - done) as u64) as usize;
        let piece = (position, done, step);
        done += step;
        Some(piece)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geometry(level: Level, disks: usize) -> Geometry {
        Geometry {
            level,
            disks,
            chunk_bytes: 8192,
            disk_bytes: 64 * 1024,
        }
    }

    #[test]
    fn left_symmetric_layout_matches_the_table() {
        let g = geometry(Level::Raid5, 4);
        // Row s of the module's table: which data chunk (or parity) each disk holds.
        let table: [[Option<u64>; 4]; 5] = [
            [Some(0), Some(1), Some(2), None],
            [Some(4), Some(5), None, Some(3)],
            [Some(8), None, Some(6), Some(7)],
            [None, Some(9), Some(10), Some(11)],
            [Some(12), Some(13), Some(14), None],
        ];
        for (stripe, row) in table.iter().enumerate() {
            let stripe = stripe as u64;
            for (disk, cell) in row.iter().enumerate() {
                let got = g.data_index(stripe, disk).map(|k| stripe * 3 + k as u64);
                assert_eq!(got, *cell, "stripe {stripe} disk {disk}");
                if let Some(k) = g.data_index(stripe, disk) {
                    assert_eq!(g.data_disk(stripe, k), disk);
                } else {
                    assert_eq!(g.parity_disk(stripe), disk);
                }
            }
        }
    }

    #[test]
    fn raid6_layout_matches_the_table() {
        use crate::pq::Role::{Data, P, Q};
        let g = geometry(Level::Raid6, 5);
        // Row s of the module's RAID-6 table: data chunk (of the array), P or Q.
        let table = [
            [Q, Data(0), Data(1), Data(2), P],
            [Data(3), Data(4), Data(5), P, Q],
            [Data(7), Data(8), P, Q, Data(6)],
            [Data(11), P, Q, Data(9), Data(10)],
        ];
        for (stripe, row) in table.iter().enumerate() {
            let stripe = stripe as u64;
            for (disk, cell) in row.iter().enumerate() {
                let got = match g.role(stripe, disk) {
                    Data(k) => Data(stripe as usize * 3 + k),
                    other => other,
                };
                assert_eq!(got, *cell, "stripe {stripe} disk {disk}");
                match g.role(stripe, disk) {
                    Data(k) => assert_eq!(g.data_disk(stripe, k), disk),
                    P => assert_eq!(g.parity_disk(stripe), disk),
                    Q => assert_eq!(g.q_disk(stripe), Some(disk)),
                }
            }
        }
        assert_eq!(g.data_bytes(), 3 * g.disk_bytes);
        assert_eq!(g.row_bytes(), 3 * g.chunk_bytes);
    }

    #[test]
    fn geometry_validation() {
        assert!(geometry(Level::Raid1, 2).validate().is_ok());
        assert!(geometry(Level::Raid5, 3).validate().is_ok());
        assert!(geometry(Level::Raid1, 1).validate().is_err());
        assert!(geometry(Level::Raid5, 2).validate().is_err());
        assert!(geometry(Level::Raid6, 4).validate().is_ok());
        assert!(geometry(Level::Raid6, 3).validate().is_err());
        for chunk in [0, 2048, 4096 + 4096 * 2, 32 << 20] {
            let g = Geometry {
                chunk_bytes: chunk,
                disk_bytes: 96 << 20,
                ..geometry(Level::Raid5, 3)
            };
            assert!(
                matches!(g.validate(), Err(RaidError::InvalidGeometry(_))),
                "{chunk}"
            );
        }
        for disk_bytes in [0, 8192 + 4096] {
            let g = Geometry {
                disk_bytes,
                ..geometry(Level::Raid5, 3)
            };
            assert!(g.validate().is_err(), "{disk_bytes}");
        }
        let g = Geometry {
            chunk_bytes: 16 << 20,
            disk_bytes: 32 << 20,
            ..geometry(Level::Raid1, 3)
        };
        assert!(g.validate().is_ok());
        assert_eq!(geometry(Level::Raid1, 3).data_bytes(), 64 * 1024);
        assert_eq!(geometry(Level::Raid5, 4).data_bytes(), 3 * 64 * 1024);
        let huge = Geometry {
            disks: 1 << 20,
            chunk_bytes: 4096,
            disk_bytes: 1 << 50,
            level: Level::Raid5,
        };
        assert!(huge.validate().is_err());
    }

    #[test]
    fn xor_matches_bytewise() {
        for len in [0usize, 1, 7, 8, 9, 63, 64, 4096, 4099] {
            let a: Vec<u8> = (0..len).map(|i| (i * 31 + 7) as u8).collect();
            let b: Vec<u8> = (0..len).map(|i| (i * 17 + 3) as u8).collect();
            let mut x = a.clone();
            xor_into(&mut x, &b);
            let expected: Vec<u8> = a.iter().zip(&b).map(|(p, q)| p ^ q).collect();
            assert_eq!(x, expected, "{len}");
        }
    }

    #[test]
    fn engine_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<RaidEngine>();
    }
}
