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
    TorchTargets,
    gram_numpy,
    style_loss_torch,
    terms_and_feature_grads,
    tv_loss_torch,
)
from tests import tinynets


def style_loss_numpy(features: np.ndarray, targets: np.ndarray, blend: np.ndarray) -> tuple[float, np.ndarray]:
    """Reference: unweighted style loss of one layer, 1 / (4 C^2 (HW)^2) sum_s b_s sum (G - A_s)^2, and its gradient
    4 / (4 C^2 (HW)^2) sum_s b_s (G - A_s) F, as style.py computed it."""
    c = features.shape[0]
    f = features.reshape(c, -1)
    diff = (f @ f.T)[None] - targets
    scale = 1.0 / (4.0 * c * c * f.shape[1] ** 2)
    loss = scale * float(np.sum(blend * np.sum(np.square(diff, dtype=np.float64), axis=(1, 2))))
    weighted = np.tensordot(blend.astype(features.dtype), diff, axes=1)
    # d/dF sum (G - A)^2 = 4 (G - A) F for symmetric G - A.
    grad = (4.0 * scale) * (weighted @ f)
    return loss, grad.reshape(features.shape).astype(features.dtype, copy=False)


def content_loss_numpy(features: np.ndarray, target: np.ndarray) -> tuple[float, np.ndarray]:
    """Reference: unweighted content loss of one layer, 1/2 sum (F - P)^2, and its gradient F - P."""
    diff = features - target
    return 0.5 * float(np.sum(np.square(diff, dtype=np.float64))), diff


def tv_loss_numpy(image: np.ndarray) -> tuple[float, np.ndarray]:
    """Reference: unweighted total variation and its gradient with respect to the image."""
    dh = image[:, 1:, :] - image[:, :-1, :]
    dw = image[:, :, 1:] - image[:, :, :-1]
    loss = float(np.sum(np.square(dh, dtype=np.float64)) + np.sum(np.square(dw, dtype=np.float64)))
    grad = np.zeros_like(image)
    grad[:, 1:, :] += 2 * dh
    grad[:, :-1, :] -= 2 * dh
    grad[:, :, 1:] += 2 * dw
    grad[:, :, :-1] -= 2 * dw
    return loss, grad


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

    # What both engines run: the hand-differentiated terms and feature gradients.
    obj = Objective(content_weights={"b": 0.5}, style_weights={"b": 2.0}, ratio=3.0, content_targets={"b": p},
                    style_targets={"b": targets}, style_blend=blend)
    terms, grads = terms_and_feature_grads(obj, TorchTargets.of(obj, torch.from_numpy, torch.contiguous_format),
                                           {"b": torch.tensor(f)[None]}, torch.float64)
    assert terms == pytest.approx({"style:b": 6.0 * loss, "content:b": 0.5 * closs}, rel=1e-12)
    np.testing.assert_allclose(grads["b"][0].numpy(), 6.0 * grad + 0.5 * cgrad, rtol=1e-10)

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
