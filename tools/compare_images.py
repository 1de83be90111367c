#!/usr/bin/env python3
"""Mean absolute difference (in 1/255 units) between same-named PNGs of two directories, per image
and overall: how far `--dtype bf16` images are from the f32 ones.

    kandinsky eval shapes --n 50 --save A
    kandinsky --dtype bf16 eval shapes --n 50 --save B
    python3 tools/compare_images.py A B      # needs Pillow (any VENV of tools/make_fixtures.py)
"""
import os
import sys

from PIL import Image


def main():
    a, b = sys.argv[1], sys.argv[2]
    names = sorted(n for n in os.listdir(a) if n.endswith(".png") and os.path.exists(os.path.join(b, n)))
    if not names:
        raise SystemExit("no PNG names in common")
    diffs = []
    for n in names:
        x = Image.open(os.path.join(a, n)).convert("RGB").tobytes()
        y = Image.open(os.path.join(b, n)).convert("RGB").tobytes()
        if len(x) != len(y):
            raise SystemExit(f"{n}: sizes differ")
        diffs.append(sum(abs(p - q) for p, q in zip(x, y)) / len(x))
    diffs.sort()
    print(f"{len(names)} images: mean |Δ| {sum(diffs) / len(diffs):.3f}/255, median {diffs[len(diffs) // 2]:.3f}, "
          f"max {diffs[-1]:.3f}")


if __name__ == "__main__":
    main()
