//! The fault layer through an array's public API: rules written to the fault
//! book change what the members do from the next I/O, and clearing them
//! restores the disk. Each effect is checked against the member's own image
//! (opened apart from the layer), so a layer that did nothing fails. The
//! random test prints its seed; `RAID_TEST_SEED` replays it.

use std::path::Path;
use std::sync::Arc;

use controllers::array::{geometry, Array};
use controllers::faults::{DiskRule, Effect, FaultBook, FaultLayer, OpSet, ANY_FILE};
use controllers::raid::{ArrayState, Level, MemberState, RaidError};
use disk_images::{Access, DiskImage, ImageError};

mod common;
use common::{base_seed, Rng};

const CHUNK: u64 = 64 * 1024;
const DISK: u64 = 4 << 20;

fn array(dir: &Path) -> Array {
    Array::create(dir, geometry(Level::Raid5, 4, CHUNK, DISK), 0, 1).expect("create the array")
}

fn rule(id: &str, file: &str, effect: Effect) -> DiskRule {
    DiskRule {
        seed: 7,
        ..DiskRule::everywhere(id, file, effect)
    }
}

fn set(dir: &Path, rules: Vec<DiskRule>) {
    FaultBook::open(dir)
        .expect("open the book")
        .change(|book| *book = rules)
        .expect("change the book");
}

/// The bytes member `file` holds at `offset`, read past the layer.
fn stored(dir: &Path, file: &str, offset: u64, len: usize) -> Vec<u8> {
    let image = DiskImage::open(&dir.join(file), Access::ReadOnly).expect("open the member");
    let mut buf = vec![0u8; len];
    image.read_at(offset, &mut buf).expect("read the member");
    buf
}

/// Whether member `file` has no block allocated in `[offset, offset+len)`,
/// asked of the host file system past the layer.
fn hole(dir: &Path, file: &str, offset: u64, len: u64) -> bool {
    let image = DiskImage::open(&dir.join(file), Access::ReadOnly).expect("open the member");
    let extents = image.allocation(offset, len).expect("SEEK_DATA/SEEK_HOLE");
    extents.iter().all(|extent| extent.hole)
}

/// Asserts that `result` is the full host file system's ENOSPC, as the NBD
/// layer recognises it (an I/O error whose source is StorageFull).
fn assert_no_space(result: Result<(), ImageError>, what: &str) {
    match result {
        Err(ImageError::Io {
            operation, source, ..
        }) => {
            assert_eq!(
                source.raw_os_error(),
                Some(nix::errno::Errno::ENOSPC as i32),
                "{what}: {source}"
            );
            assert_eq!(source.kind(), std::io::ErrorKind::StorageFull, "{what}");
            assert!(
                operation.contains("injected") && operation.contains("file system is full"),
                "{what}: {operation}"
            );
        }
        other => panic!("{what}: expected ENOSPC from the full file system, got {other:?}"),
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

#[test]
fn a_read_error_is_reconstructed_from_parity_and_the_block_written_back() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let array = array(dir.path());
    let engine = Arc::clone(array.engine());
    let data = pattern(1, 3 * CHUNK as usize);
    engine.write_at(0, &data).expect("the I/O");
    // Row 0's data chunks are on disks 1, 2, 3 (parity rotates); fail reads of
    // the first data chunk's disk wherever it is.
    let disk = engine.geometry().data_disk(0, 0);
    let file = format!("disk{disk}.img");
    let before = engine.repaired_blocks();
    set(
        dir.path(),
        vec![DiskRule {
            ops: OpSet {
                read: true,
                write: false,
                flush: false,
            },
            end: CHUNK,
            ..rule("f1", &file, Effect::Error { errno: 5 })
        }],
    );
    let view = engine.view().expect("the I/O");
    let mut direct = vec![0u8; 4096];
    match view.images[disk].read_at(0, &mut direct) {
        Err(ImageError::Media(media)) => {
            assert_eq!(media.injected.as_deref(), Some("f1"), "{media}");
            assert!(media.to_string().contains("injected fault f1"), "{media}");
        }
        other => panic!("expected an injected medium error, got {other:?}"),
    }
    let mut back = vec![0u8; data.len()];
    engine.read_at(0, &mut back).expect("the I/O");
    assert_eq!(
        back, data,
        "the array reconstructs what the disk cannot read"
    );
    assert!(
        engine.repaired_blocks() > before,
        "and writes the blocks back"
    );
    set(dir.path(), Vec::new());
    view.images[disk]
        .read_at(0, &mut direct)
        .expect("cleared: readable again");
}

#[test]
fn a_write_error_reaches_the_writer_and_a_flush_error_the_flusher() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let array = array(dir.path());
    let engine = Arc::clone(array.engine());
    set(
        dir.path(),
        vec![DiskRule {
            ops: OpSet {
                read: false,
                write: true,
                flush: true,
            },
            ..rule("f2", "disk0.img", Effect::Error { errno: 28 })
        }],
    );
    let err = engine
        .write_at(0, &pattern(2, 3 * CHUNK as usize))
        .expect_err("a member write fails");
    assert!(err.to_string().contains("No space left"), "{err}");
    let err = engine.flush().expect_err("a member flush fails");
    assert!(err.to_string().contains("flush (injected fault)"), "{err}");
    set(dir.path(), Vec::new());
    engine
        .write_at(0, &pattern(2, 3 * CHUNK as usize))
        .expect("the I/O");
    engine.flush().expect("the I/O");
}

#[test]
fn lost_writes_are_acknowledged_and_not_stored_and_torn_writes_store_half() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let array = array(dir.path());
    let engine = Arc::clone(array.engine());
    let view = engine.view().expect("the I/O");
    let old = pattern(3, 8 * 4096);
    view.images[0].write_at(0, &old).expect("the I/O");
    set(
        dir.path(),
        vec![rule("f3", "disk0.img", Effect::LostWrites)],
    );
    let new = pattern(4, 8 * 4096);
    view.images[0].write_at(0, &new).expect("acknowledged");
    assert_eq!(
        stored(dir.path(), "disk0.img", 0, old.len()),
        old,
        "not stored"
    );
    set(
        dir.path(),
        vec![rule("f4", "disk0.img", Effect::TornWrites)],
    );
    view.images[0].write_at(0, &new).expect("acknowledged");
    let now = stored(dir.path(), "disk0.img", 0, old.len());
    assert_eq!(now[..4 * 4096], new[..4 * 4096], "the first half is stored");
    assert_eq!(now[4 * 4096..], old[4 * 4096..], "the second half is not");
    set(dir.path(), Vec::new());
    view.images[0].write_at(0, &new).expect("the I/O");
    assert_eq!(stored(dir.path(), "disk0.img", 0, new.len()), new);
}

#[test]
fn a_corrupting_disk_flips_exactly_the_bits_asked_in_what_is_read_and_only_there() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let array = array(dir.path());
    let engine = Arc::clone(array.engine());
    let view = engine.view().expect("the I/O");
    let data = pattern(5, 4 * 4096);
    view.images[1].write_at(0, &data).expect("the I/O");
    set(
        dir.path(),
        vec![DiskRule {
            start: 4096,
            end: 2 * 4096,
            ..rule("f5", "disk1.img", Effect::Corrupt { bits: 3 })
        }],
    );
    let mut read = vec![0u8; 4096];
    view.images[1].read_at(0, &mut read).expect("the I/O");
    assert_eq!(read, data[..4096], "outside the range: untouched");
    view.images[1].read_at(4096, &mut read).expect("the I/O");
    let flipped: u32 = read
        .iter()
        .zip(&data[4096..2 * 4096])
        .map(|(a, b)| (a ^ b).count_ones())
        .sum();
    assert!((1..=3).contains(&flipped), "{flipped} bits flipped");
    assert_eq!(
        stored(dir.path(), "disk1.img", 4096, 4096),
        data[4096..2 * 4096],
        "at rest: intact"
    );
}

#[test]
fn a_pulled_disk_is_failed_in_the_view_at_once_and_answers_again_when_cleared() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let array = array(dir.path());
    let engine = Arc::clone(array.engine());
    let data = pattern(6, 3 * CHUNK as usize);
    engine.write_at(0, &data).expect("the I/O");
    set(
        dir.path(),
        vec![rule("f6", "disk2.img", Effect::Absent { errno: 6 })],
    );
    assert_eq!(engine.member_states()[2], MemberState::Failed);
    assert_eq!(engine.state(), ArrayState::Degraded);
    let mut back = vec![0u8; data.len()];
    engine.read_at(0, &mut back).expect("the I/O");
    assert_eq!(back, data, "read degraded");
    set(
        dir.path(),
        vec![
            rule("f6", "disk2.img", Effect::Absent { errno: 6 }),
            rule("f7", "disk3.img", Effect::Absent { errno: 6 }),
        ],
    );
    assert_eq!(engine.state(), ArrayState::Failed);
    back.fill(0);
    let err = engine.read_at(0, &mut back).expect_err("two disks away");
    assert!(err.to_string().to_lowercase().contains("failed"), "{err}");
    assert!(back.iter().all(|&b| b == 0), "nothing put in the buffer");
    set(dir.path(), Vec::new());
    assert_eq!(engine.state(), ArrayState::Optimal);
    engine.read_at(0, &mut back).expect("the I/O");
    assert_eq!(back, data);
}

#[test]
fn a_rule_with_a_rate_hits_the_same_ios_for_the_same_seed() {
    let hits = |seed: u64| {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let array = array(dir.path());
        let view = array.engine().view().expect("the I/O");
        set(
            dir.path(),
            vec![DiskRule {
                rate: 0.3,
                seed,
                ..rule("f8", "disk0.img", Effect::Error { errno: 5 })
            }],
        );
        (0..200)
            .map(|i| view.images[0].write_at(i * 4096, &[1u8; 4096]).is_err())
            .collect::<Vec<bool>>()
    };
    let first = hits(11);
    let count = first.iter().filter(|&&hit| hit).count();
    assert!((30..=90).contains(&count), "{count} of 200 hit at rate 0.3");
    assert_eq!(first, hits(11), "replayed with the same seed");
    assert_ne!(first, hits(12), "another seed, other I/Os");
}

#[test]
fn a_delayed_disk_takes_at_least_the_delay() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let array = array(dir.path());
    let view = array.engine().view().expect("the I/O");
    set(
        dir.path(),
        vec![rule("f9", "disk0.img", Effect::Delay { ms: 30 })],
    );
    let started = std::time::Instant::now();
    let mut buf = [0u8; 4096];
    view.images[0].read_at(0, &mut buf).expect("the I/O");
    assert!(started.elapsed() >= std::time::Duration::from_millis(30));
}

#[test]
fn a_full_host_file_system_refuses_writes_into_holes_and_takes_overwrites() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let array = array(dir.path());
    let engine = Arc::clone(array.engine());
    let view = engine.view().expect("the I/O");
    const HOLE: u64 = 1 << 20;
    let old = pattern(10, 4096);
    view.images[0].write_at(0, &old).expect("the I/O");
    assert!(
        !hole(dir.path(), "disk0.img", 0, 4096),
        "a written block is allocated"
    );
    for file in ["disk0.img", "disk1.img", "disk2.img", "disk3.img"] {
        assert!(hole(dir.path(), file, HOLE, 4096), "{file}: a hole before");
    }
    set(dir.path(), vec![rule("f10", ANY_FILE, Effect::FsFull)]);

    // Overwrites of allocated blocks are stored, whole or in part.
    let new = pattern(11, 4096);
    view.images[0].write_at(0, &new).expect("an overwrite");
    assert_eq!(stored(dir.path(), "disk0.img", 0, 4096), new);
    view.images[0]
        .write_at(100, &old[..50])
        .expect("part of an allocated block");
    let mut expected = new.clone();
    expected[100..150].copy_from_slice(&old[..50]);
    assert_eq!(stored(dir.path(), "disk0.img", 0, 4096), expected);

    // A write into a hole fails and stores nothing; so does one that is half
    // overwrite, half hole: not even its allocated block changes.
    assert_no_space(
        view.images[0].write_at(HOLE, &pattern(12, 4096)),
        "a host write into a hole",
    );
    assert_no_space(
        view.images[0].write_at(0, &pattern(13, 2 * 4096)),
        "a write of an allocated block and a hole",
    );
    assert_eq!(
        stored(dir.path(), "disk0.img", 0, 4096),
        expected,
        "nothing stored"
    );
    assert!(hole(dir.path(), "disk0.img", 4096, 4096), "still a hole");
    assert_no_space(
        view.images[1].write_blocks(HOLE, &pattern(14, 2 * 4096), None),
        "a rebuild write into a hole",
    );
    assert_no_space(
        view.images[2].rewrite_at(HOLE, &pattern(15, 4096)),
        "a repair into a hole",
    );
    for (index, file) in ["disk0.img", "disk1.img", "disk2.img"].iter().enumerate() {
        assert!(
            hole(dir.path(), file, HOLE, 2 * 4096),
            "{file}: still a hole"
        );
        // Reads are untouched: the hole reads as zeros through the layer.
        let mut back = vec![1u8; 2 * 4096];
        view.images[index].read_at(HOLE, &mut back).expect("a read");
        assert!(back.iter().all(|&b| b == 0), "{file}: zeros");
    }
    // Flushes and checksum-only marks are untouched too.
    engine.flush().expect("a flush");
    view.images[3]
        .mark_unreadable(HOLE, 4096)
        .expect("marking a block unreadable writes no data block");

    // Through the engine: the host's write fails with ENOSPC (what the NBD
    // layer answers), and the array reads as before.
    let row = engine.geometry().row_bytes();
    match engine.write_at(4 * row, &pattern(16, 4096)) {
        Err(RaidError::Member {
            source: ImageError::Io { source, .. },
            ..
        }) => assert_eq!(source.kind(), std::io::ErrorKind::StorageFull, "{source}"),
        other => panic!("expected a member's ENOSPC, got {other:?}"),
    }
    let mut back = vec![1u8; 4096];
    engine.read_at(4 * row, &mut back).expect("a read");
    assert!(back.iter().all(|&b| b == 0), "never written: zeros");

    // Cleared: the file system has room again.
    set(dir.path(), Vec::new());
    let data = pattern(17, 4096);
    view.images[0].write_at(HOLE, &data).expect("room again");
    assert_eq!(stored(dir.path(), "disk0.img", HOLE, 4096), data);
    view.images[1]
        .write_blocks(HOLE, &data, None)
        .expect("room again");
    assert_eq!(stored(dir.path(), "disk1.img", HOLE, 4096), data);
    engine.write_at(4 * row, &data).expect("room again");
    engine.read_at(4 * row, &mut back).expect("a read");
    assert_eq!(back, data);
}

#[test]
fn a_rule_for_any_file_covers_spares_and_disks_added_later_but_a_rule_for_one_disk_does_not() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let _array = array(dir.path());
    let spare = DiskImage::create(&dir.path().join("spare9.img"), DISK, false).expect("an image");
    let layer = FaultLayer::open(dir.path()).expect("the fault layer");
    let spare = layer.wrap("spare9.img", Arc::new(spare));
    set(dir.path(), vec![rule("f11", "disk0.img", Effect::FsFull)]);
    spare
        .write_at(0, &pattern(18, 4096))
        .expect("a rule for disk0.img leaves spare9.img alone");
    set(dir.path(), vec![rule("f12", ANY_FILE, Effect::FsFull)]);
    assert_no_space(spare.write_at(4096, &pattern(19, 4096)), "the spare");
    assert!(hole(dir.path(), "spare9.img", 4096, 4096));
    spare
        .write_at(0, &pattern(20, 4096))
        .expect("an overwrite of the spare");
}

/// A row write one member cannot store (its disk file has no block there and
/// the file system is full) fails before any member stores its part: the row's
/// parity stays the XOR of its data, so a later disk failure reconstructs what
/// was acknowledged. Without the reservation of every member's range first,
/// the first chunk's disk stored the new bytes and the parity did not change.
#[test]
fn a_row_write_one_member_cannot_store_changes_no_member() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let array = array(dir.path());
    let engine = Arc::clone(array.engine());
    let g = engine.geometry();
    let row = g.row_bytes();
    let at = 10 * row;
    let first = pattern(21, CHUNK as usize);
    engine
        .write_at(at, &first)
        .expect("chunk 0 of the row (and its parity)");
    let (d0, d1, p) = (g.data_disk(10, 0), g.data_disk(10, 1), g.parity_disk(10));
    let file = |disk: usize| format!("disk{disk}.img");
    let offset = 10 * CHUNK;
    assert!(
        hole(dir.path(), &file(d1), offset, CHUNK),
        "chunk 1's disk: a hole"
    );
    set(dir.path(), vec![rule("f13", ANY_FILE, Effect::FsFull)]);

    match engine.write_at(at, &pattern(22, 2 * CHUNK as usize)) {
        Err(RaidError::Member {
            source: ImageError::Io { source, .. },
            ..
        }) => assert_eq!(source.kind(), std::io::ErrorKind::StorageFull, "{source}"),
        other => panic!("expected a member's ENOSPC, got {other:?}"),
    }
    assert_eq!(
        stored(dir.path(), &file(d0), offset, CHUNK as usize),
        first,
        "chunk 0's disk stored part of a write that failed"
    );
    let data: Vec<Vec<u8>> = (0..g.data_disks())
        .map(|k| {
            stored(
                dir.path(),
                &file(g.data_disk(10, k)),
                offset,
                CHUNK as usize,
            )
        })
        .collect();
    let mut xor = vec![0u8; CHUNK as usize];
    for chunk in &data {
        for (x, b) in xor.iter_mut().zip(chunk) {
            *x ^= b;
        }
    }
    assert_eq!(
        stored(dir.path(), &file(p), offset, CHUNK as usize),
        xor,
        "the row's parity is not the XOR of its data"
    );
    set(dir.path(), Vec::new());
    drop(engine);
    let mut array = array;
    array.fail(d0).expect("fail chunk 0's disk");
    let mut back = vec![0u8; CHUNK as usize];
    array
        .engine()
        .read_at(at, &mut back)
        .expect("read through the parity");
    assert_eq!(back, first, "the acknowledged chunk, reconstructed");
}

/// A rule that fails every write to `file` with EIO (reads and flushes work).
fn write_errors(id: &str, file: &str) -> DiskRule {
    DiskRule {
        ops: OpSet {
            read: false,
            write: true,
            flush: false,
        },
        ..rule(id, file, Effect::Error { errno: 5 })
    }
}

/// md's rule: a member that cannot store a write is failed, and the row is
/// written on without it, so its parity is the parity of the new data. The
/// host's write succeeds, as one to a degraded array does; the failure is
/// recorded in the array's metadata for every process (and a hot spare can
/// then take its place). Before, the write failed with the member's EIO and
/// left the member in: the row's other members held the new bytes and its
/// parity the old, so a later failure of another disk reconstructed bytes no
/// one wrote.
#[test]
fn a_member_that_fails_a_write_is_failed_and_the_row_written_without_it() {
    for level in [Level::Raid5, Level::Raid6] {
        for role in ["data", "parity"] {
            let dir = tempfile::tempdir().expect("a temporary directory");
            let array = Array::create(dir.path(), geometry(level, 5, CHUNK, DISK), 1, 1)
                .expect("create the array");
            let engine = Arc::clone(array.engine());
            let g = engine.geometry();
            let row = g.row_bytes();
            let old = pattern(30, 4 * row as usize);
            engine.write_at(0, &old).expect("fill four rows");
            // Row 2: a write over chunks 0 and 1; the failing disk holds chunk 1
            // or the row's P.
            let failing = match role {
                "data" => g.data_disk(2, 1),
                _ => g.parity_disk(2),
            };
            set(
                dir.path(),
                vec![write_errors("f20", &format!("disk{failing}.img"))],
            );
            let new = pattern(31, 2 * CHUNK as usize);
            engine
                .write_at(2 * row, &new)
                .unwrap_or_else(|err| panic!("{level:?} {role}: the array absorbs it: {err}"));
            assert_eq!(
                engine.member_states()[failing],
                MemberState::Failed,
                "{level:?} {role}: the member that failed the write is failed"
            );
            let on_disk = controllers::array::read_metadata(dir.path()).expect("array.json");
            assert_eq!(
                on_disk.members[failing].state,
                MemberState::Failed,
                "{level:?} {role}: recorded for every process"
            );
            assert_eq!(engine.state(), ArrayState::Degraded, "{level:?} {role}");
            set(dir.path(), Vec::new());
            let mut expected = old.clone();
            expected[2 * row as usize..][..new.len()].copy_from_slice(&new);
            let mut back = vec![0u8; expected.len()];
            engine.read_at(0, &mut back).expect("read back, degraded");
            assert!(
                back == expected,
                "{level:?} {role}: the row reads as written, the missing chunk from the parity"
            );
            // Another disk of the row fails. RAID-6 reconstructs the data from
            // a row in step; RAID-5 has nothing left to reconstruct from and
            // says so (before, it reconstructed from the stale parity the
            // member left in: bytes no one wrote).
            engine
                .fail_member(g.data_disk(2, 0))
                .expect("fail another disk");
            match (level, engine.read_at(0, &mut back)) {
                (Level::Raid6, Ok(())) => assert!(
                    back == expected,
                    "{level:?} {role}: reconstructed from a row in step"
                ),
                (Level::Raid5, Err(RaidError::ArrayFailed)) => {}
                (_, other) => panic!("{level:?} {role}: two disks out: {other:?}"),
            }
        }
    }
}

/// A mirror that fails a write is failed; the others hold the write.
#[test]
fn a_mirror_that_fails_a_write_is_failed_and_the_write_kept_on_the_others() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let array =
        Array::create(dir.path(), geometry(Level::Raid1, 2, CHUNK, DISK), 0, 1).expect("create");
    let engine = Arc::clone(array.engine());
    set(dir.path(), vec![write_errors("f21", "disk0.img")]);
    let data = pattern(32, 3 * CHUNK as usize);
    engine
        .write_at(CHUNK, &data)
        .expect("the other mirror stores it");
    assert_eq!(
        engine.member_states(),
        vec![MemberState::Failed, MemberState::Active]
    );
    assert_eq!(stored(dir.path(), "disk1.img", CHUNK, data.len()), data);
    set(dir.path(), vec![write_errors("f22", "disk1.img")]);
    match engine.write_at(0, &data) {
        Err(RaidError::Member { index: 1, source }) => {
            assert!(source.to_string().contains("injected"), "{source}")
        }
        other => panic!("the last mirror failing a write fails it: {other:?}"),
    }
    assert_eq!(engine.state(), ArrayState::Failed);
    let mut back = vec![0u8; 4096];
    assert!(matches!(
        engine.read_at(0, &mut back),
        Err(RaidError::ArrayFailed)
    ));
}

/// A degraded RAID-5 whose last redundancy fails a write cannot go on: the
/// write fails, and so the array, with clear errors rather than a row
/// reconstructed from stale parity.
#[test]
fn a_degraded_raid5_member_that_fails_a_write_fails_the_array() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mut array = array(dir.path());
    let engine = Arc::clone(array.engine());
    let g = engine.geometry();
    engine
        .write_at(0, &pattern(33, g.row_bytes() as usize))
        .expect("fill row 0");
    array.fail(g.data_disk(0, 2)).expect("degrade the array");
    set(
        dir.path(),
        vec![write_errors(
            "f23",
            &format!("disk{}.img", g.parity_disk(0)),
        )],
    );
    match engine.write_at(0, &pattern(34, CHUNK as usize)) {
        Err(RaidError::Member { index, .. }) => assert_eq!(index, g.parity_disk(0)),
        other => panic!("expected the parity disk's error, got {other:?}"),
    }
    assert_eq!(engine.state(), ArrayState::Failed);
    let mut back = vec![0u8; CHUNK as usize];
    assert!(matches!(
        engine.read_at(2 * CHUNK, &mut back),
        Err(RaidError::ArrayFailed)
    ));
}

/// Four writers go on while a member of a RAID-6 starts failing every write:
/// nothing hangs (recording the failure quiesces the engine while the others
/// write), every write succeeds, the member is failed, a scrub finds every
/// row in step, and what each writer wrote reads back, also with a second
/// disk failed (so through rows the failure left consistent).
#[test]
fn writers_go_on_while_a_member_starts_failing_writes() {
    let seed = base_seed("writers while a member fails writes");
    let dir = tempfile::tempdir().expect("a temporary directory");
    let array = Array::create(dir.path(), geometry(Level::Raid6, 5, CHUNK, DISK), 0, 1)
        .expect("create the array");
    let engine = Arc::clone(array.engine());
    let size = engine.geometry().data_bytes();
    const WRITERS: u64 = 4;
    let region = size / WRITERS;
    let failing = 2;
    let (done, finished) = std::sync::mpsc::channel();
    for writer in 0..WRITERS {
        let (engine, done) = (Arc::clone(&engine), done.clone());
        let dir = dir.path().to_path_buf();
        std::thread::spawn(move || {
            let mut rng = Rng(seed ^ (writer + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let mut model = vec![0u8; region as usize];
            let outcome = (0..300).try_for_each(|i| {
                if writer == 0 && i == 60 {
                    set(
                        &dir,
                        vec![write_errors("f30", &format!("disk{failing}.img"))],
                    );
                }
                let len = 1 + rng.below(48 * 1024);
                let at = rng.below(region - len);
                let bytes = rng.bytes(len as usize);
                engine
                    .write_at(writer * region + at, &bytes)
                    .map_err(|err| format!("writer {writer}, write {i}: {err}"))?;
                model[at as usize..(at + len) as usize].copy_from_slice(&bytes);
                Ok::<(), String>(())
            });
            let _ = done.send((writer, outcome.map(|()| model)));
        });
    }
    drop(done);
    let mut models = vec![Vec::new(); WRITERS as usize];
    for _ in 0..WRITERS {
        let (writer, model) = finished
            .recv_timeout(std::time::Duration::from_secs(120))
            .expect("the writers end (seed {seed})");
        models[writer as usize] = model.unwrap_or_else(|err| panic!("{err} (seed {seed})"));
    }
    assert_eq!(engine.member_states()[failing], MemberState::Failed);
    let on_disk = controllers::array::read_metadata(dir.path()).expect("array.json");
    assert_eq!(on_disk.members[failing].state, MemberState::Failed);
    set(dir.path(), Vec::new());
    let expected = models.concat();
    let mut back = vec![0u8; size as usize];
    engine.read_at(0, &mut back).expect("read back");
    assert!(back == expected, "what the writers wrote (seed {seed})");
    let disk_bytes = engine.geometry().disk_bytes;
    let findings =
        controllers::work::scrub_range(&engine, 0, disk_bytes, false, |_, _| true).expect("scrub");
    assert_eq!(
        (findings.checksum_errors, findings.parity_mismatches),
        (0, 0),
        "every row in step (seed {seed}): {findings:?}"
    );
    engine.fail_member(0).expect("fail a second disk");
    engine
        .read_at(0, &mut back)
        .expect("read back, two disks out");
    assert!(back == expected, "reconstructed (seed {seed})");
}

/// A FLUSH of a degraded array does not ask the failed member: a disk that
/// stopped answering (every I/O fails, flushes too) failed every FLUSH and
/// FUA write of the array it was failed out of, until it was replaced.
#[test]
fn a_flush_of_a_degraded_array_leaves_the_failed_disk_alone() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mut array = array(dir.path());
    let engine = Arc::clone(array.engine());
    engine
        .write_at(0, &pattern(40, 3 * CHUNK as usize))
        .expect("the I/O");
    set(
        dir.path(),
        vec![rule("f40", "disk1.img", Effect::Error { errno: 5 })],
    );
    array.fail(1).expect("fail disk 1");
    engine
        .write_at(0, &pattern(41, 3 * CHUNK as usize))
        .expect("a write to the degraded array");
    engine.flush().expect("a flush of the degraded array");
}
