//! A process killed half-way through a block of a member write (after some of
//! the block's new bytes landed, before its CRC): at every block write of one
//! array write in turn: on a healthy and on a degraded RAID-5, on a RAID-1, and
//! on a RAID-6 healthy and with one or two members failed. After the next process recovers the dead one's stripe, every acknowledged
//! byte outside the interrupted write reads back as it was, every byte inside
//! it is old or new, and the redundancy agrees with the data. A process that had
//! the array open all along and fails a disk next resyncs the stripe first.
//!
//! The killed process is this test binary run again (an ignored test) with
//! `EMULATOR_FAULT_CRASH_IN_BLOCK_WRITE=N` (see `disk_images::DiskImage`), or
//! with a crash rule in the array's fault book (`controllers::faults`): a
//! process dying between member writes, in a write of the degraded-write
//! journal, and in the middle of the resync that recovers another one.

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};

use controllers::array::{self, Array};
use controllers::faults::{DiskRule, Effect, FaultBook, Writers};
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

/// Creates a `level` array of `disks` members in `dir` and fills it with
/// [`acknowledged`] bytes, which it returns with the array.
fn filled(dir: &Path, level: Level, disks: usize) -> (Array, Vec<u8>) {
    let geometry = array::geometry(level, disks, CHUNK, DISK);
    let array = Array::create(dir, geometry, 0, 1).expect("create");
    let old = acknowledged(geometry.data_bytes() as usize);
    array.engine().write_at(0, &old).expect("fill");
    (array, old)
}

/// Reads the whole array: every byte must be `old`, or, inside the
/// interrupted write, new.
fn assert_old_or_new(array: &Array, old: &[u8], context: &str) {
    let mut got = vec![0u8; old.len()];
    array
        .engine()
        .read_at(0, &mut got)
        .unwrap_or_else(|err| panic!("{context}: read failed: {err}"));
    let write = WRITE_AT as usize..WRITE_AT as usize + WRITE_LEN;
    for (i, (&g, &o)) in got.iter().zip(old).enumerate() {
        assert!(
            g == o || (write.contains(&i) && g == NEW),
            "{context}: byte {i} is {g:#04x}, acknowledged {o:#04x}{}",
            if write.contains(&i) { " (or new)" } else { "" }
        );
    }
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

/// Child: opens the array (recovering any dead process) and goes.
#[test]
#[ignore = "run as a child process by the tests below"]
fn child_opens() {
    let Some(dir) = std::env::var_os("CHILD_ARRAY") else {
        return;
    };
    Array::open(Path::new(&dir)).expect("open");
}

/// A crash rule for the array in `dir`: the process making the `nth` write of
/// `writers` to `file` dies there, after `stall_ms`.
fn crash_rule(dir: &Path, id: &str, file: &str, writers: Writers, nth: u64, stall_ms: u64) {
    FaultBook::open(dir)
        .expect("the fault book")
        .change(|rules| {
            rules.push(DiskRule {
                writers,
                ..DiskRule::everywhere(id, file, Effect::Crash { nth, stall_ms })
            })
        })
        .expect("add the rule");
}

const HOST: Writers = Writers {
    host: true,
    rebuild: false,
    repair: false,
};

/// Runs child `test` on the array in `dir`; its exit status and stderr.
fn run_child(test: &str, dir: &Path) -> (std::process::ExitStatus, String) {
    let out = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            test,
            "--ignored",
            "--test-threads=1",
            "--nocapture",
        ])
        .env("CHILD_ARRAY", dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .expect("run the child");
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
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
        let (mut created, old) = filled(&dir, level, disks);
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
            assert_old_or_new(array, &old, &format!("{context}, {what}"))
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

/// A writer on a degraded RAID-5 dies in a write of the degraded-write
/// journal: in the middle of an entry (the missing member's bytes saved, the
/// header not), and, at the next crash point, with the members written and the
/// entry not yet cleared. Whatever the recovering process makes of the entry,
/// every acknowledged byte outside the write reads back, the missing member's
/// too (reconstructed through the parity), and every byte inside it is old or
/// new.
#[test]
fn degraded_raid5_death_in_a_journal_write_loses_nothing_acknowledged() {
    let mut kills = 0;
    for nth in 1.. {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("array");
        let (mut created, old) = filled(&dir, Level::Raid5, 3);
        created.fail(1).expect("fail a disk");
        drop(created);
        crash_rule(&dir, "j1", controllers::journal::JOURNAL_FILE, HOST, nth, 0);
        let (status, stderr) = run_child("child_writes_until_killed", &dir);
        if status.success() {
            break;
        }
        assert_eq!(
            status.signal(),
            Some(6),
            "the child must die at the crash point: {stderr}"
        );
        assert!(
            stderr.contains("fault j1: dying at journal") && stderr.contains("array.journal"),
            "{stderr}"
        );
        kills += 1;
        let array = Array::open(&dir).expect("reopen (recovers the dead process)");
        assert_old_or_new(&array, &old, &format!("killed at journal write {nth}"));
    }
    assert!(
        kills >= 2,
        "the write should record and clear journal entries, got {kills} deaths"
    );
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
    let (created, old) = filled(&dir, Level::Raid5, 3);
    drop(created);
    // Stripe 0 is D0 on disk 0, D1 on disk 1, P on disk 2: the writer dies at
    // its first write to disk 1, after D0, stalling a second first.
    crash_rule(&dir, "f1", "disk1.img", HOST, 1, 1000);

    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "child_writes_until_killed",
            "--ignored",
            "--test-threads=1",
            "--nocapture",
        ])
        .env("CHILD_ARRAY", &dir)
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
        said.last().is_some_and(
            |l| l.contains("fault f1: dying at host write 1 to disk1.img after stalling")
        ),
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
    assert_old_or_new(&array, &old, "after the change");
}

/// A process dies in the middle of a stripe write; the next one to open the
/// array dies in the middle of resyncing that stripe (its parity write); the
/// one after recovers both: every acknowledged byte reads back, the
/// interrupted write's bytes are old or new, and the parity agrees with the
/// data (read again with a disk failed).
#[test]
fn a_process_that_dies_resyncing_a_dead_writers_stripe_is_recovered_in_turn() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("array");
    let (created, old) = filled(&dir, Level::Raid5, 3);
    drop(created);
    // The writer dies after D0 (disk 0), before D1 and P.
    crash_rule(&dir, "f1", "disk1.img", HOST, 1, 0);
    let (status, said) = run_child("child_writes_until_killed", &dir);
    assert_eq!(status.signal(), Some(6), "the writer dies: {said}");
    assert!(
        said.contains("fault f1: dying at host write 1 to disk1.img"),
        "{said}"
    );
    // The next process resyncs stripe 0 (P, on disk 2, recomputed from the
    // data) and dies there.
    let repair = Writers {
        host: false,
        rebuild: false,
        repair: true,
    };
    crash_rule(&dir, "f2", "disk2.img", repair, 1, 0);
    let (status, said) = run_child("child_opens", &dir);
    assert_eq!(
        status.signal(),
        Some(6),
        "the resyncing process dies: {said}"
    );
    assert!(
        said.contains("fault f2: dying at repair 1 to disk2.img"),
        "{said}"
    );
    assert!(
        FaultBook::open(&dir)
            .expect("book")
            .rules()
            .expect("rules")
            .is_empty(),
        "each rule fired once and left the book"
    );
    // The third recovers them both.
    let mut array = Array::open(&dir).expect("open (recovers both)");
    assert_old_or_new(&array, &old, "after recovery");
    array.fail(0).expect("fail disk 0");
    assert_old_or_new(
        &array,
        &old,
        "after recovery, disk 0 failed (read through parity)",
    );
}

/// Dirty plus writeback pages of `path` in the page cache: `cachestat(2)`
/// (Linux 6.5 or later).
fn unsynced_pages(path: &Path) -> u64 {
    use std::os::fd::AsRawFd;
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct Cachestat {
        cache: u64,
        dirty: u64,
        writeback: u64,
        evicted: u64,
        recently_evicted: u64,
    }
    // The same number on every architecture (the generic syscall table).
    const SYS_CACHESTAT: libc::c_long = 451;
    let file = std::fs::File::open(path).expect("open for cachestat");
    let range = Range { off: 0, len: 0 };
    let mut stat = Cachestat::default();
    // SAFETY: cachestat reads `range` and writes `stat`, both live and of the
    // layout the kernel's `struct cachestat_range` / `struct cachestat` have,
    // for the duration of the call; `file` keeps the descriptor open.
    let done = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &range as *const Range,
            &mut stat as *mut Cachestat,
            0,
        )
    };
    assert_eq!(
        done,
        0,
        "cachestat {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    stat.dirty + stat.writeback
}

/// A degraded RAID-5 write survives a power cut at any point, not only the
/// death of its process: the journal entry that can undo it is on the device
/// before any member is written (the writer dies at its first member write:
/// nothing of the journal is left in the page cache), and the members' new
/// bytes are on the device before the entry is cleared (a write that returned
/// left nothing of them unsynced, only the clear, which the next flush makes
/// durable). Without either, the cut can leave data and parity out of step
/// with no entry to restore the missing member's bytes: the write hole.
///
/// On a disk file system (the target directory): tmpfs writes nothing back.
#[test]
fn degraded_raid5_write_is_on_the_device_journal_first_then_members() {
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("scratch");
    let dir = tmp.path().join("array");
    let (mut created, old) = filled(&dir, Level::Raid5, 3);
    let view = created.engine().view().expect("view");
    assert!(
        view.images.iter().all(|m| {
            disk_images::DiskImage::open(m.path(), disk_images::Access::ReadOnly)
                .expect("open")
                .stores()
                == disk_images::Stores::File
        }),
        "{} must be on a disk file system",
        dir.display()
    );
    drop(view);
    let g = created.engine().geometry();
    // Stripe 0 is D0 on disk 0, D1 on disk 1, P on disk 2; disk 1 fails.
    assert_eq!(
        (g.data_disk(0, 0), g.data_disk(0, 1), g.parity_disk(0)),
        (0, 1, 2)
    );
    created.fail(1).expect("fail disk 1");
    created.engine().flush().expect("flush");
    drop(created);
    let journal = dir.join(controllers::journal::JOURNAL_FILE);

    // The writer dies at its first member write, after its journal entry.
    crash_rule(&dir, "f1", "disk0.img", HOST, 1, 0);
    let (status, said) = run_child("child_writes_until_killed", &dir);
    assert_eq!(status.signal(), Some(6), "the writer dies: {said}");
    assert!(
        said.contains("fault f1: dying at host write 1 to disk0.img"),
        "{said}"
    );
    assert!(
        controllers::journal::Journal::open(&dir)
            .expect("journal")
            .saved(0, 0)
            .expect("read the entry")
            .is_some(),
        "the dead writer's entry is there"
    );
    assert_eq!(
        unsynced_pages(&journal),
        0,
        "the entry was not on the device before a member was written"
    );
    let array = Array::open(&dir).expect("open (recovers the dead writer)");
    assert_old_or_new(&array, &old, "after the writer died");
    array.engine().flush().expect("flush");

    // The probe sees unsynced writes: a stripe whose parity was on the failed
    // disk has no missing data, no entry, and is written as any other. More
    // than a few writes between two flushes, so that the members do not start
    // writing back each write at once (as they do when flushes come often).
    let plain = (0..g.disk_bytes / CHUNK)
        .find(|&stripe| g.parity_disk(stripe) == 1)
        .expect("a stripe with its parity on disk 1");
    for i in 0..2 * (CHUNK / 4096) * 4 {
        let at = plain * g.row_bytes() + (i % (2 * CHUNK / 4096)) * 4096;
        array.engine().write_at(at, &[NEW; 4096]).expect("write");
    }
    let members: Vec<_> = ["disk0.img", "disk2.img"]
        .iter()
        .flat_map(|m| [dir.join(m), disk_images::sidecar_path(&dir.join(m))])
        .collect();
    assert!(
        members.iter().any(|m| unsynced_pages(m) > 0),
        "the probe must see a write that was not flushed"
    );
    array.engine().flush().expect("flush");

    // A degraded write that returns has its members on the device; only the
    // clear of its entry waits for the next flush.
    array
        .engine()
        .write_at(WRITE_AT, &[NEW; WRITE_LEN])
        .expect("degraded write");
    for member in &members {
        assert_eq!(
            unsynced_pages(member),
            0,
            "{} was not on the device before the entry was cleared",
            member.display()
        );
    }
    assert!(unsynced_pages(&journal) > 0, "the clear waits for a flush");
    array.engine().flush().expect("flush");
    assert_eq!(
        unsynced_pages(&journal),
        0,
        "a flush makes the clear durable"
    );
}
