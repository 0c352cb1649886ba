"""The scenario runner (`emulator scenario run|check|list`) and the fault CLI
(`emulator fault inject|list|clear`), driven as a user would: scenario files
written here, run by the real binary, which starts real domains.

- a malformed file is refused before anything starts, naming line and field;
- a scenario with process faults and a workload runs, passes, prints its seed
  and every fault, and removes its run directory;
- a failing assertion (and a wait that runs out) exits 1 and says what was seen;
- `expect = "fail"` turns the verdict around;
- `--json` prints the report as JSON;
- Ctrl-C brings the domain down and exits 2;
- `emulator fault inject process-kill`, `fault list --log`, and flags a fault
  kind does not take refused with serde's words.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

from bbhelpers import REPO_ROOT, emulator, emulator_bin, wait_until
from test_domain import Domain

DOMAIN = """
[domain]
servers = { a = "s0/c0", b = "s0/c1" }

[[domain.systems]]
disks = 5
disk_size = "16MiB"
raid = "raid5"
spares = 1
"""


def scenario(tmp_path: Path, name: str, head: str, body: str) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(head + DOMAIN + body)
    return path


def run_scenario(path: Path, run_dir: Path, *args, timeout: float = 120):
    return emulator("scenario", "run", path, "--run-dir", run_dir, *args, timeout=timeout)


def no_domain_left(run_dir: Path):
    """Everything the run started is gone: the supervisor stopped every process."""
    assert not (run_dir / "supervisor.json").exists()
    processes = run_dir / "processes.json"
    if processes.exists():
        for process in json.loads(processes.read_text()):
            assert not Path(f"/proc/{process['pid']}").exists() or process["ended"], process


WRITER_AND_KILL = """
[[workloads]]
name = "w"
volume = "vol0"
fua_every = 7

[[steps]]
wait = "workload w writes >= 200"
within = "20s"

[[steps]]
kill = "s0/c1/agent-a"

[[steps]]
wait = "agent A of s0/c1 lost"
within = "5s"

[[steps]]
wait = "process s0/c1/agent-a ended"
within = "5s"

[[steps]]
restart = "s0/c1/agent-a"

[[steps]]
wait = "agent A of s0/c1 registered"
within = "15s"

[[steps]]
kill = "s0/c0/driver"

[[steps]]
wait = "volume vol0 owner s0/c1"
within = "10s"

[[steps]]
after = "500ms"
stop = "w"
"""


def test_a_malformed_file_names_its_line_and_field_and_starts_nothing(tmp_path):
    good = scenario(tmp_path, "good", 'seed = 3\n', WRITER_AND_KILL)
    result = emulator("scenario", "check", good)
    assert result.returncode == 0, result.describe()
    # An unknown field: the TOML parser's words, with its line and column.
    lines = good.read_text().splitlines()
    line = lines.index('within = "5s"') + 1
    bad = tmp_path / "typo.toml"
    bad.write_text(good.read_text().replace('within = "5s"', 'witin = "5s"', 1))
    run_dir = tmp_path / "run"
    for command in (("scenario", "check", bad), ("scenario", "run", bad, "--run-dir", run_dir)):
        result = emulator(*command)
        assert result.returncode == 2, result.describe()
        assert f"typo.toml: line {line}, column 1: unknown field `witin`" in result.stderr, result.stderr
        assert result.stderr.count("\n") == 1, "one line"
    assert not run_dir.exists(), "nothing started"
    # A process the domain does not have: the step, its line, what it has.
    bad.write_text(good.read_text().replace('kill = "s0/c0/driver"', 'kill = "s1/c0/driver"'))
    line = bad.read_text().splitlines().index('kill = "s1/c0/driver"') + 1
    result = emulator("scenario", "check", bad)
    assert result.returncode == 2, result.describe()
    assert f"line {line}: step 7 (kill): the domain has no process \"s1/c0/driver\"" in result.stderr, result.stderr
    # A wait on a task no step submitted; a bad duration.
    bad.write_text(good.read_text().replace('wait = "agent A of s0/c1 lost"', 'wait = "task t9 complete"'))
    result = emulator("scenario", "check", bad)
    assert result.returncode == 2 and 'step 3 (wait): no earlier step submitted a task labelled "t9"' in result.stderr, result.describe()
    bad.write_text(good.read_text().replace('after = "500ms"', 'after = "half a second"'))
    result = emulator("scenario", "check", bad)
    assert result.returncode == 2 and "step 9 (after)" in result.stderr and "not a duration" in result.stderr, result.describe()


def test_a_scenario_with_process_faults_runs_passes_and_prints_its_seed(tmp_path, seed):
    path = scenario(tmp_path, "kills", 'description = "kills"\nassertions = ["no loss", "agents registered"]\n', WRITER_AND_KILL)
    run_dir = tmp_path / "run"
    result = run_scenario(path, run_dir, "--seed", str(seed))
    assert result.returncode == 0, result.describe()
    out = result.stdout
    assert out.splitlines()[1] == f"seed {seed}: replay with --seed {seed}", out
    # The timeline as it happened, then the report with every fault.
    assert "step 2: kill s0/c1/agent-a — f1: SIGKILL to s0/c1/agent-a" in out, out
    assert "step 5: restart s0/c1/agent-a — f2:" in out, out
    assert "step 7: kill s0/c0/driver — f3: SIGKILL to s0/c0/driver" in out, out
    assert "faults injected (3):" in out, out
    assert "f2 at " in out and "process-restart" in out, out
    assert "ok   end (line 2) assert: no loss — w: " in out and " 0 lost, 0 read-back mismatches" in out, out
    assert f"PASS: kills in " in out and f"seed {seed}" in out, out
    assert not run_dir.exists(), "a passing run leaves no run directory"


def test_a_failing_assertion_exits_1_and_says_what_was_seen(tmp_path, seed):
    body = """
[[steps]]
kill = "s0/c1/agent-b"

[[steps]]
wait = "process s0/c1/agent-b ended"
within = "5s"

[[steps]]
assert = "agent B of s0/c1 registered"

[[steps]]
assert = "array optimal"

[[steps]]
wait = "process s0/c0/driver ended"
within = "1s"

[[steps]]
kill = "s0/c0/driver"
"""
    path = scenario(tmp_path, "failing", 'assertions = ["array degraded"]\n', body)
    run_dir = tmp_path / "run"
    result = run_scenario(path, run_dir, "--seed", str(seed))
    assert result.returncode == 1, result.describe()
    out = result.stdout
    # The agent was seen lost (or its link not yet closed: then its pid is gone).
    assert "FAIL step 3 (line" in out and "assert: agent B of s0/c1 registered — s0/c1/agent-b (pid" in out, out
    assert "ok   step 4 (line" in out, out
    assert "FAIL step 5 (line" in out and "not within 1 s; last seen: s0/c0/driver (pid" in out and ") running" in out, out
    assert "step 5 failed: the 1 later step(s) are not run" in out, out
    assert "FAIL end (line 1) assert: array degraded — array optimal" in out, out
    assert "FAIL (3 assertion(s) did not hold)" in out, out
    assert "step 6: kill" not in out, "the timeline stops at a failed wait"
    assert f"run directory kept: {run_dir}" in out, out
    assert (run_dir / "faults.jsonl").exists() and (run_dir / "logs").is_dir()
    no_domain_left(run_dir)


def test_a_scenario_expected_to_fail_passes_only_when_an_assertion_fails(tmp_path):
    body = """
[[steps]]
kill = "s0/c0/agent-a"

[[steps]]
wait = "agent A of s0/c0 lost"
within = "5s"
"""
    failing = scenario(tmp_path, "meant", 'expect = "fail"\nassertions = ["agents registered"]\n', body)
    result = run_scenario(failing, tmp_path / "run1")
    assert result.returncode == 0, result.describe()
    assert "PASS (expected to fail, and 1 assertion(s) failed)" in result.stdout, result.stdout
    assert "FAIL end (line 2) assert: agents registered — " in result.stdout, result.stdout
    holding = scenario(tmp_path, "meant", 'expect = "fail"\nassertions = ["array optimal"]\n', body)
    result = run_scenario(holding, tmp_path / "run2")
    assert result.returncode == 1, result.describe()
    assert "FAIL (expected to fail, but every assertion held)" in result.stdout, result.stdout


def test_the_json_report_parses_and_lists_faults_and_assertions(tmp_path, seed):
    body = """
[[steps]]
task = { label = "s", kind = "scrub", cluster = "s0/c1", server = "B" }

[[steps]]
hang = "s0/c1/agent-a"

[[steps]]
wait = "agent A of s0/c1 lost"
within = "5s"

[[steps]]
resume = "s0/c1/agent-a"

[[steps]]
wait = "agent A of s0/c1 registered"
within = "15s"

[[steps]]
wait = "task s complete"
within = "30s"
"""
    path = scenario(tmp_path, "report", 'assertions = ["task s clean", "every task via B complete", "agents registered"]\n', body)
    run_dir = tmp_path / "run"
    result = run_scenario(path, run_dir, "--json", "--seed", str(seed), "--keep")
    assert result.returncode == 0, result.describe()
    report = json.loads(result.stdout)
    assert (report["verdict"], report["outcome"], report["exit_code"], report["seed"]) == ("pass", "pass", 0, seed)
    assert report["scenario"] == "report" and report["run_dir_kept"] and run_dir.is_dir()
    assert [(f["id"], f["kind"]) for f in report["faults"]] == [("f1", "process-hang"), ("f2", "process-resume")]
    assert report["faults"][0]["spec"] == {"fault": "process-hang", "process": "s0/c1/agent-a"}
    assert "SIGSTOP to s0/c1/agent-a" in report["faults"][0]["effect"]
    assert report["faults"][0]["t_ms"] <= report["faults"][1]["t_ms"]
    asserted = [(a["kind"], a["assertion"], a["passed"]) for a in report["assertions"]]
    assert asserted == [
        ("wait", "agent A of s0/c1 lost", True),
        ("wait", "agent A of s0/c1 registered", True),
        ("wait", "task s complete", True),
        ("assert", "task s clean", True),
        ("assert", "every task via B complete", True),
        ("assert", "agents registered", True),
    ], asserted
    kinds = [e["kind"] for e in report["timeline"]]
    assert kinds[0] == "domain" and kinds[-1] == "domain" and "hang" in kinds, kinds
    # The timeline went to stderr, so stdout is JSON only.
    assert f"seed {seed}: replay with --seed {seed}" in result.stderr


def test_ctrl_c_brings_the_domain_down_and_exits_2(tmp_path):
    body = """
[[steps]]
wait = "process s0/c0/driver ended"
within = "50s"
"""
    path = scenario(tmp_path, "interrupted", "", body)
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([str(emulator_bin()), "scenario", "run", str(path), "--run-dir", str(run_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    try:
        # Once the domain runs, any moment will do: a Ctrl-C during the start
        # is noticed as soon as the domain is up.
        wait_until(lambda: (run_dir / "processes.json").exists(), 30, "the domain to start")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, (out, err)
    assert "interrupted" in out and "ERROR (the scenario could not run)" in out, out
    no_domain_left(run_dir)


def test_fault_cli_injects_lists_and_refuses_flags_a_kind_does_not_take(tmp_path, seed):
    domain = Domain(tmp_path)
    domain.up()
    try:
        result = emulator("fault", "inject", "process-kill", "--process", "s0/c1/agent-b", "--run-dir",
                          domain.run_dir, "--seed", str(seed))
        assert result.returncode == 0, result.describe()
        pid = domain.processes()["s0/c1/agent-b"]["pid"]
        # A kill draws nothing from the seed: no seed is printed.
        assert result.stdout.strip() == f"f1 process-kill: SIGKILL to s0/c1/agent-b (pid {pid})"
        domain.killed.add("s0/c1/agent-b")
        wait_until(lambda: domain.processes()["s0/c1/agent-b"]["ended"], 10, "the supervisor to see it end")
        result = emulator("fault", "inject", "process-hang", "--process", "s0/c0/agent-b", "--run-dir",
                          domain.run_dir, "--json")
        assert result.returncode == 0, result.describe()
        record = json.loads(result.stdout)
        assert (record["id"], record["fault"], record["process"], record["standing"]) == ("f2", "process-hang", "s0/c0/agent-b", False)
        result = emulator("fault", "inject", "process-resume", "--process", "s0/c0/agent-b", "--run-dir", domain.run_dir)
        assert result.returncode == 0, result.describe()
        # The log, with timestamps, oldest first.
        result = emulator("fault", "list", "--log", "--run-dir", domain.run_dir)
        assert result.returncode == 0, result.describe()
        lines = result.stdout.splitlines()
        assert len(lines) == 3, lines
        assert lines[0].endswith(f"injected f1 process-kill: SIGKILL to s0/c1/agent-b (pid {pid})"), lines
        assert lines[1].split(" ")[1:4] == ["injected", "f2", "process-hang:"], lines
        assert lines[0][:4].isdigit() and lines[0][10] == "T" and lines[0][23] == "Z", lines
        log = json.loads(emulator("fault", "list", "--log", "--json", "--run-dir", domain.run_dir, check=True).stdout)
        assert [e["id"] for e in log] == ["f1", "f2", "f3"] and all(e["event"] == "injected" for e in log)
        # Process faults do not stand.
        result = emulator("fault", "list", "--run-dir", domain.run_dir)
        assert result.returncode == 0 and "no standing fault" in result.stdout, result.describe()
        result = emulator("fault", "clear", "--all", "--run-dir", domain.run_dir)
        assert result.returncode == 0 and "no standing fault to clear" in result.stdout, result.describe()
        result = emulator("fault", "clear", "f9", "--run-dir", domain.run_dir)
        assert result.returncode == 2 and "no standing fault f9" in result.stderr, result.describe()
        # A flag the kind does not take: serde's words; nothing injected.
        result = emulator("fault", "inject", "process-kill", "--process", "s0/c0/driver", "--disk", "1",
                          "--run-dir", domain.run_dir)
        assert result.returncode == 2 and "unknown field `disk`" in result.stderr, result.describe()
        result = emulator("fault", "inject", "process-kill", "--run-dir", domain.run_dir)
        assert result.returncode == 2 and "missing field `process`" in result.stderr, result.describe()
        result = emulator("fault", "inject", "process-kill", "--process", "s0/c5/driver", "--run-dir", domain.run_dir)
        assert result.returncode == 2 and "s0/c5/driver" in result.stderr, result.describe()
        result = emulator("fault", "inject", "disk-melt", "--disk", "1", "--run-dir", domain.run_dir)
        assert result.returncode == 2 and "disk-melt" in result.stderr, result.describe()
        assert len(json.loads(emulator("fault", "list", "--log", "--json", "--run-dir", domain.run_dir, check=True).stdout)) == 3
        # The driver it never touched is alive.
        assert Path(f"/proc/{domain.processes()['s0/c0/driver']['pid']}").exists()
    finally:
        domain.down()


def test_the_library_parses_and_lists(tmp_path):
    files = sorted((REPO_ROOT / "scenarios").glob("*.toml"))
    assert len(files) >= 12
    result = emulator("scenario", "check", *files)
    assert result.returncode == 0, result.describe()
    result = emulator("scenario", "list", REPO_ROOT / "scenarios")
    assert result.returncode == 0, result.describe()
    names = [line.split()[0] for line in result.stdout.splitlines()]
    assert names == [f.stem for f in files]
    assert "lost-writes-without-redundancy" in result.stdout and "[expected to fail]" in result.stdout
