"""Make the README's print comparison from a big `style.py` result and a 512-px one of the same pair.

The figure shows the print downscaled whole, the seams of its largest scale's tiles marked at the edges (from the
run's JSON report), then 100 % crops of the print beside the same regions of the 512-px result upscaled with
Lanczos: one crop where four tile cores meet and one away from every seam.

    python style.py -s images/style/strokes.jpg -c images/content/coffee.jpg -l 4096 --scales auto \\
        --max-memory 12 --report print.json -o print.png
    python style.py -s images/style/strokes.jpg -c images/content/coffee.jpg -l 512 -o small.png
    python scripts/make_print_demo.py print.png print.json small.png --name coffee-strokes
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
GALLERY = ROOT / "images" / "gallery"
CROP = 320  # px of the print shown at 100 %
OVERVIEW = 1024  # long side of the downscaled whole


def seams(report: dict) -> tuple[list[int], list[int]]:
    tiling = report.get("tiling") or {}
    found = tiling.get("seams") or {"rows": [], "cols": []}
    return list(found["rows"]), list(found["cols"])


def crop_boxes(width: int, height: int, rows: list[int], cols: list[int]) -> list[tuple[str, tuple[int, int]]]:
    """(label, centre): a corner where tile cores meet nearest the centre, and the point farthest from every seam
    in the middle half of the picture."""
    boxes = []
    if rows and cols:
        r = min(rows, key=lambda y: abs(y - height / 2))
        c = min(cols, key=lambda x: abs(x - width / 2))
        boxes.append(("where four tiles meet", (c, r)))
    lines_x, lines_y = [0, *cols, width], [0, *rows, height]
    best, far = (width // 2, height // 2), -1.0
    for x in range(width // 4, 3 * width // 4, 16):
        for y in range(height // 4, 3 * height // 4, 16):
            distance = min(min(abs(x - c) for c in lines_x), min(abs(y - r) for r in lines_y))
            if distance > far:
                best, far = (x, y), distance
    boxes.append(("away from the seams", best))
    return boxes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("print_image", type=Path)
    ap.add_argument("report", type=Path, help="the print's --report JSON")
    ap.add_argument("small", type=Path, help="the 512-px result of the same pair")
    ap.add_argument("--name", required=True)
    args = ap.parse_args()
    big = Image.open(args.print_image).convert("RGB")
    width, height = big.size
    upscaled = Image.open(args.small).convert("RGB").resize((width, height), Image.Resampling.LANCZOS)
    rows, cols = seams(json.loads(args.report.read_text()))

    scale = OVERVIEW / max(width, height)
    overview = big.resize((round(width * scale), round(height * scale)), Image.Resampling.LANCZOS)
    draw = ImageDraw.Draw(overview)
    # Ticks at the edges, not lines across, so that the picture itself shows whether there is a seam.
    for y in rows:
        for x0 in (0, overview.width - 14):
            draw.line([(x0, y * scale), (x0 + 14, y * scale)], fill=(255, 0, 0), width=2)
    for x in cols:
        for y0 in (0, overview.height - 14):
            draw.line([(x * scale, y0), (x * scale, y0 + 14)], fill=(255, 0, 0), width=2)
    boxes = crop_boxes(width, height, rows, cols)
    for _, (x, y) in boxes:
        half = CROP / 2 * scale
        draw.rectangle([(x * scale - half, y * scale - half), (x * scale + half, y * scale + half)],
                       outline=(255, 0, 0), width=2)
    overview.save(GALLERY / f"print-{args.name}.jpg", quality=88)

    label_h, gap = 20, 8
    sheet = Image.new("RGB", (2 * CROP + gap, len(boxes) * (CROP + label_h + gap)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (label, (x, y)) in enumerate(boxes):
        x0 = min(max(0, x - CROP // 2), width - CROP)
        y0 = min(max(0, y - CROP // 2), height - CROP)
        box = (x0, y0, x0 + CROP, y0 + CROP)
        top = i * (CROP + label_h + gap)
        draw.text((4, top + 4), f"print, 100 % ({label})", fill=(0, 0, 0))
        draw.text((CROP + gap + 4, top + 4), "512-px result, Lanczos upscale", fill=(0, 0, 0))
        sheet.paste(big.crop(box), (0, top + label_h))
        sheet.paste(upscaled.crop(box), (CROP + gap, top + label_h))
    sheet.save(GALLERY / f"print-{args.name}-crops.jpg", quality=92)
    print(GALLERY / f"print-{args.name}.jpg", GALLERY / f"print-{args.name}-crops.jpg")


if __name__ == "__main__":
    main()
