//! What the NBD server exports: named block devices behind a small trait, so the
//! same protocol code serves a single disk image or the volumes of a RAID array.

use std::sync::Arc;

use controllers::raid::{RaidEngine, RaidError};
use disk_images::{DiskImage, Extent, ImageError};

use super::proto::errno;

/// Why a device operation failed, reduced to what the protocol can say.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// Data failed its checksum and could not be recovered.
    #[error("{message}")]
    Media {
        /// Byte offset of the bad block.
        offset: u64,
        /// Full description (image, block, CRCs).
        message: String,
    },
    /// The device refuses writes.
    #[error("device is read-only")]
    ReadOnly,
    /// The range is outside the device.
    #[error("range outside the device")]
    OutOfRange,
    /// Anything else from the operating system.
    #[error("{0}")]
    Io(String),
}

impl DeviceError {
    /// The NBD error value for this failure.
    pub fn errno(&self) -> u32 {
        match self {
            Self::Media { .. } | Self::Io(_) => errno::EIO,
            Self::ReadOnly => errno::EPERM,
            Self::OutOfRange => errno::EINVAL,
        }
    }
}

impl From<ImageError> for DeviceError {
    fn from(err: ImageError) -> Self {
        match err {
            ImageError::Media(media) => Self::Media {
                offset: media.block * disk_images::BLOCK_BYTES as u64,
                message: media.to_string(),
            },
            ImageError::ReadOnly { .. } => Self::ReadOnly,
            ImageError::OutOfRange { .. } => Self::OutOfRange,
            other => Self::Io(other.to_string()),
        }
    }
}

/// A block device the server can export. Implementations are shared by every
/// connection and must be safe to call from many threads at once.
pub trait BlockDevice: Send + Sync + std::fmt::Debug + 'static {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Reads `buf.len()` bytes at `offset`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError>;
    /// Appends `len` bytes read at `offset` to `out`; on error `out` is unchanged.
    /// The default zero-fills then reads; devices that can copy straight into
    /// spare capacity override it.
    fn read_append(&self, offset: u64, len: usize, out: &mut Vec<u8>) -> Result<(), DeviceError> {
        let start = out.len();
        out.resize(start + len, 0);
        self.read_at(offset, &mut out[start..])
            .inspect_err(|_| out.truncate(start))
    }
    /// Writes `data` at `offset`.
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), DeviceError>;
    /// Zeroes a range, deallocating it when `punch_hole` is set.
    fn write_zeroes(&self, offset: u64, len: u64, punch_hole: bool) -> Result<(), DeviceError>;
    /// Makes a range durable.
    fn flush_range(&self, offset: u64, len: u64) -> Result<(), DeviceError>;
    /// Makes everything durable.
    fn flush(&self) -> Result<(), DeviceError>;
    /// Data and hole extents covering the range.
    fn allocation(&self, offset: u64, len: u64) -> Result<Vec<Extent>, DeviceError>;
}

impl BlockDevice for DiskImage {
    fn size(&self) -> u64 {
        DiskImage::size(self)
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        Ok(DiskImage::read_at(self, offset, buf)?)
    }
    fn read_append(&self, offset: u64, len: usize, out: &mut Vec<u8>) -> Result<(), DeviceError> {
        Ok(DiskImage::read_append(self, offset, len, out)?)
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        Ok(DiskImage::write_at(self, offset, data)?)
    }
    fn write_zeroes(&self, offset: u64, len: u64, punch_hole: bool) -> Result<(), DeviceError> {
        Ok(DiskImage::write_zeroes(self, offset, len, punch_hole)?)
    }
    fn flush_range(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        Ok(DiskImage::flush_range(self, offset, len)?)
    }
    fn flush(&self) -> Result<(), DeviceError> {
        Ok(DiskImage::flush(self)?)
    }
    fn allocation(&self, offset: u64, len: u64) -> Result<Vec<Extent>, DeviceError> {
        Ok(DiskImage::allocation(self, offset, len)?)
    }
}

/// One named export.
#[derive(Debug)]
pub struct Export {
    /// Export name clients ask for.
    pub name: String,
    /// Human-readable description (`NBD_INFO_DESCRIPTION`, `NBD_OPT_LIST`).
    pub description: String,
    /// The device behind it.
    pub device: Arc<dyn BlockDevice>,
    /// Whether writes are refused.
    pub read_only: bool,
}

/// The exports of one server. The first is the default (answers the empty name).
#[derive(Debug, Clone)]
pub struct ExportSet {
    exports: Vec<Arc<Export>>,
}

impl ExportSet {
    /// A set of exports; names must be unique and the set non-empty.
    pub fn new(exports: Vec<Export>) -> Result<Self, String> {
        if exports.is_empty() {
            return Err("no exports".into());
        }
        for (i, export) in exports.iter().enumerate() {
            if exports[..i].iter().any(|other| other.name == export.name) {
                return Err(format!("export name {:?} is used twice", export.name));
            }
        }
        Ok(Self {
            exports: exports.into_iter().map(Arc::new).collect(),
        })
    }

    /// Looks up an export; the empty name means the default export.
    pub fn find(&self, name: &str) -> Option<&Arc<Export>> {
        if name.is_empty() {
            return self.exports.first();
        }
        self.exports.iter().find(|export| export.name == name)
    }

    /// All exports, default first.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Export>> {
        self.exports.iter()
    }
}

/// A volume of a RAID array, served as a block device: `size` bytes starting at
/// `offset` in the array's data space.
#[derive(Debug)]
pub struct ArrayVolume {
    engine: Arc<RaidEngine>,
    offset: u64,
    size: u64,
}

impl ArrayVolume {
    /// The volume `[offset, offset+size)` of the array behind `engine`.
    pub fn new(engine: Arc<RaidEngine>, offset: u64, size: u64) -> Self {
        Self {
            engine,
            offset,
            size,
        }
    }

    fn map(&self, offset: u64, len: u64) -> Result<u64, DeviceError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(self.offset + offset),
            _ => Err(DeviceError::OutOfRange),
        }
    }
}

impl From<RaidError> for DeviceError {
    fn from(err: RaidError) -> Self {
        match err {
            RaidError::OutOfRange { .. } => Self::OutOfRange,
            RaidError::Unrecoverable { offset, detail } => Self::Media {
                offset,
                message: detail,
            },
            other => Self::Io(other.to_string()),
        }
    }
}

impl BlockDevice for ArrayVolume {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        let at = self.map(offset, buf.len() as u64)?;
        self.engine
            .read_at(at, buf)
            .map_err(|err| match DeviceError::from(err) {
                // Report media errors in the volume's own address space.
                DeviceError::Media {
                    offset: array_offset,
                    message,
                } => DeviceError::Media {
                    offset: array_offset.saturating_sub(self.offset),
                    message,
                },
                other => other,
            })
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        let at = self.map(offset, data.len() as u64)?;
        Ok(self.engine.write_at(at, data)?)
    }
    fn write_zeroes(&self, offset: u64, len: u64, _punch_hole: bool) -> Result<(), DeviceError> {
        let at = self.map(offset, len)?;
        Ok(self.engine.write_zeroes(at, len)?)
    }
    fn flush_range(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.map(offset, len)?;
        Ok(self.engine.flush()?)
    }
    fn flush(&self) -> Result<(), DeviceError> {
        Ok(self.engine.flush()?)
    }
    fn allocation(&self, offset: u64, len: u64) -> Result<Vec<Extent>, DeviceError> {
        // Striped data has no holes to report: say "data", which is always safe.
        self.map(offset, len)?;
        Ok(if len == 0 {
            Vec::new()
        } else {
            vec![Extent {
                length: len,
                hole: false,
            }]
        })
    }
}
