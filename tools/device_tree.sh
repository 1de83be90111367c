#!/usr/bin/env bash
# The device tool sends the working tree (tracked files too) and the carried paths, 64 MiB in all,
# and ours is larger (fixtures/ + models/small alone are ~77 MB). Before each device call, move
# what that call does not need out of the tree; move it back after. The device check runs in two
# calls (tools/device_check.sh tests | cli):
#   tools/device_tree.sh offload tests   keeps the parity fixtures, carries 4 test binaries
#   tools/device_tree.sh offload cli     keeps models/small, carries the CLI and the wheels
#   tools/device_tree.sh restore         puts everything back (git status is clean again)
# `offload` prints what would travel; the binaries come xz-compressed from tools/build_cuda.sh.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
AWAY=${KANDINSKY_OFFLOAD:-/tmp/kandinsky-offload}
cd "$ROOT"
case "${1:-}" in
  offload)
    part=${2:?tests or cli}
    if [ -e "$AWAY" ]; then
      echo "$AWAY exists: run '$0 restore' first" >&2
      exit 1
    fi
    mkdir -p "$AWAY"
    if [ "$part" = tests ]; then
      move=(models fuzz fixtures/formats fixtures/real_shapes.json fixtures/rng fixtures/schedulers fixtures/small_model)
      bins=(unet_parity movq_parity encoder_parity pipelines_e2e)
    else
      move=(fixtures fuzz)
      bins=(kandinsky)
    fi
    for p in "${move[@]}"; do
      [ -e "$p" ] && { mkdir -p "$AWAY/$(dirname "$p")"; mv "$p" "$AWAY/$p"; }
    done
    # Only this call's binaries travel in target/cuda-bin (carry it): park the others.
    mkdir -p "$AWAY/cuda-bin"
    for f in target/cuda-bin/*.xz; do
      b=$(basename "$f" .xz)
      [[ " ${bins[*]} " == *" $b "* ]] || mv "$f" "$AWAY/cuda-bin/"
    done
    [ "$part" = tests ] && [ -d target/cuda-bin/wheels ] && mv target/cuda-bin/wheels "$AWAY/cuda-bin/"
    python3 - <<'PY'
import os, subprocess
names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                       capture_output=True, check=True).stdout.split(b"\0")
tree = sum(os.lstat(n).st_size for n in names if n and os.path.lexists(n))
carried = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk("target/cuda-bin") for f in fs)
print(f"travels: working tree {tree / 2**20:.1f} MiB + target/cuda-bin {carried / 2**20:.1f} MiB"
      f" = {(tree + carried) / 2**20:.1f} MiB (limit 64 MiB)")
PY
    ;;
  restore)
    [ -d "$AWAY" ] || exit 0
    for f in "$AWAY"/cuda-bin/*; do [ -e "$f" ] && mv "$f" target/cuda-bin/; done
    rmdir "$AWAY/cuda-bin" 2>/dev/null || true
    for p in models fuzz fixtures fixtures/formats fixtures/real_shapes.json fixtures/rng fixtures/schedulers fixtures/small_model; do
      if [ -e "$AWAY/$p" ] && [ ! -e "$p" ]; then mv "$AWAY/$p" "$p"; fi
    done
    find "$AWAY" -depth -type d -empty -delete
    git status --short | head
    ;;
  *) echo "usage: $0 offload tests|cli | restore" >&2; exit 2 ;;
esac
