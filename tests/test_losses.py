"""The objective against an independent NumPy computation of the original's formulas."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from style_transfer.caffe_model.loader import load_net
from style_transfer.engines.torch import TorchEngine
from style_transfer.losses import (
    Objective,
    content_loss_numpy,
    gram_numpy,
    style_loss_numpy,
    style_loss_torch,
    tv_loss_numpy,
    tv_loss_torch,
)
from tests import tinynets


def reference_loss(feats: dict[str, np.ndarray], image: np.ndarray, obj: Objective) -> float:
    """Written out with einsum and explicit shapes, sharing nothing with the code under test."""
    total = 0.0
    for layer, w in obj.style_weights.items():
        f = feats[layer].astype(np.float64)
        c, h, wd = f.shape
        g = np.einsum("chw,dhw->cd", f, f)
        for b, a in zip(obj.style_blend, obj.style_targets[layer], strict=True):
            total += obj.ratio * w * b * np.sum((g - a) ** 2) / (4.0 * c**2 * (h * wd) ** 2)
    for layer, w in obj.content_weights.items():
        total += w * 0.5 * np.sum((feats[layer].astype(np.float64) - obj.content_targets[layer]) ** 2)
    x = image.astype(np.float64)
    total += obj.tv_weight * (np.sum(np.diff(x, axis=1) ** 2) + np.sum(np.diff(x, axis=2) ** 2))
    return float(total)


@pytest.mark.parametrize("n_styles", [1, 2])
def test_engine_loss_equals_numpy_reference(tmp_path: Path, n_styles: int) -> None:
    proto, model = tinynets.write_net(tmp_path)
    engine = TorchEngine(load_net(proto, model, ["conv1", "conv2", "conv3"]), "avg", dtype=torch.float64)
    rng = np.random.default_rng(0)
    styles = [rng.uniform(-100, 100, (3, 20, 20)) for _ in range(n_styles)]
    grams = [{k: gram_numpy(v) for k, v in engine.features(s, ["conv1", "conv3"]).items()} for s in styles]
    content = rng.uniform(-100, 100, (3, 16, 16))
    blend = np.array([0.25, 0.75][:n_styles]) / sum([0.25, 0.75][:n_styles])
    obj = Objective(content_weights={"conv2": 0.7}, style_weights={"conv1": 0.4, "conv3": 0.6}, ratio=1e4,
                    content_targets=engine.features(content, ["conv2"]),
                    style_targets={k: np.stack([g[k] for g in grams]) for k in ("conv1", "conv3")},
                    style_blend=blend, tv_weight=0.5)
    x = rng.uniform(-100, 100, (3, 16, 16))
    ev = engine.bind(obj).evaluate(x)
    feats = engine.features(x, ["conv1", "conv2", "conv3"])
    want = reference_loss(feats, x, obj)
    assert ev.loss == pytest.approx(want, rel=1e-10)
    assert ev.style_loss + ev.content_loss + ev.tv_loss == pytest.approx(ev.loss, rel=1e-12)
    assert set(ev.layers) == {"style:conv1", "style:conv3", "content:conv2"}


def test_numpy_gradients_match_autograd() -> None:
    rng = np.random.default_rng(1)
    f = rng.standard_normal((5, 4, 3))
    targets = rng.standard_normal((2, 5, 5))
    targets = targets + targets.transpose(0, 2, 1)
    blend = np.array([0.3, 0.7])
    loss, grad = style_loss_numpy(f, targets, blend)
    ft = torch.tensor(f, requires_grad=True)
    lt = style_loss_torch(ft, torch.tensor(targets), torch.tensor(blend))
    lt.backward()
    assert loss == pytest.approx(float(lt.detach()), rel=1e-12)
    np.testing.assert_allclose(grad, ft.grad.numpy(), rtol=1e-10)

    p = rng.standard_normal(f.shape)
    closs, cgrad = content_loss_numpy(f, p)
    assert closs == pytest.approx(0.5 * np.sum((f - p) ** 2))
    np.testing.assert_allclose(cgrad, f - p)

    img = rng.standard_normal((3, 6, 7))
    tloss, tgrad = tv_loss_numpy(img)
    it = torch.tensor(img, requires_grad=True)
    tv_loss_torch(it).backward()
    assert tloss == pytest.approx(float(tv_loss_torch(torch.tensor(img))), rel=1e-12)
    np.testing.assert_allclose(tgrad, it.grad.numpy(), rtol=1e-10, atol=1e-12)


def test_style_loss_is_zero_at_target_and_scale_is_the_originals() -> None:
    rng = np.random.default_rng(2)
    f = rng.standard_normal((4, 3, 5))
    loss, grad = style_loss_numpy(f, gram_numpy(f)[None], np.ones(1))
    assert loss == pytest.approx(0.0, abs=1e-20)
    assert np.allclose(grad, 0)
    loss, _ = style_loss_numpy(f, np.zeros((1, 4, 4)), np.ones(1))
    assert loss == pytest.approx(np.sum(gram_numpy(f) ** 2) / (4 * 16 * 15**2))
