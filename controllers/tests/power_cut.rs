//! The disks' volatile write caches and the power cut that loses them
//! (`controllers::volatile`, `disk_images::powercut`): with a volatile-cache
//! rule in the fault book, an array's writes since its last flush can be
//! undone block by block once its processes are gone, and what a flush made
//! durable never is. After the cut, the next open resyncs what was being
//! written, so a partial loss (a data block lost, its parity kept) leaves no
//! row out of step. The random test prints its seed; `RAID_TEST_SEED`
//! replays it.

use std::path::Path;

use controllers::array::{geometry, Array};
use controllers::faults::{DiskRule, Effect, FaultBook, ANY_FILE};
use controllers::raid::Level;
use controllers::volatile::{self, RolledBack};

mod common;
use common::{base_seed, Rng};

const CHUNK: u64 = 64 * 1024;
const DISK: u64 = 4 << 20;
const DISKS: usize = 4;

fn cached_array(dir: &Path) -> Array {
    let array = Array::create(dir, geometry(Level::Raid5, DISKS, CHUNK, DISK), 0, 1)
        .expect("create the array");
    FaultBook::open(dir)
        .expect("open the book")
        .change(|rules| {
            rules.push(DiskRule::everywhere(
                "cache",
                ANY_FILE,
                Effect::VolatileCache,
            ));
        })
        .expect("keep the disks' caches");
    array
}

/// The power cut on every disk: `lose` decides per disk and block.
fn cut(dir: &Path, mut lose: impl FnMut(usize, u64) -> bool) -> Vec<Option<RolledBack>> {
    let result = (0..DISKS)
        .map(|disk| {
            let image = dir.join(format!("disk{disk}.img"));
            let rolled = volatile::roll_back(&image, |block| lose(disk, block)).expect("roll back");
            assert!(
                !volatile::log_path(&image).exists(),
                "disk{disk}: the undo log is gone after the cut"
            );
            rolled
        })
        .collect();
    FaultBook::open(dir)
        .expect("open the book")
        .change(|rules| rules.clear())
        .expect("clear the book");
    result
}

#[test]
fn a_power_cut_loses_what_was_not_flushed_and_keeps_what_was() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("scratch");
    let dir = dir.path();
    let array = cached_array(dir);
    let engine = array.engine();
    let stripe = 3 * CHUNK as usize;
    let mut rng = Rng(11);
    let durable = rng.bytes(stripe);
    engine.write_at(0, &durable).expect("write stripe 0");
    engine.flush().expect("flush");
    // After the flush: stripe 0's first chunk again, and stripe 1 (never
    // written before), neither flushed.
    engine
        .write_at(0, &rng.bytes(CHUNK as usize))
        .expect("unflushed write over durable data");
    engine
        .write_at(stripe as u64, &rng.bytes(stripe))
        .expect("unflushed write of stripe 1");
    drop(array);

    let rolled = cut(dir, |_, _| true);
    let unflushed: u64 = rolled.iter().flatten().map(|r| r.unflushed).sum();
    let lost: u64 = rolled.iter().flatten().map(|r| r.lost).sum();
    // Stripe 0: one data chunk and its parity; stripe 1: three and parity.
    let blocks_per_chunk = CHUNK / 4096;
    assert_eq!(unflushed, 6 * blocks_per_chunk, "{rolled:?}");
    assert_eq!(lost, unflushed);

    let array = Array::open(dir).expect("open after the cut");
    let mut back = vec![0u8; 2 * stripe];
    array.engine().read_at(0, &mut back).expect("read back");
    assert!(
        back[..stripe] == durable[..],
        "stripe 0 is what the flush made durable"
    );
    assert!(
        back[stripe..].iter().all(|b| *b == 0),
        "stripe 1 was never flushed: it is gone"
    );
}

#[test]
fn a_cut_with_nothing_written_since_the_flush_changes_nothing() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("scratch");
    let dir = dir.path();
    let array = cached_array(dir);
    let data = Rng(5).bytes(2 * CHUNK as usize);
    array.engine().write_at(CHUNK, &data).expect("write");
    array.engine().flush().expect("flush");
    drop(array);
    let rolled = cut(dir, |_, _| true);
    assert!(
        rolled
            .iter()
            .flatten()
            .all(|r| r.lost == 0 && r.unflushed == 0),
        "{rolled:?}"
    );
    let array = Array::open(dir).expect("open after the cut");
    let mut back = vec![0u8; data.len()];
    array.engine().read_at(CHUNK, &mut back).expect("read");
    assert!(back == data);
}

#[test]
fn a_partial_cut_leaves_every_block_old_or_new_and_every_row_in_step() {
    let seed = base_seed("a_partial_cut_leaves_every_block_old_or_new_and_every_row_in_step");
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("scratch");
    let dir = dir.path();
    let array = cached_array(dir);
    let engine = array.engine();
    let size = 16 * 3 * CHUNK as usize;
    let mut rng = Rng(seed);
    let old = rng.bytes(size);
    engine.write_at(0, &old).expect("durable writes");
    engine.flush().expect("flush");
    let mut new = old.clone();
    for _ in 0..40 {
        let block = rng.below((size / 4096) as u64) as usize;
        let blocks = 1 + rng.below(24) as usize;
        let end = ((block + blocks) * 4096).min(size);
        let bytes = rng.bytes(end - block * 4096);
        engine
            .write_at((block * 4096) as u64, &bytes)
            .expect("unflushed write");
        new[block * 4096..end].copy_from_slice(&bytes);
    }
    drop(array);

    let mut choices = Rng(seed ^ 0x5eed);
    let rolled = cut(dir, |_, _| choices.below(2) == 0);
    let lost: u64 = rolled.iter().flatten().map(|r| r.lost).sum();
    let unflushed: u64 = rolled.iter().flatten().map(|r| r.unflushed).sum();
    assert!(0 < lost && lost < unflushed, "{rolled:?} (seed {seed})");

    let array = Array::open(dir).expect("open after the cut");
    let engine = array.engine();
    let mut back = vec![0u8; size];
    engine.read_at(0, &mut back).expect("read back");
    for (block, ((found, old), new)) in back
        .chunks(4096)
        .zip(old.chunks(4096))
        .zip(new.chunks(4096))
        .enumerate()
    {
        assert!(
            found == old || found == new,
            "block {block} is neither what was flushed nor what was written after (seed {seed})"
        );
    }
    // Data lost on one member and its parity kept on another (or the other
    // way round): the open resynced those rows, so no row is out of step and
    // any disk can fail now without turning durable data into garbage.
    let findings =
        controllers::work::scrub_range(engine, 0, DISK, false, |_, _| true).expect("scrub");
    assert_eq!(
        (findings.checksum_errors, findings.parity_mismatches),
        (0, 0),
        "every row in step after the cut (seed {seed}): {findings:?}"
    );
    engine.fail_member(1).expect("fail a disk");
    let mut degraded = vec![0u8; size];
    engine.read_at(0, &mut degraded).expect("read degraded");
    assert!(degraded == back, "reconstructed as read (seed {seed})");
}
