"""Generates tokenvault_worker/_pb from the workspace's proto/ with grpcio-tools (pinned in
scripts/python-requirements.txt): the messages with their type stubs (.pyi) and the gRPC stubs.
The generated files are committed; tests/test_stubs.py regenerates them and fails if they
differ, so they always match the proto.

    python generate.py [OUT_DIR]      default: tokenvault_worker/_pb
"""
import pathlib
import sys

from grpc_tools import protoc

HERE = pathlib.Path(__file__).resolve().parent
PROTO = HERE.parent.parent / "proto"


def generate(out: pathlib.Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    code = protoc.main([
        "grpc_tools.protoc",
        f"-I{PROTO}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        str(PROTO / "tokenvault/v1/tokenvault.proto"),
    ])
    if code != 0:
        raise SystemExit(f"protoc failed ({code})")
    generated = out / "tokenvault" / "v1"
    # Flat, with a relative import, so the package needs no top-level `tokenvault` module.
    for name in ("tokenvault_pb2.py", "tokenvault_pb2.pyi", "tokenvault_pb2_grpc.py"):
        text = (generated / name).read_text()
        text = text.replace(
            "from tokenvault.v1 import tokenvault_pb2 as tokenvault_dot_v1_dot_tokenvault__pb2",
            "from . import tokenvault_pb2 as tokenvault_dot_v1_dot_tokenvault__pb2",
        )
        (out / name).write_text(text)
        (generated / name).unlink()
    generated.rmdir()
    (out / "tokenvault").rmdir()


if __name__ == "__main__":
    generate(pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "tokenvault_worker" / "_pb")
