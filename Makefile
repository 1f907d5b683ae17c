# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup browser demo test lint bench golden checkpoints clean

# The venv is (re)installed when setup.cfg changes; otherwise `make test` starts testing at once.
$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: the local CPU build (an unpinned torch pulls several GB of CUDA wheels).
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[render,models,remote,cluster,web,scripts,test,bench]'
	# gTTS pins click<8.2, which clashes with huggingface-hub; the library itself works with newer click.
	$(PY) -m pip install -q --no-deps gTTS==2.5.4
	touch $(STAMP)

setup: $(STAMP)

# The studio's browser tests drive Debian's chromium; installed where we may (root, apt), else those tests skip.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		{ apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; } \
		|| echo "chromium not installed: the browser tests will skip"; }

demo: $(STAMP)
	$(VENV)/bin/dhbatch build manifests/demo.yaml

test: $(STAMP) browser
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: $(STAMP)
	for f in bench/bench_*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

# The SadTalker port against upstream's golden data, through the reference checker (needs ../shared/sadtalker);
# another set in the same format: make golden GOLDEN=path/to/its/folder
GOLDEN ?= ../shared/sadtalker/golden/public
golden: $(STAMP)
	$(PY) ../shared/sadtalker/golden/check_golden.py --strict --golden $(GOLDEN) --adapter tests/golden_adapter.py

checkpoints: $(STAMP)
	$(PY) -m renderer.checkpoints --dest checkpoints

clean:
	rm -rf build
