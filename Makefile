# mpxd: the commands a newcomer needs.  Everything runs from .venv, which
# `make install` creates; nothing is installed by hand.
PYTHON  ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
PORT    ?= 47110
SCRIPT  ?= handlers/counter.py

.PHONY: install run test test-unit test-shell python-venv netcat redis-server lint man bench soak clean

$(BIN)/mpxd: pyproject.toml
	@$(MAKE) --no-print-directory python-venv
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	@touch $@

install: $(BIN)/mpxd  ## create .venv and install mpxd with its test tools

run: install  ## serve the example counter on port $(PORT)
	$(BIN)/mpxd --port $(PORT) $(SCRIPT)

# Debian's python3 cannot make a virtual environment until python3-venv is
# installed (no ensurepip): installed when missing and we are root.
python-venv:
	@if ! $(PYTHON) -c 'import ensurepip, venv' >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing python3-venv (Debian's $(PYTHON) makes no virtual environment without it)"; \
	    (apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null; \
	    if ! $(PYTHON) -c 'import ensurepip, venv' >/dev/null 2>&1; then \
	      version=$$($(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])'); \
	      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python$$version-venv >/dev/null || true; \
	    fi; \
	  fi; \
	  if ! $(PYTHON) -c 'import ensurepip, venv' >/dev/null 2>&1; then \
	    echo "$(PYTHON) cannot make a virtual environment: run 'sudo apt-get install python3-venv'" >&2; \
	    exit 1; \
	  fi; \
	fi

# netcat-openbsd for the shell tests: installed when missing and we are root.
netcat:
	@if ! command -v nc >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing netcat-openbsd"; \
	    (apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq netcat-openbsd >/dev/null; \
	  else \
	    echo "the shell tests need netcat: run 'sudo apt-get install netcat-openbsd'" >&2; exit 1; \
	  fi; \
	fi

# redis-server for tests/test_shared_counter.py: installed when missing and we
# are root; otherwise those tests are skipped, saying why.
redis-server:
	@if ! command -v redis-server >/dev/null 2>&1 && [ ! -x /usr/bin/redis-server ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing redis-server"; \
	    (apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null \
	      || echo "could not install redis-server: the shared_counter tests will be skipped" >&2; \
	  else \
	    echo "redis-server missing (sudo apt-get install redis-server): the shared_counter tests will be skipped" >&2; \
	  fi; \
	fi

test: install netcat redis-server  ## every test: unit, pexpect and shell
	$(BIN)/python -m pytest -q
	PATH="$(CURDIR)/$(BIN):$$PATH" tests/shell/run_all.sh

test-unit: install redis-server
	$(BIN)/python -m pytest -q

test-shell: install netcat
	PATH="$(CURDIR)/$(BIN):$$PATH" tests/shell/run_all.sh

lint: install
	$(BIN)/python -m compileall -q mpxd handlers tests bench
	@if [ -x $(BIN)/ruff ]; then $(BIN)/ruff check mpxd handlers tests; \
	 else echo "ruff not installed ($(BIN)/pip install ruff); compiled only"; fi

man:  ## render the man page to check it
	MANWIDTH=80 man --warnings -l man/mpxd.1 | cat

bench: install  ## mpxd against asyncio and uvloop servers (a few minutes)
	$(BIN)/python bench/run.py

soak: install  ## the long robustness test (a few minutes)
	$(BIN)/python tests/soak.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis bench/out
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
