//! Fuzzes the pure decoders of `proto` and checks round trips:
//!
//! - `Request::decode` on the first 28 bytes (zero-padded): a bad magic is
//!   reported as read; a good one decodes, and encoding gives the bytes back. The
//!   same bytes with the magic forced must always decode and round-trip.
//! - `parse_info_request` and `parse_meta_context_request` on the whole input:
//!   the formats are canonical (no trailing bytes allowed), so whatever parses
//!   must re-encode to exactly the input, with strings that obey the spec.
//! - `encode_error_chunk` with the input as message: the chunk's length field
//!   matches what was written and the message is capped.

#![no_main]

use emulator::nbd::proto::{
    self, parse_info_request, parse_meta_context_request, InfoRequest, MetaContextRequest, Request,
    CHUNK_HEADER_LEN, MAX_STRING_LEN, REQUEST_LEN, REQUEST_MAGIC,
};
use libfuzzer_sys::fuzz_target;

fn check_string(s: &str) {
    assert!(
        s.len() <= MAX_STRING_LEN,
        "string of {} bytes accepted",
        s.len()
    );
    assert!(!s.contains('\0'), "string with NUL accepted: {s:?}");
}

fn encode_info(request: &InfoRequest) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(request.name.len() as u32).to_be_bytes());
    out.extend_from_slice(request.name.as_bytes());
    out.extend_from_slice(&(request.requests.len() as u16).to_be_bytes());
    for info in &request.requests {
        out.extend_from_slice(&info.to_be_bytes());
    }
    out
}

fn encode_meta(request: &MetaContextRequest) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(request.name.len() as u32).to_be_bytes());
    out.extend_from_slice(request.name.as_bytes());
    out.extend_from_slice(&(request.queries.len() as u32).to_be_bytes());
    for query in &request.queries {
        out.extend_from_slice(&(query.len() as u32).to_be_bytes());
        out.extend_from_slice(query.as_bytes());
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let mut header = [0u8; REQUEST_LEN];
    let n = data.len().min(REQUEST_LEN);
    header[..n].copy_from_slice(&data[..n]);
    match Request::decode(&header) {
        Ok(request) => assert_eq!(request.encode(), header),
        Err(magic) => {
            assert_ne!(magic, REQUEST_MAGIC);
            assert_eq!(magic.to_be_bytes(), header[..4]);
        }
    }
    header[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    let request = Request::decode(&header).expect("a header with the request magic decodes");
    assert_eq!(request.encode(), header);

    if let Ok(info) = parse_info_request(data) {
        check_string(&info.name);
        assert_eq!(encode_info(&info), data);
    }
    if let Ok(meta) = parse_meta_context_request(data) {
        check_string(&meta.name);
        meta.queries.iter().for_each(|query| check_string(query));
        assert_eq!(encode_meta(&meta), data);
    }

    let message = String::from_utf8_lossy(data);
    let offset = (data.len() % 2 == 1).then_some(data.len() as u64);
    let mut chunk = Vec::new();
    proto::encode_error_chunk(&mut chunk, 7, proto::errno::EIO, &message, offset);
    let length = u32::from_be_bytes(chunk[16..20].try_into().expect("4 bytes"));
    assert_eq!(chunk.len(), CHUNK_HEADER_LEN + length as usize);
    let message_len = u16::from_be_bytes(chunk[24..26].try_into().expect("2 bytes"));
    assert!(usize::from(message_len) <= MAX_STRING_LEN);
    assert_eq!(
        length as usize,
        6 + usize::from(message_len) + if offset.is_some() { 8 } else { 0 }
    );
});
