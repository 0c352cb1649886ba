//! A configuration change whose process died after writing `array.json` and
//! before announcing it: the next process to open the array announces it, so
//! running processes stop using a disk that was failed.

use controllers::array::{self, Array};
use controllers::raid::{Level, MemberState};

/// What `Array::change` leaves when killed between its write and its
/// announcement: `array.json` with disk `disk` failed and one more change.
fn fail_without_announcing(dir: &std::path::Path, disk: usize) {
    let path = dir.join("array.json");
    let envelope: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("json");
    let mut metadata = envelope["metadata"].clone();
    metadata["members"][disk]["state"] = "failed".into();
    let changes = metadata["changes"].as_u64().unwrap_or(0);
    metadata["changes"] = (changes + 1).into();
    let raw = serde_json::to_string(&metadata).expect("encode");
    let text = format!(
        "{{\"metadata\":{raw},\"crc32\":{}}}\n",
        crc32fast::hash(raw.as_bytes())
    );
    std::fs::write(&path, text).expect("write");
}

#[test]
fn a_change_left_unannounced_is_announced_by_the_next_open() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("array");
    let geometry = array::geometry(Level::Raid5, 3, 8192, 64 * 1024);
    let serving = Array::create(&dir, geometry, 0, 1).expect("create");
    let engine = serving.engine().clone();
    engine.write_at(0, &[7; 4096]).expect("write");
    assert_eq!(engine.view().expect("view").states[1], MemberState::Active);

    fail_without_announcing(&dir, 1);
    // Nobody told the serving process: it still uses disk 1.
    assert_eq!(engine.view().expect("view").states[1], MemberState::Active);
    // The next process to open the array (any admin command) tells it.
    let admin = Array::open(&dir).expect("open");
    assert_eq!(admin.metadata().members[1].state, MemberState::Failed);
    assert_eq!(engine.view().expect("view").states[1], MemberState::Failed);
    let mut back = [0u8; 4096];
    engine.read_at(0, &mut back).expect("degraded read");
    assert_eq!(back, [7; 4096]);
}
