# Two commands do everything on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# The app config's default tiny preset folder (instantid_app.config.DEFAULT_TINY_DIR; a test holds them equal).
TINY := /tmp/instantid-tiny
OUT ?= outputs

# The jobs Redis (`make services`) on a port of its own: 6379 is Ray's GCS default (`ray start --head`), and the app
# config's default broker_url names this one (instantid_app.config.JobsConfig; a test holds them equal).
REDIS_PORT ?= 6380
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup services redis-server promtool demo demo-cli test lint bench clean

setup: $(VENV)/.installed

# torch==2.13.0 first: pip takes the CPU build already on these machines instead of a multi-GB CUDA build.
# The playground's browser tests drive Debian's chromium (never a browser download); installed here when missing.
$(VENV)/.installed: pyproject.toml
	command -v chromium >/dev/null || (apt-get update -q && apt-get install -y -q chromium)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $@

$(TINY)/.done: | setup
	$(PY) -m instantid_cli weights tiny $(TINY)
	touch $@

# Debian's redis-server (the async jobs' broker), installed when missing. Tests start their own on free ports.
redis-server:
	@command -v redis-server >/dev/null || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends redis-server >/dev/null; }

# Debian's promtool (package `prometheus`) for tests/test_alerts.py (`promtool test rules`), installed when missing.
promtool:
	@command -v promtool >/dev/null || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }

# A Redis on loopback for `make demo` and `serve run serve_config.yaml` (idempotent: reuses one already listening).
services: redis-server
	@if redis-cli -h 127.0.0.1 -p $(REDIS_PORT) ping >/dev/null 2>&1; then \
		echo "redis: already listening on redis://127.0.0.1:$(REDIS_PORT)/0"; \
	else \
		redis-server --bind 127.0.0.1 --port $(REDIS_PORT) --daemonize yes --save "" --appendonly no \
			--dir /tmp --logfile /tmp/instantid-redis-$(REDIS_PORT).log --pidfile /tmp/instantid-redis-$(REDIS_PORT).pid; \
		for i in $$(seq 50); do redis-cli -h 127.0.0.1 -p $(REDIS_PORT) ping >/dev/null 2>&1 && break; sleep 0.1; done; \
		redis-cli -h 127.0.0.1 -p $(REDIS_PORT) ping >/dev/null && \
		echo "redis: started, listening on redis://127.0.0.1:$(REDIS_PORT)/0 (log /tmp/instantid-redis-$(REDIS_PORT).log)"; \
	fi

# The main job on the tiny preset: the serving app on Ray local, one real HTTP request, outputs under ./outputs
# (or OUTPUT_URI). `make demo-cli` does the same through the library alone.
demo: setup services
	$(PY) -m deployments.demo

demo-cli: setup $(TINY)/.done
	$(PY) -m instantid_cli generate --weights $(TINY) --face instantid_core/data/astronaut.jpg \
		--prompt "an astronaut portrait, watercolor" --style Watercolor --steps 8 --width 512 --height 512 \
		--seed 42 --out $(OUT)

# Two workers: one runs tests/serve (one Ray, two apps) then tests/cluster (clusters of their own), the other
# tests/unit, tests/batch and the rest, a module at a time (tests/conftest.py). `pytest` alone runs them in one process.
test: setup redis-server promtool
	$(PY) -m pytest -q --durations=25 -n 2

lint: setup
	$(PY) -m ruff check instantid_core instantid_app instantid_cli deployments batch bench testkit tests

bench: setup $(TINY)/.done
	$(PY) bench/core.py --weights $(TINY)

clean:
	rm -rf $(TINY) $(OUT) .pytest_cache
