//! The emulator: everything above the disks and arrays. Today that is the NBD
//! server that exports disk images to real clients, and the command line; the
//! processes of the management plane (driver, agents, servers), the HTTP API and
//! the scenario runner will live here too (see `ARCHITECTURE.md`).

pub mod nbd;
pub mod units;
