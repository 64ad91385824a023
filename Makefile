# Two commands do everything on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
TINY := .cache/tiny
OUT ?= outputs

.PHONY: setup demo demo-cli test lint bench clean

setup: $(VENV)/.installed

# torch==2.13.0 first: pip takes the CPU build already on these machines instead of a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $@

$(TINY)/.done: | setup
	$(PY) -m instantid_cli weights tiny $(TINY)
	touch $@

# The main job on the tiny preset: the serving app on Ray local, one real HTTP request, outputs under ./outputs
# (or OUTPUT_URI). `make demo-cli` does the same through the library alone.
demo: setup
	$(PY) -m deployments.demo

demo-cli: setup $(TINY)/.done
	$(PY) -m instantid_cli generate --weights $(TINY) --face instantid_core/data/astronaut.jpg \
		--prompt "an astronaut portrait, watercolor" --style Watercolor --steps 8 --width 512 --height 512 \
		--seed 42 --out $(OUT)

test: setup
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check instantid_core instantid_app instantid_cli deployments jobs bench tests

bench: setup $(TINY)/.done
	$(PY) bench/core.py --weights $(TINY)

clean:
	rm -rf $(TINY) $(OUT) .pytest_cache
