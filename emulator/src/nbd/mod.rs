//! The NBD server: wire format ([`proto`]), negotiation on tokio ([`handshake`]),
//! request handling on threads of each connection's own ([`transmission`]),
//! sockets and shutdown ([`server`]), the device trait exports are served
//! from ([`export`]), and the link-fault hook of an address ([`hook`]).
//!
//! The protocol is `doc/proto.md` of the NetworkBlockDevice/nbd repository.

pub mod export;
pub mod handshake;
pub mod hook;
pub mod proto;
pub mod server;
pub mod transmission;

/// Largest READ or WRITE payload served (advertised through `NBD_INFO_BLOCK_SIZE`).
pub const MAX_PAYLOAD_BYTES: u32 = 32 * 1024 * 1024;
