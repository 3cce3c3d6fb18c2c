#!/usr/bin/env bash
# A CUDA 13.0 toolkit for building the `cuda` feature, assembled from NVIDIA's PyPI wheels (nvcc,
# the runtime, cuBLAS, cuRAND, NVRTC, NCCL): the binary must link against the CUDA major version
# of the machine it runs on, whose libraries version their symbols (a build against Debian's CUDA
# 11.8 needs libcublas.so.11 there). 13.0 is the oldest 13.x, so the PTX it writes loads on every
# CUDA 13 driver.
#
#   deploy/gpu/cuda-toolkit.sh [DIR]     # default target/cuda13-toolkit; prints DIR
#
# DIR/root is then a CUDA_HOME: bin/nvcc, include/, nvvm/, and lib64/ with the unversioned names
# the linker looks for. About 1 GiB of wheels; nothing is installed system-wide.
set -euo pipefail
cd "$(dirname "$0")/../.."
DIR=$(mkdir -p "${1:-target/cuda13-toolkit}" && cd "${1:-target/cuda13-toolkit}" && pwd)
PIP=${PIP:-python3 -m pip}
WHEELS=(
  nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88
  nvidia-cublas==13.0.2.14 nvidia-curand==10.4.5.25 nvidia-nccl-cu13==2.32.6
)
if [ ! -x "$DIR/root/bin/nvcc" ]; then
  mkdir -p "$DIR/wheels" "$DIR/site"
  $PIP download -q --no-deps --only-binary=:all: --dest "$DIR/wheels" --python-version 3.11 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux2010_x86_64 "${WHEELS[@]}" >&2
  for wheel in "$DIR"/wheels/*.whl; do
    python3 -m zipfile -e "$wheel" "$DIR/site"
  done
  cuda=$DIR/site/nvidia/cu13
  chmod +x "$cuda"/bin/* "$cuda"/bin/crt/* "$cuda"/nvvm/bin/* 2>/dev/null || true
  rm -rf "$DIR/root"
  mkdir -p "$DIR/root/lib64"
  for part in bin include nvvm; do ln -s "$cuda/$part" "$DIR/root/$part"; done
  for lib in "$cuda"/lib/*.so.* "$DIR"/site/nvidia/nccl/lib/libnccl.so.2; do
    ln -sf "$lib" "$DIR/root/lib64/"
  done
  # The linker's names. libcuda.so is the driver's: any copy serves for linking (the binary asks
  # for libcuda.so.1, which the GPU machine's driver provides).
  (
    cd "$DIR/root/lib64"
    for pair in cublas:13 cublasLt:13 cudart:13 curand:10 nvrtc:13 nccl:2; do
      ln -sf "lib${pair%%:*}.so.${pair##*:}" "lib${pair%%:*}.so"
    done
    driver=
    for candidate in /usr/lib/x86_64-linux-gnu/libcuda.so /usr/local/cuda/lib64/stubs/libcuda.so \
      /usr/lib/x86_64-linux-gnu/libcuda.so.1; do
      [ -e "$candidate" ] && { driver=$candidate; break; }
    done
    [ -n "$driver" ] || { echo "cuda-toolkit: no libcuda.so to link against (install nvidia-cuda-toolkit)" >&2; exit 1; }
    ln -sf "$driver" libcuda.so
  )
fi
"$DIR/root/bin/nvcc" --version | tail -1 >&2
echo "$DIR/root"
