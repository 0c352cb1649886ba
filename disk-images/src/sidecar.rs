//! The checksum sidecar's byte format: a fixed header, one CRC32 per block, and
//! one write-in-flight word per block. This module owns encoding and validating
//! the header and the layout; it does no I/O.
//!
//! All integers are little-endian.
//!
//! | offset   | size | field         | value                                       |
//! |---------:|-----:|---------------|---------------------------------------------|
//! | 0        | 8    | magic         | ASCII `EMUCRC32`                            |
//! | 8        | 4    | version       | `2` (`1`: no pending table, see below)      |
//! | 12       | 4    | block_size    | bytes per checksummed block, `4096`         |
//! | 16       | 8    | image_size    | length of the raw image in bytes            |
//! | 24       | 8    | block_count   | `n = image_size / block_size`               |
//! | 32       | 4    | header_crc    | CRC32 (IEEE) of bytes 0..32                  |
//! | 36       | 4    | reserved      | zero                                        |
//! | 40       | 24   | intent        | the write-intent record: a boot stamp and two region bitmaps, zero when nothing is unflushed; see [`crate::intent`] (not covered by `header_crc`) |
//! | 64       | 4·n  | entries       | CRC32 (IEEE) of block *i* at `64 + 4·i`     |
//! | P        | 8·n  | pending       | block *i*'s write-in-flight word at `P + 8·i`, where `P` is `64 + 4·n` rounded up to a multiple of 8 |
//!
//! A pending word is `0` unless a write of its block is in flight:
//!
//! | bits  | meaning                                                            |
//! |------:|--------------------------------------------------------------------|
//! | 63    | [`PENDING`]: a writer is changing the block's bytes and CRC        |
//! | 62    | [`TRUSTED`]: the bytes being overwritten were good data, so a write cut short may leave each byte old or new, and either is acceptable (a host write); clear for a repair, whose old bytes are not trusted |
//! | 61    | [`CRC_UNKNOWN`]: the new bytes' CRC is not recorded (a host write computes it after copying them, from bytes in cache) |
//! | 32–60 | zero                                                               |
//! | 0–31  | the CRC32 of the block's new bytes, unless bit 61 is set           |
//!
//! A writer sets the word before it changes the bytes and clears it after it has
//! stored the new CRC, so a writer killed half-way leaves behind exactly the
//! blocks it was changing (see `DiskImage`'s interrupted-write rules).
//!
//! Version 1 files (written before the pending table existed) are the same
//! without it; opened for writing, they are upgraded in place (the file is
//! extended with zero words and the header rewritten), and opened read-only they
//! are read as they are.

use std::fmt;

/// Bytes in the sidecar header; entries start here.
pub const HEADER_LEN: usize = 64;
/// The sidecar magic.
pub const MAGIC: [u8; 8] = *b"EMUCRC32";
/// The version this code writes.
pub const VERSION: u32 = 2;
/// The version before the pending table: still read, and upgraded when opened
/// for writing.
pub const VERSION_WITHOUT_PENDING: u32 = 1;
/// Bytes per checksummed block.
pub const BLOCK_SIZE: u32 = 4096;
/// Bytes per entry.
pub const ENTRY_LEN: usize = 4;
/// Bytes per pending word.
pub const PENDING_LEN: usize = 8;
/// Pending-word bit: a write of the block is in flight.
pub const PENDING: u64 = 1 << 63;
/// Pending-word bit: the bytes being overwritten were trusted (a host write).
pub const TRUSTED: u64 = 1 << 62;
/// Pending-word bit: the new bytes' CRC is not recorded (a host write, which
/// computes it after the copy).
pub const CRC_UNKNOWN: u64 = 1 << 61;

/// What the header says about the image it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SidecarHeader {
    /// Length of the raw image in bytes.
    pub image_size: u64,
    /// Number of blocks, `image_size / BLOCK_SIZE`.
    pub block_count: u64,
    /// Format version: [`VERSION`], or [`VERSION_WITHOUT_PENDING`].
    pub version: u32,
}

/// Why a header was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderProblem {
    /// Shorter than [`HEADER_LEN`].
    Short(usize),
    /// The first 8 bytes are not [`MAGIC`]: not a sidecar of ours.
    BadMagic([u8; 8]),
    /// A version this code does not know.
    UnknownVersion(u32),
    /// A block size other than [`BLOCK_SIZE`].
    UnsupportedBlockSize(u32),
    /// The header's own CRC does not match.
    HeaderCrc { stored: u32, computed: u32 },
    /// `block_count` is not `image_size / block_size`.
    Inconsistent { image_size: u64, block_count: u64 },
}

impl fmt::Display for HeaderProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Short(len) => write!(f, "header is {len} bytes, need {HEADER_LEN}"),
            Self::BadMagic(magic) => write!(
                f,
                "bad magic {:?} (not an emulator checksum file)",
                String::from_utf8_lossy(magic)
            ),
            Self::UnknownVersion(version) => write!(
                f,
                "unknown version {version} (this build reads versions {VERSION_WITHOUT_PENDING} and {VERSION})"
            ),
            Self::UnsupportedBlockSize(size) => {
                write!(f, "block size {size}, only {BLOCK_SIZE} is supported")
            }
            Self::HeaderCrc { stored, computed } => write!(
                f,
                "header checksum {stored:#010x} does not match computed {computed:#010x}"
            ),
            Self::Inconsistent {
                image_size,
                block_count,
            } => write!(f, "header says {block_count} blocks for {image_size} bytes"),
        }
    }
}

impl SidecarHeader {
    /// Header for an image of `image_size` bytes (a multiple of [`BLOCK_SIZE`]).
    pub fn for_image(image_size: u64) -> Self {
        debug_assert_eq!(image_size % u64::from(BLOCK_SIZE), 0);
        Self {
            image_size,
            block_count: image_size / u64::from(BLOCK_SIZE),
            version: VERSION,
        }
    }

    /// Total sidecar file length for this header (and its version).
    pub fn file_len(&self) -> u64 {
        if self.has_pending() {
            self.pending_base() + self.block_count * PENDING_LEN as u64
        } else {
            self.crc_end()
        }
    }

    /// Whether this version has the pending table.
    pub fn has_pending(&self) -> bool {
        self.version != VERSION_WITHOUT_PENDING
    }

    /// The same header at the current version (what an upgrade writes).
    pub fn upgraded(&self) -> Self {
        Self {
            version: VERSION,
            ..*self
        }
    }

    /// End of the CRC entries.
    fn crc_end(&self) -> u64 {
        HEADER_LEN as u64 + self.block_count * ENTRY_LEN as u64
    }

    /// Byte offset of the pending table (`P` in the layout table).
    pub fn pending_base(&self) -> u64 {
        self.crc_end().next_multiple_of(PENDING_LEN as u64)
    }

    /// Byte offset of block `block`'s entry.
    pub fn entry_offset(block: u64) -> u64 {
        HEADER_LEN as u64 + block * ENTRY_LEN as u64
    }

    /// Encodes the header.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0..8].copy_from_slice(&MAGIC);
        out[8..12].copy_from_slice(&self.version.to_le_bytes());
        out[12..16].copy_from_slice(&BLOCK_SIZE.to_le_bytes());
        out[16..24].copy_from_slice(&self.image_size.to_le_bytes());
        out[24..32].copy_from_slice(&self.block_count.to_le_bytes());
        let crc = crc32fast::hash(&out[0..32]);
        out[32..36].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes and validates a header.
    pub fn decode(bytes: &[u8]) -> Result<Self, HeaderProblem> {
        if bytes.len() < HEADER_LEN {
            return Err(HeaderProblem::Short(bytes.len()));
        }
        let u32_at = |at: usize| {
            u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        let u64_at = |at: usize| {
            let mut raw = [0u8; 8];
            raw.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(raw)
        };
        let mut magic = [0u8; 8];
        magic.copy_from_slice(&bytes[0..8]);
        if magic != MAGIC {
            return Err(HeaderProblem::BadMagic(magic));
        }
        let version = u32_at(8);
        if version != VERSION && version != VERSION_WITHOUT_PENDING {
            return Err(HeaderProblem::UnknownVersion(version));
        }
        let stored = u32_at(32);
        let computed = crc32fast::hash(&bytes[0..32]);
        if stored != computed {
            return Err(HeaderProblem::HeaderCrc { stored, computed });
        }
        let block_size = u32_at(12);
        if block_size != BLOCK_SIZE {
            return Err(HeaderProblem::UnsupportedBlockSize(block_size));
        }
        let image_size = u64_at(16);
        let block_count = u64_at(24);
        if !image_size.is_multiple_of(u64::from(BLOCK_SIZE))
            || block_count != image_size / u64::from(BLOCK_SIZE)
        {
            return Err(HeaderProblem::Inconsistent {
                image_size,
                block_count,
            });
        }
        Ok(Self {
            image_size,
            block_count,
            version,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn header_round_trips(blocks in 1u64..(1 << 40)) {
            let header = SidecarHeader::for_image(blocks * u64::from(BLOCK_SIZE));
            prop_assert_eq!(SidecarHeader::decode(&header.encode()), Ok(header));
        }

        #[test]
        fn any_single_byte_flip_in_the_first_36_bytes_is_caught(at in 0usize..36, bit in 0u8..8) {
            let mut bytes = SidecarHeader::for_image(1 << 30).encode();
            bytes[at] ^= 1 << bit;
            prop_assert!(SidecarHeader::decode(&bytes).is_err());
        }
    }

    #[test]
    fn foreign_file_is_named_as_such() {
        let problem = SidecarHeader::decode(&[0x7f; 64]).expect_err("foreign");
        assert!(matches!(problem, HeaderProblem::BadMagic(_)));
        assert!(problem
            .to_string()
            .contains("not an emulator checksum file"));
    }

    #[test]
    fn layout_is_as_documented() {
        let bytes = SidecarHeader::for_image(8192).encode();
        assert_eq!(&bytes[0..8], b"EMUCRC32");
        assert_eq!(bytes[8..12], [2, 0, 0, 0]);
        assert_eq!(bytes[12..16], 4096u32.to_le_bytes());
        assert_eq!(bytes[16..24], 8192u64.to_le_bytes());
        assert_eq!(bytes[24..32], 2u64.to_le_bytes());
        // Reserved, and the write-intent record, zero in a new header.
        assert!(bytes[36..].iter().all(|&b| b == 0));
        assert_eq!(SidecarHeader::entry_offset(1), 68);
        // 64 + 4·2 = 72 is already a multiple of 8; 3 blocks: 76 rounds up to 80.
        let two = SidecarHeader::for_image(8192);
        assert_eq!((two.pending_base(), two.file_len()), (72, 72 + 16));
        let three = SidecarHeader::for_image(3 * 4096);
        assert_eq!((three.pending_base(), three.file_len()), (80, 80 + 24));
    }

    #[test]
    fn version_1_is_read_and_upgrades_to_2() {
        let v1 = SidecarHeader {
            version: VERSION_WITHOUT_PENDING,
            ..SidecarHeader::for_image(3 * 4096)
        };
        let decoded = SidecarHeader::decode(&v1.encode()).expect("version 1 decodes");
        assert_eq!(decoded, v1);
        assert!(!decoded.has_pending());
        assert_eq!(decoded.file_len(), 64 + 12);
        let v2 = decoded.upgraded();
        assert_eq!(v2, SidecarHeader::for_image(3 * 4096));
        assert_eq!(v2.file_len(), 80 + 24);
    }
}
