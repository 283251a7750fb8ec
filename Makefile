# CalSeg: the two commands a new user needs are `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SAM2_PIN := $(shell sed -n 's/^sam2 = \["\(sam2==[0-9.]*\)"\]/\1/p' pyproject.toml)
RECORDING ?=

.PHONY: demo test reliability serve bench accuracy peers lint format services sysdeps venv clean-venv

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run 'make PYTHON=/path/to/python3.11 ...'"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	$(PY) -m pip install --quiet -e ".[dev]"
	SAM2_BUILD_CUDA=0 $(PY) -m pip install --quiet --no-build-isolation --no-deps "$(SAM2_PIN)"
	$(PY) -c "import sam2, torch, torchvision, calseg; print('calseg environment ready: torch', torch.__version__)"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP) sysdeps
	$(PY) -m calseg.demo $(if $(RECORDING),--recording "$(RECORDING)")

# SIGTERM / SIGHUP stop the service in order (exit 143 / 129): a clean stop, not a make error.
# The recipe's shell passes TERM, INT and HUP on to the service and waits for it: make sends
# TERM to that shell when make itself is signalled, and the shell used to die alone, leaving
# the service running under init (a lab admin's check: `kill -TERM <make pid>` kept :8000 up)
serve: $(STAMP)
	@$(PY) -m calseg.service.embedded & pid=$$!; \
	trap 'kill -TERM $$pid 2>/dev/null' TERM INT HUP; \
	wait $$pid; rc=$$?; while kill -0 $$pid 2>/dev/null; do wait $$pid; rc=$$?; done; \
	[ $$rc -eq 0 ] && exit 0; [ $$rc -eq 143 ] || [ $$rc -eq 129 ] || exit $$rc; \
	echo "serve: stopped by signal $$((rc - 128))"

services:
	bash scripts/services.sh

sysdeps:
	bash scripts/system-deps.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: $(STAMP) sysdeps services lint
	$(VENV)/bin/pytest -q

# Long fault-injection, soak and large-file cases (issue 8); counts per group: RELIABILITY.md.
reliability: $(STAMP) sysdeps services
	mkdir -p var
	$(VENV)/bin/pytest -q -m reliability tests/reliability --junitxml=var/reliability.xml; \
	  rc=$$?; $(PY) tests/reliability/report.py var/reliability.xml; exit $$rc

bench: $(STAMP)
	$(PY) -m calseg.bench

# The held-out accuracy suite (issue 17): tables into README.md, BENCHMARKS.md and
# docs/accuracy-suite.json (the headline `make demo` prints).
accuracy: $(STAMP)
	$(PY) -m calseg.bench --only accuracy --write-docs

# Suite2p side by side (issue 17 item 5): Suite2p 1.1.0 (calseg[peers]) in a venv of its own
# that also sees .venv's packages (a .pth file), so only Suite2p and its dependencies are
# installed there; the table goes into BENCHMARKS.md.
PEERS_VENV ?= /tmp/calseg-peers-venv
peers: $(STAMP)
	test -x $(PEERS_VENV)/bin/python || $(PYTHON) -m venv $(PEERS_VENV)
	$(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > \
	  "$$($(PEERS_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/calseg-venv.pth"
	$(PEERS_VENV)/bin/python -m pip install --quiet "$$(sed -n 's/^peers = \["\(suite2p==[0-9.]*\)"\]/\1/p' pyproject.toml)"
	PYTHONPATH=$(CURDIR) $(PEERS_VENV)/bin/python -m calseg.bench --only peers --write-docs

clean-venv:
	rm -rf $(VENV)
