# Thin wrappers. Every target that runs code depends on the virtualenv, so each works from a
# fresh clone: `make test` is the whole setup-and-test, `make run` the whole local stack.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install lock nginx browser run run-fresh test lint bench bench-seaweedfs soak mutate image clean

# Versions come from constraints.txt (every package pinned): the same install on every machine.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt --editable '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Rewrites constraints.txt: pyproject.toml's dependencies and dev extras resolved afresh (the
# newest versions its ranges allow) in a scratch virtualenv, then frozen, sorted, this project
# left out. Run it after changing pyproject.toml's dependencies, or to take new releases.
lock:
	@set -e; scratch=$$(mktemp -d); trap 'rm -rf "$$scratch"' EXIT; \
	$(PYTHON) -m venv "$$scratch/venv"; \
	"$$scratch/venv/bin/pip" install --quiet '.[dev]'; \
	{ sed -n '/^#/p' constraints.txt; \
	  "$$scratch/venv/bin/pip" freeze --exclude-editable --exclude copernica-receiver \
	    | LC_ALL=C sort -f -t= -k1,1; } > "$$scratch/constraints.txt"; \
	mv "$$scratch/constraints.txt" constraints.txt
	@echo "constraints.txt rewritten; see git diff constraints.txt, then make install"

# The load-balancer test runs nginx as its own process; install the Debian package if missing.
nginx:
	@command -v nginx >/dev/null 2>&1 || test -x /usr/sbin/nginx || { \
	  sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$sudo apt-get update -qq && \
	  $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null; }

# The report tests open pages in a real headless chromium (Debian's; playwright drives it).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$sudo apt-get update -qq && \
	  $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

# The local stack on SeaweedFS; its state (requests, packages, records, generated settings)
# stays in .local/ across restarts. `make run-fresh` deletes that state first.
run: install
	$(PY) deploy/local.py

run-fresh: install
	FRESH=1 $(PY) deploy/local.py

# Everything: the README's test command (and CI's), on two workers (pytest-xdist, one per core;
# most of the suite waits on real services). --dist loadgroup: tests go one at a time to
# whichever worker is free, except each `xdist_group` (the soaks, say), kept on one worker.
# A quick subset by hand, without the scenario suites and the slowest modules (marked `slow`):
# .venv/bin/python -m pytest -m "not slow" (add -n 2 for two workers).
test: install nginx browser
	$(PY) -m pytest -n 2 --dist loadgroup

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(VENV)/bin/mypy

# The benchmarks, each against a baseline measured side by side in the same run;
# each prints its table and replaces its section of bench/RESULTS.md. About 40 minutes.
bench: install nginx
	$(PY) bench/callbacks.py
	$(PY) bench/giant_callback.py --mib 1024
	$(PY) bench/poller.py
	$(PY) bench/replicas.py
	$(PY) bench/package.py
	$(PY) bench/listing.py
	$(PY) bench/idle.py
	$(PY) bench/discovery.py

# The callback and access-package benchmarks on SeaweedFS (deploy/seaweedfs.py, `weed mini`):
# service and floor on the same store, each table its own section of bench/RESULTS.md
# ("... on SeaweedFS"; the moto sections stay). About 12 minutes on moto's figures.
bench-seaweedfs: install
	$(PY) bench/callbacks.py --s3 seaweedfs
	$(PY) bench/package.py --s3 seaweedfs

# The combined-fault soak: three replicas behind nginx, the S3 store behind a fault proxy, the
# simulator, a seeded schedule of faults, then an invariant checker over S3 and the simulator.
# SOAK_SECONDS (default 300) and SOAK_SEED (default: random, printed) make a run reproducible;
# SOAK_S3=seaweedfs soaks on SeaweedFS (default moto). `make test` runs a short one on each
# store (tests/scenarios/test_soak.py: 40 seconds on moto, 25 on SeaweedFS).
soak: install nginx
	$(PY) -m tests.soak --seconds $${SOAK_SECONDS:-300} $${SOAK_SEED:+--seed $$SOAK_SEED} \
	  --s3 $${SOAK_S3:-moto}

# Removes each conditional write (If-Match, If-None-Match) in turn from a scratch copy of the
# checkout and runs the tests that guard it: every one must go red. 2-4 minutes.
mutate: install
	$(PY) -m tests.mutate

# Builds deploy/Dockerfile with podman on a debootstrap stand-in for python:3.11-slim, runs
# the image's entrypoint under chroot against a local S3 and probes it (deploy/image.py).
# Needs root; not part of `make test`. 2-3 minutes the first time, under one after that.
image: install
	$(PY) deploy/image.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
