//! Controllers: what the two controllers of a server system do together with the
//! disks they share: the RAID engine that turns array I/O into member I/O with
//! redundancy, reconstruction and repair ([`raid`], with RAID-6's Galois-field
//! arithmetic in [`pq`]); arrays on disk, member images plus checksummed metadata
//! and volumes ([`array`]); the live state every process using an array shares,
//! with cross-process stripe locks and crash recovery ([`live`]), and the journal
//! that closes the RAID-5/6 write hole for a process dying mid-write on a degraded
//! array ([`journal`]); the task coordination object through which controllers
//! split rebuild and scrub into partitions and claim them ([`coordination`]); the
//! work of one partition ([`work`]) and what it finds ([`findings`]); the disk
//! faults configured as data ([`faults`]) and the disks' volatile write caches
//! that the power-loss fault loses ([`volatile`]).
//!
//! This crate sits on `disk-images` and never depends on the emulator's
//! processes or protocols.

pub mod array;
pub mod book;
pub mod coordination;
pub mod faults;
pub mod findings;
pub mod journal;
pub mod live;
pub mod member;
pub mod ownership;
pub mod pq;
pub mod raid;
pub mod volatile;
pub mod volume;
pub mod work;
