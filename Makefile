# The two commands a newcomer needs:  `make train`  and  `make test`.
NP        ?= 2
CONFIG    ?= configs/digits.yaml
VENV      := .venv
INSTALLED := $(VENV)/.hvdtrain-installed

.PHONY: install train test doctor bench bench-tune clean

$(INSTALLED): scripts/install.sh setup.cfg
	bash scripts/install.sh
	touch $@

install: $(INSTALLED)

## Train the default job (digits, MLP) on $(NP) local ranks; installs everything first if needed.
train: $(INSTALLED)
	scripts/launch.sh $(NP) hvdtrain train --config $(CONFIG) $(ARGS)

## Run the test suite (unit, parallel under horovodrun, integration). Running no tests is a failure.
test: $(INSTALLED)
	@$(VENV)/bin/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests; that is a failure" >&2; exit 1; fi; exit $$rc

## Benchmarks on $(NP) local ranks (all-reduce, training, inference): $(BENCH_DIR)/*.json|png, then docs/benchmarks.md.
BENCH_DIR ?= docs/bench
bench: $(INSTALLED)
	$(VENV)/bin/hvdtrain bench allreduce --np $(NP) --output $(BENCH_DIR)/allreduce.json
	$(VENV)/bin/hvdtrain bench train --np $(NP) --rounds 3 --output $(BENCH_DIR)/train.json
	$(VENV)/bin/hvdtrain bench train --np $(NP) --impls hvdtrain --timeline --output $(BENCH_DIR)/train-timeline.json
	$(VENV)/bin/hvdtrain bench predict --output $(BENCH_DIR)/predict.json
	$(VENV)/bin/hvdtrain bench report --dir $(BENCH_DIR) --output docs/benchmarks.md

## The evidence for the communication defaults (one setting changed at a time; ~20 min), then the report again.
bench-tune: $(INSTALLED)
	$(VENV)/bin/hvdtrain bench tune --np $(NP) --output $(BENCH_DIR)/tuning.json
	$(VENV)/bin/hvdtrain bench report --dir $(BENCH_DIR) --output docs/benchmarks.md

doctor: $(INSTALLED)
	scripts/launch.sh $(NP) hvdtrain doctor

clean:
	rm -rf runs .pytest_cache
