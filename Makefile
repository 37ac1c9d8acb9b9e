# The two commands a newcomer needs:  `make train`  and  `make test`.
NP        ?= 2
CONFIG    ?= configs/digits.yaml
VENV      := .venv
INSTALLED := $(VENV)/.hvdtrain-installed

.PHONY: install train test doctor clean

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

doctor: $(INSTALLED)
	scripts/launch.sh $(NP) hvdtrain doctor

clean:
	rm -rf runs .pytest_cache
