//! The member-I/O interface: what the RAID engine, rebuild and scrub need of
//! a member disk. A [`DiskImage`] is one; the fault layer
//! ([`crate::faults::FaultyMember`]) is another, wrapping an image and
//! applying the faults configured for it. The engine holds members only
//! through this trait, so faults are layers configured by data, never
//! branches in the engine's paths.

use std::ops::Range;
use std::path::Path;

use disk_images::{DiskImage, FlushStarted, ImageError};

/// A member disk of an array.
pub trait Member: Send + Sync + std::fmt::Debug {
    /// The image file.
    fn path(&self) -> &Path;
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Whether the disk answers at all (false: pulled, or dead). The engine
    /// treats a member that does not answer as failed, at once.
    fn present(&self) -> bool {
        true
    }
    /// See [`DiskImage::read_at`].
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), ImageError>;
    /// See [`DiskImage::write_at`].
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), ImageError>;
    /// See [`DiskImage::rewrite_at`].
    fn rewrite_at(&self, offset: u64, data: &[u8]) -> Result<(), ImageError>;
    /// See [`DiskImage::read_blocks`].
    fn read_blocks(&self, offset: u64, buf: &mut [u8], crcs: &mut [u32]) -> Result<(), ImageError>;
    /// See [`DiskImage::write_blocks`].
    fn write_blocks(
        &self,
        offset: u64,
        data: &[u8],
        crcs: Option<&[u32]>,
    ) -> Result<(), ImageError>;
    /// See [`DiskImage::flush_range`].
    fn flush_range(&self, offset: u64, len: u64) -> Result<(), ImageError>;
    /// See [`DiskImage::reserve`].
    fn reserve(&self, offset: u64, len: u64) -> Result<(), ImageError>;
    /// See [`DiskImage::mark_unreadable`].
    fn mark_unreadable(&self, offset: u64, len: u64) -> Result<(), ImageError>;
    /// See [`DiskImage::start_flush`].
    fn start_flush(&self) -> Option<FlushStarted>;
    /// See [`DiskImage::finish_flush`].
    fn finish_flush(&self, started: Option<FlushStarted>) -> Result<(), ImageError>;
    /// See [`DiskImage::power_lost`].
    fn power_lost(&self) -> Vec<Range<u64>>;
    /// See [`DiskImage::power_loss_handled`].
    fn power_loss_handled(&self) -> Result<(), ImageError>;
}

impl Member for DiskImage {
    fn path(&self) -> &Path {
        DiskImage::path(self)
    }
    fn size(&self) -> u64 {
        DiskImage::size(self)
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        DiskImage::read_at(self, offset, buf)
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), ImageError> {
        DiskImage::write_at(self, offset, data)
    }
    fn rewrite_at(&self, offset: u64, data: &[u8]) -> Result<(), ImageError> {
        DiskImage::rewrite_at(self, offset, data)
    }
    fn read_blocks(&self, offset: u64, buf: &mut [u8], crcs: &mut [u32]) -> Result<(), ImageError> {
        DiskImage::read_blocks(self, offset, buf, crcs)
    }
    fn write_blocks(
        &self,
        offset: u64,
        data: &[u8],
        crcs: Option<&[u32]>,
    ) -> Result<(), ImageError> {
        DiskImage::write_blocks(self, offset, data, crcs)
    }
    fn flush_range(&self, offset: u64, len: u64) -> Result<(), ImageError> {
        DiskImage::flush_range(self, offset, len)
    }
    fn reserve(&self, offset: u64, len: u64) -> Result<(), ImageError> {
        DiskImage::reserve(self, offset, len)
    }
    fn mark_unreadable(&self, offset: u64, len: u64) -> Result<(), ImageError> {
        DiskImage::mark_unreadable(self, offset, len)
    }
    fn start_flush(&self) -> Option<FlushStarted> {
        DiskImage::start_flush(self)
    }
    fn finish_flush(&self, started: Option<FlushStarted>) -> Result<(), ImageError> {
        DiskImage::finish_flush(self, started)
    }
    fn power_lost(&self) -> Vec<Range<u64>> {
        DiskImage::power_lost(self)
    }
    fn power_loss_handled(&self) -> Result<(), ImageError> {
        DiskImage::power_loss_handled(self)
    }
}
