"""An unmodified AUTOMATIC1111 client (PyPI `webuiapi` 0.9.17) against `kandinsky serve`, with
the client's own defaults (sampler "Euler a", 20 steps, 512x512, cfg 7, seed -1).

Not part of CI (it needs Python). Run, with a server started by `kandinsky serve` (port 7860):
    pip install webuiapi==0.9.17 && python tools/a1111_client_check.py [--port 7860]
Prints what it checked; exits non-zero on the first failure.
"""
import argparse
import json
import threading
import time

import webuiapi
from PIL import Image, ImageDraw


def check_default(r, t0):
    info = r.info if isinstance(r.info, dict) else json.loads(r.info)
    assert r.image.size == (512, 512), r.image.size
    assert info["sampler_name"] == "Euler a" and info["steps"] == 20, info
    assert info["seed"] >= 0 and info["all_seeds"] == [info["seed"]], info
    print(f"txt2img with the client's defaults: {r.image.size}, seed {info['seed']}, {time.time() - t0:.1f} s")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--skip-512", action="store_true", help="skip the 512x512 default run (slow with the small model)")
    a = ap.parse_args()
    api = webuiapi.WebUIApi(host=a.host, port=a.port)  # calls GET /sdapi/v1/scripts

    print("models:", api.util_get_model_names())
    print("samplers:", api.util_get_sampler_names())
    print("current model:", api.util_get_current_model())
    api.util_set_model(api.util_get_model_names()[0])
    api.util_wait_for_ready()

    t0 = time.time()
    if a.skip_512:
        r = None
    else:
        r = api.txt2img(prompt="a large blue square in the centre on a yellow background")
    if r is not None:
        check_default(r, t0)

    r = api.txt2img(prompt="a red circle", width=64, height=64, seed=7, batch_size=2)
    info = r.info if isinstance(r.info, dict) else json.loads(r.info)
    assert len(r.images) == 2 and info["all_seeds"] == [7, 8], info
    print("txt2img batch of 2: seeds", info["all_seeds"])

    img = Image.new("RGB", (64, 64), (240, 240, 40))
    ImageDraw.Draw(img).rectangle([16, 16, 47, 47], fill=(30, 60, 200))
    r = api.img2img(images=[img], prompt="a red circle", width=64, height=64, denoising_strength=0.6, seed=3)
    assert r.image.size == (64, 64)
    print("img2img:", r.image.size)

    mask = Image.new("RGB", (64, 64), (0, 0, 0))
    ImageDraw.Draw(mask).rectangle([32, 0, 63, 63], fill=(255, 255, 255))
    r = api.img2img(images=[img], mask_image=mask, prompt="a red circle", width=64, height=64, seed=3)
    out = r.image.convert("RGB")
    kept = sum(out.getpixel((x, y)) == img.getpixel((x, y)) for x in range(0, 20) for y in range(64))
    # mask_blur 4 (the client default) feathers 10 px around the mask edge at x = 32.
    assert kept == 20 * 64, f"{kept} of {20 * 64} unmasked pixels kept"
    print("inpainting (img2img with mask): unmasked part kept exactly")

    # Progress while a job runs, then interrupt.
    seen = []

    def watch():
        for _ in range(200):
            p = api.get_progress()
            seen.append(p)
            if p["state"]["sampling_step"] > 5:
                api.interrupt()
                return
            time.sleep(0.05)

    w = threading.Thread(target=watch)
    w.start()
    r = api.txt2img(prompt="a green triangle", width=64, height=64, steps=400)
    w.join()
    assert any(p["progress"] > 0 for p in seen), seen[-1]
    assert len(r.images) == 1 and r.image.size == (64, 64), "an interrupt answers 200 with the unfinished image"
    print("progress seen, interrupt answered 200 with the unfinished image")
    api.util_wait_for_ready()
    print("OK: webuiapi", webuiapi.__version__ if hasattr(webuiapi, "__version__") else "0.9.17", "works unchanged")


if __name__ == "__main__":
    main()
