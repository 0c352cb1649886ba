"""The web console in a real browser: Debian's Chromium, headless, driven by
Playwright. Starts a small domain with `emulator up --detach`, opens server B's
login link, checks that the page shows the domain live, submits a scrub of
s0/c1 through server B with the page's form, watches its progress rise to 100%
(the page is never reloaded: it follows the server's events), and saves a
screenshot; then cuts the power of s0 from the Faults panel (the server
serving the page goes with it, and the page says so) and sees every process
of s0 come back. Every wait is bounded; a failure says which step.

Usage: console_test.py EMULATOR_BIN WORK_DIR
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

CONFIG = """
[servers]
a = "s0/c0"
b = "s0/c1"

[ports]
nbd = 0
http = 0

[[systems]]
disks = 5
disk_size = "32MiB"
raid = "raid5"
spares = 1
volumes = 1
"""

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def step(name: str):
    print(f"console-test: {name}", flush=True)


def main() -> int:
    emulator, work = Path(sys.argv[1]), Path(sys.argv[2])
    work.mkdir(parents=True, exist_ok=True)
    run_dir = work / "run"
    config = work / "domain.toml"
    config.write_text(CONFIG)
    step("emulator up --detach")
    subprocess.run([emulator, "up", "--config", config, "--run-dir", run_dir, "--detach"],
                   check=True, timeout=90, stdout=subprocess.DEVNULL)
    try:
        server_b = json.loads((run_dir / "servers" / "b.json").read_text())["http"]
        token = (run_dir / "token").read_text().strip()
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            page.set_default_timeout(20_000)
            step("open server B's login link")
            page.goto(f"{server_b}/login?token={token}")
            expect(page.locator("#me")).to_contain_text("s0/c1/server-b")
            expect(page.locator("#live")).to_have_text("live")
            step("the domain is shown: health, controllers, disks, agents")
            expect(page.get_by_text("Server system s0")).to_be_visible()
            expect(page.locator("#systems .badge.optimal").first).to_be_visible()
            expect(page.locator(".slot")).to_have_count(5)
            expect(page.locator("#agents")).to_contain_text("s0/c0/agent-b")
            expect(page.locator("#agents")).to_contain_text("s0/c1/agent-b")
            step("submit a scrub of s0/c1 through server B")
            page.select_option("#f-system", "s0")
            page.select_option("#f-cluster", "c1")
            page.select_option("#f-kind", "scrub")
            page.fill("#f-rate", "8")
            page.click("#submit")
            expect(page.locator("#message")).to_contain_text("accepted")
            row = page.locator("#tasks tr").first
            expect(row).to_contain_text("scrub")
            expect(row).to_contain_text("s0/c1/agent-b")
            step("watch its progress rise to 100% without reloading")
            seen = []
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                text = row.inner_text()
                match = re.search(r"(\d+(?:\.\d+)?)%", text)
                if match:
                    seen.append(float(match.group(1)))
                if "complete" in text:
                    break
                time.sleep(0.2)
            else:
                raise AssertionError(f"the scrub did not complete on the page within 60 s; last row: {row.inner_text()!r}")
            expect(row).to_contain_text("100.0%")
            assert any(0 < p < 100 for p in seen), f"no progress between 0 and 100% was shown: {seen}"
            assert seen == sorted(seen), f"progress went backwards: {seen}"
            expect(page.locator("#log")).to_contain_text("complete")
            step("pull disk 1 from the Faults panel: the fault stands and is logged")
            page.select_option("#g-kind", "disk-pull")
            page.fill("#g-disk", "1")
            page.click("#fault-form button[type=submit]")
            expect(page.locator("#fault-message")).to_contain_text("injected f1")
            expect(page.locator("#faults")).to_contain_text("pulled out")
            expect(page.locator("#fault-log")).to_contain_text("f1 injected")
            step("clear it with its button: the fault log says so")
            page.click("button[data-clear='f1']")
            expect(page.locator("#fault-message")).to_contain_text("cleared f1")
            expect(page.locator("#faults")).to_contain_text("none")
            expect(page.locator("#fault-log")).to_contain_text("f1 cleared")
            step("delay the hosts' link to s0/c0's NBD address from the Faults panel, then clear it")
            page.select_option("#g-kind", "link-delay")
            page.select_option("#g-link", "s0/c0/nbd")
            page.fill("#g-ms", "20")
            page.click("#fault-form button[type=submit]")
            # f3: ids number the fault log's lines (f1 injected, f1 cleared).
            expect(page.locator("#fault-message")).to_contain_text("injected f3")
            expect(page.locator("#faults")).to_contain_text("every NBD reply arrives 20 ms late")
            page.click("button[data-clear='f3']")
            expect(page.locator("#fault-message")).to_contain_text("cleared f3")
            expect(page.locator("#faults")).to_contain_text("none")
            step("fill the host file system under s0's disks from the Faults panel (only System asked), then clear it")
            page.select_option("#g-kind", "host-fs-full")
            expect(page.locator("#g-system")).to_be_visible()
            expect(page.locator("#g-disk")).to_be_hidden()
            expect(page.locator("#g-more")).to_be_hidden()
            page.select_option("#g-system", "s0")
            page.click("#fault-form button[type=submit]")
            expect(page.locator("#fault-message")).to_contain_text("injected f5")
            expect(page.locator("#faults")).to_contain_text("the host file system under s0's disks is full")
            page.click("button[data-clear='f5']")
            expect(page.locator("#fault-message")).to_contain_text("cleared f5")
            expect(page.locator("#faults")).to_contain_text("none")
            step("kill -9 the driver that owns vol0: the page shows the failover live")
            expect(page.locator("#systems")).to_contain_text("owner s0/c0")
            expect(page.locator("#systems .badge.optimized").first).to_be_visible()
            processes = json.loads((run_dir / "processes.json").read_text())
            driver = next(p["pid"] for p in processes if p["name"] == "s0/c0/driver")
            os.kill(driver, signal.SIGKILL)
            expect(page.locator("#systems .badge.failed-over").first).to_be_visible()
            expect(page.locator("#systems")).to_contain_text("owner s0/c1 (home s0/c0)")
            screenshot = work / "console.png"
            page.screenshot(path=str(screenshot), full_page=True)
            step(f"screenshot saved: {screenshot}")
            step("cut the power of s0 from the Faults panel (System and More asked): server B, on s0/c1, goes with it")
            before = {p["name"]: p["pid"] for p in json.loads((run_dir / "processes.json").read_text())}
            page.select_option("#g-kind", "power-loss")
            expect(page.locator("#g-system")).to_be_visible()
            expect(page.locator("#g-more")).to_be_visible()
            expect(page.locator("#g-disk")).to_be_hidden()
            assert "after_ms" in (page.get_attribute("#g-more", "placeholder") or "")
            page.select_option("#g-system", "s0")
            page.fill("#g-more", '{"after_ms": 200, "lose": 1}')
            page.click("#fault-form button[type=submit]")
            expect(page.locator("#fault-message")).to_contain_text("no answer", timeout=30_000)
            expect(page.locator("#fault-message")).to_contain_text("lost power")
            step("the power came back: every process of s0 runs again, and the cut is in the fault log")
            deadline = time.monotonic() + 60
            while True:
                now = {p["name"]: p for p in json.loads((run_dir / "processes.json").read_text())}
                log = (run_dir / "faults.jsonl").read_text()
                back = all(now[name]["pid"] != pid and now[name]["ended"] is None for name, pid in before.items())
                if back and '"power-loss"' in log and "power back: 8 processes started again" in log:
                    break
                if time.monotonic() > deadline:
                    raise AssertionError(f"s0 did not come back within 60 s: {now}\n{log}")
                time.sleep(0.2)
            browser.close()
    finally:
        subprocess.run([emulator, "down", "--run-dir", run_dir], timeout=90, stdout=subprocess.DEVNULL)
    print("console-test: PASS", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
