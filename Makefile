# The README's commands: `make demo`, `make test` and `make app`. Each creates .venv if missing and installs into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
APP_STAMP := $(VENV)/.installed-app
# make app APP_ARGS="--checkpoint SRC --port 8080" (none: the model `make demo` trained)
APP_ARGS ?=
# Test processes (pytest-xdist; whole files per process, so a file's fixtures are built once). 2 suits a
# 2-core machine: most of the suite's time is single-threaded XLA compilation.
TEST_WORKERS ?= 2

.PHONY: demo test app install clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

$(APP_STAMP): $(STAMP) requirements-app.txt
	$(PY) -m pip install -q -r requirements-app.txt
	touch $(APP_STAMP)

# The tests include the app's browser test (tests/test_app.py): gradio and selenium come with requirements-app.txt.
$(TEST_STAMP): $(STAMP) $(APP_STAMP) requirements-test.txt requirements-reference.txt
	$(PY) -m pip install -q -r requirements-test.txt
	$(PY) -m pip install -q --no-deps -r requirements-reference.txt
	touch $(TEST_STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) demo.py

app: $(APP_STAMP)
	$(PY) -m vpd_jax.app $(APP_ARGS)

test: $(TEST_STAMP)
	$(VENV)/bin/ruff check .
	@# The browser for tests/test_app.py: Debian's chromium + chromedriver when run as root; otherwise that test skips.
	@(command -v chromium >/dev/null && command -v chromedriver >/dev/null) || \
	  (test "$$(id -u)" = 0 && apt-get update -q >/dev/null && \
	   DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null) || \
	  echo "chromium not installed: the browser test will skip"
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15 tests

clean:
	rm -rf $(VENV) .jax_cache
