"""The two denominators of the per-evaluation tables: the machine's float32 sgemm throughput and its float32 peak.

    .venv/bin/python -m bench.floor            # both, printed as JSON

**The sgemm floor.** A matrix product of 3072 x 3072 float32 matrices (NumPy's BLAS and torch's, the faster counts)
measured in a child process of its own whose environment lacks OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE. A machine
may set those to pin OpenBLAS to an older kernel (Haswell's AVX2 instead of SkylakeX's AVX-512) for every process;
the floor is what the hardware does, so the probe's process alone drops them, and the parent, the workers being
timed, the tests and CI keep the environment they were given. The child reports which kernel ran (threadpoolctl:
internal_api, architecture, num_threads, version).

**The fp32 peak.** cores x FMA units per core x vector lanes x 2 FLOP x clock, every factor recorded with where it
came from:
- cores: the CPUs this process may run on, counted once per physical core;
- vector lanes: 16 float32 lanes with AVX-512F, 8 with AVX2 + FMA, from /proc/cpuinfo's flags;
- FMA units: not reported by CPUID or the kernel, and SKUs of one family differ (some Xeons have one 512-bit FMA
  unit per core, others two; AMD's Zen 4 executes a 512-bit FMA as two 256-bit halves). So they are measured: twelve
  independent chains of 512-bit (or 256-bit) FMAs per core, timed against a chain of dependent register additions
  (one per cycle on every x86 core: the clock), give FMAs per cycle; rounded, that is the unit count;
- clock: /proc/cpuinfo's "cpu MHz" (in a virtual machine often the nominal or TSC rate) and lscpu's "CPU max MHz"
  when the kernel exposes it. Cores may run faster than that (turbo), and slower while executing 512-bit FMAs
  (Intel's AVX-512 frequency licence), so the clock the FMA units actually ran at is measured too: the FMA rate
  over the unit count. The highest of these is used, since a peak must bound the measured rates from above. The
  scalar clock of the addition chain is reported beside it.
`nominal_flops` is the same product at /proc/cpuinfo's clock alone.
The micro-benchmarks are a small C program compiled with the system's C compiler into the bench cache, run on all
cores at once (one process pinned to each), best of 20 repeats; without a compiler the FMA units come from
--fma-units and the clock from /proc/cpuinfo alone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from bench.weights import CACHE, REPO

PROBE_SIZE = 3072
# Variables a machine may set to pin OpenBLAS's kernel or its cache blocking; dropped in the probe's process only.
PINNING_VARIABLES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def probe_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for the probe's child process: the given one (the caller's by default) without the
    variables that pin OpenBLAS's kernel. The caller's own environment is not touched."""
    env = dict(os.environ if base is None else base)
    for name in PINNING_VARIABLES:
        env.pop(name, None)
    return env


@dataclass
class Probe:
    wall: float
    cpu: float
    flops: float
    source: str

    @property
    def throughput(self) -> float:
        return self.flops / self.wall

    @property
    def cpu_throughput(self) -> float:
        """FLOPs per CPU-second (all threads together)."""
        return self.flops / self.cpu


def kernel_info() -> list[dict[str, Any]]:
    """What threadpoolctl sees loaded in this process: each BLAS and OpenMP library with its kernel and threads."""
    from threadpoolctl import threadpool_info

    keep = ("user_api", "internal_api", "architecture", "num_threads", "version", "threading_layer", "prefix")
    return [{k: info.get(k) for k in keep if k in info} for info in threadpool_info()]


def _serve(inbox: IO[str], outbox: IO[str], n: int, gpu: int) -> None:
    """The probe's side: warm up, say which kernels are loaded, then measure once per request."""
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    device = torch.device("cuda", gpu) if gpu >= 0 else torch.device("cpu")
    ta, tb = torch.from_numpy(a).to(device), torch.from_numpy(b).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    flops = 2.0 * n**3

    def measure() -> list[Probe]:
        probes = []
        if device.type == "cpu":
            c0, t0 = time.process_time(), time.perf_counter()
            np.matmul(a, b)
            probes.append(Probe(time.perf_counter() - t0, time.process_time() - c0, flops, "numpy"))
        sync()
        c0, t0 = time.process_time(), time.perf_counter()
        torch.mm(ta, tb)
        sync()
        probes.append(Probe(time.perf_counter() - t0, time.process_time() - c0, flops, "torch"))
        return probes

    measure()  # warm-up: thread pools, page faults
    outbox.write(json.dumps({"kernels": kernel_info(), "torch_threads": torch.get_num_threads(),
                             "pinning": {k: os.environ.get(k) for k in PINNING_VARIABLES}}) + "\n")
    outbox.flush()
    for line in inbox:
        if json.loads(line).get("do") != "measure":
            return
        outbox.write(json.dumps([asdict(p) for p in measure()]) + "\n")
        outbox.flush()


class SgemmProbe:
    """The machine's float32 matmul throughput right now, measured in a child process with OpenBLAS unpinned."""

    def __init__(self, n: int = PROBE_SIZE, gpu: int = -1) -> None:
        env = probe_environment()
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        self.process = subprocess.Popen([sys.executable, "-m", "bench.floor", "serve", "--n", str(n), "--gpu",
                                         str(gpu)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                        cwd=str(REPO), env=env)
        self.info: dict[str, Any] = dict(json.loads(self._read()))
        self.info["parent_pinning"] = {k: os.environ.get(k) for k in PINNING_VARIABLES}
        self.history: list[list[Probe]] = []

    def _read(self) -> str:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the sgemm probe exited with code {self.process.wait()}")
        return line

    def measure_all(self) -> list[Probe]:
        """One measurement of each source (NumPy, torch)."""
        assert self.process.stdin is not None
        self.process.stdin.write('{"do": "measure"}\n')
        self.process.stdin.flush()
        probes = [Probe(**p) for p in json.loads(self._read())]
        self.history.append(probes)
        return probes

    def measure(self) -> Probe:
        """The faster source's measurement."""
        return min(self.measure_all(), key=lambda p: p.wall)

    def close(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.write('{"do": "quit"}\n')
            self.process.stdin.flush()
            self.process.wait()

    def __enter__(self) -> SgemmProbe:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


# A chain of dependent register additions (one per cycle on any x86 core: the clock) and twelve independent chains
# of FMAs (enough to cover the FMA latency on two units: FMAs per cycle). Register-to-register additions, because
# some cores fold additions of an immediate at rename and would run them faster than one per cycle.
_MICRO_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
static double adds_per_second(long n) {
  double t0 = now(); long x = 0;
  __asm__ volatile("mov %1, %%rcx\n mov $1, %%rdx\n 1:\n"
    "add %%rdx, %0\n add %%rdx, %0\n add %%rdx, %0\n add %%rdx, %0\n"
    "add %%rdx, %0\n add %%rdx, %0\n add %%rdx, %0\n add %%rdx, %0\n"
    "sub $8, %%rcx\n jnz 1b\n" : "+r"(x) : "r"(n) : "rcx", "rdx", "cc");
  return n / (now() - t0);
}
#define FMA12(R) \
  "vfmadd231ps %%" R "14, %%" R "15, %%" R "0\n vfmadd231ps %%" R "14, %%" R "15, %%" R "1\n" \
  "vfmadd231ps %%" R "14, %%" R "15, %%" R "2\n vfmadd231ps %%" R "14, %%" R "15, %%" R "3\n" \
  "vfmadd231ps %%" R "14, %%" R "15, %%" R "4\n vfmadd231ps %%" R "14, %%" R "15, %%" R "5\n" \
  "vfmadd231ps %%" R "14, %%" R "15, %%" R "6\n vfmadd231ps %%" R "14, %%" R "15, %%" R "7\n" \
  "vfmadd231ps %%" R "14, %%" R "15, %%" R "8\n vfmadd231ps %%" R "14, %%" R "15, %%" R "9\n" \
  "vfmadd231ps %%" R "14, %%" R "15, %%" R "10\n vfmadd231ps %%" R "14, %%" R "15, %%" R "11\n"
#define ZERO(R) \
  "vxorps %%xmm0, %%xmm0, %%xmm0\n vxorps %%xmm1, %%xmm1, %%xmm1\n vxorps %%xmm2, %%xmm2, %%xmm2\n" \
  "vxorps %%xmm3, %%xmm3, %%xmm3\n vxorps %%xmm4, %%xmm4, %%xmm4\n vxorps %%xmm5, %%xmm5, %%xmm5\n" \
  "vxorps %%xmm6, %%xmm6, %%xmm6\n vxorps %%xmm7, %%xmm7, %%xmm7\n vxorps %%xmm8, %%xmm8, %%xmm8\n" \
  "vxorps %%xmm9, %%xmm9, %%xmm9\n vxorps %%xmm10, %%xmm10, %%xmm10\n vxorps %%xmm11, %%xmm11, %%xmm11\n" \
  "vxorps %%xmm14, %%xmm14, %%xmm14\n vxorps %%xmm15, %%xmm15, %%xmm15\n"
#define CLOBBER "rcx", "cc", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", \
  "xmm10", "xmm11", "xmm14", "xmm15"
static double fma512_per_second(long m) {
  double t0 = now();
  __asm__ volatile("mov %0, %%rcx\n" ZERO("zmm") "2:\n" FMA12("zmm") "dec %%rcx\n jnz 2b\n vzeroupper\n"
                   : : "r"(m) : CLOBBER);
  return 12.0 * m / (now() - t0);
}
static double fma256_per_second(long m) {
  double t0 = now();
  __asm__ volatile("mov %0, %%rcx\n" ZERO("ymm") "2:\n" FMA12("ymm") "dec %%rcx\n jnz 2b\n vzeroupper\n"
                   : : "r"(m) : CLOBBER);
  return 12.0 * m / (now() - t0);
}
int main(int argc, char **argv) {
  /* argv[1]: "512" or "256"; argv[2]: repeats. Prints the best of the repeats (other jobs only ever slow it). */
  int wide = argc > 1 && strcmp(argv[1], "512") == 0;
  int repeats = argc > 2 ? atoi(argv[2]) : 20;
  double clock = 0, fma = 0;
  for (int i = 0; i < repeats; i++) {
    double c = adds_per_second(100000000L);
    double f = wide ? fma512_per_second(10000000L) : fma256_per_second(10000000L);
    if (c > clock) clock = c;
    if (f > fma) fma = f;
  }
  printf("{\"clock_hz\": %.6e, \"fma_per_second\": %.6e}\n", clock, fma);
  return 0;
}
"""


def _micro_binary() -> Path | None:
    """The micro-benchmark, compiled once into the bench cache; None without a C compiler or off x86-64."""
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None or os.uname().machine not in ("x86_64", "AMD64"):
        return None
    digest = hashlib.sha1(_MICRO_C.encode()).hexdigest()[:12]
    binary = CACHE / f"peak-micro-{digest}"
    if binary.exists():
        return binary
    CACHE.mkdir(parents=True, exist_ok=True)
    source = binary.with_suffix(".c")
    source.write_text(_MICRO_C)
    done = subprocess.run([compiler, "-O2", "-o", str(binary), str(source)], capture_output=True, text=True)
    return binary if done.returncode == 0 and binary.exists() else None


def cpu_flags() -> set[str]:
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def cpuinfo_mhz() -> float | None:
    """The highest "cpu MHz" in /proc/cpuinfo."""
    values = [float(line.split(":", 1)[1]) for line in _read("/proc/cpuinfo").splitlines()
              if line.startswith("cpu MHz")]
    return max(values) if values else None


def lscpu_max_mhz() -> float | None:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return None
    for line in out.splitlines():
        if line.startswith("CPU max MHz:"):
            return float(line.split(":", 1)[1])
    return None


def cpu_model() -> str:
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "?"


def cores() -> int:
    """Physical cores among the CPUs this process may run on."""
    from style_transfer.engines.cpu import physical_cores

    return physical_cores() or len(os.sched_getaffinity(0))


@dataclass
class Peak:
    cpu: str
    cores: int
    lanes: int  # float32 lanes per vector
    fma_units: int  # per core
    fma_units_from: str
    clock_ghz: float  # the clock the peak is computed at
    clock_from: str
    cpuinfo_mhz: float | None
    lscpu_max_mhz: float | None
    measured_clock_ghz: float | None  # scalar clock (dependent additions), all cores busy
    measured_fma_gflops: float | None  # all cores, float32, from the FMA micro-benchmark
    notes: list[str] = field(default_factory=list)

    @property
    def flops(self) -> float:
        """cores x FMA units x lanes x 2 FLOP x clock."""
        return self.cores * self.fma_units * self.lanes * 2 * self.clock_ghz * 1e9

    @property
    def nominal_flops(self) -> float:
        """The same product at /proc/cpuinfo's clock (0 when it gives none)."""
        return self.cores * self.fma_units * self.lanes * 2 * (self.cpuinfo_mhz or 0.0) * 1e6


def _run_on_all_cores(binary: Path, width: str, n: int, repeats: int = 20) -> list[dict[str, float]]:
    """The micro-benchmark on `n` CPUs at once, one process pinned to each."""
    procs = [subprocess.Popen([str(binary), width, str(repeats)], stdout=subprocess.PIPE, text=True,
                              preexec_fn=_pinned_to(cpu)) for cpu in sorted(os.sched_getaffinity(0))[:n]]
    return [json.loads(p.communicate()[0]) for p in procs]


def _pinned_to(cpu: int) -> Callable[[], None]:
    def pin() -> None:
        os.sched_setaffinity(0, {cpu})

    return pin


def fp32_peak(fma_units: int | None = None) -> Peak:
    """The machine's float32 peak with each factor's source; `fma_units` overrides the measured count."""
    flags = cpu_flags()
    lanes = 16 if "avx512f" in flags else 8 if {"avx2", "fma"} <= flags else 4
    n = cores()
    notes: list[str] = []
    mhz, max_mhz = cpuinfo_mhz(), lscpu_max_mhz()
    measured_clock = measured_fma = None
    units_measured = None
    fma_rate = 0.0  # FMAs per second of the best core
    binary = _micro_binary()
    if binary is not None and lanes >= 8:
        width = "512" if lanes == 16 else "256"
        per_core = _run_on_all_cores(binary, width, n)
        # Each figure is the best of its repeats, and the best core's: other jobs only ever slow them down.
        measured_clock = max(r["clock_hz"] for r in per_core) / 1e9
        measured_fma = sum(r["fma_per_second"] for r in per_core) * lanes * 2 / 1e9
        fma_rate = max(r["fma_per_second"] for r in per_core)
        per_cycle = max(r["fma_per_second"] / r["clock_hz"] for r in per_core)
        units_measured = max(1, round(per_cycle))
        notes.append(f"micro-benchmark on {n} cores at once: {per_cycle:.2f} {width}-bit FMAs per cycle per core "
                     f"(the best core)")
    else:
        notes.append("no C compiler (or not x86-64): FMA units not measured")
    if fma_units is not None:
        units, units_from = fma_units, "given (--fma-units)"
    elif units_measured is not None:
        units, units_from = units_measured, "measured (FMAs per cycle, rounded)"
    else:
        units, units_from = 2, "assumed (no measurement possible)"
    clocks = {"/proc/cpuinfo cpu MHz": (mhz or 0) / 1e3, "lscpu CPU max MHz": (max_mhz or 0) / 1e3,
              "measured (FMA rate / FMA units, all cores busy)": fma_rate / units / 1e9}
    clock_from, clock = max(clocks.items(), key=lambda kv: kv[1])
    return Peak(cpu_model(), n, lanes, units, units_from, clock, clock_from, mhz, max_mhz, measured_clock,
                measured_fma, notes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="(internal) the probe's child process")
    serve.add_argument("--n", type=int, default=PROBE_SIZE)
    serve.add_argument("--gpu", type=int, default=-1)
    ap.add_argument("--fma-units", type=int, help="FMA units per core, instead of measuring them")
    ap.add_argument("--rounds", type=int, default=5, help="sgemm measurements")
    args = ap.parse_args()
    if args.command == "serve":
        protocol = os.fdopen(os.dup(1), "w")
        os.dup2(2, 1)
        sys.stdout = sys.stderr
        _serve(sys.stdin, protocol, args.n, args.gpu)
        return
    peak = fp32_peak(args.fma_units)
    with SgemmProbe() as probe:
        rounds = [probe.measure_all() for _ in range(args.rounds)]
        info = probe.info
    best = {src: max(p.throughput for r in rounds for p in r if p.source == src) / 1e9 for src in ("numpy", "torch")}
    print(json.dumps({"peak": {**asdict(peak), "gflops": peak.flops / 1e9}, "sgemm_best_gflops": best,
                      "probe": info, "load_average": os.getloadavg()}, indent=1))


if __name__ == "__main__":
    main()
