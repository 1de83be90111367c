#!/usr/bin/env bash
# Trains our small Kandinsky end to end on the synthetic shapes world and assembles the diffusers
# model directories of both families (the default model lives in models/small): Kandinsky 2.1
# (decoder, decoder-inpaint) and 2.2 (decoder-2-2, decoder-2-2-inpaint, decoder-2-2-controlnet-depth)
# with one prior. Every stage resumes from its checkpoint, so the script can be re-run after an
# interruption. An earlier form ran from scratch in 116 minutes on the 2-core development
# machine (the seventeenth session); this form trains the two inpainting UNets about 20 minutes
# longer (eighteenth session) and the text-to-image decoders' last phases on grid-placed objects,
# which adds one pool of teacher outputs (about 1.5 minutes; nineteenth session). Resumed from the
# seventeenth session's MoVQ, CLIP, M-CLIP, prior and first three 2.1 UNet phases, its outputs are
# models/small byte for byte (stage times in README.md and docs/small-model.md).
# Usage: tools/train_small_model.sh [RUNS_DIR] [MODEL_DIR]
# Stages that do not depend on each other run side by side, one core each, with their output in
# RUNS_DIR/<stage>.log: at these model sizes candle's CPU ops hardly use a second core (a CLIP
# step takes 0.68 s on two cores and 0.75 s on one), so two stages at once cost almost nothing.
# The decoder UNets split each batch over both cores themselves.
# Then: kandinsky eval shapes --model MODEL_DIR/decoder --prior MODEL_DIR/prior (and --model
# MODEL_DIR/decoder-2-2 --inpaint-model MODEL_DIR/decoder-2-2-inpaint --controlnet-model
# MODEL_DIR/decoder-2-2-controlnet-depth).
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
# The same for rayon's pool (our kernels' workers) in the stages that run side by side (the UNet
# stages, which split each batch over threads themselves, set both to 1 anyway).
export RAYON_NUM_THREADS=1
# The MoVQ needs no other stage: it trains beside CLIP. Three phases (warm restarts at steps 800
# and 1600), a 4,096-entry codebook, and half its images 2x2 collages of half-size renders: its
# round trip caps every decoder's shape accuracy, and corners are what it learns last.
$K train movq  --out "$RUNS/movq"  --steps 2400 --lr-restarts 800,1600 --lr-decay-steps 200 --batch 4 \
    --lr 2e-3 --codebook-size 4096 --collage 0.5 --log-every 100 > "$RUNS/movq.log" 2>&1 &
movq=$!
# CLIP in two phases (the shipped model was trained so), a warm restart of the learning rate at
# step 2000.
$K train clip  --out "$RUNS/clip"  --steps 2000 --batch 64 --lr-decay-steps 400 --log-every 100
$K train clip  --out "$RUNS/clip"  --steps 3000 --batch 64 --lr-decay-steps 400 --log-every 100
# The prior needs only CLIP: it trains beside M-CLIP and the first 40 minutes of the UNet. Four
# phases (warm restarts at steps 800, 2400 and 3600): its samples decide the objects' colour (the
# decoder given real image embeddings draws 96 / 98 % of colours right, given the 2400-step
# prior's samples 83 / 89 %, given the 3600-step prior's 93 / 97 %; a fourth phase lifted the
# backgrounds: 2.1 Russian 95 -> 100 %).
$K train prior --out "$RUNS/prior" --clip "$RUNS/clip" --steps 4600 --lr-restarts 800,2400,3600 --lr-decay-steps 200 \
    --batch 64 --log-every 100 > "$RUNS/prior.log" 2>&1 &
prior=$!
$K train mclip --out "$RUNS/mclip" --clip "$RUNS/clip" --steps 600 --batch 32 --lr 2e-3 --log-every 100
wait "$movq"
# The decoder UNet: the ε loss weighted towards the noisy steps (capped v-loss weights), which
# decide layout and colours. Three phases (warm restarts of the learning rate at steps 2600 and
# 4600): it was still improving at the end of each. The third phase was 1400 steps until the
# fourth phase below was added; it is 1000 now, for time. The teachers' pool is built once and
# kept for the other UNets (and for a resumed run).
MODELS=(--movq "$RUNS/movq" --clip "$RUNS/clip" --mclip "$RUNS/mclip" --batch 16 --log-every 100)
TEACHERS=("${MODELS[@]}" --pool-cache "$RUNS/pool.safetensors")
UNET_ARGS=("${TEACHERS[@]}" --v-weight-cap 50 --lr 5e-4)
# The text-to-image decoders' last phases draw their objects on the latent grid (--grid-aligned:
# each training image's object box snapped to the MoVQ's cells, a pool of its own): a 4-cell
# square's edges then fall on cell edges, which the UNet draws, where a jittered one's fall inside
# cells, which it rounds off (small squares came out as circles). As a fifth phase of the
# previous model, given real image embeddings, the grid drew 35 of 68 small squares against 12
# with the free placement. The inpainting and ControlNet stages keep the free placement: their
# inputs are users' images and hints.
GRID=("${MODELS[@]}" --pool-cache "$RUNS/pool-grid.safetensors" --grid-aligned)
$K train unet --out "$RUNS/unet-base" "${UNET_ARGS[@]}" --steps 5600 --lr-restarts 2600,4600 --lr-decay-steps 600
# A fourth phase at a lower learning rate, from fresh optimiser state, its loss weighting the
# low-noise timesteps more (cap 5: they settle a small object's corners). The decoder alone, given
# real image embeddings, read 77 / 79 % of shapes right before it and 83 / 82 % after, colour
# 100 / 100 % (small triangles stopped coming out round). The same 1000 steps on the least
# noisy 400 timesteps only (--max-timestep 400) did no better.
$K train unet --init "$RUNS/unet-base" --out "$RUNS/unet" "${GRID[@]}" --v-weight-cap 5 --lr 2e-4 \
    --steps 1000 --lr-decay-steps 250
# The 2.1 inpainting UNet from it (conv_in widened by zeros). Part of its examples take another
# scene's prompt, as composites that show that scene in the repainted area, and their latents
# lean towards it, so that the model keeps the unmasked part whatever the prompt says and pulls
# it back when the sampler wanders off (diffusers' KandinskyInpaintPipeline does not re-impose
# the known latents); the new conv_in inputs learn 10 times faster than the rest. The kept
# pixels' change was 73/255 with --mismatch 0.3 alone, 32 with the drift flags, 23 with all of
# these (800 steps from the eighth session's UNet). Steps are what it lacks: from the seventeenth
# session's UNet, 800 steps left 24.8, 1600 17.3.
INPAINT_ARGS=(--mismatch 0.6 --drift 1 --drift-in-image --composite --new-input-lr 10)
$K train unet --inpaint --init "$RUNS/unet" --out "$RUNS/inpaint" "${UNET_ARGS[@]}" \
    --steps 3200 --lr-decay-steps 800 "${INPAINT_ARGS[@]}"
# Kandinsky 2.2: its decoder is fine-tuned from the 2.1 UNet (text parameters dropped, image
# tokens repeated), in two phases (the second from fresh optimiser state: the Russian scores rose
# 3 to 11 points with it, given the prior's samples), then its inpainting UNet and depth ControlNet
# from that. Half of the ControlNet's examples take the prompt of the same scene with the object
# elsewhere, so that the position comes from the hint.
$K train unet --family 2.2 --init "$RUNS/unet" --out "$RUNS/unet-2-2-base" "${GRID[@]}" --v-weight-cap 50 --lr 5e-4 \
    --steps 1000 --lr-decay-steps 300
$K train unet --family 2.2 --init "$RUNS/unet-2-2-base" --out "$RUNS/unet-2-2" "${GRID[@]}" --v-weight-cap 50 --lr 5e-4 \
    --steps 1000 --lr-decay-steps 300
# The 2.2 pipeline re-imposes the known latents at every step except in the band (the kept
# latent cells next to the mask, which prepare_mask hands to the model to paint), whose loss
# counts 8 times here: with 1000 steps instead of 400 the band's change fell from 39 to 24/255.
$K train unet --family 2.2 --inpaint --init "$RUNS/unet-2-2" --out "$RUNS/inpaint-2-2" "${UNET_ARGS[@]}" \
    --steps 1000 --lr-decay-steps 300 "${INPAINT_ARGS[@]}" --band-weight 8
$K train unet --family 2.2 --depth-control --init "$RUNS/unet-2-2" --out "$RUNS/depth-2-2" "${UNET_ARGS[@]}" \
    --steps 400 --lr-decay-steps 150 --moved 0.5
wait "$prior"
$K train assemble --runs "$RUNS" --out "$MODEL"
