#!/usr/bin/env bash
# Trains our small Kandinsky end to end on the synthetic shapes world, assembles the diffusers model
# directories and evaluates them. Every stage resumes from its checkpoint, so the script can be
# re-run after an interruption. Usage: tools/train_small_model.sh [RUNS_DIR] [MODEL_DIR]
# DRAFT: the step counts are a first budget, not yet a recipe that meets the evaluation targets.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs}
MODEL=${2:-$RUNS/model}
cargo build --release -p kandinsky-cli
K=target/release/kandinsky
mkdir -p "$RUNS"
$K train clip  --out "$RUNS/clip"  --steps 800  --batch 64 --log-every 100
$K train mclip --out "$RUNS/mclip" --clip "$RUNS/clip" --steps 600 --batch 32 --lr 2e-3 --log-every 100
$K train movq  --out "$RUNS/movq"  --steps 400  --batch 4  --lr 2e-3 --log-every 50
$K train prior --out "$RUNS/prior" --clip "$RUNS/clip" --steps 1200 --batch 64 --log-every 100
$K train unet  --out "$RUNS/unet"  --movq "$RUNS/movq" --clip "$RUNS/clip" --mclip "$RUNS/mclip" \
    --steps 1500 --batch 8 --lr 5e-4 --log-every 100
$K train unet --inpaint --out "$RUNS/inpaint" --movq "$RUNS/movq" --clip "$RUNS/clip" --mclip "$RUNS/mclip" \
    --steps 300 --batch 8 --lr 5e-4 --log-every 100
$K train assemble --runs "$RUNS" --out "$MODEL"
$K eval shapes --model "$MODEL/decoder" --prior "$MODEL/prior" --n 40 --steps 50
