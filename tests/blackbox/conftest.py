"""Fixtures for the black-box suite.

Run with Debian's interpreter (it has libnbd's `nbd` module):

    cargo build --release
    /usr/bin/python3 -m pytest -q tests/blackbox

The binary under test is $EMULATOR_BIN (default: <repo>/target/release/emulator).
Random data is seeded; set BLACKBOX_SEED to replay a failing run.
"""

from __future__ import annotations

import os
import random
import shutil
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from bbhelpers import MiB, Server, create_image, emulator_bin  # noqa: E402

REQUIRED_TOOLS = ("qemu-io", "qemu-img", "nbdinfo", "nbdcopy", "fio")


def pytest_configure(config):
    config.addinivalue_line("markers", "tools(names): external client programs the test runs")


@pytest.fixture(scope="session", autouse=True)
def _emulator_binary():
    path = emulator_bin()
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.exit(
            f"emulator binary {path} not found: run `cargo build --release` or set EMULATOR_BIN",
            returncode=2,
        )
    try:
        import nbd  # noqa: F401
    except ImportError:
        pytest.exit(
            "the `nbd` module (python3-libnbd) is missing: run the suite with /usr/bin/python3",
            returncode=2,
        )
    return path


@pytest.fixture
def need_tools():
    def check(*names):
        missing = [n for n in names if shutil.which(n) is None]
        if missing:
            pytest.fail(f"required client programs not installed: {missing}")

    return check


@pytest.fixture
def seed():
    value = int(os.environ.get("BLACKBOX_SEED", random.SystemRandom().randrange(2**32)))
    print(f"random seed: {value} (replay with BLACKBOX_SEED={value})")
    return value


@pytest.fixture
def rng(seed):
    return random.Random(seed)


@pytest.fixture(params=["unix", "tcp"])
def transport(request):
    return request.param


@pytest.fixture
def serve(tmp_path):
    """Factory: serve(image, transport="unix", **options) -> a started Server.

    Every server still running at the end is stopped with SIGTERM and must exit 0;
    one that a test stopped itself must have exited 0 too, unless the test killed
    it on purpose (SIGKILL, or marked expect_dead).
    """
    servers: list[Server] = []

    def start(image, transport="unix", wait=True, **options):
        server = Server(image=image, transport=transport, workdir=tmp_path, **options)
        servers.append(server)
        return server.start(wait=wait)

    yield start

    failures = []
    for server in servers:
        if server.proc is None:
            continue
        if server.proc.poll() is None:
            rc = server.stop()
        else:
            rc = server.proc.returncode
        if server.expect_dead:
            continue
        if rc != 0:
            failures.append(f"server {server.args()} exited {rc}\n{server.log()[-4000:]}")
    assert not failures, "\n".join(failures)


@pytest.fixture
def image(tmp_path):
    """A fresh 64 MiB image, tmp_path/disk.img (export name "disk")."""
    return create_image(tmp_path / "disk.img", 64 * MiB)


@pytest.fixture
def server(serve, image, transport):
    """The 64 MiB image served read-write on the parametrised transport."""
    return serve(image, transport)
