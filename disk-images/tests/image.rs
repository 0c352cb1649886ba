//! Tests of `DiskImage` through its public API: a reference model under random
//! operations, checksum failures, bad files, and concurrent writers.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use disk_images::{sidecar_path, Access, DiskImage, ImageError, Stores, BLOCK_BYTES};
use proptest::prelude::*;

/// A scratch directory on a file system that stores as `stores` says (tmpfs
/// for `Mapping`, the target directory on disk for `File`), so that child
/// processes opening an image there by path store the same way.
fn scratch(stores: Stores) -> tempfile::TempDir {
    match stores {
        Stores::Mapping => tempfile::tempdir_in("/dev/shm"),
        Stores::File => tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")),
    }
    .expect("scratch directory")
}

fn temp_image(size: u64, stores: Stores) -> (tempfile::TempDir, PathBuf, DiskImage) {
    let dir = scratch(stores);
    let path = dir.path().join("disk.img");
    drop(DiskImage::create(&path, size, false).expect("create"));
    let image = DiskImage::open_storing(&path, Access::ReadWrite, Some(stores)).expect("open");
    assert_eq!(image.stores(), stores);
    (dir, path, image)
}

/// Runs each named test (a function taking the `Stores`) both ways.
macro_rules! in_both_stores {
    ($($name:ident),* $(,)?) => {
        mod mapping {
            $( #[test] fn $name() { super::$name(disk_images::Stores::Mapping) } )*
        }
        mod file {
            $( #[test] fn $name() { super::$name(disk_images::Stores::File) } )*
        }
    };
}

in_both_stores!(
    corruption_is_a_media_error_naming_the_block,
    corrupt_checksum_entry_is_caught_too,
    two_openers_share_data_and_checksums,
    allocation_reports_holes_and_data,
    concurrent_writers_never_leave_a_block_with_a_stale_checksum,
    a_reader_never_takes_a_write_in_flight_for_one_cut_short,
    a_host_write_cut_short_leaves_each_byte_old_or_new_and_readable,
    a_repair_cut_short_leaves_a_media_error_not_a_mix,
    damage_after_a_completed_write_is_not_taken_for_a_write_cut_short,
    open_refuses_sidecars_that_do_not_belong,
    read_only_images_refuse_writes,
    a_version_1_checksum_file_is_upgraded_when_opened_for_writing,
    a_flush_skips_an_image_nobody_wrote_since_the_last_one,
);

fn poke(path: &Path, offset: u64, bytes: &[u8]) {
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open for poke");
    file.write_all_at(bytes, offset).expect("poke");
}

#[derive(Debug, Clone)]
enum Op {
    /// `pieces`: stored with `write_piece_at`, a piece ending on every
    /// `pieces`-th block boundary (0: whole, with `write_at`).
    Write {
        offset: u64,
        data: Vec<u8>,
        pieces: u64,
    },
    Read {
        offset: u64,
        len: usize,
    },
    Zero {
        offset: u64,
        len: u64,
        punch: bool,
    },
}

const MODEL_SIZE: u64 = 64 * 1024;

fn op() -> impl Strategy<Value = Op> {
    let offset = 0..MODEL_SIZE;
    prop_oneof![
        (
            offset.clone(),
            proptest::collection::vec(any::<u8>(), 1..20000),
            0u64..3,
        )
            .prop_map(|(offset, data, pieces)| Op::Write {
                offset,
                data,
                pieces
            }),
        (offset.clone(), 1usize..12000).prop_map(|(offset, len)| Op::Read { offset, len }),
        (offset, 1u64..20000, any::<bool>()).prop_map(|(offset, len, punch)| Op::Zero {
            offset,
            len,
            punch
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn behaves_like_a_byte_array_in_memory(ops in proptest::collection::vec(op(), 1..40)) {
        behaves_like_a_byte_array(ops, Stores::Mapping)?;
    }

    #[test]
    fn behaves_like_a_byte_array_on_disk(ops in proptest::collection::vec(op(), 1..40)) {
        behaves_like_a_byte_array(ops, Stores::File)?;
    }
}

/// Writes `data` at `offset` as a server storing a payload as it arrives
/// does: in pieces ending on every `every`-th block boundary of the image,
/// stopping at the first that fails. (A server refuses a write past the end
/// before it stores anything: here, the whole of it as one piece.)
fn write_in_pieces(
    image: &DiskImage,
    offset: u64,
    data: &[u8],
    every: u64,
) -> Result<(), ImageError> {
    if offset + data.len() as u64 > image.size() {
        return image.write_piece_at(offset, data, true);
    }
    let step = every * BLOCK_BYTES as u64;
    let end = offset + data.len() as u64;
    let mut at = offset;
    while at < end {
        let next = ((at / step + 1) * step).min(end);
        let piece = &data[(at - offset) as usize..(next - offset) as usize];
        image.write_piece_at(at, piece, at == offset)?;
        at = next;
    }
    Ok(())
}

/// Random writes (whole and in pieces), reads and zeroing at arbitrary offsets
/// and lengths behave
/// exactly like a plain byte array; out-of-range accesses are refused and
/// change nothing; the image verifies clean at the end and after reopening.
fn behaves_like_a_byte_array(ops: Vec<Op>, stores: Stores) -> Result<(), TestCaseError> {
    {
        let (_dir, path, image) = temp_image(MODEL_SIZE, stores);
        let mut model = vec![0u8; MODEL_SIZE as usize];
        for op in ops {
            match op {
                Op::Write {
                    offset,
                    data,
                    pieces,
                } => {
                    let fits = offset + data.len() as u64 <= MODEL_SIZE;
                    let result = match pieces {
                        0 => image.write_at(offset, &data),
                        every => write_in_pieces(&image, offset, &data, every),
                    };
                    prop_assert_eq!(result.is_ok(), fits, "write {}+{}", offset, data.len());
                    if fits {
                        model[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
                    }
                }
                Op::Read { offset, len } => {
                    let mut buf = vec![0u8; len];
                    let fits = offset + len as u64 <= MODEL_SIZE;
                    let result = image.read_at(offset, &mut buf);
                    prop_assert_eq!(result.is_ok(), fits, "read {}+{}", offset, len);
                    let mut appended = b"prefix".to_vec();
                    prop_assert_eq!(image.read_append(offset, len, &mut appended).is_ok(), fits);
                    if fits {
                        prop_assert_eq!(&buf[..], &model[offset as usize..offset as usize + len]);
                        prop_assert_eq!(&appended[..6], b"prefix");
                        prop_assert_eq!(&appended[6..], &buf[..]);
                    } else {
                        prop_assert_eq!(&appended[..], b"prefix");
                    }
                }
                Op::Zero { offset, len, punch } => {
                    let fits = offset + len <= MODEL_SIZE;
                    prop_assert_eq!(image.write_zeroes(offset, len, punch).is_ok(), fits);
                    if fits {
                        model[offset as usize..(offset + len) as usize].fill(0);
                    }
                }
            }
        }
        image.flush().expect("flush");
        let report = image.verify(|_| ());
        prop_assert!(report.bad_blocks.is_empty());
        drop(image);
        let reopened = DiskImage::open(&path, Access::ReadOnly).expect("reopen");
        let mut all = vec![0u8; MODEL_SIZE as usize];
        reopened.read_at(0, &mut all).expect("read all");
        prop_assert_eq!(all, model);
    }
    Ok(())
}

fn corruption_is_a_media_error_naming_the_block(stores: Stores) {
    let (_dir, path, image) = temp_image(16 * 4096, stores);
    image.write_at(0, &vec![0x5a; 16 * 4096]).expect("fill");
    poke(&path, 3 * 4096 + 17, &[0x00]);

    let mut buf = vec![0u8; 4096];
    let err = image
        .read_at(3 * 4096, &mut buf)
        .expect_err("corrupt block must not read");
    let ImageError::Media(media) = err else {
        panic!("expected a media error, got {err}")
    };
    assert_eq!(media.block, 3);
    assert_eq!(media.image, path);
    assert_ne!(media.expected_crc, media.actual_crc);
    let text = media.to_string();
    assert!(
        text.contains("block 3") && text.contains("disk.img"),
        "{text}"
    );

    let mut appended = vec![9u8; 3];
    assert!(
        matches!(image.read_append(2 * 4096, 3 * 4096, &mut appended), Err(ImageError::Media(m)) if m.block == 3)
    );
    assert_eq!(
        appended,
        [9, 9, 9],
        "a failed append leaves the buffer as it was"
    );

    // A read that merely touches the bad block fails too; neighbours are fine.
    assert!(image.read_at(3 * 4096 + 4000, &mut [0u8; 200]).is_err());
    image.read_at(2 * 4096, &mut buf).expect("block 2 is fine");
    image.read_at(4 * 4096, &mut buf).expect("block 4 is fine");

    // Verify names exactly the bad block.
    let report = image.verify(|_| {});
    assert_eq!(report.bad_blocks.len(), 1);
    assert_eq!(report.bad_blocks[0].block, 3);
    assert_eq!(report.bad_blocks[0].offset, 3 * 4096);

    // Patching part of a corrupt block must not bless it with a fresh CRC...
    assert!(matches!(
        image.write_at(3 * 4096 + 10, &[1, 2, 3]),
        Err(ImageError::Media(_))
    ));
    // ...but rewriting the whole block heals it.
    image
        .write_at(3 * 4096, &vec![0x11; 4096])
        .expect("full-block rewrite");
    image.read_at(3 * 4096, &mut buf).expect("healed");
    assert!(buf.iter().all(|&b| b == 0x11));
    assert!(image.verify(|_| {}).bad_blocks.is_empty());
}

fn corrupt_checksum_entry_is_caught_too(stores: Stores) {
    let (_dir, path, image) = temp_image(4 * 4096, stores);
    poke(&sidecar_path(&path), 64 + 4, &[0xff, 0xff, 0xff, 0xff]);
    assert!(
        matches!(image.read_at(4096, &mut [0u8; 1]), Err(ImageError::Media(m)) if m.block == 1)
    );
}

#[test]
fn create_refuses_bad_sizes_and_existing_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("d.img");
    assert!(matches!(
        DiskImage::create(&path, 0, false),
        Err(ImageError::InvalidSize { .. })
    ));
    assert!(matches!(
        DiskImage::create(&path, 4097, false),
        Err(ImageError::InvalidSize { .. })
    ));
    assert!(!path.exists(), "nothing is created for a bad size");

    let image = DiskImage::create(&path, 8192, false).expect("create");
    image.write_at(0, b"keep me").expect("write");
    image.flush().expect("flush");
    drop(image);
    assert!(matches!(
        DiskImage::create(&path, 8192, false),
        Err(ImageError::Exists { .. })
    ));
    let image = DiskImage::open(&path, Access::ReadOnly).expect("still opens");
    let mut buf = [0u8; 7];
    image.read_at(0, &mut buf).expect("read");
    assert_eq!(&buf, b"keep me", "a refused create must not touch the data");
    drop(image);

    let image = DiskImage::create(&path, 16384, true).expect("force recreates");
    assert_eq!(image.size(), 16384);
    image.read_at(0, &mut buf).expect("read");
    assert_eq!(buf, [0u8; 7]);
}

fn open_refuses_sidecars_that_do_not_belong(stores: Stores) {
    let (dir, path, image) = temp_image(8192, stores);
    drop(image);
    let sidecar = sidecar_path(&path);
    let good = std::fs::read(&sidecar).expect("read sidecar");

    std::fs::write(&sidecar, &good[..good.len() - 2]).expect("truncate");
    assert!(matches!(
        DiskImage::open(&path, Access::ReadWrite),
        Err(ImageError::SidecarTruncated { .. })
    ));

    std::fs::write(&sidecar, vec![0x42u8; good.len()]).expect("foreign");
    let err = DiskImage::open(&path, Access::ReadWrite).expect_err("foreign");
    assert!(matches!(err, ImageError::SidecarInvalid { .. }), "{err}");

    std::fs::write(&sidecar, &good[..10]).expect("short header");
    assert!(matches!(
        DiskImage::open(&path, Access::ReadWrite),
        Err(ImageError::SidecarTruncated { .. })
    ));

    std::fs::write(&sidecar, &good).expect("restore");
    OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open")
        .set_len(12288)
        .expect("grow");
    assert!(matches!(
        DiskImage::open(&path, Access::ReadWrite),
        Err(ImageError::SizeMismatch { .. })
    ));

    std::fs::remove_file(&sidecar).expect("remove");
    assert!(matches!(
        DiskImage::open(&path, Access::ReadWrite),
        Err(ImageError::SidecarMissing { .. })
    ));

    assert!(matches!(
        DiskImage::open(dir.path(), Access::ReadOnly),
        Err(ImageError::NotAFile { .. })
    ));
    assert!(matches!(
        DiskImage::open(&dir.path().join("nope"), Access::ReadOnly),
        Err(ImageError::Io { .. })
    ));
}

fn read_only_images_refuse_writes(stores: Stores) {
    let (_dir, path, image) = temp_image(8192, stores);
    drop(image);
    let image = DiskImage::open(&path, Access::ReadOnly).expect("open");
    assert!(matches!(
        image.write_at(0, b"x"),
        Err(ImageError::ReadOnly { .. })
    ));
    assert!(matches!(
        image.write_zeroes(0, 4096, true),
        Err(ImageError::ReadOnly { .. })
    ));
}

fn two_openers_share_data_and_checksums(stores: Stores) {
    // Two `DiskImage`s on one file stand in for two controller processes: each has
    // its own mapping of the same file.
    let (_dir, path, a) = temp_image(8 * 4096, stores);
    let b = DiskImage::open(&path, Access::ReadWrite).expect("second opener");
    a.write_at(4096, &vec![7u8; 4096]).expect("a writes");
    let mut buf = vec![0u8; 4096];
    b.read_at(4096, &mut buf)
        .expect("b reads a's write with a's checksum");
    assert!(buf.iter().all(|&x| x == 7));
    b.write_at(4096 + 100, b"from b").expect("b patches");
    a.read_at(4096 + 100, &mut buf[..6])
        .expect("a reads b's write");
    assert_eq!(&buf[..6], b"from b");
}

fn allocation_reports_holes_and_data(stores: Stores) {
    let (_dir, _path, image) = temp_image(1 << 20, stores);
    let extents = image.allocation(0, 1 << 20).expect("allocation");
    assert_eq!(extents.iter().map(|e| e.length).sum::<u64>(), 1 << 20);
    assert!(
        extents.iter().all(|e| e.hole),
        "fresh image is all hole: {extents:?}"
    );

    image
        .write_at(256 * 1024, &vec![1u8; 64 * 1024])
        .expect("write");
    let extents = image.allocation(0, 1 << 20).expect("allocation");
    assert_eq!(extents.iter().map(|e| e.length).sum::<u64>(), 1 << 20);
    let mut position = 0;
    let mut data_covers_write = false;
    for extent in &extents {
        if !extent.hole && position <= 256 * 1024 && position + extent.length >= 320 * 1024 {
            data_covers_write = true;
        }
        position += extent.length;
    }
    assert!(data_covers_write, "{extents:?}");

    image.write_zeroes(0, 1 << 20, true).expect("punch");
    let extents = image.allocation(0, 1 << 20).expect("allocation");
    assert!(
        extents.iter().all(|e| e.hole),
        "punched image is all hole: {extents:?}"
    );
}

fn concurrent_writers_never_leave_a_block_with_a_stale_checksum(stores: Stores) {
    const BLOCKS: u64 = 32;
    let (_dir, _path, image) = temp_image(BLOCKS * 4096, stores);
    let image = Arc::new(image);
    let seed: u64 = std::env::var("TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed);
    println!("seed {seed}");
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let image = Arc::clone(&image);
            std::thread::spawn(move || {
                let mut state = seed ^ (t + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                let mut next = || {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state
                };
                let mut buf = vec![0u8; 3 * BLOCK_BYTES];
                for _ in 0..2000 {
                    let offset = next() % (BLOCKS * 4096 - buf.len() as u64);
                    let len = 1 + (next() % buf.len() as u64) as usize;
                    buf[..len].fill(next() as u8);
                    image.write_at(offset, &buf[..len]).expect("write");
                    image
                        .read_at(offset, &mut buf[..len])
                        .expect("read back consistent");
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("writer thread");
    }
    assert!(image.verify(|_| {}).bad_blocks.is_empty());
}

const REWRITE_BLOCKS: usize = 16;

/// Child of the test below: rewrites the first blocks of `CHILD_IMAGE` with
/// whole-block fills until the file `CHILD_STOP` exists.
#[test]
#[ignore = "run as a child process by a_reader_never_takes_a_write_in_flight_for_one_cut_short"]
fn child_rewrites_blocks() {
    let Some(path) = std::env::var_os("CHILD_IMAGE") else {
        return;
    };
    let stop = std::env::var_os("CHILD_STOP").expect("CHILD_STOP");
    let image = DiskImage::open(Path::new(&path), Access::ReadWrite).expect("open");
    for round in 0u32.. {
        if round % 64 == 0 && Path::new(&stop).exists() {
            break;
        }
        let fill = 1 + (round % 255) as u8;
        image
            .write_at(0, &[fill; REWRITE_BLOCKS * BLOCK_BYTES])
            .expect("write");
    }
}

fn a_reader_never_takes_a_write_in_flight_for_one_cut_short(stores: Stores) {
    // While another process rewrites blocks over and over (a host write sets
    // each block's pending word before its bytes), this one reads them. A read
    // that lands mid-write sees a CRC mismatch with the word set; that writer
    // is alive, not dead, and the read must wait for it rather than take the
    // torn block for a write cut short.
    let (dir, path, reader) = temp_image(REWRITE_BLOCKS as u64 * 4096, stores);
    let stop = dir.path().join("stop");
    /// Stops the writer however the test ends (a panic included).
    struct Writer(std::process::Child);
    impl Drop for Writer {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let child = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "child_rewrites_blocks",
            "--ignored",
            "--test-threads=1",
        ])
        .env("CHILD_IMAGE", &path)
        .env("CHILD_STOP", &stop)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn the writer");
    let mut child = Writer(child);
    let mut buf = vec![0u8; REWRITE_BLOCKS * BLOCK_BYTES];
    let (mut reads, mut changed) = (0u64, 0u64);
    // Until 2000 reads have seen the blocks change (the writer may take a
    // while to start), and at most 60 s.
    let started = std::time::Instant::now();
    while changed < 2000 && started.elapsed() < std::time::Duration::from_secs(60) {
        if let Some(status) = child.0.try_wait().expect("wait for the writer") {
            panic!("the writer stopped early: {status:?}");
        }
        let before = buf[0];
        reader
            .read_at(0, &mut buf)
            .unwrap_or_else(|err| panic!("read {reads}: {err}"));
        for (i, block) in buf.chunks_exact(BLOCK_BYTES).enumerate() {
            assert!(
                block.iter().all(|&b| b == block[0]),
                "read {reads} returned a torn block {i}: {:#04x} .. {:#04x}",
                block[0],
                block[BLOCK_BYTES - 1]
            );
        }
        reads += 1;
        changed += u64::from(buf[0] != before);
    }
    std::fs::write(&stop, b"").expect("stop the writer");
    let status = child.0.wait().expect("wait for the writer");
    println!("{reads} reads, {changed} saw a change");
    assert!(status.success(), "the writer: {status:?}");
    // Fewer than 2000 only on a slow build or a busy machine (a debug build
    // running both variants at once); a few hundred still cross the writes.
    assert!(
        changed >= 200,
        "the reads ran alongside the writes ({changed} of {reads} saw a change)"
    );
    assert!(reader.verify(|_| {}).bad_blocks.is_empty());
}

// ------------------------------------------------------------------------
// A writer killed half-way through a block.

/// Runs this test binary again as a child that executes the ignored test
/// `name` with `env` set, and checks that it died by `abort` (the fault hook).
fn run_child_until_abort(name: &str, env: &[(&str, &str)]) {
    use std::os::unix::process::ExitStatusExt;
    let status = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", name, "--ignored", "--test-threads=1"])
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("spawn child");
    assert_eq!(
        status.signal(),
        Some(libc_sigabrt()),
        "the child must abort inside its block write: {status:?}"
    );
}

fn libc_sigabrt() -> i32 {
    nix::sys::signal::Signal::SIGABRT as i32
}

/// Child of the tests below: opens `CHILD_IMAGE` and writes 0xEE over its
/// first two blocks, a host write (`write_at`) or a repair (`rewrite_at`) as
/// `CHILD_KIND` says; `EMULATOR_FAULT_CRASH_IN_BLOCK_WRITE` kills it half-way.
#[test]
#[ignore = "run as a child process by the interrupted-write tests"]
fn child_writes_and_is_killed() {
    let Some(path) = std::env::var_os("CHILD_IMAGE") else {
        return;
    };
    let image = DiskImage::open(Path::new(&path), Access::ReadWrite).expect("open");
    let data = vec![0xEE; 2 * BLOCK_BYTES];
    match std::env::var("CHILD_KIND").as_deref() {
        Ok("repair") => image.rewrite_at(0, &data).expect("rewrite"),
        _ => image.write_at(0, &data).expect("write"),
    }
    panic!("the fault hook should have aborted this write");
}

fn killed_in_block_write(kind: &str, nth: &str, stores: Stores) -> (tempfile::TempDir, PathBuf) {
    let (dir, path, image) = temp_image(64 * 1024, stores);
    image
        .write_at(0, &vec![0x11; 4 * BLOCK_BYTES])
        .expect("old data");
    drop(image);
    run_child_until_abort(
        "child_writes_and_is_killed",
        &[
            ("CHILD_IMAGE", path.to_str().expect("utf-8 path")),
            ("CHILD_KIND", kind),
            ("EMULATOR_FAULT_CRASH_IN_BLOCK_WRITE", nth),
        ],
    );
    (dir, path)
}

fn a_host_write_cut_short_leaves_each_byte_old_or_new_and_readable(stores: Stores) {
    // Killed in the second block: the first is wholly new, the second half new.
    let (_dir, path) = killed_in_block_write("host", "2", stores);
    let image = DiskImage::open(&path, Access::ReadOnly).expect("open read-only");
    let mut got = vec![0u8; 3 * BLOCK_BYTES];
    image
        .read_at(0, &mut got)
        .expect("read-only: the interrupted block reads as it was left");
    drop(image);
    let image = DiskImage::open(&path, Access::ReadWrite).expect("open");
    image
        .read_at(0, &mut got)
        .expect("the interrupted block is settled, not a media error");
    let half = BLOCK_BYTES + BLOCK_BYTES / 2;
    assert!(got[..half].iter().all(|&b| b == 0xEE), "new bytes");
    assert!(got[half..].iter().all(|&b| b == 0x11), "old bytes");
    // Settled for good: a fresh open and a full verify agree.
    drop(image);
    let image = DiskImage::open(&path, Access::ReadOnly).expect("reopen");
    assert!(image.verify(|_| {}).bad_blocks.is_empty());
}

fn a_repair_cut_short_leaves_a_media_error_not_a_mix(stores: Stores) {
    let (_dir, path) = killed_in_block_write("repair", "2", stores);
    let image = DiskImage::open(&path, Access::ReadWrite).expect("open");
    let mut block = vec![0u8; BLOCK_BYTES];
    image
        .read_at(0, &mut block)
        .expect("first block was wholly rewritten");
    assert!(block.iter().all(|&b| b == 0xEE));
    match image.read_at(BLOCK_BYTES as u64, &mut block) {
        Err(ImageError::Media(err)) => assert_eq!(err.block, 1),
        other => panic!("a half-repaired block must stay a media error, got {other:?}"),
    }
    image
        .read_at(2 * BLOCK_BYTES as u64, &mut block)
        .expect("untouched block");
    assert!(block.iter().all(|&b| b == 0x11));
}

fn a_version_1_checksum_file_is_upgraded_when_opened_for_writing(stores: Stores) {
    let (_dir, path, image) = temp_image(3 * BLOCK_BYTES as u64, stores);
    image.write_at(0, &[0x42; 100]).expect("write");
    drop(image);
    // Make it what a version-1 build wrote: header version 1 (and its CRC), no
    // pending table.
    let sidecar = sidecar_path(&path);
    let mut bytes = std::fs::read(&sidecar).expect("read sidecar");
    bytes[8..12].copy_from_slice(&1u32.to_le_bytes());
    let crc = crc32fast::hash(&bytes[0..32]);
    bytes[32..36].copy_from_slice(&crc.to_le_bytes());
    bytes.truncate(64 + 3 * 4);
    std::fs::write(&sidecar, &bytes).expect("write v1 sidecar");

    let image = DiskImage::open(&path, Access::ReadOnly).expect("read-only open of v1");
    assert_eq!(image.info().expect("info").sidecar_version, 1);
    let mut got = [0u8; 100];
    image.read_at(0, &mut got).expect("read v1");
    assert_eq!(got, [0x42; 100]);
    drop(image);
    assert_eq!(
        std::fs::read(&sidecar).expect("sidecar").len(),
        64 + 12,
        "untouched"
    );

    let image = DiskImage::open(&path, Access::ReadWrite).expect("read-write open of v1");
    assert_eq!(image.info().expect("info").sidecar_version, 2);
    assert_eq!(std::fs::read(&sidecar).expect("sidecar").len(), 80 + 24);
    drop(image);
    // An upgrade cut short between extending the file and rewriting the header
    // (a version-1 header on a version-2 length) is finished by the next open.
    let mut cut_short = bytes.clone();
    cut_short.resize(80 + 24, 0);
    std::fs::write(&sidecar, &cut_short).expect("write cut-short upgrade");
    DiskImage::open(&path, Access::ReadOnly).expect("read-only open of a cut-short upgrade");
    let image = DiskImage::open(&path, Access::ReadWrite).expect("finishes the upgrade");
    assert_eq!(image.info().expect("info").sidecar_version, 2);
    image
        .write_at(50, &[0x43; 10])
        .expect("write after upgrade");
    image.read_at(0, &mut got).expect("read after upgrade");
    assert_eq!(
        &got[48..62],
        &[0x42, 0x42, 0x43, 0x43, 0x43, 0x43, 0x43, 0x43, 0x43, 0x43, 0x43, 0x43, 0x42, 0x42]
    );
    assert!(image.verify(|_| {}).bad_blocks.is_empty());
}

fn damage_after_a_completed_write_is_not_taken_for_a_write_cut_short(stores: Stores) {
    // A writer that died after storing a block's CRC, before clearing its
    // pending word: the write completed. Damage to the block since is a media
    // error, not a write cut short.
    let (_dir, path, image) = temp_image(4 * BLOCK_BYTES as u64, stores);
    image.write_at(0, &vec![0x33; BLOCK_BYTES]).expect("write");
    drop(image);
    let sidecar = sidecar_path(&path);
    let stored = std::fs::read(&sidecar).expect("sidecar")[64..68].to_vec();
    let pending_base = 64 + 4 * 4; // 4 blocks: 80, already a multiple of 8
    let mut word = [0u8; 8];
    word[..4].copy_from_slice(&stored);
    word[7] = 0xC0; // PENDING | TRUSTED
    poke(&sidecar, pending_base, &word);
    poke(&path, 10, &[0x34]);
    let image = DiskImage::open(&path, Access::ReadWrite).expect("open");
    let mut block = vec![0u8; BLOCK_BYTES];
    match image.read_at(0, &mut block) {
        Err(ImageError::Media(err)) => assert_eq!(err.block, 0),
        other => panic!("damage after a completed write must be a media error, got {other:?}"),
    }
}

fn a_flush_skips_an_image_nobody_wrote_since_the_last_one(stores: Stores) {
    // Two openers stand in for two processes serving one image.
    let (_dir, path, a) = temp_image(8 * 4096, stores);
    let b = DiskImage::open_storing(&path, Access::ReadWrite, Some(stores)).expect("open b");
    assert!(
        b.start_flush().is_some(),
        "the first flush of a new lock table syncs"
    );
    b.finish_flush(None).expect("nothing started");
    b.flush().expect("flush");
    assert!(a.start_flush().is_none(), "nothing written since b's flush");
    a.write_at(4096, &[1u8; 100]).expect("a writes");
    let started = b.start_flush();
    assert!(started.is_some(), "b must sync what a wrote");
    b.finish_flush(started).expect("b syncs");
    assert!(a.start_flush().is_none(), "b's flush covered a's write");
    // A flush that started before a write does not cover it.
    let early = a.start_flush();
    assert!(early.is_none());
    b.write_zeroes(0, 8192, true).expect("b trims");
    let started = a.start_flush();
    assert!(started.is_some(), "a trim is a write too");
    b.write_at(0, &[2u8; 10]).expect("b writes meanwhile");
    a.finish_flush(started).expect("a syncs");
    assert!(
        b.start_flush().is_some(),
        "a write after a flush started needs a flush of its own"
    );
}

// The write-intent record and power loss (see `disk_images::intent`). A power
// loss is staged on the files the way the page cache would leave them on the
// disk: the process is gone (its lock table with it), a block's new bytes are
// there without their CRC (or the other way round), and the record carries the
// stamp of a boot that is not this one. On a disk file system only: on tmpfs a
// power loss leaves nothing, so no record is kept there.

/// Blocks in the power-loss tests' images: 4 blocks a region.
const INTENT_BLOCKS: u64 = 256;

/// The write-intent record: (host bits, repair bits, stamp).
fn intent_record(path: &Path) -> (u64, u64, u64) {
    let header = std::fs::read(sidecar_path(path)).expect("sidecar");
    let word = |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().expect("8 bytes"));
    (
        word(disk_images::intent::HOST_OFFSET),
        word(disk_images::intent::REPAIR_OFFSET),
        word(disk_images::intent::STAMP_OFFSET),
    )
}

/// Gives the record the stamp of another boot: what the disk shows after a
/// power loss and a reboot.
fn stage_reboot(path: &Path) {
    let this = disk_images::intent::this_boot().expect("boot id");
    poke(
        &sidecar_path(path),
        disk_images::intent::STAMP_OFFSET as u64,
        &(this ^ 2).to_le_bytes(),
    );
}

fn read_block(image: &DiskImage, block: u64) -> Result<Vec<u8>, ImageError> {
    let mut buf = vec![0u8; BLOCK_BYTES];
    image
        .read_at(block * BLOCK_BYTES as u64, &mut buf)
        .map(|()| buf)
}

fn open_file_stores(path: &Path, access: Access) -> DiskImage {
    DiskImage::open_storing(path, access, Some(Stores::File)).expect("open")
}

#[test]
fn writes_record_their_regions_before_they_land_and_a_first_opener_clears_them() {
    let (_dir, path, image) = temp_image(INTENT_BLOCKS * BLOCK_BYTES as u64, Stores::File);
    assert_eq!(intent_record(&path), (0, 0, 0), "a new image has no record");
    image
        .write_at(10 * BLOCK_BYTES as u64, &[1u8; 100])
        .expect("host write");
    image
        .rewrite_at(20 * BLOCK_BYTES as u64, &vec![2u8; BLOCK_BYTES])
        .expect("repair");
    image
        .write_blocks(40 * BLOCK_BYTES as u64, &vec![3u8; 2 * BLOCK_BYTES], None)
        .expect("rebuild write");
    let this = disk_images::intent::this_boot().expect("boot id");
    assert_eq!(intent_record(&path), (1 << 2, 1 << 5 | 1 << 10, this));
    // A second opener (another process, in effect) keeps it: writes are open.
    let second = open_file_stores(&path, Access::ReadWrite);
    assert_eq!(intent_record(&path).0, 1 << 2);
    drop((image, second));
    assert_eq!(intent_record(&path).0, 1 << 2, "closing keeps the record");
    // The next first opener, in the same boot, syncs and clears it.
    let image = open_file_stores(&path, Access::ReadWrite);
    assert_eq!(intent_record(&path), (0, 0, 0));
    assert_eq!(read_block(&image, 10).expect("read")[..100], [1u8; 100]);
}

#[test]
fn after_a_power_loss_a_host_write_half_on_the_disk_is_kept_as_left() {
    let (_dir, path, image) = temp_image(INTENT_BLOCKS * BLOCK_BYTES as u64, Stores::File);
    image
        .write_at(10 * BLOCK_BYTES as u64, &vec![0xAA; BLOCK_BYTES])
        .expect("write");
    image.flush().expect("flush");
    image
        .write_at(10 * BLOCK_BYTES as u64, &vec![0xBB; BLOCK_BYTES])
        .expect("write, never flushed");
    drop(image);
    // On the disk: half of the new bytes, the CRC of neither, no pending word.
    poke(&path, 10 * BLOCK_BYTES as u64, &[0xCC; 2048]);
    // Damage at rest, in a region nobody wrote: not excused.
    poke(&path, 100 * BLOCK_BYTES as u64 + 7, &[0x5A]);
    stage_reboot(&path);

    let image = open_file_stores(&path, Access::ReadWrite);
    let mut expected = vec![0xBB; BLOCK_BYTES];
    expected[..2048].fill(0xCC);
    assert_eq!(read_block(&image, 10).expect("kept as left"), expected);
    match read_block(&image, 100) {
        Err(ImageError::Media(err)) => assert_eq!(err.block, 100),
        other => panic!("damage outside the record must stay a media error: {other:?}"),
    }
    assert_eq!(intent_record(&path), (0, 0, 0), "settled and cleared");
    // Settled for good: the CRC was stored, and damage to that block now is
    // a media error again.
    drop(image);
    let image = open_file_stores(&path, Access::ReadWrite);
    assert_eq!(read_block(&image, 10).expect("still kept"), expected);
    drop(image);
    poke(&path, 10 * BLOCK_BYTES as u64, &[0xDD]);
    let image = open_file_stores(&path, Access::ReadWrite);
    assert!(matches!(read_block(&image, 10), Err(ImageError::Media(_))));
}

#[test]
fn after_a_power_loss_a_repair_half_on_the_disk_stays_a_media_error() {
    let (_dir, path, image) = temp_image(INTENT_BLOCKS * BLOCK_BYTES as u64, Stores::File);
    image
        .rewrite_at(20 * BLOCK_BYTES as u64, &vec![0x11; BLOCK_BYTES])
        .expect("repair");
    // A host write into the same region does not make the repair trusted.
    image
        .write_at(21 * BLOCK_BYTES as u64, &vec![0x22; BLOCK_BYTES])
        .expect("host write");
    drop(image);
    poke(&path, 20 * BLOCK_BYTES as u64, &[0x99; 100]);
    stage_reboot(&path);
    let image = open_file_stores(&path, Access::ReadWrite);
    match read_block(&image, 20) {
        Err(ImageError::Media(err)) => assert_eq!(err.block, 20),
        other => panic!("a repair cut short by a power loss is never blessed: {other:?}"),
    }
    assert_eq!(
        read_block(&image, 21).expect("untouched"),
        vec![0x22; BLOCK_BYTES]
    );
}

#[test]
fn a_read_only_opener_after_a_power_loss_reads_what_was_left_and_changes_nothing() {
    let (_dir, path, image) = temp_image(INTENT_BLOCKS * BLOCK_BYTES as u64, Stores::File);
    image
        .write_at(30 * BLOCK_BYTES as u64, &vec![0x44; BLOCK_BYTES])
        .expect("write");
    drop(image);
    poke(&path, 30 * BLOCK_BYTES as u64, &[0x45; 10]);
    stage_reboot(&path);
    let sidecar_before = std::fs::read(sidecar_path(&path)).expect("sidecar");
    let reader = open_file_stores(&path, Access::ReadOnly);
    assert_eq!(
        read_block(&reader, 30).expect("kept")[..11],
        [0x45; 10]
            .iter()
            .chain(&[0x44])
            .copied()
            .collect::<Vec<_>>()[..]
    );
    assert!(reader.verify(|_| {}).bad_blocks.is_empty());
    assert_eq!(
        std::fs::read(sidecar_path(&path)).expect("sidecar"),
        sidecar_before
    );
    drop(reader);
    // The first writer settles it.
    let writer = open_file_stores(&path, Access::ReadWrite);
    assert_eq!(intent_record(&path), (0, 0, 0));
    assert!(writer.verify(|_| {}).bad_blocks.is_empty());
}

/// On a full file system a write to a block never written fails with ENOSPC,
/// whichever way bytes are stored, and the process lives on: with `pwrite`
/// (`Stores::File`) the bytes' own `ENOSPC` says so, and the sidecar's pending
/// words, stored through the mapping for every block write, never meet a hole
/// (which would be a SIGBUS): the sidecar is allocated whole when the image is
/// opened for writing. In a 1 MiB tmpfs filled up to the last page; needs
/// root (it mounts the tmpfs).
#[test]
fn a_full_file_system_fails_a_new_block_with_enospc_not_sigbus() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root to mount a small tmpfs");
        return;
    }
    let dir = tempfile::tempdir().expect("a mount point");
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(dir.path())
        .status()
        .expect("run mount");
    assert!(mounted.success(), "mount a 1 MiB tmpfs");
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(self.0).status();
        }
    }
    let _unmount = Unmount(dir.path());
    let path = dir.path().join("disk.img");
    DiskImage::create(&path, 8 << 20, false).expect("a sparse 8 MiB image");
    // As created on a disk file system: past the checksums (4 bytes a block,
    // after the 64-byte header), the sidecar's pending table is a hole (the
    // tmpfs opener above allocated it).
    {
        use nix::fcntl::{fallocate, FallocateFlags};
        use std::os::fd::AsRawFd;
        let sidecar = std::fs::OpenOptions::new()
            .write(true)
            .open(sidecar_path(&path))
            .expect("the sidecar");
        let pending = (64 + 4 * 2048u64).next_multiple_of(4096) as i64;
        let len = sidecar.metadata().expect("sidecar size").len() as i64 - pending;
        fallocate(
            sidecar.as_raw_fd(),
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            pending,
            len,
        )
        .expect("punch the pending table");
    }
    let image = DiskImage::open_storing(&path, Access::ReadWrite, Some(Stores::File))
        .expect("open, storing with pwrite");
    let old = vec![0x5Au8; BLOCK_BYTES];
    image
        .write_at(0, &old)
        .expect("block 0, while there is room");
    // Fill the file system to the last page.
    let file = std::fs::File::create(dir.path().join("filler")).expect("filler");
    let page = [0xA5u8; 4096];
    let mut pages = 0u64;
    while file.write_all_at(&page, pages * 4096).is_ok() {
        pages += 1;
    }
    assert!(pages > 0, "the filler took some pages");
    // Block 1000: its bytes are a hole, and so, unless the sidecar was
    // allocated whole, is the page of its pending word (block 0's is another).
    let far = 1000 * BLOCK_BYTES as u64;
    match image.write_at(far, &[0x77u8; BLOCK_BYTES]) {
        Err(ImageError::Io { source, .. }) => assert_eq!(
            source.raw_os_error(),
            Some(nix::errno::Errno::ENOSPC as i32),
            "{source}"
        ),
        other => panic!("expected ENOSPC for a new block, got {other:?}"),
    }
    let new = vec![0x3Cu8; BLOCK_BYTES];
    image.write_at(0, &new).expect("an overwrite needs no room");
    let mut back = vec![0u8; BLOCK_BYTES];
    image.read_at(0, &mut back).expect("read block 0");
    assert_eq!(back, new);
    image.read_at(far, &mut back).expect("read block 1000");
    assert!(
        back.iter().all(|&b| b == 0),
        "the refused block reads as zeros"
    );
}
