"""Regenerates the committed gRPC code from ``veil.proto``.

Run ``make proto`` after editing the .proto. ``tests/unit/controller/test_api_generated.py``
fails when the committed files differ from what this produces.
"""

from __future__ import annotations

import pathlib
import re
import tempfile

API_DIR = pathlib.Path(__file__).resolve().parent
PROTO = "veil.proto"
OUTPUTS = ("veil_pb2.py", "veil_pb2.pyi", "veil_pb2_grpc.py")


def generate(out_dir: pathlib.Path) -> None:
    """Writes the generated modules for ``veil.proto`` into ``out_dir``."""
    from grpc_tools import protoc  # dev dependency, imported lazily

    args = [
        "protoc",
        f"-I{API_DIR}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(API_DIR / PROTO),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed on controller/api/veil.proto; see the message above")
    grpc_mod = out_dir / "veil_pb2_grpc.py"
    # protoc emits a top-level import; make it package-relative so the module
    # works from controller.api.
    text = grpc_mod.read_text()
    text = re.sub(
        r"^import veil_pb2 as veil__pb2$", "from . import veil_pb2 as veil__pb2", text, flags=re.M
    )
    grpc_mod.write_text(text)


def render() -> dict[str, str]:
    """Returns the generated files as text, without touching the package."""
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp)
        generate(out)
        return {name: (out / name).read_text() for name in OUTPUTS}


def main() -> None:
    for name, text in render().items():
        (API_DIR / name).write_text(text)
        print(f"wrote controller/api/{name}")


if __name__ == "__main__":
    main()
