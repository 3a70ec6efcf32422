#!/usr/bin/env python3
"""Make a bundle source (a whole release tree) from an example: the repository's vr/ and
configs/, with the example's changes.diff applied (patch -p1), plus its patch.json and scripts/.

    python3 patches/make_source.py patches/examples/0.1.1 /tmp/src-0.1.1
    vr patch build /tmp/src-0.1.1 --version 0.1.1 --key my.key -o vr-0.1.1.tar.gz
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TREE = ("vr", "configs")


def make_source(example: Path, out: Path) -> Path:
    if out.exists():
        raise SystemExit(f"{out} exists; give a new directory")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in TREE:
        shutil.copytree(REPO / name, out / name, ignore=ignore)
    diff = example / "changes.diff"
    if diff.exists():
        result = subprocess.run(["patch", "-p1", "--batch", "--forward", "--no-backup-if-mismatch", "-d", str(out),
                                 "-i", str(diff.resolve())], capture_output=True, text=True, check=False)  # fmt: skip
        if result.returncode != 0:
            shutil.rmtree(out, ignore_errors=True)
            raise SystemExit(f"{diff} does not apply to this tree:\n{result.stdout}{result.stderr}")
    for extra in ("patch.json", "scripts"):
        source = example / extra
        if source.is_dir():
            shutil.copytree(source, out / extra)
        elif source.is_file():
            shutil.copy2(source, out / extra)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("example", type=Path, help="an example dir (changes.diff, patch.json, scripts/)")
    parser.add_argument("out", type=Path, help="the source tree to make (must not exist)")
    args = parser.parse_args()
    print(make_source(args.example, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
