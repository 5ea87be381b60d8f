"""The API contract: proto/mitosis/edge/v1/edge.proto, the generated code committed under edge/_proto,
and docs/api.md, which documents every message field by field."""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from edge._proto import edge_pb2 as pb
from edge._proto import edge_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]
PROTO = ROOT / "proto" / "mitosis" / "edge" / "v1" / "edge.proto"
GENERATED = ROOT / "edge" / "_proto"
DOCS = ROOT / "docs" / "api.md"


def gen_proto() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "tools" / "gen_proto.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def committed_tools_version() -> str:
    header = (GENERATED / "edge_pb2.py").read_text(encoding="utf-8").splitlines()[0]
    match = re.search(r"grpcio-tools (\S+)\.", header)
    assert match, f"edge/_proto/edge_pb2.py lacks the generator header: {header!r}"
    return match.group(1)


def test_the_service_has_every_rpc_of_the_api() -> None:
    service = pb.DESCRIPTOR.services_by_name["EdgeService"]
    assert service.full_name == "mitosis.edge.v1.EdgeService"
    assert [m.name for m in service.methods] == [
        "SubmitSlide", "GetJob", "ListJobs", "CancelJob", "GetResult", "ListDetections", "WatchEvents",
        "GetServerStatus", "GetExport",
    ]
    streams = {m.name for m in service.methods if m.server_streaming}
    assert streams == {"ListDetections", "WatchEvents", "GetExport"}
    assert hasattr(pb_grpc, "EdgeServiceStub") and hasattr(pb_grpc, "add_EdgeServiceServicer_to_server")


def test_committed_descriptor_matches_the_proto_file(tmp_path: Path) -> None:
    """Whatever protoc version made the committed code, it must describe today's .proto."""
    protoc = pytest.importorskip("grpc_tools.protoc", reason="grpcio-tools (dev extra) compiles the .proto")
    from google.protobuf import descriptor_pb2

    out = tmp_path / "edge.desc"
    assert protoc.main(["protoc", f"-I{ROOT / 'proto'}", f"--descriptor_set_out={out}", str(PROTO)]) == 0
    fresh = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    for message in _all_messages(fresh.message_type):
        for field in message.field:
            field.ClearField("json_name")  # protoc adds it to descriptor sets, not to Python code
    committed = descriptor_pb2.FileDescriptorProto.FromString(pb.DESCRIPTOR.serialized_pb)
    assert committed == fresh, "edge/_proto is stale: run python tools/gen_proto.py"


def _all_messages(messages: Any) -> Iterator[Any]:
    for message in messages:
        yield message
        yield from _all_messages(message.nested_type)


def test_generated_code_is_what_the_generator_writes_today(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools (dev extra) regenerates the code")
    from importlib.metadata import version

    installed, committed = version("grpcio-tools"), committed_tools_version()
    if installed != committed:
        pytest.skip(f"byte comparison needs grpcio-tools {committed} (installed: {installed}); the descriptor test "
                    "still checks the contents")
    written = gen_proto().generate(tmp_path)
    assert {p.name for p in written} == {p.name for p in GENERATED.glob("*.py*") if p.is_file()}
    for fresh in written:
        assert fresh.read_bytes() == (GENERATED / fresh.name).read_bytes(), (
            f"edge/_proto/{fresh.name} is stale: run python tools/gen_proto.py"
        )


def test_generated_modules_import_from_the_package_not_a_top_level_mitosis() -> None:
    text = (GENERATED / "edge_pb2_grpc.py").read_text(encoding="utf-8")
    assert "from edge._proto import edge_pb2" in text and "from mitosis" not in text


def test_docs_describe_every_message_field_by_field() -> None:
    docs = DOCS.read_text(encoding="utf-8")
    missing = []
    for message in pb.DESCRIPTOR.message_types_by_name.values():
        heading = re.search(rf"^#+ `?{message.name}`?\s*$", docs, re.MULTILINE)
        if heading is None:
            missing.append(message.name)
            continue
        section = docs[heading.end():]
        following = re.search(r"^#+ ", section, re.MULTILINE)
        section = section[: following.start()] if following else section
        missing += [f"{message.name}.{f.name}" for f in message.fields if f"`{f.name}`" not in section]
    for enum in pb.DESCRIPTOR.enum_types_by_name.values():
        missing += [v.name for v in enum.values if v.name not in docs]
    assert not missing, f"docs/api.md does not document: {missing}"
