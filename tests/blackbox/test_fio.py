"""fio smoke: a short random read/write job with data verification."""


from __future__ import annotations

import json

from bbhelpers import emulator, run


def test_fio_randrw_verify(server, seed, need_tools):
    need_tools("fio")
    result = run(
        [
            "fio",
            "--name=smoke",
            "--ioengine=nbd",
            f"--uri={server.uri()}",
            "--rw=randrw",
            "--bs=4k",
            "--iodepth=16",
            # One pass over the whole export (~1-2 s), then fio's verify pass.
            # Not --time_based: looping rewrites blocks, and fio's verify log
            # then expects stale seeds ("bad header rand_seed"), against any
            # server (qemu-nbd too).
            "--size=64M",
            "--runtime=20",
            "--verify=crc32c",
            "--verify_fatal=1",
            # No verify state file left in the working directory.
            "--verify_state_save=0",
            f"--randseed={seed}",
            "--output-format=json",
        ],
        timeout=60,
    )
    assert result.returncode == 0, result.describe()
    job = json.loads(result.stdout[result.stdout.index("{"):])["jobs"][0]
    assert job["error"] == 0, job
    assert job["write"]["total_ios"] > 0 and job["read"]["total_ios"] > 0, job
    server.stop_clean()
    verify = emulator("image", "verify", server.image)
    assert verify.returncode == 0, verify.describe()
