#!/usr/bin/env bash
# Builds the `--features cuda` binaries on a machine without a GPU or a CUDA install, for the GPU
# machine of the `device` tool (driver 580 = CUDA 13.0, an H200 = sm_90): nvcc 13.0, headers and
# libraries from PyPI wheels (PTX from a newer nvcc would not load on that driver), a link stub for
# the driver's libcuda (the real one is used at run time).
#
#   tools/build_cuda.sh check    `cargo check --features cuda` (nvcc, crt, nvvm, cccl, runtime
#                                 wheels only; what CI runs)
#   tools/build_cuda.sh build    the CLI and the GPU test binaries into target/cuda-bin/*.xz
#                                 (about 20 minutes on 2 cores), plus the diffusers wheels for
#                                 the baseline; then, per device call, tools/device_tree.sh and
#                                 tools/device_check.sh (two calls: tests, cli)
#
# Environment: CUDA_WHEELS (default ~/.cache/kandinsky-cuda) holds the wheels and the unpacked
# toolkit; CARGO_TARGET_DIR defaults to target/cuda so the CPU build is left alone.
set -euo pipefail
MODE=${1:-check}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
W=${CUDA_WHEELS:-$HOME/.cache/kandinsky-cuda}
PY=${PYTHON:-python3}
C=$W/root/nvidia/cu13
mkdir -p "$W/wheels" "$W/root" "$W/stub"

need=(nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88
      nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85)
if [ "$MODE" = build ]; then
  need+=(nvidia-cuda-nvrtc==13.0.88 "nvidia-cublas==13.0.*" nvidia-curand==10.4.0.35)
fi
"$PY" -m pip download -q --no-deps -d "$W/wheels" "${need[@]}"
for whl in "$W"/wheels/*.whl; do
  stamp="$W/root/.$(basename "$whl").done"
  [ -e "$stamp" ] || { "$PY" -m zipfile -e "$whl" "$W/root" && touch "$stamp"; }
done
chmod +x "$C"/bin/* "$C"/nvvm/bin/* 2>/dev/null || true

export CUDA_ROOT=$C CUDA_PATH=$C PATH=$C/bin:$PATH CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target/cuda}
cd "$ROOT"
if [ "$MODE" = check ]; then
  nvcc --version | tail -2
  exec cargo check --workspace --all-targets --features kandinsky/cuda
fi

# Linking: unversioned names for the wheels' libraries, and a libcuda stub with every driver
# function cudarc declares.
for f in "$C"/lib/lib{cublas,cublasLt,cudart,nvrtc}.so.13 "$C"/lib/libcurand.so.10; do
  ln -sf "$(basename "$f")" "${f%%.so.*}.so"
done
CUDARC=$(cargo metadata --format-version 1 --features kandinsky/cuda | "$PY" -c \
  'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"]=="cudarc"))')
grep -o "fn cu[A-Za-z0-9_]*(" "$(dirname "$CUDARC")/src/driver/sys/mod.rs" | sed 's/fn //; s/($//' | sort -u |
  awk '{print "void "$1"(void){}"}' > "$W/stub/cuda_stub.c"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$W/stub/libcuda.so" "$W/stub/cuda_stub.c"
export RUSTFLAGS="-L $C/lib -L $W/stub"

tests=(unet_parity movq_parity encoder_parity pipelines_e2e auto_pipeline)
cargo build --release -p kandinsky-cli --features cuda
args=(); for t in "${tests[@]}"; do args+=(--test "$t"); done
cargo test --release -p kandinsky --features cuda --no-run "${args[@]}" 2>&1 | tee "$W/tests.log"
OUTDIR=$ROOT/target/cuda-bin
rm -rf "$OUTDIR" && mkdir -p "$OUTDIR/wheels"
cp "$CARGO_TARGET_DIR/release/kandinsky" "$OUTDIR/"
for t in "${tests[@]}"; do
  bin=$(grep -o "tests/$t.rs ([^)]*)" "$W/tests.log" | sed 's/.*(//; s/)//' | tail -1)
  cp "$bin" "$OUTDIR/$t"
done
strip "$OUTDIR"/kandinsky "${tests[@]/#/$OUTDIR/}"
# xz: about 6× smaller, for the device tool's 64 MiB (see tools/device_tree.sh).
xz -T0 -6 "$OUTDIR"/kandinsky "${tests[@]/#/$OUTDIR/}"
# The baseline's Python packages the device's image lacks (it has torch, transformers,
# huggingface-hub, safetensors, numpy, pillow; see the device library's KINDS.md).
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 -d "$OUTDIR/wheels" diffusers==0.42.1 importlib_metadata==10.2.0 \
  lazy-importer==0.1.0
du -sh "$OUTDIR"/*
