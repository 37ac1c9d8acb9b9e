# The two commands a newcomer needs: `make train` and `make test`. Both install what they need first (once).
NP     ?= 2
CONFIG ?= configs/digits.yaml
VENV     := .venv
OLD_VENV := .venv-tf2.15
# Stamps written by scripts/install.sh: the current stack (TensorFlow 2.21 + Keras 3, Horovod built with hvdtrain's
# patch); the same plus munge and Slurm (tests/slurm); the TF 2.15 + Keras 2 stack (its unit and parallel tiers).
STACK     := $(VENV)/.hvdtrain-installed
SLURM     := $(VENV)/.hvdtrain-slurm
OLD_STACK := $(OLD_VENV)/.hvdtrain-installed
INSTALL_INPUTS := scripts/install.sh setup.cfg $(wildcard scripts/patches/*.patch)

.PHONY: install train test test-unit test-parallel test-integration test-slurm test-tf2.15 doctor bench bench-tune clean

$(STACK): $(INSTALL_INPUTS)
	bash scripts/install.sh
$(SLURM): $(STACK)
	bash scripts/install.sh --with-slurm
$(OLD_STACK): $(INSTALL_INPUTS)
	bash scripts/install.sh --stack tf2.15 --venv $(OLD_VENV)

## Install the current stack (system packages, .venv, TensorFlow 2.21, Horovod from source).
install: $(STACK)

## Train the default job (digits, MLP) on $(NP) local ranks; installs everything first if needed.
train: $(STACK)
	scripts/launch.sh $(NP) hvdtrain train --config $(CONFIG) $(ARGS)

## Every tier on TF 2.21, then on TF 2.15 its unit tier and the tests marked `stacks` (what differs between the
## stacks), in three lanes side by side: unit, then parallel; the Slurm tier (mostly waiting on Slurm), then TF 2.15's
## stacks tier, then the parallel tests of pipeline stages and sharded state (parallel-stages); TF 2.15's unit tier,
## then integration (the lanes' sums of measured tier times within a few minutes). Installs Slurm and the TF 2.15 stack first if needed. A failing tier does not stop the others; the
## summary at the end lists every tier's time and the ten slowest tests (test-reports/ keeps every test's time).
test: $(STACK) $(SLURM) $(OLD_STACK)
	@scripts/test.sh $(VENV):unit $(VENV):parallel + $(VENV):slurm $(OLD_VENV):stacks $(VENV):parallel-stages + $(OLD_VENV):unit $(VENV):integration
test-unit: $(STACK)
	@scripts/test.sh $(VENV):unit
test-parallel: $(STACK)
	@scripts/test.sh $(VENV):parallel $(VENV):parallel-stages
test-integration: $(STACK)
	@scripts/test.sh $(VENV):integration
test-slurm: $(SLURM)
	@scripts/test.sh $(VENV):slurm
test-tf2.15: $(OLD_STACK)
	@scripts/test.sh $(OLD_VENV):unit $(OLD_VENV):stacks

## Benchmarks on $(NP) local ranks (about an hour): $(BENCH_DIR)/*.json|png, then docs/benchmarks.md. Includes ResNet-50
## at 64x64 and the side-by-side run of both stacks ($(OLD_VENV) is the TF 2.15 one).
BENCH_DIR ?= docs/bench
bench: $(STACK) $(OLD_STACK)
	$(VENV)/bin/hvdtrain bench allreduce --np $(NP) --output $(BENCH_DIR)/allreduce.json
	$(VENV)/bin/hvdtrain bench train --np $(NP) --rounds 3 --output $(BENCH_DIR)/train.json
	$(VENV)/bin/hvdtrain bench train --np $(NP) --impls hvdtrain --timeline --output $(BENCH_DIR)/train-timeline.json
	$(VENV)/bin/hvdtrain bench train --np $(NP) --models resnet50 --impls single,hvdtrain,horovod --image-size 64 --batch 16 \
	  --steps 10 --warmup 3 --rounds 2 --output $(BENCH_DIR)/train-resnet50.json
	$(VENV)/bin/hvdtrain bench averaging --np $(NP) --rounds 2 --output $(BENCH_DIR)/averaging.json
	$(VENV)/bin/hvdtrain bench stacks --np $(NP) --old-venv $(OLD_VENV) --rounds 3 --output $(BENCH_DIR)/stacks.json
	$(VENV)/bin/hvdtrain bench predict --output $(BENCH_DIR)/predict.json
	$(VENV)/bin/hvdtrain bench pipeline --output $(BENCH_DIR)/pipeline.json
	$(VENV)/bin/hvdtrain bench sync --np $(NP) --output $(BENCH_DIR)/sync.json
	$(VENV)/bin/hvdtrain bench serve --output $(BENCH_DIR)/serve.json
	$(VENV)/bin/hvdtrain bench tensor --output $(BENCH_DIR)/tensor.json
	$(VENV)/bin/hvdtrain bench memory --output $(BENCH_DIR)/memory.json
	$(VENV)/bin/hvdtrain bench report --dir $(BENCH_DIR) --output docs/benchmarks.md

## The evidence for the communication defaults (one setting changed at a time; ~20 min), then the report again.
bench-tune: $(STACK)
	$(VENV)/bin/hvdtrain bench tune --np $(NP) --output $(BENCH_DIR)/tuning.json
	$(VENV)/bin/hvdtrain bench report --dir $(BENCH_DIR) --output docs/benchmarks.md

doctor: $(STACK)
	scripts/launch.sh $(NP) hvdtrain doctor

clean:
	rm -rf runs .pytest_cache
