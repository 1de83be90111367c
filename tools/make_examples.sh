#!/usr/bin/env bash
# Regenerates README.md's example images (docs/examples/) with the default small model
# (models/small): every mode of the demo but ControlNet, from fixed seeds.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p kandinsky-cli
K=target/release/kandinsky
D=docs/examples
mkdir -p "$D"
$K generate --prompt "a large blue square in the centre on a yellow background" --seed 1 --output "$D/t2i_en.png"
$K generate --prompt "маленький красный круг слева на синем фоне" --seed 2 --output "$D/t2i_ru.png"
$K mix --input "a red circle" --weight 0.5 --input "a blue square" --weight 0.5 --seed 3 --output "$D/mix.png"
$K variations --image "$D/t2i_en.png" --num-images 2 --seed 4 --output "$D/variations.png"
$K img2img --image "$D/t2i_en.png" --prompt "a large green circle in the centre on a yellow background" \
    --strength 0.6 --seed 5 --output "$D/img2img.png"
cp fixtures/small_model/inpaint_mask.png "$D/mask.png"
$K inpaint --image "$D/t2i_en.png" --mask "$D/mask.png" \
    --prompt "a large red triangle in the centre on a yellow background" --seed 6 --output "$D/inpaint.png"
$K outpaint --image "$D/t2i_ru.png" --right 32 --prompt "a small red circle on a blue background" \
    --seed 7 --output "$D/outpaint.png"
