"""Seeds of the fuzz corpora (fuzz/corpus/<target>/): small valid inputs of every parser, and the
named hostile ones. Deterministic; run with the pinned environment (torch 2.15.0):
    VENV/bin/python tools/make_fuzz_corpus.py
libFuzzer adds what it finds to the same folders; they are kept and replayed by
crates/kandinsky-fuzz/tests/replay.rs.
"""
import base64
import glob
import io
import json
import os
import shutil
import struct

import torch
from PIL import Image
from safetensors.torch import save

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
OUT = os.path.join(ROOT, "fuzz", "corpus")


def put(target, name, data):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def raw_safetensors(header, data=b""):
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


def main():
    torch.manual_seed(0)
    tensors = {"conv.weight": torch.randn(4, 2, 3, 3), "conv.bias": torch.zeros(4),
               "norm": torch.ones(3, dtype=torch.float16)}
    put("safetensors", "valid", save(tensors))
    put("safetensors", "bf16", save({"w": torch.randn(2, 3).to(torch.bfloat16)}))
    put("safetensors", "huge-tensor", raw_safetensors(
        {"w": {"dtype": "F32", "shape": [1048576, 1048576], "data_offsets": [0, 4398046511104]}}))
    put("safetensors", "overlap", raw_safetensors(
        {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
         "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, bytes(24)))
    put("safetensors", "metadata", raw_safetensors(
        {"__metadata__": {"format": "pt"}, "x": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}}, b"ab"))

    buf = io.BytesIO()
    torch.save({"conv.weight": torch.randn(2, 2), "conv.bias": torch.zeros(2)}, buf)
    put("pickle", "valid", buf.getvalue())
    buf = io.BytesIO()
    torch.save({"nested": {"w": torch.arange(6, dtype=torch.int64).reshape(2, 3)}}, buf)
    put("pickle", "nested", buf.getvalue())
    buf = io.BytesIO()
    torch.save({"h": torch.randn(3).half()}, buf)
    put("pickle", "half", buf.getvalue())

    for path in sorted(glob.glob(os.path.join(ROOT, "crates", "kandinsky", "real_configs", "**", "config.json"),
                                 recursive=True)):
        name = os.path.relpath(path, os.path.join(ROOT, "crates", "kandinsky", "real_configs"))
        put("configs", name.replace("/", "_"), open(path, "rb").read())
    for path in sorted(glob.glob(os.path.join(ROOT, "fixtures", "schedulers", "*", "scheduler_config.json"))):
        put("configs", "scheduler_" + os.path.basename(os.path.dirname(path)), open(path, "rb").read())
    for part in ["prior", "decoder"]:
        put("configs", f"model_index_{part}",
            open(os.path.join(ROOT, "models", "small", part, "model_index.json"), "rb").read())
        put("configs", f"small_{part}_unet_or_prior",
            open(os.path.join(ROOT, "models", "small", part, "unet" if part == "decoder" else "prior",
                              "config.json"), "rb").read())

    img = Image.new("RGB", (24, 16), (200, 30, 30))
    for x in range(8, 16):
        for y in range(4, 12):
            img.putpixel((x, y), (240, 240, 40))
    for fmt, mode in [("PNG", "RGB"), ("PNG", "RGBA"), ("PNG", "L"), ("JPEG", "RGB")]:
        b = io.BytesIO()
        img.convert(mode).save(b, format=fmt)
        put("images", f"{fmt.lower()}-{mode.lower()}", b.getvalue())
    shutil.copy(os.path.join(ROOT, "fixtures", "images", "mask_64x64.png"), os.path.join(OUT, "images", "mask"))

    for i, p in enumerate(["a large red circle in the centre on a blue background",
                           "большой красный круг в центре на синем фоне", "", "🎨" * 40,
                           "a " * 500, "<|startoftext|><|endoftext|></s><pad>\x00\t\n"]):
        put("prompts", f"p{i}", p)

    put("tokenizer_files", "small-mclip",
        open(os.path.join(ROOT, "models", "small", "decoder", "tokenizer", "tokenizer.json"), "rb").read())
    put("tokenizer_files", "tiny-2-1",
        open(os.path.join(ROOT, "fixtures", "pipelines", "tiny-2-1", "tokenizer", "tokenizer.json"), "rb").read())

    b = io.BytesIO()
    img.save(b, format="PNG")
    b64 = base64.b64encode(b.getvalue()).decode()
    for i, body in enumerate([
        {"prompt": "a red circle", "steps": 8, "seed": 3, "num_images": 2},
        {"mode": "image_to_image", "prompt": "x", "image": "data:image/png;base64," + b64, "strength": 0.5},
        {"mode": "inpainting", "prompt": "x", "image": b64, "mask": b64, "mask_blur": 2},
        {"mode": "mixing", "inputs": [{"text": "a", "weight": 0.5}, {"image": b64, "weight": 0.5}]},
        {"mode": "outpainting", "image": b64, "margins": {"left": 16, "top": 8}},
        {"prompt": "a", "init_images": [b64], "mask": b64, "denoising_strength": "0.5", "seed": -1},
        {"prompt": "a", "width": 1e300, "steps": "7", "sampler_name": "Euler a"},
    ]):
        put("requests", f"r{i}", json.dumps(body))

    put("latents", "valid", save({"latents": torch.randn(1, 4, 8, 8)}))
    put("latents", "two", save({"latents": torch.randn(1, 4, 2, 2), "other": torch.zeros(1)}))


if __name__ == "__main__":
    main()
