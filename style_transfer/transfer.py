"""The library's front door: a model loaded once, then any number of runs, each of which finishes itself.

    st = StyleTransfer("vgg16", gpu=-1)                  # options.py: every keyword, its default and check
    run = st.stylize(content, [style], num_iters=200)    # RGB arrays, H x W x 3 in [0, 1]
    result = run.run(on_step=print)                      # RunResult: the image, its scores and the report

The scales of a run, their tiling and cost, and the time left are plan.py's (`run.costs()`, `run(on_progress=...)`).

A run's objective is bound to the run (`engine.bind`), so runs made from one StyleTransfer never see each other's
targets.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from style_transfer import images
from style_transfer.caffe_model.loader import load_net
from style_transfer.caffe_model.registry import get_model
from style_transfer.colors import match_colors, original_colors
from style_transfer.engines import Engine, Evaluation, create_engine, fast_bf16
from style_transfer.errors import ModelError, StyleTransferError
from style_transfer.initial import initial_image
from style_transfer.options import BY_NAME, check_all, init_kind, parse_layer_weights
from style_transfer.plan import Clock, CostModel, Progress, ScaleCost, check_sizes, scale_plan

__all__ = ["RunResult", "StyleTransfer", "Stylization", "TemporalTarget", "scale_plan"]

if TYPE_CHECKING:  # tiling imports torch, which must load after style_transfer/openmp.py has run
    from style_transfer import tiling
    from style_transfer.losses import Objective

# `--precision auto` where bf16 has fast kernels (engines.fast_bf16): a scale whose evaluation takes at least this
# many FLOPs optimises in bf16, on targets the bf16 engine makes; a finished run is scored in float32. The tiny nets
# of the tests stay far below it; VGG at 64 px is above it (BENCHMARKS.md, "bf16 by default where it pays").
BF16_MIN_FLOP = 1e9
# How a run ends other than by finishing its iterations (RunResult.stop_reason).
_CUT = ("interrupted", "stopped", "nonfinite", "scale_failed")


@dataclass
class RunResult:
    """What a finished (or interrupted) run leaves: the image, its scores and the report."""

    rgb: np.ndarray  # H x W x 3 float32 in [0, 1], original colours applied when asked
    x: np.ndarray  # 3 x H x W preprocessed (BGR, mean subtracted)
    evaluation: Evaluation | None  # the objective at `x`; None only if a second Ctrl-C cut its evaluation
    iterations: int
    stop_reason: str  # scipy's message, "interrupted", "stopped", "nonfinite" or "scale_failed"
    error: str | None
    stopped_early: bool
    report: dict[str, Any]

    @property
    def interrupted(self) -> bool:
        return self.stop_reason == "interrupted"

    @property
    def failed(self) -> bool:
        """The run ended on an error (`error`): a non-finite loss (the image is the last good iterate), or a scale
        that could not start (the image is the last finished scale's, smaller than asked)."""
        return self.stop_reason in ("nonfinite", "scale_failed")


@dataclass(frozen=True)
class TemporalTarget:
    """Ruder et al.'s temporal term for one video frame (losses.temporal_loss_torch): the previous stylized frame
    warped onto this one (RGB, H x W x 3 in [0, 1] at the run's final size), the mask of pixels where that warp is
    trusted (H x W in [0, 1]) and the term's weight (on the 0-255 pixel scale, like --tv-weight)."""

    rgb: np.ndarray
    mask: np.ndarray
    weight: float


@dataclass
class Stylization:
    """One prepared run: call `run()` once."""

    transfer: StyleTransfer
    content: np.ndarray
    styles: list[np.ndarray]
    blend: np.ndarray
    plan: list[tuple[int, int]]
    options: dict[str, Any]
    seed: int
    notices: list[str] = field(default_factory=list)
    evaluations: int = 0
    tilings: list[dict[str, Any] | None] = field(default_factory=list)  # per scale run: how it was tiled, or None
    temporal: TemporalTarget | None = None
    _clock: Clock | None = field(default=None, repr=False)
    _on_progress: Callable[[Progress], None] | None = field(default=None, repr=False)
    _cost_model: CostModel | None = field(default=None, repr=False)
    _held: int | None = field(default=None, repr=False)  # the process's resident bytes before the run's own arrays
    _precisions: list[str] = field(default_factory=list, repr=False)  # each scale's optimisation's, in order

    @property
    def iterations(self) -> int:
        return sum(n for _, n in self.plan)

    @property
    def precision(self) -> str:
        """The arithmetic of the run's optimisation, scale by scale: e.g. "fp32+bf16" for an auto run whose small
        scales were not worth bf16."""
        return "+".join(dict.fromkeys(self._precisions)) or self.transfer.engine.precision

    def to_rgb(self, x: np.ndarray) -> np.ndarray:
        """An iterate as the picture the user gets (original colours applied when asked)."""
        rgb = images.deprocess(x)
        if self.options["original_colors"]:
            rgb = original_colors(rgb, images.resize_to(self.content, rgb.shape[0], rgb.shape[1]))
        return rgb

    def run(self, on_step: Callable[[Any], None] | None = None,
            on_progress: Callable[[Progress], None] | None = None) -> RunResult:
        """Optimise every scale in turn; `on_step` sees each L-BFGS-B iteration (and may raise StopIteration),
        `on_progress` each tile, evaluation and iteration with the time left (plan.Progress).

        Ctrl-C, a StopIteration from `on_step` and a non-finite loss end the run with the last good iterate instead
        of an exception, so that a caller always has an image to save."""
        from style_transfer import memory
        from style_transfer.optimize import LBFGSB

        started = time.perf_counter()
        st = self.transfer
        self.evaluations = 0
        self.tilings = []
        self._precisions = []
        clock = self._clock = Clock(self.costs(), started)
        self._on_progress = on_progress
        x: np.ndarray | None = None
        done = 0
        stop_reason, error, stopped_early = "", None, False
        evaluation: Evaluation | None = None
        evaluate: Callable[[np.ndarray], Evaluation] | None = None
        for index, (length, iters) in enumerate(self.plan):
            content = images.resize_long_side(self.content, length)
            h, w = content.shape[:2]
            evaluate = None  # the last scale's targets go before this scale's are made
            if x is not None:  # not before a run's first scale: a video frame would pay for it every time
                memory.release_free_memory()
            try:
                objective, tiles, cost, style_plans = self._targets(content, index)
            except StyleTransferError as exc:
                if x is None:
                    raise
                # The earlier scales' work is kept: the memory can change while a run goes on (other processes).
                stop_reason, error = "scale_failed", f"scale {index + 1} of {len(self.plan)} ({w}x{h}): {exc}"
                break
            if x is None:
                start = images.preprocess(initial_image(self.options["init"], content, self.styles, self.blend,
                                                        self.seed))
            else:
                start = images.preprocess(images.resize_to(images.deprocess(x), h, w))
            del content
            engine = self._engine(cost)
            self._precisions.append(engine.precision)
            evaluate = self._bound(engine, objective, tiles)
            # Only the optimiser's own float64 copies of the start and the bounds stay for the scale.
            optimiser = LBFGSB(evaluate, start, *images.pixel_bounds(h, w), iters, self.options["lbfgs_memory"])

            def forward(step: Any, offset: int = done, scale: int = index) -> None:
                clock.iteration_done()
                if on_step is not None:
                    on_step(replace(step, iteration=offset + step.iteration, scale=scale,
                                    evaluations=self.evaluations))
                self._tell()

            result = optimiser.run(forward)
            del optimiser
            done += result.iterations
            x = result.image
            evaluation = result.last_evaluation
            stop_reason, error = result.stop_reason, result.error
            stopped_early = stopped_early or result.stopped_early
            if stop_reason in ("interrupted", "stopped", "nonfinite"):
                break
        assert x is not None
        if evaluate is not None and self._precisions[-1] != st.engine.precision and stop_reason not in _CUT:
            # A bf16 run's scores are the float32 objective's, targets included, as every other run's are.
            content = images.resize_long_side(self.content, self.plan[-1][0])
            objective = self._objective(st.engine, content, len(self.plan) - 1, style_plans, tiles)
            evaluate, evaluation = self._bound(st.engine, objective, tiles), None
        if evaluation is None and evaluate is not None:
            try:
                evaluation = evaluate(x)
            except KeyboardInterrupt:
                stop_reason = "interrupted"  # a second Ctrl-C: the image is kept, its scores are not
        seconds = time.perf_counter() - started
        if stopped_early and stop_reason not in _CUT:
            self.notices.append(f"L-BFGS-B stopped after {done} of {self.iterations} iterations: {stop_reason}")
        report = self._report(x, evaluation, done, seconds, stop_reason)
        return RunResult(rgb=self.to_rgb(x), x=x, evaluation=evaluation, iterations=done, stop_reason=stop_reason,
                         error=error, stopped_early=stopped_early, report=report)

    def _tiles(self, height: int, width: int, blobs: list[str], fixed: int) -> tiling.TilePlan | None:
        """Tiles for an image of this size when one evaluation of it does not fit the memory budget beside `fixed`
        bytes of other arrays."""
        from style_transfer import memory

        st = self.transfer
        available = memory.available_bytes(st.engine.device)
        cap = self.options["max_memory"]
        budget = available if cap is None else min(available, int(cap * memory.GB))
        if cap is not None and cap * memory.GB <= available:
            what = f"--max-memory {cap:g}"
            if st.engine.device == "cpu":  # the cap is the process's: what it held before the run counts
                # Measured once: later the resident size also holds what earlier scales freed, which the process
                # reuses; counting it again refused the last scale of a 4096-px print after 20 minutes of work.
                if self._held is None:
                    self._held = memory.resident_bytes()
                fixed += self._held
        else:  # what is available is beside what the process holds already
            what = f"the memory available ({available / memory.GB:.1f} GB)"
        return memory.choose_tiles(st.net, st.engine.pooling, height, width, blobs, budget, fixed, what)

    def _run_bytes(self, height: int, width: int) -> int:
        """What the optimisation keeps beside an evaluation at this size. On the CPU the optimiser's full-size arrays
        share the budget; on CUDA they live in host memory."""
        from style_transfer import memory

        st = self.transfer
        if st.engine.device != "cpu":
            return 0
        kept = memory.blob_bytes(st.net, st.engine.pooling, height, width, list(st.content_weights))
        return memory.run_bytes(st.net, height, width, self.options["lbfgs_memory"], kept)

    def costs(self) -> list[ScaleCost]:
        """Each scale's size, iterations, tiling and work, with the tiles the memory available now allows (a run
        chooses them again as each scale starts)."""
        return [self._scale(index)[0] for index in range(len(self.plan))]

    def _scale(self, index: int) -> tuple[ScaleCost, list[tiling.TilePlan | None], tiling.TilePlan | None]:
        """A scale's cost, each style image's tiles and the objective's tiles (None: evaluated whole)."""
        st = self.transfer
        length, iterations = self.plan[index]
        h, w = images.long_side_size(self.content.shape[0], self.content.shape[1], length)
        style_length = round(length * self.options["style_scale"])
        style_sizes = [images.long_side_size(style.shape[0], style.shape[1], style_length) for style in self.styles]
        # The style targets are made between two scales' optimisations: no optimiser's arrays beside them.
        style_plans = [self._tiles(*size, list(st.style_weights), 0) for size in style_sizes]
        plan = self._tiles(h, w, st.blobs, self._run_bytes(h, w))
        if self._cost_model is None:
            self._cost_model = CostModel(st.net, st.engine.pooling, list(st.style_weights), list(st.content_weights))
        model = self._cost_model

        def tiles(p: tiling.TilePlan | None) -> list[tuple[int, int]] | None:
            return None if p is None else p.tile_sizes()

        styles = [(size, tiles(p)) for size, p in zip(style_sizes, style_plans, strict=True)]
        evaluation = model.evaluation(h, w, tiles(plan))
        cost = ScaleCost(w, h, iterations, 0 if plan is None else plan.count, evaluation,
                         model.targets((h, w), tiles(plan), styles),
                         self.transfer.bf16_pays and evaluation >= BF16_MIN_FLOP)
        return cost, style_plans, plan

    def _tell(self, tile_pass: int = 0, tile: int = 0, tiles: int = 0) -> None:
        if self._on_progress is not None and self._clock is not None:
            self._on_progress(self._clock.progress(tile_pass, tile, tiles))

    def _tile(self, tile_pass: int, tile: int, tiles: int) -> None:
        assert self._clock is not None
        self._clock.tile_done(tile_pass, tile, tiles)
        self._tell(tile_pass, tile, tiles)

    def _targets(self, content: np.ndarray, index: int
                 ) -> tuple[Objective, tiling.TilePlan | None, ScaleCost, list[tiling.TilePlan | None]]:
        """A scale's objective, its tiles, its cost and its style images' tiles. The targets are made by the engine
        the scale optimises on: a bf16 net's features carry their own rounding, which cancels against targets made
        the same way and not against float32 ones (BENCHMARKS.md, "bf16 by default where it pays")."""
        st = self.transfer
        clock = self._clock
        assert clock is not None
        cost, style_plans, plan = self._scale(index)
        clock.start_scale(index, cost)
        self._tell()
        objective = self._objective(self._engine(cost), content, index, style_plans, plan, self._tile)
        clock.targets_done()
        self._tell()
        if plan is not None and objective.has_temporal:
            raise StyleTransferError("a video frame too large for memory cannot be tiled yet; lower -l/--length or "
                                     "raise --max-memory")
        self.tilings.append(None if plan is None else plan.summary())
        if plan is not None and st.options["verbose"]:
            h, w = content.shape[:2]
            tile_h, tile_w = plan.tile_size
            self.notices.append(f"{w}x{h}: evaluated in {plan.count} tiles of up to {tile_w}x{tile_h} px "
                                f"(halo {plan.halo} px)")
        return objective, plan, cost, style_plans

    def _engine(self, cost: ScaleCost) -> Engine:
        st = self.transfer
        return st.fast_engine if cost.bf16 and st.fast_engine else st.engine

    def _objective(self, engine: Engine, content: np.ndarray, index: int, style_plans: list[tiling.TilePlan | None],
                   plan: tiling.TilePlan | None, on_tile: tiling.OnTile | None = None) -> Objective:
        """The objective of scale `index`, its targets made by `engine`, tile by tile where there are plans."""
        from style_transfer import tiling
        from style_transfer.losses import Objective

        st = self.transfer
        style_length = round(self.plan[index][0] * self.options["style_scale"])
        grams = []
        for style, style_plan in zip(self.styles, style_plans, strict=True):
            matched = match_colors(images.resize_long_side(style, style_length), content, self.options["color_match"])
            grams.append(st.style_grams(matched, style_plan, on_tile, engine=engine))
        x_content = images.preprocess(content)
        content_feats = engine.features(x_content, list(st.content_weights)) if plan is None else \
            tiling.tiled_features(engine, x_content, list(st.content_weights), plan, on_tile)
        del x_content
        return Objective(
            content_weights=st.content_weights, style_weights=st.style_weights, ratio=float(self.options["ratio"]),
            content_targets=content_feats,
            style_targets={layer: np.stack([g[layer] for g in grams]) for layer in st.style_weights},
            style_blend=self.blend, tv_weight=self.options["tv_weight"], **self._temporal_fields(content))

    def _bound(self, engine: Engine, objective: Objective,
               plan: tiling.TilePlan | None) -> Callable[[np.ndarray], Evaluation]:
        """The objective on `engine`, counted and timed for the progress and the report."""
        from style_transfer import tiling

        clock = self._clock
        assert clock is not None
        evaluator = engine.bind(objective) if plan is None else \
            tiling.TiledEvaluator(engine, objective, plan, self._tile)

        def evaluate(image: np.ndarray) -> Evaluation:
            self.evaluations += 1
            result = evaluator.evaluate(image)
            clock.evaluation_done()
            self._tell()
            return result

        return evaluate

    def _temporal_fields(self, content: np.ndarray) -> dict[str, Any]:
        """The Objective's temporal fields at this scale's size (the target and mask resized for coarse scales)."""
        if self.temporal is None:
            return {}
        h, w = content.shape[:2]
        rgb, mask = self.temporal.rgb, self.temporal.mask
        if rgb.shape[:2] != (h, w):
            rgb = images.resize_to(rgb, h, w)
            mask = images.resize_to(np.repeat(mask[..., None], 3, axis=2), h, w)[..., 0]
        return {"temporal_weight": float(self.temporal.weight), "temporal_target": images.preprocess(rgb),
                "temporal_mask": np.asarray(mask, dtype=np.float32)}

    def _report(self, x: np.ndarray, evaluation: Evaluation | None, iterations: int, seconds: float,
                stop_reason: str) -> dict[str, Any]:
        st = self.transfer
        # Without an evaluation (a second Ctrl-C cut it) every score is None.
        scores = {k: getattr(evaluation, k, None) for k in ("loss", "style_loss", "content_loss", "tv_loss", "layers")}
        if self.temporal is not None:  # video frames only: still-image reports keep their keys
            scores["temporal_loss"] = getattr(evaluation, "temporal_loss", None)
        return {
            "engine": st.options["engine"],
            "model": st.model,
            "iterations": iterations,
            "device": st.engine.device,
            "precision": self.precision,
            "width": int(x.shape[2]),
            "height": int(x.shape[1]),
            "evaluations": self.evaluations,
            **scores,
            "seconds": seconds,
            "setup_seconds": st.take_setup_seconds(),
            "seconds_per_evaluation": seconds / self.evaluations if self.evaluations else None,
            "scales": [{"length": length, "iterations": n,
                        "tiling": self.tilings[i] if i < len(self.tilings) else None}
                       for i, (length, n) in enumerate(self.plan)],
            "tiling": self.tilings[-1] if self.tilings else None,
            "stop_reason": stop_reason,
            "seed": self.seed,
        }


class StyleTransfer:
    """A Caffe net on an engine, with the layers and weights of the style and content terms.

    Keyword arguments are the "model" options of options.py (model, gpu, weights, prototxt, models_dir,
    style_layers, content_layers, pooling, engine, precision, verbose, download_missing)."""

    def __init__(self, model: str | None = None, **options: Any) -> None:
        started = time.perf_counter()
        opts = self.options = check_all("model", {**options, **({"model": model} if model is not None else {})})
        self.notices: list[str] = []
        prototxt, weights = opts["prototxt"], opts["weights"]
        if prototxt is None:
            info = get_model(opts["model"])
            self.model, prototxt = opts["model"], info.prototxt
            if not weights:
                from style_transfer.download import ensure_model

                weights = ensure_model(opts["model"], opts["models_dir"], opts["download_missing"])
            default_style, default_content = info.style_layers, info.content_layers
        else:
            if weights is None:
                raise ModelError("--prototxt needs --weights (the caffemodel for that net)")
            if opts["style_layers"] is None or opts["content_layers"] is None:
                raise ModelError("--prototxt needs --style-layers and --content-layers (which blobs to use)")
            self.model = Path(prototxt).stem
            default_style, default_content = {}, {}
        self.style_weights = dict(default_style) if opts["style_layers"] is None else \
            parse_layer_weights(opts["style_layers"], "--style-layers")
        self.content_weights = dict(default_content) if opts["content_layers"] is None else \
            parse_layer_weights(opts["content_layers"], "--content-layers")
        self.blobs = list(dict.fromkeys([*self.style_weights, *self.content_weights]))  # what the objective reads
        self.net = load_net(Path(prototxt), Path(weights), self.blobs, opts["pooling"])
        auto = opts["precision"] == "auto"
        self.engine, notice = create_engine(opts["engine"], self.net, opts["pooling"], opts["gpu"], opts["verbose"],
                                            "fp32" if auto else opts["precision"])
        if notice:
            self.notices.append(notice)
        # `--precision auto` where bf16 has fast kernels: a bf16 twin of the engine, made when a scale first uses it.
        self.bf16_pays = auto and self.engine.name == "torch" and fast_bf16(self.engine.device)
        self._fast_engine: Engine | None = None
        if opts["precision"] == "fp16" and self.engine.device == "cpu":
            self.notices.append("--precision fp16 has no fast kernels on the CPU and runs several times slower than "
                                "fp32; use bf16 or fp32 there")
        self._setup_seconds = time.perf_counter() - started

    @property
    def fast_engine(self) -> Engine | None:
        """The bf16 twin of the engine that `--precision auto` optimises on, or None where bf16 does not pay."""
        if self.bf16_pays and self._fast_engine is None:
            self._fast_engine = create_engine("torch", self.net, self.options["pooling"], self.options["gpu"], False,
                                              "bf16")[0]
        return self._fast_engine

    def take_setup_seconds(self) -> float:
        """Seconds spent loading the net, counted once: by the first run's report."""
        seconds, self._setup_seconds = self._setup_seconds, 0.0
        return seconds

    def style_grams(self, style: np.ndarray, plan: tiling.TilePlan | None = None,
                    on_tile: tiling.OnTile | None = None, *, engine: Engine | None = None) -> dict[str, np.ndarray]:
        """The Gram matrix of each style blob for an RGB style image, by `engine` (default: the engine); tile by
        tile when a plan is given."""
        from style_transfer import tiling
        from style_transfer.losses import gram_numpy

        engine = engine or self.engine
        if plan is not None:
            return tiling.tiled_grams(engine, images.preprocess(style), list(self.style_weights), plan, on_tile)
        feats = engine.features(images.preprocess(style), list(self.style_weights))
        return {k: gram_numpy(v) for k, v in feats.items()}

    def stylize(self, content: np.ndarray, styles: Sequence[np.ndarray], *, temporal: TemporalTarget | None = None,
                **options: Any) -> Stylization:
        """Prepare a run on RGB images (H x W x 3 in [0, 1]); keyword arguments are the "run" options of
        options.py. Everything is checked here, before any work: sizes at every scale included. `temporal` adds
        the video's temporal term (style_transfer/video)."""
        started = time.perf_counter()
        if not styles:
            raise StyleTransferError("at least one style image is needed")
        opts = check_all("run", options)
        weights = opts["style_weights"]
        if weights is not None and len(weights) != len(styles):
            raise StyleTransferError(f"--style-weights: {len(styles)} style image(s) but {len(weights)} weight(s)")
        blend = np.ones(len(styles)) if weights is None else np.asarray(weights, dtype=np.float64)
        if blend.sum() <= 0:
            raise StyleTransferError(f"--style-weights: need {len(styles)} non-negative weights with a positive sum")
        blend = blend / blend.sum()
        plan = scale_plan(opts["length"], opts["scales"], opts["min_length"], opts["num_iters"])
        check_sizes(content, styles, plan, opts["style_scale"])
        if temporal is not None:
            final = images.long_side_size(content.shape[0], content.shape[1], plan[-1][0])
            if temporal.rgb.shape != (*final, 3) or temporal.mask.shape != final:
                raise StyleTransferError(f"the temporal target {temporal.rgb.shape[:2]} and mask "
                                         f"{temporal.mask.shape} must be the output size {final}")
        kind = init_kind(opts["init"])
        if kind == "file":
            if not Path(opts["init"]).exists():
                raise StyleTransferError(f"{BY_NAME['init'].label} must be content, mixed, a number or an existing "
                                         f"image file, got {str(opts['init'])!r}")
            opts["init"] = images.load_image(opts["init"], max_pixels=opts["max_pixels"])
        elif kind == "noise":
            opts["init"] = float(opts["init"])
        seed = opts["seed"] if opts["seed"] is not None else secrets.randbits(32)
        self._setup_seconds += time.perf_counter() - started
        return Stylization(self, np.asarray(content, dtype=np.float32), list(styles), blend, plan, opts, seed,
                           notices=list(self.notices), temporal=temporal)
