"""The committed protobuf module must be what protoc makes of the committed schema."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from style_transfer.caffe_model import caffe_schema_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = "style_transfer/caffe_model/caffe_schema.proto"


def test_generated_module_matches_schema(tmp_path: Path) -> None:
    protoc = shutil.which("protoc")
    if protoc is None:
        if os.environ.get("CI"):
            pytest.fail("protoc is missing in CI: .ci/run must install protobuf-compiler")
        pytest.skip("protoc not installed (apt-get install protobuf-compiler)")
    out = tmp_path / "schema.desc"
    subprocess.run([protoc, f"--proto_path={ROOT}", f"--descriptor_set_out={out}", SCHEMA], check=True)
    fresh = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    committed = descriptor_pb2.FileDescriptorProto.FromString(pb.DESCRIPTOR.serialized_pb)
    # protoc's descriptor sets carry json_name, which the generated module leaves out.
    for message in fresh.message_type:
        for field in message.field:
            field.ClearField("json_name")
    assert fresh == committed, "regenerate: protoc --python_out=. --pyi_out=. " + SCHEMA


def test_package_does_not_collide_with_pycaffe() -> None:
    assert pb.DESCRIPTOR.package == "style_transfer_caffe"


@pytest.mark.parametrize(("message", "field", "number"), [
    ("NetParameter", "layer", 100), ("NetParameter", "layers", 2), ("NetParameter", "input_shape", 8),
    ("LayerParameter", "convolution_param", 106), ("LayerParameter", "input_param", 143),
    ("V1LayerParameter", "convolution_param", 10), ("V1LayerParameter", "blobs", 6),
    ("BlobProto", "shape", 7), ("BlobProto", "data", 5), ("PoolingParameter", "global_pooling", 12),
])
def test_field_numbers_are_caffes(message: str, field: str, number: int) -> None:
    assert getattr(pb, message).DESCRIPTOR.fields_by_name[field].number == number
