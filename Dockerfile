# The bd3 image for Kubernetes (k8s/README.md): `docker build -t REGISTRY/bd3:TAG .`
#
# Build stage: bd3 with the fused CUDA kernels, compiled against the libtorch inside PyTorch's wheel
# (as scripts/setup.sh does on a development machine). Runtime stage: the same wheel (libtorch and
# the CUDA libraries it ships), Open MPI, and the SSH server through which the MPI operator's
# launcher starts the ranks in the worker pods.
ARG TORCH_VERSION=2.11.0
# torch 2.11.0 depends on cuda-toolkit 13.0.2: nvcc must match its CUDA runtime.
ARG CUDA_TOOLKIT_VERSION=13.0.2

FROM rust:1-bookworm AS build
ARG TORCH_VERSION
ARG CUDA_TOOLKIT_VERSION
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      build-essential pkg-config python3-venv libopenmpi-dev openmpi-bin libclang-dev \
 && rm -rf /var/lib/apt/lists/*
# The venv lives at the same path in both stages: bd3's RPATH points into it.
RUN python3 -m venv /opt/bd3/venv \
 && /opt/bd3/venv/bin/pip install --no-cache-dir "torch==${TORCH_VERSION}" \
      "cuda-toolkit[nvcc,crt,nvvm,cccl,cudart]==${CUDA_TOOLKIT_VERSION}"
WORKDIR /src
COPY . .
RUN ln -sfn "$(/opt/bd3/venv/bin/python -c 'import torch, os; print(os.path.dirname(torch.__file__))')" .libtorch \
 && cargo build --release --locked -p bd3-launcher --features cuda \
 && cp target/release/bd3 /opt/bd3/bd3 \
 # The compiler is needed only to build: keep the CUDA runtime libraries, drop nvcc.
 && /opt/bd3/venv/bin/pip uninstall -y nvidia-cuda-nvcc nvidia-nvvm nvidia-cuda-crt nvidia-cuda-cccl

FROM debian:bookworm-slim
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 libgomp1 openmpi-bin libopenmpi3 openssh-server openssh-client procps ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /run/sshd \
 # The operator mounts its keys into /root/.ssh (a Secret: modes sshd's StrictModes refuses), and
 # the launcher reaches worker pods whose host keys it cannot know in advance.
 && sed -i 's/^#\?StrictModes .*/StrictModes no/' /etc/ssh/sshd_config \
 && printf 'Host *\n    StrictHostKeyChecking no\n    UserKnownHostsFile /dev/null\n    LogLevel ERROR\n' \
      >> /etc/ssh/ssh_config
COPY --from=build /opt/bd3/venv /opt/bd3/venv
COPY --from=build /opt/bd3/bd3 /usr/local/bin/bd3
# mpirun runs as root in these pods; Open MPI wants that said explicitly.
ENV OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
WORKDIR /workspace
CMD ["bd3", "--help"]
