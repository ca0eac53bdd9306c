"""Maps the repository's folders to collision-free import names (see pyproject.toml), and compiles
the proto sources in protos/ into epp/protocols/ (grpcio-tools and googleapis-common-protos are
build requirements) on every build, so a clean clone never runs stale or missing generated code."""

import shutil
import tempfile
from pathlib import Path

from setuptools import find_packages, setup

PACKAGE_DIRS = {"llmepp": "epp", "llmepp.plugins": "plugins", "llmepp_sim": "simulator"}
ROOT = Path(__file__).resolve().parent
PROTO_ROOT = ROOT / "protos"
GENERATED = ROOT / "epp" / "protocols"


def compile_protos() -> None:
    try:
        import google.api
        import grpc_tools
        from grpc_tools import protoc
    except ImportError as e:  # a build without isolation, in an environment lacking the build requirements
        raise SystemExit(
            f"building llm-epp compiles protos/ and needs grpcio-tools and googleapis-common-protos ({e}); "
            "install them or build with isolation (pip's default)"
        ) from None

    sources = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "llmepp" / "protocols").glob("*.proto"))
    includes = [
        str(PROTO_ROOT),
        str(Path(grpc_tools.__file__).parent / "_proto"),  # google/protobuf/*
        # google/api/httpbody.proto (googleapis-common-protos; google.api may be a namespace package)
        *(str(Path(p).parents[1]) for p in google.api.__path__ if (Path(p) / "httpbody.proto").exists()),
    ]
    with tempfile.TemporaryDirectory() as out:
        args = ["protoc", *(f"-I{i}" for i in includes)]
        args += [f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}", *sources]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {sources}")
        for path in (Path(out) / "llmepp" / "protocols").iterdir():
            shutil.copyfile(path, GENERATED / path.name)


compile_protos()

packages = []
for name, folder in PACKAGE_DIRS.items():
    packages.append(name)
    packages += [f"{name}.{sub}" for sub in find_packages(folder)]

setup(packages=packages, package_dir=PACKAGE_DIRS)
