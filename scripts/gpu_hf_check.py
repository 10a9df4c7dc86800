"""Which GPU server agrees with transformers? Scores the first teacher-forced sequence of gpu_e2e's state
with the HF oracle (fp32, CPU) and prints max/mean |Δ logprob| against each server's scores."""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scripts.gpu_e2e import write_checkpoint  # noqa: E402
from tests.hf_oracle import hf_logits  # noqa: E402

state = json.loads(Path("/tmp/m3_gpu_e2e_state.json").read_text())
ckpt = write_checkpoint(Path("/tmp/m3_hf"))
for i in (0, 1):
    ids = state["forced"][i]
    logp = torch.log_softmax(hf_logits(ckpt, ids).double(), -1)
    ref = [logp[t, ids[t + 1]].item() for t in range(len(ids) - 1)]
    for name, scores in state["scores"].items():
        d = [abs(a - b) for a, b in zip(scores[i], ref)]
        print(f"seq {i} ({len(ids)} tokens) {name:10s} vs HF fp32: max {max(d):.4f} mean {sum(d) / len(d):.4f}")
