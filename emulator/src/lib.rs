//! The emulator: everything above the disks and arrays, one module per role.
//! Today that is the NBD server that exports disk images and array volumes to
//! real clients ([`nbd`]), the controller processes that split rebuild and
//! scrub ([`controller`]), the write oracle that checks what survives a crash
//! ([`workload`]), and the command line ([`cli`]). The processes of the
//! management plane (supervisor, driver, agents, servers), their persistent
//! data, the HTTP API and the scenario runner will each get a module here too
//! (see `ARCHITECTURE.md`).

pub mod agent;
pub mod attach;
pub mod cli;
pub mod client;
pub mod controller;
pub mod domain;
pub mod driver;
pub mod fault;
pub mod link;
pub mod nbd;
pub mod persist;
pub mod rundir;
pub mod scenario;
pub mod server;
pub mod supervisor;
pub mod task;
pub mod workload;
