# bd3: `make demo` and `make test` work on a fresh Debian machine; everything they need is
# installed by scripts/setup.sh (idempotent, seconds when already done).
SHELL := /bin/bash
CARGO ?= cargo
BD3 := target/debug/bd3

# Demo knobs (the test suite runs the demo with a short step budget).
DEMO_STEPS ?= 200
DEMO_RUN_DIR ?= runs
DEMO_SAMPLE_TOKENS ?= 96
# The embedded corpus, tokenized into Parquet shards by `bd3 prepare` (seconds; kept between runs).
DEMO_DATA ?= data/shakespeare-gpt2-128
# Where training serves its Prometheus metrics (the tests take port 0: any free port).
DEMO_METRICS ?= 127.0.0.1:9400

.PHONY: setup build demo test test-cpus lint bench bench-attention bench-dist gpu-check-build clean

setup:
	@scripts/setup.sh

build: setup
	$(CARGO) build -p bd3-launcher

demo: build
	@# A demo run starts fresh: drop the checkpoints an earlier demo wrote (and nothing else).
	rm -rf $(DEMO_RUN_DIR)/tiny/checkpoints
	$(BD3) prepare --input data/shakespeare --output $(DEMO_DATA) --seq-len 128 --valid-documents 2
	$(BD3) train --config configs/tiny.toml --set train.steps=$(DEMO_STEPS) --set run.dir=$(DEMO_RUN_DIR) \
		--set data.dataset=$(DEMO_DATA) --set 'metrics.listen="$(DEMO_METRICS)"'
	$(BD3) sample --config $(DEMO_RUN_DIR)/tiny/config.toml --weights $(DEMO_RUN_DIR)/tiny/model.safetensors \
		--tokens $(DEMO_SAMPLE_TOKENS)

# The CUDA kernels (bd3-kernels feature `cuda`) compile here with nvcc from PyPI though no GPU runs
# them: their GPU-free tests (layout twin, kernel code on CPU threads, C++ error boundary) run and
# the GPU check binary builds.
test: setup
	@# Slurm for tests/tests/slurm.rs, whose tests start and stop their own clusters with it.
	scripts/slurm.sh install
	@# data/english for tests/tests/experiments.rs (experiments/ at --scale tiny).
	scripts/corpus.sh
	$(CARGO) build -p bd3-launcher
	$(CARGO) nextest run --workspace --no-fail-fast
	$(CARGO) nextest run -p bd3-kernels --features cuda --no-fail-fast -E 'binary(cuda)'
	$(CARGO) build -p bd3-kernels --features cuda --example cuda_check
	@# NCCL (trainer::dist::nccl) builds here and fails clearly without a GPU. dist-check's code
	@# with `cuda` (the GPU check's binary) is compiled in the same test build (as its test
	@# harness): a plain `cargo build` of it would compile the dependencies again without the
	@# dev-dependencies' features (minutes). kernels/build-gpu-check.sh builds the binary itself.
	$(CARGO) nextest run -p bd3-trainer --features cuda --no-fail-fast --lib --bin dist-check -E 'test(nccl)'

# The tests whose outcome depends on floating-point rounding in libtorch's kernels (comparisons
# against references, across ranks, micro-batches and backends), once more with libtorch's, MKL's
# and oneDNN's kernels held to the instruction sets of other CPUs, so that a tolerance tuned on
# one machine's GEMMs (AVX2 and AVX-512 round them differently) fails here first. Each entry is
# ATEN_CPU_CAPABILITY,MKL_ENABLE_INSTRUCTIONS,ONEDNN_MAX_CPU_ISA; the one this CPU runs anyway
# (`make test` covered it) is skipped. CI runs it after `make test` (.ci/run). Left out: the
# tensor-core emulation (our own C++ in a fixed order, against an fp64 reference).
NUMERIC_TESTS := binary(parity) | binary(objective) | binary(eval) | binary(sampler) \
	| (package(bd3-trainer) & kind(lib)) \
	| (binary(dist) & test(/^(two_ranks_with|zero_on_and_off|from_a_prepared|validation_and_clip)/)) \
	| test(=unpacked_training_leaves_padding_out_of_the_loss_on_any_number_of_ranks) \
	| test(=launch_local_trains_on_two_ranks)
CPU_ISAS := default,SSE4_2,SSE41 avx2,AVX2,AVX2
test-cpus: setup
	$(CARGO) build -p bd3-launcher
	@set -e; capability='import torch; print(torch.backends.cpu.get_cpu_capability())'; \
	native=$$(.venv/bin/python -W ignore -c "$$capability"); \
	for isa in $(CPU_ISAS); do \
		IFS=, read -r aten mkl onednn <<<"$$isa"; \
		picked=$$(ATEN_CPU_CAPABILITY=$$aten .venv/bin/python -W ignore -c "$$capability"); \
		if [ "$$picked" = "$$native" ]; then \
			echo "== ATEN_CPU_CAPABILITY=$$aten: $$picked is this CPU's own, which make test ran"; continue; \
		fi; \
		echo "== ATEN_CPU_CAPABILITY=$$aten ($$picked, this CPU: $$native) MKL_ENABLE_INSTRUCTIONS=$$mkl ONEDNN_MAX_CPU_ISA=$$onednn"; \
		ATEN_CPU_CAPABILITY=$$aten MKL_ENABLE_INSTRUCTIONS=$$mkl ONEDNN_MAX_CPU_ISA=$$onednn \
			$(CARGO) nextest run --workspace --no-fail-fast -E '$(NUMERIC_TESTS)'; \
	done

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy -p bd3-kernels --features cuda --all-targets -- -D warnings
	$(CARGO) clippy -p bd3-trainer --features cuda --all-targets -- -D warnings

# Training throughput on CPU (tiny and small configs); see docs/benchmarks.md.
bench: setup
	$(CARGO) bench -p bd3-trainer --bench train_throughput --profile dev

# Block-sparse against dense-mask attention on CPU (forward+backward); see docs/benchmarks.md.
bench-attention: setup
	$(CARGO) bench -p bd3-kernels --bench attention --profile dev

# Data parallelism on CPU: bucketed all-reduce against raw MPI_Allreduce (2 ranks), then tokens/s
# of the tiny config on 1 and 2 ranks; see docs/benchmarks.md.
bench-dist: setup
	$(CARGO) bench -p bd3-trainer --bench allreduce --profile dev
	scripts/bench-dist-throughput.sh

# The binary kernels/gpu-check.sh runs on a GPU machine (carry target/gpu there).
gpu-check-build: setup
	kernels/build-gpu-check.sh

clean:
	rm -rf target runs
