"""Bad input of every kind: one readable line, a non-zero exit, no traceback, nothing half-written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from style_transfer import transfer
from style_transfer.caffe_model.loader import load_net
from style_transfer.caffe_model.reader import read_caffemodel, read_prototxt
from style_transfer.cli import main
from style_transfer.errors import ModelError, StyleTransferError
from tests import tinynets


@pytest.fixture
def setup(tmp_path: Path) -> dict[str, Path]:
    proto, model = tinynets.write_net(tmp_path)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(tmp_path / "s.png")
    Image.fromarray(rng.integers(0, 256, (36, 48, 3), dtype=np.uint8)).save(tmp_path / "c.png")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image at all\n")
    png = (tmp_path / "c.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(png[: len(png) // 2])
    (tmp_path / "garbage.caffemodel").write_bytes(bytes(range(256)) * 4)
    data = model.read_bytes()
    (tmp_path / "trunc.caffemodel").write_bytes(data[: len(data) * 2 // 3])
    (tmp_path / "syntax.prototxt").write_text(proto.read_text().replace('top: "conv2"', 'top "conv2" }', 1))
    layers = [*tinynets.TINY_LAYERS[:2], ("odd", "Eltwise", "conv1", "odd", "")]
    (tmp_path / "odd.prototxt").write_text(tinynets.prototxt(layers=layers))
    bad = tinynets.random_weights(proto.read_text())
    bad["conv2"][0] = np.zeros((6, 4, 3, 3), np.float32)
    (tmp_path / "shape.caffemodel").write_bytes(tinynets.caffemodel_bytes(proto.read_text(), bad))
    (tmp_path / "afile").write_text("x")
    return {"proto": proto, "model": model, "dir": tmp_path}


def _args(s: dict[str, Path], **over: str) -> list[str]:
    d = s["dir"]
    base = {"-s": str(d / "s.png"), "-c": str(d / "c.png"), "--prototxt": str(s["proto"]),
            "--weights": str(s["model"]), "--style-layers": "conv1,conv2", "--content-layers": "conv3",
            "-o": str(d / "out" / "o.png"), **over}
    out = ["-g", "-1", "-l", "24", "-n", "3"]
    for k, v in base.items():
        out += [k, v]
    return out


CASES = [
    ({"-c": "{d}/missing.jpg"}, "image not found"),
    ({"-c": "{d}"}, "folder"),
    ({"-c": "{d}/empty.jpg"}, "empty"),
    ({"-s": "{d}/text.jpg"}, "not an image"),
    ({"-c": "{d}/trunc.png"}, "trunc.png"),
    ({"--weights": "{d}/garbage.caffemodel"}, "not a valid caffemodel"),
    ({"--weights": "{d}/trunc.caffemodel"}, "caffemodel"),
    ({"--weights": "{d}/nope.caffemodel"}, "not found"),
    ({"--prototxt": "{d}/syntax.prototxt"}, "line "),
    ({"--prototxt": "{d}/odd.prototxt", "--style-layers": "odd", "--content-layers": "conv1"}, "'Eltwise'"),
    ({"--style-layers": "conv1,fc9"}, "available: conv1"),
    ({"--weights": "{d}/shape.caffemodel"}, "layer 'conv2'"),
    ({"-o": "{d}/afile/sub/o.png"}, "afile"),
    ({"-o": "{d}/o.unknown"}, "unknown"),
]


@pytest.mark.parametrize(("over", "message"), CASES)
def test_bad_input_one_line(setup: dict[str, Path], over: dict[str, str], message: str,
                            capsys: pytest.CaptureFixture[str]) -> None:
    d = setup["dir"]
    args = _args(setup, **{k: v.format(d=d) for k, v in over.items()})
    code = main(args)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0
    assert len(lines) == 1, err
    assert message in lines[0], lines[0]
    assert "Traceback" not in err
    out = Path(args[args.index("-o") + 1])
    assert not out.exists()
    leftovers = [p.name for p in d.rglob("*") if ".tmp" in p.name]
    assert not leftovers


def test_nan_loss_keeps_last_good_image(setup: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    real = transfer.Stylization._bound
    calls = {"n": 0}

    def flaky(self: transfer.Stylization, engine: Any, objective: Any, plan: Any):  # type: ignore[no-untyped-def]
        evaluate = real(self, engine, objective, plan)

        def wrapped(image: np.ndarray):  # type: ignore[no-untyped-def]
            calls["n"] += 1
            ev = evaluate(image)
            if calls["n"] > 12:
                ev.loss = float("nan")
            return ev

        return wrapped

    monkeypatch.setattr(transfer.Stylization, "_bound", flaky)
    args = _args(setup)
    args[args.index("-n") + 1] = "50"
    code = main(args)
    err = capsys.readouterr().err
    assert code == 1
    assert "nan" in err and "last good image" in err
    assert Path(args[args.index("-o") + 1]).exists()


def test_early_stop_is_reported(setup: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    # A zero ratio and the content as start: the objective is 0 at once, so L-BFGS-B stops before -n.
    args = _args(setup, **{"-r": "0"})
    args[args.index("-n") + 1] = "50"
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "L-BFGS-B stopped after 0 of 50 iterations" in err


def _mutations(data: bytes) -> st.SearchStrategy[bytes]:
    def mutate(ops: list[tuple[int, int]]) -> bytes:
        buf = bytearray(data)
        for pos, val in ops:
            if pos % 3 == 0 and len(buf) > 1:
                del buf[pos % len(buf)]
            else:
                buf[pos % len(buf)] = val
        return bytes(buf)

    return st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=8).map(mutate)


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes, str]:
    folder = tmp_path_factory.mktemp("fuzz")
    proto, model = tinynets.write_net(folder, "v1", "input_dim")
    return proto, model.read_bytes(), proto.read_text()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_caffemodel_reader_raises_only_model_errors(tiny_files: tuple[Path, bytes, str], data: st.DataObject,
                                                    tmp_path_factory: pytest.TempPathFactory) -> None:
    proto, good, _ = tiny_files
    blob = data.draw(st.one_of(st.binary(max_size=400), _mutations(good)))
    path = tmp_path_factory.mktemp("m") / "m.caffemodel"
    path.write_bytes(blob)
    try:
        read_caffemodel(path)
        load_net(proto, path, ["conv3"])
    except ModelError:
        pass


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_prototxt_reader_raises_only_model_errors(tiny_files: tuple[Path, bytes, str], data: st.DataObject,
                                                  tmp_path_factory: pytest.TempPathFactory) -> None:
    _, good, text = tiny_files
    blob = data.draw(st.one_of(st.binary(max_size=300), _mutations(text.encode())))
    folder = tmp_path_factory.mktemp("p")
    path = folder / "p.prototxt"
    path.write_bytes(blob)
    model = folder / "m.caffemodel"
    model.write_bytes(good)
    try:
        read_prototxt(path)
        load_net(path, model, ["conv3"])
    except StyleTransferError:
        pass
