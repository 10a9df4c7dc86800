#!/usr/bin/env python
"""Merge fused-MoE configs tuned by benchmarks/tune_moe.py into the packaged ones (sglang_m3/moe_configs/configs).

Every file under TUNE_OUT/configs/triton_<ver>/ updates the packaged file of the same name: the tuned token counts M
replace or join the packaged entries, the others stay. A file with no packaged counterpart is copied.

    python scripts/merge_moe_configs.py TUNE_OUT      # e.g. the --out of a GPU tuning run
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PACKAGED = Path(__file__).resolve().parents[1] / "sglang_m3" / "moe_configs" / "configs"


def merge(tune_out: Path, packaged: Path = PACKAGED) -> list[str]:
    """Returns one line per merged file: its name and the M values taken from the tuning run.
    FileNotFoundError when tune_out has no configs/ folder."""
    if not (tune_out / "configs").is_dir():
        raise FileNotFoundError(f"{tune_out}/configs: not a tune_moe.py output")
    done = []
    for src in sorted((tune_out / "configs").glob("triton_*/*.json")):
        dst = packaged / src.parent.name / src.name
        tuned = json.loads(src.read_text())
        configs = json.loads(dst.read_text()) if dst.exists() else {}
        configs.update(tuned)
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(json.dumps({k: configs[k] for k in sorted(configs, key=int)}, indent=4) + "\n")
        done.append(f"{src.parent.name}/{src.name}: M {sorted(map(int, tuned))}")
    return done


if __name__ == "__main__":
    print("\n".join(merge(Path(sys.argv[1]))) or "nothing to merge")
