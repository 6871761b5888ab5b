"""Build hook of the Sandfleet Python SDK: generates the gRPC stubs at build time.

The stubs (``sandfleet/_proto/sandfleet_pb2.py``, its ``.pyi`` and
``sandfleet_pb2_grpc.py``) are generated from ``proto/sandfleet/v1/sandfleet.proto``
with grpcio-tools (a build requirement) every time the package is built, and are
never committed. ``proto`` is a link to the repository's ``proto/proto``; an
sdist carries the resolved files.

The generated code checks at import that the installed ``protobuf`` and
``grpcio`` are at least as new as the generator, so the package's runtime
requirements are derived from the grpcio-tools that generated it.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path
from typing import ClassVar

from setuptools import Command, setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = Path(__file__).resolve().parent
PROTO_ROOT = HERE / "proto"
PROTO_FILE = "sandfleet/v1/sandfleet.proto"
OUT_DIR = HERE / "src" / "sandfleet" / "_proto"

# Older generators do not write the import-time version checks this relies on.
MIN_GRPCIO = "1.66.0"


def _requirements() -> list[str]:
    """The runtime requirements: grpcio and protobuf, at least as new as the generator.

    Generates the stubs to read the versions they were generated for.
    """
    try:
        grpcio_version, gencode_version = generate_stubs()
    except ImportError:
        # Metadata queries without the build requirements (never for a real build).
        return [f"grpcio>={MIN_GRPCIO}", "protobuf>=5.27.2"]
    # The generated messages need a protobuf runtime of the same major version
    # at least as new as the generator.
    major = int(gencode_version.split(".")[0])
    return [f"grpcio>={grpcio_version}", f"protobuf>={gencode_version},<{major + 1}"]


def generate_stubs() -> tuple[str, str]:
    """Generates the message and service modules into ``src/sandfleet/_proto``.

    Returns the grpcio and protobuf versions the generated code asks for at import.
    """
    from grpc_tools import protoc

    proto = PROTO_ROOT / PROTO_FILE
    if not proto.is_file():
        raise RuntimeError(
            f"{proto} is missing: build from a Sandfleet checkout (sdk/python links to proto/proto) or an sdist"
        )
    import grpc_tools

    well_known = Path(grpc_tools.__file__).resolve().parent / "_proto"
    with tempfile.TemporaryDirectory(prefix="sandfleet-stubs-") as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{well_known}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            PROTO_FILE,
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto}")
        generated = Path(tmp) / "sandfleet" / "v1"
        OUT_DIR.mkdir(parents=True, exist_ok=True)
        for name in ("sandfleet_pb2.py", "sandfleet_pb2.pyi"):
            shutil.copyfile(generated / name, OUT_DIR / name)
        # The service module imports the messages by their proto path
        # (`from sandfleet.v1 import sandfleet_pb2`), which inside this package
        # must be a relative import.
        grpc_module = (generated / "sandfleet_pb2_grpc.py").read_text(encoding="utf-8")
        grpc_module, n = re.subn(
            r"^from sandfleet\.v1 import sandfleet_pb2 as ",
            "from . import sandfleet_pb2 as ",
            grpc_module,
            flags=re.MULTILINE,
        )
        if n != 1:
            raise RuntimeError("unexpected import layout in the generated sandfleet_pb2_grpc.py")
        (OUT_DIR / "sandfleet_pb2_grpc.py").write_text(grpc_module, encoding="utf-8")
        messages = (generated / "sandfleet_pb2.py").read_text(encoding="utf-8")
    (OUT_DIR / "__init__.py").write_text(
        '"""Generated at build time from proto/sandfleet/v1/sandfleet.proto; do not edit."""\n',
        encoding="utf-8",
    )
    grpc_match = re.search(r"^GRPC_GENERATED_VERSION = '([0-9.]+)'", grpc_module, flags=re.MULTILINE)
    pb_match = re.search(
        r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+),",
        messages,
    )
    grpcio_version = grpc_match.group(1) if grpc_match else MIN_GRPCIO
    gencode_version = ".".join(pb_match.groups()) if pb_match else "5.27.2"
    return grpcio_version, gencode_version


class GenerateStubs(Command):
    """``python setup.py generate_stubs``: (re)generates the gRPC stubs in place."""

    description = "generate the gRPC stubs from proto/"
    user_options: ClassVar[list[tuple[str, str | None, str]]] = []

    def initialize_options(self) -> None:
        """No options."""

    def finalize_options(self) -> None:
        """No options."""

    def run(self) -> None:
        """Generates the stubs."""
        generate_stubs()


class BuildPyWithStubs(build_py):
    """build_py that generates the stubs first, so every wheel carries fresh ones."""

    def run(self) -> None:
        """Generates the stubs, then builds as usual."""
        generate_stubs()
        super().run()


class SdistWithProto(sdist):
    """sdist that resolves the ``proto`` link into real files."""

    def make_release_tree(self, base_dir: str, files: list[str]) -> None:
        """The release tree, with ``proto`` as real files."""
        super().make_release_tree(base_dir, files)
        target = Path(base_dir) / "proto"
        if target.is_symlink():
            target.unlink()
        if not target.exists():
            shutil.copytree(PROTO_ROOT, target, symlinks=False)


setup(
    install_requires=_requirements(),
    packages=["sandfleet", "sandfleet._proto"],
    package_dir={"": "src"},
    package_data={"sandfleet": ["py.typed"], "sandfleet._proto": ["*.pyi"]},
    cmdclass={"build_py": BuildPyWithStubs, "sdist": SdistWithProto, "generate_stubs": GenerateStubs},
)
