//! A process killed half-way through a block of a member write (after some of
//! the block's new bytes landed, before its CRC): at every block write of one
//! array write in turn, on a healthy and on a degraded RAID-5 and on a RAID-1.
//! After the next process recovers the dead one's stripe, every acknowledged
//! byte outside the interrupted write reads back as it was, every byte inside
//! it is old or new, and the redundancy agrees with the data. A process that had
//! the array open all along and fails a disk next resyncs the stripe first.
//!
//! The killed process is this test binary run again (an ignored test) with
//! `EMULATOR_FAULT_CRASH_IN_BLOCK_WRITE=N` (see `disk_images::DiskImage`).

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};

use controllers::array::{self, Array};
use controllers::raid::Level;

const CHUNK: u64 = 8192;
const DISK: u64 = 64 * 1024;
/// The interrupted write: unaligned at both ends, over three chunks of stripe 0.
const WRITE_AT: u64 = 100;
const WRITE_LEN: usize = 12388;
const NEW: u8 = 0xA5;

fn acknowledged(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(7))
        .collect()
}

/// Child: opens the array and makes the write that the fault hook kills.
#[test]
#[ignore = "run as a child process by the tests below"]
fn child_writes_until_killed() {
    let Some(dir) = std::env::var_os("CHILD_ARRAY") else {
        return;
    };
    let array = Array::open(Path::new(&dir)).expect("open");
    array
        .engine()
        .write_at(WRITE_AT, &[NEW; WRITE_LEN])
        .expect("write");
}

/// Whether the child was killed (false: its write completed before the
/// `nth` block write).
fn child_killed_at(dir: &Path, nth: u32) -> bool {
    let status = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "child_writes_until_killed",
            "--ignored",
            "--test-threads=1",
        ])
        .env("CHILD_ARRAY", dir)
        .env("EMULATOR_FAULT_CRASH_IN_BLOCK_WRITE", nth.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("spawn child");
    if status.success() {
        return false;
    }
    assert_eq!(
        status.signal(),
        Some(6), // SIGABRT,
        "the child must die in the fault hook: {status:?}"
    );
    true
}

/// What the surviving side does after the kill.
#[derive(Clone, Copy, Debug)]
enum After {
    /// Opens the array again (which recovers the dead process), then reads.
    Reopen,
    /// Had the array open all along, and fails disk 0 before reading: a
    /// configuration change must first resync the stripe the dead process
    /// left half-written, with the members it was written with.
    FailDiskWhileOpen,
}

fn check(level: Level, disks: usize, fail_first: Option<usize>, after: After) {
    let mut kills = 0;
    for nth in 1.. {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("array");
        let geometry = array::geometry(level, disks, CHUNK, DISK);
        let mut created = Array::create(&dir, geometry, 0, 1).expect("create");
        let size = geometry.data_bytes() as usize;
        let old = acknowledged(size);
        created.engine().write_at(0, &old).expect("fill");
        if let Some(disk) = fail_first {
            created.fail(disk).expect("fail a disk");
        }
        let kept = match after {
            After::Reopen => {
                drop(created);
                None
            }
            After::FailDiskWhileOpen => Some(created),
        };

        if !child_killed_at(&dir, nth) {
            break;
        }
        kills += 1;
        let context = format!(
            "{level:?} x{disks}, failed {fail_first:?}, killed in block write {nth}, {after:?}"
        );
        let mut array = match kept {
            None => Array::open(&dir).expect("reopen (recovers the dead process)"),
            Some(mut array) => {
                array.fail(0).expect("fail disk 0");
                array
            }
        };
        let check_reads = |array: &Array, what: &str| {
            let mut got = vec![0u8; size];
            array
                .engine()
                .read_at(0, &mut got)
                .unwrap_or_else(|err| panic!("{context}, {what}: read failed: {err}"));
            let write = WRITE_AT as usize..WRITE_AT as usize + WRITE_LEN;
            for (i, (&g, &o)) in got.iter().zip(&old).enumerate() {
                let fine = g == o || (write.contains(&i) && g == NEW);
                assert!(
                    fine,
                    "{context}, {what}: byte {i} is {g:#04x}, acknowledged {o:#04x}{}",
                    if write.contains(&i) { " (or new)" } else { "" }
                );
            }
        };
        check_reads(&array, "after recovery");
        // The redundancy agrees with the data: read again with another
        // member gone, through reconstruction.
        if fail_first.is_none() && matches!(after, After::Reopen) {
            array.fail(0).expect("fail disk 0");
            check_reads(&array, "after recovery, disk 0 failed");
        }
    }
    assert!(
        kills >= 3,
        "the write should span several block writes, got {kills}"
    );
}

#[test]
fn raid5_kill_in_any_block_write_loses_nothing_acknowledged() {
    check(Level::Raid5, 3, None, After::Reopen);
}

#[test]
fn degraded_raid5_kill_in_any_block_write_loses_nothing_acknowledged() {
    check(Level::Raid5, 3, Some(1), After::Reopen);
}

#[test]
fn raid1_kill_in_any_block_write_loses_nothing_acknowledged() {
    check(Level::Raid1, 2, None, After::Reopen);
}

#[test]
fn raid5_disk_failed_after_a_kill_is_failed_only_once_the_stripe_is_resynced() {
    check(Level::Raid5, 3, None, After::FailDiskWhileOpen);
}
