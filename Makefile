# edge-sr: `make demo` runs the main job on the embedded default (ONNX Runtime, CPU),
# `make test` runs the test suite. Both set themselves up on a fresh machine.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SHARED_DATA := $(abspath ../shared/data)
EDGE_SR_DATA ?= $(if $(wildcard $(SHARED_DATA)),$(SHARED_DATA),)
export EDGE_SR_DATA
export PYTHONUNBUFFERED := 1

.PHONY: results-doc setup demo test test-fast bench bench-eval bench-dobi bench-accuracy bench-accuracy-ngswin bench-sensitivity bench-latency lint kernels clean

$(BIN)/edge-sr: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps 'spandrel>=0.4'
	touch $@

setup: $(BIN)/edge-sr

demo: setup
	$(BIN)/edge-sr eval --model swinir-light-x2-ref --datasets Set5
	$(BIN)/edge-sr build --bits 4 --scale 2 --budget fast --out engines/swinir-light-x2-w4a4 --force
	$(BIN)/edge-sr upscale --engine engines/swinir-light-x2-w4a4 $(EDGE_SR_DATA)/benchmark/Set5/LR_bicubic/X2/butterflyx2.png -o results/demo --force
	$(BIN)/edge-sr profile --engine engines/swinir-light-x2-w4a4 --input-size 320x180 --runs 10 --compare --baselines none

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

bench: bench-eval bench-dobi bench-latency

bench-eval: setup
	$(BIN)/python -m benchmarks.eval_throughput

bench-dobi: setup
	$(BIN)/python -m benchmarks.dobi_time

bench-accuracy: setup
	$(BIN)/python -m benchmarks.accuracy

bench-accuracy-ngswin: setup
	$(BIN)/python -m benchmarks.accuracy --family ngswin

bench-sensitivity: setup
	$(BIN)/python -m benchmarks.sensitivity --family ngswin --scale 2 --bits 4
	$(BIN)/python -m benchmarks.sensitivity --family swinir --scale 2 --bits 2

bench-latency: setup
	$(BIN)/python -m benchmarks.latency

lint: setup
	$(BIN)/ruff check edge_sr calibrate runtime tests benchmarks

kernels:
	cmake -S runtime/kernels -B build/kernels -DCMAKE_BUILD_TYPE=Release && cmake --build build/kernels -j2

clean:
	rm -rf build .pytest_cache

results-doc:
	$(PY) scripts/assemble_results.py
