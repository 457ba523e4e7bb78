"""What each speed choice of the torch engine buys: the engine with its choices switched on one at a time.

    .venv/bin/python -m bench.torch_variants --model vgg19 --length 512 --repeats 7

Every variant runs in its own worker process (process-wide settings such as the allocator's cannot be undone), and
the driver alternates them evaluation by evaluation with an sgemm probe per round, as bench/evaluations.py does.
The first row is the engine as first committed (`--baseline-rev`), the second the same formulation through the
current code with every choice off (`Tuning.plain()`); then the choices are added cumulatively, and finally each is
left out of the full set once, which shows what it is worth in the company of the others.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.common import machine
from bench.evaluations import Group, markdown, probe_summary, run_group, save
from bench.floor import SgemmProbe, fp32_peak
from bench.weights import REPO
from style_transfer.engines.torch import Tuning

BASELINE_REV = "c02fa92"
# Cumulative order: the allocator first, since every later measurement is cleaner without page faults. Winograd
# convolutions need NCHW, so the last step hands the layout back to the engine's choice.
STEPS: list[tuple[str, dict[str, Any]]] = [
    ("keep_freed_memory", {"keep_freed_memory": True}),
    ("channels_last", {"channels_last": True}),
    ("inplace_relu", {"inplace_relu": True}),
    ("manual_loss_grad", {"manual_loss_grad": True}),
    ("winograd", {"winograd": True, "channels_last": None}),
]
# Each choice left out of the engine's defaults once.
LEAVE_OUT: list[tuple[str, dict[str, Any]]] = [
    ("keep_freed_memory", {"keep_freed_memory": False}),
    ("inplace_relu", {"inplace_relu": False}),
    ("manual_loss_grad", {"manual_loss_grad": False}),
    ("winograd", {"winograd": False}),
    ("winograd, NCHW kept", {"winograd": False, "channels_last": False}),
]


# Candidates of issue 15 that need no change to the engine: its existing switches, precision, threads and OpenMP's
# waiting policy. Each is a worker config for run_group (and a profile for bench/profile_layers.py). "default" is
# the engine as style.py runs it; every worker also gets style.py's environment (the short spin for VGG) unless
# its own env sets the variable first.
ENGINE_VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    # oneDNN for every layer, channels-last (NHWC) activations: no Winograd.
    "channels_last": {"tuning": {"channels_last": True, "winograd": False}},
    # oneDNN for every layer in NCHW.
    "nchw": {"tuning": {"channels_last": False, "winograd": False}},
    # Convolutions in bfloat16 under autocast (oneDNN; AMX or AVX512-BF16 where the CPU has them), Gram matrices
    # and losses in float32.
    "bf16": {"precision": "bf16"},
    # libgomp's default spin (style.py shortens it for VGG), and no spin at all.
    "spin_default": {"env": {"GOMP_SPINCOUNT": "300000"}},
    "spin_passive": {"env": {"OMP_WAIT_POLICY": "PASSIVE"}},
    "channels_last_spin_default": {"tuning": {"channels_last": True, "winograd": False},
                                   "env": {"GOMP_SPINCOUNT": "300000"}},
    "one_thread": {"threads": 1},
}


def candidate_configs(names: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """Worker configs (bench/worker.py) for ENGINE_VARIANTS by name."""
    out: list[tuple[str, dict[str, Any]]] = []
    for name in names:
        spec = ENGINE_VARIANTS[name]
        config: dict[str, Any] = {"engine": "torch", "env": dict(spec.get("env", {}))}
        if "tuning" in spec:
            config["tuning"] = {**asdict(Tuning()), **spec["tuning"]}
        for key in ("precision", "threads", "mkldnn"):
            if key in spec:
                config[key] = spec[key]
        out.append((name, config))
    return out


def variants(baseline_rev: str | None, leave_one_out: bool) -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    if baseline_rev:
        out.append((f"as of {baseline_rev}", {"engine": f"torch-rev:{baseline_rev}"}))
    current = asdict(Tuning.plain())
    out.append(("plain", {"engine": "torch", "tuning": dict(current)}))
    for label, change in STEPS:
        current.update(change)
        out.append((f"+ {label}", {"engine": "torch", "tuning": dict(current)}))
    if leave_one_out:
        defaults = asdict(Tuning())
        for label, change in LEAVE_OUT:
            out.append((f"all but {label}", {"engine": "torch", "tuning": {**defaults, **change}}))
        out.append(("all, mkldnn off", {"engine": "torch", "tuning": defaults, "mkldnn": False}))
    # OpenMP threads that spin after a parallel region take the cores NNPACK's own thread pool needs next; a
    # shorter spin (read by libgomp when torch loads, so it cannot be set by the engine) gives them back sooner.
    out.append(("all", {"engine": "torch"}))  # the engine's defaults, as style.py runs it
    out.append(("all, GOMP_SPINCOUNT=10000", {"engine": "torch", "env": {"GOMP_SPINCOUNT": "10000"}}))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vgg19")
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--baseline-rev", default=BASELINE_REV, help="git revision of the original engine ('' to skip)")
    ap.add_argument("--leave-one-out", action="store_true")
    ap.add_argument("--only", nargs="*", help="run only the variants with these labels")
    ap.add_argument("--candidates", nargs="*", choices=list(ENGINE_VARIANTS),
                    help="run these ENGINE_VARIANTS side by side instead of the cumulative steps")
    ap.add_argument("--reference", default="plain", help="row label the last column compares with")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in every worker (0: the engine's choice)")
    ap.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "torch_variants.json")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    chosen = candidate_configs(args.candidates) if args.candidates else \
        variants(args.baseline_rev or None, args.leave_one_out)
    if args.only:
        chosen = [v for v in chosen if v[0] in args.only]
    if args.threads:
        chosen = [(label, {**config, "threads": args.threads}) for label, config in chosen]
    info = machine()
    peak = fp32_peak()
    with SgemmProbe() as probe:
        group: Group = run_group(args.model, args.length, chosen, args.repeats, args.warmup, verbose=args.verbose,
                                 probe=probe, peak=peak)
        extra = {"machine": info, "peak": {**asdict(peak), "gflops": peak.flops / 1e9}, "probe": probe.info}
    info["load_average_end"] = machine()["load_average"]
    save(args.json, [group], extra)
    print("Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    print(probe_summary([group], extra))
    print()
    print(markdown([group], reference=args.reference))


if __name__ == "__main__":
    main()
