//! Link faults as data: the run's link book and the watcher that follows it.
//!
//! - **The book** is `RUN/links.json`: a list of [`LinkRule`]s, each naming a
//!   link (`s0/c1/agent-a`: that agent's link to its server; `s0/c0/nbd`:
//!   the hosts' links to controller s0/c0's NBD address) and what it does to
//!   it (cut, or a delay). Changing it ([`LinkBook::change`]) rewrites the
//!   file under a lock and then moves a generation counter in
//!   `RUN/links.live`, which every process that has links maps.
//! - **The watcher** ([`watch`]) loads the state of the links a process
//!   cares about once, synchronously (a process started while a cut stands
//!   sees it before it connects), then compares the mapped generation with
//!   the one it loaded every [`POLL`] (one atomic load) and reloads the book
//!   when it moved. Each link's [`LinkState`] is published on a
//!   `tokio::sync::watch` channel; the layers that apply it (the agent's
//!   shaped stream, `link::shape`; the NBD server's hook, `nbd::hook`)
//!   subscribe. A change reaches them within [`POLL`] of the book changing.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch as channel;

/// The rules, in the run directory.
pub const BOOK_FILE: &str = "links.json";
/// The generation counter every process with links maps.
pub const GENERATION_FILE: &str = "links.live";
/// How often a watcher looks at the generation: the bound on how late a
/// process applies a change of the book.
pub const POLL: Duration = Duration::from_millis(20);

/// What a rule does to its link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "effect", rename_all = "kebab-case")]
pub enum LinkEffect {
    /// The link is closed and cannot be established again while it stands.
    Cut,
    /// Every message (agent link) or reply (NBD link) arrives `ms` later.
    Delay {
        /// Added latency.
        ms: u64,
    },
}

/// One standing link fault.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkRule {
    /// The fault's id (`f3`), for clearing it.
    pub id: String,
    /// The link: `s0/c1/agent-a`, `s0/c0/nbd`.
    pub link: String,
    /// What it does.
    #[serde(flatten)]
    pub effect: LinkEffect,
}

/// What stands on one link now: the sum of the rules naming it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkState {
    /// Cut: closed, and not to be established again.
    pub cut: bool,
    /// Added latency, ms (delays on one link add up).
    pub delay_ms: u64,
}

impl LinkState {
    /// The state of `link` under `rules`.
    pub fn of(rules: &[LinkRule], link: &str) -> Self {
        let mut state = Self::default();
        for rule in rules.iter().filter(|rule| rule.link == link) {
            match rule.effect {
                LinkEffect::Cut => state.cut = true,
                LinkEffect::Delay { ms } => state.delay_ms = state.delay_ms.saturating_add(ms),
            }
        }
        state
    }
}

impl controllers::book::Rules for LinkRule {
    const FILES: controllers::book::Files = controllers::book::Files {
        book: BOOK_FILE,
        generation: GENERATION_FILE,
        magic: *b"EMULINKS",
        what: "link book",
    };
}

/// The link book of a run directory.
pub type LinkBook = controllers::book::Book<LinkRule>;

/// Why the link book could not be read or changed.
pub type LinkBookError = controllers::book::BookError;

/// Follows the link book of run directory `dir` for `links`: one receiver
/// each, in that order, holding the state loaded now; a task (on the
/// current tokio runtime) keeps them up to date. A book that cannot be
/// opened or read leaves the states as they were (no fault, at first) and is
/// tried again every [`POLL`], saying so in the log once.
pub fn watch(dir: &Path, links: &[String]) -> Vec<channel::Receiver<LinkState>> {
    let mut follower = Follower {
        dir: dir.to_path_buf(),
        book: None,
        loaded: None,
        complained: false,
        links: links.to_vec(),
    };
    let first = follower
        .poll()
        .unwrap_or_else(|| vec![LinkState::default(); links.len()]);
    let (senders, receivers): (Vec<_>, Vec<_>) = first.into_iter().map(channel::channel).unzip();
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(POLL);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            if senders.iter().all(|sender| sender.is_closed()) {
                return;
            }
            if let Some(states) = follower.poll() {
                for ((sender, state), link) in senders.iter().zip(states).zip(&follower.links) {
                    sender.send_if_modified(|now| {
                        if *now == state {
                            return false;
                        }
                        tracing::warn!(%link, cut = state.cut, delay_ms = state.delay_ms, "link fault changed");
                        *now = state;
                        true
                    });
                }
            }
        }
    });
    receivers
}

/// The watcher's view of the book.
struct Follower {
    dir: PathBuf,
    book: Option<LinkBook>,
    /// The generation last loaded.
    loaded: Option<u64>,
    complained: bool,
    links: Vec<String>,
}

impl Follower {
    /// The links' states when the book moved since the last look (None:
    /// unchanged, or unreadable).
    fn poll(&mut self) -> Option<Vec<LinkState>> {
        if self.book.is_none() {
            match LinkBook::open(&self.dir) {
                Ok(book) => self.book = Some(book),
                Err(err) => return self.complain(err),
            }
        }
        let book = self.book.as_ref()?;
        let generation = book.generation();
        if self.loaded == Some(generation) {
            return None;
        }
        match book.rules() {
            Ok(rules) => {
                self.loaded = Some(generation);
                self.complained = false;
                Some(
                    self.links
                        .iter()
                        .map(|link| LinkState::of(&rules, link))
                        .collect(),
                )
            }
            Err(err) => self.complain(err),
        }
    }

    fn complain(&mut self, err: LinkBookError) -> Option<Vec<LinkState>> {
        if !self.complained {
            tracing::error!(%err, "cannot read the link book; link faults keep their last state");
            self.complained = true;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(id: &str, link: &str, effect: LinkEffect) -> LinkRule {
        LinkRule {
            id: id.into(),
            link: link.into(),
            effect,
        }
    }

    #[test]
    fn a_links_state_sums_the_rules_naming_it_and_ignores_the_others() {
        let rules = [
            rule("f1", "s0/c0/nbd", LinkEffect::Delay { ms: 5 }),
            rule("f2", "s0/c0/agent-a", LinkEffect::Cut),
            rule("f3", "s0/c0/nbd", LinkEffect::Delay { ms: 7 }),
        ];
        assert_eq!(
            LinkState::of(&rules, "s0/c0/nbd"),
            LinkState {
                cut: false,
                delay_ms: 12
            }
        );
        assert_eq!(
            LinkState::of(&rules, "s0/c0/agent-a"),
            LinkState {
                cut: true,
                delay_ms: 0
            }
        );
        assert_eq!(LinkState::of(&rules, "s0/c1/nbd"), LinkState::default());
    }

    #[test]
    fn a_change_moves_the_generation_and_round_trips_the_rules() {
        let dir = tempfile::tempdir().expect("tempdir");
        let book = LinkBook::open(dir.path()).expect("open");
        assert_eq!(book.rules().expect("rules"), Vec::new());
        let before = book.generation();
        book.change(|rules| rules.push(rule("f1", "s0/c1/agent-b", LinkEffect::Cut)))
            .expect("change");
        let other = LinkBook::open(dir.path()).expect("open again");
        assert_eq!(other.generation(), before + 1);
        assert_eq!(
            other.rules().expect("rules"),
            vec![rule("f1", "s0/c1/agent-b", LinkEffect::Cut)]
        );
        other
            .change(|rules| rules.retain(|r| r.id != "f1"))
            .expect("clear");
        assert_eq!(book.generation(), before + 2);
        assert!(book.rules().expect("rules").is_empty());
    }

    #[tokio::test]
    async fn the_watcher_loads_at_once_and_follows_changes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let book = LinkBook::open(dir.path()).expect("open");
        book.change(|rules| rules.push(rule("f1", "s0/c0/nbd", LinkEffect::Cut)))
            .expect("change");
        let mut receivers = watch(dir.path(), &["s0/c0/nbd".into(), "s0/c1/nbd".into()]);
        assert!(receivers[0].borrow().cut, "loaded before watch returns");
        assert_eq!(*receivers[1].borrow(), LinkState::default());
        book.change(|rules| {
            rules.clear();
            rules.push(rule("f2", "s0/c1/nbd", LinkEffect::Delay { ms: 9 }));
        })
        .expect("change");
        let bound = std::time::Duration::from_secs(5);
        tokio::time::timeout(bound, receivers[1].wait_for(|s| s.delay_ms == 9))
            .await
            .expect("the delay within the bound")
            .expect("watcher alive");
        tokio::time::timeout(bound, receivers[0].wait_for(|s| !s.cut))
            .await
            .expect("the cut cleared within the bound")
            .expect("watcher alive");
    }
}
