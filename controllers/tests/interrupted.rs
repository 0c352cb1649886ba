//! A process killed half-way through a block of a member write (after some of
//! the block's new bytes landed, before its CRC): at every block write of one
//! array write in turn: on a healthy and on a degraded RAID-5, on a RAID-1, and
//! on a RAID-6 healthy and with one or two members failed. After the next process recovers the dead one's stripe, every acknowledged
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

/// What the array holds before the interrupted write: no two chunks alike (a
/// pattern that repeated every chunk would make a parity that is out of step
/// look right).
fn acknowledged(len: usize) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
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

fn check(level: Level, disks: usize, fail_first: &[usize], after: After) {
    let mut kills = 0;
    for nth in 1.. {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("array");
        let geometry = array::geometry(level, disks, CHUNK, DISK);
        let mut created = Array::create(&dir, geometry, 0, 1).expect("create");
        let size = geometry.data_bytes() as usize;
        let old = acknowledged(size);
        created.engine().write_at(0, &old).expect("fill");
        for &disk in fail_first {
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
        if fail_first.is_empty() && matches!(after, After::Reopen) {
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
    check(Level::Raid5, 3, &[], After::Reopen);
}

#[test]
fn degraded_raid5_kill_in_any_block_write_loses_nothing_acknowledged() {
    check(Level::Raid5, 3, &[1], After::Reopen);
}

#[test]
fn raid1_kill_in_any_block_write_loses_nothing_acknowledged() {
    check(Level::Raid1, 2, &[], After::Reopen);
}

#[test]
fn raid5_disk_failed_after_a_kill_is_failed_only_once_the_stripe_is_resynced() {
    check(Level::Raid5, 3, &[], After::FailDiskWhileOpen);
}

#[test]
fn raid6_kill_in_any_block_write_loses_nothing_acknowledged() {
    check(Level::Raid6, 4, &[], After::Reopen);
    check(Level::Raid6, 5, &[], After::FailDiskWhileOpen);
}

#[test]
fn degraded_raid6_kill_in_any_block_write_loses_nothing_acknowledged() {
    // One data member missing, then two (the write's stripe 0: P on disk 3,
    // Q on disk 0, data on disks 1 and 2).
    check(Level::Raid6, 4, &[1], After::Reopen);
    check(Level::Raid6, 4, &[1, 2], After::Reopen);
    // P and a data member missing: Q alone carries the missing data.
    check(Level::Raid6, 4, &[3, 2], After::Reopen);
}

/// A writer stalls in the middle of a stripe write (data written, parity not)
/// and then dies, while another process fails a disk of that stripe: the
/// change waits for the write, resyncs the stripe under the configuration it
/// was written with, and only then fails the disk, whose data then reads back
/// as it was.
#[test]
fn a_disk_failed_while_a_write_is_in_flight_waits_for_it() {
    use std::io::BufRead;
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("array");
    let geometry = array::geometry(Level::Raid5, 3, CHUNK, DISK);
    let created = Array::create(&dir, geometry, 0, 1).expect("create");
    let size = geometry.data_bytes() as usize;
    let old = acknowledged(size);
    created.engine().write_at(0, &old).expect("fill");
    drop(created);

    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "child_writes_until_killed",
            "--ignored",
            "--test-threads=1",
            "--nocapture",
        ])
        .env("CHILD_ARRAY", &dir)
        .env("EMULATOR_FAULT_CRASH_MID_WRITE", "1")
        .env("EMULATOR_FAULT_STALL_MS", "1000")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn child");
    // The child says when it stalls (its stderr closes if it dies first).
    // Kept open until it dies: its last words must not meet a closed pipe.
    let mut lines = std::io::BufReader::new(child.stderr.take().expect("stderr")).lines();
    let mut said = Vec::new();
    for line in &mut lines {
        let line = line.expect("child stderr");
        let stalled = line.contains("stalling");
        said.push(line);
        if stalled {
            break;
        }
    }
    assert!(
        said.last().is_some_and(|l| l.contains("stalling")),
        "the child should stall mid-write: {said:?}"
    );
    // Stripe 0 is D0 on disk 0, D1 on disk 1, P on disk 2; the write changed
    // D0 and stalled before D1 and P. Disk 1 fails now, mid-write.
    let mut array = Array::open(&dir).expect("open while the writer stalls");
    array.fail(1).expect("fail disk 1");
    let status = child.wait().expect("wait for the child");
    said.extend(lines.map_while(Result::ok));
    assert_eq!(
        status.signal(),
        Some(6),
        "the child dies in the fault hook: {said:?}"
    );
    let mut got = vec![0u8; size];
    array.engine().read_at(0, &mut got).expect("read");
    let write = WRITE_AT as usize..WRITE_AT as usize + WRITE_LEN;
    for (i, (&g, &o)) in got.iter().zip(&old).enumerate() {
        assert!(
            g == o || (write.contains(&i) && g == NEW),
            "byte {i} is {g:#04x}, acknowledged {o:#04x}"
        );
    }
}
