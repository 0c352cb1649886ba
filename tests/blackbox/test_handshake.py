"""Negotiation: libnbd's view (GO, LIST, TLS fallback, unknown exports) and raw
option traffic for what libnbd does not send (old-style EXPORT_NAME, unknown
options, malformed payloads)."""

from __future__ import annotations

import struct

import nbd
import pytest

from bbhelpers import (
    CMD_READ,
    INFO_BLOCK_SIZE,
    INFO_DESCRIPTION,
    INFO_EXPORT,
    INFO_NAME,
    MiB,
    OPT_ABORT,
    OPT_EXPORT_NAME,
    OPT_GO,
    OPT_INFO,
    OPT_LIST,
    OPT_LIST_META_CONTEXT,
    OPT_SET_META_CONTEXT,
    OPT_STARTTLS,
    OPT_STRUCTURED_REPLY,
    REP_ACK,
    REP_ERR_INVALID,
    REP_ERR_POLICY,
    REP_ERR_TOO_BIG,
    REP_ERR_UNKNOWN,
    REP_ERR_UNSUP,
    REP_INFO,
    REP_META_CONTEXT,
    REP_SERVER,
    RawNBD,
    nbd_connect,
)

SIZE = 64 * MiB


# -- libnbd -------------------------------------------------------------------------


def test_unknown_export_fails_to_connect(server):
    with pytest.raises(nbd.Error):
        nbd_connect(server.uri(export="nosuch"))
    # The server is fine afterwards.
    h = nbd_connect(server.uri())
    assert h.get_size() == SIZE
    h.shutdown()


def test_go_failure_leaves_negotiation_usable(server):
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(server.uri(export="nosuch"))
    with pytest.raises(nbd.Error):
        h.opt_go()
    assert h.aio_is_negotiating()
    h.set_export_name("disk")
    h.opt_go()
    assert h.get_size() == SIZE
    assert h.pread(16, 0) == bytes(16)
    h.shutdown()


def test_opt_list(server):
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(server.uri())
    seen = []
    count = h.opt_list(lambda name, description: seen.append((name, description)) or 0)
    assert count == 1
    assert seen[0][0] == "disk"
    assert "disk.img" in seen[0][1]
    # Listing does not end negotiation: GO afterwards works.
    h.opt_go()
    assert h.get_size() == SIZE
    h.shutdown()


def test_opt_info_then_go(server):
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(server.uri())
    h.set_export_name("nosuch")
    with pytest.raises(nbd.Error):
        h.opt_info()
    h.set_export_name("")
    h.opt_info()
    assert h.get_size() == SIZE
    h.opt_go()
    assert h.get_size() == SIZE
    h.shutdown()


def test_tls_allow_falls_back_to_plaintext(server):
    h = nbd.NBD()
    if not h.supports_tls():
        pytest.skip("libnbd built without TLS")
    h.set_tls(nbd.TLS_ALLOW)
    h.connect_uri(server.uri())
    assert h.get_tls_negotiated() is False
    assert h.pread(8, 0) == bytes(8)
    h.shutdown()


def test_tls_require_fails(server):
    h = nbd.NBD()
    if not h.supports_tls():
        pytest.skip("libnbd built without TLS")
    h.set_tls(nbd.TLS_REQUIRE)
    with pytest.raises(nbd.Error):
        h.connect_uri(server.uri())
    # The refusal cost the server nothing.
    ok = nbd_connect(server.uri())
    ok.shutdown()


def test_without_structured_replies(server, rng):
    h = nbd.NBD()
    h.set_request_structured_replies(False)
    h.set_strict_mode(0)
    h.connect_uri(server.uri())
    assert not h.get_structured_replies_negotiated()
    assert not h.can_df()
    data = rng.randbytes(100000)
    h.pwrite(data, 5)
    assert h.pread(len(data), 5) == data
    with pytest.raises(nbd.Error):
        h.pread(10, SIZE)
    assert h.pread(5, 0) == bytes(5)
    h.shutdown()


# -- raw option traffic -------------------------------------------------------------


@pytest.fixture
def raw(server):
    conn = RawNBD(server.raw_address())
    yield conn
    conn.close()


def read_works(conn, offset=0, length=512):
    conn.send_request(CMD_READ, offset, length)
    err, _, data = conn.reply(length)
    assert err == 0 and len(data) == length
    return data


def test_greeting_flags(raw):
    flags = raw.greeting()
    assert flags == 0x3  # FIXED_NEWSTYLE | NO_ZEROES, nothing else


def test_unknown_client_flags_disconnect(raw):
    raw.greeting(client_flags=0x1 | 0x80)
    assert raw.at_eof()


def test_unknown_option_is_unsupported_and_skipped(raw):
    raw.greeting()
    raw.send_option(99, b"some payload that must be skipped")
    assert raw.option_replies(99)[-1][0] == REP_ERR_UNSUP
    raw.send_option(OPT_LIST)
    replies = raw.option_replies(OPT_LIST)
    assert replies[-1][0] == REP_ACK


def test_list(raw):
    raw.greeting()
    raw.send_option(OPT_LIST)
    replies = raw.option_replies(OPT_LIST)
    assert [r for r, _ in replies] == [REP_SERVER, REP_ACK]
    data = replies[0][1]
    (length,) = struct.unpack(">I", data[:4])
    assert data[4: 4 + length] == b"disk"
    assert b"disk.img" in data[4 + length:]
    # LIST does not end negotiation.
    assert go_default(raw)[0] == SIZE
    read_works(raw)


def test_list_with_data_is_invalid(raw):
    raw.greeting()
    raw.send_option(OPT_LIST, b"junk")
    replies = raw.option_replies(OPT_LIST)
    assert [r for r, _ in replies] == [REP_ERR_INVALID]


def test_starttls_is_refused_by_policy_and_negotiation_continues(raw):
    raw.greeting()
    raw.send_option(OPT_STARTTLS)
    assert [r for r, _ in raw.option_replies(OPT_STARTTLS)] == [REP_ERR_POLICY]
    size, _ = go_default(raw)
    assert size == SIZE
    read_works(raw)


def go_default(raw, name=""):
    replies = raw.go(name, [INFO_BLOCK_SIZE])
    assert replies[-1][0] == REP_ACK, replies
    for rtype, data in replies:
        if rtype == REP_INFO and struct.unpack(">H", data[:2])[0] == INFO_EXPORT:
            _, size, flags = struct.unpack(">HQH", data)
            return size, flags
    raise AssertionError(replies)


def info_map(replies):
    out = {}
    for rtype, data in replies:
        assert rtype in (REP_INFO, REP_ACK), replies
        if rtype == REP_INFO:
            kind = struct.unpack(">H", data[:2])[0]
            assert kind not in out, f"info {kind} sent twice"
            out[kind] = data[2:]
    return out


def test_info_replies(raw):
    raw.greeting()
    replies = raw.go("", [INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE], opt=OPT_INFO)
    assert replies[-1][0] == REP_ACK
    info = info_map(replies)
    size, flags = struct.unpack(">QH", info[INFO_EXPORT])
    assert size == SIZE
    assert flags & 0x1, "HAS_FLAGS must be set"
    assert not flags & 0x2, "read-write export advertised read-only"
    assert info[INFO_NAME] == b"disk"
    assert b"disk.img" in info[INFO_DESCRIPTION]
    assert struct.unpack(">III", info[INFO_BLOCK_SIZE]) == (1, 4096, 32 * MiB)
    # INFO then GO with the same request: the same answers.
    replies_go = raw.go("", [INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE])
    assert info_map(replies_go) == info
    raw.structured = False
    read_works(raw)


@pytest.mark.parametrize(
    "payload",
    [
        struct.pack(">I", 10) + b"ab" + struct.pack(">H", 0),  # name length lies
        struct.pack(">I", 0) + struct.pack(">H", 3) + b"\0\0",  # request count lies
        b"\0\0",  # too short
        struct.pack(">I", 0) + struct.pack(">H", 0) + b"x",  # trailing byte
    ],
    ids=["name-len", "count", "short", "trailing"],
)
def test_malformed_go_is_invalid_and_negotiation_continues(raw, payload):
    raw.greeting()
    raw.send_option(OPT_GO, payload)
    assert [r for r, _ in raw.option_replies(OPT_GO)] == [REP_ERR_INVALID]
    size, _ = go_default(raw)
    assert size == SIZE
    read_works(raw)


def test_go_unknown_export_then_default(raw):
    raw.greeting()
    replies = raw.go("nosuch", [INFO_BLOCK_SIZE])
    assert [r for r, _ in replies] == [REP_ERR_UNKNOWN], "no INFO replies before the error"
    assert go_default(raw, "disk")[0] == SIZE
    read_works(raw)


def test_oversized_option_is_too_big_and_skipped(raw):
    raw.greeting()
    raw.send_option(OPT_GO, b"\0" * (100 * 1024))
    assert [r for r, _ in raw.option_replies(OPT_GO)] == [REP_ERR_TOO_BIG]
    assert go_default(raw)[0] == SIZE
    read_works(raw)


def test_abort(raw):
    raw.greeting()
    raw.send_option(OPT_ABORT)
    assert [r for r, _ in raw.option_replies(OPT_ABORT)] == [REP_ACK]
    assert raw.at_eof()


def test_meta_context_options(raw):
    raw.greeting()

    def meta_payload(name, queries):
        out = struct.pack(">I", len(name)) + name.encode() + struct.pack(">I", len(queries))
        for q in queries:
            out += struct.pack(">I", len(q)) + q.encode()
        return out

    # SET before structured replies: invalid.
    raw.send_option(OPT_SET_META_CONTEXT, meta_payload("", ["base:allocation"]))
    assert [r for r, _ in raw.option_replies(OPT_SET_META_CONTEXT)] == [REP_ERR_INVALID]
    raw.send_option(OPT_STRUCTURED_REPLY)
    assert [r for r, _ in raw.option_replies(OPT_STRUCTURED_REPLY)] == [REP_ACK]
    for queries in ([], ["base:"], ["base:allocation"], ["other:x", "base:allocation"]):
        raw.send_option(OPT_LIST_META_CONTEXT, meta_payload("disk", queries))
        replies = raw.option_replies(OPT_LIST_META_CONTEXT)
        assert [r for r, _ in replies] == [REP_META_CONTEXT, REP_ACK], queries
        assert replies[0][1][4:] == b"base:allocation"
    # Unknown namespace: ignored, nothing listed.
    raw.send_option(OPT_LIST_META_CONTEXT, meta_payload("disk", ["other:x"]))
    assert [r for r, _ in raw.option_replies(OPT_LIST_META_CONTEXT)] == [REP_ACK]
    # Unknown export.
    raw.send_option(OPT_SET_META_CONTEXT, meta_payload("nosuch", ["base:allocation"]))
    assert [r for r, _ in raw.option_replies(OPT_SET_META_CONTEXT)] == [REP_ERR_UNKNOWN]
    # Query count running past the payload.
    raw.send_option(OPT_SET_META_CONTEXT, struct.pack(">II", 0, 5))
    assert [r for r, _ in raw.option_replies(OPT_SET_META_CONTEXT)] == [REP_ERR_INVALID]
    raw.send_option(OPT_SET_META_CONTEXT, meta_payload("disk", ["base:allocation"]))
    replies = raw.option_replies(OPT_SET_META_CONTEXT)
    assert [r for r, _ in replies] == [REP_META_CONTEXT, REP_ACK]
    context_id = struct.unpack(">I", replies[0][1][:4])[0]
    assert go_default(raw)[0] == SIZE
    raw.structured = True
    # BLOCK_STATUS answers with the context id handed out.
    cookie = raw.send_request(7, 0, 65536)
    got, chunks, err = raw.structured_reply()
    assert got == cookie and err == 0
    assert chunks[0][0] == 5  # NBD_REPLY_TYPE_BLOCK_STATUS
    cid, length, flags = struct.unpack(">III", chunks[0][1][:12])
    assert cid == context_id and length >= 65536 and flags == 3


# -- old-style NBD_OPT_EXPORT_NAME ---------------------------------------------------


@pytest.mark.parametrize("name", ["disk", ""])
@pytest.mark.parametrize("no_zeroes", [False, True])
def test_export_name_option(raw, name, no_zeroes):
    raw.greeting(client_flags=0x1 | (0x2 if no_zeroes else 0))
    raw.send_option(OPT_EXPORT_NAME, name.encode())
    size, flags = struct.unpack(">QH", raw.recv_exact(10))
    assert size == SIZE and flags & 1
    if not no_zeroes:
        assert raw.recv_exact(124) == bytes(124)
    # Transmission begins at once: the next bytes are the read's reply.
    read_works(raw, 4096, 100)


def test_export_name_unknown_disconnects(raw, server):
    raw.greeting()
    raw.send_option(OPT_EXPORT_NAME, b"nosuch")
    assert raw.at_eof()
    # Other clients are unaffected.
    with RawNBD(server.raw_address()) as other:
        other.greeting()
        other.send_option(OPT_EXPORT_NAME, b"disk")
        assert struct.unpack(">QH", other.recv_exact(10))[0] == SIZE


def test_bad_option_magic_disconnects(raw, server):
    raw.greeting()
    raw.sock.sendall(struct.pack(">QII", 0x1122334455667788, OPT_LIST, 0))
    assert raw.at_eof()
    h = nbd_connect(server.uri())
    h.shutdown()


def test_client_vanishing_mid_handshake_is_harmless(server):
    for cut in (0, 2, 10, 20):
        conn = RawNBD(server.raw_address())
        conn.greeting()
        payload = struct.pack(">QII", 0x49484156454F5054, OPT_GO, 100)
        conn.sock.sendall(payload[:cut])
        conn.close()
    h = nbd_connect(server.uri())
    assert h.get_size() == SIZE
    h.shutdown()
