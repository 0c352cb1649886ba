"""The write oracle, `emulator workload run|verify`, against the real server:
a clean run verifies; durable blocks overwritten behind the record's back are
reported LOST by exact range; a server killed (SIGKILL) mid-run is reconnected
to (restarted on the same socket, or a second server on the same image) and
nothing durable is lost; a writer killed mid-run leaves a record that still
verifies.
"""

from __future__ import annotations

import json
import signal
import subprocess

from bbhelpers import (
    BLOCK,
    CMD_TIMEOUT,
    EXIT_TIMEOUT,
    emulator,
    emulator_bin,
    nbd_connect,
    wait_until,
)


def run_args(uris, seed, record, duration="2s", extra=()):
    args = ["workload", "run", "--seed", seed, "--duration", duration, "--qd", "16",
            "--fua-every", "7", "--record", record, "--json"]
    for uri in uris:
        args += ["--uri", uri]
    return args + list(extra)


def verify(uri, record):
    result = emulator("workload", "verify", "--uri", uri, "--record", record, "--json")
    report = json.loads(result.stdout) if result.stdout.strip() else None
    return result, report


def parse_record(path):
    lines = path.read_text().splitlines()
    header = json.loads(lines[0])
    writes = {}
    for line in lines[1:]:
        entry = json.loads(line)
        if "sent" in entry:
            writes[entry["sent"]] = dict(entry, acked=False)
        elif "acked" in entry:
            writes[entry["acked"]]["acked"] = True
    return header, writes


def acked_lines(path):
    try:
        return path.read_text().count('{"acked":')
    except FileNotFoundError:
        return 0


def test_clean_run_verifies_and_overwritten_durable_range_is_lost(server, tmp_path, seed):
    # `server`: the image over a Unix socket and over TCP (nbd://127.0.0.1:PORT/disk).
    record = tmp_path / "run.jsonl"
    result = emulator(*run_args([server.uri()], seed, record))
    assert result.returncode == 0, result.describe()
    summary = json.loads(result.stdout)
    assert summary["mismatches"] == 0
    assert summary["writes_acked"] > 100 and summary["writes_failed"] == 0
    assert summary["fua_writes"] > 0 and summary["blocks_checked"] > 0
    assert summary["final_flush_acked"] is True
    assert summary["reconnects"] == 0

    result, report = verify(server.uri(), record)
    assert result.returncode == 0, result.describe()
    assert report["lost_blocks"] == 0 and report["blocks_checked"] > 0
    assert report["writes_durable"] == report["writes_acked"]  # the final FLUSH

    # Every acknowledged write is durable: zero the range of the last one that
    # wrote at least 2 blocks, through NBD, behind the record's back.
    _, writes = parse_record(record)
    victim = next(w for w in sorted(writes.values(), key=lambda w: -w["sent"])
                  if w["acked"] and w["len"] >= 2 * BLOCK)
    h = nbd_connect(server.uri())
    h.pwrite(bytes(victim["len"]), victim["offset"])
    h.flush()
    h.shutdown()

    result, report = verify(server.uri(), record)
    assert result.returncode == 1, result.describe()
    assert report["lost_blocks"] == victim["len"] // BLOCK
    assert [(r["offset"], r["length"]) for r in report["lost_ranges"]] == [
        (victim["offset"], victim["len"])
    ], report["lost_ranges"]
    block = report["lost_ranges"][0]["blocks"][0]
    assert block["found"]["kind"] == "unknown" and block["found"]["stamp"] is None
    # The text report names the range too.
    text = emulator("workload", "verify", "--uri", server.uri(), "--record", record)
    assert text.returncode == 1, text.describe()
    assert f"LOST offset {victim['offset']} length {victim['len']}" in text.stdout, text.stdout


def run_and_kill_server(tmp_path, seed, uris, kill, restart, extra=()):
    """Starts a run, kills a server with SIGKILL once writes are acknowledged,
    optionally restarts it once the run noticed, and returns the run's summary."""
    record = tmp_path / "run.jsonl"
    args = [str(emulator_bin()), *map(str, run_args(uris, seed, record, "6s", extra))]
    log = open(tmp_path / "workload.log", "wb")
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        wait_until(lambda: acked_lines(record) > 200, 20, "the run to acknowledge writes")
        kill.kill9()
        if restart:
            wait_until(lambda: '"lost"' in record.read_text(), 20, "the run to see the loss")
            kill.restart()
        stdout, _ = proc.communicate(timeout=CMD_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=EXIT_TIMEOUT)
        log.close()
    stderr = (tmp_path / "workload.log").read_text(errors="replace")
    assert proc.returncode == 0, f"exit {proc.returncode}\n{stdout}\n{stderr}"
    summary = json.loads(stdout)
    assert summary["reconnects"] >= 1, summary
    assert len(summary["stalls_ms"]) == summary["reconnects"]
    assert summary["stall_ms_max"] > 0
    assert summary["mismatches"] == 0
    assert summary["final_flush_acked"] is True
    assert "reconnected" in stderr, stderr
    return record, summary


def test_server_killed_and_restarted_on_same_socket(serve, image, tmp_path, seed):
    server = serve(image, "unix")
    record, summary = run_and_kill_server(
        tmp_path, seed, [server.uri()], kill=server, restart=True,
        extra=["--reconnect-timeout", "20s"],
    )
    result, report = verify(server.uri(), record)
    assert result.returncode == 0, result.describe()
    assert report["lost_blocks"] == 0


def test_failover_to_second_server_on_same_image(serve, image, tmp_path, seed):
    first = serve(image, "unix")
    second = serve(image, "unix")
    record, summary = run_and_kill_server(
        tmp_path, seed, [first.uri(), second.uri()], kill=first, restart=False,
    )
    assert '"connected":"' + second.uri() in record.read_text()
    result, report = verify(second.uri(), record)
    assert result.returncode == 0, result.describe()
    assert report["lost_blocks"] == 0


def test_stopped_server_times_out_and_fails_over(serve, image, tmp_path, seed):
    """A server that stops answering (SIGSTOP) is given up after
    --request-timeout; the run fails over to the second server. The stopped one
    is then killed without running again, so its stale writes never land."""
    first = serve(image, "unix")
    second = serve(image, "unix")
    record = tmp_path / "run.jsonl"
    args = [str(emulator_bin()), *map(str, run_args(
        [first.uri(), second.uri()], seed, record, "5s", ["--request-timeout", "1s"]))]
    log = open(tmp_path / "workload.log", "wb")
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        wait_until(lambda: acked_lines(record) > 200, 20, "the run to acknowledge writes")
        first.signal(signal.SIGSTOP)
        wait_until(lambda: record.read_text().count('"connected"') >= 2, 20,
                   "the run to fail over")
        first.kill9()
        stdout, _ = proc.communicate(timeout=CMD_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=EXIT_TIMEOUT)
        log.close()
    stderr = (tmp_path / "workload.log").read_text(errors="replace")
    assert proc.returncode == 0, f"exit {proc.returncode}\n{stdout}\n{stderr}"
    summary = json.loads(stdout)
    assert summary["reconnects"] == 1, summary
    # The stall counts from the first failed request: the timeout, 1 s after
    # the request was sent, not the request itself.
    assert 0 < summary["stall_ms_max"] < 10000, summary
    assert "no reply within 1000 ms" in record.read_text()
    result, report = verify(second.uri(), record)
    assert result.returncode == 0, result.describe()
    assert report["lost_blocks"] == 0


def test_writer_killed_mid_run_record_still_verifies(serve, image, tmp_path, seed):
    server = serve(image, "unix")
    record = tmp_path / "run.jsonl"
    args = [str(emulator_bin()), *map(str, run_args([server.uri()], seed, record, "30s"))]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: acked_lines(record) > 500, 20, "the run to acknowledge writes")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=EXIT_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    result, report = verify(server.uri(), record)
    assert result.returncode == 0, result.describe()
    assert report["lost_blocks"] == 0
    assert report["writes"] > 0 and report["blocks_checked"] > 0


def test_bad_input_exits_2(serve, image, tmp_path):
    server = serve(image, "unix")
    record = tmp_path / "bad.jsonl"
    record.write_text('{"record":"emulator-workload","version":1,"seed":1,"block_size":4096,'
                      '"size":67108864,"uris":[]}\nnot json\n{"acked":1}\n')
    result, _ = verify(server.uri(), record)
    assert result.returncode == 2, result.describe()
    assert "line 2" in result.stderr, result.stderr
    # No server: gives up after the reconnect timeout.
    result = emulator("workload", "run", "--uri", f"nbd+unix:///disk?socket={tmp_path}/none.sock",
                      "--seed", "1", "--duration", "1s", "--reconnect-timeout", "300ms",
                      "--record", tmp_path / "r.jsonl")
    assert result.returncode == 2, result.describe()
    assert "gave up" in result.stderr, result.stderr
    # An unknown export: the server's reply type and message.
    good = tmp_path / "empty.jsonl"
    good.write_text(record.read_text().splitlines()[0] + "\n")
    result = emulator("workload", "verify", "--uri", server.uri("nope"), "--record", good)
    assert result.returncode == 2, result.describe()
    assert "NBD_REP_ERR_UNKNOWN" in result.stderr, result.stderr
