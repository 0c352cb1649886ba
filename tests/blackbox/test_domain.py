"""Whole domains (`emulator up --detach`): every flow of seed 002 between real
processes, driven through the HTTP API and the CLI, with real signals.

- start-up (FIG. 2): every agent registers with its server and reports;
- tasks (FIG. 4) through either server, with failure information;
- changes (FIG. 3) reaching both servers;
- isolation: kill -9 of an agent or a server leaves the other pair working
  (claims 1, 6, 7), and a restarted process registers again;
- bad input to the API and bad configuration files.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from bbhelpers import emulator, run, wait_until

CONFIG = """
[servers]
a = "s0/c0"
b = "s0/c1"

[ports]
nbd = 0
http = 0

[[systems]]
disks = 5
disk_size = "16MiB"
raid = "raid5"
spares = 1
chunk = "64KiB"
volumes = 1
"""


class Domain:
    def __init__(self, tmp_path: Path, config: str = CONFIG):
        self.run_dir = tmp_path / "run"
        self.config = tmp_path / "domain.toml"
        self.config.write_text(config)
        self.killed: set[str] = set()

    def up(self):
        result = emulator("up", "--config", self.config, "--run-dir", self.run_dir, "--detach", timeout=90)
        assert result.returncode == 0, result.describe()
        return result

    def down(self):
        result = emulator("down", "--run-dir", self.run_dir, timeout=90)
        assert result.returncode == 0, result.describe()
        return result

    @property
    def token(self) -> str:
        return (self.run_dir / "token").read_text().strip()

    def base(self, pair: str) -> str:
        published = json.loads((self.run_dir / "servers" / f"{pair.lower()}.json").read_text())
        return published["http"]

    def request(self, pair: str, method: str, path: str, body=None, token: str | None = "default", raw: bytes | None = None):
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.base(pair) + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if token == "default":
            token = self.token
        if token is not None:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=10) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"null")

    def get(self, pair: str, path: str):
        status, body = self.request(pair, "GET", path, token=None)
        assert status == 200, (status, body)
        return body

    def submit(self, pair: str, cluster: str, kind: str, **args):
        return self.request(pair, "POST", "/api/v1/tasks", {"system": "s0", "cluster": cluster, "kind": kind, "args": args})

    def wait_task(self, pair: str, task_id: str, timeout: float = 60) -> dict:
        def ended():
            task = self.get(pair, f"/api/v1/tasks/{task_id}")
            return task if task["state"] in ("complete", "failed") else None

        return wait_until(ended, timeout, f"task {task_id} on server {pair} to end")

    def processes(self) -> dict:
        return {p["name"]: p for p in json.loads((self.run_dir / "processes.json").read_text())}

    def kill(self, name: str, sig=signal.SIGKILL):
        pid = self.processes()[name]["pid"]
        os.kill(pid, sig)
        if sig == signal.SIGKILL:
            self.killed.add(name)
            wait_until(lambda: self.processes()[name]["ended"], 10, f"the supervisor to see {name} end")
        return pid

    def agent(self, pair: str, name: str) -> dict | None:
        agents = self.get(pair, "/api/v1/domain")["agents"]
        return next((a for a in agents if a["name"] == name), None)

    def wait_registered(self, pair: str, name: str, timeout: float = 15):
        def registered():
            agent = self.agent(pair, name)
            return agent and agent["state"] == "registered" and agent["revision"] is not None

        wait_until(registered, timeout, f"{name} to register with server {pair} and report")

    def devices(self, pair: str) -> list:
        return self.get(pair, "/api/v1/domain")["systems"][0]["disks"]


@pytest.fixture
def domain(tmp_path):
    d = Domain(tmp_path)
    d.up()
    yield d
    d.down()
    # Everything stopped in order and exited cleanly, but what a test killed.
    for name, process in d.processes().items():
        if name not in d.killed:
            assert process["ended"] == "exited 0", f"{name}: {process['ended']}"
    assert not (d.run_dir / "supervisor.json").exists()


def test_up_starts_every_process_and_every_agent_registers_and_reports(domain):
    expected = {
        "s0/c0/driver", "s0/c0/agent-a", "s0/c0/agent-b", "s0/c0/server-a",
        "s0/c1/driver", "s0/c1/agent-a", "s0/c1/agent-b", "s0/c1/server-b",
    }
    assert set(domain.processes()) == expected
    for pair in "AB":
        view = domain.get(pair, "/api/v1/domain")
        assert view["server"]["pair"] == pair
        # Agent A of each cluster with server A, agent B with server B (claim 1).
        names = {a["name"] for a in view["agents"] if a["state"] == "registered"}
        assert names == {f"s0/c0/agent-{pair.lower()}", f"s0/c1/agent-{pair.lower()}"}
        system = view["systems"][0]
        assert system["health"] == "optimal"
        # Configuration (how many devices) and state (each one's), claim 5.
        assert [(d["index"], d["role"], d["state"]) for d in system["disks"]] == [
            (0, "member", "available"), (1, "member", "available"), (2, "member", "available"),
            (3, "member", "available"), (4, "spare", "available"),
        ]
        clusters = {c["name"]: c for c in system["clusters"]}
        assert clusters["s0/c0"]["domain_server"] == "A" and clusters["s0/c1"]["domain_server"] == "B"
        for cluster in clusters.values():
            assert {p["state"] for p in cluster["processes"]} == {"running"}, cluster["processes"]
            roles = sorted((p["role"], p["pair"]) for p in cluster["processes"])
            assert roles[:3] == [("agent", "A"), ("agent", "B"), ("driver", None)]
    # Each cluster reports the volume at its owner's address, which serves it
    # (ownership and failover: test_failover.py).
    for cluster in domain.get("A", "/api/v1/domain")["systems"][0]["clusters"]:
        [volume] = cluster["state"]["volumes"]
        info = run(["nbdinfo", "--json", volume["uri"]], check=True)
        assert json.loads(info.stdout)["exports"][0]["export-size"] == volume["size"]


def test_a_task_goes_through_either_server_and_its_change_reaches_both(domain):
    for pair, cluster in (("A", "c1"), ("B", "c0")):
        status, task = domain.submit(pair, cluster, "scrub")
        assert status == 202, task
        assert task["agent"] == f"s0/{cluster}/agent-{pair.lower()}"
        ended = domain.wait_task(pair, task["id"])
        assert ended["state"] == "complete", ended
        assert ended["result"]["checksum_errors"] == 0
    # FIG. 3: a change made through B (a disk failed) reaches server A too.
    status, task = domain.submit("B", "c1", "fail-disk", disk=2)
    assert status == 202, task
    assert domain.wait_task("B", task["id"])["state"] == "complete"
    wait_until(lambda: domain.devices("A")[2]["state"] == "unavailable", 10, "server A to see disk 2 failed")
    assert domain.get("A", "/api/v1/domain")["systems"][0]["health"] == "degraded"


def test_failure_information_comes_back_from_the_driver(domain):
    # Valid for the API (disk 1 exists), refused by the array: failing a
    # second disk of a degraded RAID-5 would lose data... the driver says so.
    status, first = domain.submit("A", "c0", "fail-disk", disk=1)
    assert status == 202
    assert domain.wait_task("A", first["id"])["state"] == "complete"
    status, task = domain.submit("A", "c0", "volume-delete", name="no-such-volume")
    assert status == 202, task
    ended = domain.wait_task("A", task["id"])
    assert ended["state"] == "failed"
    assert "no-such-volume" in ended["failure"], ended
    # The CLI shows it and exits 1.
    result = emulator("task", "submit", "--run-dir", domain.run_dir, "--system", "s0", "--cluster", "c1",
                      "volume-delete", "--name", "nope", "--wait")
    assert result.returncode == 1, result.describe()
    assert "nope" in result.stdout, result.describe()


@pytest.mark.parametrize(
    "body,status,says",
    [
        (b"{not json", 400, "malformed"),
        (json.dumps({"system": "s0", "cluster": "c0", "kind": "explode"}).encode(), 400, "unknown task kind"),
        (json.dumps({"system": "s0", "cluster": "c0", "kind": "fail-disk", "args": {"disk": 9}}).encode(), 400, "out of range"),
        (json.dumps({"system": "s0", "cluster": "c0", "kind": "fail-disk"}).encode(), 400, "disk"),
        (json.dumps({"system": "s7", "cluster": "c0", "kind": "scrub"}).encode(), 404, "no system"),
        (json.dumps({"system": "s0", "cluster": "c5", "kind": "scrub"}).encode(), 404, "no cluster"),
        (json.dumps({"system": "s0", "cluster": "c0", "kind": "scrub", "colour": 1}).encode(), 400, "colour"),
    ],
    ids=["malformed", "unknown-kind", "disk-out-of-range", "missing-arg", "unknown-system", "unknown-cluster", "unknown-field"],
)
def test_bad_tasks_get_a_4xx_naming_what_was_wrong_and_change_nothing(domain, body, status, says):
    before = domain.devices("A")
    got, answer = domain.request("A", "POST", "/api/v1/tasks", raw=body)
    assert got == status, answer
    assert says in answer["error"], answer
    assert domain.get("A", "/api/v1/tasks")["tasks"] == []
    assert domain.devices("A") == before


def test_changes_need_the_token(domain):
    for token in (None, "0" * 64):
        status, answer = domain.request("A", "POST", "/api/v1/tasks",
                                        {"system": "s0", "cluster": "c0", "kind": "fail-disk", "args": {"disk": 0}},
                                        token=token)
        assert status == 401, answer
    assert domain.get("A", "/api/v1/tasks")["tasks"] == []
    assert domain.devices("A")[0]["state"] == "available"
    # The console's login link sets a cookie that works instead of the header.
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
    with opener.open(f"{domain.base('A')}/login?token={domain.token}", timeout=10) as page:
        assert b"Storage emulator" in page.read()
    req = urllib.request.Request(domain.base("A") + "/api/v1/tasks", method="POST",
                                 data=json.dumps({"system": "s0", "cluster": "c0", "kind": "report"}).encode())
    with opener.open(req, timeout=10) as response:
        assert response.status == 202


def test_killing_agent_a_leaves_pair_b_working_and_a_restarted_agent_registers_again(domain):
    domain.kill("s0/c1/agent-a")
    # Server A notices within 2 s.
    wait_until(lambda: domain.agent("A", "s0/c1/agent-a")["state"] == "lost", 2, "server A to lose agent A of s0/c1")
    status, answer = domain.submit("A", "c1", "report")
    assert status == 409 and "server B" in answer["error"], answer
    status, task = domain.submit("B", "c1", "fail-disk", disk=3)
    assert status == 202, task
    ended = domain.wait_task("B", task["id"])
    assert ended["state"] == "complete", ended
    result = emulator("restart", "--run-dir", domain.run_dir, "s0/c1/agent-a")
    assert result.returncode == 0, result.describe()
    domain.wait_registered("A", "s0/c1/agent-a")
    # It reported the state as it is now: the disk failed while it was away.
    cluster = lambda: next(c for c in domain.get("A", "/api/v1/domain")["systems"][0]["clusters"] if c["name"] == "s0/c1")
    wait_until(lambda: cluster()["state"]["devices"][3]["state"] == "unavailable", 10, "server A to see disk 3 failed")
    domain.killed.discard("s0/c1/agent-a")


def test_killing_server_a_leaves_server_b_serving_every_cluster_and_a_restarted_server_is_registered_with(domain):
    domain.kill("s0/c0/server-a")
    for cluster in ("c0", "c1"):
        status, task = domain.submit("B", cluster, "report")
        assert status == 202, task
        assert domain.wait_task("B", task["id"])["state"] == "complete"
    result = emulator("restart", "--run-dir", domain.run_dir, "s0/c0/server-a")
    assert result.returncode == 0, result.describe()
    for agent in ("s0/c0/agent-a", "s0/c1/agent-a"):
        domain.wait_registered("A", agent)
    domain.killed.discard("s0/c0/server-a")
    # Restarting what runs is refused.
    result = emulator("restart", "--run-dir", domain.run_dir, "s0/c0/server-a")
    assert result.returncode == 2 and "running" in result.stderr, result.describe()


def test_a_task_that_failed_with_pair_a_completes_through_pair_b(domain):
    """Claim 6: pair A dies while a task runs; the same task through B completes."""
    status, task = domain.submit("A", "c0", "scrub", rate_mib_s=8)
    assert status == 202, task
    wait_until(lambda: domain.get("A", f"/api/v1/tasks/{task['id']}")["state"] == "running", 10, "the scrub to run")
    domain.kill("s0/c0/agent-a")
    failed = domain.wait_task("A", task["id"], timeout=5)
    assert failed["state"] == "failed" and "server B" in failed["failure"], failed
    domain.kill("s0/c0/server-a")
    status, again = domain.submit("B", "c0", "scrub", rate_mib_s=200)
    assert status == 202, again
    ended = domain.wait_task("B", again["id"], timeout=60)
    assert ended["state"] == "complete", ended


def test_a_long_task_through_pair_b_continues_when_pair_a_dies(domain):
    """Claim 7."""
    status, task = domain.submit("B", "c1", "scrub", rate_mib_s=16)
    assert status == 202, task
    wait_until(lambda: domain.get("B", f"/api/v1/tasks/{task['id']}")["state"] == "running", 10, "the scrub to run")
    domain.kill("s0/c1/agent-a")
    domain.kill("s0/c0/agent-a")
    domain.kill("s0/c0/server-a")
    progress = []

    def ended():
        current = domain.get("B", f"/api/v1/tasks/{task['id']}")
        if current["progress"]:
            progress.append(current["progress"]["percent"])
        return current if current["state"] in ("complete", "failed") else None

    final = wait_until(ended, 60, "the scrub through B to end")
    assert final["state"] == "complete", final
    assert progress == sorted(progress), progress
    assert all(0 <= p <= 100 for p in progress)


def test_bad_configuration_files_are_refused_naming_the_field(tmp_path):
    for text, says in [
        ("[servers]\na = \"s0/c0\"\n", "systems"),
        (CONFIG.replace('raid = "raid5"', 'raid = "raid7"'), "systems[0].raid"),
        (CONFIG.replace('b = "s0/c1"', 'b = "s0/c0"'), "servers.b"),
        (CONFIG.replace("disks = 5", "disks = = 5"), "line"),
    ]:
        d = Domain(tmp_path, text)
        result = emulator("up", "--config", d.config, "--run-dir", d.run_dir, "--detach", timeout=30)
        assert result.returncode == 2, result.describe()
        assert says in result.stderr, result.describe()
        assert not (d.run_dir / "supervisor.json").exists()


def test_a_second_up_in_the_same_run_directory_is_refused(domain):
    result = emulator("up", "--config", domain.config, "--run-dir", domain.run_dir, "--detach", timeout=30)
    assert result.returncode == 2, result.describe()
    assert "already running" in result.stderr, result.describe()


def test_the_example_with_two_systems_and_a_server_on_the_host_comes_up(tmp_path):
    """Claims 2 and 4: server A on a cluster of the second system (neither of
    the first system's clusters is a domain server), server B on the host."""
    example = (Path(__file__).resolve().parents[2] / "examples" / "two-systems.toml").read_text()
    config = "\n".join(
        "nbd = 0" if line.startswith("nbd =") else "http = 0" if line.startswith("http =") else line
        for line in example.splitlines()
    )
    d = Domain(tmp_path, config)
    d.up()
    try:
        assert {p["name"] for p in d.processes().values()} >= {"s1/c0/server-a", "host/server-b"}
        for pair in "AB":
            view = d.get(pair, "/api/v1/domain")
            assert len([a for a in view["agents"] if a["state"] == "registered"]) == 4
            assert [s["health"] for s in view["systems"]] == ["optimal", "optimal"]
        view = d.get("B", "/api/v1/domain")
        assert [p["name"] for p in view["host_processes"]] == ["host/server-b"]
        assert view["systems"][1]["array"]["level"] == "raid6"
        status, task = d.submit("B", "c1", "scrub")
        assert status == 202, task
        assert d.wait_task("B", task["id"])["state"] == "complete"
    finally:
        d.down()


def test_with_only_server_a_configured_no_agent_b_is_launched(tmp_path):
    """Claim 11: agent A is launched because server A is configured; with no
    server B there is no agent B (and no server B), and tasks go through A."""
    d = Domain(tmp_path, CONFIG.replace('b = "s0/c1"\n', ""))
    d.up()
    try:
        assert set(d.processes()) == {
            "s0/c0/driver", "s0/c0/agent-a", "s0/c0/server-a",
            "s0/c1/driver", "s0/c1/agent-a",
        }
        view = d.get("A", "/api/v1/domain")
        assert [s["pair"] for s in view["servers"]] == ["A"]
        assert {a["name"] for a in view["agents"] if a["state"] == "registered"} == {
            "s0/c0/agent-a", "s0/c1/agent-a",
        }
        status, task = d.submit("A", "c1", "report")
        assert status == 202 and d.wait_task("A", task["id"])["state"] == "complete", task
    finally:
        d.down()


def verify_disks(domain: Domain):
    disks = domain.run_dir / "s0" / "disks"
    for image in sorted(disks.glob("*.img")):
        result = emulator("image", "verify", image)
        assert result.returncode == 0, result.describe()


@pytest.mark.parametrize("victim", ["s0/c0/driver", "s0/c1/driver"], ids=["initiator", "partner"])
def test_kill9_of_either_driver_during_a_rebuild_the_other_finishes_it(tmp_path, victim):
    """The two drivers of a server system are its two controllers (seed 004):
    a rebuild begun through s0/c0 is split across both; either killed, the
    other takes its partitions over, finishes the rebuild and its completion.
    Restarted, the killed driver ends the task it was following."""
    d = Domain(tmp_path, CONFIG.replace("volumes = 1", "volumes = 1\nauto_rebuild = false"))
    d.up()
    try:
        for kind, args in (("fail-disk", {"disk": 1}), ("replace-disk", {"disk": 1})):
            status, task = d.submit("A", "c0", kind, **args)
            assert status == 202 and d.wait_task("A", task["id"])["state"] == "complete", task
        status, task = d.submit("A", "c0", "rebuild", rate_mib_s=6)
        assert status == 202, task
        wait_until(lambda: (d.get("A", f"/api/v1/tasks/{task['id']}")["progress"] or {}).get("percent", 0) > 5,
                   20, "the rebuild to make progress")
        logs = {c: (d.run_dir / "logs" / f"s0-{c}-driver.log").read_text() for c in ("c0", "c1")}
        assert all("joining the task" in log for log in logs.values()), "both drivers work on the rebuild"
        d.kill(victim)
        survivor_pair = "B" if victim == "s0/c0/driver" else "A"
        survivor_cluster = "s0/c1" if victim == "s0/c0/driver" else "s0/c0"

        def rebuilt():
            view = d.get(survivor_pair, "/api/v1/domain")
            state = next(c for c in view["systems"][0]["clusters"] if c["name"] == survivor_cluster)["state"]
            return state["array"]["state"] == "optimal" and state["devices"][1]["state"] == "available"

        wait_until(rebuilt, 60, "the surviving driver to finish the rebuild and its completion")
        survivor_log = (d.run_dir / "logs" / f"{survivor_cluster.replace('/', '-')}-driver.log").read_text()
        if victim == "s0/c0/driver":
            assert "completing it here" in survivor_log, survivor_log[-3000:]
        verify_disks(d)
        result = emulator("restart", "--run-dir", d.run_dir, victim)
        assert result.returncode == 0, result.describe()
        d.killed.discard(victim)
        ended = d.wait_task("A", task["id"], timeout=30)
        assert ended["state"] == "complete", ended
        assert ended["result"]["rebuilt_disk"] == 1
    finally:
        d.down()


def test_a_hot_spare_replaces_a_failed_disk_and_is_rebuilt_on_its_own(domain):
    status, task = domain.submit("B", "c1", "fail-disk", disk=2)
    assert status == 202 and domain.wait_task("B", task["id"])["state"] == "complete", task

    def rebuilt():
        system = domain.get("A", "/api/v1/domain")["systems"][0]
        disks = system["disks"]
        return (system["health"] == "optimal" and disks[2]["file"] == "spare0.img"
                and disks[2]["state"] == "available" and all(d["role"] == "member" for d in disks))

    wait_until(rebuilt, 60, "the hot spare to be put in place and rebuilt")
    verify_disks(domain)


def test_a_hung_agent_is_lost_within_2_s_and_registers_again_when_it_resumes(domain):
    """kill -STOP: the process is there but silent; its server takes it for
    gone within 2 s (heartbeats), the other pair carries on, and once resumed
    the agent finds its link closed and registers again."""
    pid = domain.kill("s0/c0/agent-b", signal.SIGSTOP)
    try:
        wait_until(lambda: domain.agent("B", "s0/c0/agent-b")["state"] == "lost", 2,
                   "server B to lose the hung agent B of s0/c0")
        status, task = domain.submit("A", "c0", "report")
        assert status == 202 and domain.wait_task("A", task["id"])["state"] == "complete", task
    finally:
        os.kill(pid, signal.SIGCONT)
    domain.wait_registered("B", "s0/c0/agent-b")
    status, task = domain.submit("B", "c0", "report")
    assert status == 202 and domain.wait_task("B", task["id"])["state"] == "complete", task


@pytest.mark.parametrize("ports,process", [("http", "s0/c0/server-a"), ("nbd", "s0/c0/driver")])
def test_up_fails_fast_naming_a_process_that_could_not_start(tmp_path, ports, process):
    """A port already taken: the server (HTTP) or the driver (NBD) cannot
    listen; `up` says which process ended and why, stops what did start, and
    exits 2."""
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    d = Domain(tmp_path, CONFIG.replace(f"{ports} = 0", f"{ports} = {port}"))
    result = emulator("up", "--config", d.config, "--run-dir", d.run_dir, "--detach", timeout=60)
    taken.close()
    assert result.returncode == 2, result.describe()
    assert process in result.stderr and str(port) in result.stderr, result.describe()
    assert not (d.run_dir / "supervisor.json").exists(), "what did start was stopped"
