//! Bytes on media: raw disk image files, memory-mapped `MAP_SHARED` so that two
//! controller processes can serve the same disk, with a CRC32-per-4 KiB-block
//! checksum sidecar that is updated on every write and checked on every read.
//!
//! Layers, bottom up:
//! - [`mapping`]: the only module with `unsafe`; copies in and out of a shared
//!   mapping and does atomic word access, never handing out references into it.
//! - [`sidecar`]: the checksum file's byte format.
//! - [`process`]: process identities and liveness, for cross-process locks.
//! - [`blocklocks`]: the block locks every process with the image open shares.
//! - [`intent`]: the write-intent record that survives a power loss.
//! - [`powercut`]: a power loss staged on an image's files (the power-loss
//!   fault).
//! - [`image`]: [`DiskImage`], which keeps data and checksums in step.
//!
//! This crate knows nothing of RAID or NBD; higher crates build on it.

pub mod blocklocks;
pub mod fault;
pub mod image;
pub mod intent;
pub mod mapping;
pub mod powercut;
pub mod process;
pub mod sidecar;

use std::path::PathBuf;

pub use image::{
    sidecar_path, validate_size, Access, BadBlock, DiskImage, Extent, FlushStarted, ImageInfo,
    Stores, VerifyReport, BLOCK_BYTES, BULK_BLOCKS,
};

/// A block whose data does not match its checksum, or that cannot be read (an
/// injected fault): a media error. Never hidden.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("media error in {image}: block {block} (byte offset {offset}) {what}", image = image.display(), offset = block * u64::from(sidecar::BLOCK_SIZE), what = media_what(*expected_crc, *actual_crc, injected.as_deref()))]
pub struct MediaError {
    /// The image file.
    pub image: PathBuf,
    /// Block index.
    pub block: u64,
    /// CRC stored in the sidecar.
    pub expected_crc: u32,
    /// CRC of the data read.
    pub actual_crc: u32,
    /// The fault that made the block unreadable, when one was injected (the
    /// CRCs are then 0).
    pub injected: Option<String>,
}

fn media_what(expected: u32, actual: u32, injected: Option<&str>) -> String {
    match injected {
        Some(fault) => format!("cannot be read (injected fault {fault})"),
        None => format!("has CRC {actual:#010x}, expected {expected:#010x}"),
    }
}

/// Everything that can go wrong with an image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// An operating-system call failed.
    #[error("{operation} {path}: {source}", path = path.display())]
    Io {
        /// File concerned.
        path: PathBuf,
        /// What was being done.
        operation: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A requested size is unusable.
    #[error("invalid size {size} bytes: {reason}")]
    InvalidSize {
        /// The size asked for.
        size: u64,
        /// Why it is refused.
        reason: &'static str,
    },
    /// An existing image's length is unusable.
    #[error("{path} is {size} bytes, which is not a positive multiple of 4 KiB: not an emulator image", path = path.display())]
    BadImageSize {
        /// Image path.
        path: PathBuf,
        /// Its length.
        size: u64,
    },
    /// The path is a directory or device, not a regular file.
    #[error("{path} is not a regular file", path = path.display())]
    NotAFile {
        /// The path.
        path: PathBuf,
    },
    /// Creating would overwrite an existing file.
    #[error("{path} already exists (use --force to overwrite)", path = path.display())]
    Exists {
        /// The existing file.
        path: PathBuf,
    },
    /// The checksum sidecar is not there.
    #[error("checksum file {path} is missing", path = path.display())]
    SidecarMissing {
        /// Where it was expected.
        path: PathBuf,
    },
    /// The checksum sidecar is shorter or longer than its header says.
    #[error("checksum file {path} is {actual} bytes, expected {expected} (truncated or damaged)", path = path.display())]
    SidecarTruncated {
        /// Sidecar path.
        path: PathBuf,
        /// Length its header implies.
        expected: u64,
        /// Length found.
        actual: u64,
    },
    /// The checksum sidecar's header is not valid.
    #[error("checksum file {path} is not valid: {problem}", path = path.display())]
    SidecarInvalid {
        /// Sidecar path.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// Image and sidecar disagree on the image size.
    #[error("{image} is {image_size} bytes but its checksum file describes {sidecar_size} bytes", image = image.display())]
    SizeMismatch {
        /// Image path.
        image: PathBuf,
        /// Actual image length.
        image_size: u64,
        /// Length the sidecar describes.
        sidecar_size: u64,
    },
    /// An access beyond the end of the image.
    #[error("range {offset}+{length} is outside the image ({size} bytes)")]
    OutOfRange {
        /// Start of the access.
        offset: u64,
        /// Its length.
        length: u64,
        /// Image size.
        size: u64,
    },
    /// A write to an image opened read-only.
    #[error("{path} is open read-only", path = path.display())]
    ReadOnly {
        /// Image path.
        path: PathBuf,
    },
    /// The image's cross-process lock table cannot be set up (see
    /// [`blocklocks`]): the image is not opened without it.
    #[error("{image}: {source}", image = image.display())]
    LockTable {
        /// Image path.
        image: PathBuf,
        /// What is wrong (boxed: it is rare, and every `Result` carrying an
        /// `ImageError` stays small).
        #[source]
        source: Box<blocklocks::LockTableError>,
    },
    /// Data failed its checksum.
    #[error(transparent)]
    Media(#[from] MediaError),
}
