//! The NBD wire format: constants and pure encode/decode functions, no I/O.
//!
//! Everything on the wire is big-endian. The layouts (from `doc/proto.md` of the
//! NetworkBlockDevice/nbd repository):
//!
//! | message                | layout                                                                  |
//! |------------------------|-------------------------------------------------------------------------|
//! | server greeting        | u64 `NBDMAGIC`, u64 `IHAVEOPT`, u16 handshake flags                      |
//! | client flags           | u32                                                                     |
//! | option request         | u64 `IHAVEOPT`, u32 option, u32 length, `length` bytes                   |
//! | option reply           | u64 `0x0003e889045565a9`, u32 option, u32 reply type, u32 length, data   |
//! | EXPORT_NAME answer     | u64 size, u16 transmission flags, 124 zero bytes unless NO_ZEROES        |
//! | request (28 bytes)     | u32 `0x25609513`, u16 flags, u16 type, u64 cookie, u64 offset, u32 length |
//! | simple reply (16)      | u32 `0x67446698`, u32 error, u64 cookie (then READ data on success)      |
//! | structured chunk (20)  | u32 `0x668e33ef`, u16 flags, u16 type, u64 cookie, u32 length, payload   |

/// `NBDMAGIC`.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the option magic.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of option replies.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of transmission requests.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of simple replies.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of structured reply chunks.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flag: fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: no zero padding after EXPORT_NAME.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: fixed newstyle.
pub const CLIENT_FLAG_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: no zeroes.
pub const CLIENT_FLAG_NO_ZEROES: u32 = 1 << 1;

/// Option codes.
pub mod option {
    pub const EXPORT_NAME: u32 = 1;
    pub const ABORT: u32 = 2;
    pub const LIST: u32 = 3;
    pub const STARTTLS: u32 = 5;
    pub const INFO: u32 = 6;
    pub const GO: u32 = 7;
    pub const STRUCTURED_REPLY: u32 = 8;
    pub const LIST_META_CONTEXT: u32 = 9;
    pub const SET_META_CONTEXT: u32 = 10;
}

/// Option reply types.
pub mod reply {
    pub const ACK: u32 = 1;
    pub const SERVER: u32 = 2;
    pub const INFO: u32 = 3;
    pub const META_CONTEXT: u32 = 4;
    pub const ERR_UNSUP: u32 = 0x8000_0001;
    pub const ERR_POLICY: u32 = 0x8000_0002;
    pub const ERR_INVALID: u32 = 0x8000_0003;
    pub const ERR_UNKNOWN: u32 = 0x8000_0006;
    pub const ERR_SHUTDOWN: u32 = 0x8000_0007;
    pub const ERR_TOO_BIG: u32 = 0x8000_0009;
}

/// `NBD_INFO_*` types.
pub mod info {
    pub const EXPORT: u16 = 0;
    pub const NAME: u16 = 1;
    pub const DESCRIPTION: u16 = 2;
    pub const BLOCK_SIZE: u16 = 3;
}

/// Transmission flags.
pub mod tflag {
    pub const HAS_FLAGS: u16 = 1 << 0;
    pub const READ_ONLY: u16 = 1 << 1;
    pub const SEND_FLUSH: u16 = 1 << 2;
    pub const SEND_FUA: u16 = 1 << 3;
    pub const SEND_TRIM: u16 = 1 << 5;
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    pub const SEND_DF: u16 = 1 << 7;
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    pub const SEND_CACHE: u16 = 1 << 10;
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Command types.
pub mod cmd {
    pub const READ: u16 = 0;
    pub const WRITE: u16 = 1;
    pub const DISC: u16 = 2;
    pub const FLUSH: u16 = 3;
    pub const TRIM: u16 = 4;
    pub const CACHE: u16 = 5;
    pub const WRITE_ZEROES: u16 = 6;
    pub const BLOCK_STATUS: u16 = 7;
}

/// Command flags.
pub mod cflag {
    pub const FUA: u16 = 1 << 0;
    pub const NO_HOLE: u16 = 1 << 1;
    pub const DF: u16 = 1 << 2;
    pub const REQ_ONE: u16 = 1 << 3;
    pub const FAST_ZERO: u16 = 1 << 4;
}

/// Transmission error values.
pub mod errno {
    pub const EPERM: u32 = 1;
    pub const EIO: u32 = 5;
    pub const EINVAL: u32 = 22;
    pub const ENOSPC: u32 = 28;
    pub const EOVERFLOW: u32 = 75;
    pub const ENOTSUP: u32 = 95;
    pub const ESHUTDOWN: u32 = 108;
}

/// Structured reply chunk types and flags.
pub mod chunk {
    pub const FLAG_DONE: u16 = 1 << 0;
    pub const NONE: u16 = 0;
    pub const OFFSET_DATA: u16 = 1;
    pub const BLOCK_STATUS: u16 = 5;
    pub const ERROR: u16 = (1 << 15) + 1;
    pub const ERROR_OFFSET: u16 = (1 << 15) + 2;
}

/// `base:allocation` status flags.
pub mod state {
    pub const HOLE: u32 = 1 << 0;
    pub const ZERO: u32 = 1 << 1;
}

/// The one metadata context this server offers.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Bytes in a request header.
pub const REQUEST_LEN: usize = 28;
/// Bytes in a structured reply chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;
/// Bytes in a simple reply.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// The longest string (export name, query) the spec allows.
pub const MAX_STRING_LEN: usize = 4096;

/// A decoded transmission request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// Command type.
    pub command: u16,
    /// Opaque cookie echoed in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub length: u32,
}

impl Request {
    /// Encodes the header (used by tests and the fuzz harness).
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut out = [0u8; REQUEST_LEN];
        out[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.command.to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset.to_be_bytes());
        out[24..28].copy_from_slice(&self.length.to_be_bytes());
        out
    }

    /// Decodes a header; `Err` carries the bad magic.
    pub fn decode(bytes: &[u8; REQUEST_LEN]) -> Result<Self, u32> {
        let mut reader = Reader::new(bytes);
        // The reader cannot run short on a fixed 28-byte array.
        let magic = reader.u32().unwrap_or_default();
        if magic != REQUEST_MAGIC {
            return Err(magic);
        }
        Ok(Self {
            flags: reader.u16().unwrap_or_default(),
            command: reader.u16().unwrap_or_default(),
            cookie: reader.u64().unwrap_or_default(),
            offset: reader.u64().unwrap_or_default(),
            length: reader.u32().unwrap_or_default(),
        })
    }
}

/// A cursor over untrusted bytes that reports running short instead of panicking.
#[derive(Debug)]
pub struct Reader<'a> {
    bytes: &'a [u8],
}

/// The payload ended before a field did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Short;

impl<'a> Reader<'a> {
    /// Reads from `bytes`.
    pub fn new(bytes: &'a [u8]) -> Self {
        Self { bytes }
    }

    /// Bytes not yet read.
    pub fn remaining(&self) -> usize {
        self.bytes.len()
    }

    /// Takes `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], Short> {
        if self.bytes.len() < n {
            return Err(Short);
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], Short> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    /// A big-endian u16.
    pub fn u16(&mut self) -> Result<u16, Short> {
        self.array().map(u16::from_be_bytes)
    }

    /// A big-endian u32.
    pub fn u32(&mut self) -> Result<u32, Short> {
        self.array().map(u32::from_be_bytes)
    }

    /// A big-endian u64.
    pub fn u64(&mut self) -> Result<u64, Short> {
        self.array().map(u64::from_be_bytes)
    }
}

/// Why an option payload was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptionPayloadError {
    /// Lengths inside the payload do not add up.
    Malformed(&'static str),
    /// A string longer than the spec allows.
    TooLong,
    /// A string that is not UTF-8 or contains NUL.
    BadString,
}

fn string(bytes: &[u8]) -> Result<String, OptionPayloadError> {
    if bytes.len() > MAX_STRING_LEN {
        return Err(OptionPayloadError::TooLong);
    }
    if bytes.contains(&0) {
        return Err(OptionPayloadError::BadString);
    }
    String::from_utf8(bytes.to_vec()).map_err(|_| OptionPayloadError::BadString)
}

/// An `NBD_OPT_INFO` / `NBD_OPT_GO` payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// Export name (empty: the default export).
    pub name: String,
    /// `NBD_INFO_*` types requested.
    pub requests: Vec<u16>,
}

/// Parses an `NBD_OPT_INFO` / `NBD_OPT_GO` payload.
pub fn parse_info_request(payload: &[u8]) -> Result<InfoRequest, OptionPayloadError> {
    let mut reader = Reader::new(payload);
    let malformed = |_| OptionPayloadError::Malformed("export name length runs past the option");
    let name_len = reader.u32().map_err(malformed)? as usize;
    let name = string(reader.take(name_len).map_err(malformed)?)?;
    let count = reader
        .u16()
        .map_err(|_| OptionPayloadError::Malformed("missing info request count"))?
        as usize;
    if reader.remaining() != count * 2 {
        return Err(OptionPayloadError::Malformed(
            "info request count does not match the option length",
        ));
    }
    let requests = (0..count)
        .map(|_| reader.u16().unwrap_or_default())
        .collect();
    Ok(InfoRequest { name, requests })
}

/// An `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT` payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    /// Export name.
    pub name: String,
    /// Query strings.
    pub queries: Vec<String>,
}

/// Parses a meta-context option payload.
pub fn parse_meta_context_request(
    payload: &[u8],
) -> Result<MetaContextRequest, OptionPayloadError> {
    let mut reader = Reader::new(payload);
    let malformed = |what| move |_| OptionPayloadError::Malformed(what);
    let name_len = reader
        .u32()
        .map_err(malformed("missing export name length"))? as usize;
    let name = string(
        reader
            .take(name_len)
            .map_err(malformed("export name length runs past the option"))?,
    )?;
    let count = reader.u32().map_err(malformed("missing query count"))? as usize;
    // Each query needs at least its 4-byte length: bound the allocation by the payload.
    if count > reader.remaining() / 4 {
        return Err(OptionPayloadError::Malformed(
            "query count exceeds the option length",
        ));
    }
    let mut queries = Vec::with_capacity(count);
    for _ in 0..count {
        let len = reader
            .u32()
            .map_err(malformed("query length runs past the option"))? as usize;
        queries.push(string(
            reader
                .take(len)
                .map_err(malformed("query runs past the option"))?,
        )?);
    }
    if reader.remaining() != 0 {
        return Err(OptionPayloadError::Malformed(
            "trailing bytes after the last query",
        ));
    }
    Ok(MetaContextRequest { name, queries })
}

/// Appends an option reply.
pub fn encode_option_reply(out: &mut Vec<u8>, option: u32, reply_type: u32, data: &[u8]) {
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// Appends a simple reply header.
pub fn encode_simple_reply(out: &mut Vec<u8>, error: u32, cookie: u64) {
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
}

/// Appends a structured reply chunk header.
pub fn encode_chunk_header(
    out: &mut Vec<u8>,
    flags: u16,
    chunk_type: u16,
    cookie: u64,
    length: u32,
) {
    out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&chunk_type.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&length.to_be_bytes());
}

/// Appends a final structured error chunk; with `offset`, an `ERROR_OFFSET` chunk.
pub fn encode_error_chunk(
    out: &mut Vec<u8>,
    cookie: u64,
    error: u32,
    message: &str,
    offset: Option<u64>,
) {
    let message = &message.as_bytes()[..message.len().min(MAX_STRING_LEN)];
    let (chunk_type, extra) = match offset {
        Some(_) => (chunk::ERROR_OFFSET, 8),
        None => (chunk::ERROR, 0),
    };
    encode_chunk_header(
        out,
        chunk::FLAG_DONE,
        chunk_type,
        cookie,
        (6 + message.len() + extra) as u32,
    );
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(message.len() as u16).to_be_bytes());
    out.extend_from_slice(message);
    if let Some(offset) = offset {
        out.extend_from_slice(&offset.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn request_round_trips(flags: u16, command: u16, cookie: u64, offset: u64, length: u32) {
            let request = Request { flags, command, cookie, offset, length };
            prop_assert_eq!(Request::decode(&request.encode()), Ok(request));
        }

        #[test]
        fn bad_magic_is_reported(magic: u32, rest in proptest::array::uniform24(any::<u8>())) {
            prop_assume!(magic != REQUEST_MAGIC);
            let mut bytes = [0u8; REQUEST_LEN];
            bytes[0..4].copy_from_slice(&magic.to_be_bytes());
            bytes[4..].copy_from_slice(&rest);
            prop_assert_eq!(Request::decode(&bytes), Err(magic));
        }

        #[test]
        fn info_request_round_trips(name in "[a-z0-9/._-]{0,40}", requests in proptest::collection::vec(any::<u16>(), 0..8)) {
            let mut payload = Vec::new();
            payload.extend_from_slice(&(name.len() as u32).to_be_bytes());
            payload.extend_from_slice(name.as_bytes());
            payload.extend_from_slice(&(requests.len() as u16).to_be_bytes());
            for r in &requests {
                payload.extend_from_slice(&r.to_be_bytes());
            }
            prop_assert_eq!(parse_info_request(&payload), Ok(InfoRequest { name, requests }));
        }

        #[test]
        fn meta_context_round_trips(name in "[a-z]{0,10}", queries in proptest::collection::vec("[a-z:]{0,20}", 0..5)) {
            let mut payload = Vec::new();
            payload.extend_from_slice(&(name.len() as u32).to_be_bytes());
            payload.extend_from_slice(name.as_bytes());
            payload.extend_from_slice(&(queries.len() as u32).to_be_bytes());
            for q in &queries {
                payload.extend_from_slice(&(q.len() as u32).to_be_bytes());
                payload.extend_from_slice(q.as_bytes());
            }
            prop_assert_eq!(parse_meta_context_request(&payload), Ok(MetaContextRequest { name, queries }));
        }

        #[test]
        fn option_parsers_never_panic(payload in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = parse_info_request(&payload);
            let _ = parse_meta_context_request(&payload);
        }
    }

    #[test]
    fn info_request_with_lying_name_length_is_malformed() {
        let payload = [0, 0, 0, 10, b'a', 0, 0];
        assert!(matches!(
            parse_info_request(&payload),
            Err(OptionPayloadError::Malformed(_))
        ));
    }

    #[test]
    fn huge_query_count_does_not_allocate() {
        let payload = [0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            parse_meta_context_request(&payload),
            Err(OptionPayloadError::Malformed(_))
        ));
    }

    #[test]
    fn error_chunk_layout() {
        let mut out = Vec::new();
        encode_error_chunk(&mut out, 7, errno::EIO, "bad", Some(4096));
        assert_eq!(out.len(), CHUNK_HEADER_LEN + 6 + 3 + 8);
        assert_eq!(&out[0..4], &STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&out[4..6], &chunk::FLAG_DONE.to_be_bytes());
        assert_eq!(&out[6..8], &chunk::ERROR_OFFSET.to_be_bytes());
        assert_eq!(&out[16..20], &17u32.to_be_bytes());
        assert_eq!(&out[20..24], &5u32.to_be_bytes());
    }
}
