#!/usr/bin/env bash
# Trains our small Kandinsky end to end on the synthetic shapes world and assembles the diffusers
# model directories (the default model lives in models/small). Every stage resumes from its
# checkpoint, so the script can be re-run after an interruption. About 116 minutes on the 2-core
# development machine (see docs/small-model.md). Usage: tools/train_small_model.sh [RUNS_DIR] [MODEL_DIR]
# Stages that do not depend on each other run side by side, one core each, with their output in
# RUNS_DIR/<stage>.log: at these model sizes candle's CPU ops hardly use a second core (a CLIP
# step takes 0.68 s on two cores and 0.75 s on one), so two stages at once cost almost nothing.
# The decoder UNets split each batch over both cores themselves.
# Then: kandinsky eval shapes --model MODEL_DIR/decoder --prior MODEL_DIR/prior
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs}
MODEL=${2:-$RUNS/model}
cargo build --release -p kandinsky-cli
K=target/release/kandinsky
mkdir -p "$RUNS"
# One candle thread per process: its idle elementwise workers spin and would take the other
# core from the stage running beside it.
export CANDLE_NUM_THREADS=1
# Keep freed activations in the process: by default glibc returns them to the kernel every step
# and faults them back in (7 % of a UNet step).
export GLIBC_TUNABLES=glibc.malloc.trim_threshold=4294967296:glibc.malloc.mmap_threshold=33554432
# The MoVQ needs no other stage: it trains beside CLIP.
$K train movq  --out "$RUNS/movq"  --steps 400  --batch 4  --lr 2e-3 --log-every 50 > "$RUNS/movq.log" 2>&1 &
movq=$!
# CLIP in two phases (the shipped model was trained so), a warm restart of the learning rate at
# step 2000.
$K train clip  --out "$RUNS/clip"  --steps 2000 --batch 64 --lr-decay-steps 400 --log-every 100
$K train clip  --out "$RUNS/clip"  --steps 3000 --batch 64 --lr-decay-steps 400 --log-every 100
# The prior needs only CLIP: it trains beside M-CLIP and the first ~40 minutes of the UNet. Two
# phases (a warm restart at step 800): at 800 steps its samples were the bottleneck of the whole
# model (mean cosine to the real image's embedding 0.937 English, 0.909 Russian; 0.966 / 0.960
# at 2400), while the decoder given real image embeddings already got colours and positions right.
$K train prior --out "$RUNS/prior" --clip "$RUNS/clip" --steps 2400 --lr-restarts 800 --lr-decay-steps 200 \
    --batch 64 --log-every 100 > "$RUNS/prior.log" 2>&1 &
prior=$!
$K train mclip --out "$RUNS/mclip" --clip "$RUNS/clip" --steps 600 --batch 32 --lr 2e-3 --log-every 100
wait "$movq"
# The decoder UNet: the ε loss weighted towards the noisy steps (capped v-loss weights), which
# decide layout and colours. Three phases (warm restarts of the learning rate at steps 2600 and
# 5000): it was still improving at the end of each. The teachers' pool is built once and kept
# for the inpainting UNet (and for a resumed run).
$K train unet --out "$RUNS/unet" --movq "$RUNS/movq" --clip "$RUNS/clip" --mclip "$RUNS/mclip" \
    --batch 16 --lr 5e-4 --log-every 100 --steps 6400 --lr-restarts 2600,5000 --lr-decay-steps 600 \
    --v-weight-cap 50 --pool-cache "$RUNS/pool.safetensors"
$K train unet --inpaint --init "$RUNS/unet" --out "$RUNS/inpaint" --movq "$RUNS/movq" --clip "$RUNS/clip" \
    --mclip "$RUNS/mclip" --steps 400 --batch 16 --lr 5e-4 --lr-decay-steps 150 --v-weight-cap 50 --log-every 100 \
    --pool-cache "$RUNS/pool.safetensors"
wait "$prior"
$K train assemble --runs "$RUNS" --out "$MODEL"
