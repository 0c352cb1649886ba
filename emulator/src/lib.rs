//! The emulator: everything above the disks and arrays. Today that is the NBD
//! server that exports disk images and array volumes to real clients, the
//! controller processes that split rebuild and scrub ([`tasks`]), and the
//! command line. The processes of the management plane (driver, agents,
//! servers), the HTTP API and the scenario runner will live here too (see `ARCHITECTURE.md`).

pub mod nbd;
pub mod tasks;
pub mod units;
