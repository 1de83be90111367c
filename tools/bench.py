#!/usr/bin/env python3
"""Every stage of a real Kandinsky 2.1 / 2.2 generation, timed in our Rust implementation and in
PyTorch + diffusers/transformers in the same invocation, with random weights of the real configs
(crates/kandinsky/real_configs/). Each stage runs in its own process per implementation (so each peak RSS
is that stage's own), best of --runs after one warm-up, with the same thread count on both sides.

    cargo build --release -p kandinsky-cli
    python3 -m venv VENV && VENV/bin/pip install torch==2.15.0 diffusers==0.42.1 transformers==5.24.0
    VENV/bin/python tools/bench.py [--dtypes f32,bf16] [--stages unet-2.2-64,...] [--runs 2]
        [--threads 2] [--model-dir DIR] [--json-out FILE]

PyTorch bf16 runs the model in torch.bfloat16 (oneDNN's AVX-512 BF16 kernels on this CPU); ours
is `--dtype bf16` (bf16 GEMM/convolution weights, f32 activations, norms and softmax). The table
gives ours / PyTorch in the same precision and, for bf16, ours / PyTorch f32. The script refuses
to report when another process uses the CPU (override with --force, and say so).
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
REAL = os.path.join(ROOT, "crates", "kandinsky", "real_configs")
STAGES = ["unet-2.2-32", "unet-2.2-64", "unet-2.1-32", "unet-2.1-64", "prior-2.2", "prior-2.1",
          "movq-decode-256", "movq-decode-512", "movq-encode-512", "text-clip-l", "text-clip-bigg",
          "text-mclip", "vision-bigg", "load-unet-2.2"]
# Multiply-accumulates ×2 per run of the stage (performance.md), for the fraction of peak.
FLOPS = {"unet-2.2-64": 1.71e12, "unet-2.2-32": 0.42e12, "prior-2.2": 8.3e12}
PEAK = {"f32": 231e9, "bf16": 442e9}


def cfg(path):
    with open(os.path.join(REAL, path, "config.json")) as f:
        return json.load(f)


def token_ids(torch, vocab, bos, eos, pad, n):
    rows = []
    for b in range(2):
        r = [pad] * 77
        r[0] = bos
        for i in range(1, n + 1):
            r[i] = (i * 7919 + b * 104729) % (vocab - 3) + 3
        r[n + 1] = eos
        rows.append(r)
    return torch.tensor(rows, dtype=torch.long)


def torch_stage(stage, dtype, runs, threads, model_dir, prior_steps):
    import resource

    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32

    def r(*shape):
        return torch.randn(*shape).to(dt)

    if stage.startswith("unet-"):
        from diffusers import UNet2DConditionModel

        v21 = stage.startswith("unet-2.1")
        c = cfg("kandinsky-2-1/unet" if v21 else "kandinsky-2-2-decoder/unet")
        m = UNet2DConditionModel.from_config(c).eval().to(dt)
        side = int(stage.split("-")[-1])
        sample = r(2, c["in_channels"], side, side)
        if v21:
            kw = {"encoder_hidden_states": r(2, 77, c["encoder_hid_dim"]),
                  "added_cond_kwargs": {"text_embeds": r(2, 768), "image_embeds": r(2, 768)}}
        else:
            kw = {"encoder_hidden_states": None, "added_cond_kwargs": {"image_embeds": r(2, c["encoder_hid_dim"])}}
        fn = lambda: m(sample, 500, **kw)
    elif stage.startswith("prior-"):
        from diffusers import PriorTransformer

        c = cfg("kandinsky-2-2-prior/prior" if stage == "prior-2.2" else "kandinsky-2-1-prior/prior")
        m = PriorTransformer.from_config(c).eval().to(dt)
        e = c["embedding_dim"]
        lat, te, states = r(2, e), r(2, e), r(2, 77, e)
        mask = (torch.arange(77)[None, :].expand(2, 77) < 12)

        def fn():
            for step in range(prior_steps):
                m(lat, 999 - step * 40, proj_embedding=te, encoder_hidden_states=states, attention_mask=mask)
    elif stage.startswith("movq-"):
        from diffusers import VQModel

        c = cfg("movq")
        m = VQModel.from_config(c).eval().to(dt)
        px = int(stage[-3:])
        if "decode" in stage:
            z = r(1, c["latent_channels"], px // 8, px // 8)
            fn = lambda: m.decode(z, force_not_quantize=True)
        else:
            x = r(1, 3, px, px)
            fn = lambda: m.encode(x)
    elif stage in ("text-clip-l", "text-clip-bigg"):
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection

        c = cfg("kandinsky-2-1-prior/text_encoder" if stage == "text-clip-l" else "kandinsky-2-2-prior/text_encoder")
        m = CLIPTextModelWithProjection(CLIPTextConfig(**{k: v for k, v in c.items() if k != "model_type"}))
        m = m.eval().to(dt)
        ids = token_ids(torch, c["vocab_size"], 49406, 49407, 49407, 12)
        fn = lambda: m(input_ids=ids)
    elif stage == "text-mclip":
        from diffusers.pipelines.kandinsky.text_encoder import MCLIPConfig, MultilingualCLIP

        c = cfg("kandinsky-2-1/text_encoder")
        rest = {k: v for k, v in c.items() if k not in ("numDims", "transformerDimensions", "model_type")}
        m = MultilingualCLIP(MCLIPConfig(transformerDimSize=c["transformerDimensions"], imageDimSize=c["numDims"],
                                         **rest)).eval().to(dt)
        ids = token_ids(torch, c["vocab_size"], 0, 2, 1, 12)
        mask = (torch.arange(77)[None, :].expand(2, 77) < 14).long()
        fn = lambda: m(ids, mask)
    elif stage == "vision-bigg":
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        c = cfg("kandinsky-2-2-prior/image_encoder")
        m = CLIPVisionModelWithProjection(CLIPVisionConfig(**{k: v for k, v in c.items() if k != "model_type"}))
        m = m.eval().to(dt)
        x = r(1, 3, c["image_size"], c["image_size"])
        fn = lambda: m(pixel_values=x)
    elif stage == "load-unet-2.2":
        from diffusers import UNet2DConditionModel

        fn = lambda: UNet2DConditionModel.from_pretrained(model_dir, torch_dtype=dt)
    else:
        raise SystemExit(f"unknown stage {stage}")
    times = []
    with torch.inference_mode():
        for i in range(runs + 1):
            t = time.perf_counter()
            fn()
            if i > 0:
                times.append(time.perf_counter() - t)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"impl": "pytorch", "dtype": dtype, "stage": stage, "threads": threads,
                      "best_s": min(times), "runs_s": times, "peak_rss_bytes": rss}), flush=True)


def torch_whole(pipe_dir, dtype, threads):
    """diffusers' 2.2 prior + decoder pipelines on the real-size random models of
    `kandinsky bench --prepare-pipeline`: 512 px, 2 prior and 2 decoder steps."""
    import resource

    import torch
    from diffusers import KandinskyV22Pipeline, KandinskyV22PriorPipeline

    torch.set_num_threads(threads)
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    t = time.perf_counter()
    prior = KandinskyV22PriorPipeline.from_pretrained(os.path.join(pipe_dir, "prior"), torch_dtype=dt)
    decoder = KandinskyV22Pipeline.from_pretrained(os.path.join(pipe_dir, "decoder"), torch_dtype=dt)
    g = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        emb, neg = prior("a red cat", num_inference_steps=2, generator=g, return_dict=False)
        decoder(image_embeds=emb, negative_image_embeds=neg, height=512, width=512, num_inference_steps=2,
                generator=g)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"impl": "pytorch", "dtype": dtype, "stage": "whole-2.2-512", "threads": threads,
                      "best_s": time.perf_counter() - t, "runs_s": [], "peak_rss_bytes": rss}), flush=True)


def rust_whole(binary, pipe_dir, dtype, threads):
    """Our CLI on the same models, run twice (the first fills the zero-image embedding cache);
    reports the second run, as a returning user sees it, and the first's peak RSS."""
    out = []
    for _ in range(2):
        t = time.perf_counter()
        p = subprocess.run(["/usr/bin/time", "-f", "%M", binary, "--threads", str(threads), "--dtype", dtype,
                            "generate", "--model", os.path.join(pipe_dir, "decoder"), "--prior",
                            os.path.join(pipe_dir, "prior"), "--prompt", "a red cat", "--width", "512", "--height",
                            "512", "--steps", "2", "--prior-steps", "2", "--seed", "1", "--output",
                            os.path.join(pipe_dir, f"out-{dtype}.png")], capture_output=True, text=True)
        if p.returncode != 0:
            sys.stderr.write(p.stderr[-3000:])
            raise SystemExit("kandinsky generate failed")
        out.append((time.perf_counter() - t, int(p.stderr.strip().splitlines()[-1]) * 1024))
    return [{"impl": "rust", "dtype": dtype, "stage": "whole-2.2-512", "threads": threads, "best_s": out[1][0],
             "runs_s": [o[0] for o in out], "peak_rss_bytes": out[1][1], "first_run_peak_rss_bytes": out[0][1]}]


def cpu_busy_elsewhere(seconds=2.0):
    """Fraction of one core used by all processes during `seconds` (we are idle meanwhile)."""
    def snap():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + v[4]
        return sum(v) - idle, sum(v)
    b0, t0 = snap()
    time.sleep(seconds)
    b1, t1 = snap()
    ncpu = os.cpu_count() or 1
    return (b1 - b0) / max(t1 - t0, 1) * ncpu


def run_json(cmd, env=None):
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        sys.stderr.write(p.stderr[-3000:])
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--stages", default=",".join(s for s in STAGES if s != "load-unet-2.2"))
    ap.add_argument("--dtypes", default="f32,bf16")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prior-steps", type=int, default=25)
    ap.add_argument("--model-dir", help="a saved real-size 2.2 UNet for load-unet-2.2 (written if absent)")
    ap.add_argument("--json-out", help="also write every result to this file")
    ap.add_argument("--skip-torch", action="store_true", help="time ours only")
    ap.add_argument("--force", action="store_true", help="report even when the CPU is not quiet")
    ap.add_argument("--whole", metavar="DIR", help="also run a whole 2.2 text-to-image at 512 px on the models "
                    "`kandinsky bench --prepare-pipeline DIR` wrote (ours and diffusers' pipelines)")
    ap.add_argument("--table", metavar="JSON", help="print the table of a saved --json-out file and exit")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child == "whole":
        torch_whole(a.whole, a.dtype, a.threads)
        return
    if a.child:
        torch_stage(a.child, a.dtype, a.runs, a.threads, a.model_dir, a.prior_steps)
        return
    stages = [s for s in a.stages.split(",") if s]
    dtypes = [d for d in a.dtypes.split(",") if d]
    if a.table:
        with open(a.table) as f:
            saved = json.load(f)
        order = list(dict.fromkeys(r["stage"] for r in saved))
        table(saved, order, list(dict.fromkeys(r["dtype"] for r in saved)))
        return
    binary = os.path.join(ROOT, "target", "release", "kandinsky")
    if "load-unet-2.2" in stages:
        if not a.model_dir:
            raise SystemExit("load-unet-2.2 needs --model-dir")
        if not os.path.exists(os.path.join(a.model_dir, "diffusion_pytorch_model.safetensors")):
            subprocess.run([binary, "bench", "--prepare", "--model-dir", a.model_dir], check=True)
    results = []

    def save():
        if a.json_out:
            with open(a.json_out, "w") as f:
                json.dump(results, f, indent=1)

    def quiet():
        busy = cpu_busy_elsewhere()
        if busy > 0.15 and not a.force:
            raise SystemExit(f"the CPU is busy ({busy:.2f} cores used by other processes): not reporting")

    # Stage by stage, both precisions together, results saved as they come (a long run that is
    # stopped keeps what it measured).
    for stage in stages:
        for dtype in dtypes:
            quiet()
            cmd = [binary, "--threads", str(a.threads), "--dtype", dtype, "bench", "--json", "--stages", stage,
                   "--runs", str(a.runs), "--prior-steps", str(a.prior_steps)]
            if a.model_dir:
                cmd += ["--model-dir", a.model_dir]
            results += run_json(cmd)
            if not a.skip_torch:
                results += run_json([sys.executable, __file__, "--child", stage, "--dtype", dtype, "--runs",
                                     str(a.runs), "--threads", str(a.threads), "--prior-steps", str(a.prior_steps)]
                                    + (["--model-dir", a.model_dir] if a.model_dir else []))
            save()
            print(f"  {dtype} {stage}: done", file=sys.stderr, flush=True)
    if a.whole:
        for dtype in dtypes:
            quiet()
            results += rust_whole(binary, a.whole, dtype, a.threads)
            if not a.skip_torch:
                results += run_json([sys.executable, __file__, "--child", "whole", "--whole", a.whole, "--dtype", dtype,
                                     "--threads", str(a.threads)])
            save()
            print(f"  {dtype} whole: done", file=sys.stderr, flush=True)
        stages.append("whole-2.2-512")
    table(results, stages, dtypes)


def table(results, stages, dtypes):
    res = {(r["impl"], r["dtype"], r["stage"]): r for r in results}
    gib = float(1 << 30)
    print(f"| stage | dtype | ours s | PyTorch s | ours/PyTorch | ours/PyTorch f32 | ours RSS GiB | PyTorch RSS GiB |"
          f" ours % of peak |")
    print("|---|---|---|---|---|---|---|---|---|")
    for dtype in dtypes:
        for stage in stages:
            o = res.get(("rust", dtype, stage))
            p = res.get(("pytorch", dtype, stage))
            p32 = res.get(("pytorch", "f32", stage))
            if o is None:
                continue
            cells = [stage, dtype, f"{o['best_s']:.2f}"]
            cells.append(f"{p['best_s']:.2f}" if p else "–")
            cells.append(f"{o['best_s'] / p['best_s']:.2f}×" if p else "–")
            cells.append(f"{o['best_s'] / p32['best_s']:.2f}×" if p32 and dtype != "f32" else "–")
            cells.append(f"{o['peak_rss_bytes'] / gib:.2f}")
            cells.append(f"{p['peak_rss_bytes'] / gib:.2f}" if p else "–")
            fl = FLOPS.get(stage)
            cells.append(f"{100 * fl / o['best_s'] / PEAK[dtype]:.0f} %" if fl else "–")
            print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
