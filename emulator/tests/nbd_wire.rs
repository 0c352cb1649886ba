//! Wire-level tests of the NBD server: start the real `emulator serve` binary on a
//! Unix socket and speak raw protocol bytes to it (see `common` for the client).
//!
//! Expected values come from the NBD protocol (`doc/proto.md`, fixed newstyle, no
//! TLS, no extended headers) and from what this server advertises (block size
//! 1/4096/32 MiB, transmission flags).

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;

// ---------------------------------------------------------------------------
// Handshake
// ---------------------------------------------------------------------------

fn list_names(replies: &[OptReply]) -> Vec<String> {
    let (last, servers) = replies.split_last().expect("a final reply");
    assert_eq!(last.kind, REP_ACK, "LIST must end with ACK: {replies:?}");
    assert_eq!(last.data, b"", "ACK carries no data");
    servers
        .iter()
        .map(|reply| {
            assert_eq!(reply.kind, REP_SERVER, "{reply:?}");
            let len = be32(&reply.data[0..4]) as usize;
            assert!(len <= reply.data.len() - 4, "name length past the reply");
            String::from_utf8(reply.data[4..4 + len].to_vec()).expect("UTF-8 export name")
        })
        .collect()
}

/// The INFO replies of an INFO/GO answer, by type; checks they precede one ACK and
/// that no type is repeated.
fn infos(replies: &[OptReply]) -> HashMap<u16, Vec<u8>> {
    let (last, infos) = replies.split_last().expect("a final reply");
    assert_eq!(last.kind, REP_ACK, "expected success: {replies:?}");
    assert_eq!(last.data, b"");
    let mut by_type = HashMap::new();
    for reply in infos {
        assert_eq!(reply.kind, REP_INFO, "{reply:?}");
        assert!(reply.data.len() >= 2, "{reply:?}");
        let kind = be16(&reply.data[0..2]);
        let previous = by_type.insert(kind, reply.data[2..].to_vec());
        assert!(
            previous.is_none(),
            "info type {kind} sent twice: {replies:?}"
        );
    }
    by_type
}

fn check_export_and_block_size(replies: &[OptReply], flags: u16) {
    let infos = infos(replies);
    let export = infos
        .get(&INFO_EXPORT)
        .expect("NBD_INFO_EXPORT is mandatory");
    // Reply length 12 = 2 type bytes + u64 size + u16 flags.
    assert_eq!(export.len(), 10, "NBD_INFO_EXPORT length");
    assert_eq!(be64(&export[0..8]), IMAGE_SIZE, "export size");
    assert_eq!(be16(&export[8..10]), flags, "transmission flags");
    let block = infos.get(&INFO_BLOCK_SIZE).expect("NBD_INFO_BLOCK_SIZE");
    assert_eq!(block.len(), 12, "NBD_INFO_BLOCK_SIZE length (14 with type)");
    assert_eq!(be32(&block[0..4]), 1, "minimum block size");
    assert_eq!(be32(&block[4..8]), 4096, "preferred block size");
    assert_eq!(be32(&block[8..12]), 33_554_432, "maximum block size");
}

/// Proves a connection in transmission still works: a successful small READ.
fn assert_alive(conn: &mut Conn) {
    assert_eq!(conn.read(0, 512).len(), 512);
}

#[test]
fn greeting_is_fixed_newstyle_with_no_zeroes() {
    let server = Server::start();
    let mut conn = server.connect();
    let greeting = conn.recv(18);
    assert_eq!(&greeting[0..8], b"NBDMAGIC");
    assert_eq!(&greeting[8..16], b"IHAVEOPT");
    assert_eq!(
        &greeting[16..18],
        &[0x00, 0x03],
        "FIXED_NEWSTYLE | NO_ZEROES"
    );
}

#[test]
fn unknown_client_flags_close_the_connection() {
    let server = Server::start();
    let mut conn = server.connect();
    conn.start_handshake(C_FIXED_NEWSTYLE | 0x8000_0000);
    conn.expect_closed();
}

#[test]
fn bad_option_magic_closes_the_connection() {
    let server = Server::start();
    let mut conn = server.connect();
    conn.start_handshake(C_FIXED_NEWSTYLE);
    let mut bad = Vec::new();
    bad.extend_from_slice(&0x4948_4156_454f_5055u64.to_be_bytes());
    bad.extend_from_slice(&OPT_LIST.to_be_bytes());
    bad.extend_from_slice(&0u32.to_be_bytes());
    conn.send(&bad);
    conn.expect_closed();
}

#[test]
fn unknown_option_is_unsupported_and_the_next_option_parses() {
    let server = Server::start();
    let mut conn = server.connect();
    conn.start_handshake(C_FIXED_NEWSTYLE);
    // With data, which the server must skip to parse the next option.
    let reply = conn.option_single(99, b"some option data");
    assert_eq!(reply.option, 99, "echoes the option");
    assert_eq!(reply.kind, REP_ERR_UNSUP);
    let names = list_names(&conn.option(OPT_LIST, &[]));
    assert_eq!(names, [EXPORT]);
}

#[test]
fn starttls_is_refused_by_policy_and_the_handshake_continues() {
    let server = Server::start();
    let mut conn = server.connect();
    conn.start_handshake(C_FIXED_NEWSTYLE);
    let reply = conn.option_single(OPT_STARTTLS, &[]);
    assert_eq!(reply.option, OPT_STARTTLS);
    assert_eq!(reply.kind, REP_ERR_POLICY);
    conn.go();
    assert_alive(&mut conn);
}

#[test]
fn list_with_data_is_invalid_then_list_names_the_export() {
    let server = Server::start();
    let mut conn = server.connect();
    conn.start_handshake(C_FIXED_NEWSTYLE);
    let reply = conn.option_single(OPT_LIST, b"junk");
    assert_eq!(reply.option, OPT_LIST);
    assert_eq!(reply.kind, REP_ERR_INVALID);
    let replies = conn.option(OPT_LIST, &[]);
    assert_eq!(replies.len(), 2, "one SERVER then ACK: {replies:?}");
    assert_eq!(list_names(&replies), [EXPORT]);
    assert_eq!(replies[0].option, OPT_LIST);
}

#[test]
fn abort_is_acknowledged_then_the_connection_closes() {
    let server = Server::start();
    let mut conn = server.connect();
    conn.start_handshake(C_FIXED_NEWSTYLE | C_NO_ZEROES);
    let reply = conn.option_single(OPT_ABORT, &[]);
    assert_eq!(
        reply,
        OptReply {
            option: OPT_ABORT,
            kind: REP_ACK,
            data: Vec::new()
        }
    );
    conn.expect_closed();
}

#[test]
fn info_for_an_unknown_export_fails_then_go_succeeds() {
    let server = Server::start();
    let mut conn = server.connect();
    conn.start_handshake(C_FIXED_NEWSTYLE);
    let replies = conn.option(OPT_INFO, &info_payload("no-such-export", &[]));
    assert_eq!(replies.len(), 1, "no INFO before the error: {replies:?}");
    assert_eq!(replies[0].option, OPT_INFO);
    assert_eq!(replies[0].kind, REP_ERR_UNKNOWN);
    let replies = conn.option(OPT_GO, &info_payload("no-such-export", &[]));
    assert_eq!(replies.len(), 1, "{replies:?}");
    assert_eq!(replies[0].kind, REP_ERR_UNKNOWN);
    let replies = conn.option(OPT_GO, &info_payload(EXPORT, &[]));
    check_export_and_block_size(&replies, TFLAGS_RW);
    assert_alive(&mut conn);
}

#[test]
fn info_and_go_report_export_and_block_size() {
    let server = Server::start();
    let mut conn = server.connect();
    conn.start_handshake(C_FIXED_NEWSTYLE);
    let payload = info_payload(EXPORT, &[INFO_BLOCK_SIZE]);
    let info = conn.option(OPT_INFO, &payload);
    check_export_and_block_size(&info, TFLAGS_RW);
    // INFO then GO with the same parameters must give the same information.
    let go = conn.option(OPT_GO, &payload);
    check_export_and_block_size(&go, TFLAGS_RW);
    assert_eq!(infos(&info), infos(&go));
    assert!(go.iter().all(|reply| reply.option == OPT_GO));
    // No padding after GO's ACK: the next bytes are the READ's reply.
    assert_alive(&mut conn);
}

#[test]
fn info_and_go_with_structured_replies_advertise_df() {
    let server = Server::start();
    let mut conn = server.connect();
    conn.start_handshake(C_FIXED_NEWSTYLE);
    conn.structured_reply();
    // Without a BLOCK_SIZE request, and for the default (empty-named) export.
    let info = conn.option(OPT_INFO, &info_payload("", &[]));
    check_export_and_block_size(&info, TFLAGS_RW | TFLAG_SEND_DF);
    let go = conn.option(OPT_GO, &info_payload("", &[]));
    check_export_and_block_size(&go, TFLAGS_RW | TFLAG_SEND_DF);
    assert_alive(&mut conn);
}

#[test]
fn info_returns_name_and_description_when_asked() {
    let server = Server::start();
    let mut conn = server.connect();
    conn.start_handshake(C_FIXED_NEWSTYLE);
    // Unknown info types (0x7777) must be ignored. Asking by the empty name
    // returns the canonical name.
    for name in [EXPORT, ""] {
        let replies = conn.option(
            OPT_INFO,
            &info_payload(name, &[INFO_NAME, 0x7777, INFO_DESCRIPTION]),
        );
        check_export_and_block_size(&replies, TFLAGS_RW);
        let infos = infos(&replies);
        assert_eq!(
            infos.get(&INFO_NAME).map(Vec::as_slice),
            Some(EXPORT.as_bytes())
        );
        let description = infos.get(&INFO_DESCRIPTION).expect("NBD_INFO_DESCRIPTION");
        let description = std::str::from_utf8(description).expect("UTF-8 description");
        assert!(!description.is_empty() && description.len() <= 4096);
        assert!(!description.contains('\0'));
        assert!(!infos.contains_key(&0x7777));
    }
    // Not asked: not sent.
    let replies = conn.option(OPT_INFO, &info_payload(EXPORT, &[]));
    let infos = infos(&replies);
    assert!(!infos.contains_key(&INFO_NAME) && !infos.contains_key(&INFO_DESCRIPTION));
}

#[test]
fn malformed_go_payload_is_invalid_and_the_handshake_continues() {
    let server = Server::start();
    let mut conn = server.connect();
    conn.start_handshake(C_FIXED_NEWSTYLE);
    // Name length runs past the end of the option.
    let mut payload = 100u32.to_be_bytes().to_vec();
    payload.extend_from_slice(b"wire");
    payload.extend_from_slice(&0u16.to_be_bytes());
    let reply = conn.option_single(OPT_GO, &payload);
    assert_eq!(reply.option, OPT_GO);
    assert_eq!(reply.kind, REP_ERR_INVALID);
    // Info request count larger than the data present.
    let mut payload = info_payload(EXPORT, &[INFO_NAME]);
    payload.pop();
    let reply = conn.option_single(OPT_GO, &payload);
    assert_eq!(reply.kind, REP_ERR_INVALID);
    // Too short to hold a name length.
    let reply = conn.option_single(OPT_GO, &[0, 0]);
    assert_eq!(reply.kind, REP_ERR_INVALID);
    conn.go();
    assert_alive(&mut conn);
}

#[test]
fn oversized_option_is_too_big_and_the_handshake_continues() {
    let server = Server::start();
    let mut conn = server.connect();
    conn.start_handshake(C_FIXED_NEWSTYLE);
    let reply = conn.option_single(OPT_INFO, &vec![0xa5u8; 100_000]);
    assert_eq!(reply.option, OPT_INFO);
    assert_eq!(reply.kind, REP_ERR_TOO_BIG);
    let names = list_names(&conn.option(OPT_LIST, &[]));
    assert_eq!(names, [EXPORT]);
    conn.go();
    assert_alive(&mut conn);
}

#[test]
fn set_meta_context_before_structured_replies_is_invalid() {
    let server = Server::start();
    let mut conn = server.connect();
    conn.start_handshake(C_FIXED_NEWSTYLE);
    let reply = conn.option_single(
        OPT_SET_META_CONTEXT,
        &meta_payload(EXPORT, &["base:allocation"]),
    );
    assert_eq!(reply.option, OPT_SET_META_CONTEXT);
    assert_eq!(reply.kind, REP_ERR_INVALID);
    // The handshake continues, and nothing was selected.
    conn.structured_reply();
    conn.go();
    let reply = conn.command(0, CMD_BLOCK_STATUS, 0, 4096, &[]);
    conn.assert_error(&reply, CMD_BLOCK_STATUS, EINVAL);
}

#[test]
fn set_meta_context_selects_base_allocation() {
    let server = Server::start();
    let mut conn = server.connect();
    conn.start_handshake(C_FIXED_NEWSTYLE);
    conn.structured_reply();
    // An unknown namespace and an unknown base: leaf must be ignored.
    let replies = conn.option(
        OPT_SET_META_CONTEXT,
        &meta_payload(EXPORT, &["other:thing", "base:allocation", "base:nonsense"]),
    );
    assert_eq!(replies.len(), 2, "{replies:?}");
    assert_eq!(replies[0].option, OPT_SET_META_CONTEXT);
    assert_eq!(replies[0].kind, REP_META_CONTEXT);
    assert_eq!(be32(&replies[0].data[0..4]), 1, "context id");
    assert_eq!(&replies[0].data[4..], b"base:allocation");
    assert_eq!(replies[1].kind, REP_ACK);
    assert_eq!(replies[1].data, b"");
}

#[test]
fn list_meta_context_with_no_queries_lists_base_allocation() {
    let server = Server::start();
    let mut conn = server.connect();
    conn.start_handshake(C_FIXED_NEWSTYLE);
    conn.structured_reply();
    let replies = conn.option(OPT_LIST_META_CONTEXT, &meta_payload(EXPORT, &[]));
    assert_eq!(replies.len(), 2, "{replies:?}");
    assert_eq!(replies[0].option, OPT_LIST_META_CONTEXT);
    assert_eq!(replies[0].kind, REP_META_CONTEXT);
    assert_eq!(
        be32(&replies[0].data[0..4]),
        0,
        "LIST context id SHOULD be 0"
    );
    assert_eq!(&replies[0].data[4..], b"base:allocation");
    assert_eq!(replies[1].kind, REP_ACK);
    // "base:" is a wildcard during LIST.
    let replies = conn.option(OPT_LIST_META_CONTEXT, &meta_payload(EXPORT, &["base:"]));
    assert_eq!(replies.len(), 2, "{replies:?}");
    assert_eq!(&replies[0].data[4..], b"base:allocation");
    // A query matching nothing: just ACK.
    let replies = conn.option(OPT_LIST_META_CONTEXT, &meta_payload(EXPORT, &["x:y"]));
    assert_eq!(replies.len(), 1, "{replies:?}");
    assert_eq!(replies[0].kind, REP_ACK);
}

#[test]
fn export_name_with_an_unknown_name_closes_the_connection() {
    let server = Server::start();
    let mut conn = server.connect();
    conn.start_handshake(C_FIXED_NEWSTYLE);
    conn.send_option(OPT_EXPORT_NAME, b"no-such-export");
    conn.expect_closed();
}

#[test]
fn export_name_sends_size_flags_and_zero_padding() {
    let server = Server::start();
    let mut conn = server.connect();
    conn.start_handshake(C_FIXED_NEWSTYLE);
    conn.send_option(OPT_EXPORT_NAME, EXPORT.as_bytes());
    assert_eq!(conn.recv_u64(), IMAGE_SIZE);
    assert_eq!(conn.recv_u16(), TFLAGS_RW);
    assert_eq!(conn.recv(124), vec![0u8; 124]);
    assert_alive(&mut conn);
}

#[test]
fn export_name_with_no_zeroes_sends_no_padding() {
    let server = Server::start();
    let mut conn = server.connect();
    conn.start_handshake(C_FIXED_NEWSTYLE | C_NO_ZEROES);
    // The empty name is the default export.
    conn.send_option(OPT_EXPORT_NAME, b"");
    assert_eq!(conn.recv_u64(), IMAGE_SIZE);
    assert_eq!(conn.recv_u16(), TFLAGS_RW);
    // The very next bytes must be the reply to this READ, not padding.
    assert_alive(&mut conn);
}

// ---------------------------------------------------------------------------
// Transmission (each case runs with simple and with structured replies)
// ---------------------------------------------------------------------------

fn session(structured: bool) -> (Server, Conn) {
    session_with(structured, Options::default())
}

fn session_with(structured: bool, options: Options) -> (Server, Conn) {
    let server = Server::start_with(options);
    let mut conn = server.connect();
    let flags = conn.handshake(structured, false);
    let mut expected = if options.read_only {
        TFLAGS_RO
    } else {
        TFLAGS_RW
    };
    if structured {
        expected |= TFLAG_SEND_DF;
    }
    assert_eq!(flags, expected, "transmission flags");
    (server, conn)
}

mod cases {
    use super::*;

    pub fn write_then_read_round_trips(structured: bool) {
        let (_server, mut conn) = session(structured);
        let data = pattern(1, 10_000);
        let offset = 3 * 4096 + 17;
        conn.write(offset, &data);
        assert_eq!(conn.read(offset, 10_000), data);
        // Around it: still zero; across its start: both.
        assert_eq!(conn.read(0, 4096), vec![0u8; 4096]);
        let across = conn.read(offset - 100, 200);
        assert_eq!(&across[..100], &[0u8; 100][..]);
        assert_eq!(&across[100..], &data[..100]);
        // Last byte of the export is readable and writable.
        conn.write(IMAGE_SIZE - 1, &[0x5a]);
        assert_eq!(conn.read(IMAGE_SIZE - 1, 1), [0x5a]);
    }

    pub fn read_past_the_end_is_einval(structured: bool) {
        let (_server, mut conn) = session(structured);
        conn.expect_error(0, CMD_READ, IMAGE_SIZE - 100, 200, &[], EINVAL);
        conn.expect_error(0, CMD_READ, IMAGE_SIZE, 1, &[], EINVAL);
        conn.expect_error(0, CMD_READ, u64::MAX - 10, 512, &[], EINVAL);
        assert_alive(&mut conn);
    }

    pub fn write_past_the_end_is_enospc(structured: bool) {
        let (_server, mut conn) = session(structured);
        let data = pattern(2, 200);
        conn.expect_error(0, CMD_WRITE, IMAGE_SIZE - 100, 200, &data, ENOSPC);
        // Nothing was written to the part that fits.
        assert_eq!(conn.read(IMAGE_SIZE - 100, 100), vec![0u8; 100]);
        conn.expect_error(0, CMD_WRITE, u64::MAX - 10, 200, &data, ENOSPC);
        assert_alive(&mut conn);
    }

    pub fn unknown_command_is_einval(structured: bool) {
        let (_server, mut conn) = session(structured);
        conn.expect_error(0, 42, 0, 512, &[], EINVAL);
        assert_alive(&mut conn);
    }

    pub fn unknown_flag_on_read_is_einval(structured: bool) {
        let (_server, mut conn) = session(structured);
        conn.expect_error(0x8000, CMD_READ, 0, 512, &[], EINVAL);
        // A known flag that does not apply to READ.
        conn.expect_error(FLAG_NO_HOLE, CMD_READ, 0, 512, &[], EINVAL);
        if structured {
            // DF is valid once structured replies are on: at most one content chunk.
            let reply = conn.command(FLAG_DF, CMD_READ, 0, 4096, &[]);
            assert_eq!(reply.error, 0, "{reply:?}");
            assert!(!reply.simple);
            let content = reply
                .chunks
                .iter()
                .filter(|c| c.kind == CHUNK_OFFSET_DATA || c.kind == CHUNK_OFFSET_HOLE)
                .count();
            assert_eq!(content, 1, "{reply:?}");
        } else {
            // DF is not valid without structured replies.
            conn.expect_error(FLAG_DF, CMD_READ, 0, 512, &[], EINVAL);
        }
        assert_alive(&mut conn);
    }

    pub fn oversized_write_is_einval_and_its_payload_discarded(structured: bool) {
        let (_server, mut conn) = session(structured);
        let length = MAX_PAYLOAD + 1;
        // The payload is not all zero, so a misparse would show up.
        let payload = vec![0xeeu8; length as usize];
        conn.expect_error(0, CMD_WRITE, 0, length, &payload, EINVAL);
        // The stream is still in step, and nothing was written.
        assert_eq!(conn.read(0, 4096), vec![0u8; 4096]);
        let data = pattern(3, 512);
        conn.write(512, &data);
        assert_eq!(conn.read(512, 512), data);
    }

    pub fn oversized_read_is_einval(structured: bool) {
        let (_server, mut conn) = session(structured);
        conn.expect_error(0, CMD_READ, 0, MAX_PAYLOAD + 1, &[], EINVAL);
        conn.expect_error(0, CMD_READ, 0, u32::MAX, &[], EINVAL);
        assert_alive(&mut conn);
    }

    pub fn block_status_without_a_context_is_einval(structured: bool) {
        let (_server, mut conn) = session(structured);
        conn.expect_error(0, CMD_BLOCK_STATUS, 0, 4096, &[], EINVAL);
        assert_alive(&mut conn);
    }

    pub fn flush_with_a_length_is_einval(structured: bool) {
        let (_server, mut conn) = session(structured);
        conn.expect_error(0, CMD_FLUSH, 0, 4096, &[], EINVAL);
        conn.expect_error(0, CMD_FLUSH, 4096, 0, &[], EINVAL);
        let reply = conn.command(0, CMD_FLUSH, 0, 0, &[]);
        assert_eq!((reply.simple, reply.error), (true, 0), "{reply:?}");
        assert_alive(&mut conn);
    }

    pub fn writes_to_a_read_only_export_are_eperm(structured: bool) {
        let (_server, mut conn) = session_with(
            structured,
            Options {
                read_only: true,
                ..Options::default()
            },
        );
        let data = pattern(4, 4096);
        conn.expect_error(0, CMD_WRITE, 0, 4096, &data, EPERM);
        conn.expect_error(0, CMD_TRIM, 0, 4096, &[], EPERM);
        conn.expect_error(0, CMD_WRITE_ZEROES, 0, 4096, &[], EPERM);
        assert_eq!(conn.read(0, 4096), vec![0u8; 4096]);
        let reply = conn.command(0, CMD_FLUSH, 0, 0, &[]);
        assert_eq!(reply.error, 0, "{reply:?}");
    }

    pub fn bad_request_magic_closes_the_connection(structured: bool) {
        let (_server, mut conn) = session(structured);
        // A reserved magic value (never valid as a request).
        let mut bad = request(0, CMD_READ, 7, 0, 512);
        bad[0..4].copy_from_slice(&0x1256_0953u32.to_be_bytes());
        conn.send(&bad);
        conn.expect_closed();
    }

    pub fn pipelined_requests_are_matched_by_cookie(structured: bool) {
        let (_server, mut conn) = session(structured);
        const BLOCK: u64 = 4096;
        // Regions the reads target, written before the pipeline starts so no read
        // overlaps a write in flight.
        let read_base = 1024 * 1024;
        let mut expected_reads = Vec::new();
        for i in 0..32u64 {
            let data = pattern(100 + i, 1000 + i as usize * 50);
            conn.write(read_base + i * BLOCK, &data);
            expected_reads.push(data);
        }
        let write_base = 4 * 1024 * 1024;
        let mut expected: HashMap<u64, (u16, Vec<u8>)> = HashMap::new();
        let mut written = Vec::new();
        for i in 0..32u64 {
            let data = pattern(200 + i, 512 + i as usize * 64);
            // Some FUA writes: their replies may overtake later ones.
            let flags = if i % 4 == 0 { FLAG_FUA } else { 0 };
            let offset = write_base + i * BLOCK;
            let len = data.len() as u32;
            let cookie = conn.submit(flags, CMD_WRITE, offset, len, &data);
            expected.insert(cookie, (CMD_WRITE, Vec::new()));
            written.push((offset, data));
            let read = &expected_reads[i as usize];
            let cookie = conn.submit(0, CMD_READ, read_base + i * BLOCK, read.len() as u32, &[]);
            expected.insert(cookie, (CMD_READ, read.clone()));
        }
        assert_eq!(expected.len(), 64, "cookies are distinct");
        for _ in 0..64 {
            let reply = conn.next_reply();
            let (command, data) = expected
                .remove(&reply.cookie)
                .unwrap_or_else(|| panic!("unexpected or repeated cookie {:#x}", reply.cookie));
            assert_success(&reply, command, &data, structured);
        }
        assert!(expected.is_empty());
        for (offset, data) in written {
            assert_eq!(conn.read(offset, data.len() as u32), data);
        }
    }

    pub fn disc_answers_pipelined_writes_before_closing(structured: bool) {
        let (server, mut conn) = session(structured);
        let mut cookies = Vec::new();
        let mut written = Vec::new();
        for i in 0..16u64 {
            let data = pattern(300 + i, 4096);
            let flags = if i % 3 == 0 { FLAG_FUA } else { 0 };
            let offset = 2 * 1024 * 1024 + i * 8192;
            cookies.push(conn.submit(flags, CMD_WRITE, offset, 4096, &data));
            written.push((offset, data));
        }
        conn.disconnect();
        let mut replied = Vec::new();
        for _ in 0..16 {
            let reply = conn.next_reply();
            assert_eq!((reply.simple, reply.error), (true, 0), "{reply:?}");
            replied.push(reply.cookie);
        }
        conn.expect_closed();
        replied.sort_unstable();
        cookies.sort_unstable();
        assert_eq!(replied, cookies);
        // The writes landed.
        let mut conn = server.connect();
        conn.handshake(structured, false);
        for (offset, data) in written {
            assert_eq!(conn.read(offset, 4096), data);
        }
    }

    pub fn cache_succeeds(structured: bool) {
        let (_server, mut conn) = session(structured);
        let data = pattern(5, 8192);
        conn.write(8192, &data);
        let reply = conn.command(0, CMD_CACHE, 0, 65536, &[]);
        assert_eq!((reply.simple, reply.error), (true, 0), "{reply:?}");
        // No change in semantics.
        assert_eq!(conn.read(8192, 8192), data);
    }

    pub fn fast_zero_with_no_hole_is_enotsup_and_changes_nothing(structured: bool) {
        let (_server, mut conn) = session(structured);
        let data = pattern(6, 3 * 4096);
        conn.write(4096, &data);
        conn.expect_error(
            FLAG_FAST_ZERO | FLAG_NO_HOLE,
            CMD_WRITE_ZEROES,
            4096,
            3 * 4096,
            &[],
            ENOTSUP,
        );
        assert_eq!(conn.read(4096, 3 * 4096), data);
        // Plain WRITE_ZEROES (with and without NO_HOLE) zeroes, unaligned too.
        let reply = conn.command(FLAG_NO_HOLE, CMD_WRITE_ZEROES, 4096, 100, &[]);
        assert_eq!((reply.simple, reply.error), (true, 0), "{reply:?}");
        let reply = conn.command(0, CMD_WRITE_ZEROES, 4096 + 100, 5000, &[]);
        assert_eq!((reply.simple, reply.error), (true, 0), "{reply:?}");
        let after = conn.read(4096, 3 * 4096);
        assert_eq!(&after[..5100], &[0u8; 5100][..]);
        assert_eq!(&after[5100..], &data[5100..]);
    }

    pub fn zero_length_requests_do_not_disconnect(structured: bool) {
        let (_server, mut conn) = session(structured);
        // The spec leaves the result unspecified but says not to disconnect.
        for command in [CMD_READ, CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES, CMD_CACHE] {
            let reply = conn.command(0, command, 4096, 0, &[]);
            if command == CMD_READ && reply.error == 0 {
                assert!(reply.data.is_empty(), "{reply:?}");
                assert_eq!(reply.simple, !structured, "{reply:?}");
            }
        }
        assert_alive(&mut conn);
    }

    pub fn pipelined_mixed_requests_are_all_answered(structured: bool) {
        let (_server, mut conn) = session(structured);
        // Reads of every size class (inline and large) against data written up
        // front; writes elsewhere; errors, FLUSH and CACHE in between.
        let base = 8 * 1024 * 1024;
        let source = pattern(400, 2 * 1024 * 1024);
        conn.write(base, &source[..1024 * 1024]);
        conn.write(base + 1024 * 1024, &source[1024 * 1024..]);
        let sizes = [1u32, 512, 4096, 65535, 65536, 65537, 300_000, 1024 * 1024];
        let mut expected: HashMap<u64, (u16, u32, Vec<u8>)> = HashMap::new();
        let mut written = Vec::new();
        for round in 0..6u64 {
            for (i, &size) in sizes.iter().enumerate() {
                let at =
                    (round * 7919 + i as u64 * 104_729) % (source.len() as u64 - u64::from(size));
                let cookie = conn.submit(0, CMD_READ, base + at, size, &[]);
                let data = source[at as usize..at as usize + size as usize].to_vec();
                expected.insert(cookie, (CMD_READ, 0, data));
            }
            let data = pattern(500 + round, 70_000);
            let offset = round * 131_072;
            let flags = if round % 2 == 0 { FLAG_FUA } else { 0 };
            let cookie = conn.submit(flags, CMD_WRITE, offset, 70_000, &data);
            expected.insert(cookie, (CMD_WRITE, 0, Vec::new()));
            written.push((offset, data));
            let cookie = conn.submit(0, 42, 0, 0, &[]);
            expected.insert(cookie, (42, EINVAL, Vec::new()));
            let cookie = conn.submit(0, CMD_FLUSH, 0, 0, &[]);
            expected.insert(cookie, (CMD_FLUSH, 0, Vec::new()));
            let cookie = conn.submit(0, CMD_CACHE, base, 65536, &[]);
            expected.insert(cookie, (CMD_CACHE, 0, Vec::new()));
            let cookie = conn.submit(0, CMD_READ, IMAGE_SIZE, 1, &[]);
            expected.insert(cookie, (CMD_READ, EINVAL, Vec::new()));
        }
        while !expected.is_empty() {
            let reply = conn.next_reply();
            let (command, error, data) = expected
                .remove(&reply.cookie)
                .unwrap_or_else(|| panic!("unexpected or repeated cookie {:#x}", reply.cookie));
            if error != 0 {
                conn.assert_error(&reply, command, error);
                continue;
            }
            assert_success(&reply, command, &data, structured);
        }
        assert_eq!(conn.in_flight(), 0);
        for (offset, data) in written {
            assert_eq!(conn.read(offset, data.len() as u32), data);
        }
    }

    pub fn trim_then_read_returns_zeros(structured: bool) {
        let (_server, mut conn) = session(structured);
        let data = pattern(7, 4 * 4096);
        conn.write(65536, &data);
        // Unaligned on both ends: the server zeroes exactly the range.
        let reply = conn.command(0, CMD_TRIM, 65536 + 1000, 2 * 4096, &[]);
        assert_eq!((reply.simple, reply.error), (true, 0), "{reply:?}");
        let after = conn.read(65536, 4 * 4096);
        assert_eq!(&after[..1000], &data[..1000]);
        assert_eq!(&after[1000..1000 + 8192], &[0u8; 8192][..]);
        assert_eq!(&after[1000 + 8192..], &data[1000 + 8192..]);
        conn.expect_error(0, CMD_TRIM, IMAGE_SIZE - 10, 20, &[], EINVAL);
        assert_alive(&mut conn);
    }
}

macro_rules! in_both_modes {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[test]
                fn simple_replies() {
                    super::cases::$name(false);
                }

                #[test]
                fn structured_replies() {
                    super::cases::$name(true);
                }
            }
        )*
    };
}

in_both_modes!(
    write_then_read_round_trips,
    read_past_the_end_is_einval,
    write_past_the_end_is_enospc,
    unknown_command_is_einval,
    unknown_flag_on_read_is_einval,
    oversized_write_is_einval_and_its_payload_discarded,
    oversized_read_is_einval,
    block_status_without_a_context_is_einval,
    flush_with_a_length_is_einval,
    writes_to_a_read_only_export_are_eperm,
    bad_request_magic_closes_the_connection,
    pipelined_requests_are_matched_by_cookie,
    disc_answers_pipelined_writes_before_closing,
    cache_succeeds,
    fast_zero_with_no_hole_is_enotsup_and_changes_nothing,
    trim_then_read_returns_zeros,
    zero_length_requests_do_not_disconnect,
    pipelined_mixed_requests_are_all_answered,
);

/// Every value `EMULATOR_NBD_LARGE_WRITES` takes.
const LARGE_WRITE_MODES: [&str; 3] = ["workers", "in-place", "pieces"];

/// A structured session with a server whose large writes run as `mode` says.
fn session_with_large_writes(mode: &'static str) -> (Server, Conn) {
    session_with(
        true,
        Options {
            large_writes: Some(mode),
            ..Options::default()
        },
    )
}

/// Large writes (past the 64 KiB the request thread runs from its own
/// buffer) pipelined with reads, a small write and FLUSH, back to back so
/// that a large write's header arrives alone and what follows it is both a
/// large write and a small request: on workers, in place and in pieces (the
/// server chooses by transport and CPU count; `EMULATOR_NBD_LARGE_WRITES`
/// makes it take each path).
#[test]
fn pipelined_large_writes_on_workers_in_place_and_in_pieces() {
    const MIB: u64 = 1024 * 1024;
    for mode in LARGE_WRITE_MODES {
        let (server, mut conn) = session_with_large_writes(mode);
        let reads_at = 10 * MIB;
        let source = pattern(900, 2 * MIB as usize);
        conn.write(reads_at, &source);
        let mut expected: HashMap<u64, (u16, Vec<u8>)> = HashMap::new();
        let mut written = Vec::new();
        for round in 0..3u64 {
            let slot = round * 3 * MIB;
            let writes = [
                (slot, MIB as usize, FLAG_FUA),
                (slot + MIB + 123, 300_000, 0),
                (slot + 3 * MIB / 2, 65_537, 0),
                (slot + 7 * MIB / 4, 262_144, 0),
                (slot + 2 * MIB + 7, 512, 0),
                (slot + 2 * MIB + 65_536, 917_504, FLAG_FUA),
            ];
            for (i, &(offset, len, flags)) in writes.iter().enumerate() {
                let data = pattern(1000 + round * 10 + i as u64, len);
                let cookie = conn.submit(flags, CMD_WRITE, offset, len as u32, &data);
                expected.insert(cookie, (CMD_WRITE, Vec::new()));
                written.push((offset, data));
                if i == 1 || i == 4 {
                    let (at, len) = (round * 5000 + i as u64, 4096);
                    let cookie = conn.submit(0, CMD_READ, reads_at + at, len, &[]);
                    let data = source[at as usize..at as usize + len as usize].to_vec();
                    expected.insert(cookie, (CMD_READ, data));
                }
                if i == 3 {
                    let cookie = conn.submit(0, CMD_FLUSH, 0, 0, &[]);
                    expected.insert(cookie, (CMD_FLUSH, Vec::new()));
                    let at = round * 100_000;
                    let cookie = conn.submit(0, CMD_READ, reads_at + at, MIB as u32, &[]);
                    let data = source[at as usize..(at + MIB) as usize].to_vec();
                    expected.insert(cookie, (CMD_READ, data));
                }
            }
        }
        while !expected.is_empty() {
            let reply = conn.next_reply();
            let (command, data) = expected.remove(&reply.cookie).unwrap_or_else(|| {
                panic!("{mode}: unexpected or repeated cookie {:#x}", reply.cookie)
            });
            assert_success(&reply, command, &data, true);
        }
        for (offset, data) in written {
            let back = conn.read(offset, data.len() as u32);
            assert!(
                back == data,
                "{mode}: the write of {} bytes at {offset} did not read back",
                data.len()
            );
        }
        assert!(
            server
                .log_text()
                .contains(&format!("large_writes=\"{mode}\"")),
            "{mode}: the server did not say where large writes run:\n{}",
            server.log_text()
        );
    }
}

/// A large write whose payload is cut off part-way (the client goes away)
/// is never acknowledged, and leaves every 4 KiB block either as it was or
/// as the write had it, never a mix and never a checksum out of step: a
/// payload received whole before it is stored (workers, in place) changes
/// nothing; one stored in pieces as it arrives has stored exactly the whole
/// blocks that arrived, as a write cut off by a power loss may have.
#[test]
fn a_large_write_cut_off_part_way_leaves_whole_blocks() {
    const BLOCK: usize = 4096;
    const LEN: usize = 1024 * 1024;
    // Not on a block boundary: block `CUT / BLOCK` arrives in part.
    const CUT: usize = 300_123;
    for mode in LARGE_WRITE_MODES {
        let (server, mut conn) = session_with_large_writes(mode);
        let old = pattern(7, LEN);
        conn.write(0, &old);
        let new = pattern(8, LEN);
        conn.send(&request(0, CMD_WRITE, 1, 0, LEN as u32));
        conn.send(&new[..CUT]);
        drop(conn);
        // The server logs the connection's end once its thread is done.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !server.log_text().contains("connection dropped") {
            assert!(
                Instant::now() < deadline,
                "{mode}: the cut-off connection did not end within 10 s:\n{}",
                server.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let stored_blocks = if mode == "pieces" { CUT / BLOCK } else { 0 };
        let mut reader = server.connect();
        reader.handshake(true, false);
        let back = reader.read(0, LEN as u32);
        for (block, (got, (was, sent))) in back
            .chunks(BLOCK)
            .zip(old.chunks(BLOCK).zip(new.chunks(BLOCK)))
            .enumerate()
        {
            let expected = if block < stored_blocks { sent } else { was };
            assert!(
                got == expected,
                "{mode}: block {block} is neither as the cut-off write left it \
                 ({stored_blocks} whole blocks stored) nor as before"
            );
        }
    }
}

/// The `(length, flags)` extents of a successful base:allocation reply.
fn extents(reply: &Reply) -> Vec<(u32, u32)> {
    assert_eq!(reply.error, 0, "{reply:?}");
    assert!(
        !reply.simple,
        "BLOCK_STATUS needs a structured reply: {reply:?}"
    );
    assert_eq!(reply.chunks.len(), 1, "one chunk per context: {reply:?}");
    let chunk = &reply.chunks[0];
    assert_eq!(chunk.kind, CHUNK_BLOCK_STATUS);
    assert_eq!(chunk.flags & CHUNK_FLAG_DONE, CHUNK_FLAG_DONE);
    let p = &chunk.payload;
    assert!(
        p.len() >= 12 && (p.len() - 4).is_multiple_of(8),
        "{chunk:?}"
    );
    assert_eq!(be32(&p[0..4]), 1, "the context id SET_META_CONTEXT gave");
    p[4..]
        .chunks(8)
        .map(|e| {
            let extent = (be32(&e[0..4]), be32(&e[4..8]));
            assert_ne!(extent.0, 0, "zero-length extent");
            extent
        })
        .collect()
}

#[test]
fn block_status_reports_holes_and_data() {
    let server = Server::start();
    let mut conn = server.connect();
    conn.handshake(true, true);
    let size = IMAGE_SIZE as u32;
    let reply = conn.command(0, CMD_BLOCK_STATUS, 0, size, &[]);
    assert_eq!(extents(&reply), [(size, STATE_HOLE | STATE_ZERO)]);

    let mib = 1024 * 1024;
    conn.write(u64::from(mib), &pattern(8, 4096));
    let reply = conn.command(0, CMD_BLOCK_STATUS, u64::from(mib), 4096, &[]);
    assert_eq!(extents(&reply), [(4096, 0)]);
    let reply = conn.command(0, CMD_BLOCK_STATUS, 0, size, &[]);
    assert_eq!(
        extents(&reply),
        [
            (mib, STATE_HOLE | STATE_ZERO),
            (4096, 0),
            (size - mib - 4096, STATE_HOLE | STATE_ZERO)
        ]
    );
    // REQ_ONE: exactly one extent, within the request.
    let reply = conn.command(FLAG_REQ_ONE, CMD_BLOCK_STATUS, 0, size, &[]);
    assert_eq!(extents(&reply), [(mib, STATE_HOLE | STATE_ZERO)]);
    let reply = conn.command(
        FLAG_REQ_ONE,
        CMD_BLOCK_STATUS,
        u64::from(mib) + 100,
        50,
        &[],
    );
    assert_eq!(extents(&reply), [(50, 0)]);
    // Beyond the end.
    conn.expect_error(0, CMD_BLOCK_STATUS, IMAGE_SIZE - 10, 20, &[], EINVAL);
    // Flags not valid for BLOCK_STATUS.
    conn.expect_error(FLAG_DF, CMD_BLOCK_STATUS, 0, 4096, &[], EINVAL);
    assert_alive(&mut conn);
}

#[test]
fn set_meta_context_with_no_queries_selects_nothing() {
    let server = Server::start();
    let mut conn = server.connect();
    conn.start_handshake(C_FIXED_NEWSTYLE);
    conn.structured_reply();
    let replies = conn.option(
        OPT_SET_META_CONTEXT,
        &meta_payload(EXPORT, &["base:allocation"]),
    );
    assert_eq!(replies.len(), 2, "{replies:?}");
    // SET replaces the selection: zero queries select nothing.
    let replies = conn.option(OPT_SET_META_CONTEXT, &meta_payload(EXPORT, &[]));
    assert_eq!(replies.len(), 1, "{replies:?}");
    assert_eq!(replies[0].kind, REP_ACK);
    conn.go();
    conn.expect_error(0, CMD_BLOCK_STATUS, 0, 4096, &[], EINVAL);
    assert_alive(&mut conn);
}

#[test]
fn write_zeroes_and_trim_of_the_whole_export_leave_only_holes() {
    let server = Server::start();
    let mut conn = server.connect();
    conn.handshake(true, true);
    let size = IMAGE_SIZE as u32;
    for i in 0..4u64 {
        conn.write(i * 3 * 1024 * 1024 + 12345, &pattern(600 + i, 100_000));
    }
    // Larger than the maximum payload is fine for commands without one.
    let reply = conn.command(0, CMD_WRITE_ZEROES, 0, size, &[]);
    assert_eq!((reply.simple, reply.error), (true, 0), "{reply:?}");
    let reply = conn.command(0, CMD_BLOCK_STATUS, 0, size, &[]);
    assert_eq!(extents(&reply), [(size, STATE_HOLE | STATE_ZERO)]);
    conn.write(5 * 4096, &pattern(700, 4096));
    let reply = conn.command(0, CMD_TRIM, 0, size, &[]);
    assert_eq!((reply.simple, reply.error), (true, 0), "{reply:?}");
    let reply = conn.command(0, CMD_BLOCK_STATUS, 0, size, &[]);
    assert_eq!(extents(&reply), [(size, STATE_HOLE | STATE_ZERO)]);
    assert_eq!(conn.read(0, 8 * 4096), vec![0u8; 8 * 4096]);
}

#[test]
fn two_connections_see_each_others_flushed_writes() {
    let server = Server::start();
    let mut first = server.connect();
    first.handshake(false, false);
    let mut second = server.connect();
    second.handshake(true, false);
    let data = pattern(9, 4096);
    first.write(40960, &data);
    let reply = first.command(0, CMD_FLUSH, 0, 0, &[]);
    assert_eq!(reply.error, 0);
    assert_eq!(second.read(40960, 4096), data);
}

// ---------------------------------------------------------------------------
// Shutdown
// ---------------------------------------------------------------------------

#[test]
fn sigterm_closes_an_idle_connection_and_exits_zero() {
    let mut server = Server::start();
    let mut conn = server.connect();
    conn.handshake(false, false);
    assert_alive(&mut conn);
    server.sigterm();
    let took = conn.expect_closed();
    assert!(took < Duration::from_secs(5), "closed after {took:?}");
    let status = server
        .wait_exit(EXIT_TIMEOUT)
        .expect("server exits after SIGTERM");
    assert!(status.success(), "exit status {status}");
}

#[test]
fn sigterm_closes_connections_in_handshake_and_transmission_and_exits_zero() {
    let mut server = Server::start();
    let mut negotiating = server.connect();
    negotiating.start_handshake(C_FIXED_NEWSTYLE);
    let names = list_names(&negotiating.option(OPT_LIST, &[]));
    assert_eq!(names, [EXPORT]);
    let mut transmitting = server.connect();
    transmitting.handshake(true, true);
    assert_alive(&mut transmitting);
    let status = server.terminate();
    assert!(status.success(), "exit status {status}");
    negotiating.expect_closed();
    transmitting.expect_closed();
    // The socket file is gone.
    assert!(!server.dir().join("nbd.sock").exists());
}

#[test]
fn sigterm_with_requests_in_flight_answers_whole_replies_and_exits_zero() {
    let mut server = Server::start();
    let mut conn = server.connect();
    conn.handshake(true, false);
    let data = pattern(800, 65536);
    conn.write(0, &data);
    let mut cookies = Vec::new();
    for _ in 0..200 {
        cookies.push(conn.submit(0, CMD_READ, 0, 65536, &[]));
    }
    server.sigterm();
    // Every request already sent is answered, each reply complete: with the data
    // if the server had started it, else with ESHUTDOWN (108), as the spec asks.
    // Then EOF at a message boundary.
    let mut answered = 0;
    while let Some(reply) = conn.next_reply_or_eof() {
        assert!(
            cookies.contains(&reply.cookie),
            "unknown cookie {:#x}",
            reply.cookie
        );
        match reply.error {
            0 => assert!(reply.data == data, "wrong data for {:#x}", reply.cookie),
            108 => assert!(
                !reply.simple,
                "structured replies were negotiated: {reply:?}"
            ),
            other => panic!("unexpected error {other} for {:#x}", reply.cookie),
        }
        answered += 1;
    }
    assert_eq!(
        answered,
        cookies.len(),
        "every request sent before SIGTERM is answered"
    );
    let status = server
        .wait_exit(EXIT_TIMEOUT)
        .expect("server exits after SIGTERM");
    assert!(status.success(), "exit status {status}");
}

#[test]
fn sigterm_right_after_the_socket_accepts_exits_zero() {
    use std::io::Write;
    use std::process::{Command, Stdio};
    for attempt in 0..100 {
        let mut server = Server::spawn(Options::default());
        // A shell primed to send SIGTERM the moment we say so: spawning `kill`
        // after the connect would take longer than the window this test is about.
        let mut killer = Command::new("sh")
            .arg("-c")
            .arg("read _ && kill -TERM \"$0\"")
            .arg(server.pid().to_string())
            .stdin(Stdio::piped())
            .spawn()
            .expect("spawn sh");
        server.wait_ready(Duration::ZERO);
        killer
            .stdin
            .take()
            .expect("killer stdin")
            .write_all(b"go\n")
            .expect("trigger kill");
        assert!(killer.wait().expect("wait for sh").success(), "kill failed");
        let status = server
            .wait_exit(EXIT_TIMEOUT)
            .expect("server exits after SIGTERM");
        assert!(
            status.success(),
            "attempt {attempt}: SIGTERM right after the socket accepted gave {status}"
        );
        assert!(
            !server.dir().join("nbd.sock").exists(),
            "socket left behind"
        );
    }
}

#[test]
fn sigterm_does_not_wait_for_a_stalled_partial_request() {
    let mut server = Server::start();
    let mut conn = server.connect();
    conn.handshake(false, false);
    assert_alive(&mut conn);
    // Six bytes of a 28-byte request header, then nothing.
    conn.send(&request(0, CMD_READ, 1, 0, 512)[..6]);
    server.sigterm();
    let took = conn.expect_closed();
    assert!(took < Duration::from_secs(5), "closed after {took:?}");
    let status = server
        .wait_exit(EXIT_TIMEOUT)
        .expect("server exits after SIGTERM");
    assert!(status.success(), "exit status {status}");
}

/// A successful reply of the form the session requires: a READ carries `data`
/// (structured when structured replies are on); anything else is a simple reply.
fn assert_success(reply: &Reply, command: u16, data: &[u8], structured: bool) {
    assert_eq!(reply.error, 0, "command {command}: {reply:?}");
    if command == CMD_READ {
        assert_eq!(reply.simple, !structured);
        assert!(
            reply.data == data,
            "read {:#x} returned wrong data",
            reply.cookie
        );
    } else {
        assert!(reply.simple, "{reply:?}");
    }
}

#[test]
fn oversized_export_name_closes_the_connection() {
    // EXPORT_NAME has no error reply: the only answer to one the server will
    // not read is to end the session (an option reply would be misread as the
    // export's size and flags).
    let server = Server::start();
    let mut conn = server.connect();
    conn.start_handshake(C_FIXED_NEWSTYLE);
    conn.send_option(OPT_EXPORT_NAME, &vec![b'x'; 70_000]);
    conn.expect_closed();
    let mut other = server.connect();
    other.handshake(true, true);
    assert_alive(&mut other);
}

#[test]
fn block_status_of_zero_bytes_is_invalid() {
    let server = Server::start();
    let mut conn = server.connect();
    conn.handshake(true, true);
    let reply = conn.command(0, CMD_BLOCK_STATUS, 0, 0, &[]);
    assert_eq!(reply.error, EINVAL, "{reply:?}");
    assert_alive(&mut conn);
}

/// Anonymous memory of process `pid` (reply buffers, not the image mapping).
fn anon_rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let line = status
        .lines()
        .find(|l| l.starts_with("RssAnon:"))
        .expect("RssAnon line");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("RssAnon value");
    kib * 1024
}

#[test]
fn a_client_that_never_reads_replies_cannot_grow_the_server_without_bound() {
    // 64 reads of the whole 16 MiB export, sent at once, replies left unread:
    // 1 GiB of replies. The server must stop taking requests once about
    // MAX_QUEUED_REPLY_BYTES (64 MiB) wait unread, plus what its workers hold.
    let server = Server::start();
    let mut conn = server.connect();
    conn.handshake(false, false);
    let before = anon_rss_bytes(server.pid());
    let size = IMAGE_SIZE as u32;
    let cookies: Vec<u64> = (0..64)
        .map(|_| conn.submit(0, CMD_READ, 0, size, &[]))
        .collect();
    let bound = 256 * 1024 * 1024;
    let watch = Instant::now();
    let mut most = 0;
    while watch.elapsed() < Duration::from_millis(1500) {
        most = most.max(anon_rss_bytes(server.pid()).saturating_sub(before));
        assert!(
            most < bound,
            "server grew by {most} bytes with replies unread"
        );
        // Samples of a fixed observation window, not synchronisation.
        std::thread::sleep(Duration::from_millis(20));
    }
    // Every reply still arrives, whole and correct (in any order).
    let mut answered: Vec<u64> = (0..cookies.len())
        .map(|_| {
            let reply = conn.next_reply();
            assert_eq!(reply.error, 0);
            assert_eq!(reply.data.len(), size as usize);
            reply.cookie
        })
        .collect();
    answered.sort_unstable();
    let mut cookies = cookies;
    cookies.sort_unstable();
    assert_eq!(answered, cookies);
    assert_alive(&mut conn);
}
