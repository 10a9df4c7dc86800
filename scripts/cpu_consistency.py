"""gpu_e2e.py's self-consistency checks (decode vs prefill, radix hit vs flushed) on this CPU, for comparison with
the GPU's: same checkpoint, same prompts, our torch path throughout.

    python scripts/cpu_consistency.py [--dtype bfloat16|float32]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_e2e import PROMPT_LENS, consistency, prompt, write_checkpoint  # noqa: E402
from tests.conftest import Server  # noqa: E402  (the CPU launcher the tests use)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="m3_cpu_consistency_"))
    ckpt = write_checkpoint(work)
    server = Server(ckpt, "--dtype", args.dtype, "--context-length", "8192", "--max-total-tokens", "20000",
                    log_dir=work).wait(timeout=900)
    try:
        prompts = [prompt(n, seed=i) for i, n in enumerate(PROMPT_LENS)]
        print(json.dumps(consistency(server, prompts[1:]), indent=1))  # the sparse prompts, as on the GPU
    finally:
        server.stop()


if __name__ == "__main__":
    main()
