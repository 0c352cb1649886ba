//! The write-intent record: which regions of an image may hold a write that a
//! power loss could leave half on the disk. This module owns the record's place
//! in the sidecar header, the split of an image into regions, and the identity
//! of the running boot; [`crate::DiskImage`] keeps the record and acts on it.
//!
//! A block's bytes and its CRC reach the disk separately: the kernel writes
//! the image's and the sidecar's dirty pages back in any order, whenever it
//! likes, until a flush makes both durable. A process that dies leaves them in
//! the page cache, where the other processes (and the next one) see them, so
//! the sidecar's pending words are enough to settle a write it cut short. A
//! power loss (or a crash of the host's kernel) loses the page cache: a block
//! written since the last flush can come back with its new bytes and its old
//! CRC, or the other way round, with no pending word (it was never synced) to
//! say that a write was in flight. Without more, that block reads as a media
//! error although each of its bytes is old or new, which is all a disk
//! promises of a write that was never flushed.
//!
//! So before the first write into a region, the region's bit is set in the
//! sidecar header and the header synced, the way md's write-intent bitmap
//! works: on the disk, every block that may be half-written lies in a region
//! whose bit is set. The bit stays set while the image is open (clearing it
//! under writers would need them to take a lock on every write); the first
//! process to open the image when no other has it open clears the record,
//! after syncing what earlier processes left in the page cache. The cost is
//! one header sync per region per such session, at most [`REGIONS`] of them
//! per kind, not one per write or per flush.
//!
//! Each bit is stamped with the boot that set it ([`this_boot`], from the
//! kernel's random boot id). A first opener that finds bits set under another
//! boot knows the page cache was lost with them: it checks every block of
//! those regions and settles each that fails its CRC (see
//! `DiskImage::settle_interrupted_write`): a host write (the *host* kind) is
//! kept as it was left, each byte old or new; in a region where a repair or a
//! rebuild wrote (the *repair* kind), whose old bytes were not trusted, the
//! block stays a media error for redundancy to repair. One thing the record
//! cannot tell apart: a block that was damaged at rest (bit rot) in a region
//! that was being written when the power went is kept too.
//!
//! Header fields (little-endian, in the sidecar header's reserved bytes, not
//! covered by the header CRC; zero in a sidecar that has never been written):
//!
//! | offset | size | field                                            |
//! |-------:|-----:|--------------------------------------------------|
//! | 40     | 8    | stamp: the boot that set the bits ([`this_boot`]) |
//! | 48     | 8    | host bits: bit *r* set, region *r* may hold a host write not yet flushed |
//! | 56     | 8    | repair bits: the same for repairs, rebuild writes and blocks marked unreadable |

use std::ops::Range;
use std::sync::OnceLock;

use crate::sidecar::BLOCK_SIZE;

/// Offset of the stamp in the sidecar.
pub const STAMP_OFFSET: usize = 40;
/// Offset of the host bits in the sidecar.
pub const HOST_OFFSET: usize = 48;
/// Offset of the repair bits in the sidecar.
pub const REPAIR_OFFSET: usize = 56;
/// Regions per image (one bit each, per kind).
pub const REGIONS: u64 = 64;

/// Who is writing, which decides what a power loss may leave acceptable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A host write over trusted bytes: each byte old or new is acceptable.
    Host,
    /// A repair, a rebuild write, or a block marked unreadable: only the
    /// complete new state is.
    Repair,
}

impl Kind {
    /// 0 for host, 1 for repair: this kind's word in the lock table.
    pub fn index(self) -> usize {
        match self {
            Self::Host => 0,
            Self::Repair => 1,
        }
    }

    /// The header offset of this kind's bits.
    pub fn offset(self) -> usize {
        match self {
            Self::Host => HOST_OFFSET,
            Self::Repair => REPAIR_OFFSET,
        }
    }
}

/// An image's split into [`REGIONS`] regions of whole blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Regions {
    block_count: u64,
    blocks_per_region: u64,
}

impl Regions {
    /// The regions of an image of `block_count` blocks.
    pub fn for_blocks(block_count: u64) -> Self {
        Self {
            block_count,
            blocks_per_region: block_count.div_ceil(REGIONS).max(1),
        }
    }

    /// The bits of the regions that bytes `[offset, offset+len)` touch
    /// (`len` > 0).
    pub fn mask(&self, offset: u64, len: u64) -> u64 {
        debug_assert!(len > 0);
        let block = u64::from(BLOCK_SIZE);
        let first = offset / block / self.blocks_per_region;
        let last = ((offset + len - 1) / block / self.blocks_per_region).min(REGIONS - 1);
        let width = last - first + 1;
        let ones = if width >= 64 {
            u64::MAX
        } else {
            (1u64 << width) - 1
        };
        ones << first
    }

    /// Whether block `block` lies in one of the regions of `bits`.
    pub fn holds(&self, bits: u64, block: u64) -> bool {
        bits & (1 << (block / self.blocks_per_region).min(REGIONS - 1)) != 0
    }

    /// The blocks of the regions of `bits`, in order, as ranges.
    pub fn blocks(&self, bits: u64) -> impl Iterator<Item = Range<u64>> + '_ {
        (0..REGIONS)
            .filter(move |region| bits & (1 << region) != 0)
            .map(|region| {
                let start = (region * self.blocks_per_region).min(self.block_count);
                let end = ((region + 1) * self.blocks_per_region).min(self.block_count);
                start..end
            })
            .filter(|range| !range.is_empty())
    }
}

/// The running boot, as a number that is never 0: the kernel's random boot id
/// (`/proc/sys/kernel/random/boot_id`, new at every boot), folded to 64 bits.
/// `None` when it cannot be read; then every record found is treated as left
/// by another boot.
pub fn this_boot() -> Option<u64> {
    static BOOT: OnceLock<Option<u64>> = OnceLock::new();
    *BOOT.get_or_init(|| {
        let text = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
        let hex: String = text.chars().filter(char::is_ascii_hexdigit).collect();
        let id = u128::from_str_radix(&hex, 16).ok()?;
        Some(((id >> 64) as u64 ^ id as u64) | 1)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_cover_the_regions_touched() {
        // 640 blocks: 10 blocks a region.
        let regions = Regions::for_blocks(640);
        let block = u64::from(BLOCK_SIZE);
        assert_eq!(regions.mask(0, 1), 1);
        assert_eq!(regions.mask(9 * block, block), 1);
        assert_eq!(regions.mask(9 * block, block + 1), 0b11);
        assert_eq!(regions.mask(639 * block, block), 1 << 63);
        assert_eq!(regions.mask(0, 640 * block), u64::MAX);
        assert!(regions.holds(1 << 2, 25));
        assert!(!regions.holds(1 << 2, 30));
        let ranges: Vec<_> = regions.blocks(0b101).collect();
        assert_eq!(ranges, vec![0..10, 20..30]);
    }

    #[test]
    fn small_images_have_a_block_a_region_and_no_empty_ranges() {
        let regions = Regions::for_blocks(3);
        let block = u64::from(BLOCK_SIZE);
        assert_eq!(regions.mask(2 * block, 1), 0b100);
        assert_eq!(
            regions.blocks(u64::MAX).collect::<Vec<_>>(),
            vec![0..1, 1..2, 2..3]
        );
        // Not a multiple of 64: the last region is short.
        let odd = Regions::for_blocks(130);
        assert_eq!(
            odd.blocks(1 << 63).collect::<Vec<_>>(),
            Vec::<Range<u64>>::new()
        );
        assert_eq!(odd.blocks(1 << 43).collect::<Vec<_>>(), vec![129..130]);
        assert!(odd.holds(1 << 43, 129));
    }

    #[test]
    fn the_boot_is_known_here_and_stable() {
        let boot = this_boot().expect("this machine has a boot id");
        assert_ne!(boot, 0);
        assert_eq!(this_boot(), Some(boot));
    }
}
