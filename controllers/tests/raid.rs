//! The RAID engine through its public API: a reference model under random I/O
//! with a member failing half-way, one failure too many, checksum errors repaired
//! from redundancy (and the ones that cannot be), parity consistency,
//! concurrent writers, and RAID-6 (two failures, two bad blocks in a row); a
//! degraded write that fails leaves no journal entry behind.
//!
//! Random tests are seeded: set `RAID_TEST_SEED` to replay a run; the seed in use
//! is printed (shown by `cargo test -- --nocapture`, and on failure).

use std::collections::HashSet;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use controllers::raid::{ArrayState, Geometry, Level, MemberState, RaidEngine, RaidError};
use disk_images::DiskImage;

mod common;
use common::{base_seed, Rng};

const BLOCK: u64 = 4096;

struct Fixture {
    _dir: tempfile::TempDir,
    paths: Vec<PathBuf>,
    members: Vec<Arc<DiskImage>>,
    engine: RaidEngine,
}

fn geometry(level: Level, disks: usize, chunk_bytes: u64, disk_bytes: u64) -> Geometry {
    Geometry {
        level,
        disks,
        chunk_bytes,
        disk_bytes,
    }
}

fn fixture(geometry: Geometry) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let paths: Vec<PathBuf> = (0..geometry.disks)
        .map(|i| dir.path().join(format!("disk{i}.img")))
        .collect();
    let members: Vec<Arc<DiskImage>> = paths
        .iter()
        .map(|p| Arc::new(DiskImage::create(p, geometry.disk_bytes, false).expect("create")))
        .collect();
    let engine = RaidEngine::new(
        geometry,
        members.clone(),
        vec![MemberState::Active; geometry.disks],
    )
    .expect("engine");
    Fixture {
        _dir: dir,
        paths,
        members,
        engine,
    }
}

fn poke(path: &Path, offset: u64, bytes: &[u8]) {
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open for poke");
    file.write_all_at(bytes, offset).expect("poke");
}

fn read_member(member: &DiskImage, offset: u64, len: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len as usize];
    member.read_at(offset, &mut buf).expect("member read");
    buf
}

/// Every stripe's chunks XOR to zero (RAID-5), its P and Q are those of its
/// data (RAID-6), every mirror identical (RAID-1).
fn assert_redundancy_consistent(f: &Fixture, context: &str) {
    let g = f.engine.geometry();
    match g.level {
        Level::Raid1 => {
            let first = read_member(&f.members[0], 0, g.disk_bytes);
            for (i, member) in f.members.iter().enumerate().skip(1) {
                assert!(
                    read_member(member, 0, g.disk_bytes) == first,
                    "{context}: mirror {i} differs from mirror 0"
                );
            }
        }
        Level::Raid5 => {
            for stripe in 0..g.disk_bytes / g.chunk_bytes {
                let mut acc = vec![0u8; g.chunk_bytes as usize];
                for member in &f.members {
                    let chunk = read_member(member, stripe * g.chunk_bytes, g.chunk_bytes);
                    for (a, b) in acc.iter_mut().zip(&chunk) {
                        *a ^= b;
                    }
                }
                if let Some(at) = acc.iter().position(|b| *b != 0) {
                    panic!("{context}: stripe {stripe} parity inconsistent at chunk byte {at}");
                }
            }
        }
        Level::Raid6 => {
            for stripe in 0..g.disk_bytes / g.chunk_bytes {
                let chunk = |disk: usize| {
                    read_member(&f.members[disk], stripe * g.chunk_bytes, g.chunk_bytes)
                };
                let data: Vec<Vec<u8>> = (0..g.data_disks())
                    .map(|k| chunk(g.data_disk(stripe, k)))
                    .collect();
                let refs: Vec<&[u8]> = data.iter().map(|d| d.as_slice()).collect();
                let (mut p, mut q) = (
                    vec![0u8; g.chunk_bytes as usize],
                    vec![0u8; g.chunk_bytes as usize],
                );
                controllers::pq::syndromes(&refs, &mut p, &mut q);
                assert!(
                    p == chunk(g.parity_disk(stripe)),
                    "{context}: stripe {stripe} P inconsistent"
                );
                let q_disk = g.q_disk(stripe).expect("Q");
                assert!(
                    q == chunk(q_disk),
                    "{context}: stripe {stripe} Q inconsistent"
                );
            }
        }
    }
}

fn assert_reads_model(engine: &RaidEngine, model: &[u8], context: &str) {
    let mut buf = vec![0u8; model.len()];
    engine.read_at(0, &mut buf).expect("full read");
    if let Some(at) = buf.iter().zip(model).position(|(a, b)| a != b) {
        panic!("{context}: array differs from the model at byte {at}");
    }
}

/// A random length, biased towards edge cases: tiny, block-sized, chunk-spanning.
fn random_len(rng: &mut Rng, chunk: u64, max: u64) -> u64 {
    let len = match rng.below(6) {
        0 => 1 + rng.below(16),
        1 => BLOCK * (1 + rng.below(4)),
        2 => chunk * (1 + rng.below(4)),
        _ => 1 + rng.below(3 * chunk + 100),
    };
    len.min(max)
}

fn random_offset(rng: &mut Rng, size: u64) -> u64 {
    match rng.below(3) {
        0 => rng.below(size / BLOCK) * BLOCK,
        _ => rng.below(size),
    }
}

/// Random writes, zeroings and reads against a `Vec<u8>` model; random members
/// fail on the way (one; RAID-6: one a third of the way, another at two
/// thirds) and everything still reads back as the model says.
fn model_run(g: Geometry, seed: u64, ops: usize) {
    let mut rng = Rng(seed);
    let f = fixture(g);
    let size = g.data_bytes();
    let mut model = vec![0u8; size as usize];
    let context = format!("{g:?} seed {seed}");
    let failures = g.parity_chunks().max(1);
    let mut failed = Vec::new();
    for op in 0..ops {
        if (1..=failures).any(|i| op == ops * i / (failures + 1)) {
            if failed.is_empty() {
                assert_redundancy_consistent(&f, &context);
            }
            let victim = loop {
                let victim = rng.below(g.disks as u64) as usize;
                if !failed.contains(&victim) {
                    break victim;
                }
            };
            f.engine.fail_member(victim).expect("fail");
            assert_eq!(f.engine.state(), ArrayState::Degraded);
            failed.push(victim);
            assert_reads_model(
                &f.engine,
                &model,
                &format!("{context}: just failed {failed:?}"),
            );
        }
        let offset = random_offset(&mut rng, size);
        let len = random_len(&mut rng, g.chunk_bytes, size - offset);
        match rng.below(10) {
            0..=4 => {
                let data = rng.bytes(len as usize);
                f.engine.write_at(offset, &data).expect("write");
                model[offset as usize..(offset + len) as usize].copy_from_slice(&data);
            }
            5 => {
                f.engine.write_zeroes(offset, len).expect("zeroes");
                model[offset as usize..(offset + len) as usize].fill(0);
            }
            _ => {
                let mut buf = vec![0u8; len as usize];
                f.engine.read_at(offset, &mut buf).expect("read");
                assert!(
                    buf == model[offset as usize..(offset + len) as usize],
                    "{context}: op {op} read {offset}+{len} differs (failed members {failed:?})"
                );
            }
        }
    }
    assert_reads_model(&f.engine, &model, &format!("{context}: at the end"));
    assert_eq!(f.engine.repaired_blocks(), 0);
    for (i, member) in f.members.iter().enumerate() {
        assert!(
            member.verify(|_| {}).bad_blocks.is_empty(),
            "{context}: member {i} has bad blocks"
        );
    }
}

#[test]
fn random_io_matches_the_model_through_a_member_failure() {
    let base = base_seed("model");
    let configs = [
        geometry(Level::Raid1, 2, 4096, 64 * 1024),
        geometry(Level::Raid1, 3, 8192, 64 * 1024),
        geometry(Level::Raid5, 3, 4096, 64 * 1024),
        geometry(Level::Raid5, 3, 8192, 64 * 1024),
        geometry(Level::Raid5, 4, 4096, 64 * 1024),
        geometry(Level::Raid5, 4, 8192, 64 * 1024),
        geometry(Level::Raid5, 5, 16384, 128 * 1024),
        geometry(Level::Raid6, 4, 4096, 64 * 1024),
        geometry(Level::Raid6, 5, 8192, 64 * 1024),
        geometry(Level::Raid6, 6, 16384, 128 * 1024),
    ];
    for (c, g) in configs.iter().enumerate() {
        for round in 0..6u64 {
            model_run(*g, base.wrapping_add(round * 1000 + c as u64), 300);
        }
    }
}

#[test]
fn random_writes_keep_parity_consistent() {
    let base = base_seed("parity");
    let configs = [
        (Level::Raid5, 3),
        (Level::Raid5, 4),
        (Level::Raid5, 6),
        (Level::Raid6, 4),
        (Level::Raid6, 7),
    ];
    for (c, (level, disks)) in configs.into_iter().enumerate() {
        let g = geometry(level, disks, 8192, 64 * 1024);
        let f = fixture(g);
        let mut rng = Rng(base.wrapping_add(c as u64));
        for _ in 0..300 {
            let offset = random_offset(&mut rng, g.data_bytes());
            let len = random_len(&mut rng, g.chunk_bytes, g.data_bytes() - offset);
            f.engine
                .write_at(offset, &rng.bytes(len as usize))
                .expect("write");
        }
        assert_redundancy_consistent(&f, &format!("{level:?}, {disks} disks, seed {base}+{c}"));
    }
}

fn expect_array_failed(result: Result<(), RaidError>, what: &str) {
    match result {
        Err(RaidError::ArrayFailed) => {}
        other => panic!("{what}: expected ArrayFailed, got {other:?}"),
    }
}

/// Fills an array, fails the members in `tolerated` (it still reads back),
/// then `too_many`: the array is FAILED, every read and write is refused, no
/// bytes are handed out and no member changes.
fn failure_too_many_refuses_io(g: Geometry, tolerated: &[usize], too_many: usize) {
    let mut rng = Rng(base_seed("failure too many"));
    let f = fixture(g);
    let data = rng.bytes(g.data_bytes() as usize);
    f.engine.write_at(0, &data).expect("fill");
    for &disk in tolerated {
        f.engine.fail_member(disk).expect("fail");
    }
    assert_eq!(f.engine.state(), ArrayState::Degraded);
    assert_reads_model(&f.engine, &data, "degraded");
    f.engine.fail_member(too_many).expect("fail one too many");
    assert_eq!(f.engine.state(), ArrayState::Failed);
    let states = f.engine.member_states();
    for (disk, state) in states.iter().enumerate() {
        let failed = tolerated.contains(&disk) || disk == too_many;
        assert_eq!(
            *state == MemberState::Failed,
            failed,
            "disk {disk}: {states:?}"
        );
    }

    let before: Vec<Vec<u8>> = f
        .paths
        .iter()
        .map(|p| std::fs::read(p).expect("read raw"))
        .collect();
    let mut buf = vec![0u8; 4096];
    expect_array_failed(f.engine.read_at(0, &mut buf), "read");
    expect_array_failed(
        f.engine.read_at(g.chunk_bytes * 5, &mut buf),
        "read of another chunk",
    );
    expect_array_failed(f.engine.write_at(100, &[0xAB; 9000]), "write");
    expect_array_failed(f.engine.write_zeroes(0, g.data_bytes()), "write_zeroes");
    assert!(buf.iter().all(|b| *b == 0), "no bytes handed out");
    for (i, path) in f.paths.iter().enumerate() {
        assert!(
            std::fs::read(path).expect("read raw") == before[i],
            "member {i} changed by refused I/O"
        );
    }
    // A failed array's surviving data is still intact on the members.
    let survivor = (0..g.disks).find(|d| !tolerated.contains(d) && *d != too_many);
    assert!(f.members[survivor.expect("a survivor")]
        .verify(|_| {})
        .bad_blocks
        .is_empty());
}

#[test]
fn second_raid5_failure_refuses_io_and_leaves_survivors_untouched() {
    failure_too_many_refuses_io(geometry(Level::Raid5, 4, 8192, 64 * 1024), &[1], 3);
}

#[test]
fn raid6_survives_two_failures_and_refuses_io_at_the_third() {
    failure_too_many_refuses_io(geometry(Level::Raid6, 5, 8192, 64 * 1024), &[0, 3], 4);
}

#[test]
fn raid1_fails_only_when_every_mirror_failed() {
    let g = geometry(Level::Raid1, 3, 4096, 64 * 1024);
    let f = fixture(g);
    f.engine.write_at(5, b"mirror").expect("write");
    f.engine.fail_member(0).expect("fail");
    f.engine.fail_member(2).expect("fail");
    assert_eq!(f.engine.state(), ArrayState::Degraded);
    let mut buf = [0u8; 6];
    f.engine
        .read_at(5, &mut buf)
        .expect("read from the last mirror");
    assert_eq!(&buf, b"mirror");
    f.engine
        .write_at(0, b"still")
        .expect("write to the last mirror");
    f.engine.fail_member(1).expect("fail");
    assert_eq!(f.engine.state(), ArrayState::Failed);
    expect_array_failed(f.engine.read_at(0, &mut buf), "read");
    expect_array_failed(f.engine.write_at(0, b"x"), "write");
}

#[test]
fn corrupt_raid5_data_block_is_reconstructed_and_rewritten() {
    let mut rng = Rng(base_seed("raid5 corruption"));
    let g = geometry(Level::Raid5, 4, 8192, 64 * 1024);
    let f = fixture(g);
    let data = rng.bytes(g.data_bytes() as usize);
    f.engine.write_at(0, &data).expect("fill");

    // Array offset 5*8192 + 4096 is chunk D5, block 1: stripe 1, disk 1 (table).
    let array_offset = 5 * 8192 + 4096;
    let member_offset = 8192 + 4096;
    poke(&f.paths[1], member_offset + 10, &[!data[array_offset + 10]]);
    assert_eq!(f.members[1].verify(|_| {}).bad_blocks.len(), 1);

    let mut buf = vec![0u8; 100];
    f.engine
        .read_at(array_offset as u64 + 5, &mut buf)
        .expect("read is recovered");
    assert_eq!(buf, data[array_offset + 5..array_offset + 105]);
    assert_eq!(f.engine.repaired_blocks(), 1);
    assert!(f.members[1].verify(|_| {}).bad_blocks.is_empty());
    assert_eq!(
        read_member(&f.members[1], member_offset, BLOCK),
        data[array_offset..array_offset + 4096]
    );
    // Reading again finds nothing to repair.
    f.engine
        .read_at(array_offset as u64, &mut buf)
        .expect("read");
    assert_eq!(f.engine.repaired_blocks(), 1);
    assert_reads_model(&f.engine, &data, "after repair");
    assert_redundancy_consistent(&f, "after repair");
}

#[test]
fn raid6_two_corrupt_blocks_in_a_row_are_reconstructed_and_rewritten() {
    let mut rng = Rng(base_seed("raid6 corruption"));
    let g = geometry(Level::Raid6, 5, 8192, 64 * 1024);
    let f = fixture(g);
    let data = rng.bytes(g.data_bytes() as usize);
    f.engine.write_at(0, &data).expect("fill");
    // Stripe 0: P on disk 4, Q on disk 0, D0..D2 on disks 1..3. Block 1 of
    // D0 and of D2 go bad: two of the row's five blocks, as much as RAID-6
    // can lose.
    poke(&f.paths[1], 4096 + 10, &[!data[4096 + 10]]);
    poke(&f.paths[3], 4096 + 20, &[!data[2 * 8192 + 4096 + 20]]);
    assert_reads_model(&f.engine, &data, "two bad blocks in a row");
    assert_eq!(f.engine.repaired_blocks(), 2);
    for (i, member) in f.members.iter().enumerate() {
        assert!(member.verify(|_| {}).bad_blocks.is_empty(), "member {i}");
    }
    assert_redundancy_consistent(&f, "after repair");

    // With two members failed, one more bad block in a row is one too many:
    // its data is unrecoverable, never garbage.
    f.engine.fail_member(2).expect("fail 2");
    f.engine.fail_member(4).expect("fail 4");
    poke(&f.paths[1], 4096 + 10, &[!data[4096 + 10]]);
    let mut buf = vec![0u8; 3 * 8192];
    match f.engine.read_at(0, &mut buf) {
        // D1 (disk 2) needs D0's bad block; D0 itself is read first.
        Err(RaidError::Unrecoverable { offset, .. }) => assert_eq!(offset, 4096),
        other => panic!("expected Unrecoverable, got {other:?}"),
    }
    assert!(buf.iter().all(|b| *b == 0), "no garbage handed out");
    // The rest of the stripe row, and the other stripes, still read.
    let mut rest = vec![0u8; g.data_bytes() as usize - 3 * 8192];
    f.engine
        .read_at(3 * 8192, &mut rest)
        .expect("other stripes");
    assert!(rest == data[3 * 8192..]);
}

#[test]
fn corrupt_raid5_parity_block_is_repaired_by_a_partial_write() {
    let mut rng = Rng(base_seed("raid5 parity corruption"));
    let g = geometry(Level::Raid5, 4, 8192, 64 * 1024);
    let f = fixture(g);
    let mut model = rng.bytes(g.data_bytes() as usize);
    f.engine.write_at(0, &model).expect("fill");
    // Stripe 0's parity is on disk 3; corrupt its first block.
    poke(&f.paths[3], 7, &[0x5A, 0xA5]);
    // A small write to D0 reads old data and old parity (read-modify-write).
    f.engine.write_at(3, b"hello").expect("write");
    model[3..8].copy_from_slice(b"hello");
    assert_eq!(f.engine.repaired_blocks(), 1);
    assert!(f.members[3].verify(|_| {}).bad_blocks.is_empty());
    assert_redundancy_consistent(&f, "after parity repair");
    assert_reads_model(&f.engine, &model, "after parity repair");
}

#[test]
fn corrupt_raid1_block_is_read_from_a_mirror_and_rewritten() {
    let mut rng = Rng(base_seed("raid1 corruption"));
    let g = geometry(Level::Raid1, 2, 8192, 64 * 1024);
    let f = fixture(g);
    let mut model = rng.bytes(g.data_bytes() as usize);
    f.engine.write_at(0, &model).expect("fill");
    poke(&f.paths[0], 3 * BLOCK + 99, &[!model[3 * 4096 + 99]]);
    // Member 1 corrupt elsewhere: found when an unaligned write reads its edge.
    poke(&f.paths[1], 9 * BLOCK, &[!model[9 * 4096]]);

    let mut buf = vec![0u8; 3 * 4096];
    f.engine.read_at(2 * BLOCK, &mut buf).expect("read");
    assert_eq!(buf, model[2 * 4096..5 * 4096]);
    assert_eq!(f.engine.repaired_blocks(), 1);
    assert!(f.members[0].verify(|_| {}).bad_blocks.is_empty());

    // The first mirror is good at block 9, so a read does not notice member 1's
    // damage; a write covering part of block 9 rewrites the whole block on both.
    f.engine.write_at(9 * BLOCK + 100, b"patch").expect("write");
    model[9 * 4096 + 100..9 * 4096 + 105].copy_from_slice(b"patch");
    assert!(f.members[1].verify(|_| {}).bad_blocks.is_empty());
    assert_reads_model(&f.engine, &model, "after repairs");
    assert_redundancy_consistent(&f, "after repairs");
}

#[test]
fn media_error_without_redundancy_is_unrecoverable_not_garbage() {
    let mut rng = Rng(base_seed("unrecoverable"));
    // RAID-5, degraded: a corrupt block on a survivor has nothing to rebuild from.
    let g = geometry(Level::Raid5, 3, 4096, 64 * 1024);
    let f = fixture(g);
    let data = rng.bytes(g.data_bytes() as usize);
    f.engine.write_at(0, &data).expect("fill");
    // Stripe 2: parity on disk 0, D4 on disk 1, D5 on disk 2 (member offset 8192).
    f.engine.fail_member(2).expect("fail");
    poke(&f.paths[1], 2 * 4096 + 1, &[!data[4 * 4096 + 1]]);
    let mut buf = vec![0u8; 10];
    match f.engine.read_at(4 * 4096, &mut buf) {
        Err(RaidError::Unrecoverable { offset, .. }) => assert_eq!(offset, 4 * 4096),
        other => panic!("expected Unrecoverable, got {other:?}"),
    }
    // D5 lives on the failed disk and needs disk 1's bad block: also lost.
    match f.engine.read_at(5 * 4096 + 7, &mut buf) {
        Err(RaidError::Unrecoverable { offset, detail }) => {
            assert_eq!(offset, 5 * 4096, "{detail}");
        }
        other => panic!("expected Unrecoverable, got {other:?}"),
    }
    assert!(buf.iter().all(|b| *b == 0), "no garbage handed out");
    // Everything else still reads correctly.
    let mut rest = vec![0u8; 4 * 4096];
    f.engine.read_at(0, &mut rest).expect("other stripes");
    assert_eq!(rest, data[..4 * 4096]);
    assert_eq!(f.engine.repaired_blocks(), 0);

    // RAID-1 with the same block bad on both mirrors.
    let g = geometry(Level::Raid1, 2, 4096, 64 * 1024);
    let f = fixture(g);
    let data = rng.bytes(g.data_bytes() as usize);
    f.engine.write_at(0, &data).expect("fill");
    poke(&f.paths[0], 6 * BLOCK, &[!data[6 * 4096]]);
    poke(&f.paths[1], 6 * BLOCK + 1, &[!data[6 * 4096 + 1]]);
    let mut buf = vec![0u8; 3 * 4096];
    match f.engine.read_at(5 * BLOCK, &mut buf) {
        Err(RaidError::Unrecoverable { offset, .. }) => assert_eq!(offset, 6 * BLOCK),
        other => panic!("expected Unrecoverable, got {other:?}"),
    }
}

/// Fills a block with `tag` (a block value that identifies the write).
fn tagged_block(tag: u64) -> Vec<u8> {
    tag.to_le_bytes().repeat(BLOCK as usize / 8)
}

/// 4 writers of whole, aligned, overlapping block ranges, each block tagged; a
/// reader checks blocks are never torn. Afterwards parity is consistent and each
/// block holds one of the values written to it.
fn concurrent_run(g: Geometry, fail: Option<usize>, seed: u64) {
    let f = Arc::new(fixture(g));
    if let Some(victim) = fail {
        f.engine.fail_member(victim).expect("fail");
    }
    let blocks = g.data_bytes() / BLOCK;
    // Tags written to each block (0 = never written, the initial zeros).
    let written: Arc<Vec<Mutex<HashSet<u64>>>> = Arc::new(
        (0..blocks)
            .map(|_| Mutex::new(HashSet::from([0u64])))
            .collect(),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let reader = {
        let (f, written, stop, reads) = (
            Arc::clone(&f),
            Arc::clone(&written),
            Arc::clone(&stop),
            Arc::clone(&reads),
        );
        std::thread::spawn(move || {
            let mut rng = Rng(seed ^ 0xdead_beef);
            let mut buf = vec![0u8; 4 * BLOCK as usize];
            while !stop.load(Ordering::Relaxed) {
                let first = rng.below(blocks - 3);
                f.engine.read_at(first * BLOCK, &mut buf).expect("read");
                for (i, block) in buf.chunks(BLOCK as usize).enumerate() {
                    let tag = u64::from_le_bytes(block[..8].try_into().expect("8 bytes"));
                    assert!(
                        block == tagged_block(tag),
                        "torn block {}",
                        first + i as u64
                    );
                    let known = written[(first + i as u64) as usize]
                        .lock()
                        .expect("lock")
                        .contains(&tag);
                    assert!(
                        known,
                        "block {} holds unwritten tag {tag:#x}",
                        first + i as u64
                    );
                }
                reads.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let writers: Vec<_> = (0..4u64)
        .map(|thread| {
            let (f, written) = (Arc::clone(&f), Arc::clone(&written));
            std::thread::spawn(move || {
                let mut rng = Rng(seed.wrapping_add(thread));
                for op in 0..400u64 {
                    let first = rng.below(blocks);
                    let count = (1 + rng.below(2 * g.disks as u64 * g.chunk_bytes / BLOCK))
                        .min(blocks - first);
                    let mut data = Vec::with_capacity((count * BLOCK) as usize);
                    for b in first..first + count {
                        let tag = (thread + 1) << 48 | op << 24 | b;
                        written[b as usize].lock().expect("lock").insert(tag);
                        data.extend_from_slice(&tagged_block(tag));
                    }
                    f.engine.write_at(first * BLOCK, &data).expect("write");
                }
            })
        })
        .collect();
    for writer in writers {
        writer.join().expect("writer");
    }
    stop.store(true, Ordering::Relaxed);
    reader.join().expect("reader");
    assert!(reads.load(Ordering::Relaxed) > 0);

    if fail.is_none() {
        assert_redundancy_consistent(&f, &format!("{g:?} seed {seed}"));
    }
    let mut buf = vec![0u8; BLOCK as usize];
    for b in 0..blocks {
        f.engine.read_at(b * BLOCK, &mut buf).expect("read back");
        let tag = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
        assert!(buf == tagged_block(tag), "block {b} torn");
        assert!(
            written[b as usize].lock().expect("lock").contains(&tag),
            "block {b} holds a value never written"
        );
    }
}

#[test]
fn concurrent_writers_keep_parity_consistent() {
    let seed = base_seed("concurrent");
    concurrent_run(geometry(Level::Raid5, 4, 4096, 64 * 1024), None, seed);
    concurrent_run(geometry(Level::Raid5, 3, 8192, 128 * 1024), None, seed + 1);
    concurrent_run(
        geometry(Level::Raid5, 4, 8192, 64 * 1024),
        Some(2),
        seed + 2,
    );
    concurrent_run(geometry(Level::Raid1, 2, 4096, 64 * 1024), None, seed + 3);
    concurrent_run(geometry(Level::Raid6, 5, 4096, 64 * 1024), None, seed + 4);
    concurrent_run(
        geometry(Level::Raid6, 5, 8192, 64 * 1024),
        Some(1),
        seed + 5,
    );
}

#[test]
fn bad_members_and_ranges_are_refused() {
    let g = geometry(Level::Raid5, 3, 8192, 64 * 1024);
    let f = fixture(g);
    let two = f.members[..2].to_vec();
    assert!(matches!(
        RaidEngine::new(g, two, vec![MemberState::Active; 2]),
        Err(RaidError::BadMember(_))
    ));
    assert!(matches!(
        RaidEngine::new(g, f.members.clone(), vec![MemberState::Active; 4]),
        Err(RaidError::BadMember(_))
    ));
    let bigger = Geometry {
        disk_bytes: 128 * 1024,
        ..g
    };
    assert!(matches!(
        RaidEngine::new(bigger, f.members.clone(), vec![MemberState::Active; 3]),
        Err(RaidError::BadMember(_))
    ));
    let bad = Geometry {
        chunk_bytes: 12288,
        ..g
    };
    assert!(matches!(
        RaidEngine::new(bad, f.members.clone(), vec![MemberState::Active; 3]),
        Err(RaidError::InvalidGeometry(_))
    ));
    // Smaller disk_bytes than the images is fine: only the start is used.
    let smaller = Geometry {
        disk_bytes: 32 * 1024,
        ..g
    };
    let engine = RaidEngine::new(
        smaller,
        f.members.clone(),
        vec![
            MemberState::Active,
            MemberState::Failed,
            MemberState::Active,
        ],
    )
    .expect("smaller geometry");
    assert_eq!(engine.state(), ArrayState::Degraded);
    assert_eq!(engine.geometry(), smaller);

    assert!(matches!(
        f.engine.fail_member(3),
        Err(RaidError::BadMember(_))
    ));
    let size = g.data_bytes();
    let mut buf = [0u8; 2];
    assert!(matches!(
        f.engine.read_at(size - 1, &mut buf),
        Err(RaidError::OutOfRange { offset, length: 2, size: s }) if offset == size - 1 && s == size
    ));
    assert!(matches!(
        f.engine.write_at(u64::MAX, &buf),
        Err(RaidError::OutOfRange { .. })
    ));
    assert!(matches!(
        f.engine.write_zeroes(size, 1),
        Err(RaidError::OutOfRange { .. })
    ));
    f.engine
        .read_at(size, &mut [])
        .expect("empty read at the end");
    f.engine
        .write_at(size, &[])
        .expect("empty write at the end");
    f.engine.flush().expect("flush");
    assert_eq!(f.engine.state(), ArrayState::Optimal);
    let text = format!("{:?}", f.engine);
    assert!(text.contains("RaidEngine"), "{text}");
}

#[test]
fn large_chunks_work_in_bounded_pieces() {
    // A 1 MiB chunk is bigger than the engine's work buffers.
    let mut rng = Rng(base_seed("large chunks"));
    for (level, disks, fail) in [(Level::Raid5, 3, &[0][..]), (Level::Raid6, 4, &[0, 2][..])] {
        let g = geometry(level, disks, 1 << 20, 2 << 20);
        let f = fixture(g);
        let mut model = vec![0u8; g.data_bytes() as usize];
        for _ in 0..20 {
            let offset = random_offset(&mut rng, g.data_bytes());
            let len = (1 + rng.below(3 << 20)).min(g.data_bytes() - offset);
            let data = rng.bytes(len as usize);
            f.engine.write_at(offset, &data).expect("write");
            model[offset as usize..(offset + len) as usize].copy_from_slice(&data);
        }
        assert_redundancy_consistent(&f, "large chunks");
        for &disk in fail {
            f.engine.fail_member(disk).expect("fail");
        }
        assert_reads_model(&f.engine, &model, "large chunks, degraded");
        let data = rng.bytes(1_500_000);
        f.engine.write_at(777_777, &data).expect("degraded write");
        model[777_777..777_777 + data.len()].copy_from_slice(&data);
        assert_reads_model(&f.engine, &model, "large chunks, after a degraded write");
    }
}

#[test]
fn a_degraded_write_that_fails_leaves_no_journal_entry_behind() {
    // A shared engine over a degraded RAID-5 (disk 1 failed) whose parity
    // member for stripe 0 (disk 2) cannot be written: a write there journals
    // disk 1's bytes, writes D0, and fails on the parity. The entry must not
    // outlive the write, or a later recovery would apply it to a stripe that
    // has moved on.
    use controllers::array::{self, Array};
    use controllers::journal::Journal;
    use controllers::live::Live;
    use disk_images::Access;

    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("a");
    let g = array::geometry(Level::Raid5, 3, 8192, 64 * 1024);
    let mut created = Array::create(&dir, g, 0, 1).expect("create");
    created.fail(1).expect("fail disk 1");
    let files: Vec<PathBuf> = created
        .metadata()
        .members
        .iter()
        .map(|m| dir.join(&m.file))
        .collect();
    drop(created);

    let source_files = files.clone();
    let source: controllers::raid::ViewSource = Box::new(move || {
        let images = source_files
            .iter()
            .enumerate()
            .map(|(i, path)| {
                let access = if i == 2 {
                    Access::ReadOnly
                } else {
                    Access::ReadWrite
                };
                DiskImage::open(path, access)
                    .map(|image| Arc::new(image) as Arc<dyn controllers::member::Member>)
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|err| RaidError::Config(err.to_string()))?;
        Ok((
            images,
            vec![
                MemberState::Active,
                MemberState::Failed,
                MemberState::Active,
            ],
        ))
    });
    let live = Live::open(&dir, 3).expect("live state");
    let engine = RaidEngine::shared(g, live, source).expect("engine");
    match engine.write_at(0, &[0x5a; 100]) {
        Err(RaidError::Member { index: 2, .. }) => {}
        other => panic!("expected the parity member's write to fail, got {other:?}"),
    }
    let journal = Journal::open(&dir).expect("journal");
    let saved = journal.saved(0, 0).expect("read the journal");
    assert!(
        saved.is_none(),
        "a journal entry outlived the failed write ({} bytes saved)",
        saved.map_or(0, |s| s.bytes.len())
    );
}
