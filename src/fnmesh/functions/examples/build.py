"""Write the example functions' ONNX graphs to a directory, one ``NAME.onnx`` each.

Usage: ``python -m fnmesh.functions.examples.build OUT_DIR [--only NAME]``
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from fnmesh.functions.examples.models import EXAMPLE_NAMES, build_example


def main(argv: Sequence[str] | None = None) -> int:
    """Build the chosen examples into ``OUT_DIR``, printing one line per file; exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m fnmesh.functions.examples.build",
        description="Train the example functions and write their ONNX graphs.",
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", type=Path)
    parser.add_argument(
        "--only",
        metavar="NAME",
        action="append",
        choices=EXAMPLE_NAMES,
        help=f"build only this example (repeatable); one of: {', '.join(EXAMPLE_NAMES)}",
    )
    args = parser.parse_args(argv)

    out_dir: Path = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in args.only or EXAMPLE_NAMES:
        example = build_example(name)
        path = out_dir / f"{name}.onnx"
        # Write then rename, so a reader never loads a half-written graph.
        partial = path.with_suffix(".onnx.partial")
        partial.write_bytes(example.onnx_bytes)
        os.replace(partial, path)
        digest = hashlib.sha256(example.onnx_bytes).hexdigest()[:16]
        quality = " ".join(f"{k}={v:.3f}" for k, v in example.metrics.items())
        print(
            f"{example.function_id} {example.version} {path} "
            f"{len(example.onnx_bytes)} bytes sha256:{digest} {quality}".rstrip()
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
