"""Make the README's video comparison (frame by frame | temporal) from images the project may ship.

Each clip is a camera move over one of the gallery's CC0 photos (images/content/): chelsea is panned and zoomed,
coffee is panned and rolled, so the flow is neither constant nor a pure translation and new picture enters at the
borders. Each clip is stylized twice with `style.py video`: `--independent` (every frame on its own, as a still)
and the default temporal run. The two results are put side by side in an animated GIF and a strip of frames under
images/gallery/. Stylizing needs a VGG16 caffemodel: pass the shared HED one or the public VGG16 file.

    python scripts/make_video_demo.py --weights ../shared/models/vgg16_hed.caffemodel
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from style_transfer.video import io  # noqa: E402

IMAGES = ROOT / "images"
CLIPS = {"chelsea": "strokes", "coffee": "mosaic"}
SIZE = (224, 150)


def camera(photo: Image.Image, frames: int, size: tuple[int, int], pan: float, zoom: float,
           roll: float) -> list[np.ndarray]:
    """Frame t views the photo through a camera that has moved by t/(frames-1) of the whole path: its centre
    travels `pan` of the photo's width to the right, it magnifies by `zoom` and turns by `roll` degrees."""
    width, height = photo.size
    out_w, out_h = size
    result = []
    for t in range(frames):
        s = t / max(frames - 1, 1)
        scale = (0.8 * width / out_w) / (1 + (zoom - 1) * s)
        angle = np.deg2rad(roll * s)
        cx, cy = width * (0.5 - pan / 2 + pan * s), height / 2
        cos, sin = np.cos(angle) * scale, np.sin(angle) * scale
        # PIL's affine maps each output pixel (x, y) to the input pixel (a x + b y + c, d x + e y + f).
        a, b, d, e = cos, -sin, sin, cos
        c = cx - a * out_w / 2 - b * out_h / 2
        f = cy - d * out_w / 2 - e * out_h / 2
        view = photo.transform((out_w, out_h), Image.Transform.AFFINE, (a, b, c, d, e, f),
                               resample=Image.Resampling.BICUBIC)
        result.append(np.asarray(view))
    return result


def make_clip(name: str, path: Path, frames: int) -> None:
    with Image.open(IMAGES / "content" / f"{name}.jpg") as photo:
        rgb = photo.convert("RGB")
        if name == "chelsea":
            views = camera(rgb, frames, (SIZE[0], SIZE[1]), pan=0.15, zoom=1.25, roll=0.0)
        else:
            views = camera(rgb, frames, (SIZE[0], SIZE[1]), pan=0.2, zoom=1.05, roll=6.0)
    io.write_video(path, views, Fraction(12), None)


def stylize(clip: Path, style: str, weights: str, target: Path, iterations: int, later: int,
            independent: bool) -> list[np.ndarray]:
    argv = [sys.executable, str(ROOT / "style.py"), "video", str(clip), "-s", str(IMAGES / "style" / f"{style}.jpg"),
            "-o", str(target), "-m", "vgg16", "--weights", weights, "-g", "-1", "-l", str(SIZE[0]),
            "-n", str(iterations), "--iters", str(later), "--seed", "0"]
    subprocess.run(argv + (["--independent"] if independent else []), check=True)
    work = target.with_name(target.name + ".work")
    return [np.asarray(Image.open(p).convert("RGB")) for p in sorted(work.glob("frame-*.png"))]


def labelled(frames: list[np.ndarray], label: str) -> list[np.ndarray]:
    out = []
    for frame in frames:
        canvas = Image.new("RGB", (frame.shape[1], frame.shape[0] + 18), (255, 255, 255))
        canvas.paste(Image.fromarray(frame), (0, 18))
        ImageDraw.Draw(canvas).text((4, 3), label, fill=(0, 0, 0))
        out.append(np.asarray(canvas))
    return out


def side_by_side(name: str, left: list[np.ndarray], right: list[np.ndarray]) -> None:
    gap = np.full((left[0].shape[0] + 18, 6, 3), 255, np.uint8)
    panels = [np.concatenate([a, gap, b], axis=1)
              for a, b in zip(labelled(left, "frame by frame"), labelled(right, "temporal (default)"), strict=True)]
    gallery = IMAGES / "gallery"
    pictures = [Image.fromarray(p) for p in panels]
    pictures[0].save(gallery / f"video-{name}.gif", save_all=True, append_images=pictures[1:],
                     duration=1000 // 12, loop=0, optimize=True)
    rows = [np.concatenate(frames[:: max(len(frames) // 4, 1)][:4], axis=1) for frames in (left, right)]
    strip = np.concatenate([rows[0], np.full((6, rows[0].shape[1], 3), 255, np.uint8), rows[1]], axis=0)
    Image.fromarray(strip).save(gallery / f"video-{name}-strip.jpg", quality=90)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", required=True, help="a VGG16 caffemodel")
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("-n", type=int, default=60, help="iterations of the first frame (of every frame, frame by frame)")
    ap.add_argument("--iters", type=int, default=40, help="iterations of every later frame of the temporal run")
    ap.add_argument("--clips", nargs="+", choices=list(CLIPS), default=list(CLIPS))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.clips:
            clip = Path(tmp) / f"{name}.mp4"
            make_clip(name, clip, args.frames)
            left = stylize(clip, CLIPS[name], args.weights, Path(tmp) / f"{name}-independent.mp4", args.n,
                           args.n, independent=True)
            right = stylize(clip, CLIPS[name], args.weights, Path(tmp) / f"{name}-temporal.mp4", args.n,
                            args.iters, independent=False)
            side_by_side(name, left, right)


if __name__ == "__main__":
    main()
