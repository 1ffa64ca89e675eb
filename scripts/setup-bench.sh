#!/usr/bin/env bash
# Installs the Python baselines of the data-loader benchmark into .venv (made by scripts/setup.sh):
# pyarrow with numpy (reading the same Parquet shards into arrays) and tiktoken (GPT-2 BPE on the
# same text). Not part
# of `make test`; run it once before `cargo bench -p bd3-dataloader --bench data_throughput`.
# Idempotent: a second run only checks the versions.
set -euo pipefail
cd "$(dirname "$0")/.."

PYARROW_VERSION=26.0.1
TIKTOKEN_VERSION=0.14.0
NUMPY_VERSION=2.4.6

if [ ! -x .venv/bin/python ]; then
    echo "setup-bench: creating .venv" >&2
    python3 -m venv .venv
fi
have() { .venv/bin/python -c "import $1, sys; sys.exit($1.__version__ != '$2')" 2>/dev/null; }
if ! have pyarrow "$PYARROW_VERSION" || ! have tiktoken "$TIKTOKEN_VERSION" || ! have numpy "$NUMPY_VERSION"; then
    echo "setup-bench: installing pyarrow==$PYARROW_VERSION numpy==$NUMPY_VERSION tiktoken==$TIKTOKEN_VERSION into .venv" >&2
    .venv/bin/pip install --disable-pip-version-check -q \
        "pyarrow==$PYARROW_VERSION" "numpy==$NUMPY_VERSION" "tiktoken==$TIKTOKEN_VERSION"
fi
.venv/bin/python -c "import pyarrow, numpy, tiktoken; print('setup-bench: pyarrow', pyarrow.__version__, 'numpy', numpy.__version__, 'tiktoken', tiktoken.__version__)"
