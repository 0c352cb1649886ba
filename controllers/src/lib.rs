//! Controllers: what the two controllers of a server system do together with the
//! disks they share. Today that is the task coordination object through which
//! controllers split long tasks (rebuild, scrub, resync) into partitions and
//! claim them ([`coordination`]), and the RAID engine that turns array I/O into
//! member I/O with redundancy, reconstruction and repair ([`raid`]), and arrays on
//! disk: member images plus checksummed metadata ([`array`]). Rebuild onto spares
//! and scrub, driven through the coordination object, come next (see
//! `ARCHITECTURE.md`).
//!
//! This crate sits on `disk-images` and never depends on the emulator's
//! processes or protocols.

pub mod array;
pub mod coordination;
pub mod live;
pub mod raid;
pub mod work;
