//! The Linux kernel's NBD generic-netlink interface (`include/uapi/linux/
//! nbd-netlink.h`), the part `emulator attach` needs: connect a device to a
//! socket with a request timeout and a dead-connection timeout, hand it a new
//! socket after its connection died (`NBD_CMD_RECONFIGURE`), and disconnect
//! it. Messages are built by hand (a netlink header, a generic-netlink header,
//! then attributes, each 4-byte aligned); the encoding is pure and unit-tested,
//! the socket is a plain `AF_NETLINK`/`NETLINK_GENERIC` one.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

const NETLINK_GENERIC: i32 = 16;
const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const CTRL_ATTR_MCAST_GROUPS: u16 = 7;
const CTRL_ATTR_MCAST_GRP_NAME: u16 = 1;
const CTRL_ATTR_MCAST_GRP_ID: u16 = 2;
const SOL_NETLINK: i32 = 270;
const NETLINK_ADD_MEMBERSHIP: i32 = 1;
/// The nbd family's multicast group (link-dead notices).
const NBD_MCAST_GROUP: &[u8] = b"nbd_mc_group";
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLMSG_ERROR: u16 = 2;
const NLA_F_NESTED: u16 = 1 << 15;
const NBD_GENL_VERSION: u8 = 1;

/// `NBD_CMD_*` of the nbd family.
pub mod cmd {
    /// Configure a device with sockets.
    pub const CONNECT: u8 = 1;
    /// Disconnect a device.
    pub const DISCONNECT: u8 = 2;
    /// Give a configured device new sockets for dead ones.
    pub const RECONFIGURE: u8 = 3;
    /// Multicast by the kernel when it marks a device's connection dead.
    pub const LINK_DEAD: u8 = 4;
}

/// `NBD_ATTR_*` of the nbd family.
mod attr {
    pub const INDEX: u16 = 1;
    pub const SIZE_BYTES: u16 = 2;
    pub const BLOCK_SIZE_BYTES: u16 = 3;
    pub const TIMEOUT: u16 = 4;
    pub const SERVER_FLAGS: u16 = 5;
    pub const SOCKETS: u16 = 7;
    pub const DEAD_CONN_TIMEOUT: u16 = 8;
    pub const SOCK_ITEM: u16 = 1;
    pub const SOCK_FD: u16 = 1;
}

/// What a device is configured with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceConfig {
    /// `/dev/nbdN`'s N.
    pub index: u32,
    /// Export size.
    pub size: u64,
    /// Logical block size.
    pub block_size: u64,
    /// The export's transmission flags.
    pub server_flags: u64,
    /// Seconds before a request in flight is given up on its connection (the
    /// kernel then marks the connection dead and requeues the request for
    /// the next one).
    pub timeout_s: u64,
    /// Seconds the kernel holds requests while no connection is alive,
    /// waiting for a new socket.
    pub dead_conn_timeout_s: u64,
}

/// Appends one attribute (header, payload, padding to 4 bytes).
fn put(out: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    out.extend_from_slice(&(len as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(payload);
    out.resize(out.len().next_multiple_of(4), 0);
}

/// Appends a nested attribute built by `inner`.
fn nest(out: &mut Vec<u8>, kind: u16, inner: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&[0u8; 4]);
    inner(out);
    let len = (out.len() - start) as u16;
    out[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    out[start + 2..start + 4].copy_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
}

fn sockets(out: &mut Vec<u8>, fd: RawFd) {
    nest(out, attr::SOCKETS, |out| {
        nest(out, attr::SOCK_ITEM, |out| {
            put(out, attr::SOCK_FD, &(fd as u32).to_ne_bytes())
        })
    });
}

/// A whole netlink message: `nlmsghdr`, `genlmsghdr`, attributes.
fn message(family: u16, command: u8, version: u8, seq: u32, attrs: &[u8]) -> Vec<u8> {
    let len = 16 + 4 + attrs.len();
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&(len as u32).to_ne_bytes());
    out.extend_from_slice(&family.to_ne_bytes());
    out.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    out.extend_from_slice(&[command, version, 0, 0]);
    out.extend_from_slice(attrs);
    out
}

/// The attributes of `NBD_CMD_CONNECT`.
pub fn connect_attrs(config: &DeviceConfig, fd: RawFd) -> Vec<u8> {
    let mut out = Vec::new();
    put(&mut out, attr::INDEX, &config.index.to_ne_bytes());
    put(&mut out, attr::SIZE_BYTES, &config.size.to_ne_bytes());
    put(
        &mut out,
        attr::BLOCK_SIZE_BYTES,
        &config.block_size.to_ne_bytes(),
    );
    put(
        &mut out,
        attr::SERVER_FLAGS,
        &config.server_flags.to_ne_bytes(),
    );
    put(&mut out, attr::TIMEOUT, &config.timeout_s.to_ne_bytes());
    put(
        &mut out,
        attr::DEAD_CONN_TIMEOUT,
        &config.dead_conn_timeout_s.to_ne_bytes(),
    );
    sockets(&mut out, fd);
    out
}

/// The attributes of `NBD_CMD_RECONFIGURE` (a new socket for device `index`).
pub fn reconfigure_attrs(index: u32, fd: RawFd) -> Vec<u8> {
    let mut out = Vec::new();
    put(&mut out, attr::INDEX, &index.to_ne_bytes());
    sockets(&mut out, fd);
    out
}

/// The attributes of `NBD_CMD_DISCONNECT`.
pub fn disconnect_attrs(index: u32) -> Vec<u8> {
    let mut out = Vec::new();
    put(&mut out, attr::INDEX, &index.to_ne_bytes());
    out
}

/// Attributes of a reply: (kind without flags, payload).
fn parse_attrs(mut bytes: &[u8]) -> Vec<(u16, &[u8])> {
    let mut attrs = Vec::new();
    while bytes.len() >= 4 {
        let len = u16::from_ne_bytes([bytes[0], bytes[1]]) as usize;
        let kind = u16::from_ne_bytes([bytes[2], bytes[3]]) & !NLA_F_NESTED;
        if len < 4 || len > bytes.len() {
            break;
        }
        attrs.push((kind, &bytes[4..len]));
        bytes = &bytes[len.next_multiple_of(4).min(bytes.len())..];
    }
    attrs
}

/// The multicast group id named `name` in a family description's
/// attributes.
fn multicast_group(attrs: &[u8], name: &[u8]) -> Option<u32> {
    let groups = parse_attrs(attrs)
        .into_iter()
        .find(|(kind, _)| *kind == CTRL_ATTR_MCAST_GROUPS)?
        .1;
    parse_attrs(groups).into_iter().find_map(|(_, group)| {
        let fields = parse_attrs(group);
        let named = fields.iter().any(|(kind, value)| {
            *kind == CTRL_ATTR_MCAST_GRP_NAME && value.split(|b| *b == 0).next() == Some(name)
        });
        let id = fields
            .iter()
            .find(|(kind, value)| *kind == CTRL_ATTR_MCAST_GRP_ID && value.len() >= 4)
            .map(|(_, value)| u32::from_ne_bytes([value[0], value[1], value[2], value[3]]));
        named.then_some(id).flatten()
    })
}

/// Opens an `AF_NETLINK`/`NETLINK_GENERIC` socket.
fn generic_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; the returned descriptor is
    // checked and then owned by the OwnedFd alone.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            NETLINK_GENERIC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Link-dead notices from the kernel: a socket in the nbd multicast group.
#[derive(Debug)]
pub struct LinkDeadNotices {
    socket: OwnedFd,
    family: u16,
}

impl LinkDeadNotices {
    /// Waits up to `timeout` for a notice that device `index`'s connection
    /// was marked dead (the kernel sends it after marking it, so a new socket
    /// given then is taken). True if one came.
    pub fn wait(&self, index: u32, timeout: std::time::Duration) -> io::Result<bool> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use std::os::fd::AsFd;
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let mut fds = [PollFd::new(self.socket.as_fd(), PollFlags::POLLIN)];
            let ready = poll(
                &mut fds,
                PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX),
            )
            .map_err(io::Error::from)?;
            if ready == 0 {
                return Ok(false);
            }
            let mut buffer = vec![0u8; 8192];
            // SAFETY: recv writes at most `buffer.len()` bytes into `buffer`.
            let got = unsafe {
                libc::recv(
                    self.socket.as_raw_fd(),
                    buffer.as_mut_ptr().cast(),
                    buffer.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if got < 0 {
                let err = io::Error::last_os_error();
                if matches!(
                    err.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                ) {
                    continue;
                }
                return Err(err);
            }
            if link_dead_for(&buffer[..got as usize], self.family, index) {
                return Ok(true);
            }
        }
    }
}

/// Whether the netlink messages in `bytes` include a LINK_DEAD of device
/// `index` from family `family`.
fn link_dead_for(mut bytes: &[u8], family: u16, index: u32) -> bool {
    while bytes.len() >= 20 {
        let len = u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
        let kind = u16::from_ne_bytes([bytes[4], bytes[5]]);
        if len < 20 || len > bytes.len() {
            return false;
        }
        let body = &bytes[16..len];
        if kind == family && body[0] == cmd::LINK_DEAD {
            let dead = parse_attrs(&body[4..]).into_iter().any(|(kind, value)| {
                kind == attr::INDEX
                    && value.len() >= 4
                    && u32::from_ne_bytes([value[0], value[1], value[2], value[3]]) == index
            });
            if dead {
                return true;
            }
        }
        bytes = &bytes[len.next_multiple_of(4).min(bytes.len())..];
    }
    false
}

/// A generic-netlink socket talking to the kernel's nbd family.
#[derive(Debug)]
pub struct NbdNetlink {
    socket: OwnedFd,
    family: u16,
    seq: u32,
    /// The family's multicast group of link-dead notices.
    group: Option<u32>,
}

impl NbdNetlink {
    /// Opens the socket and looks up the nbd family (absent: the nbd module
    /// is not loaded).
    pub fn open() -> io::Result<Self> {
        let mut netlink = Self {
            socket: generic_socket()?,
            family: GENL_ID_CTRL,
            seq: 0,
            group: None,
        };
        let mut name = Vec::new();
        put(&mut name, CTRL_ATTR_FAMILY_NAME, b"nbd\0");
        let reply = netlink
            .request(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 1, &name)
            .map_err(|err| {
                io::Error::new(
                    err.kind(),
                    format!("the kernel has no nbd netlink family (is the nbd module loaded? modprobe nbd): {err}"),
                )
            })?;
        let family = parse_attrs(&reply)
            .into_iter()
            .find(|(kind, payload)| *kind == CTRL_ATTR_FAMILY_ID && payload.len() >= 2)
            .map(|(_, payload)| u16::from_ne_bytes([payload[0], payload[1]]))
            .ok_or_else(|| io::Error::other("no family id in the nbd family's description"))?;
        netlink.family = family;
        netlink.group = multicast_group(&reply, NBD_MCAST_GROUP);
        Ok(netlink)
    }

    /// Joins the nbd family's multicast group, to hear when the kernel marks a
    /// device's connection dead.
    pub fn link_dead_notices(&self) -> io::Result<LinkDeadNotices> {
        let group = self.group.ok_or_else(|| {
            io::Error::other("the nbd netlink family has no multicast group nbd_mc_group")
        })?;
        let socket = generic_socket()?;
        // Bound first: an unbound netlink socket has port id 0, the kernel's
        // own, and multicasts from the kernel skip that id.
        // SAFETY: `sockaddr_nl` is plain data; zeroed is valid (port id 0:
        // the kernel picks one); bind reads exactly `size_of` bytes of it.
        let bound = unsafe {
            let mut address: libc::sockaddr_nl = std::mem::zeroed();
            address.nl_family = libc::AF_NETLINK as u16;
            libc::bind(
                socket.as_raw_fd(),
                (&address as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if bound < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: setsockopt reads exactly `size_of::<u32>()` bytes of `group`.
        let joined = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                SOL_NETLINK,
                NETLINK_ADD_MEMBERSHIP,
                (&group as *const u32).cast(),
                std::mem::size_of::<u32>() as u32,
            )
        };
        if joined < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(LinkDeadNotices {
            socket,
            family: self.family,
        })
    }

    /// Sends an nbd-family command and waits for its acknowledgement.
    pub fn command(&mut self, command: u8, attrs: &[u8]) -> io::Result<()> {
        self.request(self.family, command, NBD_GENL_VERSION, attrs)
            .map(|_| ())
    }

    /// Sends a request; returns the attributes of its reply (empty for a bare
    /// acknowledgement), or the kernel's error.
    fn request(
        &mut self,
        family: u16,
        command: u8,
        version: u8,
        attrs: &[u8],
    ) -> io::Result<Vec<u8>> {
        self.seq = self.seq.wrapping_add(1);
        let message = message(family, command, version, self.seq, attrs);
        // SAFETY: `sockaddr_nl` is plain data; zeroed is valid (pid 0: the
        // kernel), and sendto reads exactly `size_of` bytes of it and
        // `message.len()` bytes of the buffer.
        let sent = unsafe {
            let mut kernel: libc::sockaddr_nl = std::mem::zeroed();
            kernel.nl_family = libc::AF_NETLINK as u16;
            libc::sendto(
                self.socket.as_raw_fd(),
                message.as_ptr().cast(),
                message.len(),
                0,
                (&kernel as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut data = Vec::new();
        let mut buffer = vec![0u8; 16384];
        loop {
            // SAFETY: recv writes at most `buffer.len()` bytes into `buffer`.
            let got = unsafe {
                libc::recv(
                    self.socket.as_raw_fd(),
                    buffer.as_mut_ptr().cast(),
                    buffer.len(),
                    0,
                )
            };
            if got < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            let mut rest = &buffer[..got as usize];
            while rest.len() >= 16 {
                let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
                let kind = u16::from_ne_bytes([rest[4], rest[5]]);
                let seq = u32::from_ne_bytes([rest[8], rest[9], rest[10], rest[11]]);
                if len < 16 || len > rest.len() {
                    return Err(io::Error::other("truncated netlink reply"));
                }
                let body = &rest[16..len];
                rest = &rest[len.next_multiple_of(4).min(rest.len())..];
                if seq != self.seq {
                    continue;
                }
                if kind == NLMSG_ERROR {
                    let code = i32::from_ne_bytes([body[0], body[1], body[2], body[3]]);
                    return if code == 0 {
                        Ok(data)
                    } else {
                        Err(io::Error::from_raw_os_error(-code))
                    };
                }
                // A reply with data (genlmsghdr, then attributes); its
                // acknowledgement follows.
                if body.len() >= 4 {
                    data = body[4..].to_vec();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_aligned_and_nested_as_the_kernel_reads_them() {
        let attrs = reconfigure_attrs(3, 9);
        // INDEX: len 8, type 1, u32 3.
        assert_eq!(&attrs[0..8], &[8, 0, 1, 0, 3, 0, 0, 0]);
        // SOCKETS (nested) > SOCK_ITEM (nested) > SOCK_FD u32 9.
        assert_eq!(&attrs[8..12], &[16, 0, 7, 0x80]);
        assert_eq!(&attrs[12..16], &[12, 0, 1, 0x80]);
        assert_eq!(&attrs[16..24], &[8, 0, 1, 0, 9, 0, 0, 0]);
        assert_eq!(attrs.len(), 24);
        let parsed = parse_attrs(&attrs);
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[1].0, attr::SOCKETS);
        let config = DeviceConfig {
            index: 0,
            size: 1 << 30,
            block_size: 4096,
            server_flags: 0x1ff,
            timeout_s: 5,
            dead_conn_timeout_s: 60,
        };
        let connect = connect_attrs(&config, 4);
        let kinds: Vec<u16> = parse_attrs(&connect).iter().map(|(k, _)| *k).collect();
        assert_eq!(kinds, [1, 2, 3, 5, 4, 8, 7]);
        let message = message(0x1c, cmd::CONNECT, 1, 7, &connect);
        assert_eq!(
            u32::from_ne_bytes([message[0], message[1], message[2], message[3]]) as usize,
            message.len()
        );
        assert_eq!(&message[16..20], &[cmd::CONNECT, 1, 0, 0]);
    }

    #[test]
    fn multicast_groups_and_link_dead_notices_are_read() {
        let mut groups = Vec::new();
        nest(&mut groups, CTRL_ATTR_MCAST_GROUPS, |out| {
            nest(out, 1, |out| {
                put(out, CTRL_ATTR_MCAST_GRP_ID, &9u32.to_ne_bytes());
                put(out, CTRL_ATTR_MCAST_GRP_NAME, b"nbd_mc_group\0");
            })
        });
        assert_eq!(multicast_group(&groups, NBD_MCAST_GROUP), Some(9));
        assert_eq!(multicast_group(&groups, b"other"), None);
        let notice = message(0x1c, cmd::LINK_DEAD, 1, 0, &disconnect_attrs(2));
        assert!(link_dead_for(&notice, 0x1c, 2));
        assert!(!link_dead_for(&notice, 0x1c, 0));
        assert!(!link_dead_for(&notice, 0x1d, 2));
    }
}
