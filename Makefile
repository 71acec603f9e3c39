# guidesr: the stages a user runs. Variables: PYTHON, CHECKPOINT, PRESET, BASE_MODEL, TILE.
PYTHON ?= python
CHECKPOINT ?=
PRESET ?=
BASE_MODEL ?=
TILE ?= 512
ARTIFACTS ?= artifacts

model_args = $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT)) $(if $(PRESET),--preset $(PRESET)) $(if $(BASE_MODEL),--base-model $(BASE_MODEL))

.PHONY: test test-slow demo-base demo-model evaluate bench-kernels

test:
	$(PYTHON) -m pytest -q

test-slow:
	$(PYTHON) -m pytest -q -m slow

# The embedded demo model (tiny preset), reproduced from scratch on the CPU.
demo-base:
	$(PYTHON) -m guidesr.pretrain_base --out guidesr/weights/tiny-base --steps 1500 --seed 0

evaluate:
	$(PYTHON) -m guidesr.evaluate $(model_args)

bench-kernels:
	$(PYTHON) -m kernels.benchmark --json $(ARTIFACTS)/kernels.json
