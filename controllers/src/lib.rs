//! Controllers: what the two controllers of a server system do together with the
//! disks they share. Today that is the task coordination object through which
//! controllers split long tasks (rebuild, scrub, resync) into partitions and
//! claim them ([`coordination`]). RAID arrays, volumes, rebuild and scrub will be
//! built on it (see `ARCHITECTURE.md`).
//!
//! This crate sits on `disk-images` and never depends on the emulator's
//! processes or protocols.

pub mod coordination;
