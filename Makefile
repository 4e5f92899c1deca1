# Set-up and everyday commands. Every target creates .venv and installs leanvit on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: demo test bench ladder readme lock

$(INSTALLED): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test,export]'
	touch $@

DEMO := runs/demo

# The main job: train a teacher on the embedded digits, distil SReT-T from it, evaluate both, and write the report.
# Everything lands in $(DEMO) (replaced on each run); the git tree stays clean. `make readme` copies the report of
# the last demo into the README.
demo: $(INSTALLED)
	rm -rf $(DEMO)
	$(BIN)/leanvit train --config recipes/digits_teacher.yaml --output $(DEMO)/teacher
	$(BIN)/leanvit train --config recipes/digits_sret_t_kd.yaml --output $(DEMO)/student \
		--teacher-checkpoint $(DEMO)/teacher/best.safetensors
	$(BIN)/leanvit eval --checkpoint $(DEMO)/teacher/best.safetensors
	$(BIN)/leanvit eval --checkpoint $(DEMO)/student/best.safetensors
	$(BIN)/python scripts/demo_report.py $(DEMO) | tee $(DEMO)/report.md

test: $(INSTALLED)
	$(BIN)/python -m pytest -n 2 -q

bench: $(INSTALLED)
	$(BIN)/python benchmarks/throughput.py --suite sret --markdown benchmarks/results.md
	$(BIN)/python scripts/update_readme.py benchmark < benchmarks/results.md
	$(BIN)/python benchmarks/throughput.py --suite riformer --markdown benchmarks/riformer_results.md
	$(BIN)/python scripts/update_readme.py riformer-benchmark < benchmarks/riformer_results.md
	$(BIN)/python benchmarks/throughput.py --suite minivit $(if $(MINIVIT),--official-minivit $(MINIVIT)) \
		--markdown benchmarks/minivit_results.md
	$(BIN)/python scripts/update_readme.py minivit-benchmark < benchmarks/minivit_results.md
	$(BIN)/python benchmarks/throughput.py --suite glit $(if $(GLIT),--official-glit $(GLIT)) \
		--markdown benchmarks/glit_results.md
	$(BIN)/python scripts/update_readme.py glit-benchmark < benchmarks/glit_results.md

ladder: $(INSTALLED)
	$(BIN)/python benchmarks/riformer_ladder.py --seeds 0 1 2 3 4 --markdown benchmarks/riformer_ladder.md
	$(BIN)/python scripts/update_readme.py riformer-ladder < benchmarks/riformer_ladder.md

# Every generated README section that needs no long run: the model table, and the demo table of the last demo.
readme: $(INSTALLED)
	$(BIN)/leanvit models --format markdown | $(BIN)/python scripts/update_readme.py models
	if [ -f $(DEMO)/report.md ]; then $(BIN)/python scripts/update_readme.py demo < $(DEMO)/report.md; \
	else echo "no $(DEMO)/report.md: run make demo first to regenerate the demo table"; fi

lock: $(INSTALLED)
	{ echo '# Pinned versions used by the Makefile and CI (pip install -c constraints.txt). Regenerate with: make lock'; \
	  $(BIN)/python -m pip freeze --exclude-editable; } > constraints.txt
