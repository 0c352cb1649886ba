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
    )
    .expect("create");
    let size = array.metadata().geometry.data_bytes() as usize;
    let data: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
    array.engine().write_at(0, &data).expect("fill");
    (dir, array, data)
}

#[test]
fn scrub_finds_and_repairs_a_silent_parity_mismatch() {
    for level in [Level::Raid5, Level::Raid1] {
        let (_dir, array, _data) = filled_array(level, 3);
        let engine = array.engine();
        let members = engine.view().expect("view");
        assert_eq!(
            scrub_range(engine, 0, DISK, false, |_| true)
                .expect("scrub")
                .parity_mismatches,
            0
        );
        // A write that bypasses the array (data and CRC both updated): no checksum
        // error, only redundancy can tell.
        members.images[1]
            .write_at(8192, &[0xee; 4096])
            .expect("stray write");
        let found = scrub_range(engine, 0, DISK, false, |_| true).expect("scrub");
        assert_eq!(
            (
                found.parity_mismatches,
                found.checksum_errors,
                found.repaired
            ),
            (1, 0, 0),
            "{level:?}"
        );
        let fixed = scrub_range(engine, 0, DISK, true, |_| true).expect("repair");
        assert_eq!(
            (fixed.parity_mismatches, fixed.repaired),
            (1, 1),
            "{level:?}"
        );
        assert_eq!(
            scrub_range(engine, 0, DISK, false, |_| true)
                .expect("rescrub")
                .parity_mismatches,
            0
        );
    }
}

#[test]
fn rebuild_restores_a_member_exactly() {
    for level in [Level::Raid5, Level::Raid1] {
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
        let lost = rebuild_range(&engine, 2, 0, DISK, |_| {
            steps += 1;
            true
        })
        .expect("rebuild");
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
    use std::os::unix::fs::FileExt;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open")
        .write_all_at(b"!!", 100)
        .expect("poke");
    let found = scrub_range(&engine, 0, 4096, true, |_| true).expect("scrub");
    assert_eq!(found.checksum_errors, 1);
    assert_eq!(
        found.unrecoverable,
        vec![16 * 1024],
        "data chunk 1 of stripe 0 starts at array offset 16 KiB"
    );
    array.replace(0).expect("replace");
    let engine = array.engine().clone();
    let lost = rebuild_range(&engine, 0, 0, 4096, |_| true).expect("rebuild");
    assert_eq!(lost, vec![0], "member 0 holds data chunk 0 of stripe 0");
}
