"""Bar chart of images/s per stage, fast vs naive, from bench/results/train-<device>.json, as a PNG.

    python bench/plot.py bench/results/train-cpu.json [--out bench/results/train-cpu.png]

matplotlib is not a dependency: the chart is drawn with PIL.ImageDraw.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {"fast": (46, 125, 50), "naive": (158, 158, 158)}


def draw(data: dict, path: Path) -> None:
    rows = data["results"]
    modes = [m for m in ("fast", "naive") if any(m in r["modes"] for r in rows)]
    W, H, left, bottom, top = max(420, 160 + 140 * len(rows)), 360, 70, 50, 60
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    vmax = max(r["modes"][m]["images_per_s"] for r in rows for m in modes if m in r["modes"]) * 1.15
    d.text((10, 8), f"training step, images/s on {data['device']} (width {data['args']['width']:g}, "
                    f"batch {data['args']['batch']})", fill="black")
    d.line((left, top, left, H - bottom), fill="black")
    d.line((left, H - bottom, W - 10, H - bottom), fill="black")
    for i in range(5):  # y ticks
        v = vmax * i / 4
        y = H - bottom - (H - bottom - top) * i / 4
        d.line((left - 4, y, left, y), fill="black")
        d.text((5, y - 6), f"{v:.3g}", fill="black")
    bw = 40
    for j, r in enumerate(rows):
        x0 = left + 30 + j * 140
        for k, m in enumerate(modes):
            if m not in r["modes"]:
                continue
            v = r["modes"][m]["images_per_s"]
            y = H - bottom - (H - bottom - top) * v / vmax
            d.rectangle((x0 + k * bw, y, x0 + (k + 1) * bw - 4, H - bottom), fill=COLORS[m])
            d.text((x0 + k * bw, y - 14), f"{v:.3g}", fill="black")
        label = f"{r['resolution']} px" + (f" ({r['speedup']:.2f}x)" if "speedup" in r else "")
        d.text((x0, H - bottom + 8), label, fill="black")
    for k, m in enumerate(modes):  # legend
        d.rectangle((W - 90, 30 + 16 * k, W - 80, 40 + 16 * k), fill=COLORS[m])
        d.text((W - 74, 28 + 16 * k), m, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    img.save(tmp)
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("json", type=Path)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    data = json.loads(args.json.read_text())
    out = args.out or args.json.with_suffix(".png")
    draw(data, out)
    print(f"plot: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
