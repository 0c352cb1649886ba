"""Link faults injected into a running domain (`link-cut`, `link-delay`),
through the API and the CLI, and what a user sees of them:

- agent A of s0/c0's link to server A cut: server A loses the agent within
  2 s, a task through server B to s0/c0 completes, one through A is refused
  naming server B, and the agent does not register again while the cut
  stands; cleared, the same agent process registers again by itself and a
  task through A completes;
- a task in flight through that cut link fails with the failure information
  of a lost agent, naming server B, and the same task through B completes;
- a delayed agent link still carries tasks, each taking at least the delay
  (both ways);
- the hosts' link to s0/c0's NBD address cut under a writer with requests in
  flight: its connection dies, new connections are refused while the cut
  stands, and after the clear the writer reconnects by itself and the write
  oracle finds nothing acknowledged-and-flushed lost;
- a delayed NBD link holds every reply back (lower bounds only), on a
  connection open before the fault and on one opened after it;
- agent A of s0/c0's link to its driver cut: the agent stays registered, a
  task through it waits, queued, while pair B carries one; cleared, the agent
  reaches its driver again by itself and the task completes;
- a delayed driver link still carries tasks, each taking at least the delay
  both ways;
- bad requests are refused with 400 naming what was wrong, and change nothing.

Every fault is in the fault log and `fault list` while it stands.
"""

from __future__ import annotations

import json
import time

from bbhelpers import emulator, nbd_connect, run, wait_until
from test_domain import Domain, domain  # noqa: F401 (the fixture)
from test_failover import finish, verify_nothing_lost, volumes, writer_going
from test_faults import faults, inject


def agent_state(domain: Domain, pair: str, name: str) -> str | None:
    agent = domain.agent(pair, name)
    return agent and agent["state"]


def task_completes(domain: Domain, pair: str, cluster: str) -> dict:
    status, task = domain.submit(pair, cluster, "report")
    assert status == 202, (status, task)
    ended = domain.wait_task(pair, task["id"])
    assert ended["state"] == "complete", ended
    return ended


def test_a_cut_agent_link_is_lost_pair_b_works_and_cleared_the_agent_registers_again(domain):
    agent = "s0/c0/agent-a"
    pid = domain.processes()[agent]["pid"]
    assert agent_state(domain, "A", agent) == "registered"
    cut = inject(domain, fault="link-cut", link=agent)
    assert cut["id"] == "f1" and cut["standing"], cut
    assert "link s0/c0/agent-a (agent A of s0/c0 to server A) cut" in cut["effect"], cut
    wait_until(lambda: agent_state(domain, "A", agent) == "lost", 2, "server A to lose agent A of s0/c0")
    # Pair B carries tasks to that cluster; pair A refuses them, naming B.
    task_completes(domain, "B", "c0")
    status, answer = domain.submit("A", "c0", "report")
    assert status == 409 and "server B" in answer["error"], answer
    # The other cluster's agent A is untouched.
    task_completes(domain, "A", "c1")
    # While the cut stands the agent stays away (it has had time to try).
    assert agent_state(domain, "A", agent) == "lost"
    listed = emulator("fault", "list", "--run-dir", domain.run_dir, "--json")
    assert listed.returncode == 0, listed.describe()
    assert [(f["id"], f["fault"], f["link"]) for f in json.loads(listed.stdout)] == [("f1", "link-cut", agent)]
    cleared = emulator("fault", "clear", "f1", "--run-dir", domain.run_dir)
    assert cleared.returncode == 0 and "cleared f1" in cleared.stdout, cleared.describe()
    domain.wait_registered("A", agent)
    # The same process registered again, by itself.
    assert domain.processes()[agent]["pid"] == pid and domain.agent("A", agent)["pid"] == pid
    task_completes(domain, "A", "c0")
    log = faults(domain, "B")["log"]
    assert [(e["event"], e["id"]) for e in log] == [("injected", "f1"), ("cleared", "f1")], log
    assert faults(domain)["standing"] == []


def test_a_task_in_flight_through_a_cut_agent_link_fails_naming_server_b_and_b_takes_it_up(domain):
    """The link of agent A of s0/c0 is cut while a scrub submitted through
    server A runs: server A ends the task as failed, its failure information
    naming server B, as when the agent dies; the scrub itself goes on in the
    controllers, and the same task through B follows it to its end."""
    status, task = domain.submit("A", "c0", "scrub", rate_mib_s=8)
    assert status == 202, task
    wait_until(lambda: domain.get("A", f"/api/v1/tasks/{task['id']}")["state"] == "running", 10, "the scrub to run")
    inject(domain, fault="link-cut", link="s0/c0/agent-a")
    failed = domain.wait_task("A", task["id"], timeout=5)
    assert failed["state"] == "failed", failed
    assert "lost" in failed["failure"] and "server B" in failed["failure"], failed
    status, again = domain.submit("B", "c0", "scrub", rate_mib_s=200)
    assert status == 202, again
    ended = domain.wait_task("B", again["id"], timeout=60)
    assert ended["state"] == "complete", ended
    status, cleared = domain.request("A", "DELETE", "/api/v1/faults")
    assert status == 200, cleared
    domain.wait_registered("A", "s0/c0/agent-a")
    task_completes(domain, "A", "c0")


def test_a_delayed_agent_link_carries_tasks_that_take_at_least_the_delay_both_ways(domain):
    agent = "s0/c1/agent-a"
    result = emulator("fault", "inject", "link-delay", "--link", agent, "--ms", "300",
                      "--run-dir", domain.run_dir, "--json")
    assert result.returncode == 0, result.describe()
    record = json.loads(result.stdout)
    assert record["standing"] and record["ms"] == 300, record
    assert "every message, either way, arrives 300 ms late" in record["effect"], record
    def task_seconds() -> float:
        started = time.monotonic()
        task_completes(domain, "A", "c1")
        return time.monotonic() - started

    # The agent picks the fault up within the book's poll bound (20 ms):
    # wait until a task shows it, then every task takes the delay: it goes to
    # the agent (300 ms) and its end comes back (300 ms).
    wait_until(lambda: task_seconds() >= 0.6, 10, "a task through the delayed link to take the delay")
    for _ in range(3):
        elapsed = task_seconds()
        assert elapsed >= 0.6, f"a task over a link delayed 300 ms each way took {elapsed:.3f} s"
    # Heartbeats still get through: the agent was never lost.
    assert agent_state(domain, "A", agent) == "registered"
    status, cleared = domain.request("A", "DELETE", f"/api/v1/faults/{record['id']}")
    assert (status, cleared) == (200, {"cleared": [record["id"]]})
    task_completes(domain, "A", "c1")


def test_a_cut_nbd_link_under_a_writer_kills_its_connection_and_after_the_clear_nothing_is_lost(domain, tmp_path, seed):
    uri = volumes(domain)["vol0"]["uri"]
    assert volumes(domain)["vol0"]["owner"] == "s0/c0"
    record = tmp_path / "writes.jsonl"
    writer = writer_going(uri, seed, record, "6s")
    try:
        cut = inject(domain, fault="link-cut", link="s0/c0/nbd")
        assert "its open NBD connections closed, new ones refused" in cut["effect"], cut
        wait_until(lambda: record.read_text().count('{"lost":') >= 1, 10, "the writer to see its connection die")
        # New connections are refused while the cut stands.
        refused = run(["nbdinfo", "--size", uri])
        assert refused.returncode != 0, refused.describe()
        connected = record.read_text().count('{"connected":')
        status, _ = domain.request("B", "DELETE", f"/api/v1/faults/{cut['id']}")
        assert status == 200
        wait_until(lambda: record.read_text().count('{"connected":') > connected, 15,
                   "the writer to reconnect after the clear")
        summary = finish(writer)
    finally:
        if writer.poll() is None:
            writer.kill()
    assert summary["reconnects"] >= 1 and summary["mismatches"] == 0, summary
    verify_nothing_lost(uri, record)
    # The volume never moved: the controller was alive all along.
    assert volumes(domain)["vol0"]["owner"] == "s0/c0"


def test_a_delayed_nbd_link_holds_every_reply_back(domain):
    uri = volumes(domain)["vol0"]["uri"]
    before = nbd_connect(uri)
    before.pread(4096, 0)
    fault = inject(domain, fault="link-delay", link="s0/c0/nbd", ms=200)
    assert "every NBD reply arrives 200 ms late" in fault["effect"], fault
    after = nbd_connect(uri)

    def read_takes_the_delay(h) -> bool:
        started = time.monotonic()
        h.pread(4096, 0)
        return time.monotonic() - started >= 0.2

    # Applied within the book's poll bound: wait for the open connection to
    # see it, then every reply on either connection takes the delay.
    wait_until(lambda: read_takes_the_delay(before), 5, "replies on the open connection to be delayed")
    for h in (before, after, before):
        started = time.monotonic()
        h.pwrite(b"x" * 4096, 8192)
        h.flush()
        assert time.monotonic() - started >= 0.4, "a write and a flush: two replies, each 200 ms late"
    status, _ = domain.request("A", "DELETE", "/api/v1/faults")
    assert status == 200
    # Cleared: the connections still work, and their replies come in order.
    for h in (before, after):
        assert h.pread(4096, 8192) == b"x" * 4096
        h.shutdown()


def test_bad_link_fault_requests_are_refused_naming_what_was_wrong_and_change_nothing(domain):
    cases = [
        ({"fault": "link-cut", "link": "s0/c0/driver"}, "links are sN/cM/agent-a, sN/cM/agent-b"),
        ({"fault": "link-cut", "link": "s0/c7/agent-a"}, "link \"s0/c7/agent-a\""),
        ({"fault": "link-cut", "link": "s3/c0/nbd"}, "no system s3"),
        ({"fault": "link-cut"}, "missing field `link`"),
        ({"fault": "link-cut", "link": "s0/c0/nbd", "ms": 5}, "link-cut takes no `ms`"),
        ({"fault": "link-cut", "link": "s0/c0/nbd", "disk": 1}, "unknown field `disk`"),
        ({"fault": "link-delay", "link": "s0/c0/nbd"}, "link-delay needs `ms`"),
        ({"fault": "link-delay", "link": "s0/c0/agent-b", "ms": 0}, "ms = 0"),
        ({"fault": "link-snip", "link": "s0/c0/nbd"}, "link-cut, link-delay"),
    ]
    for body, words in cases:
        status, reply = domain.request("A", "POST", "/api/v1/faults", body)
        assert status == 400 and words in reply["error"], (body, status, reply)
    result = emulator("fault", "inject", "link-delay", "--link", "s0/c0/nbd", "--run-dir", domain.run_dir)
    assert result.returncode == 2 and "link-delay needs `ms`" in result.stderr, result.describe()
    assert faults(domain) == {"standing": [], "log": []}
    assert not (domain.run_dir / "links.json").exists()
    task_completes(domain, "A", "c0")
    info = run(["nbdinfo", "--size", volumes(domain)["vol0"]["uri"]], check=True)
    assert int(info.stdout) > 0


def test_a_cut_driver_link_holds_tasks_through_that_agent_queued_and_cleared_they_complete(domain):
    """Agent A of s0/c0 cut off from its driver (`sN/cM/agent-a/driver`): it
    stays registered with server A, a task through it waits, queued, while a
    task through pair B completes; cleared, the agent reaches its driver again
    by itself and the waiting task completes."""
    link = "s0/c0/agent-a/driver"
    cut = inject(domain, fault="link-cut", link=link)
    assert cut["standing"], cut
    assert "link s0/c0/agent-a/driver (agent A of s0/c0 to its driver) cut" in cut["effect"], cut
    log = domain.run_dir / "logs" / "s0-c0-agent-a.log"
    wait_until(lambda: "lost the driver" in log.read_text(), 5, "agent A of s0/c0 to lose its driver")
    status, waiting = domain.submit("A", "c0", "report")
    assert status == 202, (status, waiting)
    task_completes(domain, "B", "c0")
    task_completes(domain, "A", "c1")
    assert agent_state(domain, "A", "s0/c0/agent-a") == "registered"
    now = domain.get("A", f"/api/v1/tasks/{waiting['id']}")
    assert now["state"] == "queued", now
    cleared = emulator("fault", "clear", cut["id"], "--run-dir", domain.run_dir)
    assert cleared.returncode == 0, cleared.describe()
    ended = domain.wait_task("A", waiting["id"], timeout=15)
    assert ended["state"] == "complete", ended
    task_completes(domain, "A", "c0")


def test_a_delayed_driver_link_carries_tasks_that_take_at_least_the_delay_both_ways(domain):
    delay = inject(domain, fault="link-delay", link="s0/c1/agent-b/driver", ms=300)
    assert "every message, either way, arrives 300 ms late" in delay["effect"], delay
    log = domain.run_dir / "logs" / "s0-c1-agent-b.log"
    picked = lambda: any("link fault changed" in line and "agent-b/driver" in line for line in log.read_text().splitlines())  # noqa: E731
    wait_until(picked, 5, "agent B of s0/c1 to pick the delay up")
    started = time.monotonic()
    task_completes(domain, "B", "c1")
    assert time.monotonic() - started >= 0.6, "the task's request and its end each waited 300 ms"
