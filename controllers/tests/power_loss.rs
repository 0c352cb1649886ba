//! An array after a power loss: a write that was never flushed reached one
//! member's disk and not another's (here the data, not the parity), and the
//! page cache that held the rest is gone. The next open must resync what the
//! members' write-intent records name, or the stripe's parity stays stale and a
//! later disk failure reconstructs garbage in place of data that *was* durable
//! (the RAID write hole).
//!
//! The power loss is staged on the files as the disk would hold them: the
//! parity member's files are put back as they were at the last flush, and every
//! member's record gets the stamp of another boot. On a disk file system: on
//! tmpfs no record is kept (a power loss leaves nothing there).

use std::path::Path;
use std::sync::Arc;

use controllers::array::{geometry, Array};
use controllers::raid::Level;
use disk_images::{intent, sidecar_path, Stores};

const CHUNK: u64 = 64 * 1024;
const DISK: u64 = 4 << 20;

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(29) ^ seed)
        .collect()
}

/// Gives member `file`'s record the stamp of another boot.
fn stage_reboot(dir: &Path, file: &str) {
    use std::os::unix::fs::FileExt;
    let other = intent::this_boot().expect("boot id") ^ 2;
    std::fs::OpenOptions::new()
        .write(true)
        .open(sidecar_path(&dir.join(file)))
        .expect("open the sidecar")
        .write_all_at(&other.to_le_bytes(), intent::STAMP_OFFSET as u64)
        .expect("stamp");
}

fn files_of(dir: &Path, file: &str) -> [(std::path::PathBuf, Vec<u8>); 2] {
    let image = dir.join(file);
    let sidecar = sidecar_path(&image);
    [
        (image.clone(), std::fs::read(&image).expect("read image")),
        (
            sidecar.clone(),
            std::fs::read(&sidecar).expect("read sidecar"),
        ),
    ]
}

#[test]
fn a_power_loss_between_data_and_parity_is_resynced_before_a_disk_can_fail() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("scratch");
    let dir = dir.path();
    let g = geometry(Level::Raid5, 4, CHUNK, DISK);
    let array = Array::create(dir, g, 0, 1).expect("create the array");
    let engine = Arc::clone(array.engine());
    let view = engine.view().expect("view");
    if view.images.iter().any(|m| {
        disk_images::DiskImage::open(m.path(), disk_images::Access::ReadOnly)
            .expect("open")
            .stores()
            != Stores::File
    }) {
        panic!("{} must be on a disk file system", dir.display());
    }
    drop(view);
    // Stripe 0, durable: three data chunks and their parity.
    let durable = pattern(1, 3 * CHUNK as usize);
    engine.write_at(0, &durable).expect("write stripe 0");
    engine.flush().expect("flush");
    let parity = format!("disk{}.img", g.parity_disk(0));
    let parity_at_flush = files_of(dir, &parity);
    // Then its first chunk again, never flushed: in the page cache the data
    // member and the parity member both change.
    let unflushed = pattern(2, CHUNK as usize);
    engine.write_at(0, &unflushed).expect("unflushed write");
    drop(engine);
    drop(array);

    // The power goes: the data member's new bytes reached the disk, the
    // parity member's did not.
    for (path, bytes) in &parity_at_flush {
        std::fs::write(path, bytes).expect("restore the parity member");
    }
    for disk in 0..4 {
        stage_reboot(dir, &format!("disk{disk}.img"));
    }

    let mut array = Array::open(dir).expect("open after the power loss");
    // The disk holding the second data chunk (durable all along) fails: it is
    // reconstructed from the parity and the other data.
    let second = g.data_disk(0, 1);
    array.fail(second).expect("fail a disk");
    let mut back = vec![0u8; 3 * CHUNK as usize];
    array.engine().read_at(0, &mut back).expect("read stripe 0");
    let chunk = CHUNK as usize;
    assert_eq!(
        back[chunk..2 * chunk],
        durable[chunk..2 * chunk],
        "durable data reconstructed from stale parity: the stripe was not resynced"
    );
    assert_eq!(
        back[..chunk],
        unflushed[..],
        "the data member kept the new bytes"
    );
    assert_eq!(back[2 * chunk..], durable[2 * chunk..]);
    drop(array);

    // The records were released: restamped with this boot, and cleared by
    // the next first opener.
    let this = intent::this_boot().expect("boot id");
    for disk in 0..4 {
        let header = std::fs::read(sidecar_path(&dir.join(format!("disk{disk}.img"))))
            .expect("sidecar")[..64]
            .to_vec();
        let stamp = u64::from_le_bytes(header[40..48].try_into().expect("8"));
        assert!(stamp == this || stamp == 0, "disk{disk}: stamp {stamp:#x}");
    }
    let array = Array::open(dir).expect("open again");
    let view = array.engine().view().expect("view");
    assert!(view.images.iter().all(|m| m.power_lost().is_empty()));
}
