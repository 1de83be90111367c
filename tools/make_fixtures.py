#!/usr/bin/env python3
"""Builds the reference fixtures the Rust tests compare against.

Randomly initialised diffusers models (diffusers' own test dummies and small-width models with the
real Kandinsky topology) are saved with `save_pretrained`, together with inputs and reference
outputs (safetensors). Also dumps the state-dict names and shapes of the real-size models built
from the real configs on the meta device (no weights allocated).

Pinned reference environment (see ../shared/docs/assets.md):
    python3 -m venv VENV && VENV/bin/pip install torch==2.15.0 diffusers==0.42.1 \
        transformers==5.24.0 safetensors accelerate numpy pillow
    VENV/bin/python tools/make_fixtures.py            # rewrites fixtures/
Everything is seeded, so a rerun reproduces the same files (same library versions, CPU).
"""
import json
import os
import shutil
import sys

import torch
from safetensors.torch import save_file

import diffusers
from diffusers import UNet2DConditionModel, VQModel

assert torch.__version__.startswith("2.15.0"), torch.__version__
assert diffusers.__version__ == "0.42.1", diffusers.__version__

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures")
torch.set_num_threads(2)
torch.use_deterministic_algorithms(True)


def perturb_vectors(model, seed):
    """Default init leaves norm scales at 1 and shifts at 0; perturb every 1-D parameter so the
    parity tests see scale and shift applied the right way round."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.ndim == 1:
                p.add_(0.2 * torch.randn(p.shape, generator=g))


def save_io(path, tensors):
    save_file({k: v.contiguous().float() for k, v in tensors.items()}, path)


# ---------------------------------------------------------------------------------------------
# UNet variants: diffusers' test dummies and real-topology small-width configs.
DUMMY_UNET = dict(
    in_channels=4, out_channels=8, addition_embed_type="text_image",
    down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
    up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
    mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=(32, 64), layers_per_block=1,
    encoder_hid_dim=32, encoder_hid_dim_type="text_image_proj", cross_attention_dim=32,
    attention_head_dim=4, resnet_time_scale_shift="scale_shift", class_embed_type=None,
)
REAL_TOPOLOGY_UNET = dict(
    DUMMY_UNET,
    down_block_types=("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * 3,
    up_block_types=("SimpleCrossAttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",),
    block_out_channels=(8, 16, 24, 32), layers_per_block=3, norm_num_groups=8,
    attention_head_dim=8, cross_attention_dim=12, encoder_hid_dim=20,
)


def variants(base):
    return {
        "2_1": dict(base),
        "2_1_inpaint": dict(base, in_channels=9),
        "2_2": dict(base, addition_embed_type="image", encoder_hid_dim_type="image_proj"),
        "2_2_inpaint": dict(base, addition_embed_type="image", encoder_hid_dim_type="image_proj", in_channels=9),
        "2_2_controlnet": dict(base, addition_embed_type="image_hint", encoder_hid_dim_type="image_proj",
                               in_channels=8, cross_attention_dim=base["cross_attention_dim"] + 4),
    }


def unet_inputs(cfg, h, w, seed, latent_channels):
    g = torch.Generator().manual_seed(seed)
    b = 2
    cross = cfg["cross_attention_dim"]
    hid = cfg["encoder_hid_dim"]
    x = {"sample": torch.randn(b, latent_channels, h, w, generator=g)}
    if cfg["addition_embed_type"] == "text_image":
        x["image_embeds"] = torch.randn(b, cross, generator=g)
        x["text_embeds"] = torch.randn(b, cross, generator=g)
        x["encoder_hidden_states"] = torch.randn(b, 13, hid, generator=g)
    else:
        x["image_embeds"] = torch.randn(b, hid, generator=g)
    if cfg["addition_embed_type"] == "image_hint":
        x["hint"] = torch.rand(b, 3, 8 * h, 8 * w, generator=g)
    return x


def run_unet(model, x, t):
    added = {k: x[k] for k in ("image_embeds", "text_embeds", "hint") if k in x}
    with torch.no_grad():
        return model(x["sample"], t, encoder_hidden_states=x.get("encoder_hidden_states"),
                     added_cond_kwargs=added).sample


def make_unets():
    for family, base, sizes in [
        ("dummy", DUMMY_UNET, [(8, 8), (8, 12)]),
        ("topo", REAL_TOPOLOGY_UNET, [(16, 16), (16, 24)]),
    ]:
        for i, (name, cfg) in enumerate(sorted(variants(base).items())):
            out_dir = os.path.join(ROOT, "unet", f"{family}_{name}")
            torch.manual_seed(100 + i)
            model = UNet2DConditionModel(**cfg).eval()
            perturb_vectors(model, 200 + i)
            model.save_pretrained(out_dir)
            latent_ch = 4 if cfg["addition_embed_type"] == "image_hint" else cfg["in_channels"]
            io = {}
            for j, (h, w) in enumerate(sizes):
                t = [999, 487][j]
                x = unet_inputs(cfg, h, w, 300 + 10 * i + j, latent_ch)
                y = run_unet(model, x, t)
                for k, v in x.items():
                    io[f"{k}_{j}"] = v
                io[f"timestep_{j}"] = torch.tensor([float(t)])
                io[f"out_{j}"] = y
            save_io(os.path.join(out_dir, "io.safetensors"), io)
            print("unet", family, name, sum(p.numel() for p in model.parameters()), "params")


# ---------------------------------------------------------------------------------------------
# MoVQ: diffusers' dummy and a real-topology small-width config.
DUMMY_MOVQ = dict(
    block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
    in_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8, norm_type="spatial",
    num_vq_embeddings=12, out_channels=3, up_block_types=["AttnUpDecoderBlock2D", "UpDecoderBlock2D"],
    vq_embed_dim=4,
)
REAL_TOPOLOGY_MOVQ = dict(
    DUMMY_MOVQ, block_out_channels=[32, 32, 32, 32], layers_per_block=2, norm_num_groups=32,
    down_block_types=["DownEncoderBlock2D"] * 3 + ["AttnDownEncoderBlock2D"],
    up_block_types=["AttnUpDecoderBlock2D"] + ["UpDecoderBlock2D"] * 3, num_vq_embeddings=64,
)


def make_movqs():
    for i, (name, cfg, sizes) in enumerate([
        ("dummy", DUMMY_MOVQ, [(32, 32), (32, 48)]),
        ("topo", REAL_TOPOLOGY_MOVQ, [(64, 64), (48, 80)]),
    ]):
        out_dir = os.path.join(ROOT, "movq", name)
        torch.manual_seed(400 + i)
        model = VQModel(**cfg).eval()
        perturb_vectors(model, 500 + i)
        # The default codebook init is uniform(±1/n): entries far smaller than real latents, so
        # quantised decodes would be nearly constant. Use unit-scale entries like a trained one.
        with torch.no_grad():
            emb = model.quantize.embedding.weight
            emb.copy_(torch.randn(emb.shape, generator=torch.Generator().manual_seed(550 + i)))
        model.save_pretrained(out_dir)
        g = torch.Generator().manual_seed(600 + i)
        io = {}
        down = 2 ** (len(cfg["block_out_channels"]) - 1)
        for j, (h, w) in enumerate(sizes):
            img = torch.rand(1, 3, h, w, generator=g) * 2 - 1
            z = torch.randn(2, 4, h // down, w // down, generator=g)
            with torch.no_grad():
                io[f"image_{j}"] = img
                io[f"encoded_{j}"] = model.encode(img).latents
                io[f"latent_{j}"] = z
                io[f"decoded_{j}"] = model.decode(z, force_not_quantize=True).sample
                quant, _, (_, _, idx) = model.quantize(z)
                io[f"quantized_{j}"] = quant
                io[f"indices_{j}"] = idx.float()
                io[f"decoded_quantized_{j}"] = model.decode(z, force_not_quantize=False).sample
        save_io(os.path.join(out_dir, "io.safetensors"), io)
        print("movq", name, sum(p.numel() for p in model.parameters()), "params")


# ---------------------------------------------------------------------------------------------
# Weight formats: one tiny 2.2 UNet as safetensors, PyTorch pickle, sharded safetensors, fp16 and
# bf16 variants.
TINY_UNET = dict(variants(DUMMY_UNET)["2_2"], block_out_channels=(8, 16), norm_num_groups=8,
                 cross_attention_dim=8, encoder_hid_dim=8)


def make_formats():
    base = os.path.join(ROOT, "formats")
    src = os.path.join(base, "safetensors")
    torch.manual_seed(700)
    model = UNet2DConditionModel(**TINY_UNET).eval()
    perturb_vectors(model, 701)
    model.save_pretrained(src)
    x = unet_inputs(TINY_UNET, 8, 8, 702, 4)
    t = 999
    io_x = {}
    model.save_pretrained(os.path.join(base, "bin"), safe_serialization=False)
    model.save_pretrained(os.path.join(base, "sharded"), max_shard_size="20KB")
    for dtype, variant in [(torch.float16, "fp16"), (torch.bfloat16, "bf16")]:
        m = UNet2DConditionModel.from_pretrained(src).eval().to(dtype)
        m.save_pretrained(os.path.join(base, variant), variant=variant)
        # Reference: the rounded weights upcast to f32, run in f32 (what our loader does).
        m32 = m.float()
        io_x[f"out_{variant}"] = run_unet(m32, x, t)
    for k, v in x.items():
        io_x[k] = v
    io_x["timestep"] = torch.tensor([float(t)])
    io_x["out"] = run_unet(model, x, t)
    save_io(os.path.join(base, "io.safetensors"), io_x)


# ---------------------------------------------------------------------------------------------
# Real configs: names and shapes of the real-size state dicts, built on the meta device.
def make_real_shapes():
    real = os.path.join(ROOT, "real_configs")
    out = {}
    for repo in sorted(os.listdir(real)):
        for comp, cls in [("unet", UNet2DConditionModel), ("movq", VQModel)]:
            cfg_path = os.path.join(real, repo, comp, "config.json") if repo != "movq" else None
            if repo == "movq" and comp == "movq":
                cfg_path = os.path.join(real, "movq", "config.json")
            if not cfg_path or not os.path.exists(cfg_path):
                continue
            cfg = json.load(open(cfg_path))
            with torch.device("meta"):
                model = cls.from_config(cfg)
            sd = model.state_dict()
            key = repo if repo == "movq" else f"{repo}/{comp}"
            out[key] = {
                "params": sum(p.numel() for p in model.parameters()),
                "tensors": [[k, list(v.shape)] for k, v in sd.items()],
            }
            print(key, out[key]["params"], "params", len(sd), "tensors")
    with open(os.path.join(ROOT, "real_shapes.json"), "w") as f:
        json.dump(out, f, indent=0)
        f.write("\n")


if __name__ == "__main__":
    for d in ["unet", "movq", "formats"]:
        shutil.rmtree(os.path.join(ROOT, d), ignore_errors=True)
    make_unets()
    make_movqs()
    make_formats()
    make_real_shapes()
    os.system(f"du -sh {ROOT}")
