# The two commands of the README: `make demo` and `make test`. Both do all set-up first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done
SHELL := /bin/bash

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): scripts/setup.sh requirements.txt requirements-ros.txt requirements-test.txt setup.py
	bash scripts/setup.sh $(VENV)
	touch $(STAMP)

demo: setup
	source scripts/ros_env.sh && $(PY) -m ire_vla_ros.cli demo --config config/demo.yaml --out runs/demo

test: setup
	source scripts/ros_env.sh && $(PY) -m pytest test -q -p no:cacheprovider

bench: setup
	source scripts/ros_env.sh && for b in bench/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf runs build install log
