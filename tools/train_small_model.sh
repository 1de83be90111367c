#!/usr/bin/env bash
# Trains our small Kandinsky end to end on the synthetic shapes world and assembles the diffusers
# model directories (the default model lives in models/small). Every stage resumes from its
# checkpoint, so the script can be re-run after an interruption. About 170 minutes on the 2-core
# development machine. Usage: tools/train_small_model.sh [RUNS_DIR] [MODEL_DIR]
# Then: kandinsky eval shapes --model MODEL_DIR/decoder --prior MODEL_DIR/prior
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs}
MODEL=${2:-$RUNS/model}
cargo build --release -p kandinsky-cli
K=target/release/kandinsky
mkdir -p "$RUNS"
# CLIP in two phases (the shipped model was trained so): position is the last attribute it
# learns, after colours, size and shape, and only began to show after step 2000.
$K train clip  --out "$RUNS/clip"  --steps 2000 --batch 64 --lr-decay-steps 400 --log-every 100
$K train clip  --out "$RUNS/clip"  --steps 3000 --batch 64 --lr-decay-steps 400 --log-every 100
$K train mclip --out "$RUNS/mclip" --clip "$RUNS/clip" --steps 600 --batch 32 --lr 2e-3 --log-every 100
$K train movq  --out "$RUNS/movq"  --steps 400  --batch 4  --lr 2e-3 --log-every 50
$K train prior --out "$RUNS/prior" --clip "$RUNS/clip" --steps 800 --lr-decay-steps 200 --batch 64 --log-every 100
# The decoder UNet: the ε loss weighted towards the noisy steps (capped v-loss weights), which
# decide layout and colours. Three phases (warm restarts of the learning rate at steps 2600 and
# 5000; one run, so the teachers' pool is built once): it was still improving at the end of each.
$K train unet --out "$RUNS/unet" --movq "$RUNS/movq" --clip "$RUNS/clip" --mclip "$RUNS/mclip" \
    --batch 16 --lr 5e-4 --log-every 100 --steps 6400 --lr-restarts 2600,5000 --lr-decay-steps 600 \
    --v-weight-cap 50
$K train unet --inpaint --init "$RUNS/unet" --out "$RUNS/inpaint" --movq "$RUNS/movq" --clip "$RUNS/clip" \
    --mclip "$RUNS/mclip" --steps 400 --batch 16 --lr 5e-4 --lr-decay-steps 150 --v-weight-cap 50 --log-every 100
$K train assemble --runs "$RUNS" --out "$MODEL"
