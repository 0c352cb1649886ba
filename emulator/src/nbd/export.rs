//! What the NBD server exports: named block devices behind a small trait, so the
//! same protocol code serves a single disk image or the volumes of a RAID array,
//! and the [`Catalog`] a server takes its exports from: fixed, or following an
//! array whose volumes are created and deleted while it serves.

use std::sync::Arc;

use controllers::array::VolumeRecord;
use controllers::raid::{RaidEngine, RaidError};
use controllers::volume::{Volume, VolumeError, Volumes};
use disk_images::{DiskImage, Extent, ImageError};
use parking_lot::Mutex;

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
    /// The host file system under the images is full.
    #[error("{0}")]
    NoSpace(String),
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
            Self::NoSpace(_) => errno::ENOSPC,
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
            ImageError::Io { ref source, .. }
                if source.kind() == std::io::ErrorKind::StorageFull =>
            {
                Self::NoSpace(err.to_string())
            }
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
    /// Whether this device takes a large write in pieces, stored as its payload
    /// arrives ([`Self::write_piece_at`]), and if so the boundary (a power of
    /// two) each piece but the last ends on. `None`: each write whole (an array
    /// volume, where pieces would turn full-stripe writes into
    /// read-modify-writes).
    fn piece_alignment(&self) -> Option<u64> {
        None
    }
    /// Writes one piece of a large write (`first`: its first piece); called
    /// only when [`Self::piece_alignment`] says the device takes pieces.
    fn write_piece_at(&self, offset: u64, data: &[u8], first: bool) -> Result<(), DeviceError> {
        let _ = first;
        self.write_at(offset, data)
    }
    /// Zeroes a range, deallocating it when `punch_hole` is set.
    fn write_zeroes(&self, offset: u64, len: u64, punch_hole: bool) -> Result<(), DeviceError>;
    /// Whether zeroing with `punch_hole` is faster than writing zeros (NBD's
    /// FAST_ZERO asks to fail at once when it is not).
    fn zeroes_fast(&self) -> bool {
        true
    }
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
    /// A checksum block: no block is stored in two parts (each would be a
    /// read-modify-write of the block).
    fn piece_alignment(&self) -> Option<u64> {
        Some(disk_images::BLOCK_BYTES as u64)
    }
    fn write_piece_at(&self, offset: u64, data: &[u8], first: bool) -> Result<(), DeviceError> {
        Ok(DiskImage::write_piece_at(self, offset, data, first)?)
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
    /// Names this server knows but does not serve, each with the reason a
    /// client gets (a volume another controller owns, and where it is served).
    refused: Vec<(String, String)>,
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
            refused: Vec::new(),
        })
    }

    /// A set that may be empty, for a catalog whose array has no volumes left.
    fn from_shared(exports: Vec<Arc<Export>>, refused: Vec<(String, String)>) -> Self {
        Self { exports, refused }
    }

    /// Why export `name` is not served here, if this server knows it.
    pub fn refusal(&self, name: &str) -> Option<&str> {
        self.refused
            .iter()
            .find(|(refused, _)| refused == name)
            .map(|(_, why)| why.as_str())
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

/// The export of volume `record` of the array behind `volumes`.
pub fn volume_export(volumes: &Arc<Volumes>, record: &VolumeRecord) -> Export {
    Export {
        description: format!(
            "volume {} of array {} ({} bytes)",
            record.name,
            volumes.dir().display(),
            record.size
        ),
        name: record.name.clone(),
        device: Arc::new(ArrayVolume(volumes.volume(record.clone()))),
        read_only: false,
    }
}

/// A volume of a RAID array, served as a block device (see
/// [`controllers::volume::Volume`] for how its I/O is mapped, and refused once
/// it is deleted).
#[derive(Debug)]
pub struct ArrayVolume(Volume);

impl ArrayVolume {
    fn engine(&self) -> &RaidEngine {
        self.0.engine()
    }

    fn map(&self, offset: u64, len: u64) -> Result<u64, DeviceError> {
        self.0.map(offset, len).map_err(DeviceError::from)
    }
}

impl From<VolumeError> for DeviceError {
    fn from(err: VolumeError) -> Self {
        match err {
            VolumeError::OutOfRange { .. } => Self::OutOfRange,
            other => Self::Io(other.to_string()),
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
            RaidError::Member {
                source: ImageError::Io { ref source, .. },
                ..
            } if source.kind() == std::io::ErrorKind::StorageFull => Self::NoSpace(err.to_string()),
            other => Self::Io(other.to_string()),
        }
    }
}

impl BlockDevice for ArrayVolume {
    fn size(&self) -> u64 {
        self.0.record().size
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        let at = self.map(offset, buf.len() as u64)?;
        self.engine()
            .read_at(at, buf)
            .map_err(|err| match DeviceError::from(err) {
                // Report media errors in the volume's own address space.
                DeviceError::Media {
                    offset: array_offset,
                    message,
                } => DeviceError::Media {
                    offset: array_offset.saturating_sub(self.0.record().offset),
                    message,
                },
                other => other,
            })
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        let at = self.map(offset, data.len() as u64)?;
        Ok(self.engine().write_at(at, data)?)
    }
    fn write_zeroes(&self, offset: u64, len: u64, _punch_hole: bool) -> Result<(), DeviceError> {
        let at = self.map(offset, len)?;
        Ok(self.engine().write_zeroes(at, len)?)
    }
    /// An array writes zeros to every member: no faster than a write.
    fn zeroes_fast(&self) -> bool {
        false
    }
    fn flush_range(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.map(offset, len)?;
        Ok(self.engine().flush()?)
    }
    fn flush(&self) -> Result<(), DeviceError> {
        // Flushing makes the array durable, deleted volume or not.
        Ok(self.engine().flush()?)
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

/// Where a server takes its exports from, once per connection: a fixed set, or
/// the current volumes of an array (so a volume created while the server runs
/// is offered to the next client, and a deleted one no longer is).
#[derive(Debug, Clone)]
pub struct Catalog {
    source: Source,
}

#[derive(Debug, Clone)]
enum Source {
    Fixed(ExportSet),
    Array(Arc<ArrayCatalog>),
}

struct ArrayCatalog {
    volumes: Arc<Volumes>,
    /// Only the volumes this controller owns, and what to tell a client
    /// asking for another's (None: every volume, as `emulator serve` does).
    owner: Option<(u8, Refusal)>,
    /// The generation the exports were built at, and each volume's export,
    /// reused while the volume does not change.
    last: Mutex<(u64, Vec<Served>)>,
}

/// What a client asking for a volume another controller owns is told.
pub type Refusal = Arc<dyn Fn(&VolumeRecord) -> String + Send + Sync>;

impl std::fmt::Debug for ArrayCatalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArrayCatalog")
            .field("volumes", &self.volumes)
            .field("owner", &self.owner.as_ref().map(|(owner, _)| owner))
            .finish_non_exhaustive()
    }
}

/// A volume and the export serving it.
type Served = (VolumeRecord, Arc<Export>);

impl Catalog {
    /// Always the same exports.
    pub fn fixed(exports: ExportSet) -> Self {
        Self {
            source: Source::Fixed(exports),
        }
    }

    /// The volumes of an array, as they are when each client connects.
    pub fn array(volumes: Arc<Volumes>) -> Self {
        Self::array_catalog(volumes, None)
    }

    /// The volumes of an array that controller `owner` owns (their home
    /// address); a client asking for another volume gets `refusal`'s text.
    pub fn owned(volumes: Arc<Volumes>, owner: u8, refusal: Refusal) -> Self {
        Self::array_catalog(volumes, Some((owner, refusal)))
    }

    fn array_catalog(volumes: Arc<Volumes>, owner: Option<(u8, Refusal)>) -> Self {
        Self {
            source: Source::Array(Arc::new(ArrayCatalog {
                volumes,
                owner,
                // No generation matches u64::MAX: the first `current` builds.
                last: Mutex::new((u64::MAX, Vec::new())),
            })),
        }
    }

    /// The exports to offer a client connecting now. If the array cannot be
    /// read, the last known ones (and the error is logged).
    pub fn current(&self) -> ExportSet {
        let catalog = match &self.source {
            Source::Fixed(exports) => return exports.clone(),
            Source::Array(catalog) => catalog,
        };
        let mut last = catalog.last.lock();
        match catalog.volumes.current() {
            Ok((generation, volumes)) if generation != last.0 => {
                let exports = volumes
                    .into_iter()
                    .map(|volume| {
                        let export = last
                            .1
                            .iter()
                            .find(|(known, _)| *known == volume)
                            .map(|(_, export)| Arc::clone(export))
                            .unwrap_or_else(|| Arc::new(volume_export(&catalog.volumes, &volume)));
                        (volume, export)
                    })
                    .collect();
                *last = (generation, exports);
            }
            Ok(_) => {}
            Err(err) => {
                tracing::error!(%err, "cannot re-read the array's volumes; offering the last known ones");
            }
        }
        let (served, refused): (Vec<&Served>, Vec<&Served>) =
            last.1.iter().partition(|(volume, _)| match &catalog.owner {
                Some((owner, _)) => volume.owner == *owner,
                None => true,
            });
        let refused = match &catalog.owner {
            Some((_, refusal)) => refused
                .into_iter()
                .map(|(volume, _)| (volume.name.clone(), refusal(volume)))
                .collect(),
            None => Vec::new(),
        };
        ExportSet::from_shared(
            served
                .into_iter()
                .map(|(_, export)| Arc::clone(export))
                .collect(),
            refused,
        )
    }
}
