#!/usr/bin/env python
"""Sweep the launch knobs of our MSA kernels (``sglang_m3/attention/kernels/common.py``) on one GPU.

Each combination of knob values is set on the module, then ``kernel_decode.py`` runs ours only with the
remaining arguments; its per-case lines (total and per-stage µs) are printed, prefixed by the combination.
This is how the constants in common.py are chosen; record what it shows there and in BENCHMARKS.md.

    python benchmarks/sweep_launch_knobs.py INDEXER_MIN_BLOCKS_PER_SPLIT=1,2,4 INDEXER_MAX_SPLITS=64,128 \\
        -- --heads tp1 --bs 1,8 --ctx 4096,131072 --prefill ''
"""

from __future__ import annotations

import itertools
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import kernel_decode  # noqa: E402
from sglang_m3.attention.kernels import common  # noqa: E402


def main(argv: list[str]) -> None:
    split = argv.index("--") if "--" in argv else len(argv)
    knobs, rest = argv[:split], argv[split + 1:]
    names, values = [], []
    for spec in knobs:
        name, _, vals = spec.partition("=")
        if not hasattr(common, name):
            raise SystemExit(f"common.py has no knob {name!r}")
        names.append(name)
        values.append([type(getattr(common, name))(v) for v in vals.split(",")])
    for combo in itertools.product(*values):
        for name, v in zip(names, combo):
            setattr(common, name, v)
        print("## " + " ".join(f"{n}={v}" for n, v in zip(names, combo)), flush=True)
        kernel_decode.main([*rest, "--skip-intree", "--out", tempfile.mkdtemp(prefix="sweep_")])


if __name__ == "__main__":
    main(sys.argv[1:])
