"""OpenMP's waiting policy for the torch engine on the CPU, which has to be chosen before torch is imported."""

from __future__ import annotations

import os
from collections.abc import Iterable

SPIN_VARIABLE = "GOMP_SPINCOUNT"
SHORT_SPIN = "10000"
# Nets whose 3 x 3 convolutions the torch engine runs as Winograd convolutions on NNPACK's own thread pool. After
# each OpenMP region libgomp's threads keep spinning for a while and take the cores NNPACK's threads need next;
# a short spin makes VGG faster per evaluation, and GoogLeNet and CaffeNet slower, whose small layers pay for the
# threads' later wake-ups (BENCHMARKS.md).
SHORT_SPIN_MODELS = frozenset({"vgg16", "vgg19"})


def prefer_short_spin(models: Iterable[str], engine: str) -> bool:
    """Ask libgomp for a short spin when every net to run is one that gains from it on the torch engine.

    Takes effect for this process if torch is not imported yet, and for processes it starts later. A user's own
    GOMP_SPINCOUNT or OMP_WAIT_POLICY is left alone. Returns whether the variable was set here."""
    chosen = set(models)
    if engine != "torch" or not chosen or not chosen <= SHORT_SPIN_MODELS:
        return False
    if SPIN_VARIABLE in os.environ or "OMP_WAIT_POLICY" in os.environ:
        return False
    os.environ[SPIN_VARIABLE] = SHORT_SPIN
    return True
