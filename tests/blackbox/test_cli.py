"""The `emulator image ...` commands and `serve` start-up errors.

Contract: exit 0 on success; `image verify` exits 1 and names every bad block;
bad input prints one error line on stderr, exits 2 and changes no file.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import zlib
from pathlib import Path

import pytest

from bbhelpers import (
    BLOCK,
    MiB,
    SIDECAR_HEADER,
    ZERO_BLOCK_CRC,
    corrupt_block,
    create_image,
    emulator,
    error_line,
    usage_error,
    sidecar,
    snapshot,
)

SIZE = 16 * MiB
BLOCKS = SIZE // BLOCK


def test_create_info_verify_happy_path(tmp_path):
    img = tmp_path / "disk.img"
    result = emulator("image", "create", img, "--size", "16MiB")
    assert result.returncode == 0, result.describe()
    assert str(img) in result.stdout and str(sidecar(img)) in result.stdout, result.describe()
    assert img.stat().st_size == SIZE
    assert sidecar(img).stat().st_size == sidecar_len(BLOCKS)
    assert sidecar(img).read_bytes()[:8] == b"EMUCRC32"

    info = emulator("image", "info", img, "--json", check=True)
    doc = json.loads(info.stdout)
    assert doc["image"] == str(img)
    assert doc["sidecar"] == str(sidecar(img))
    assert doc["size_bytes"] == SIZE
    assert doc["block_size"] == BLOCK
    assert doc["block_count"] == BLOCKS
    assert doc["sidecar_version"] == 2
    # Created sparse.
    assert 0 <= doc["allocated_bytes"] < SIZE

    text = emulator("image", "info", img, check=True).stdout
    assert f"{SIZE} bytes" in text and str(BLOCKS) in text, text

    verify = emulator("image", "verify", img)
    assert verify.returncode == 0, verify.describe()
    assert f"{BLOCKS} blocks checked, 0 bad" in verify.stdout, verify.describe()

    verify_json = emulator("image", "verify", img, "--json")
    assert verify_json.returncode == 0, verify_json.describe()
    report = json.loads(verify_json.stdout)
    assert report["blocks_checked"] == BLOCKS
    assert report["bad_blocks"] == []


@pytest.mark.parametrize(
    "text,size",
    [("4096", 4096), ("8k", 8192), ("12KiB", 12288), ("1MiB", MiB), ("2m", 2 * MiB), ("1M", MiB)],
)
def test_create_accepts_binary_units(tmp_path, text, size):
    img = tmp_path / "u.img"
    emulator("image", "create", img, "--size", text, check=True)
    assert img.stat().st_size == size
    assert json.loads(emulator("image", "info", img, "--json", check=True).stdout)["size_bytes"] == size


@pytest.mark.parametrize(
    "text,problem",
    [
        ("0", "greater than zero"),
        ("4097", "multiple of 4 KiB"),
        ("6KiB", "multiple of 4 KiB"),
        ("64MB", "ambiguous"),
        ("64XiB", "unknown size unit"),
        ("1.5GiB", "unknown size unit"),
        ("-1", "not a size"),
        ("abc", "not a size"),
        ("", "not a size"),
        ("99999999999TiB", "too large"),
    ],
)
def test_create_rejects_bad_size(tmp_path, text, problem):
    img = tmp_path / "bad.img"
    result = emulator("image", "create", img, f"--size={text}")
    assert result.returncode == 2, result.describe()
    assert problem in error_line(result)
    assert not img.exists() and not sidecar(img).exists(), "a refused create left files behind"
    assert list(tmp_path.iterdir()) == []


def _random_contents(img: Path, rng):
    """Puts random bytes in an image and its sidecar so "unchanged" means something."""
    with open(img, "r+b") as f:
        f.seek(rng.randrange(0, SIZE - 8192))
        f.write(rng.randbytes(8192))


@pytest.mark.parametrize("size", ["16MiB", "32MiB"])
def test_create_refuses_existing_image_without_force(tmp_path, rng, size):
    img = create_image(tmp_path / "disk.img", SIZE)
    _random_contents(img, rng)
    before = snapshot(img, sidecar(img))
    result = emulator("image", "create", img, "--size", size)
    assert result.returncode == 2, result.describe()
    line = error_line(result)
    assert "already exists" in line and "--force" in line and str(img) in line
    assert snapshot(img, sidecar(img)) == before


def test_create_refuses_existing_sidecar_without_force(tmp_path, rng):
    img = create_image(tmp_path / "disk.img", SIZE)
    img.unlink()
    before = snapshot(sidecar(img))
    result = emulator("image", "create", img, "--size", "16MiB")
    assert result.returncode == 2, result.describe()
    assert str(sidecar(img)) in error_line(result)
    assert not img.exists(), "refused create made the image anyway"
    assert snapshot(sidecar(img)) == before


def test_force_recreates(tmp_path, rng):
    img = create_image(tmp_path / "disk.img", SIZE)
    _random_contents(img, rng)
    result = emulator("image", "create", img, "--size", "8MiB", "--force")
    assert result.returncode == 0, result.describe()
    assert img.stat().st_size == 8 * MiB
    assert img.read_bytes() == bytes(8 * MiB)
    assert sidecar(img).stat().st_size == sidecar_len(8 * MiB // BLOCK)
    verify = emulator("image", "verify", img, "--json")
    assert verify.returncode == 0, verify.describe()
    assert json.loads(verify.stdout)["blocks_checked"] == 8 * MiB // BLOCK


# -- broken image / sidecar pairs -------------------------------------------------


def sidecar_len(blocks: int) -> int:
    """Sidecar version 2: header, a CRC per block, then (8-aligned) a pending
    word per block."""
    crc_end = SIDECAR_HEADER + 4 * blocks
    return (crc_end + 7) // 8 * 8 + 8 * blocks


def _missing_sidecar(img, rng):
    sidecar(img).unlink()
    return "missing"


def _sidecar_short_entries(img, rng):
    data = sidecar(img).read_bytes()
    sidecar(img).write_bytes(data[:-4])
    return "truncated"


def _sidecar_short_header(img, rng):
    sidecar(img).write_bytes(sidecar(img).read_bytes()[:10])
    return "truncated"


def _sidecar_empty(img, rng):
    sidecar(img).write_bytes(b"")
    return "truncated"


def _sidecar_extended(img, rng):
    with open(sidecar(img), "ab") as f:
        f.write(b"\0" * 4)
    return "truncated"


def _sidecar_foreign(img, rng):
    sidecar(img).write_bytes(rng.randbytes(SIDECAR_HEADER + 4 * BLOCKS))
    return "not an emulator checksum file"


def _sidecar_header_bitflip(img, rng):
    data = bytearray(sidecar(img).read_bytes())
    data[20] ^= 0x01  # inside image_size: header CRC must catch it
    sidecar(img).write_bytes(bytes(data))
    return "header checksum"


def _image_truncated(img, rng):
    os.truncate(img, SIZE // 2)
    return "checksum file describes"


def _image_extended(img, rng):
    os.truncate(img, SIZE * 2)
    return "checksum file describes"


def _image_odd_size(img, rng):
    os.truncate(img, SIZE - 1000)
    return "not a positive multiple of 4 KiB"


def _image_empty(img, rng):
    os.truncate(img, 0)
    return "not a positive multiple of 4 KiB"


BROKEN = [
    _missing_sidecar,
    _sidecar_short_entries,
    _sidecar_short_header,
    _sidecar_empty,
    _sidecar_extended,
    _sidecar_foreign,
    _sidecar_header_bitflip,
    _image_truncated,
    _image_extended,
    _image_odd_size,
    _image_empty,
]


def _serve_args(img, tmp_path):
    return ["serve", "--image", img, "--socket", tmp_path / "never.sock"]


@pytest.mark.parametrize("damage", BROKEN, ids=lambda f: f.__name__.strip("_"))
@pytest.mark.parametrize("command", ["info", "verify", "serve", "serve-ro"])
def test_broken_pair_is_refused_and_left_alone(tmp_path, rng, damage, command):
    img = create_image(tmp_path / "disk.img", SIZE)
    _random_contents(img, rng)
    problem = damage(img, rng)
    before = snapshot(img, sidecar(img))
    if command in ("info", "verify"):
        args = ["image", command, img]
    else:
        args = _serve_args(img, tmp_path) + (["--read-only"] if command == "serve-ro" else [])
    result = emulator(*args, timeout=20)
    assert result.returncode == 2, result.describe()
    assert problem in error_line(result), result.describe()
    assert snapshot(img, sidecar(img)) == before, "a refused command changed the files"
    assert not (tmp_path / "never.sock").exists()


@pytest.mark.parametrize("command", ["info", "verify", "serve"])
def test_unreadable_paths(tmp_path, command):
    missing = tmp_path / "nonexistent.img"
    directory = tmp_path / "adir"
    directory.mkdir()
    for path, problem in [(missing, "No such file"), (directory, None)]:
        if command == "serve":
            args = _serve_args(path, tmp_path)
        else:
            args = ["image", command, path]
        result = emulator(*args, timeout=20)
        assert result.returncode == 2, result.describe()
        line = error_line(result)
        assert str(path) in line
        if problem:
            assert problem in line
        else:
            assert "not a regular file" in line or "Is a directory" in line, line
    assert not missing.exists()
    assert list(directory.iterdir()) == []


def test_create_in_missing_directory_fails_cleanly(tmp_path):
    result = emulator("image", "create", tmp_path / "no" / "such" / "disk.img", "--size", "1MiB")
    assert result.returncode == 2, result.describe()
    assert "No such file" in error_line(result)
    assert list(tmp_path.iterdir()) == []


def test_verify_names_every_corrupt_block(tmp_path, rng):
    img = create_image(tmp_path / "disk.img", SIZE)
    first = rng.randrange(0, BLOCKS // 2)
    second = rng.randrange(BLOCKS // 2, BLOCKS)
    contents = {
        first: corrupt_block(img, first, rng, within=rng.randrange(0, BLOCK - 16)),
        second: corrupt_block(img, second, rng, within=rng.randrange(0, BLOCK - 16)),
    }

    text = emulator("image", "verify", img)
    assert text.returncode == 1, text.describe()
    for block in (first, second):
        assert f"bad block {block} (byte offset {block * BLOCK})" in text.stdout, text.describe()
    assert f"{BLOCKS} blocks checked, 2 bad" in text.stdout, text.describe()

    js = emulator("image", "verify", img, "--json")
    assert js.returncode == 1, js.describe()
    report = json.loads(js.stdout)
    assert report["blocks_checked"] == BLOCKS
    assert report["bad_blocks"] == [
        {
            "block": block,
            "offset": block * BLOCK,
            "expected_crc": ZERO_BLOCK_CRC,
            "actual_crc": zlib.crc32(contents[block]),
        }
        for block in sorted(contents)
    ]


def test_verify_names_many_corrupt_blocks(tmp_path, rng):
    img = create_image(tmp_path / "disk.img", SIZE)
    bad = sorted(rng.sample(range(BLOCKS), 40))
    for block in bad:
        corrupt_block(img, block, rng, within=rng.randrange(0, BLOCK - 16), length=rng.randrange(1, 17))
    result = emulator("image", "verify", img, "--json")
    assert result.returncode == 1, result.describe()
    assert [b["block"] for b in json.loads(result.stdout)["bad_blocks"]] == bad
    text = emulator("image", "verify", img)
    assert text.returncode == 1
    named = [int(line.split()[2]) for line in text.stdout.splitlines() if line.startswith("bad block ")]
    assert named == bad


def test_corrupt_checksum_entry_is_a_bad_block(tmp_path, rng):
    img = create_image(tmp_path / "disk.img", SIZE)
    block = rng.randrange(BLOCKS)
    with open(sidecar(img), "r+b") as f:
        f.seek(SIDECAR_HEADER + 4 * block)
        f.write(b"\xde\xad\xbe\xef")
    result = emulator("image", "verify", img, "--json")
    assert result.returncode == 1, result.describe()
    bad = json.loads(result.stdout)["bad_blocks"]
    assert [b["block"] for b in bad] == [block]
    assert bad[0]["expected_crc"] == 0xEFBEADDE
    assert bad[0]["actual_crc"] == ZERO_BLOCK_CRC


# -- serve start-up errors ----------------------------------------------------------


def test_serve_refuses_busy_tcp_port(tmp_path, image):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = emulator("serve", "--image", image, "--listen", f"127.0.0.1:{port}", timeout=20)
    assert result.returncode == 2, result.describe()
    assert str(port) in error_line(result)


@pytest.mark.parametrize(
    "address", ["nonsense", "127.0.0.1:99999", "256.0.0.1:80", "127.0.0.1:"]
)
def test_serve_refuses_bad_listen_address(tmp_path, image, address):
    result = emulator("serve", "--image", image, "--listen", address, timeout=20)
    assert result.returncode == 2, result.describe()
    error_line(result)


def test_serve_refuses_socket_path_that_is_a_file(tmp_path, image, rng):
    path = tmp_path / "not-a-socket"
    path.write_bytes(rng.randbytes(100))
    before = snapshot(path)
    result = emulator("serve", "--image", image, "--socket", path, timeout=20)
    assert result.returncode == 2, result.describe()
    assert "not a socket" in error_line(result)
    assert snapshot(path) == before


def test_serve_refuses_socket_of_live_server(tmp_path, image, serve):
    import nbd

    first = serve(image, "unix")
    result = emulator("serve", "--image", image, "--socket", first.socket_path, timeout=20)
    assert result.returncode == 2, result.describe()
    assert "in use" in error_line(result)
    # The live server keeps its socket and still serves.
    h = nbd.NBD()
    h.connect_uri(first.uri())
    assert h.get_size() == 64 * MiB
    h.shutdown()


@pytest.mark.parametrize(
    "args,problem",
    [
        (["--max-connections", "0"], "max-connections"),
        (["--max-connections", "nope"], "max-connections"),
        (["--export", "x" * 4097], "export name"),
    ],
)
def test_serve_refuses_bad_options(tmp_path, image, args, problem):
    result = emulator("serve", "--image", image, *args, timeout=20)
    assert result.returncode == 2, result.describe()
    assert problem in error_line(result)


@pytest.mark.parametrize(
    "args,problem",
    [
        (["--image", "x.img", "--listen", "127.0.0.1:1", "--socket", "/tmp/x.sock"], "--socket"),
        (["--image", "x.img", "--bogus"], "--bogus"),
        (["--listen", "127.0.0.1:1"], "--image"),
    ],
)
def test_serve_usage_errors(tmp_path, args, problem):
    result = emulator("serve", *args, timeout=20)
    assert problem in usage_error(result)


# -- known bugs ---------------------------------------------------------------------

HUGE = 32 * 1024**4  # 32 TiB: beyond ext4's 16 TiB file limit


def _fs_refuses(path: Path, size: int) -> bool:
    probe = path / "probe"
    probe.touch()
    try:
        os.truncate(probe, size)
        return False
    except OSError as exc:
        return exc.errno == errno.EFBIG
    finally:
        probe.unlink()


def test_failed_create_leaves_nothing_behind(tmp_path):
    if not _fs_refuses(tmp_path, HUGE):
        pytest.skip("this file system accepts 32 TiB files")
    img = tmp_path / "big.img"
    result = emulator("image", "create", img, "--size", "32TiB")
    assert result.returncode == 2, result.describe()
    assert "File too large" in error_line(result)
    assert not img.exists() and not sidecar(img).exists(), (
        f"failed create left {sorted(p.name for p in tmp_path.iterdir())}"
    )


def test_failed_forced_create_keeps_existing_image(tmp_path, rng):
    if not _fs_refuses(tmp_path, HUGE):
        pytest.skip("this file system accepts 32 TiB files")
    img = create_image(tmp_path / "disk.img", SIZE)
    _random_contents(img, rng)
    before = snapshot(img, sidecar(img))
    result = emulator("image", "create", img, "--size", "32TiB", "--force")
    assert result.returncode == 2, result.describe()
    assert snapshot(img, sidecar(img)) == before, "failed create --force destroyed the image"


# -- cross-process block locks: where their tables live --------------------------------


def _lock_env(lock_dir: Path) -> dict:
    return {**os.environ, "EMULATOR_LOCK_DIR": str(lock_dir)}


def _table(lock_dir: Path, img: Path) -> Path:
    st = os.stat(img)
    return lock_dir / f"emulator-{os.geteuid()}" / f"emulator-blocklocks-{st.st_dev:x}-{st.st_ino}"


def test_serve_keeps_lock_tables_in_emulator_lock_dir(tmp_path, image, serve):
    import nbd

    lock_dir = tmp_path / "locks"
    lock_dir.mkdir()
    server = serve(image, "unix", env={"EMULATOR_LOCK_DIR": str(lock_dir)})
    table = _table(lock_dir, image)
    assert table.is_file(), sorted(lock_dir.rglob("*"))
    assert table.stat().st_mode & 0o777 == 0o600
    assert table.parent.stat().st_mode & 0o777 == 0o700
    h = nbd.NBD()
    h.connect_uri(server.uri())
    h.pwrite(b"x" * BLOCK, 0)
    h.shutdown()
    server.stop_clean()
    assert not table.exists(), "the last process to close the image removes its table"


def test_serve_refuses_a_lock_dir_that_does_not_exist(tmp_path, image):
    missing = tmp_path / "no-such-dir"
    result = run_with_env(_lock_env(missing), "serve", "--image", image, "--socket",
                          tmp_path / "s.sock")
    assert result.returncode == 2, result.describe()
    line = error_line(result)
    assert f"cross-process block locks cannot use EMULATOR_LOCK_DIR={missing}" in line, line
    assert not missing.exists()


def test_image_commands_refuse_a_symlink_planted_at_the_lock_table(tmp_path, image):
    lock_dir = tmp_path / "locks"
    lock_dir.mkdir()
    table = _table(lock_dir, image)
    table.parent.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    table.symlink_to(victim)
    before = snapshot(image)
    for args in (["image", "verify", image],
                 ["serve", "--image", image, "--socket", tmp_path / "s.sock"]):
        result = run_with_env(_lock_env(lock_dir), *args)
        assert result.returncode == 2, result.describe()
        line = error_line(result)
        assert f"{table} is not safe to use for cross-process block locks: is a symlink" in line, line
    assert victim.read_bytes() == b"precious"
    assert table.is_symlink(), "a planted symlink is refused, not removed"
    assert snapshot(image) == before


def test_image_commands_refuse_a_lock_table_others_may_read(tmp_path, image):
    lock_dir = tmp_path / "locks"
    lock_dir.mkdir()
    table = _table(lock_dir, image)
    table.parent.mkdir(mode=0o700)
    table.write_bytes(bytes(4096 * 8 + 16))
    table.chmod(0o644)
    result = run_with_env(_lock_env(lock_dir), "image", "verify", image)
    assert result.returncode == 2, result.describe()
    assert "has mode 0644: group or other may access it" in error_line(result)


def run_with_env(env: dict, *args):
    from bbhelpers import emulator_bin, run

    return run([emulator_bin(), *args], timeout=20, env=env)
