# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv with the pinned stack.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUN_DIR ?= runs/digits

.PHONY: demo test test-gpu test-all clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev,all]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m tasks.digits --trainer.default_root_dir $(RUN_DIR) --trainer.logger.init_args.save_dir $(RUN_DIR)

test: $(STAMP)
	$(PY) -m pytest -q

test-gpu: $(STAMP)  # correctness only: skip the kernels' launch-configuration search
	VIL_TRITON_AUTOTUNE=0 $(PY) -m pytest -q -m gpu

test-all: $(STAMP)
	$(PY) -m pytest -q -m "gpu or slow or not gpu"

clean:
	rm -rf $(VENV) runs .pytest_cache
