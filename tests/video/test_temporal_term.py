"""The temporal term (Ruder et al. 2016) in the objective: its value, its gradient, both engines alike."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from style_transfer.caffe_model.loader import load_net
from style_transfer.engines.torch import TorchEngine, Tuning
from style_transfer.losses import Objective, gram_numpy
from tests import tinynets


def temporal_reference(image: np.ndarray, target: np.ndarray, mask: np.ndarray) -> float:
    """sum over channels and pixels of m (x - w)^2, in float64, sharing nothing with the code under test."""
    d = image.astype(np.float64) - target.astype(np.float64)
    return float(np.einsum("hw,chw->", mask.astype(np.float64), d * d))


def _objective(engine: TorchEngine, rng: np.random.Generator, size: tuple[int, int], weight: float) -> Objective:
    h, w = size
    style, content = rng.uniform(-100, 100, (3, h + 4, w + 4)), rng.uniform(-100, 100, (3, h, w))
    mask = (rng.uniform(0, 1, (h, w)) > 0.3).astype(np.float64)
    grams = {k: gram_numpy(v)[None] for k, v in engine.features(style, ["conv1", "conv3"]).items()}
    return Objective(content_weights={"conv2": 1.0}, style_weights={"conv1": 0.5, "conv3": 0.5}, ratio=1e3,
                     content_targets=engine.features(content, ["conv2"]), style_targets=grams,
                     temporal_weight=weight, temporal_target=rng.uniform(-100, 100, (3, h, w)), temporal_mask=mask)


@pytest.mark.parametrize("manual", [True, False])
def test_value_and_gradient_against_reference_and_finite_differences(tmp_path: Path, manual: bool) -> None:
    proto, model = tinynets.write_net(tmp_path)
    net = load_net(proto, model, ["conv1", "conv2", "conv3"])
    tuning = Tuning() if manual else Tuning.plain()
    engine = TorchEngine(net, "avg", dtype=torch.float64, tuning=tuning)
    rng = np.random.default_rng(0)
    obj = _objective(engine, rng, (16, 18), 0.3)
    x = rng.uniform(-100, 100, (3, 16, 18))
    ev = engine.bind(obj).evaluate(x)
    assert obj.temporal_target is not None and obj.temporal_mask is not None
    want = 0.3 * temporal_reference(x, obj.temporal_target, obj.temporal_mask)
    assert ev.temporal_loss == pytest.approx(want, rel=1e-10)
    assert ev.loss == pytest.approx(ev.style_loss + ev.content_loss + ev.tv_loss + ev.temporal_loss, rel=1e-12)
    without = engine.bind(replace(obj, temporal_weight=0.0)).evaluate(x)
    assert without.temporal_loss == 0.0
    # The term's own gradient is 2 w m (x - target); the rest of the objective is unchanged by it.
    np.testing.assert_allclose(ev.grad - without.grad,
                               0.6 * obj.temporal_mask * (x - obj.temporal_target), rtol=1e-7, atol=1e-7)
    # Central differences of the whole objective along random directions.
    evaluate = engine.bind(obj)
    for _ in range(3):
        d = rng.standard_normal(x.shape)
        eps = 1e-3
        numeric = (evaluate(x + eps * d).loss - evaluate(x - eps * d).loss) / (2 * eps)
        assert float(np.sum(ev.grad * d)) == pytest.approx(numeric, rel=1e-5)


def test_masked_pixels_cost_nothing(tmp_path: Path) -> None:
    proto, model = tinynets.write_net(tmp_path)
    engine = TorchEngine(load_net(proto, model, ["conv1", "conv2", "conv3"]), "avg", dtype=torch.float64)
    rng = np.random.default_rng(1)
    obj = _objective(engine, rng, (16, 16), 1.0)
    obj = replace(obj, temporal_mask=np.zeros((16, 16)))
    ev = engine.bind(obj).evaluate(rng.uniform(-100, 100, (3, 16, 16)))
    assert ev.temporal_loss == 0.0


@pytest.mark.caffe
def test_engines_agree_on_the_temporal_term(tmp_path: Path) -> None:
    from tests.engines.test_parity import (
        assert_evaluations_match,
        caffe_engine,
        objective_for,
        random_image,
        require_caffe,
    )

    caffe = require_caffe()
    proto, model = tinynets.write_net(tmp_path)
    net = load_net(proto, model, ["conv1", "conv2", "conv3"], "avg")
    torch_engine, caffe_eng = TorchEngine(net, "avg"), caffe_engine(caffe, net, "avg")
    rng = np.random.default_rng(3)
    objective = objective_for(torch_engine, {"conv1": 0.5, "conv3": 0.5}, {"conv2": 1.0}, random_image(rng, 28, 32),
                              random_image(rng, 20, 24), tv_weight=0.01)
    objective = replace(objective, temporal_weight=0.05, temporal_target=random_image(rng, 20, 24),
                        temporal_mask=(rng.uniform(0, 1, (20, 24)) > 0.5).astype(np.float32))
    x = random_image(rng, 20, 24)
    got, want = caffe_eng.bind(objective)(x), torch_engine.bind(objective)(x)
    assert_evaluations_match(got, want)
    assert want.temporal_loss > 0 and got.temporal_loss == pytest.approx(want.temporal_loss, rel=1e-4)
    # Only the temporal term: no net pass.
    only = Objective(content_weights={}, style_weights={}, ratio=1.0, temporal_weight=0.5,
                     temporal_target=objective.temporal_target, temporal_mask=objective.temporal_mask)
    assert_evaluations_match(caffe_eng.bind(only)(x), torch_engine.bind(only)(x))
