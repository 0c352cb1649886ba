"""Volume ownership and controller failover in a whole domain (`emulator up`),
with real processes, real signals and the write oracle (`emulator workload`):

- every volume is served at its owning controller's address; the partner's
  address refuses it with a message naming the owner and where to attach;
- kill -9 of the owning driver under a writer with 16 requests in flight: the
  partner takes the volume and the dead driver's address over, the writer
  reconnects to the same URI by itself, the management plane reports the new
  owner; the driver restarted takes its volume back (failback) while the
  writer runs; afterwards no acknowledged-and-flushed write is lost and a
  scrub finds nothing;
- SIGSTOP of the owning driver: the partner fences it (SIGKILL) once its lease
  runs out, then takes over; nothing durable is lost.
"""

from __future__ import annotations

import json
import signal
import subprocess

from bbhelpers import emulator, emulator_bin, run, wait_until
from test_domain import CONFIG, Domain

TWO_VOLUMES = CONFIG.replace("volumes = 1", "volumes = 2")


def volumes(domain: Domain, pair: str = "B") -> dict:
    return {v["name"]: v for v in domain.get(pair, "/api/v1/domain")["systems"][0]["volumes"]}


def wait_owner(domain: Domain, name: str, owner: str, path: str, pair: str = "B", timeout: float = 15):
    def there():
        volume = volumes(domain, pair)[name]
        return volume if (volume["owner"], volume["path"]) == (owner, path) else None

    return wait_until(there, timeout, f"server {pair} to report {name} owned by {owner}, path {path}")


def start_writer(uri: str, seed: int, record, duration: str = "8s", extra=(),
                 fua_every: int = 7, flush_every: int = 32) -> subprocess.Popen:
    args = [str(emulator_bin()), "workload", "run", "--uri", uri, "--seed", str(seed),
            "--duration", duration, "--qd", "16", "--fua-every", str(fua_every),
            "--flush-every", str(flush_every), "--record", str(record), "--json", *extra]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def writer_going(uri: str, seed: int, record, duration: str, extra=(), **every) -> subprocess.Popen:
    """A writer started and seen acknowledging writes (`fua_every`,
    `flush_every` as `start_writer` takes them)."""
    writer = start_writer(uri, seed, record, duration=duration, extra=extra, **every)
    wait_until(lambda: acked(record) >= 300 or writer.poll() is not None, 30, "the writer to get going")
    assert writer.poll() is None, writer.communicate()
    return writer


def acked(record) -> int:
    try:
        return record.read_text().count('{"acked":')
    except FileNotFoundError:
        return 0


def finish(writer: subprocess.Popen) -> dict:
    out, err = writer.communicate(timeout=120)
    assert writer.returncode == 0, f"workload run exit {writer.returncode}\n{out}\n{err[-3000:]}"
    return json.loads(out)


def verify_nothing_lost(uri: str, record) -> dict:
    result = emulator("workload", "verify", "--uri", uri, "--record", record, "--json", timeout=120)
    assert result.returncode == 0, result.describe()
    report = json.loads(result.stdout)
    assert report["writes_durable"] > 0, report
    return report


def scrub_is_clean(domain: Domain):
    status, task = domain.submit("B", "c1", "scrub")
    assert status == 202, task
    ended = domain.wait_task("B", task["id"], timeout=120)
    assert ended["state"] == "complete", ended
    assert ended["result"]["checksum_errors"] == 0, ended["result"]
    assert ended["result"]["parity_mismatches"] == 0, ended["result"]


def test_each_volume_is_served_at_its_owners_address_and_the_partner_refuses_it(tmp_path):
    domain = Domain(tmp_path, TWO_VOLUMES)
    domain.up()
    try:
        clusters = {c["name"]: c for c in domain.get("A", "/api/v1/domain")["systems"][0]["clusters"]}
        address = {name: c["state"]["nbd_address"] for name, c in clusters.items()}
        found = volumes(domain, "A")
        for name, home in (("vol0", "s0/c0"), ("vol1", "s0/c1")):
            volume = found[name]
            assert (volume["home"], volume["owner"], volume["path"]) == (home, home, "optimized"), volume
            assert volume["uri"] == f"nbd://{address[home]}/{name}"
            info = run(["nbdinfo", "--size", volume["uri"]], check=True)
            assert int(info.stdout) == volume["size"]
        # The partner's address refuses vol1, naming its owner and its URI.
        refused = run(["qemu-img", "info", f"nbd://{address['s0/c0']}/vol1"])
        assert refused.returncode != 0
        assert "owned by controller s0/c1" in refused.stderr, refused.stderr
        assert f"nbd://{address['s0/c1']}/vol1" in refused.stderr, refused.stderr
        # emulator status shows the owner and the path.
        status = emulator("status", "--run-dir", domain.run_dir, check=True)
        assert "owner s0/c1 (home s0/c1), path optimized" in status.stdout, status.stdout
    finally:
        domain.down()


def test_kill9_of_the_owner_under_load_loses_nothing_and_it_fails_back(tmp_path, seed):
    domain = Domain(tmp_path)
    domain.up()
    try:
        uri = volumes(domain)["vol0"]["uri"]
        record = tmp_path / "writes.jsonl"
        writer = writer_going(uri, seed, record, "10s")
        domain.kill("s0/c0/driver")
        # The partner serves it at the same address; both servers say so.
        failed_over = wait_owner(domain, "vol0", "s0/c1", "failed-over")
        assert failed_over["uri"] == uri and failed_over["home"] == "s0/c0"
        wait_owner(domain, "vol0", "s0/c1", "failed-over", pair="A")
        before = acked(record)
        wait_until(lambda: acked(record) >= before + 300 or writer.poll() is not None, 30,
                   "writes to go on through the partner")
        assert writer.poll() is None, writer.communicate()
        # Failback while the writer runs.
        result = emulator("restart", "--run-dir", domain.run_dir, "s0/c0/driver")
        assert result.returncode == 0, result.describe()
        domain.killed.discard("s0/c0/driver")
        wait_owner(domain, "vol0", "s0/c0", "optimized")
        summary = finish(writer)
        assert summary["mismatches"] == 0, summary
        assert summary["reconnects"] >= 2, summary  # the kill, then the failback
        print(f"stalls (ms): {summary['stalls_ms']}")
        verify_nothing_lost(uri, record)
        scrub_is_clean(domain)
    finally:
        if "writer" in locals() and writer.poll() is None:
            writer.kill()
        domain.down()


def test_a_hung_owner_is_fenced_and_the_partner_takes_over(tmp_path, seed):
    domain = Domain(tmp_path)
    domain.up()
    try:
        uri = volumes(domain)["vol0"]["uri"]
        record = tmp_path / "writes.jsonl"
        writer = writer_going(uri, seed, record, "6s", extra=("--request-timeout", "10s"))
        domain.kill("s0/c0/driver", signal.SIGSTOP)
        domain.killed.add("s0/c0/driver")
        # Fenced: the partner killed it once its lease ran out.
        ended = wait_until(lambda: domain.processes()["s0/c0/driver"]["ended"], 15, "the hung driver to be fenced")
        assert "SIGKILL" in ended, ended
        wait_owner(domain, "vol0", "s0/c1", "failed-over")
        log = (domain.run_dir / "logs" / "s0-c1-driver.log").read_text()
        assert "fencing it" in log and "partner fenced" in log, log[-2000:]
        summary = finish(writer)
        assert summary["mismatches"] == 0 and summary["reconnects"] >= 1, summary
        verify_nothing_lost(uri, record)
    finally:
        if "writer" in locals() and writer.poll() is None:
            writer.kill()
        domain.down()


def test_a_driver_restarted_after_both_died_takes_back_its_volumes_and_its_partners(tmp_path):
    """kill -9 of c0 (c1 takes vol0 over), then of c1 too: nobody will hand vol0
    back, so c0, restarted, claims it and also takes vol1 over."""
    domain = Domain(tmp_path, TWO_VOLUMES)
    domain.up()
    try:
        domain.kill("s0/c0/driver")
        wait_owner(domain, "vol0", "s0/c1", "failed-over")
        domain.kill("s0/c1/driver")
        result = emulator("restart", "--run-dir", domain.run_dir, "s0/c0/driver")
        assert result.returncode == 0, result.describe()
        wait_owner(domain, "vol0", "s0/c0", "optimized")
        vol1 = wait_owner(domain, "vol1", "s0/c0", "failed-over")
        for volume in (volumes(domain)["vol0"], vol1):
            info = run(["nbdinfo", "--size", volume["uri"]], check=True)
            assert int(info.stdout) == volume["size"]
    finally:
        domain.down()
