"""Real NBD clients (qemu-io, qemu-img, nbdinfo, nbdcopy) against the server, on a
Unix socket and on TCP loopback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bbhelpers import MiB, create_image, emulator, nbd_connect, run


def qemu_io(uri, *commands, expect_ok=True):
    args = ["qemu-io", "-f", "raw"]
    for c in commands:
        args += ["-c", c]
    result = run(args + [uri])
    failed = result.returncode != 0 or "failed" in result.stdout + result.stderr
    if expect_ok:
        assert not failed, result.describe()
    return result, failed


def test_qemu_io_patterns(server, need_tools):
    need_tools("qemu-io")
    uri = server.uri()
    qemu_io(uri, "write -P 0xab 0 64k", "read -P 0xab 0 64k")
    # Unaligned offsets and lengths, spanning block boundaries.
    qemu_io(uri, "write -P 0xcd 12345 6789", "read -P 0xcd 12345 6789")
    qemu_io(uri, "read -P 0xab 0 12345", "read -P 0xab 19134 46402")
    qemu_io(uri, "write -P 0x5a 65535 2", "read -P 0x5a 65535 2", "read -P 0x00 65537 4095")
    # Near the end of the export.
    end = 64 * MiB
    qemu_io(uri, f"write -P 0x77 {end - 5000} 5000", f"read -P 0x77 {end - 5000} 5000")
    # A new connection sees the same bytes.
    qemu_io(uri, "read -P 0xab 0 12345", f"read -P 0x00 {64 * 1024 + 1} 1M")
    # The pattern check can fail: bytes written as 0xab are not 0x00.
    result, failed = qemu_io(uri, "read -P 0x00 0 4k", expect_ok=False)
    assert failed and "Pattern verification failed" in result.stdout, result.describe()
    # Ranges beyond the end are refused.
    result, failed = qemu_io(uri, f"read {end - 512} 1024", expect_ok=False)
    assert failed, result.describe()


def test_qemu_img_info_reports_size(server, need_tools):
    need_tools("qemu-img")
    result = run(["qemu-img", "info", "--output=json", server.uri()])
    assert result.returncode == 0, result.describe()
    assert json.loads(result.stdout)["virtual-size"] == 64 * MiB


def test_qemu_img_convert_round_trip(tmp_path, serve, transport, rng, need_tools):
    need_tools("qemu-img")
    size = 16 * MiB
    img = create_image(tmp_path / "conv.img", size)
    server = serve(img, transport)
    src = tmp_path / "src.bin"
    src.write_bytes(rng.randbytes(size))
    out = tmp_path / "out.bin"
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, server.uri()], check=True)
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", server.uri(), out], check=True)
    assert out.read_bytes() == src.read_bytes()
    cmp = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", src, server.uri()])
    assert cmp.returncode == 0, cmp.describe()
    # compare can tell a difference: change one byte of the source.
    data = bytearray(src.read_bytes())
    data[rng.randrange(size)] ^= 0xFF
    src.write_bytes(bytes(data))
    cmp = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", src, server.uri()])
    assert cmp.returncode == 1, cmp.describe()
    server.stop_clean()
    # Everything written went through the checksums.
    verify = emulator("image", "verify", img)
    assert verify.returncode == 0, verify.describe()


def nbdinfo_json(uri):
    result = run(["nbdinfo", "--json", uri], check=True)
    doc = json.loads(result.stdout)
    assert len(doc["exports"]) == 1
    return doc, doc["exports"][0]


def test_nbdinfo_read_write_export(server, need_tools):
    need_tools("nbdinfo")
    doc, export = nbdinfo_json(server.uri())
    assert doc["protocol"] == "newstyle-fixed"
    assert doc["TLS"] is False
    assert export["export-name"] == "disk"
    assert export["export-size"] == 64 * MiB
    assert export["is_read_only"] is False
    for flag in ("can_flush", "can_trim", "can_zero", "can_fua", "can_multi_conn",
                 "can_fast_zero", "can_cache"):
        assert export[flag] is True, (flag, export)
    assert export["block_size_minimum"] == 1
    assert export["block_size_preferred"] == 4096
    assert export["block_size_maximum"] == 32 * MiB
    assert "base:allocation" in export["contexts"]


def test_nbdinfo_read_only_export(serve, image, transport, need_tools):
    need_tools("nbdinfo")
    server = serve(image, transport, read_only=True)
    _, export = nbdinfo_json(server.uri())
    assert export["export-size"] == 64 * MiB
    assert export["is_read_only"] is True
    assert export["can_trim"] is False
    assert export["can_zero"] is False
    assert export["can_fast_zero"] is False
    assert export["can_multi_conn"] is True


def test_nbdinfo_list_shows_export(serve, tmp_path, transport, need_tools):
    need_tools("nbdinfo")
    img = create_image(tmp_path / "vol7.img", 4 * MiB)
    server = serve(img, transport, export="volume-seven")
    listing_uri = server.uri(export="")
    result = run(["nbdinfo", "--list", "--json", listing_uri], check=True)
    exports = json.loads(result.stdout)["exports"]
    assert [e["export-name"] for e in exports] == ["volume-seven"]
    assert str(img) in exports[0]["description"]
    assert exports[0]["export-size"] == 4 * MiB
    text = run(["nbdinfo", "--list", listing_uri], check=True).stdout
    assert 'export="volume-seven"' in text, text


def test_export_names(serve, tmp_path, transport):
    import nbd

    img = create_image(tmp_path / "my.disk.img", 4 * MiB)
    server = serve(img, transport)
    # Default name is the file stem; the empty name selects it too.
    for name in ("my.disk", ""):
        h = nbd.NBD()
        h.set_full_info(True)  # asks for NBD_INFO_NAME and NBD_INFO_DESCRIPTION
        h.connect_uri(server.uri(export=name))
        assert h.get_size() == 4 * MiB
        assert h.get_canonical_export_name() == "my.disk"
        assert str(img) in h.get_export_description()
        h.shutdown()
    with pytest.raises(nbd.Error):
        nbd_connect(server.uri(export="my"))
    server.stop_clean()
    server2 = serve(img, transport, export="other")
    h = nbd_connect(server2.uri(export="other"))
    assert h.get_size() == 4 * MiB
    h.shutdown()
    with pytest.raises(nbd.Error):
        nbd_connect(server2.uri(export="my.disk"))


def test_nbdcopy_round_trip_64mib(server, tmp_path, rng, need_tools):
    need_tools("nbdcopy")
    src = tmp_path / "src.bin"
    src.write_bytes(rng.randbytes(64 * MiB))
    out = tmp_path / "out.bin"
    run(["nbdcopy", "--flush", src, server.uri()], check=True)
    run(["nbdcopy", server.uri(), out], check=True)
    assert out.stat().st_size == 64 * MiB
    assert out.read_bytes() == src.read_bytes()
    server.stop_clean()
    verify = emulator("image", "verify", server.image)
    assert verify.returncode == 0, verify.describe()
    info = json.loads(emulator("image", "info", server.image, "--json", check=True).stdout)
    assert info["allocated_bytes"] >= 64 * MiB


def nbdinfo_map(uri):
    result = run(["nbdinfo", "--map", "--json", uri], check=True)
    return [(e["offset"], e["length"], e["description"]) for e in json.loads(result.stdout)]


def test_nbdinfo_map_holes_and_data(server, need_tools):
    need_tools("nbdinfo", "qemu-io")
    size = 64 * MiB
    assert nbdinfo_map(server.uri()) == [(0, size, "hole,zero")]
    qemu_io(server.uri(), "write -P 0x11 0 1M")
    qemu_io(server.uri(), "discard 256k 256k")
    assert nbdinfo_map(server.uri()) == [
        (0, 256 * 1024, "data"),
        (256 * 1024, 256 * 1024, "hole,zero"),
        (512 * 1024, 512 * 1024, "data"),
        (MiB, size - MiB, "hole,zero"),
    ]
    qemu_io(server.uri(), "read -P 0x00 256k 256k", "read -P 0x11 512k 512k")


def _congestion_control_of_server_side(port):
    """The congestion control `ss` reports for the server's end of the one
    established connection on `port`."""
    known = Path("/proc/sys/net/ipv4/tcp_available_congestion_control").read_text().split()
    result = run(["ss", "-tinH", "state", "established", f"( sport = :{port} )"])
    assert result.returncode == 0, result.describe()
    names = [word for word in result.stdout.split() if word in known]
    assert len(names) == 1, f"one congestion control expected in:\n{result.stdout}"
    return names[0]


def test_a_loopback_tcp_connection_is_not_paced(serve, image, need_tools):
    """A connection from this host leaves a pacing congestion control (BBR) for
    cubic or reno; with any other default, the connection keeps it."""
    need_tools("ss")
    server = serve(image, "tcp")
    default = Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()
    handle = nbd_connect(server.uri())
    try:
        handle.pread(4096, 0)
        chosen = _congestion_control_of_server_side(server.port)
    finally:
        handle.shutdown()
    print(f"system default {default}, server side {chosen}")
    if default.startswith("bbr"):
        assert chosen in ("cubic", "reno"), chosen
    else:
        assert chosen == default, (chosen, default)
