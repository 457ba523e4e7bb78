"""One torch-engine evaluation layer by layer, forward and backward, against the sgemm floor and the fp32 peak.

    .venv/bin/python -m bench.profile_layers --model vgg19 --length 512 --repeats 5
    .venv/bin/python -m bench.profile_layers --variant channels_last --variant bf16 ...

The evaluation is the engine's own (its layers, its loss code, its backward through autograd), run step by step with
a clock around each piece: every layer's forward, the style and content terms with their feature gradients, every
autograd node of the backward pass (timed by hooks on the node itself, which fire when the node starts and when it
ends), and the copy of the gradient to NumPy. On the CPU every torch operation returns when its work is done, so the
clocks need no synchronisation. The instrumented evaluation is checked against the engine's plain `evaluate` (same
loss, and their times side by side).

Each convolution's time is set against its FLOPs at the floor rate (the median sgemm throughput measured in the
probe's own process, OpenBLAS unpinned: bench/floor.py) and at the fp32 peak, forward and backward apart; the rest
(ReLU, pooling, the loss terms, conversions) has no FLOPs that count and shows as time only.

`--variant` runs the same profile for engine settings the engine already has (bench/torch_variants.py's
`ENGINE_VARIANTS`); each variant is profiled in a process of its own, since some settings are read once per process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench.weights import REPO

RESULTS = REPO / "bench" / "results"


def profile(model: str, length: int, repeats: int, warmup: int, variant: str) -> dict[str, Any]:
    """Per-piece seconds (median over `repeats` instrumented evaluations) for one engine variant in this process."""
    import numpy as np
    import torch

    from bench.common import build_case, build_net
    from bench.torch_variants import ENGINE_VARIANTS
    from style_transfer.engines.torch import TorchEngine, Tuning, _last_needed
    from style_transfer.losses import terms_and_feature_grads

    spec = ENGINE_VARIANTS[variant]
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    if spec.get("mkldnn") is False:
        torch.backends.mkldnn.enabled = False  # type: ignore[assignment]
    net, _kind = build_net(model)
    engine = TorchEngine(net, "avg", tuning=Tuning(**spec.get("tuning", {})), precision=spec.get("precision", "fp32"))
    case = build_case(model, "torch", length, engine=engine)
    evaluator: Any = case.evaluate
    obj = evaluator.objective
    targets = evaluator.targets
    for _ in range(warmup):
        evaluator.evaluate(case.x0)

    def instrumented() -> tuple[dict[str, float], float]:
        times: dict[str, float] = defaultdict(float)
        starts: dict[int, float] = {}
        names: dict[int, str] = {}

        def pre(node: Any, _grad_outputs: Any) -> None:
            starts[id(node)] = time.perf_counter()

        def post(node: Any, _grad_inputs: Any, _grad_outputs: Any) -> None:
            times[f"bwd:{names[id(node)]}"] += time.perf_counter() - starts[id(node)]

        t_start = time.perf_counter()
        x = engine._tensor(case.x0)
        x.requires_grad_(True)
        with engine._running():
            x_in = engine._input(x)
            times["input"] = time.perf_counter() - t_start
            values: dict[str, torch.Tensor] = {engine.net.input_name: x_in}
            wanted = set(obj.layers)
            last = _last_needed(engine._ops, wanted)
            ops = engine._ops[: last + 1]
            last_read = {b: i for i, op in enumerate(ops) for b in op.layer.bottoms}
            for i, op in enumerate(ops):
                t0 = time.perf_counter()
                result = op.run([values[b] for b in op.layer.bottoms])
                times[f"fwd:{op.layer.name}"] += time.perf_counter() - t0
                node = result.grad_fn
                if node is not None and id(node) not in names:
                    names[id(node)] = op.layer.name
                    node.register_prehook(lambda g, n=node: pre(n, g))
                    node.register_hook(lambda gi, go, n=node: post(n, gi, go))
                for b in op.layer.bottoms:
                    if last_read.get(b) == i and b not in wanted and b not in op.layer.tops:
                        values.pop(b, None)
                for top in op.layer.tops:
                    values[top] = result
            feats = {b: values[b] for b in obj.layers}
        t0 = time.perf_counter()
        terms, feature_grads = terms_and_feature_grads(obj, targets, feats, engine.dtype)
        roots, grads = [feats[b] for b in feature_grads], list(feature_grads.values())
        times["loss terms and feature gradients"] = time.perf_counter() - t0
        del feats, values
        t0 = time.perf_counter()
        (grad,) = torch.autograd.grad(roots, x, [g.to(r.dtype) for r, g in zip(roots, grads, strict=True)])
        times["backward, total"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = grad.detach().to(engine.dtype).contiguous().cpu().numpy()
        times["gradient to NumPy"] = time.perf_counter() - t0
        times["evaluation, total"] = time.perf_counter() - t_start
        assert out.shape == case.x0.shape
        return dict(times), float(sum(terms.values()))

    runs, plain = [], []
    loss = plain_loss = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        plain_loss = float(evaluator.evaluate(case.x0).loss)
        plain.append(time.perf_counter() - t0)
        timed, loss = instrumented()
        runs.append(timed)
    keys = list(dict.fromkeys(k for r in runs for k in r))
    median = {k: statistics.median(r.get(k, 0.0) for r in runs) for k in keys}
    return {"model": model, "length": length, "variant": variant, "height": case.height, "width": case.width,
            "threads": torch.get_num_threads(), "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
            "seconds": median, "plain_evaluation_seconds": statistics.median(plain),
            "instrumented_loss": loss, "plain_loss": plain_loss, "loss_rel_diff": abs(loss - plain_loss) / plain_loss,
            "repeats": repeats, "spec": {k: v for k, v in spec.items()}, "numpy": np.__version__}


def table(result: dict[str, Any], floor_gflops: float, peak_gflops: float) -> str:
    """Markdown: each convolution forward and backward against its FLOPs at the floor; other pieces as time."""
    from bench.flops import count_model

    secs: dict[str, float] = result["seconds"]
    work = {w.name: w for w in count_model(result["model"], result["height"], result["width"]).layers
            if w.kind == "conv"}
    total = secs["evaluation, total"]
    lines = ["| piece | fwd ms | fwd GFLOP/s | bwd ms | bwd GFLOP/s | fwd+bwd ms | at floor ms | x floor | "
             "x peak | share of eval |", "|---|---|---|---|---|---|---|---|---|---|"]
    conv_ms = conv_floor = 0.0
    other: dict[str, float] = defaultdict(float)
    for key, value in secs.items():
        if not key.startswith("fwd:"):
            continue
        name = key[4:]
        fwd, bwd = value, secs.get(f"bwd:{name}", 0.0)
        if name in work:
            w = work[name]
            floor_ms = 2 * (w.forward_macs + w.backward_macs) / (floor_gflops * 1e9) * 1e3
            peak_ms = 2 * (w.forward_macs + w.backward_macs) / (peak_gflops * 1e9) * 1e3
            both = (fwd + bwd) * 1e3
            conv_ms += both
            conv_floor += floor_ms
            bwd_rate = f"{2 * w.backward_macs / bwd / 1e9:.0f}" if bwd else "-"
            lines.append(f"| {name} | {fwd * 1e3:.1f} | {2 * w.forward_macs / fwd / 1e9:.0f} | {bwd * 1e3:.1f} | "
                         f"{bwd_rate} | {both:.1f} | {floor_ms:.1f} | {both / floor_ms:.2f} | {both / peak_ms:.2f} | "
                         f"{both / 1e3 / total:.1%} |")
        else:
            kind = name.split("_")[0].rstrip("0123456789") or name
            other[kind] += fwd + bwd
    lines.append(f"| all convolutions | | | | | {conv_ms:.1f} | {conv_floor:.1f} | {conv_ms / conv_floor:.2f} | "
                 f"{conv_ms / conv_floor * peak_gflops / floor_gflops:.2f} | {conv_ms / 1e3 / total:.1%} |")
    for kind, value in sorted(other.items()):
        lines.append(f"| {kind} layers (fwd+bwd) | | | | | {value * 1e3:.1f} | | | | {value / total:.1%} |")
    tracked_bwd = sum(v for k, v in secs.items() if k.startswith("bwd:"))
    rest = {
        "loss terms and feature gradients": secs["loss terms and feature gradients"],
        "backward outside the layers' nodes": secs["backward, total"] - tracked_bwd,
        "input and gradient to NumPy": secs["input"] + secs["gradient to NumPy"],
    }
    for k, v in rest.items():
        lines.append(f"| {k} | | | | | {v * 1e3:.1f} | | | | {v / total:.1%} |")
    lines.append(f"| evaluation, instrumented | | | | | {total * 1e3:.1f} | {conv_floor:.1f} | "
                 f"{total * 1e3 / conv_floor:.2f} | {total * 1e3 / conv_floor * peak_gflops / floor_gflops:.2f} | |")
    lines.append(f"| evaluation, the engine's own | | | | | {result['plain_evaluation_seconds'] * 1e3:.1f} | "
                 f"{conv_floor:.1f} | {result['plain_evaluation_seconds'] * 1e3 / conv_floor:.2f} | | |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vgg19")
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--variant", action="append", help="engine variants to profile (default: the engine's own)")
    ap.add_argument("--no-style-env", action="store_true", help="without style.py's OpenMP setting")
    ap.add_argument("--json", type=Path, default=RESULTS / "profile-layers.json")
    ap.add_argument("--render", type=Path, metavar="JSON", help="print the tables of a saved profile and stop")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # (internal) profile this variant here and print JSON
    args = ap.parse_args()
    if args.one:
        if not args.no_style_env:
            from style_transfer.openmp import prefer_short_spin

            prefer_short_spin([args.model], "torch")  # as style.py does, before torch loads
        from bench.torch_variants import ENGINE_VARIANTS

        os.environ.update(ENGINE_VARIANTS[args.one].get("env", {}))
        print(json.dumps(profile(args.model, args.length, args.repeats, args.warmup, args.one)))
        return
    if args.render:
        saved = json.loads(args.render.read_text())
        for result in saved["variants"]:
            print(f"\n### {result['variant']}\n")
            print(table(result, saved["floor_gflops"], saved["peak"]["gflops"]))
        return
    from dataclasses import asdict

    from bench.common import machine
    from bench.floor import SgemmProbe, fp32_peak

    info = machine()
    peak = fp32_peak()
    results = []
    throughputs = []
    with SgemmProbe() as probe:
        for name in args.variant or ["default"]:
            throughputs.append(probe.measure().throughput / 1e9)
            command = [sys.executable, "-m", "bench.profile_layers", "--one", name, "--model", args.model,
                       "--length", str(args.length), "--repeats", str(args.repeats), "--warmup", str(args.warmup)]
            if args.no_style_env:
                command.append("--no-style-env")
            done = subprocess.run(command, capture_output=True, text=True, cwd=str(REPO))
            if done.returncode != 0:
                print(f"{name} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
                continue
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
            throughputs.append(probe.measure().throughput / 1e9)
        probe_info = probe.info
    floor = statistics.median(throughputs)
    info["load_average_end"] = machine()["load_average"]
    payload = {"machine": info, "peak": {**asdict(peak), "gflops": peak.flops / 1e9}, "probe": probe_info,
               "floor_gflops": floor, "sgemm_gflops": throughputs, "variants": results}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(payload, indent=1))
    print(f"floor {floor:.0f} GFLOP/s (sgemm, median of {len(throughputs)}), peak {peak.flops / 1e9:.0f} GFLOP/s; "
          f"load {info['load_average']} -> {info['load_average_end']}")
    for result in results:
        print(f"\n### {result['variant']} (instrumented loss within {result['loss_rel_diff']:.1e} of the engine's)\n")
        print(table(result, floor, peak.flops / 1e9))


if __name__ == "__main__":
    main()
