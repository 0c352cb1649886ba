//! The one module that touches memory shared with other processes.
//!
//! A [`SharedMapping`] is a `MAP_SHARED` mapping of a file. Another process (the
//! other controller) may map the same file and write to it at any moment, so this
//! module never hands out `&[u8]` or `&mut [u8]` into the mapping: bytes are moved
//! in and out by copy, and words that several processes update concurrently (CRC
//! entries, coordination slots) are accessed through atomics for the duration of a
//! single operation. Every `unsafe` block of the crate lives here.
//!
//! What this module must never do: return a reference into the mapping that
//! outlives the call that created it.
//!
//! It also holds the one page-cache control the standard library and `nix` do
//! not wrap, `sync_file_range` ([`start_writeback`], [`write_back`]), for the
//! same reason: it is a foreign call, and all of the crate's `unsafe` is here.

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use memmap2::{MmapOptions, MmapRaw};

/// A shared, fixed-length mapping of a file, accessed by copy and by atomics.
#[derive(Debug)]
pub struct SharedMapping {
    map: MmapRaw,
    len: usize,
    writable: bool,
}

impl SharedMapping {
    /// Maps the first `len` bytes of `file` shared and writable.
    pub fn map_writable(file: &File, len: u64) -> io::Result<Self> {
        let len = checked_len(len)?;
        let map = MmapOptions::new().len(len).map_raw(file)?;
        Ok(Self {
            map,
            len,
            writable: true,
        })
    }

    /// Maps the first `len` bytes of `file` shared and read-only.
    pub fn map_read_only(file: &File, len: u64) -> io::Result<Self> {
        let len = checked_len(len)?;
        let map = MmapOptions::new().len(len).map_raw_read_only(file)?;
        Ok(Self {
            map,
            len,
            writable: false,
        })
    }

    /// Length of the mapping in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never true: zero-length maps are refused).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether writes are allowed.
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    fn check_range(&self, offset: usize, len: usize) {
        let end = offset.checked_add(len);
        assert!(
            end.is_some_and(|end| end <= self.len),
            "mapping access out of range: offset {offset} len {len} mapping {}",
            self.len
        );
    }

    /// Copies `dst.len()` bytes starting at `offset` out of the mapping.
    ///
    /// Panics if the range is outside the mapping (callers validate first).
    pub fn read_into(&self, offset: usize, dst: &mut [u8]) {
        self.check_range(offset, dst.len());
        // SAFETY: the range [offset, offset+len) lies inside the live mapping (checked
        // above, and the mapping lives as long as `self`). `dst` is ordinary process
        // memory that cannot overlap a file mapping we own. Another process may write
        // the same bytes concurrently; we copy raw bytes and never form a reference
        // into the mapping, so a racing writer can only make us observe a mix of old
        // and new bytes, which the CRC layer above detects.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.map.as_ptr().add(offset),
                dst.as_mut_ptr(),
                dst.len(),
            );
        }
    }

    /// Appends `len` bytes copied from the mapping at `offset` to `out`, without
    /// first zero-filling the destination.
    pub fn append_to(&self, offset: usize, len: usize, out: &mut Vec<u8>) {
        self.check_range(offset, len);
        out.reserve(len);
        let filled = out.len();
        // SAFETY: the source range is inside the live mapping (checked above) and is
        // copied without forming a reference into it. `reserve` guarantees capacity
        // for `len` more bytes after `filled`, the copy initialises exactly those
        // bytes, and only then does `set_len` expose them.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.map.as_ptr().add(offset),
                out.as_mut_ptr().add(filled),
                len,
            );
            out.set_len(filled + len);
        }
    }

    /// Copies `src` into the mapping at `offset`.
    ///
    /// Panics if the mapping is read-only or the range is outside it.
    pub fn write_from(&self, offset: usize, src: &[u8]) {
        assert!(self.writable, "write to a read-only mapping");
        self.check_range(offset, src.len());
        // SAFETY: the range is inside the live, writable mapping (checked above). We
        // copy from ordinary memory into it without forming a reference into the
        // mapping; concurrent readers see bytes change, which is the nature of a
        // shared disk and is arbitrated by the block locks and CRCs above us.
        unsafe {
            std::ptr::copy_nonoverlapping(
                src.as_ptr(),
                self.map.as_mut_ptr().add(offset),
                src.len(),
            );
        }
    }

    /// Copies `src` into the mapping at `offset` like [`Self::write_from`], with
    /// non-temporal (streaming) stores where the CPU has them: the destination
    /// lines are written without first being read into the cache, and the copy
    /// does not evict what the caller is working on. For large writes whose
    /// bytes are not read back soon. Falls back to [`Self::write_from`] for an
    /// unaligned destination or a length that is not a multiple of 64.
    pub fn write_from_streaming(&self, offset: usize, src: &[u8]) {
        #[cfg(target_arch = "x86_64")]
        {
            assert!(self.writable, "write to a read-only mapping");
            self.check_range(offset, src.len());
            let dst = self.map.as_mut_ptr().wrapping_add(offset);
            if (dst as usize).is_multiple_of(16) && src.len().is_multiple_of(64) {
                use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_sfence, _mm_stream_si128};
                // SAFETY: the destination range is inside the live, writable mapping
                // (checked above) and 16-byte aligned (checked), so every 16-byte
                // store below is in range and aligned as `_mm_stream_si128`
                // requires; the source loads are unaligned loads from `src`, in
                // range because both lengths are multiples of 64 and we stop at
                // `src.len()`. SSE2, which these intrinsics need, is part of the
                // x86_64 baseline. No reference into the mapping is formed, as in
                // `write_from`. The `sfence` orders the streaming stores before
                // whatever the caller publishes next (the block's CRC).
                unsafe {
                    let from = src.as_ptr();
                    let mut at = 0;
                    while at < src.len() {
                        let s = from.add(at) as *const __m128i;
                        let d = dst.add(at) as *mut __m128i;
                        let (a, b, c, e) = (
                            _mm_loadu_si128(s),
                            _mm_loadu_si128(s.add(1)),
                            _mm_loadu_si128(s.add(2)),
                            _mm_loadu_si128(s.add(3)),
                        );
                        _mm_stream_si128(d, a);
                        _mm_stream_si128(d.add(1), b);
                        _mm_stream_si128(d.add(2), c);
                        _mm_stream_si128(d.add(3), e);
                        at += 64;
                    }
                    _mm_sfence();
                }
                return;
            }
        }
        self.write_from(offset, src);
    }

    /// Sets `len` bytes at `offset` to zero.
    pub fn fill_zero(&self, offset: usize, len: usize) {
        assert!(self.writable, "write to a read-only mapping");
        self.check_range(offset, len);
        // SAFETY: same invariants as `write_from`: in range, writable, no references.
        unsafe {
            std::ptr::write_bytes(self.map.as_mut_ptr().add(offset), 0, len);
        }
    }

    fn atomic_u32(&self, offset: usize) -> &AtomicU32 {
        self.check_range(offset, 4);
        assert_eq!(offset % 4, 0, "unaligned atomic u32 at {offset}");
        // SAFETY: the 4 bytes are inside the mapping and 4-aligned (the mapping itself
        // is page-aligned). AtomicU32 has the same layout as u32 and atomics are the
        // sanctioned way for processes sharing a mapping to access one word. The
        // returned reference borrows `self`, so it cannot outlive the mapping, and
        // callers in this module use it for one operation only.
        unsafe { &*(self.map.as_ptr().add(offset) as *const AtomicU32) }
    }

    fn atomic_u64(&self, offset: usize) -> &AtomicU64 {
        self.check_range(offset, 8);
        assert_eq!(offset % 8, 0, "unaligned atomic u64 at {offset}");
        // SAFETY: as for `atomic_u32`, with 8 bytes and 8-byte alignment.
        unsafe { &*(self.map.as_ptr().add(offset) as *const AtomicU64) }
    }

    /// Atomically loads a little-endian `u32` at `offset` (4-aligned), with
    /// acquire ordering. The load itself is relaxed, followed by an acquire
    /// fence: the same ordering, and a relaxed load is what the standard library
    /// allows on memory that may be mapped read-only.
    pub fn load_u32_le(&self, offset: usize) -> u32 {
        let value = self.atomic_u32(offset).load(Ordering::Relaxed);
        std::sync::atomic::fence(Ordering::Acquire);
        u32::from_le(value)
    }

    /// Atomically stores a little-endian `u32` at `offset` (4-aligned).
    pub fn store_u32_le(&self, offset: usize, value: u32) {
        assert!(self.writable, "write to a read-only mapping");
        self.atomic_u32(offset)
            .store(value.to_le(), Ordering::Release);
    }

    /// Atomically loads a little-endian `u64` at `offset` (8-aligned), with
    /// acquire ordering (as [`Self::load_u32_le`]).
    pub fn load_u64_le(&self, offset: usize) -> u64 {
        let value = self.atomic_u64(offset).load(Ordering::Relaxed);
        std::sync::atomic::fence(Ordering::Acquire);
        u64::from_le(value)
    }

    /// Atomically stores a little-endian `u64` at `offset` (8-aligned).
    pub fn store_u64_le(&self, offset: usize, value: u64) {
        assert!(self.writable, "write to a read-only mapping");
        self.atomic_u64(offset)
            .store(value.to_le(), Ordering::Release);
    }

    /// Compare-and-swap of a little-endian `u64` at `offset`: the semaphore that two
    /// controller processes use to claim work. Returns the value found.
    pub fn compare_exchange_u64_le(
        &self,
        offset: usize,
        current: u64,
        new: u64,
    ) -> Result<u64, u64> {
        assert!(self.writable, "write to a read-only mapping");
        self.atomic_u64(offset)
            .compare_exchange(
                current.to_le(),
                new.to_le(),
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .map(u64::from_le)
            .map_err(u64::from_le)
    }

    /// Atomically adds `delta` to the little-endian `u64` at `offset`; returns
    /// the value before.
    pub fn fetch_add_u64_le(&self, offset: usize, delta: u64) -> u64 {
        assert!(self.writable, "write to a read-only mapping");
        let word = self.atomic_u64(offset);
        let mut current = word.load(Ordering::Relaxed);
        loop {
            let new = u64::from_le(current).wrapping_add(delta).to_le();
            match word.compare_exchange_weak(current, new, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(before) => return u64::from_le(before),
                Err(found) => current = found,
            }
        }
    }

    /// Atomically sets the bits of `bits` in the little-endian `u64` at
    /// `offset` (a set that several processes add to).
    pub fn or_u64_le(&self, offset: usize, bits: u64) {
        assert!(self.writable, "write to a read-only mapping");
        // OR commutes with the byte order: no conversion needed but of `bits`.
        self.atomic_u64(offset)
            .fetch_or(bits.to_le(), Ordering::AcqRel);
    }

    /// Atomically raises the little-endian `u64` at `offset` to `value` if it
    /// is lower (a maximum that several processes advance).
    pub fn raise_u64_le(&self, offset: usize, value: u64) {
        assert!(self.writable, "write to a read-only mapping");
        let word = self.atomic_u64(offset);
        let mut current = word.load(Ordering::Relaxed);
        while u64::from_le(current) < value {
            match word.compare_exchange_weak(
                current,
                value.to_le(),
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return,
                Err(found) => current = found,
            }
        }
    }

    /// Tells the kernel that this mapping is accessed at random: a page fault
    /// reads in just its page, with no read-ahead (`MADV_RANDOM`). Pages read
    /// in that way enter the page cache as single 4 KiB pages, not large
    /// folios (see `DiskImage`'s notes on write-back).
    pub fn advise_random(&self) -> io::Result<()> {
        self.map.advise(memmap2::Advice::Random)
    }

    /// Makes `[offset, offset+len)` durable: `msync(MS_SYNC)`, which Linux
    /// carries out as `fdatasync` of the file's range under the mapping
    /// (`vfs_fsync_range`): the range's dirty pages, however they were
    /// dirtied, the metadata needed to read them back, and a flush of the
    /// device's write cache.
    pub fn flush_range(&self, offset: usize, len: usize) -> io::Result<()> {
        self.check_range(offset, len);
        if !self.writable || len == 0 {
            return Ok(());
        }
        self.map.flush_range(offset, len)
    }
}

/// Starts writing back the dirty pages of `file` in `[offset, offset+len)`
/// (`len == 0`: to the end of the file) and returns without waiting:
/// `sync_file_range(SYNC_FILE_RANGE_WRITE)`. Durability still needs an
/// `fdatasync` (or [`SharedMapping::flush_range`]) afterwards; starting several
/// files' write-back first lets their writes reach the device together instead
/// of one file after the other.
pub fn start_writeback(file: &File, offset: u64, len: u64) -> io::Result<()> {
    sync_file_range(file, offset, len, libc::SYNC_FILE_RANGE_WRITE)
}

/// Writes back the dirty pages of `file` in `[offset, offset+len)` and waits
/// until the device has them: `sync_file_range` with `WAIT_BEFORE`, `WRITE`
/// and `WAIT_AFTER`. Not durable by itself: no metadata is written and the
/// device's write cache is not flushed.
pub fn write_back(file: &File, offset: u64, len: u64) -> io::Result<()> {
    sync_file_range(
        file,
        offset,
        len,
        libc::SYNC_FILE_RANGE_WAIT_BEFORE
            | libc::SYNC_FILE_RANGE_WRITE
            | libc::SYNC_FILE_RANGE_WAIT_AFTER,
    )
}

fn sync_file_range(file: &File, offset: u64, len: u64, flags: libc::c_uint) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "write-back range beyond the largest file offset",
        ));
    };
    // SAFETY: a plain system call on a file descriptor that `file` keeps open
    // for the duration of the call; it takes no pointers.
    let result = unsafe { libc::sync_file_range(file.as_raw_fd(), offset, len, flags) };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn checked_len(len: u64) -> io::Result<usize> {
    if len == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "cannot map zero bytes",
        ));
    }
    usize::try_from(len).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "mapping larger than the address space",
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_file(len: u64) -> File {
        let file = tempfile::tempfile().expect("tempfile");
        file.set_len(len).expect("set_len");
        file
    }

    #[test]
    fn copy_round_trip_and_zero() {
        let file = temp_file(8192);
        let map = SharedMapping::map_writable(&file, 8192).expect("map");
        map.write_from(4000, b"hello across a page");
        let mut out = [0u8; 19];
        map.read_into(4000, &mut out);
        assert_eq!(&out, b"hello across a page");
        let mut appended = b"prefix:".to_vec();
        map.append_to(4000, 5, &mut appended);
        assert_eq!(&appended, b"prefix:hello");
        map.fill_zero(4002, 3);
        map.read_into(4000, &mut out);
        assert_eq!(&out[..8], b"he\0\0\0 ac");
    }

    #[test]
    fn streaming_writes_land_like_ordinary_ones() {
        let file = temp_file(3 * 4096);
        let map = SharedMapping::map_writable(&file, 3 * 4096).expect("map");
        let data: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 3) as u8).collect();
        // Aligned and a multiple of 64: streaming stores.
        map.write_from_streaming(4096, &data);
        // Unaligned destination, and an odd length: the ordinary copy.
        map.write_from_streaming(1, &data[..100]);
        map.write_from_streaming(64, &data[..65]);
        let mut out = vec![0u8; 8192];
        map.read_into(4096, &mut out);
        assert_eq!(out, data);
        let mut head = vec![0u8; 129];
        map.read_into(0, &mut head);
        assert_eq!(head[0], 0);
        assert_eq!(&head[1..64], &data[..63]);
        assert_eq!(&head[64..129], &data[..65]);
    }

    #[test]
    fn two_mappings_of_one_file_see_each_other() {
        let file = temp_file(4096);
        let a = SharedMapping::map_writable(&file, 4096).expect("map a");
        let b = SharedMapping::map_writable(&file, 4096).expect("map b");
        a.store_u64_le(8, 7);
        assert_eq!(b.load_u64_le(8), 7);
        assert_eq!(b.compare_exchange_u64_le(8, 7, 9), Ok(7));
        assert_eq!(a.compare_exchange_u64_le(8, 7, 11), Err(9));
        a.store_u32_le(4, 0xdead_beef);
        let mut raw = [0u8; 4];
        b.read_into(4, &mut raw);
        assert_eq!(u32::from_le_bytes(raw), 0xdead_beef);
    }

    #[test]
    #[should_panic(expected = "out of range")]
    fn out_of_range_panics() {
        let file = temp_file(4096);
        let map = SharedMapping::map_writable(&file, 4096).expect("map");
        let mut out = [0u8; 2];
        map.read_into(4095, &mut out);
    }

    #[test]
    fn zero_length_is_refused() {
        let file = temp_file(0);
        assert!(SharedMapping::map_writable(&file, 0).is_err());
    }
}
