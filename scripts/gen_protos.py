#!/usr/bin/env python
"""Generate the Python protobuf/gRPC code of protos/ into the ``fedstream`` package (with .pyi stubs).

Run after editing any .proto file: ``python scripts/gen_protos.py``. ``--check`` regenerates into a
temporary folder and exits 1 if the committed code differs (tests/test_protos_generated.py does this).
The output is reproducible for a given grpcio-tools version, which pyproject.toml pins.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "protos"
PACKAGE_DIR = Path("fedstream") / "v1"
INIT_DOC = {
    Path("fedstream"): '"""Generated protobuf and gRPC code of protos/fedstream (do not edit; see scripts/gen_protos.py)."""\n',
    PACKAGE_DIR: '"""fedstream.v1 wire messages and service stubs, generated from protos/fedstream/v1."""\n',
}


def generate(out_root: Path) -> list[Path]:
    """Run protoc into ``out_root``; return the generated files relative to it."""
    from grpc_tools import protoc  # imported here: only needed by developers and tests

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files under {PROTO_ROOT / PACKAGE_DIR}")
    include = str(Path(protoc.__file__).parent / "_proto")
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out_root}", f"--pyi_out={out_root}",
            f"--grpc_python_out={out_root}", *protos]
    code = protoc.main(args)
    if code != 0:
        raise SystemExit(f"protoc failed with exit code {code}")
    for folder, doc in INIT_DOC.items():
        (out_root / folder / "__init__.py").write_text(doc)
    return sorted(p.relative_to(out_root) for p in (out_root / "fedstream").rglob("*") if p.is_file())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--check", action="store_true", help="fail if the committed generated code is stale")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        files = generate(Path(tmp))
        if args.check:
            committed = sorted(p.relative_to(ROOT) for p in (ROOT / "fedstream").rglob("*")
                               if p.is_file() and "__pycache__" not in p.parts)
            stale = [str(f) for f in files if not (ROOT / f).exists() or not filecmp.cmp(Path(tmp) / f, ROOT / f, shallow=False)]
            extra = [str(f) for f in committed if f not in files]
            if stale or extra:
                print("generated protobuf code is stale; run: python scripts/gen_protos.py", file=sys.stderr)
                for f in stale:
                    print(f"  differs or missing: {f}", file=sys.stderr)
                for f in extra:
                    print(f"  not generated any more: {f}", file=sys.stderr)
                return 1
            print(f"generated protobuf code is up to date ({len(files)} files)")
            return 0
        shutil.rmtree(ROOT / "fedstream", ignore_errors=True)
        for f in files:
            (ROOT / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(tmp) / f, ROOT / f)
        print(f"wrote {len(files)} files under fedstream/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
