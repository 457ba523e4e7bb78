"""Make the README gallery from images the project may ship.

Contents are scikit-image's bundled photos `chelsea` (the cat) and `coffee`, both CC0; styles are two pictures
this script draws itself: brush strokes along a flow field, and a stained-glass mosaic.
Stylizing needs a VGG16 caffemodel: pass the shared HED one or the public VGG16 file.

    python scripts/make_gallery.py --weights ../shared/models/vgg16_hed.caffemodel [--length 256] [-n 150]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "images"
CONTENTS = ("chelsea", "coffee")
STYLES = ("strokes", "mosaic")


def brush_strokes(width: int = 480, height: int = 360, seed: int = 7) -> Image.Image:
    """Short curved strokes following a swirling flow field, in a warm-and-cold palette."""
    rng = np.random.default_rng(seed)
    palette = np.array([[20, 40, 110], [40, 90, 170], [90, 150, 210], [230, 200, 60], [250, 230, 140],
                        [30, 60, 50], [200, 110, 40], [245, 245, 230]])
    canvas = Image.new("RGB", (width, height), (30, 50, 100))
    draw = ImageDraw.Draw(canvas)
    for _ in range(5200):
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        colour = palette[rng.choice(len(palette), p=[0.2, 0.22, 0.15, 0.12, 0.08, 0.08, 0.07, 0.08])]
        colour = np.clip(colour + rng.normal(0, 14, 3), 0, 255).astype(int)
        points = [(x, y)]
        for _ in range(int(rng.integers(5, 14))):
            angle = np.sin(x / 41.0) * 2.2 + np.cos(y / 29.0) * 1.7 + 0.6 * np.sin((x + y) / 73.0)
            x, y = x + 3.5 * np.cos(angle), y + 3.5 * np.sin(angle)
            points.append((x, y))
        draw.line(points, fill=tuple(int(c) for c in colour), width=int(rng.integers(2, 6)), joint="curve")
    return canvas.filter(ImageFilter.SMOOTH)


def mosaic(width: int = 480, height: int = 360, cells: int = 260, seed: int = 3) -> Image.Image:
    """Voronoi cells in saturated colours with dark leading between them, like stained glass."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform([0, 0], [width, height], (cells, 2))
    palette = np.array([[200, 30, 40], [240, 170, 30], [30, 110, 190], [20, 150, 90], [120, 40, 150],
                        [240, 220, 180], [230, 90, 30]])
    colours = palette[rng.integers(0, len(palette), cells)] + rng.normal(0, 18, (cells, 3))
    yy, xx = np.mgrid[0:height, 0:width]
    d = (xx[..., None] - centres[:, 0]) ** 2 + (yy[..., None] - centres[:, 1]) ** 2
    order = np.argsort(d, axis=-1)
    nearest, second = order[..., 0], order[..., 1]
    gap = np.sqrt(np.take_along_axis(d, second[..., None], -1)[..., 0]) - np.sqrt(
        np.take_along_axis(d, nearest[..., None], -1)[..., 0])
    picture = colours[nearest]
    picture[gap < 2.5] = [25, 20, 20]
    return Image.fromarray(np.clip(picture, 0, 255).astype(np.uint8)).filter(ImageFilter.SMOOTH)


def prepare_sources() -> None:
    import skimage.data as data

    (IMAGES / "content").mkdir(parents=True, exist_ok=True)
    (IMAGES / "style").mkdir(parents=True, exist_ok=True)
    for name in CONTENTS:
        Image.fromarray(getattr(data, name)()).save(IMAGES / "content" / f"{name}.jpg", quality=92)
    mosaic().save(IMAGES / "style" / "mosaic.jpg", quality=92)
    brush_strokes().save(IMAGES / "style" / "strokes.jpg", quality=92)


def stylize(weights: str, length: int, iterations: int, extra: list[str]) -> None:
    out = IMAGES / "gallery"
    out.mkdir(parents=True, exist_ok=True)
    for content in CONTENTS:
        for style in STYLES:
            style_file = IMAGES / "style" / f"{style}.jpg"
            target = out / f"{content}-{style}.jpg"
            if target.exists():
                continue
            subprocess.run([sys.executable, str(ROOT / "style.py"), "-s", str(style_file), "-c",
                            str(IMAGES / "content" / f"{content}.jpg"), "-m", "vgg16", "--weights", weights,
                            "-l", str(length), "-n", str(iterations), "-g", "-1", "-o", str(target), *extra],
                           check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", required=True, help="a VGG16 caffemodel")
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("-n", type=int, default=150)
    ap.add_argument("--sources-only", action="store_true", help="only write the source images")
    args, extra = ap.parse_known_args()
    prepare_sources()
    if not args.sources_only:
        stylize(args.weights, args.length, args.n, extra)


if __name__ == "__main__":
    main()
