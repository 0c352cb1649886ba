//! Fuzzes the NBD server from the client's side. The input is everything a client
//! sends: it goes to `handshake::negotiate` and, when negotiation succeeds, the
//! bytes left go to `transmission::transmit`, so option handling, the request
//! decoder and request execution are all reached. Replies go to a sink. Nothing
//! may panic, whatever the bytes (libfuzzer-sys aborts on any panic, including
//! panics on the connection's worker threads, which `transmit` passes on).
//!
//! The first input byte picks how the rest is read:
//!
//! - even: **raw**. The rest is the client's byte stream, verbatim: bad magics,
//!   lying lengths, truncation and oversized options are all reachable.
//! - odd: **framed**. The harness writes the magics, cookies and lengths, so that
//!   mutations land on option codes, payloads and request fields instead of
//!   breaking the framing:
//!
//!   ```text
//!   client flags  u8
//!   options       { code u8 (not 0), length u16 BE, payload }*  then a 0 byte
//!   requests      { flags u8, command u8, offset u32 BE, length u32 BE,
//!                   WRITE only: fill u8 }*
//!   ```
//!
//!   Option payloads are clipped to the bytes left, so option lengths are always
//!   honest; a WRITE carries `length` copies of its fill byte, with `length`
//!   capped at 128 KiB. Reading past the end of the input yields zeros.
//!
//! The exports: `disk0` (the default, 1 MiB, writable, block 200 fails reads with
//! a media error) and `ro` (read-only, not a multiple of the block size).

#![no_main]

use std::borrow::Cow;
use std::io::{self, Read};
use std::ops::Range;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};

use disk_images::Extent;
use emulator::nbd::export::{BlockDevice, DeviceError, Export, ExportSet};
use emulator::nbd::handshake;
use emulator::nbd::proto::{self, cmd, Request};
use emulator::nbd::transmission::{self, Ending, LargeWrites};
use libfuzzer_sys::fuzz_target;
use tokio::io::BufReader;
use tokio::runtime::{Builder, Runtime};

const BLOCK: u64 = 4096;
/// Largest WRITE the framed mode generates.
const FRAMED_WRITE_CAP: u32 = 128 * 1024;

/// A block device in memory. Zeroed blocks are reported as holes.
#[derive(Debug)]
struct MemDevice {
    data: Mutex<Data>,
    size: u64,
    /// A block whose reads fail with a media error.
    bad_block: Option<u64>,
}

#[derive(Debug)]
struct Data {
    bytes: Vec<u8>,
    /// The range written since the last reset (empty when clean).
    dirty: Range<usize>,
}

impl MemDevice {
    fn new(size: usize, bad_block: Option<u64>) -> Self {
        Self {
            data: Mutex::new(Data {
                bytes: vec![0u8; size],
                dirty: 0..0,
            }),
            size: size as u64,
            bad_block,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Data> {
        self.data.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Bytes of `range`, for writing: marks the range dirty.
    fn modify(&self, range: Range<usize>, change: impl FnOnce(&mut [u8])) {
        let mut data = self.lock();
        if !range.is_empty() {
            data.dirty = if data.dirty.is_empty() {
                range.clone()
            } else {
                data.dirty.start.min(range.start)..data.dirty.end.max(range.end)
            };
        }
        change(&mut data.bytes[range]);
    }

    /// Back to all zeros. Devices are shared by every run (allocating them per
    /// run costs more than the run), so each run starts by resetting them.
    fn reset(&self) {
        let mut data = self.lock();
        let dirty = std::mem::replace(&mut data.dirty, 0..0);
        data.bytes[dirty].fill(0);
    }

    /// The range as indices into the data, or `OutOfRange`.
    fn range(&self, offset: u64, len: u64) -> Result<Range<usize>, DeviceError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(offset as usize..end as usize),
            _ => Err(DeviceError::OutOfRange),
        }
    }
}

impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        let range = self.range(offset, buf.len() as u64)?;
        if let Some(bad) = self.bad_block {
            let bad_start = bad * BLOCK;
            if !buf.is_empty() && offset < bad_start + BLOCK && bad_start < range.end as u64 {
                return Err(DeviceError::Media {
                    offset: bad_start,
                    message: format!("block {bad}: checksum mismatch"),
                });
            }
        }
        buf.copy_from_slice(&self.lock().bytes[range]);
        Ok(())
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        let range = self.range(offset, data.len() as u64)?;
        self.modify(range, |bytes| bytes.copy_from_slice(data));
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, _punch_hole: bool) -> Result<(), DeviceError> {
        // Memory has no holes to punch; zeroed blocks read back as holes anyway.
        let range = self.range(offset, len)?;
        self.modify(range, |bytes| bytes.fill(0));
        Ok(())
    }

    fn flush_range(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.range(offset, len).map(drop)
    }

    fn flush(&self) -> Result<(), DeviceError> {
        Ok(())
    }

    fn allocation(&self, offset: u64, len: u64) -> Result<Vec<Extent>, DeviceError> {
        let range = self.range(offset, len)?;
        let data = self.lock();
        let mut extents: Vec<Extent> = Vec::new();
        let mut position = range.start;
        while position < range.end {
            let block_end = ((position as u64 / BLOCK + 1) * BLOCK).min(range.end as u64) as usize;
            let hole = data.bytes[position..block_end].iter().all(|&b| b == 0);
            let length = (block_end - position) as u64;
            match extents.last_mut() {
                Some(last) if last.hole == hole => last.length += length,
                _ => extents.push(Extent { length, hole }),
            }
            position = block_end;
        }
        Ok(extents)
    }
}

/// The exports every run is served, and handles on their devices for resetting.
struct Fixture {
    devices: Vec<Arc<MemDevice>>,
    exports: ExportSet,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let disk0 = Arc::new(MemDevice::new(1 << 20, Some(200)));
        let ro = Arc::new(MemDevice::new(64 * 1024 + 1000, None));
        let export = |name: &str, description: &str, device: &Arc<MemDevice>, read_only| Export {
            name: name.into(),
            description: description.into(),
            device: Arc::clone(device) as Arc<dyn BlockDevice>,
            read_only,
        };
        let exports = ExportSet::new(vec![
            export("disk0", "writable, one bad block", &disk0, false),
            export("ro", "read-only, odd size", &ro, true),
        ])
        .expect("valid export set");
        Fixture {
            devices: vec![disk0, ro],
            exports,
        }
    })
}

fn runtime() -> &'static Runtime {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        Builder::new_current_thread()
            .build()
            .expect("tokio runtime")
    })
}

/// Reads the framed input; past the end, every field is zero.
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, tail) = self.0.split_at(n.min(self.0.len()));
        self.0 = tail;
        head
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let head = self.take(N);
        out[..head.len()].copy_from_slice(head);
        out
    }

    fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.array())
    }

    fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.array())
    }
}

/// Turns the framed form (see the module documentation) into a client byte stream.
fn frame(input: &[u8]) -> Vec<u8> {
    let mut input = Input(input);
    let mut out = Vec::with_capacity(input.0.len() * 2 + 64);
    out.extend_from_slice(&u32::from(input.u8()).to_be_bytes());
    loop {
        let code = input.u8();
        if code == 0 {
            break;
        }
        let length = usize::from(input.u16());
        let payload = input.take(length);
        out.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&u32::from(code).to_be_bytes());
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        out.extend_from_slice(payload);
    }
    let mut cookie = 0u64;
    while !input.0.is_empty() {
        let flags = u16::from(input.u8());
        let command = u16::from(input.u8());
        let offset = u64::from(input.u32());
        let mut length = input.u32();
        if command == cmd::WRITE {
            length = length.min(FRAMED_WRITE_CAP);
        }
        let request = Request {
            flags,
            command,
            cookie,
            offset,
            length,
        };
        out.extend_from_slice(&request.encode());
        if command == cmd::WRITE {
            let fill = input.u8();
            out.resize(out.len() + length as usize, fill);
        }
        cookie += 1;
    }
    out
}

fn serve(stream: &[u8], exports: &ExportSet) {
    let mut reader = BufReader::new(stream);
    let negotiated =
        runtime().block_on(handshake::negotiate(&mut reader, &mut tokio::io::sink(), exports));
    let Ok(session) = negotiated else {
        return;
    };
    assert!(
        session.base_allocation.is_none() || session.structured_replies,
        "a metadata context without structured replies: {session:?}"
    );
    // What the handshake's reader buffered, then the rest: as the server does.
    let requests = io::Cursor::new(reader.buffer().to_vec()).chain(reader.into_inner());
    let never_stopping = AtomicBool::new(false);
    // Large writes on workers, in place or in pieces: one of them per input.
    let modes = [LargeWrites::Workers, LargeWrites::InPlace, LargeWrites::Pieces];
    let large_writes = modes[stream.len() % modes.len()];
    let ending =
        transmission::transmit(requests, &io::sink(), &session, &never_stopping, large_writes);
    assert!(
        !matches!(ending, Ok(Ending::Shutdown)),
        "transmission reported a shutdown nobody asked for"
    );
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let stream: Cow<'_, [u8]> = if mode & 1 == 0 {
        Cow::Borrowed(rest)
    } else {
        Cow::Owned(frame(rest))
    };
    let fixture = fixture();
    fixture.devices.iter().for_each(|device| device.reset());
    serve(&stream, &fixture.exports);
});
