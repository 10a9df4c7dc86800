"""Judge the GPU servers of scripts/gpu_e2e.py against an fp32 oracle, off the device.

gpu_e2e.py writes `scores.json`: the teacher-forced token sequences and every server's bf16 logprobs of them.
This script writes the same bf16 checkpoint (same shape, same seed), serves it on this CPU with the plugin's exact
torch path in fp32 (matched to transformers fp32 at 1e-5, tests/test_server.py), scores the same sequences and
reports each server's mean / max |Δ logprob| from fp32, per prompt part and continuation part. Whether ours or
the in-tree server is closer to fp32 says which side a disagreement between them comes from.

    python scripts/e2e_fp32_oracle.py GPU_OUT/scores.json [--out fp32_oracle.md]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gpu_e2e import diff, logprobs, write_checkpoint  # noqa: E402
from tests.conftest import Server  # noqa: E402  (the CPU launcher the tests use)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("scores", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    data = json.loads(args.scores.read_text())

    work = Path(tempfile.mkdtemp(prefix="m3_fp32_oracle_"))
    ckpt = write_checkpoint(work)
    longest = max(len(ids) for ids in data["forced"])
    server = Server(ckpt, "--context-length", str(longest + 16), "--max-total-tokens", str(2 * longest + 64),
                    log_dir=work).wait(timeout=900)
    try:
        oracle = [logprobs(server, ids) for ids in data["forced"]]
    finally:
        server.stop()

    lines = ["mean / max |Δ logprob| of each GPU server (bf16) from our CPU torch path in fp32, same checkpoint",
             "", "| server | prompt len | prompt mean / max | continuation mean / max |", "|---|---|---|---|"]
    for name, rows in data["scores"].items():
        for plen, ids, got, ref in zip(data["prompt_lens"], data["forced"], rows, oracle):
            p, d = diff(got[: plen - 1], ref[: plen - 1]), diff(got, ref, start=plen - 1)
            lines.append(f"| {name} | {plen} | {p['mean']:.3f} / {p['max']:.2f} | {d['mean']:.3f} / {d['max']:.2f} |")
    md = "\n".join(lines) + "\n"
    print(md)
    if args.out:
        args.out.write_text(md)


if __name__ == "__main__":
    main()
