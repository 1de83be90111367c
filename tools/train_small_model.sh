#!/usr/bin/env bash
# Trains our small Kandinsky end to end on the synthetic shapes world and assembles the diffusers
# model directories (the default model lives in models/small). Every stage resumes from its
# checkpoint, so the script can be re-run after an interruption. About 110 minutes on the 2-core
# development machine. Usage: tools/train_small_model.sh [RUNS_DIR] [MODEL_DIR]
# Then: kandinsky eval shapes --model MODEL_DIR/decoder --prior MODEL_DIR/prior
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
# The decoder UNet in two phases: plain ε loss, then the ε loss weighted towards the noisy steps
# (capped v-loss weights), which decide layout and colours. The shipped model was trained this way.
UNET=(--out "$RUNS/unet" --movq "$RUNS/movq" --clip "$RUNS/clip" --mclip "$RUNS/mclip" --batch 16 --lr 5e-4 --log-every 100)
$K train unet "${UNET[@]}" --steps 1800
$K train unet "${UNET[@]}" --steps 3500 --lr-decay-steps 800 --v-weight-cap 50
$K train unet --inpaint --init "$RUNS/unet" --out "$RUNS/inpaint" --movq "$RUNS/movq" --clip "$RUNS/clip" \
    --mclip "$RUNS/mclip" --steps 800 --batch 16 --lr 5e-4 --lr-decay-steps 200 --v-weight-cap 50 --log-every 100
$K train assemble --runs "$RUNS" --out "$MODEL"
