"""Single-scale against coarse-to-fine at equal compute (full-size evaluations), scored on the full-size objective.

Runs each variant through the library, saves its image, then evaluates every result with the full-size objective of
the single-scale run, so the numbers compare like with like. Prints a JSON line per variant and writes a side-by-side
sheet.

    python bench/scales_equal_time.py --weights ../shared/models/vgg16_hed.caffemodel -l 384 --budget 150 --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from style_transfer import images
from style_transfer.engines import Evaluator
from style_transfer.losses import Objective
from style_transfer.optimize import Step
from style_transfer.transfer import StyleTransfer

RATIO = 1e4
STYLE_SCALE = 1.2


def run_for(st: StyleTransfer, content: np.ndarray, style: np.ndarray, length: int, budget: float, scales: int,
            iterations: int) -> tuple[np.ndarray, int, float]:
    """Iterate until the plan is done or the budget is spent; returns the image, iterations and seconds.

    The budget is counted in full-size evaluations (an evaluation at a smaller size costs its pixel share), which
    is what wall time measures on an idle machine but stays fair when other jobs share the CPU.
    """
    run = st.stylize(content, [style], length=length, num_iters=iterations, scales=scales, ratio=RATIO,
                     style_scale=STYLE_SCALE)
    start = time.perf_counter()
    last = None
    spent = 0.0
    seen = 0

    def on_step(step: Step) -> None:
        nonlocal last, spent, seen
        size = run.plan[step.scale][0]
        spent += (step.evaluations - seen) * (size / length) ** 2
        seen = step.evaluations
        last = step
        if spent >= budget and step.scale == len(run.plan) - 1:
            raise StopIteration

    run.run(on_step)
    assert last is not None
    return last.image, last.iteration, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", required=True)
    ap.add_argument("--style", default="../shared/images/style/starry_night.jpg")
    ap.add_argument("--content", default="../shared/images/content/tubingen.jpg")
    ap.add_argument("-l", "--length", type=int, default=384)
    ap.add_argument("--budget", type=float, default=150.0, help="full-size evaluations per variant")
    ap.add_argument("--pooling", default="max")
    ap.add_argument("--out", default="/tmp/scales")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    st = StyleTransfer("vgg16", weights=args.weights, pooling=args.pooling, gpu=-1, precision="fp32")
    content = images.load_image(args.content)
    style = images.load_image(args.style)
    variants = [("single-scale", 1, 100000), ("2 scales", 2, 100000), ("3 scales", 3, 100000)]
    results = []
    for name, scales, iterations in variants:
        # Multi-scale plans are capped so the coarse scales take about half the budget, leaving the rest for the
        # full size: a plan of 10^5 iterations would never leave the smallest scale.
        if scales > 1:
            iterations = _iterations_for(st, content, style, args.length, scales, args.budget)
        image, done, seconds = run_for(st, content, style, args.length, args.budget, scales, iterations)
        results.append((name, image, done, seconds))
    # Score everything on the single-scale objective at full size.
    score = full_size_objective(st, content, style, args.length)
    tiles = []
    for name, image, done, seconds in results:
        loss = score(image).loss
        rgb = images.deprocess(image)
        images.save_image(out / f"{name.replace(' ', '_')}.png", rgb)
        print(json.dumps({"variant": name, "iterations": done, "seconds": round(seconds, 1), "loss": loss}))
        tiles.append((f"{name}: {done} it, {seconds:.0f} s, loss {loss:.3g}", rgb))
    _sheet(tiles, out / "sheet.png")


def full_size_objective(st: StyleTransfer, content: np.ndarray, style: np.ndarray, length: int) -> Evaluator:
    """The objective a single-scale run at `length` minimises, bound to the model's engine."""
    content = images.resize_long_side(content, length)
    grams = st.style_grams(images.resize_long_side(style, round(length * STYLE_SCALE)))
    return st.engine.bind(Objective(
        content_weights=st.content_weights, style_weights=st.style_weights, ratio=RATIO,
        content_targets=st.engine.features(images.preprocess(content), list(st.content_weights)),
        style_targets={layer: grams[layer][None] for layer in st.style_weights}))


def _iterations_for(st: StyleTransfer, content: np.ndarray, style: np.ndarray, length: int, scales: int,
                    budget: float) -> int:
    """A plan whose coarse scales leave most of the budget to the full size (about 1.05 evaluations/iteration)."""
    from style_transfer.transfer import scale_plan

    for total in range(10 * scales, 100000, 5):
        plan = scale_plan(length, scales, None, total)
        if sum(n * 1.05 * (size / length) ** 2 for size, n in plan) >= budget:
            return total
    return 100000


def _sheet(tiles: list[tuple[str, np.ndarray]], path: Path) -> None:
    h, w = tiles[0][1].shape[:2]
    sheet = Image.new("RGB", (w * len(tiles), h + 24), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (label, rgb) in enumerate(tiles):
        sheet.paste(Image.fromarray(np.round(rgb * 255).astype(np.uint8)), (i * w, 0))
        draw.text((i * w + 4, h + 6), label, fill="black")
    sheet.save(path)


if __name__ == "__main__":
    main()
