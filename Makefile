# Two commands on a fresh machine: `make demo` (install + the offline demo) and `make test`.
VENV := .venv
STAMP := $(VENV)/.install-stamp

.PHONY: install demo test bench
install: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $(STAMP)

demo: install
	$(VENV)/bin/speechclip demo

test: install
	$(VENV)/bin/python -m pytest

bench: install
	$(VENV)/bin/python benchmarks/run_all.py
