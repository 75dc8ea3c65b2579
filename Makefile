PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test demo train-default bench lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check palitorch tests benchmarks
	$(BIN)/python -m pytest tests

demo: $(STAMP)
	$(BIN)/palitorch demo --out demo-output

# palitorch against transformers on the bundled model (benchmarks/bench_generate.py --help for other sizes).
bench: $(STAMP)
	$(BIN)/python benchmarks/bench_generate.py --sizes bundled

lint: $(STAMP)
	$(BIN)/ruff check palitorch tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info

# The bundled default model: easy-VQA (plus 4,000 generated training images) -> palitorch/default_model.
train-default: $(STAMP)
	$(BIN)/palitorch data easyvqa --out data/easyvqa --extra 4000 --balanced-yesno
	rm -rf runs/easyvqa-default
	$(BIN)/palitorch train configs/easyvqa-default.toml
	rm -rf palitorch/default_model
	cp -r runs/easyvqa-default/model palitorch/default_model
