# The whole set-up on a fresh machine is `make run` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo
RUN_DIR ?= run
EMULATOR := $(or $(CARGO_TARGET_DIR),target)/release/emulator
PYTHON := /usr/bin/python3
FUZZ_SECONDS ?= 20
# Seconds any one black-box test may take before pytest-timeout fails it.
BLACKBOX_TEST_TIMEOUT ?= 300

.PHONY: run build test deps lint unit blackbox console linux-host fuzz bench bench-nbd bench-controllers bench-management bench-failover clean scenarios list-scenarios

build:
	$(CARGO) build --release --locked

## Build and start the default domain in run/: one server system of two
## clusters (driver, agents A and B each), domain servers A and B with their
## web consoles, a RAID-5 volume served over NBD. Ctrl-C stops it.
run: build
	@mkdir -p $(RUN_DIR)
	$(EMULATOR) up --run-dir $(RUN_DIR)

## Everything CI runs: lint, unit and property tests, black-box tests with real
## clients, a real Linux kernel attaching with nbd-client (QEMU TCG guest), and a
## short fuzz pass.
test: deps lint unit blackbox scenarios console linux-host fuzz

deps:
	@scripts/install-deps.sh test

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

unit:
	$(CARGO) test --workspace --locked

blackbox: build
	EMULATOR_BIN=$(abspath $(EMULATOR)) $(PYTHON) -m pytest -q --timeout=$(BLACKBOX_TEST_TIMEOUT) tests/blackbox

## The web console in headless Chromium, driven by Playwright.
console: build
	EMULATOR=$(abspath $(EMULATOR)) scripts/console-test.sh

linux-host: build
	EMULATOR=$(abspath $(EMULATOR)) scripts/linux-host-test.sh

fuzz:
	FUZZ_SECONDS=$(FUZZ_SECONDS) scripts/fuzz-smoke.sh

## Scenarios (scenarios/*.toml, see scenarios/README.md): `make scenario-NAME`
## runs one (SEED=N replays a seed), `make scenarios` every one (a scenario
## with expect = "fail" passes when its assertion fails), `make list-scenarios`.
SCENARIO_FILES := $(sort $(wildcard scenarios/*.toml))
SCENARIO_TARGETS := $(patsubst scenarios/%.toml,scenario-%,$(SCENARIO_FILES))
# Scenarios `make scenarios` leaves out (names, e.g. SKIP_SCENARIOS="a b").
SKIP_SCENARIOS ?=

.PHONY: $(SCENARIO_TARGETS)
$(SCENARIO_TARGETS): scenario-%: scenarios/%.toml build
	$(EMULATOR) scenario run $< $(if $(SEED),--seed $(SEED))

scenarios: build
	@failed=(); \
	for file in $(SCENARIO_FILES); do \
		name=$$(basename $$file .toml); \
		if [[ " $(SKIP_SCENARIOS) " == *" $$name "* ]]; then echo "== $$name: skipped"; continue; fi; \
		echo "== $$name"; \
		$(EMULATOR) scenario run $$file $(if $(SEED),--seed $(SEED)) || failed+=("$$name"); \
	done; \
	if (( $${#failed[@]} )); then echo "scenarios that did not pass: $${failed[*]}"; exit 1; fi; \
	echo "every scenario passed"

list-scenarios: build
	@$(EMULATOR) scenario list scenarios

## Benchmarks (not tests): numbers, compared with nbdkit and qemu-nbd in one run.
bench: bench-nbd bench-controllers bench-management bench-failover

bench-nbd: build
	@scripts/install-deps.sh bench
	EMULATOR=$(abspath $(EMULATOR)) scripts/bench-nbd.sh

bench-controllers: build
	@scripts/install-deps.sh bench
	EMULATOR=$(abspath $(EMULATOR)) scripts/bench-controllers.sh

bench-management: build
	$(PYTHON) scripts/bench-management.py $(abspath $(EMULATOR)) $(RUN_DIR)/bench-management.md

## The I/O stall a host sees when its volume's owning controller is killed
## (kill -9) or hangs (kill -STOP, fenced), with the write oracle verifying
## every round.
bench-failover: build
	$(PYTHON) scripts/bench-failover.py $(abspath $(EMULATOR)) $(RUN_DIR)/bench-failover.md

clean:
	$(CARGO) clean
	rm -rf $(RUN_DIR)
