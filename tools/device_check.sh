#!/usr/bin/env bash
# The GPU check of issue 18 on the device machine (the `device` tool's `run`), from the
# repository root, in two calls because of the tool's 64 MiB (tools/device_tree.sh prepares the
# tree for each; `carry: ["target/cuda-bin"]`, built here by tools/build_cuda.sh build):
#   bash tools/device_check.sh tests   parity tests on the GPU in f32 (the CPU criteria):
#                                      tests-*.txt
#   bash tools/device_check.sh cli     the small model's images in f32/f16/bf16 on the GPU against
#                                      the CPU's f32 (images/), and tools/gpu_bench.py: ours against
#                                      diffusers on the same card (gpu_bench.json, gpu_bench.txt)
# Both write nvidia-smi.txt and summary.txt under $OUT. A few minutes each on an H200.
set -u
PART=${1:-cli}
OUT=${OUT:-/tmp/device-out}
mkdir -p "$OUT/images"
B=target/cuda-bin
for f in "$B"/*.xz; do [ -e "$f" ] && xz -d -f "$f" && chmod +x "${f%.xz}"; done
log() { echo "$*" | tee -a "$OUT/summary.txt"; }
log "device check $(date -u +%FT%TZ) in $PWD"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || log "nvidia-smi failed"

# The binaries hold this checkout's build-time paths (fixtures, models/small): point them here.
if [ ! -e /work/main ]; then
  mkdir -p /work && ln -s "$PWD" /work/main || log "cannot link /work/main: fixture paths will fail"
fi

# Link-time libraries came from PyPI wheels; at run time use the same CUDA 13 libraries of the
# machine's torch (cuBLAS, cuRAND, NVRTC, cudart) and the driver's libcuda.
LIBS=$(python3 - <<'PY'
import glob, os
try:
    import nvidia
    roots = list(nvidia.__path__)
except Exception:
    roots = []
dirs = set()
for r in roots:
    for so in glob.glob(os.path.join(r, "**", "lib", "*.so*"), recursive=True):
        dirs.add(os.path.dirname(so))
print(":".join(sorted(dirs)))
PY
)
export LD_LIBRARY_PATH="${LIBS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
log "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
for b in "$B"/*; do
  [ -f "$b" ] && [ -x "$b" ] && { ldd "$b" | grep -E "not found|cublas|curand|nvrtc|cudart|libcuda" >> "$OUT/summary.txt"; break; }
done

# 1. Parity tests on the GPU, f32 (the CPU criteria).
[ "$PART" = tests ] && for t in unet_parity movq_parity encoder_parity pipelines_e2e; do
  if [ -x "$B/$t" ]; then
    KANDINSKY_TEST_DEVICE=cuda timeout 240 "$B/$t" --test-threads 1 --nocapture > "$OUT/tests-$t.txt" 2>&1
    log "test $t (cuda): exit $? $(grep -E '^test result' "$OUT/tests-$t.txt" | tail -1)"
  else
    log "test $t: binary missing"
  fi
done
[ "$PART" = tests ] && { cat "$OUT/summary.txt"; exit 0; }

# 2. The CLI on the GPU: the small model in three precisions against the CPU's f32.
P="a large red circle at the centre on a blue background"
for run in "cpu f32" "cuda f32" "cuda f16" "cuda bf16"; do
  set -- $run
  s=$(date +%s%N)
  "$B/kandinsky" --device "$1" --dtype "$2" generate --prompt "$P" --seed 11 \
    --output "$OUT/images/$1-$2.png" > "$OUT/images/$1-$2.log" 2>&1
  log "generate $1 $2: exit $? in $(( ($(date +%s%N) - s) / 1000000 )) ms"
done
python3 - "$OUT/images" >> "$OUT/summary.txt" 2>&1 <<'PY'
import sys, zlib, struct, os
def png(path):
    # A plain RGB8 PNG reader (our encoder's output), so that no PIL is needed here.
    data = open(path, "rb").read()
    pos, idat, w = 8, b"", 0
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            w, h = struct.unpack(">II", body[:8])
        if kind == b"IDAT":
            idat += body
        pos += 12 + n
    raw, stride, rows, prev = zlib.decompress(idat), w * 3, [], bytearray(w * 3)
    for y in range(h):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - 3] if i >= 3 else 0
            b, c = prev[i], prev[i - 3] if i >= 3 else 0
            if f == 1: line[i] = (line[i] + a) & 255
            elif f == 2: line[i] = (line[i] + b) & 255
            elif f == 3: line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c; pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line)); prev = line
    return b"".join(rows)
d = sys.argv[1]
try:
    ref = png(os.path.join(d, "cpu-f32.png"))
except Exception as e:
    print("no CPU reference image:", e); sys.exit()
for name in ["cuda-f32", "cuda-f16", "cuda-bf16"]:
    try:
        img = png(os.path.join(d, name + ".png"))
    except Exception as e:
        print(name, "missing:", e); continue
    diff = [abs(a - b) for a, b in zip(img, ref)]
    print(f"{name} vs cpu-f32: max {max(diff)}/255, mean {sum(diff) / len(diff):.3f}/255")
PY

# 3. Ours against diffusers on the same card (real-size random models).
if ! python3 -c "import diffusers" 2>/dev/null && [ -d target/cuda-bin/wheels ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site target/cuda-bin/wheels/*.whl > "$OUT/pip.txt" 2>&1
  log "installed diffusers from the carried wheels: exit $?"
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -c "import diffusers, torch; print('diffusers', diffusers.__version__, 'torch', torch.__version__)" \
  >> "$OUT/summary.txt" 2>&1
timeout 300 python3 tools/gpu_bench.py --binary "$B/kandinsky" --dtypes f16,f32 --runs 3 \
  --json-out "$OUT/gpu_bench.json" > "$OUT/gpu_bench.txt" 2>&1
log "gpu_bench: exit $?"
cat "$OUT/gpu_bench.txt" >> "$OUT/summary.txt"
cat "$OUT/summary.txt"
