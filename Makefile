# guidesr: the stages a user runs. Variables: PYTHON, CHECKPOINT, PRESET, BASE_MODEL, TILE, EVALUATE_ARGS, ARTIFACTS.
# PYTHON: the README's .venv when it exists, else `python` on PATH (override: make onnx PYTHON=path/to/python).
PYTHON ?= $(if $(wildcard .venv/bin/python),.venv/bin/python,python)
CHECKPOINT ?=
PRESET ?=
BASE_MODEL ?=
EVALUATE_ARGS ?=
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
	OMP_NUM_THREADS=1 $(PYTHON) -m guidesr.pretrain_base --out guidesr/weights/tiny-base --steps 4000 --lr 1e-3 --seed 0

demo-model:
	OMP_NUM_THREADS=1 $(PYTHON) -m guidesr.train --preset tiny --base-model guidesr/weights/tiny-base --data sample \
	  --out guidesr/weights --name guidesr-tiny --steps 1300 --batch-size 4 --crop-size 96 --lr 1e-3 \
	  --warmup-steps 50 --w-lpips 0 --w-gan 0 --checkpoint-every 250 --log-every 10 --seed 0 --no-resume

evaluate:  ## e.g. make evaluate EVALUATE_ARGS="--json artifacts/eval.json --draws 8" (an existing --json: add --overwrite)
	$(PYTHON) -m guidesr.evaluate $(model_args) $(EVALUATE_ARGS)

bench-kernels:  ## replaces $(ARTIFACTS)/kernels.json (--overwrite): copy a run worth keeping elsewhere first
	$(PYTHON) -m kernels.benchmark --json $(ARTIFACTS)/kernels.json --overwrite

# ---- export (issue 4): ONNX graphs, TensorRT engines, Polygraphy check -----------------------
# Defaults: the embedded demo checkpoint and a 512x512 tile. Override with
#   make onnx CHECKPOINT=path/NAME.json [BASE_MODEL=dir] [PRESET=tiny|sd-turbo] [TILE=512|HxW]
#   make onnx PRESET=sd-turbo RANDOM_WEIGHTS=1     (an untrained model, random base weights)
# `make engine` writes its ONNX graph first; without TensorRT it then stops with status 3 and
# the install command (pip install tensorrt-cu12).
RANDOM_WEIGHTS ?=
EXPORT_DIR ?= artifacts/export

EXPORT_ARGS = $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT)) $(if $(PRESET),--preset $(PRESET)) \
	$(if $(BASE_MODEL),--base-model $(BASE_MODEL)) $(if $(RANDOM_WEIGHTS),--random-weights) \
	--tile $(TILE) --out-dir $(EXPORT_DIR)

.PHONY: onnx engine verify

onnx:  ## fp32 and fp16 graphs, static (one tile) and dynamic, into $(EXPORT_DIR)
	$(PYTHON) -m export onnx $(EXPORT_ARGS)

engine:  ## the fp16 static graph and its TensorRT engine (+ NAME.engine.json)
	$(PYTHON) -m export engine $(EXPORT_ARGS)

verify:  ## Polygraphy: ONNX Runtime, and each engine built next to a graph, against PyTorch
	$(PYTHON) -m export verify $(EXPORT_ARGS)

# ---- report (issue 7): latency, memory, accuracy of every backend; the prepared GPU session ---------
#   make report                                   the embedded demo model, every backend that runs here,
#                                                 256/512/1024 whole, 2048 and 2160x3840 tiled
#   make report PRESET=sd-turbo RANDOM_WEIGHTS=1 REPORT_ARGS="--backends torch compiled --precisions fp16"
#   make report PRESET=tiny RANDOM_WEIGHTS=1 REPORT_ARGS="--sizes 64 96 --tiled 128 --tile 64 --overlap 16 --repeats 2"
#   make gpu-session OUT=dir                      issue 5/7's GPU script (on the lent GPU machine, under 10 minutes)
#   make gpu-smoke                                the same script on the CPU with the tiny preset (its plumbing)
# Files: $(REPORT_DIR)/report.json, report.md, latency.png, accuracy.png; OUT/session.log, summary.json, ...
# Uses PYTHON, CHECKPOINT, PRESET, BASE_MODEL, RANDOM_WEIGHTS and ARTIFACTS from above. On the GPU
# machine OUT is already set in the environment (the device tool's output folder).
# `make report` and `make gpu-smoke` regenerate their folders: they pass --overwrite (the previous run's files are
# replaced). `make gpu-session` does not: an earlier session's files in OUT are refused, not replaced.
REPORT_DIR ?= $(ARTIFACTS)/report
REPORT_ARGS ?=
OUT ?= $(ARTIFACTS)/gpu-session

REPORT_MODEL_ARGS = $(model_args) $(if $(RANDOM_WEIGHTS),--random-weights)

.PHONY: report gpu-session gpu-smoke

report:  ## latency / throughput / memory / accuracy table, JSON and plots into $(REPORT_DIR)
	$(PYTHON) -m runtime.report $(REPORT_MODEL_ARGS) $(REPORT_ARGS) --out $(REPORT_DIR) --overwrite

gpu-session:  ## wheels, pytest -m gpu, kernels.benchmark, report (sd-turbo, random weights), stage timing; targets table last
	$(PYTHON) -m runtime.gpu_session --out $(OUT)

gpu-smoke:  ## the GPU session's steps on the CPU, tiny preset
	$(PYTHON) -m runtime.gpu_session --cpu-smoke --out $(OUT)-smoke --overwrite
