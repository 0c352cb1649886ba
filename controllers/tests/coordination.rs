//! The coordination object under two controllers: random interleavings with a
//! simulated clock, and real threads racing on separate mappings of one file.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use controllers::coordination::{
    Claim, CoordinationError, FindingCounts, Operation, PartitionState, TaskFile, TaskSpec,
};
use proptest::prelude::*;

const LEASE_MS: u64 = 1_000;

fn spec(partitions: u64) -> TaskSpec {
    TaskSpec {
        operation: Operation::Scrub,
        data_set: "array0".into(),
        target_disk: None,
        data_set_bytes: partitions * 4096 - 100,
        partition_bytes: 4096,
        initiator: 0,
        repair: true,
    }
}

fn new_task(partitions: u64) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("task");
    TaskFile::create(&path, &spec(partitions), 1_000_000).expect("create");
    (dir, path)
}

#[derive(Debug, Clone)]
enum Step {
    Claim(u8),
    Renew(u8),
    Complete(u8),
    Release(u8),
    /// The controller dies: it forgets its claims without releasing them.
    Die(u8),
    Tick(u64),
}

fn step() -> impl Strategy<Value = Step> {
    let controller = 0u8..2;
    prop_oneof![
        4 => controller.clone().prop_map(Step::Claim),
        2 => controller.clone().prop_map(Step::Renew),
        3 => controller.clone().prop_map(Step::Complete),
        1 => controller.clone().prop_map(Step::Release),
        1 => controller.prop_map(Step::Die),
        2 => (1u64..1500).prop_map(Step::Tick),
    ]
}

/// The protocol as a plain model: what every partition's state must be.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Model {
    Ready,
    /// Held by claim `id` until `deadline`.
    Held {
        id: usize,
        deadline: u64,
    },
    Complete,
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Two controllers, each with its own mapping of the file, act in any order
    /// while leases expire and controllers die. Every call is checked against a
    /// reference model: a claim goes to the first READY partition, else the first
    /// whose lease expired, else none; renew/complete/release succeed exactly when
    /// the caller's claim is the partition's current one. So a partition never has
    /// two owners and is never completed twice; and a survivor can always finish.
    #[test]
    fn two_controllers_follow_the_protocol(steps in proptest::collection::vec(step(), 1..150)) {
        let (_dir, path) = new_task(6);
        let files = [TaskFile::open(&path).expect("open 0"), TaskFile::open(&path).expect("open 1")];
        let mut model = vec![Model::Ready; 6];
        let mut held: [Vec<(usize, Claim)>; 2] = [Vec::new(), Vec::new()];
        let mut next_id = 0usize;
        let mut now = 1_000_000u64;
        let current = |model: &[Model], partition: u32, id: usize| {
            matches!(model[partition as usize], Model::Held { id: holder, .. } if holder == id)
        };
        for step in steps {
            match step {
                Step::Claim(c) => {
                    let expected = model.iter().position(|m| *m == Model::Ready).or_else(|| {
                        model.iter().position(|m| matches!(m, Model::Held { deadline, .. } if *deadline <= now))
                    });
                    let got = files[c as usize].claim_next(c, now, LEASE_MS);
                    prop_assert_eq!(got.as_ref().map(|claim| claim.partition as usize), expected);
                    if let Some(claim) = got {
                        let was_held = matches!(model[claim.partition as usize], Model::Held { .. });
                        prop_assert_eq!(claim.took_over, was_held);
                        model[claim.partition as usize] = Model::Held { id: next_id, deadline: now + LEASE_MS };
                        held[c as usize].push((next_id, claim));
                        next_id += 1;
                    }
                }
                Step::Renew(c) => {
                    for (id, claim) in held[c as usize].iter_mut() {
                        let ok = files[c as usize].renew(claim, claim.length / 2, now, LEASE_MS).is_ok();
                        prop_assert_eq!(ok, current(&model, claim.partition, *id));
                        if ok {
                            model[claim.partition as usize] = Model::Held { id: *id, deadline: now + LEASE_MS };
                        }
                    }
                }
                Step::Complete(c) => {
                    if let Some((id, claim)) = held[c as usize].pop() {
                        let partition = claim.partition;
                        let should = current(&model, partition, id);
                        let result = files[c as usize].complete(claim, FindingCounts { checked: 1, ..FindingCounts::default() });
                        prop_assert_eq!(result.is_ok(), should, "{:?}", result);
                        if should {
                            model[partition as usize] = Model::Complete;
                        }
                    }
                }
                Step::Release(c) => {
                    if let Some((id, claim)) = held[c as usize].pop() {
                        let partition = claim.partition;
                        let should = current(&model, partition, id);
                        prop_assert_eq!(files[c as usize].release(claim, 0).is_ok(), should);
                        if should {
                            model[partition as usize] = Model::Ready;
                        }
                    }
                }
                Step::Die(c) => held[c as usize].clear(),
                Step::Tick(ms) => now += ms,
            }
            for (index, expected) in model.iter().enumerate() {
                let view = files[1].partition(index as u32);
                let state = match expected {
                    Model::Ready => PartitionState::Ready,
                    Model::Held { .. } => PartitionState::InProgress,
                    Model::Complete => PartitionState::Complete,
                };
                prop_assert_eq!(view.state, state, "partition {}", index);
            }
        }
        // A survivor (controller 1), once every lease has run out, finishes the task.
        now += 10 * LEASE_MS;
        while let Some(claim) = files[1].claim_next(1, now, LEASE_MS) {
            prop_assert!(model[claim.partition as usize] != Model::Complete, "completed work handed out again");
            model[claim.partition as usize] = Model::Complete;
            files[1].complete(claim, FindingCounts { checked: 1, ..FindingCounts::default() }).expect("survivor completes");
        }
        prop_assert!(files[0].all_complete());
        prop_assert_eq!(files[0].findings().checked, 6, "each partition's findings counted once");
        prop_assert!(files[1].begin_completion(1));
        prop_assert!(!files[0].begin_completion(0), "completion actions run once");
    }
}

#[test]
fn threads_racing_on_separate_mappings_complete_each_partition_once() {
    let (_dir, path) = new_task(512);
    let completions = Arc::new((0..512).map(|_| AtomicU64::new(0)).collect::<Vec<_>>());
    let threads: Vec<_> = (0..4u8)
        .map(|controller| {
            let path = path.clone();
            let completions = Arc::clone(&completions);
            std::thread::spawn(move || {
                let file = TaskFile::open(&path).expect("open");
                let mut done = 0;
                while let Some(mut claim) = file.claim_next(controller, 1_000_000, 60_000) {
                    file.renew(&mut claim, 1, 1_000_000, 60_000)
                        .expect("still ours");
                    completions[claim.partition as usize].fetch_add(1, Ordering::SeqCst);
                    file.complete(claim, FindingCounts::default())
                        .expect("complete");
                    done += 1;
                }
                done
            })
        })
        .collect();
    let total: u64 = threads.into_iter().map(|t| t.join().expect("thread")).sum();
    assert_eq!(total, 512);
    assert!(completions.iter().all(|n| n.load(Ordering::SeqCst) == 1));
    let file = TaskFile::open(&path).expect("open");
    assert!(file.all_complete());
    assert_eq!(file.bytes_done(), spec(512).data_set_bytes);
}

#[test]
fn a_dead_owners_partition_is_resumed_from_its_progress() {
    let (_dir, path) = new_task(2);
    let a = TaskFile::open(&path).expect("a");
    let b = TaskFile::open(&path).expect("b");
    let mut claim = a.claim_next(0, 1_000_000, LEASE_MS).expect("a claims");
    a.renew(&mut claim, 3000, 1_000_100, LEASE_MS)
        .expect("a renews");
    let other = b
        .claim_next(1, 1_000_200, LEASE_MS)
        .expect("b claims the other");
    assert_ne!(other.partition, claim.partition);
    b.complete(other, FindingCounts::default())
        .expect("b completes");
    // a dies; before its lease runs out b finds nothing to do...
    assert!(b.claim_next(1, 1_000_200, LEASE_MS).is_none());
    // ...after, b takes the partition over where a left it.
    let taken = b
        .claim_next(1, 1_000_100 + LEASE_MS, LEASE_MS)
        .expect("takeover");
    assert_eq!(taken.partition, claim.partition);
    assert!(taken.took_over);
    assert_eq!(taken.resume_from, 3000);
    // a wakes up: everything it tries now fails, nothing is overwritten.
    assert!(matches!(
        a.renew(&mut claim, 4000, 1_000_200, LEASE_MS),
        Err(CoordinationError::Lost { .. })
    ));
    assert!(matches!(
        a.complete(claim, FindingCounts::default()),
        Err(CoordinationError::Lost { .. })
    ));
    b.complete(taken, FindingCounts::default())
        .expect("b completes");
    assert!(b.begin_completion(1));
    b.finish_completion();
    assert!(a.completion_done());
}

#[test]
fn a_task_survives_both_controllers_restarting() {
    let (_dir, path) = new_task(3);
    {
        let file = TaskFile::open(&path).expect("open");
        let claim = file.claim_next(0, 1_000_000, LEASE_MS).expect("claim");
        file.complete(
            claim,
            FindingCounts {
                errors: 2,
                ..FindingCounts::default()
            },
        )
        .expect("complete");
        let mut held = file.claim_next(0, 1_000_000, LEASE_MS).expect("claim");
        file.renew(&mut held, 1234, 1_000_000, LEASE_MS)
            .expect("renew");
        // Both controllers go away here.
    }
    let file = TaskFile::open(&path).expect("reopen");
    assert_eq!(file.spec(), &spec(3));
    let states: Vec<_> = file.partitions().iter().map(|p| p.state).collect();
    assert_eq!(
        states,
        [
            PartitionState::Complete,
            PartitionState::InProgress,
            PartitionState::Ready
        ]
    );
    assert_eq!(file.findings().errors, 2);
    let first = file
        .claim_next(1, 1_000_000 + 2 * LEASE_MS, LEASE_MS)
        .expect("ready one first");
    assert_eq!((first.partition, first.took_over), (2, false));
    let second = file
        .claim_next(1, 1_000_000 + 2 * LEASE_MS, LEASE_MS)
        .expect("then the expired one");
    assert_eq!(
        (second.partition, second.resume_from, second.took_over),
        (1, 1234, true)
    );
}

#[test]
fn bad_files_and_specs_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("task");
    let mut bad = spec(2);
    bad.partition_bytes = 0;
    assert!(matches!(
        TaskFile::create(&path, &bad, 0),
        Err(CoordinationError::BadSpec(_))
    ));
    let mut bad = spec(2);
    bad.partition_bytes = 1; // 8092 partitions: fine...
    bad.data_set_bytes = 1 << 20; // ...but 1 Mi of them is too many
    assert!(matches!(
        TaskFile::create(&path, &bad, 0),
        Err(CoordinationError::BadSpec(_))
    ));
    assert!(!path.exists());

    TaskFile::create(&path, &spec(2), 0).expect("create");
    assert!(matches!(
        TaskFile::create(&path, &spec(2), 0),
        Err(CoordinationError::Exists { .. })
    ));
    let good = std::fs::read(&path).expect("read");

    let mut corrupt = good.clone();
    corrupt[40] ^= 1;
    std::fs::write(&path, &corrupt).expect("write");
    assert!(matches!(
        TaskFile::open(&path),
        Err(CoordinationError::Invalid { .. })
    ));
    std::fs::write(&path, &good[..good.len() - 1]).expect("truncate");
    assert!(matches!(
        TaskFile::open(&path),
        Err(CoordinationError::Invalid { .. })
    ));
    std::fs::write(&path, vec![0u8; good.len()]).expect("foreign");
    assert!(matches!(
        TaskFile::open(&path),
        Err(CoordinationError::Invalid { .. })
    ));
}
