# The two set-up commands of the README. Both create .venv and install the project when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench lint

# One line while it installs; a failing step still prints its error and make's own line.
$(STAMP): pyproject.toml
	@echo "installing campar-ray (editable) and its extras into $(VENV)/ ..."
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/pip install --quiet --upgrade pip
	@$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1 || $(BIN)/pip install --quiet torch torchvision
	@$(BIN)/pip install --quiet -e ".[test,pretrained,onnx,tracking]"
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/campar demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python -m bench
