//! Scrub and rebuild of member ranges against arrays written through the RAID
//! engine.

use controllers::array::{self, Array};
use controllers::raid::{Level, MemberState};
use controllers::work::{rebuild_range, scrub_range};

const DISK: u64 = 1 << 20;

fn filled_array(level: Level, disks: usize) -> (tempfile::TempDir, Array, Vec<u8>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let array = Array::create(
        &dir.path().join("a"),
        array::geometry(level, disks, 16 * 1024, DISK),
        0,
        1,
    )
    .expect("create");
    let size = array.metadata().geometry.data_bytes() as usize;
    let data: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
    array.engine().write_at(0, &data).expect("fill");
    (dir, array, data)
}

/// Writes `bytes` into a member image file behind the array's back.
fn poke(path: &std::path::Path, offset: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open")
        .write_all_at(bytes, offset)
        .expect("poke");
}

#[test]
fn scrub_finds_and_repairs_a_silent_parity_mismatch() {
    for (level, disks) in [(Level::Raid5, 3), (Level::Raid6, 4), (Level::Raid1, 3)] {
        let (_dir, array, _data) = filled_array(level, disks);
        let engine = array.engine();
        let members = engine.view().expect("view");
        assert_eq!(
            scrub_range(engine, 0, DISK, false, |_, _| true)
                .expect("scrub")
                .parity_mismatches,
            0
        );
        // A write that bypasses the array (data and CRC both updated): no checksum
        // error, only redundancy can tell.
        members.images[1]
            .write_at(8192, &[0xee; 4096])
            .expect("stray write");
        let found = scrub_range(engine, 0, DISK, false, |_, _| true).expect("scrub");
        assert_eq!(
            (
                found.parity_mismatches,
                found.checksum_errors,
                found.repaired
            ),
            (1, 0, 0),
            "{level:?}"
        );
        let fixed = scrub_range(engine, 0, DISK, true, |_, _| true).expect("repair");
        // The data is kept; the parity is rewritten (RAID-6: P and Q).
        let rewritten = if level == Level::Raid6 { 2 } else { 1 };
        assert_eq!(
            (fixed.parity_mismatches, fixed.repaired),
            (1, rewritten),
            "{level:?}"
        );
        assert_eq!(
            scrub_range(engine, 0, DISK, false, |_, _| true)
                .expect("rescrub")
                .parity_mismatches,
            0
        );
    }
}

#[test]
fn rebuild_restores_a_member_exactly() {
    for level in [Level::Raid5, Level::Raid6, Level::Raid1] {
        let (_dir, mut array, data) = filled_array(level, 4);
        let mut before = vec![0u8; DISK as usize];
        array.engine().view().expect("view").images[2]
            .read_at(0, &mut before)
            .expect("read member");
        array.fail(2).expect("fail");
        let file = array.replace(2).expect("replace with a new empty image");
        let engine = array.engine().clone();
        let members = engine.view().expect("view");
        assert_eq!(members.states[2], MemberState::Rebuilding);
        assert!(members.images[2].path().ends_with(&file));
        let mut steps = 0;
        let lost = rebuild_range(&engine, 2, 0, DISK, |_, _| {
            steps += 1;
            true
        })
        .expect("rebuild")
        .unrecoverable;
        assert!(lost.is_empty(), "{lost:?}");
        assert_eq!(steps, 1, "progress once per MiB");
        let mut after = vec![0u8; DISK as usize];
        members.images[2]
            .read_at(0, &mut after)
            .expect("read member");
        assert!(after == before, "{level:?}: rebuilt member differs");
        array.finish_rebuild(2).expect("finish");
        let mut read_back = vec![0u8; data.len()];
        array
            .engine()
            .read_at(0, &mut read_back)
            .expect("read array");
        assert!(read_back == data);
        assert_eq!(array.engine().member_states()[2], MemberState::Active);
    }
}

#[test]
fn unrecoverable_blocks_are_named_by_array_offset() {
    let (_dir, mut array, _data) = filled_array(Level::Raid5, 3);
    array.fail(0).expect("fail"); // member 0 is gone...
    let engine = array.engine().clone();
    let path = array.dir().join(&array.metadata().members[1].file);
    // ...and a block of member 1 is corrupt: stripe 0, where member 1 holds data chunk 1.
    poke(&path, 100, b"!!");
    let found = scrub_range(&engine, 0, 4096, true, |_, _| true).expect("scrub");
    assert_eq!(found.checksum_errors, 1);
    assert_eq!(
        found.unrecoverable,
        vec![0, 16 * 1024],
        "data chunk 1 of stripe 0 starts at array offset 16 KiB; chunk 0, on the \
         failed member, needed it and is lost too"
    );
    array.replace(0).expect("replace");
    let engine = array.engine().clone();
    let lost = rebuild_range(&engine, 0, 0, 4096, |_, _| true)
        .expect("rebuild")
        .unrecoverable;
    assert_eq!(
        lost,
        vec![0, 16 * 1024],
        "member 0 holds data chunk 0 of stripe 0, lost with member 1's bad block (chunk 1)"
    );
    // The lost block of the rebuilt member reads as a media error, not zeros.
    let member = &engine.view().expect("view").images[0];
    let mut block = vec![0u8; 4096];
    assert!(matches!(
        member.read_at(0, &mut block),
        Err(disk_images::ImageError::Media(_))
    ));
}

mod model {
    //! Random host writes against a reference model, with random disk failures,
    //! replacements and rebuilds in between: a rebuild goes a quarter of the disk
    //! at a time with host writes landing between its steps (an online rebuild).
    //! Every read of the whole array must match the model.

    use super::*;
    use proptest::prelude::*;

    const SMALL_DISK: u64 = 256 * 1024;

    #[derive(Debug, Clone)]
    enum Op {
        Write { offset: u64, len: u64, seed: u8 },
        Fail(usize),
        Replace,
        RebuildQuarter,
        Finish,
    }

    fn op(data_bytes: u64, disks: usize) -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..data_bytes, 1..40_000u64, any::<u8>()).prop_map(move |(offset, len, seed)| {
                Op::Write { offset, len: len.min(data_bytes - offset), seed }
            }),
            1 => (0..disks).prop_map(Op::Fail),
            1 => Just(Op::Replace),
            2 => Just(Op::RebuildQuarter),
            1 => Just(Op::Finish),
        ]
    }

    fn check(level: Level, disks: usize, ops: Vec<Op>) -> Result<(), TestCaseError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut array = Array::create(
            &dir.path().join("a"),
            array::geometry(level, disks, 8 * 1024, SMALL_DISK),
            0,
            1,
        )
        .expect("create");
        let size = array.metadata().geometry.data_bytes();
        let mut model = vec![0u8; size as usize];
        let mut rebuilt_to = 0u64;
        for op in ops {
            let states = array.engine().member_states();
            let rebuilding = states.iter().position(|s| *s == MemberState::Rebuilding);
            let failed = states.iter().position(|s| *s == MemberState::Failed);
            let inactive = states.iter().filter(|s| **s != MemberState::Active).count();
            let tolerated = match level {
                Level::Raid1 => disks - 1,
                Level::Raid5 => 1,
                Level::Raid6 => 2,
            };
            match op {
                Op::Write { offset, len, seed } => {
                    let data: Vec<u8> = (0..len)
                        .map(|i| (i as u8).wrapping_mul(seed | 1) ^ seed)
                        .collect();
                    array.engine().write_at(offset, &data).expect("write");
                    model[offset as usize..(offset + len) as usize].copy_from_slice(&data);
                }
                Op::Fail(disk) if inactive < tolerated && states[disk] == MemberState::Active => {
                    array.fail(disk).expect("fail");
                }
                Op::Replace if rebuilding.is_none() && failed.is_some() => {
                    array.replace(failed.expect("failed")).expect("replace");
                    rebuilt_to = 0;
                }
                Op::RebuildQuarter if rebuilding.is_some() && rebuilt_to < SMALL_DISK => {
                    let engine = array.engine().clone();
                    let lost = rebuild_range(
                        &engine,
                        rebuilding.expect("rebuilding"),
                        rebuilt_to,
                        SMALL_DISK / 4,
                        |_, _| true,
                    )
                    .expect("rebuild")
                    .unrecoverable;
                    prop_assert!(lost.is_empty());
                    rebuilt_to += SMALL_DISK / 4;
                }
                Op::Finish if rebuilding.is_some() && rebuilt_to == SMALL_DISK => {
                    array
                        .finish_rebuild(rebuilding.expect("rebuilding"))
                        .expect("finish");
                }
                _ => continue,
            }
            let mut read = vec![0u8; size as usize];
            array.engine().read_at(0, &mut read).expect("read");
            prop_assert!(read == model, "array differs from the model");
        }
        // Whatever state it ended in, redundancy is intact where it claims to be:
        // a scrub finds no mismatch.
        let engine = array.engine().clone();
        let found = scrub_range(&engine, 0, SMALL_DISK, false, |_, _| true).expect("scrub");
        prop_assert_eq!((found.parity_mismatches, found.checksum_errors), (0, 0));
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

        #[test]
        fn raid5_writes_failures_and_online_rebuilds_match_the_model(
            ops in proptest::collection::vec(op(3 * SMALL_DISK, 4), 1..60)
        ) {
            check(Level::Raid5, 4, ops)?;
        }

        #[test]
        fn raid6_writes_failures_and_online_rebuilds_match_the_model(
            ops in proptest::collection::vec(op(3 * SMALL_DISK, 5), 1..60)
        ) {
            check(Level::Raid6, 5, ops)?;
        }

        #[test]
        fn raid1_writes_failures_and_online_rebuilds_match_the_model(
            ops in proptest::collection::vec(op(SMALL_DISK, 3), 1..60)
        ) {
            check(Level::Raid1, 3, ops)?;
        }
    }
}

#[test]
fn a_block_a_host_wrote_to_the_disk_being_rebuilt_is_kept_when_its_row_cannot_be_rebuilt() {
    let (_dir, mut array, mut data) = filled_array(Level::Raid5, 3);
    array.fail(0).expect("fail");
    array.replace(0).expect("replace");
    let engine = array.engine().clone();
    // Stripe 0: data chunk 0 on member 0 (being rebuilt), chunk 1 on member 1,
    // parity on member 2. A host writes chunk 0's first block: it lands on
    // member 0 too.
    engine.write_at(0, &[0x77; 4096]).expect("host write");
    data[..4096].fill(0x77);
    // Then member 1's block in that row goes bad.
    let path = array.dir().join(&array.metadata().members[1].file);
    poke(&path, 100, b"!!");
    let lost = rebuild_range(&engine, 0, 0, DISK, |_, _| true)
        .expect("rebuild")
        .unrecoverable;
    assert!(
        lost.is_empty(),
        "the host's block is current, nothing is lost: {lost:?}"
    );
    array.finish_rebuild(0).expect("finish");
    // The host's write reads back, and member 1's bad block is rebuilt from it.
    let mut back = vec![0u8; data.len()];
    array.engine().read_at(0, &mut back).expect("read");
    assert!(back == data);
}

#[test]
fn raid6_with_two_members_missing_journals_large_writes_and_rebuilds() {
    // 1 MiB chunks: a write's segments are larger than a journal entry holds
    // for two missing members, unless cut to fit.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut array = Array::create(
        &dir.path().join("a"),
        array::geometry(Level::Raid6, 5, 1 << 20, 4 << 20),
        0,
        1,
    )
    .expect("create");
    let size = array.metadata().geometry.data_bytes() as usize;
    let mut model: Vec<u8> = (0..size).map(|i| (i * 7 % 253) as u8).collect();
    array.engine().write_at(0, &model).expect("fill");
    array.fail(1).expect("fail 1");
    array.fail(2).expect("fail 2");
    let data: Vec<u8> = (0..3_000_000).map(|i| (i * 13 % 249) as u8).collect();
    array
        .engine()
        .write_at(123_457, &data)
        .expect("doubly degraded write");
    model[123_457..123_457 + data.len()].copy_from_slice(&data);
    for disk in [1, 2] {
        array.replace(disk).expect("replace");
        let engine = array.engine().clone();
        let lost = rebuild_range(&engine, disk, 0, 4 << 20, |_, _| true)
            .expect("rebuild")
            .unrecoverable;
        assert!(lost.is_empty(), "{lost:?}");
        array.finish_rebuild(disk).expect("finish");
    }
    let mut read = vec![0u8; size];
    array.engine().read_at(0, &mut read).expect("read");
    assert!(read == model, "array differs from the model");
    let engine = array.engine().clone();
    let found = scrub_range(&engine, 0, 4 << 20, false, |_, _| true).expect("scrub");
    assert_eq!((found.parity_mismatches, found.checksum_errors), (0, 0));
}
