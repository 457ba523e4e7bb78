"""Reading prototxts and caffemodels: both layouts, every input style, the shipped models, and clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from style_transfer.caffe_model import caffe_schema_pb2 as pb
from style_transfer.caffe_model.layers import LAYER_TYPES, V1_TYPES, Layer
from style_transfer.caffe_model.loader import check_caffemodel, load_net
from style_transfer.caffe_model.net import infer_shapes, truncate
from style_transfer.caffe_model.reader import read_caffemodel, read_prototxt
from style_transfer.caffe_model.registry import MODELS
from style_transfer.errors import ModelError
from tests import tinynets


def _summary(path: Path) -> list[tuple[str, str, tuple[str, ...], tuple[str, ...], str]]:
    net = read_prototxt(path)
    return [(layer.name, layer.type, layer.bottoms, layer.tops, str(layer.params)) for layer in net.layers]


# V1 has no Input layer type: old nets declare their input with `input` and `input_dim`/`input_shape`.
@pytest.mark.parametrize(("layout", "input_style"), [("v1", "input_shape"), ("v1", "input_dim"), ("v2", "input_shape"),
                                                     ("v2", "input_dim"), ("v2", "layer")])
def test_all_layouts_and_input_styles_parse_to_the_same_net(tmp_path: Path, layout: str, input_style: str) -> None:
    ref_proto, ref_model = tinynets.write_net(tmp_path, "v2", "input_shape")
    proto, model = tinynets.write_net(tmp_path, layout, input_style)
    assert _summary(proto) == _summary(ref_proto)
    net = read_prototxt(proto)
    assert net.input_name == "data" and net.input_shape == (1, 3, 24, 24)
    a = load_net(proto, model, ["conv3"])
    b = load_net(ref_proto, ref_model, ["conv3"])
    assert a.weights.keys() == b.weights.keys() == {"conv1", "conv2", "conv3"}
    for name in a.weights:
        for x, y in zip(a.weights[name], b.weights[name], strict=True):
            assert x.shape == y.shape
            np.testing.assert_array_equal(x, y)


def test_v1_blobs_are_reshaped_from_legacy_4d(tmp_path: Path) -> None:
    proto, model = tinynets.write_net(tmp_path, "v1")
    assert read_caffemodel(model).shapes("conv1") == [(4, 3, 3, 3), (1, 1, 1, 4)]
    net = load_net(proto, model, ["conv1"])
    assert net.weights["conv1"][1].shape == (4,)


def test_truncation_skips_layers_past_the_deepest_blob(tmp_path: Path) -> None:
    text = tinynets.prototxt()
    weights = tinynets.random_weights(text)
    del weights["fc"], weights["conv3"]  # as the shared HED file lacks the fc layers
    proto = tmp_path / "t.prototxt"
    model = tmp_path / "t.caffemodel"
    proto.write_text(text)
    model.write_bytes(tinynets.caffemodel_bytes(text, weights))
    net = load_net(proto, model, ["conv1", "conv2"])
    assert [layer.name for layer in net.layers] == ["conv1", "relu1", "pool1", "conv2", "relu2"]
    with pytest.raises(ModelError, match="no weights for layer 'conv3'"):
        load_net(proto, model, ["conv3"])


def test_shape_mismatch_names_layer_and_both_shapes(tmp_path: Path) -> None:
    text = tinynets.prototxt()
    weights = tinynets.random_weights(text)
    weights["conv2"][0] = np.zeros((6, 3, 5, 5), np.float32)
    proto = tmp_path / "t.prototxt"
    model = tmp_path / "t.caffemodel"
    proto.write_text(text)
    model.write_bytes(tinynets.caffemodel_bytes(text, weights))
    with pytest.raises(ModelError, match=r"layer 'conv2'.*6x3x5x5.*6x2x3x3"):
        load_net(proto, model, ["conv2"])


def test_unknown_blob_lists_the_available_ones(tmp_path: Path) -> None:
    proto, _ = tinynets.write_net(tmp_path)
    with pytest.raises(ModelError, match=r"no blob 'conv9'.*available: conv1, pool1"):
        truncate(read_prototxt(proto), ["conv9"])


def test_unsupported_layer_type_is_named(tmp_path: Path) -> None:
    layers = [*tinynets.TINY_LAYERS[:2], ("odd", "Sigmoid", "conv1", "odd", "")]
    text = tinynets.prototxt(layers=layers)
    proto = tmp_path / "t.prototxt"
    proto.write_text(text)
    model = tmp_path / "t.caffemodel"
    model.write_bytes(tinynets.caffemodel_bytes(text, {"conv1": [np.zeros((4, 3, 3, 3), np.float32),
                                                                 np.zeros(4, np.float32)]}))
    with pytest.raises(ModelError, match="layer 'odd' has type 'Sigmoid'"):
        load_net(proto, model, ["odd"])


def test_the_layer_table_matches_the_schema_and_caffe_upgrade() -> None:
    """Every V1 enum value but NONE has a current name; the table's field names exist in both layouts."""
    v1_names = set(pb.V1LayerParameter.LayerType.keys())
    assert set(V1_TYPES) == v1_names - {"NONE"}
    assert V1_TYPES["CONVOLUTION"] == "Convolution" and V1_TYPES["SOFTMAX_LOSS"] == "SoftmaxWithLoss"
    for name, kind in LAYER_TYPES.items():
        if kind.v1 is not None:
            assert kind.v1 in v1_names, name
        if kind.field is not None:
            assert kind.field in pb.LayerParameter.DESCRIPTOR.fields_by_name, name
            assert kind.v1 is None or kind.field in pb.V1LayerParameter.DESCRIPTOR.fields_by_name, name


@pytest.mark.parametrize(("bottoms", "tops", "match"), [
    (("data",), ("a", "b"), r"'relu' \(ReLU\) needs exactly 1 output blob, has 2"),
    (("data", "data"), ("a",), r"needs exactly 1 input blob, has 2"),
])
def test_shape_inference_checks_blob_counts(tmp_path: Path, bottoms: tuple[str, ...], tops: tuple[str, ...],
                                            match: str) -> None:
    """A layer with the wrong number of blobs is a ModelError naming it, not a crash in shape inference."""
    proto, _ = tinynets.write_net(tmp_path)
    net = read_prototxt(proto)
    net.layers.insert(0, Layer("relu", "ReLU", bottoms, tops))
    with pytest.raises(ModelError, match=match):
        infer_shapes(net, (1, 3, 16, 16))


def test_syntax_error_has_line_number(tmp_path: Path) -> None:
    proto = tmp_path / "bad.prototxt"
    proto.write_text('name: "x"\ninput: "data"\nlayer {\n  name: "c" type: "Convolution"\n  bottom "data"\n}\n')
    with pytest.raises(ModelError, match="line 5"):
        read_prototxt(proto)


@pytest.mark.parametrize("data", [b"", b"\xff\xfe garbage \x00" * 10, b"\x08"])
def test_garbage_caffemodel_is_a_model_error(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "bad.caffemodel"
    path.write_bytes(data)
    with pytest.raises(ModelError):
        read_caffemodel(path)


def test_truncated_caffemodel_is_a_model_error(tmp_path: Path) -> None:
    proto, model = tinynets.write_net(tmp_path)
    data = model.read_bytes()
    model.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError):
        load_net(proto, model, ["conv3"])


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not found"):
        read_prototxt(tmp_path / "none.prototxt")
    with pytest.raises(ModelError, match="not found"):
        read_caffemodel(tmp_path / "none.caffemodel")


PUBLISHED = {
    "vgg19": {"conv1_1": (64, 224, 224), "conv4_2": (512, 28, 28), "conv5_1": (512, 14, 14),
              "conv5_4": (512, 14, 14), "pool5": (512, 7, 7), "fc8": (1000,)},
    "vgg16": {"conv1_1": (64, 224, 224), "conv4_2": (512, 28, 28), "conv5_1": (512, 14, 14), "pool5": (512, 7, 7),
              "fc8": (1000,)},
    "googlenet": {"conv1/7x7_s2": (64, 112, 112), "conv2/3x3": (192, 56, 56), "inception_3a/output": (256, 28, 28),
                  "inception_4a/output": (512, 14, 14), "inception_5a/output": (832, 7, 7),
                  "inception_5b/output": (1024, 7, 7), "loss3/classifier": (1000,)},
    "vgg16-hed": {"conv1_1": (64, 224, 224), "conv4_2": (512, 28, 28), "conv5_1": (512, 14, 14),
                  "pool5": (512, 7, 7)},
    "caffenet": {"conv1": (96, 55, 55), "conv4": (384, 13, 13), "conv5": (256, 13, 13), "pool5": (256, 6, 6),
                 "fc8": (1000,)},
}


@pytest.mark.parametrize("model", sorted(MODELS))
def test_shipped_prototxts_have_published_shapes(model: str) -> None:
    info = MODELS[model]
    net = read_prototxt(info.prototxt)
    size = 227 if model == "caffenet" else 224
    shapes = infer_shapes(net, (1, 3, size, size))
    for blob, shape in PUBLISHED[model].items():
        assert shapes[blob][1:] == shape, blob
    for layer in [*info.style_layers, *info.content_layers]:
        assert layer in shapes


@pytest.mark.parametrize("model", sorted(MODELS))
def test_shipped_prototxts_accept_their_own_full_weights(tmp_path: Path, model: str) -> None:
    """A caffemodel with every learned layer at the right shape passes the download check; one missing fails."""
    info = MODELS[model]
    text = info.prototxt.read_text()
    net = read_prototxt(info.prototxt)
    shapes = infer_shapes(net, net.input_shape)  # type: ignore[arg-type]
    from style_transfer.caffe_model.net import expected_param_shapes

    weights = {layer.name: [np.zeros(s, np.float32) for s in expected_param_shapes(layer, shapes[layer.bottoms[0]])]
               for layer in net.layers if layer.bottoms}
    weights = {k: v for k, v in weights.items() if v}
    # Small stand-ins keep the test fast: the check reads shapes, so big blobs are left out and the test checks the
    # named error for the first one.
    big = [k for k, v in weights.items() if sum(a.size for a in v) > 3_000_000]
    path = tmp_path / "m.caffemodel"
    path.write_bytes(tinynets.caffemodel_bytes(text, {k: v for k, v in weights.items() if k not in big}))
    if big:
        with pytest.raises(ModelError, match=f"no weights for layer '{big[0]}'"):
            check_caffemodel(info.prototxt, read_caffemodel(path))
    else:
        assert set(check_caffemodel(info.prototxt, read_caffemodel(path))) == set(weights)
