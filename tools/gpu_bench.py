#!/usr/bin/env python3
"""Real-size Kandinsky 2.2 stages on a GPU, ours (`kandinsky --device cuda bench`) against
diffusers in the same invocation, same card, same shapes, random weights of the real configs
(crates/kandinsky/real_configs/): a UNet step with classifier-free guidance (batch 2) at 512 and 1024 px,
25 prior steps, a MoVQ decode at 512 px. Best of --runs after one warm-up; PyTorch is timed with
torch.cuda.synchronize() around each run, ours reads a value back after each run (`bench`).

Runs on the device machine from tools/device_check.sh:
    python3 tools/gpu_bench.py --binary target/cuda-bin/kandinsky --dtypes f16,f32 --json-out OUT.json
Needs torch with CUDA and diffusers (the script installs carried wheels when diffusers is absent).
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
REAL = os.path.join(ROOT, "crates", "kandinsky", "real_configs")
STAGES = ["unet-2.2-64", "unet-2.2-128", "prior-2.2", "movq-decode-512"]


def cfg(path):
    with open(os.path.join(REAL, path, "config.json")) as f:
        return json.load(f)


def torch_stage(stage, dtype, runs, prior_steps, device):
    import torch

    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    dt = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32}[dtype]
    torch.manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, device=dev, dtype=dt)

    if stage.startswith("unet-2.2-"):
        from diffusers import UNet2DConditionModel

        c = cfg("kandinsky-2-2-decoder/unet")
        m = UNet2DConditionModel.from_config(c).eval().to(dev, dt)
        side = int(stage.split("-")[-1])
        sample = r(2, c["in_channels"], side, side)
        kw = {"encoder_hidden_states": None, "added_cond_kwargs": {"image_embeds": r(2, c["encoder_hid_dim"])}}
        fn = lambda: m(sample, 500, **kw)
    elif stage == "prior-2.2":
        from diffusers import PriorTransformer

        c = cfg("kandinsky-2-2-prior/prior")
        m = PriorTransformer.from_config(c).eval().to(dev, dt)
        e = c["embedding_dim"]
        lat, te, states = r(2, e), r(2, e), r(2, 77, e)
        mask = (torch.arange(77, device=dev)[None, :].expand(2, 77) < 12)

        def fn():
            for step in range(prior_steps):
                m(lat, 999 - step * 40, proj_embedding=te, encoder_hidden_states=states, attention_mask=mask)
    elif stage.startswith("movq-decode-"):
        from diffusers import VQModel

        c = cfg("movq")
        m = VQModel.from_config(c).eval().to(dev, dt)
        px = int(stage.split("-")[-1])
        z = r(1, c["latent_channels"], px // 8, px // 8)
        fn = lambda: m.decode(z, force_not_quantize=True)
    else:
        raise SystemExit(f"unknown stage {stage}")
    times = []
    with torch.inference_mode():
        for i in range(runs + 1):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            if i > 0:
                times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else 0
    print(json.dumps({"impl": "pytorch", "dtype": dtype, "device": device, "stage": stage,
                      "best_s": min(times), "runs_s": times, "peak_gpu_bytes": peak}), flush=True)


def run_json(cmd):
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.stderr.write(p.stderr[-3000:])
        return [{"error": f"failed: {' '.join(cmd)}", "stderr": p.stderr[-2000:]}]
    return [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", default=os.path.join(ROOT, "target", "cuda-bin", "kandinsky"))
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--dtypes", default="f16,f32")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--prior-steps", type=int, default=25)
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke test of this script")
    ap.add_argument("--json-out")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        torch_stage(a.child, a.dtype, a.runs, a.prior_steps, a.device)
        return
    results = []
    for stage in [s for s in a.stages.split(",") if s]:
        for dtype in [d for d in a.dtypes.split(",") if d]:
            # Each in its own process, so that one's memory does not weigh on the other.
            ours = run_json([a.binary, "--device", a.device, "--dtype", dtype, "bench", "--stages", stage, "--runs",
                             str(a.runs), "--prior-steps", str(a.prior_steps), "--json"])
            theirs = [] if a.skip_torch else run_json(
                [sys.executable, __file__, "--child", stage, "--device", a.device, "--dtype", dtype, "--runs", str(a.runs),
                 "--prior-steps", str(a.prior_steps)])
            results += ours + theirs
            o = next((r["best_s"] for r in ours if "best_s" in r), None)
            t = next((r["best_s"] for r in theirs if "best_s" in r), None)
            ratio = f"{t / o:.2f}× diffusers' throughput" if o and t else "n/a"
            print(f"{stage:<16} {dtype:<4} ours {o if o is None else round(o, 4)} s, "
                  f"diffusers {t if t is None else round(t, 4)} s: {ratio}", flush=True)
            if a.json_out:
                with open(a.json_out, "w") as f:
                    json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
