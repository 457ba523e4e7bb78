"""options.py: one table of run options, from which the CLI, batch and library take names, defaults and checks."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from style_transfer import options
from style_transfer.cli import build_parser
from style_transfer.errors import StyleTransferError


def test_every_flag_belongs_to_one_option_and_every_option_has_help() -> None:
    flags = [flag for option in options.OPTIONS for flag in option.flags]
    assert len(flags) == len(set(flags))
    assert all(option.help for option in options.OPTIONS)
    assert options.BY_NAME["ratio"].label == "-r/--ratio"
    assert options.BY_NAME["tv_weight"].label == "--tv-weight"


def test_cli_defaults_are_the_library_defaults() -> None:
    parsed = vars(build_parser().parse_args(["-s", "s.jpg", "-c", "c.jpg"]))
    for scope in ("model", "run"):
        library = options.check_all(scope, {})
        from_cli = options.check_all(scope, options.values_for(scope, parsed))
        assert library == from_cli, scope
    assert options.check_all("run", {})["num_iters"] == 512
    assert float(options.check_all("run", {})["ratio"]) == 1e4
    assert options.check_all("model", {})["model"] == "vgg16"


@pytest.mark.parametrize(("name", "text", "message"), [
    ("num_iters", "ten", "-n/--num-iters needs a whole number, got 'ten'"),
    ("num_iters", "0", "-n/--num-iters must be at least 1, got 0"),
    ("num_iters", "2.5", "-n/--num-iters needs a whole number"),
    ("ratio", "abc", "-r/--ratio needs a number, got 'abc'"),
    ("ratio", "nan", "-r/--ratio must be a finite number >= 0"),
    ("length", "4", "-l/--length must be a finite number >= 16"),
    ("style_scale", "0", "--style-scale must be a finite number > 0"),
    ("init", "nan", "-i/--init noise exponent must be a finite number >= 0, got 'nan'"),
    ("init", "-inf", "-i/--init noise exponent must be a finite number >= 0"),
    ("pooling", "min", "--pooling must be one of avg, max, got 'min'"),
    ("original_colors", "maybe", "--original-colors must be yes or no"),
    ("style_layers", "conv1:abc", "--style-layers: the weight of 'conv1' must be a number, got 'abc'"),
    ("style_weights", "1 x", "--style-weights needs a number, got 'x'"),
    ("gpu", "first", "-g/--gpu needs a device number (-1 for the CPU), got 'first'"),
])
def test_bad_values_name_their_flag(name: str, text: str, message: str) -> None:
    with pytest.raises(StyleTransferError) as caught:
        options.parse_value(name, text)
    assert message in str(caught.value)


def test_text_is_kept_where_the_original_named_outputs_after_it() -> None:
    assert options.parse_value("ratio", "1e4") == "1e4"
    assert options.parse_value("init", "0.5") == "0.5"
    assert options.parse_value("num_iters", "12") == 12
    assert options.parse_value("length", "512.0") == 512
    assert options.parse_value("style_weights", "3;1") == [3.0, 1.0]
    assert options.parse_value("original_colors", "Yes") is True


def test_init_kind_is_decided_in_one_place() -> None:
    assert options.init_kind("content") == "content"
    assert options.init_kind("mixed") == "mixed"
    assert options.init_kind("0.5") == "noise" and options.init_kind(2) == "noise"
    assert options.init_kind("photo.jpg") == "file" and options.init_kind("./1.5") == "file"
    assert options.init_kind(np.zeros((2, 2, 3))) == "image"


def test_layer_specs() -> None:
    assert options.parse_layer_weights("a:0.5,b:1.5") == {"a": 0.5, "b": 1.5}
    assert options.parse_layer_weights("a,b,c,d") == {k: 0.25 for k in "abcd"}
    assert options.parse_layer_weights({"inception_3a/output": 1}) == {"inception_3a/output": 1.0}
    for bad, message in (("", "no layers"), ("a:1,b", "every layer or to none"), ("a:-1", ">= 0")):
        with pytest.raises(StyleTransferError, match=message):
            options.parse_layer_weights(bad, "--style-layers")


def test_library_refuses_unknown_options() -> None:
    with pytest.raises(TypeError, match="unknown option"):
        options.check_all("run", {"iterations": 3})


def test_manifest_columns_and_fingerprint_come_from_the_table() -> None:
    assert "style" not in options.MANIFEST_COLUMNS and "output" not in options.MANIFEST_COLUMNS
    assert {"ratio", "init", "num_iters", "original_colors", "precision"} <= set(options.MANIFEST_COLUMNS)
    assert "gpu" not in options.FINGERPRINTED and "ratio" in options.FINGERPRINTED


def test_help_shows_no_empty_defaults() -> None:
    parser = options.Parser(prog="x", formatter_class=options.HelpFormatter)
    options.add_arguments(parser, ["seed", "ratio", "original_colors"], defaults_from=options.defaults())
    text = parser.format_help()
    assert "(default: None)" not in text and "(default: False)" not in text and "(default: 1e4)" in text
    with pytest.raises(SystemExit):
        parser.parse_args(["--ratio", "x"])
    assert isinstance(parser, argparse.ArgumentParser)
