"""Labelled contact sheets of the three comparisons the original tool's write-up showed.

1. `styles.png`: one content image under several styles (inputs on top, each result under its style);
2. `iterations.png`: one style-content pair after 50, 100, 200, 400 and 800 L-BFGS-B iterations, snapshots of a
   single run taken as it passes those counts;
3. `models.png`: the same pair under each model; a model whose weights are not there gets a grey tile that says so.

    python scripts/figures.py --weights vgg16=../shared/models/vgg16_hed.caffemodel -l 160 --out /tmp/figures

Images default to `../shared/images` (San Francisco under Starry Night, The Scream, Picasso's self-portrait and
Matisse's Woman with a Hat). `--iter-scale 0.25` divides every iteration count by four for a quick look; on two CPU
cores `-l 128 --iter-scale 0.25` takes a few minutes with VGG16.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "images"
DEFAULT_CONTENT = SHARED / "content" / "sanfrancisco.jpg"
DEFAULT_STYLES = [SHARED / "style" / f"{name}.jpg"
                  for name in ("starry_night", "the_scream", "picasso_selfport1907", "woman-with-hat-matisse")]
MODELS = ("vgg19", "vgg16", "googlenet", "caffenet")
BACKGROUND = (250, 250, 248)
MISSING = (200, 200, 200)


@dataclass
class Tile:
    image: np.ndarray | None  # RGB H x W x 3 in [0, 1]; None draws a grey box with `placeholder`
    label: str
    placeholder: str = ""


def _font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def contact_sheet(rows: Sequence[Sequence[Tile | None]], title: str, tile: int) -> Image.Image:
    """Tiles fitted into tile x tile boxes, a label of up to three lines under each, a title on top."""
    font, title_font = _font(max(11, tile // 13)), _font(max(14, tile // 9))
    line_height = font.getbbox("Ag")[3] + 4
    pad, label_height = 12, 3 * line_height + 6
    columns = max(len(r) for r in rows)
    title_height = title_font.getbbox("Ag")[3] + 2 * pad
    width = max(pad + columns * (tile + pad), int(title_font.getlength(title)) + 2 * pad)
    height = title_height + len(rows) * (tile + label_height + pad)
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, pad), title, fill=(20, 20, 20), font=title_font)
    chars = max(8, int(tile / (font.getlength("n") or 6)))
    for r, row in enumerate(rows):
        top = title_height + r * (tile + label_height + pad)
        for c, item in enumerate(row):
            if item is None:
                continue
            left = pad + c * (tile + pad)
            if item.image is None:
                draw.rectangle((left, top, left + tile - 1, top + tile - 1), fill=MISSING)
                wrapped = textwrap.wrap(item.placeholder, max(4, chars - 2))
                first = top + (tile - len(wrapped) * line_height) // 2
                for i, text in enumerate(wrapped):
                    draw.text((left + 6, first + i * line_height), text, fill=(60, 60, 60), font=font)
            else:
                picture = Image.fromarray(np.round(np.clip(item.image, 0, 1) * 255).astype(np.uint8))
                # Fitted both ways: small quick-run results are shown at the size of their inputs.
                scale = tile / max(picture.size)
                picture = picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))),
                                         Image.Resampling.LANCZOS)
                sheet.paste(picture, (left + (tile - picture.width) // 2, top + (tile - picture.height) // 2))
            lines = [part for text in item.label.split("\n") for part in textwrap.wrap(text, chars)][:3]
            for i, text in enumerate(lines):
                draw.text((left, top + tile + 4 + i * line_height), text, fill=(30, 30, 30), font=font)
    return sheet


def _say(message: str) -> None:
    print(f"figures: {message}", file=sys.stderr, flush=True)


def _weights(specs: Sequence[str]) -> dict[str, Path]:
    mapping: dict[str, Path] = {}
    for spec in specs:
        model, sep, path = spec.partition("=")
        if not sep or model not in MODELS or not path:
            raise SystemExit(f"figures: --weights takes MODEL=PATH with MODEL one of {', '.join(MODELS)}, "
                             f"got {spec!r}")
        mapping[model] = Path(path)
    return mapping


class Runner:
    """Loads each model once and runs the stylizations the sheets need."""

    def __init__(self, args: argparse.Namespace, weights: dict[str, Path]) -> None:
        from style_transfer.caffe_model.registry import get_model

        self.args = args
        self.weights = weights
        self.get_model = get_model
        self.loaded: dict[str, Any] = {}

    def weights_of(self, model: str) -> Path | None:
        path = self.weights.get(model) or self.get_model(model).weights_path(self.args.models_dir)
        return path if path.is_file() else None

    def model(self, name: str) -> Any:
        from style_transfer.transfer import StyleTransfer

        if name not in self.loaded:
            _say(f"loading {name} from {self.weights_of(name)}")
            self.loaded[name] = StyleTransfer(name, weights=self.weights_of(name), models_dir=self.args.models_dir,
                                              pooling=self.args.pooling, gpu=self.args.gpu)
        return self.loaded[name]

    def run(self, model: str, content: np.ndarray, style: np.ndarray, iterations: int,
            snapshots: Sequence[int] = ()) -> tuple[np.ndarray, dict[int, tuple[np.ndarray, float]], float]:
        """The final image, {iteration: (image, loss)} at the snapshot counts, and the seconds taken."""
        from style_transfer import images

        a = self.args
        run = self.model(model).stylize(content, [style], ratio=a.ratio, num_iters=iterations, length=a.length,
                                        init=a.init, seed=a.seed)
        taken: dict[int, tuple[np.ndarray, float]] = {}
        started = time.perf_counter()
        last = None

        def on_step(step: Any) -> None:
            nonlocal last
            last = step
            if step.iteration in snapshots:
                loss = step.evaluation.loss if step.evaluation is not None else float("nan")
                taken[step.iteration] = (images.deprocess(step.image), loss)
                _say(f"  {model}: iteration {step.iteration}, loss {loss:.4g}")

        result = run.run(on_step)
        seconds = time.perf_counter() - started
        if last is not None:
            # Runs that stop early still get a snapshot tile for every count, marked with where they stopped.
            for count in snapshots:
                if count not in taken and count > last.iteration:
                    loss = last.evaluation.loss if last.evaluation is not None else float("nan")
                    taken[count] = (images.deprocess(last.image), loss)
        return result.rgb, taken, seconds


def _scaled(count: int, scale: float) -> int:
    return max(1, round(count * scale))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--content", type=Path, default=DEFAULT_CONTENT, help="content image of sheet 1")
    ap.add_argument("--styles", type=Path, nargs="+", default=DEFAULT_STYLES, help="style images of sheet 1")
    ap.add_argument("--pair-content", type=Path, default=None, help="content of sheets 2 and 3 (default: --content)")
    ap.add_argument("--pair-style", type=Path, default=None,
                    help="style of sheets 2 and 3 (default: the first of --styles)")
    ap.add_argument("--weights", action="append", default=[], metavar="MODEL=PATH",
                    help="a model's caffemodel (repeatable); models without one use models/<model>/ or are "
                         "shown as not available")
    ap.add_argument("--model", default="vgg16", choices=MODELS, help="model of sheets 1 and 2")
    ap.add_argument("--models", default=",".join(MODELS), help="models of sheet 3, comma-separated")
    ap.add_argument("--models-dir", default=None, help="where models/<model>/<file> live")
    ap.add_argument("-l", "--length", type=int, default=256, help="long side of the results, pixels")
    ap.add_argument("-n", "--num-iters", type=int, default=200, help="iterations of sheets 1 and 3")
    ap.add_argument("--checkpoints", default="50,100,200,400,800", help="iteration counts of sheet 2")
    ap.add_argument("--iter-scale", type=float, default=1.0, help="multiply every iteration count by this")
    ap.add_argument("-r", "--ratio", type=float, default=1e4, help="style-to-content ratio")
    ap.add_argument("-i", "--init", default="content", help="content, mixed or a noise exponent")
    ap.add_argument("--seed", type=int, default=0, help="seed of a noise init")
    ap.add_argument("--pooling", default="avg", choices=("avg", "max"))
    ap.add_argument("-g", "--gpu", type=int, default=-1, help="CUDA device, -1 for the CPU")
    ap.add_argument("--tile", type=int, default=None, help="tile size on the sheets (default: --length)")
    ap.add_argument("--sheets", default="1,2,3", help="which sheets to make")
    ap.add_argument("--out", type=Path, default=Path("figures"), help="output folder")
    args = ap.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    from style_transfer.errors import StyleTransferError
    from style_transfer.images import load_image

    sheets = {s.strip() for s in args.sheets.split(",")}
    tile = args.tile or args.length
    checkpoints = sorted({_scaled(int(c), args.iter_scale) for c in args.checkpoints.split(",")})
    iterations = _scaled(args.num_iters, args.iter_scale)
    weights = _weights(args.weights)
    pair_content = args.pair_content or args.content
    pair_style = args.pair_style or args.styles[0]
    args.out.mkdir(parents=True, exist_ok=True)
    setting = f"{args.length} px, ratio {args.ratio:g}, init {args.init}"
    try:
        runner = Runner(args, weights)
        content = load_image(args.content)
        pair = (load_image(pair_content), load_image(pair_style))
        if runner.weights_of(args.model) is None and sheets & {"1", "2"}:
            raise StyleTransferError(f"sheets 1 and 2 need {args.model}'s weights: --weights {args.model}=PATH")

        if "1" in sheets:
            styles = [(p, load_image(p)) for p in args.styles]
            top: list[Tile | None] = [Tile(content, f"content\n{args.content.stem}")]
            bottom: list[Tile | None] = [None]
            for path, style in styles:
                _say(f"sheet 1: {args.content.stem} x {path.stem}, {iterations} iterations")
                result, _, seconds = runner.run(args.model, content, style, iterations)
                top.append(Tile(style, f"style\n{path.stem}"))
                bottom.append(Tile(result, f"{path.stem}\n{iterations} it, {seconds:.0f} s"))
            sheet = contact_sheet([top, bottom], f"One content, {len(styles)} styles ({args.model}, {setting})",
                                  tile)
            sheet.save(args.out / "styles.png")
            _say(f"wrote {args.out / 'styles.png'}")

        snapshots: dict[int, tuple[np.ndarray, float]] = {}
        if "2" in sheets:
            _say(f"sheet 2: {pair_content.stem} x {pair_style.stem}, one run to {checkpoints[-1]} iterations")
            _, snapshots, seconds = runner.run(args.model, *pair, checkpoints[-1], checkpoints)
            row: list[Tile | None] = [Tile(pair[0], f"content\n{pair_content.stem}"),
                                      Tile(pair[1], f"style\n{pair_style.stem}")]
            row += [Tile(snapshots[c][0], f"{c} iterations\nloss {snapshots[c][1]:.3g}") for c in checkpoints]
            sheet = contact_sheet([row], f"Iterations of one run ({args.model}, {setting}; {seconds:.0f} s in all)",
                                  tile)
            sheet.save(args.out / "iterations.png")
            _say(f"wrote {args.out / 'iterations.png'}")

        if "3" in sheets:
            row = [Tile(pair[0], f"content\n{pair_content.stem}"), Tile(pair[1], f"style\n{pair_style.stem}")]
            for model in [m.strip() for m in args.models.split(",") if m.strip()]:
                path = runner.weights_of(model)
                if path is None:
                    row.append(Tile(None, f"{model}\n(not run)", f"{model}: weights not available"))
                    continue
                if model == args.model and iterations in snapshots:
                    image = snapshots[iterations][0]  # sheet 2's run passed through exactly this state
                    note = "sheet 2's run"
                else:
                    _say(f"sheet 3: {model}, {iterations} iterations")
                    image, _, seconds = runner.run(model, *pair, iterations)
                    note = f"{seconds:.0f} s"
                row.append(Tile(image, f"{model}: {path.name}\n{iterations} it, {note}"))
            sheet = contact_sheet([row], f"One pair under each model ({setting})", tile)
            sheet.save(args.out / "models.png")
            _say(f"wrote {args.out / 'models.png'}")
    except StyleTransferError as exc:
        _say(f"error: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
