//! The work one partition of a task stands for: scrubbing or rebuilding a range
//! of member offsets, block row by block row (a row is the same 4 KiB-aligned
//! block on every member), on an array that hosts keep reading and writing:
//! every piece is done under its stripe's lock
//! ([`RaidEngine::lock_stripe_shared`] / [`RaidEngine::lock_stripe_exclusive`]),
//! which is held across processes when the array is shared, so a host write and
//! the rebuild or scrub of the same stripe never interleave.
//!
//! Both are idempotent: running a range twice gives the same result, which the
//! coordination object's lease takeover relies on.

use std::sync::Arc;

use crate::findings::Findings;
use disk_images::{ImageError, BLOCK_BYTES};

use crate::pq::{self, Role};
use crate::raid::{
    array_state, pq_stripe, xor_into, ArrayState, Geometry, Level, MemberState, RaidEngine,
};

/// Bytes handled between progress reports.
pub const STEP_BYTES: u64 = 1024 * 1024;

/// Why work on a range stopped.
#[derive(Debug, thiserror::Error)]
pub enum WorkError {
    /// A member failed with something other than a media error.
    #[error("member {index}: {source}")]
    Member {
        /// Member index.
        index: usize,
        /// The error.
        #[source]
        source: ImageError,
    },
    /// The caller asked to stop (lease lost, cancel).
    #[error("stopped")]
    Stopped,
    /// The member being rebuilt is no longer in that state (it failed again,
    /// was replaced by another image, or another rebuild finished it).
    #[error("disk {0} is no longer the disk being rebuilt")]
    TargetChanged(usize),
    /// Another member failed: the array has FAILED, nothing can be rebuilt.
    #[error("the array has FAILED (another member failed): the rebuild stops")]
    ArrayFailed,
    /// The array's configuration could not be loaded.
    #[error(transparent)]
    Raid(crate::raid::RaidError),
}

/// The members of an array with what the work needs to know about them,
/// sampled under a stripe lock.
#[derive(Debug, Clone)]
pub struct Members {
    /// Geometry.
    pub geometry: Geometry,
    /// Member disks, in RAID order.
    pub images: Vec<Arc<dyn crate::member::Member>>,
    /// Member states.
    pub states: Vec<MemberState>,
    /// Which members may be read (active, not failed or being rebuilt).
    pub readable: Vec<bool>,
}

impl Members {
    /// The engine's current view.
    fn of(engine: &RaidEngine) -> Result<Self, WorkError> {
        let view = engine.view().map_err(WorkError::Raid)?;
        Ok(Self {
            geometry: engine.geometry(),
            images: view.images.clone(),
            states: view.states.clone(),
            readable: (0..view.states.len()).map(|i| view.readable(i)).collect(),
        })
    }
}

fn read_block(
    members: &Members,
    index: usize,
    offset: u64,
    buf: &mut [u8],
) -> Result<bool, WorkError> {
    match members.images[index].read_at(offset, buf) {
        Ok(()) => Ok(true),
        Err(ImageError::Media(_)) => Ok(false),
        Err(source) => Err(WorkError::Member { index, source }),
    }
}

fn write_block(members: &Members, index: usize, offset: u64, data: &[u8]) -> Result<(), WorkError> {
    members.images[index]
        .rewrite_at(offset, data)
        .map_err(|source| WorkError::Member { index, source })
}

/// The CRC32 of the XOR of `terms` equal-length blocks, from their CRCs: CRC32
/// is affine over GF(2) for a fixed length (`crc(x) = L(x) ^ crc(zeros)`), so
/// `crc(a ^ b ^ ...) = crc(a) ^ crc(b) ^ ...`, plus `crc(zeros)` once more when
/// the number of terms is even.
/// `zero_crc` is [`disk_images::image::zero_block_crc`].
///
/// Scrub's fast path uses this to check redundancy without touching the bytes
/// again: blocks whose bytes match their CRCs are consistent (RAID-5: their XOR
/// is all zeros; RAID-1: they are equal) exactly when the CRCs say so, except
/// for a difference that is a multiple of the CRC polynomial, which a CRC32
/// cannot see: never one confined to 32 consecutive bits, 1 in 2^32 of random
/// ones. What the CRCs flag is then compared byte by byte.
fn xor_crc(crcs: impl Iterator<Item = u32>, terms: usize, zero_crc: u32) -> u32 {
    let sum = crcs.fold(0, |acc, crc| acc ^ crc);
    if terms.is_multiple_of(2) {
        sum ^ zero_crc
    } else {
        sum
    }
}

/// Whether RAID-5 blocks whose bytes match the CRCs `crcs` (one per member,
/// parity included) XOR to zeros, judged from the CRCs (see [`xor_crc`]).
fn parity_holds_by_crc(crcs: impl ExactSizeIterator<Item = u32>, zero_crc: u32) -> bool {
    let terms = crcs.len();
    xor_crc(crcs, terms, zero_crc) == zero_crc
}

/// Bytes per member handled at once on the fast path: the default chunk, so
/// every member's piece together stays in L2.
const UNIT_BYTES: u64 = 64 * 1024;
const UNIT_BLOCKS: usize = UNIT_BYTES as usize / BLOCK_BYTES;

/// Buffers for the fast path: whole pieces per member, read in bulk
/// ([`DiskImage::read_blocks`]: one `pread`, every CRC checked) with no
/// per-block work unless something is wrong (then the piece is redone block by
/// block).
struct Units {
    buffers: Vec<Vec<u8>>,
    crcs: Vec<Vec<u32>>,
    sum: Vec<u8>,
    sum_crcs: Vec<u32>,
    zero_crc: u32,
}

impl Units {
    fn new(disks: usize) -> Self {
        Self {
            buffers: vec![vec![0; UNIT_BYTES as usize]; disks],
            crcs: vec![vec![0; UNIT_BLOCKS]; disks],
            sum: vec![0; UNIT_BYTES as usize],
            sum_crcs: vec![0; UNIT_BLOCKS],
            zero_crc: disk_images::image::zero_block_crc(),
        }
    }

    /// Reads the piece from every member `wanted` picks into `buffers` (and
    /// their verified CRCs into `crcs`); false on any media error, or for a
    /// piece that is not whole blocks (the caller takes the slow path).
    fn read(
        &mut self,
        members: &Members,
        wanted: impl Fn(usize) -> bool,
        offset: u64,
        len: u64,
    ) -> Result<bool, WorkError> {
        let block = BLOCK_BYTES as u64;
        if !offset.is_multiple_of(block) || !len.is_multiple_of(block) || len > UNIT_BYTES {
            return Ok(false);
        }
        let (bytes, blocks) = (len as usize, len as usize / BLOCK_BYTES);
        for index in (0..members.images.len()).filter(|&i| wanted(i)) {
            let read = members.images[index].read_blocks(
                offset,
                &mut self.buffers[index][..bytes],
                &mut self.crcs[index][..blocks],
            );
            match read {
                Ok(()) => {}
                Err(ImageError::Media(_)) => return Ok(false),
                Err(source) => return Err(WorkError::Member { index, source }),
            }
        }
        Ok(true)
    }

    /// Checks a piece whose blocks all pass their CRC; false if anything needs
    /// the slow path (a media error, or redundancy that does not agree).
    fn scrub_fast(
        &mut self,
        members: &Members,
        offset: u64,
        len: u64,
        findings: &mut Findings,
    ) -> Result<bool, WorkError> {
        if !self.read(members, |i| members.readable[i], offset, len)? {
            return Ok(false);
        }
        // Every block read matches its CRC, so redundancy is checked on the
        // CRCs (see `xor_crc`); anything that does not add up is
        // compared byte by byte on the slow path.
        let (bytes, blocks) = (len as usize, len as usize / BLOCK_BYTES);
        let disks = members.images.len();
        let all_readable = members.readable.iter().all(|&r| r);
        let consistent = match members.geometry.level {
            // Degraded RAID-5: nothing left to compare against.
            Level::Raid5 if !all_readable => true,
            Level::Raid5 => (0..blocks).all(|block| {
                parity_holds_by_crc(self.crcs.iter().map(|crcs| crcs[block]), self.zero_crc)
            }),
            // Degraded RAID-6: checked block by block, on what redundancy is left.
            Level::Raid6 if !all_readable => false,
            Level::Raid6 => {
                // P on the CRCs, as RAID-5's parity; Q computed and compared.
                let stripe = offset / members.geometry.chunk_bytes;
                let g = &members.geometry;
                let q_disk = g.q_disk(stripe).expect("a RAID-6 Q disk");
                let p_holds = (0..blocks).all(|block| {
                    let crcs = (0..disks)
                        .filter(|&i| i != q_disk)
                        .map(|i| self.crcs[i][block]);
                    xor_crc(crcs, disks - 1, self.zero_crc) == self.zero_crc
                });
                let data: Vec<&[u8]> = (0..g.data_disks())
                    .map(|k| &self.buffers[g.data_disk(stripe, k)][..bytes])
                    .collect();
                p_holds && {
                    pq::q_syndrome(&data, &mut self.sum[..bytes]);
                    self.sum[..bytes] == self.buffers[q_disk][..bytes]
                }
            }
            Level::Raid1 => {
                let mut copies = (0..self.crcs.len())
                    .filter(|&i| members.readable[i])
                    .map(|i| &self.crcs[i][..blocks]);
                let first = copies.next();
                copies.all(|copy| Some(copy) == first)
            }
        };
        if consistent {
            findings.rows_checked += len / BLOCK_BYTES as u64;
        }
        Ok(consistent)
    }

    /// Rebuilds a piece whose sources all pass their CRC; false on a media
    /// error. The target is written in bulk ([`DiskImage::write_blocks`]) with
    /// CRCs known from the sources: a mirror's own, or for RAID-5 the XOR of the
    /// sources' (see [`xor_crc`]).
    fn rebuild_fast(
        &mut self,
        members: &Members,
        target: usize,
        offset: u64,
        len: u64,
    ) -> Result<bool, WorkError> {
        let (bytes, blocks) = (len as usize, len as usize / BLOCK_BYTES);
        let disks = members.images.len();
        let written = match members.geometry.level {
            Level::Raid5 => {
                if (0..disks).any(|i| i != target && !members.readable[i]) {
                    return Ok(false);
                }
                if !self.read(members, |i| i != target, offset, len)? {
                    return Ok(false);
                }
                let mut sources = (0..disks).filter(|&i| i != target);
                let first = sources.next().unwrap_or(target);
                self.sum[..bytes].copy_from_slice(&self.buffers[first][..bytes]);
                for index in sources {
                    xor_into(&mut self.sum[..bytes], &self.buffers[index][..bytes]);
                }
                for (block, sum) in self.sum_crcs[..blocks].iter_mut().enumerate() {
                    *sum = xor_crc(
                        (0..disks)
                            .filter(|&i| i != target)
                            .map(|i| self.crcs[i][block]),
                        disks - 1,
                        self.zero_crc,
                    );
                }
                members.images[target].write_blocks(
                    offset,
                    &self.sum[..bytes],
                    Some(&self.sum_crcs[..blocks]),
                )
            }
            // Any two missing chunks of a stripe follow from the others.
            Level::Raid6 => {
                let g = &members.geometry;
                let stripe = offset / g.chunk_bytes;
                let mut missing = vec![target];
                missing.extend((0..disks).filter(|&i| i != target && !members.readable[i]));
                if missing.len() > 2 {
                    return Ok(false);
                }
                if !self.read(members, |i| !missing.contains(&i), offset, len)? {
                    return Ok(false);
                }
                let roles: Vec<Role> = missing.iter().map(|&i| g.role(stripe, i)).collect();
                pq::recover(&mut pq_stripe(g, stripe, &mut self.buffers, bytes), &roles);
                members.images[target].write_blocks(offset, &self.buffers[target][..bytes], None)
            }
            // One good mirror is enough: its bytes and CRCs are the target's.
            Level::Raid1 => {
                let Some(source) = (0..disks).find(|&i| i != target && members.readable[i]) else {
                    return Ok(false);
                };
                if !self.read(members, |i| i == source, offset, len)? {
                    return Ok(false);
                }
                members.images[target].write_blocks(
                    offset,
                    &self.buffers[source][..bytes],
                    Some(&self.crcs[source][..blocks]),
                )
            }
        };
        written.map_err(|source| WorkError::Member {
            index: target,
            source,
        })?;
        Ok(true)
    }
}

/// The array offset of the data held at member `index`, member offset `offset`
/// (None for a RAID-5 parity block). The layout itself is [`Geometry`]'s.
fn array_offset(geometry: &Geometry, index: usize, offset: u64) -> Option<u64> {
    match geometry.level {
        Level::Raid1 => Some(offset),
        Level::Raid5 | Level::Raid6 => {
            let stripe = offset / geometry.chunk_bytes;
            let k = geometry.data_index(stripe, index)? as u64;
            Some(
                stripe * geometry.row_bytes()
                    + k * geometry.chunk_bytes
                    + offset % geometry.chunk_bytes,
            )
        }
    }
}

fn parity_member(geometry: &Geometry, offset: u64) -> usize {
    geometry.parity_disk(offset / geometry.chunk_bytes)
}

/// The pieces of member offsets `[start, start+len)` that one stripe lock
/// covers, at most [`UNIT_BYTES`] each: `(stripe, offset, length)`.
fn pieces(geometry: &Geometry, start: u64, len: u64) -> impl Iterator<Item = (u64, u64, u64)> {
    let chunk = geometry.chunk_bytes;
    let end = start + len;
    let mut offset = start;
    std::iter::from_fn(move || {
        if offset >= end {
            return None;
        }
        let stripe = offset / chunk;
        let step = (end - offset)
            .min(UNIT_BYTES - offset % UNIT_BYTES)
            .min((stripe + 1) * chunk - offset);
        let piece = (stripe, offset, step);
        offset += step;
        Some(piece)
    })
}

/// Reports progress after each [`STEP_BYTES`] of work.
struct Reporter<F> {
    start: u64,
    next: u64,
    progress: F,
}

impl<F: FnMut(u64, &Findings) -> bool> Reporter<F> {
    fn new(start: u64, progress: F) -> Self {
        Self {
            start,
            next: start + STEP_BYTES,
            progress,
        }
    }

    /// Called with no lock held (the callback may sleep to pace the work).
    fn after(&mut self, offset: u64, so_far: &Findings) -> Result<(), WorkError> {
        if offset >= self.next {
            self.next = offset + STEP_BYTES;
            if !(self.progress)(offset - self.start, so_far) {
                return Err(WorkError::Stopped);
            }
        }
        Ok(())
    }
}

/// Scrubs member offsets `[start, start+len)` of the array behind `engine`,
/// while hosts keep using it: checks every readable member block's CRC and
/// every row's parity or mirror consistency; with `repair`, rewrites what
/// redundancy can fix. Each piece is checked under its stripe's shared lock
/// and, if anything is wrong, redone block by block under the exclusive lock,
/// so a host write in flight is never mistaken for a mismatch.
/// `progress(bytes_done, findings_so_far)` is called every [`STEP_BYTES`];
/// returning `false` stops the work.
pub fn scrub_range(
    engine: &RaidEngine,
    start: u64,
    len: u64,
    repair: bool,
    progress: impl FnMut(u64, &Findings) -> bool,
) -> Result<Findings, WorkError> {
    let geometry = engine.geometry();
    let mut findings = Findings::default();
    let mut units = Units::new(geometry.disks);
    let mut reporter = Reporter::new(start, progress);
    for (stripe, offset, unit) in pieces(&geometry, start, len) {
        let clean = {
            let _guard = engine.lock_stripe_shared(stripe);
            let members = Members::of(engine)?;
            units.scrub_fast(&members, offset, unit, &mut findings)?
        };
        if !clean {
            let _guard = engine.lock_stripe_exclusive(stripe);
            let members = Members::of(engine)?;
            scrub_blocks(&members, offset, unit, repair, &mut findings)?;
        }
        reporter.after(offset + unit, &findings)?;
    }
    Ok(findings)
}

/// Block-by-block scrub of `[start, start+len)`: the slow path that finds out
/// exactly which block is wrong and repairs it.
fn scrub_blocks(
    members: &Members,
    start: u64,
    len: u64,
    repair: bool,
    findings: &mut Findings,
) -> Result<(), WorkError> {
    let disks = members.geometry.disks;
    let mut blocks = vec![vec![0u8; BLOCK_BYTES]; disks];
    let mut good = vec![false; disks];
    let mut offset = start;
    while offset < start + len {
        for index in 0..disks {
            good[index] =
                members.readable[index] && read_block(members, index, offset, &mut blocks[index])?;
            if members.readable[index] && !good[index] {
                findings.checksum_errors += 1;
            }
        }
        findings.rows_checked += 1;
        let bad: Vec<usize> = (0..disks).filter(|&i| !good[i]).collect();
        match members.geometry.level {
            Level::Raid5 => match bad.as_slice() {
                [] => {
                    let mut sum = vec![0u8; BLOCK_BYTES];
                    blocks.iter().for_each(|b| xor_into(&mut sum, b));
                    if sum.iter().any(|&b| b != 0) {
                        findings.parity_mismatches += 1;
                        if repair {
                            // The data is what hosts wrote; the parity is derived.
                            let parity = parity_member(&members.geometry, offset);
                            xor_into(&mut blocks[parity], &sum);
                            write_block(members, parity, offset, &blocks[parity])?;
                            findings.repaired += 1;
                        }
                    }
                }
                [lost] => {
                    if members.readable[*lost] && repair {
                        let mut rebuilt = vec![0u8; BLOCK_BYTES];
                        (0..disks)
                            .filter(|i| i != lost)
                            .for_each(|i| xor_into(&mut rebuilt, &blocks[i]));
                        write_block(members, *lost, offset, &rebuilt)?;
                        findings.repaired += 1;
                    }
                }
                // Every data block of the row that is not readable is lost,
                // a failed (or not yet rebuilt) member's included.
                _ => findings.unrecoverable.extend(
                    bad.iter()
                        .filter_map(|&i| array_offset(&members.geometry, i, offset)),
                ),
            },
            Level::Raid6 => scrub_raid6_row(members, &mut blocks, &bad, offset, repair, findings)?,
            Level::Raid1 => match (0..disks).find(|&i| good[i]) {
                None => findings.unrecoverable.push(offset),
                Some(source) => {
                    let disagree: Vec<usize> = (0..disks)
                        .filter(|&i| good[i] && blocks[i] != blocks[source])
                        .collect();
                    if !disagree.is_empty() {
                        findings.parity_mismatches += 1;
                    }
                    if repair {
                        let copy = blocks[source].clone();
                        for index in (0..disks)
                            .filter(|&i| members.readable[i] && (!good[i] || disagree.contains(&i)))
                        {
                            write_block(members, index, offset, &copy)?;
                            findings.repaired += 1;
                        }
                    }
                }
            },
        }
        offset += BLOCK_BYTES as u64;
    }
    Ok(())
}

/// One block row of a RAID-6 scrub: `blocks` holds every member's block at
/// `offset`, `bad` the members whose block could not be read (failed, being
/// rebuilt, or a media error). Up to two are recovered (and, with `repair`, the
/// readable ones rewritten); the redundancy that recovery did not use is then
/// checked against the data, and a P or Q that disagrees is a parity mismatch
/// (with `repair`, rewritten from the data: the data is what hosts wrote).
/// With more than two bad, the data blocks among them are lost.
fn scrub_raid6_row(
    members: &Members,
    blocks: &mut [Vec<u8>],
    bad: &[usize],
    offset: u64,
    repair: bool,
    findings: &mut Findings,
) -> Result<(), WorkError> {
    let g = &members.geometry;
    let stripe = offset / g.chunk_bytes;
    let missing: Vec<Role> = bad.iter().map(|&i| g.role(stripe, i)).collect();
    if !pq::recover(&mut pq_stripe(g, stripe, blocks, BLOCK_BYTES), &missing) {
        findings
            .unrecoverable
            .extend(bad.iter().filter_map(|&i| array_offset(g, i, offset)));
        return Ok(());
    }
    let mut expected = blocks.to_vec();
    pq::recover(
        &mut pq_stripe(g, stripe, &mut expected, BLOCK_BYTES),
        &[Role::P, Role::Q],
    );
    let parity = [
        g.parity_disk(stripe),
        g.q_disk(stripe).expect("a RAID-6 Q disk"),
    ];
    let disagree: Vec<usize> = parity
        .into_iter()
        .filter(|&i| members.readable[i] && expected[i] != blocks[i])
        .collect();
    if !disagree.is_empty() {
        findings.parity_mismatches += 1;
    }
    if repair {
        for &index in bad.iter().filter(|&&i| members.readable[i]) {
            write_block(members, index, offset, &blocks[index])?;
            findings.repaired += 1;
        }
        for &index in &disagree {
            write_block(members, index, offset, &expected[index])?;
            findings.repaired += 1;
        }
    }
    Ok(())
}

/// Rebuilds member `target`'s offsets `[start, start+len)` from the other
/// members, while hosts keep using the array: each piece under its stripe's
/// exclusive lock (host writes to the stripe go to the target too, so once a
/// stripe is rebuilt it stays current). Returns the blocks rebuilt and the
/// array offsets that could not be reconstructed (a source block failed its CRC
/// too); those blocks of the target are marked unreadable (see
/// `rebuild_blocks`). Stops with [`WorkError::TargetChanged`] if `target` is no
/// longer the member being rebuilt.
pub fn rebuild_range(
    engine: &RaidEngine,
    target: usize,
    start: u64,
    len: u64,
    progress: impl FnMut(u64, &Findings) -> bool,
) -> Result<Findings, WorkError> {
    let geometry = engine.geometry();
    // Only `unrecoverable` is used: what `progress` sees so far.
    let mut found = Findings::default();
    let mut units = Units::new(geometry.disks);
    let mut reporter = Reporter::new(start, progress);
    // The image being rebuilt, as at the start: if the disk is failed and
    // replaced meanwhile, the new image is not this range's to fill.
    let mut target_image: Option<std::path::PathBuf> = None;
    for (stripe, offset, unit) in pieces(&geometry, start, len) {
        {
            let _guard = engine.lock_stripe_exclusive(stripe);
            let members = Members::of(engine)?;
            if members.states.get(target) != Some(&MemberState::Rebuilding) {
                return Err(WorkError::TargetChanged(target));
            }
            let image = members.images[target].path();
            if *target_image.get_or_insert_with(|| image.to_path_buf()) != image {
                return Err(WorkError::TargetChanged(target));
            }
            if array_state(geometry, &members.states) == ArrayState::Failed {
                return Err(WorkError::ArrayFailed);
            }
            if !units.rebuild_fast(&members, target, offset, unit)? {
                rebuild_blocks(&members, target, offset, unit, &mut found.unrecoverable)?;
            }
        }
        reporter.after(offset + unit, &found)?;
    }
    found.rows_checked = len / BLOCK_BYTES as u64;
    Ok(found)
}

/// Block-by-block rebuild: the slow path that finds which blocks cannot be
/// reconstructed. Such a block of the rebuilt disk is marked unreadable
/// ([`DiskImage::mark_unreadable`]), so that it, and anything later
/// reconstructed from it, reads as a media error, never as zeros; its array
/// offset is reported, and so is that of a source block whose media error made
/// it so (its data needed the lost block to be rebuilt). Unless a host wrote
/// the block since the disk was put in: then it is current, and kept (a host
/// write of zeros cannot be told from a block never written, and is lost).
fn rebuild_blocks(
    members: &Members,
    target: usize,
    start: u64,
    len: u64,
    unrecoverable: &mut Vec<u64>,
) -> Result<(), WorkError> {
    let disks = members.geometry.disks;
    let mut block = vec![0u8; BLOCK_BYTES];
    let mut rebuilt = vec![0u8; BLOCK_BYTES];
    let mut offset = start;
    while offset < start + len {
        let mut complete = true;
        let mut bad_sources = Vec::new();
        match members.geometry.level {
            Level::Raid5 => {
                rebuilt.fill(0);
                for index in (0..disks).filter(|&i| i != target) {
                    if !members.readable[index] || !read_block(members, index, offset, &mut block)?
                    {
                        complete = false;
                        bad_sources.push(index);
                        continue;
                    }
                    xor_into(&mut rebuilt, &block);
                }
            }
            Level::Raid6 => {
                let g = &members.geometry;
                let stripe = offset / g.chunk_bytes;
                let mut chunks = vec![vec![0u8; BLOCK_BYTES]; disks];
                let mut missing = vec![g.role(stripe, target)];
                for index in (0..disks).filter(|&i| i != target) {
                    if !members.readable[index]
                        || !read_block(members, index, offset, &mut chunks[index])?
                    {
                        missing.push(g.role(stripe, index));
                        bad_sources.push(index);
                    }
                }
                complete = pq::recover(
                    &mut pq_stripe(g, stripe, &mut chunks, BLOCK_BYTES),
                    &missing,
                );
                rebuilt.copy_from_slice(&chunks[target]);
            }
            Level::Raid1 => {
                complete = false;
                for index in (0..disks).filter(|&i| i != target && members.readable[i]) {
                    if read_block(members, index, offset, &mut rebuilt)? {
                        complete = true;
                        break;
                    }
                }
            }
        }
        // Host writes go to the disk being rebuilt, so a block of it that
        // holds anything but zeros was written since it was put in (by a host
        // or by an earlier pass of this rebuild) and is current.
        if complete {
            write_block(members, target, offset, &rebuilt)?;
        } else if !(read_block(members, target, offset, &mut block)?
            && block.iter().any(|&b| b != 0))
        {
            members.images[target]
                .mark_unreadable(offset, BLOCK_BYTES as u64)
                .map_err(|source| WorkError::Member {
                    index: target,
                    source,
                })?;
            unrecoverable.extend(
                std::iter::once(target)
                    .chain(bad_sources)
                    .filter_map(|index| array_offset(&members.geometry, index, offset)),
            );
        }
        offset += BLOCK_BYTES as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raid5_array_offsets_follow_the_documented_layout() {
        let geometry = Geometry {
            level: Level::Raid5,
            disks: 4,
            chunk_bytes: 4096,
            disk_bytes: 1 << 20,
        };
        // Stripe 0: D0 D1 D2 P; stripe 1: D4 D5 P D3 (see raid.rs).
        assert_eq!(array_offset(&geometry, 0, 0), Some(0));
        assert_eq!(array_offset(&geometry, 2, 0), Some(2 * 4096));
        assert_eq!(array_offset(&geometry, 3, 0), None);
        assert_eq!(array_offset(&geometry, 3, 4096), Some(3 * 4096));
        assert_eq!(array_offset(&geometry, 0, 4096 + 10), Some(4 * 4096 + 10));
        assert_eq!(array_offset(&geometry, 2, 4096), None);
        assert_eq!(parity_member(&geometry, 2 * 4096), 1);
    }

    #[test]
    fn crc_of_an_xor_follows_from_the_terms_crcs() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut block = || {
            (0..BLOCK_BYTES)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect::<Vec<u8>>()
        };
        for terms in 1..6 {
            let blocks: Vec<Vec<u8>> = (0..terms).map(|_| block()).collect();
            let mut sum = vec![0u8; BLOCK_BYTES];
            blocks.iter().for_each(|b| xor_into(&mut sum, b));
            let crcs = blocks.iter().map(|b| crc32fast::hash(b));
            assert_eq!(
                xor_crc(crcs, terms, disk_images::image::zero_block_crc()),
                crc32fast::hash(&sum),
                "{terms} terms"
            );
        }
    }

    #[test]
    fn parity_check_by_crc_finds_every_flipped_bit_and_burst() {
        let zero = disk_images::image::zero_block_crc();
        let mut blocks = vec![vec![0u8; BLOCK_BYTES]; 4];
        for (i, byte) in blocks[0].iter_mut().enumerate() {
            *byte = (i * 31 + 7) as u8;
        }
        blocks[1][100] = 0x5a;
        let parity: Vec<u8> = (0..BLOCK_BYTES)
            .map(|i| blocks[0][i] ^ blocks[1][i] ^ blocks[2][i])
            .collect();
        blocks[3] = parity;
        let crcs = |blocks: &[Vec<u8>]| {
            blocks
                .iter()
                .map(|b| crc32fast::hash(b))
                .collect::<Vec<_>>()
        };
        assert!(parity_holds_by_crc(crcs(&blocks).into_iter(), zero));
        // Any single flipped bit, in any member.
        for bit in 0..BLOCK_BYTES * 8 {
            let member = bit % 4;
            blocks[member][bit / 8] ^= 1 << (bit % 8);
            assert!(
                !parity_holds_by_crc(crcs(&blocks).into_iter(), zero),
                "bit {bit}"
            );
            blocks[member][bit / 8] ^= 1 << (bit % 8);
        }
        // A burst of up to 32 bits.
        for at in (0..BLOCK_BYTES - 4).step_by(61) {
            blocks[2][at..at + 4].iter_mut().for_each(|b| *b ^= 0xff);
            assert!(
                !parity_holds_by_crc(crcs(&blocks).into_iter(), zero),
                "burst at {at}"
            );
            blocks[2][at..at + 4].iter_mut().for_each(|b| *b ^= 0xff);
        }
        assert!(parity_holds_by_crc(crcs(&blocks).into_iter(), zero));
    }
}
