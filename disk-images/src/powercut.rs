//! A power loss staged on an image's files, for the emulator's power-loss
//! fault (`controllers::volatile` keeps what a disk's volatile write cache
//! held; this module puts the disk back the way the cut leaves it).
//!
//! Called only when no process has the image open (the fault kills every
//! process of the system first): blocks whose write the cut loses get their
//! bytes and their stored CRC back as they were at the disk's last flush,
//! each block whole (a disk writes a sector all or nothing, and the emulator
//! takes a block's bytes and its CRC for one unit). Then the write-intent
//! record (see [`crate::intent`]) names the regions of every block written
//! since that flush, lost or kept, under a boot that is not this one: the
//! next process to open the image treats them as a real power loss leaves
//! them (checks them, and an array resyncs them across its members, the
//! RAID write hole), although the host never rebooted.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::intent::{self, Kind, Regions};
use crate::sidecar::{SidecarHeader, BLOCK_SIZE, HEADER_LEN};
use crate::{sidecar_path, ImageError, BLOCK_BYTES};

/// A block as it was at the disk's last flush.
#[derive(Debug, Clone, Copy)]
pub struct Before<'a> {
    /// The block.
    pub block: u64,
    /// Its bytes ([`BLOCK_BYTES`] of them).
    pub bytes: &'a [u8],
    /// Its stored CRC.
    pub crc: u32,
}

/// A boot stamp that is not this boot's (never 0).
pub fn another_boot() -> u64 {
    intent::this_boot().map_or(2, |boot| boot ^ 2)
}

/// Puts `lost` back in `image` and its sidecar, marks the regions of the
/// `written` blocks (who wrote each) in the write-intent record under
/// [`another_boot`], and syncs both files.
pub fn stage(image: &Path, lost: &[Before<'_>], written: &[(u64, Kind)]) -> Result<(), ImageError> {
    let sidecar = sidecar_path(image);
    let open = |path: &Path| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| ImageError::Io {
                path: path.to_path_buf(),
                operation: "open for the power cut",
                source,
            })
    };
    let io = |path: &Path, operation: &'static str| {
        let path = path.to_path_buf();
        move |source| ImageError::Io {
            path,
            operation,
            source,
        }
    };
    let data = open(image)?;
    let crcs = open(&sidecar)?;
    let mut header = [0u8; HEADER_LEN];
    crcs.read_exact_at(&mut header, 0)
        .map_err(io(&sidecar, "read the header"))?;
    let decoded = SidecarHeader::decode(&header).map_err(|problem| ImageError::Io {
        path: sidecar.clone(),
        operation: "read the header",
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, problem.to_string()),
    })?;
    let block_size = u64::from(BLOCK_SIZE);
    for before in lost {
        assert_eq!(before.bytes.len(), BLOCK_BYTES, "one block");
        if before.block >= decoded.block_count {
            // The block number comes from an undo log: a file, not trusted.
            return Err(ImageError::Io {
                path: image.to_path_buf(),
                operation: "put a block back",
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "block {} is past the image's {} blocks",
                        before.block, decoded.block_count
                    ),
                ),
            });
        }
        data.write_all_at(before.bytes, before.block * block_size)
            .map_err(io(image, "put a block back"))?;
        crcs.write_all_at(
            &before.crc.to_le_bytes(),
            SidecarHeader::entry_offset(before.block),
        )
        .map_err(io(&sidecar, "put a CRC back"))?;
    }
    let regions = Regions::for_blocks(decoded.block_count);
    let word = |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().expect("8 bytes"));
    let (mut host, mut repair) = (word(intent::HOST_OFFSET), word(intent::REPAIR_OFFSET));
    for &(block, kind) in written {
        let mask = regions.mask(block * block_size, block_size);
        match kind {
            Kind::Host => host |= mask,
            Kind::Repair => repair |= mask,
        }
    }
    if host | repair != 0 {
        for (at, value) in [
            (intent::STAMP_OFFSET, another_boot()),
            (intent::HOST_OFFSET, host),
            (intent::REPAIR_OFFSET, repair),
        ] {
            crcs.write_all_at(&value.to_le_bytes(), at as u64)
                .map_err(io(&sidecar, "write the write-intent record"))?;
        }
    }
    data.sync_data().map_err(io(image, "fdatasync image"))?;
    crcs.sync_data()
        .map_err(io(&sidecar, "fdatasync checksum file"))
}
