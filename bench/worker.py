"""One engine in its own process, timed one evaluation at a time on request.

Separate processes give each engine its own peak RSS and its own process-wide settings (threads, allocator, Caffe's
global state), and let the driver alternate engines evaluation by evaluation, so that a machine shared with other
jobs slows every variant alike. The protocol is one JSON object per line; the worker's stdout is moved to stderr so
that library output (Caffe's logging, warnings) cannot corrupt it.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import IO, Any

from bench.weights import REPO

Message = dict[str, Any]


def _rusage() -> resource.struct_rusage:
    return resource.getrusage(resource.RUSAGE_SELF)


def _make_engine(config: Message) -> Any:
    """The engine the config names: "torch" (with optional tuning), "torch-rev:<git rev>" (the torch engine as it
    was at that commit, for before/after figures) or any name `create_engine` knows."""
    from bench.common import build_net
    from style_transfer.engines import create_engine

    name = config["engine"]
    gpu = int(config.get("gpu", -1))
    net, _kind = build_net(config["model"], config.get("pooling", "avg"))
    if name == "torch" and (config.get("tuning") is not None or config.get("precision", "fp32") != "fp32"):
        from style_transfer.engines.torch import TorchEngine, Tuning, resolve_device

        device, _ = resolve_device(gpu)
        raw = config.get("tuning")
        tuning = Tuning.plain() if raw == "plain" else Tuning(**raw) if raw else Tuning()
        return TorchEngine(net, config.get("pooling", "avg"), device, precision=config.get("precision", "fp32"),
                           tuning=tuning)
    if name.startswith("torch-rev:"):
        module = _module_at_revision(name.split(":", 1)[1], "style_transfer/engines/torch.py")
        device, _ = module.resolve_device(gpu)
        return module.TorchEngine(net, config.get("pooling", "avg"), device)
    engine, _notice = create_engine(name, net, config.get("pooling", "avg"), gpu)
    return engine


def _module_at_revision(rev: str, path: str) -> Any:
    import importlib.util
    import tempfile

    source = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:{path}"], capture_output=True, text=True,
                            check=True).stdout
    folder = tempfile.mkdtemp(prefix="bench-rev-")
    file = os.path.join(folder, "engine_at_rev.py")
    with open(file, "w") as fh:
        fh.write(source)
    spec = importlib.util.spec_from_file_location("engine_at_rev", file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def serve(inbox: IO[str], outbox: IO[str]) -> None:
    def send(message: Message) -> None:
        outbox.write(json.dumps(message) + "\n")
        outbox.flush()

    config = json.loads(inbox.readline())
    # Settings that libraries read once, when torch loads them (OpenMP's spin count, for one): before any import.
    os.environ.update({str(k): str(v) for k, v in config.get("env", {}).items()})
    if config.get("style_env"):
        from style_transfer.openmp import prefer_short_spin

        # What style.py sets for this net and engine (the engine name without a "torch-rev:" suffix).
        prefer_short_spin([config["model"]], str(config["engine"]).split("-rev:")[0])
    if config.get("threads") or config.get("mkldnn") is False:
        import torch

        if config.get("threads"):
            torch.set_num_threads(int(config["threads"]))
        if config.get("mkldnn") is False:
            torch.backends.mkldnn.enabled = False  # type: ignore[assignment]
    rss_before = _rusage().ru_maxrss
    try:
        from bench.common import build_case

        engine = _make_engine(config)
        case = build_case(config["model"], config["engine"], int(config["length"]),
                          pooling=config.get("pooling", "avg"), engine=engine)
    except Exception as exc:
        send({"status": "unavailable", "reason": f"{type(exc).__name__}: {exc}".splitlines()[0][:300],
              "traceback": traceback.format_exc()})
        return
    cuda = str(getattr(engine, "device", "")).startswith("cuda")
    sync = _cuda_sync if cuda else (lambda: None)
    for _ in range(int(config.get("warmup", 2))):
        case.evaluate(case.x0)
    sync()
    send({"status": "ready", "height": case.height, "width": case.width, "weights": case.weights_kind,
          "device": str(getattr(engine, "device", "?")), "threads": _threads()})
    for line in inbox:
        command = json.loads(line)
        if command["do"] == "evaluate":
            r0, c0, t0 = _rusage(), time.process_time(), time.perf_counter()
            ev = case.evaluate(case.x0)
            sync()
            t1, c1, r1 = time.perf_counter(), time.process_time(), _rusage()
            send({"wall": t1 - t0, "cpu": c1 - c0, "minflt": r1.ru_minflt - r0.ru_minflt, "loss": ev.loss})
        elif command["do"] == "quit":
            stats: Message = {"peak_rss_mb": _rusage().ru_maxrss / 1024,
                              "rss_before_mb": rss_before / 1024}
            if cuda:
                import torch

                stats["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
            send(stats)
            return


def _cuda_sync() -> None:
    import torch

    torch.cuda.synchronize()


def _threads() -> int:
    import torch

    return int(torch.get_num_threads())


@dataclass
class Worker:
    """The driver's handle on a worker process."""

    config: Message
    info: Message = field(default_factory=dict)
    process: subprocess.Popen[str] | None = None

    def start(self) -> Message:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        self.process = subprocess.Popen([sys.executable, "-m", "bench.worker"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=None if self.config.get("verbose") else
                                        subprocess.DEVNULL, text=True, cwd=str(REPO), env=env)
        self.info = self._ask(self.config)
        if self.info.get("status") != "ready":
            self.process.wait()
        return self.info

    @property
    def ready(self) -> bool:
        return self.info.get("status") == "ready"

    def evaluate(self) -> Message:
        return self._ask({"do": "evaluate"})

    def close(self) -> Message:
        stats = self._ask({"do": "quit"}) if self.ready else {}
        if self.process is not None:
            self.process.wait()
        return stats

    def _ask(self, message: Message) -> Message:
        assert self.process is not None and self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(message) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            code = self.process.wait()
            return {"status": "unavailable", "reason": f"worker exited with code {code}"}
        return dict(json.loads(line))


def main() -> None:
    # Keep the protocol on a private descriptor; anything else written to stdout goes to stderr.
    protocol = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    serve(sys.stdin, protocol)


if __name__ == "__main__":
    main()
