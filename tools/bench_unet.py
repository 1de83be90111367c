#!/usr/bin/env python3
"""Times one UNet forward (real Kandinsky 2.2 config, random weights, CFG batch 2) in our Rust
implementation and in PyTorch + diffusers, in the same invocation, and prints both, their ratio
and the peak RSS of each (each runs in its own process).

    cargo build --release -p kandinsky-cli
    VENV/bin/python tools/bench_unet.py [--sizes 32,64] [--runs 2] [--threads 2]

VENV as in tools/make_fixtures.py. The machine is shared and noisy: compare the ratio, not the
absolute numbers, and check `ps` for co-runners.
"""
import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
CONFIG = os.path.join(ROOT, "fixtures/real_configs/kandinsky-2-2-decoder/unet/config.json")


def torch_child(sizes, runs, threads):
    import resource
    import time

    import torch
    from diffusers import UNet2DConditionModel

    torch.set_num_threads(threads)
    cfg = json.load(open(CONFIG))
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(cfg).eval()
    for side in sizes:
        sample = torch.randn(2, 4, side, side)
        emb = torch.randn(2, cfg["encoder_hid_dim"])
        times = []
        with torch.no_grad():
            for i in range(runs + 1):
                t = time.perf_counter()
                unet(sample, 500, encoder_hidden_states=None, added_cond_kwargs={"image_embeds": emb})
                if i > 0:
                    times.append(time.perf_counter() - t)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps({"impl": "pytorch", "latent": side, "best_s": min(times), "runs_s": times,
                          "peak_rss_bytes": rss}), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="32,64")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    sizes = [int(s) for s in a.sizes.split(",")]
    if a.child:
        torch_child(sizes, a.runs, a.threads)
        return
    binary = os.path.join(ROOT, "target/release/kandinsky")
    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads))
    rust = subprocess.run([binary, "bench", "--json", "--sizes", a.sizes, "--runs", str(a.runs)],
                          capture_output=True, text=True, env=env, check=True).stdout
    py = subprocess.run([sys.executable, __file__, "--child", "--sizes", a.sizes, "--runs", str(a.runs),
                         "--threads", str(a.threads)], capture_output=True, text=True, check=True).stdout
    res = {}
    for line in (rust + py).splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            res[(r["impl"], r["latent"])] = r
    gib = 1 << 30
    print(f"{'latent':>8} {'rust s':>9} {'torch s':>9} {'rust/torch':>11} {'rust RSS':>10} {'torch RSS':>10}")
    for s in sizes:
        r, p = res[("rust-candle", s)], res[("pytorch", s)]
        print(f"{s:>5}x{s:<2} {r['best_s']:>9.2f} {p['best_s']:>9.2f} {r['best_s'] / p['best_s']:>11.2f} "
              f"{r['peak_rss_bytes'] / gib:>8.2f}Gi {p['peak_rss_bytes'] / gib:>8.2f}Gi")


if __name__ == "__main__":
    main()
