"""Mutation check of the wiring: each named mutant is a small textual patch applied to a scratch copy of the
project, then the tests expected to kill it run in that copy; a mutant is killed when they fail.

    flock /tmp/m3-heavy.lock python scripts/mutants.py            # all mutants (CPU, ~30-40 min on 2 cores)
    flock /tmp/m3-heavy.lock python scripts/mutants.py index_head_swap init_blocks_ignored
    python scripts/mutants.py --list

Isolation: the copy lives in /tmp/mutant_<name>; pytest runs there with PYTHONPATH=<copy>:<copy>/cpu_shim, so
that the test process *and every server it starts* import the copy's `sglang_m3` (the venv's editable install
points at /work/main, but its finder comes after PYTHONPATH). A canary proves it: the copy's
`sglang_m3/__init__.py` appends `<pid> <its own path>` to a file named by $M3_MUTANT_CANARY on import; a run
counts only if every import came from the copy and at least one from a process other than pytest (a server).
Baseline: `--baseline` runs every selection on an unmutated copy first (all must pass, else a kill means
nothing).

Output: one line per mutant (killed / SURVIVED / patch-missing / not-isolated), the first failing test, the
time, and a Markdown table (`--markdown FILE`) for README.md's Testing section. Exit status 1 if any mutant
survived or could not be applied.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    what: str
    path: str       # file in the project
    old: str        # must occur exactly once
    new: str
    tests: tuple[str, ...]  # pytest arguments (paths, -k ...) expected to kill it


_SPARSE_TOP = "        pool = self.token_to_kv_pool\n        # K/V and the index key are always stored together"

MUTANTS = [
    Mutant("index_head_swap", "index heads swapped across KV groups (index_q.flip(1) at the top of the sparse forward)",
           "sglang_m3/attention/backend.py", _SPARSE_TOP,
           "        index_q = index_q.flip(1)\n" + _SPARSE_TOP,
           ("tests/test_oracle_kv_heads.py", "-k", "match")),
    Mutant("index_k_store_slot", "index key stored one slot off (loc + 1) by the layer's K/V/index-key store",
           "sglang_m3/attention/reference.py",
           "    store_index_k(index_k_cache, loc, index_k)\n",
           "    store_index_k(index_k_cache, loc + 1, index_k)\n",
           ("tests/test_oracle_kv_heads.py", "-k", "match")),
    Mutant("init_blocks_ignored", "the backend passes init_blocks=0 whatever the config says",
           "sglang_m3/attention/backend.py",
           "topk_blocks=self.sparse.topk_blocks, init_blocks=self.sparse.init_blocks,",
           "topk_blocks=self.sparse.topk_blocks, init_blocks=0,",
           ("tests/test_oracle_kv_heads.py", "-k", "match")),
    Mutant("local_block_off_by_one", "forced local blocks start one block late (own block not forced)",
           "sglang_m3/attention/reference.py",
           "(blk >= nb - local_blocks)",
           "(blk >= nb - local_blocks + 1)",
           ("tests/test_msa_reference.py",)),
    Mutant("q_head_kv_group_interleaved", "query head h reads KV head h % Hkv instead of h // group",
           "sglang_m3/attention/reference.py",
           "qc = q[rows_t].float().view(C, hkv, group, d)",
           "qc = q[rows_t].float().view(C, group, hkv, d).transpose(1, 2)",
           ("tests/test_msa_reference.py",)),
    Mutant("disable_index_value_unchecked", "sparse_disable_index_value=0 no longer refused",
           "sglang_m3/config.py",
           "_require(not is_sparse or disabled,",
           "_require(True or not is_sparse or disabled,",
           ("tests/test_config.py",)),
    Mutant("pool_pp_filter_ignored", "the pool keeps index rows for every sparse layer, not this pipeline stage's",
           "sglang_m3/attention/pool.py",
           "if self.start_layer <= l < self.end_layer)",
           ")",
           ("tests/test_pool.py",)),
    Mutant("cell_size_without_index_lane", "per-token cell size ignores the index lane",
           "sglang_m3/plugin.py",
           "cell += index_k_bytes_per_token(",
           "cell += 0 * index_k_bytes_per_token(",
           ("tests/test_plugin.py", "-k", "cell_size")),
    Mutant("move_kv_drops_index_lane", "moving K/V slots leaves the index rows behind",
           "sglang_m3/attention/pool.py",
           "            buf[tgt_loc] = buf[src_loc]",
           "            pass",
           ("tests/test_pool.py",)),
    Mutant("swiglu_clamp_removed", "SwiGLU-OAI gate clamp removed",
           "sglang_m3/layers/swiglu.py",
           "gate = gate.clamp(max=limit)",
           "gate = gate",
           ("tests/test_layers.py", "-k", "swiglu")),
    Mutant("routing_bias_ignored", "router top-k ignores e_score_correction_bias",
           "sglang_m3/layers/moe.py",
           "torch.topk(scores + correction_bias.float(), top_k, dim=-1)",
           "torch.topk(scores, top_k, dim=-1)",
           ("tests/test_layers.py", "-k", "route or moe")),
    Mutant("rope_not_neox", "RoPE pairs channels GPT-J style (interleaved) instead of NeoX rotate-half",
           "sglang_m3/layers/qk_norm_rope.py",  # the twin: the CPU path of the fused norm + RoPE
           "        a, b = z[..., :half], z[..., half:rotary_dim]\n"
           "        z = torch.cat([a * cos - b * sin, b * cos + a * sin, z[..., rotary_dim:]], dim=-1)\n",
           "        a, b = z[..., 0:rotary_dim:2], z[..., 1:rotary_dim:2]\n"
           "        z = torch.cat([torch.stack([a * cos - b * sin, b * cos + a * sin], -1).flatten(-2),"
           " z[..., rotary_dim:]], dim=-1)\n",
           ("tests/test_layers.py", "-k", "rope")),
    Mutant("tp_index_head_slice", "every TP rank keeps index heads from 0 instead of those of its KV heads",
           "sglang_m3/layers/qkv_index.py",
           '"index_q": (kv_local * index_dim, num_kv_heads * index_dim, kv_shard),',
           '"index_q": (kv_local * index_dim, num_kv_heads * index_dim, 0),',
           ("tests/test_layers.py", "-k", "tp_rank")),
    Mutant("hicache_refusal_removed", "--enable-hierarchical-cache no longer refused",
           "sglang_m3/plugin.py",
           'if getattr(server_args, "enable_hierarchical_cache", False):',
           "if False:",
           ("tests/test_plugin.py", "-k", "refused")),
    Mutant("pd_disaggregation_refusal_removed", "PD disaggregation no longer refused",
           "sglang_m3/plugin.py",
           'if getattr(server_args, "disaggregation_mode", "null") not in (None, "null"):',
           "if False:",
           ("tests/test_plugin.py", "-k", "refused")),
    Mutant("decode_rows_all_request_0", "torch-path decode metadata: every decode token placed at row 0",
           "sglang_m3/attention/backend.py",
           "extend_start_loc = torch.arange(bs, dtype=torch.int32, device=seq_lens.device)",
           "extend_start_loc = torch.zeros(bs, dtype=torch.int32, device=seq_lens.device)",
           ("tests/test_backend.py",)),
]

CANARY = '''
import os as _os
if _os.environ.get("M3_MUTANT_CANARY"):
    with open(_os.environ["M3_MUTANT_CANARY"], "a") as _f:
        _f.write(f"{_os.getpid()} {_os.path.abspath(__file__)}\\n")
'''


def make_copy(dest: Path) -> None:
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(".git", "__pycache__", ".pytest_cache", "*.egg-info"))
    init = dest / "sglang_m3" / "__init__.py"
    init.write_text(init.read_text() + CANARY)


def apply(dest: Path, m: Mutant) -> bool:
    f = dest / m.path
    src = f.read_text()
    if src.count(m.old) != 1:
        return False
    f.write_text(src.replace(m.old, m.new))
    return True


def run_tests(dest: Path, tests, timeout: float) -> tuple[int | None, str, float, list[str]]:
    """(pytest exit code or None on timeout, output, seconds, canary lines)."""
    canary = dest / "canary.txt"
    canary.unlink(missing_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(dest), str(dest / "cpu_shim")])
    env["M3_MUTANT_CANARY"] = str(canary)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-rf", "-p", "no:cacheprovider", *tests]
    t0 = time.time()
    try:
        p = subprocess.run(cmd, cwd=dest, env=env, capture_output=True, text=True, timeout=timeout,
                           start_new_session=True)
        rc, out = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        rc, out = None, (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
    lines = canary.read_text().splitlines() if canary.exists() else []
    return rc, out, time.time() - t0, lines


def isolated(dest: Path, lines: list[str], needs_server: bool) -> bool:
    """Every sglang_m3 import came from the copy, and (when servers ran) not only from one process."""
    if not lines or not all(line.split(" ", 1)[1].startswith(str(dest) + os.sep) for line in lines):
        return False
    return not needs_server or len({line.split(" ", 1)[0] for line in lines}) > 1


def first_failure(out: str) -> str:
    m = re.search(r"^FAILED (\S+)", out, re.M) or re.search(r"^ERROR (\S+)", out, re.M)
    return m.group(1) if m else ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help="mutants to run (default: all)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--baseline", action="store_true", help="first run every selection on an unmutated copy")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds per pytest run")
    ap.add_argument("--markdown", type=Path, help="write the result table here")
    ap.add_argument("--keep", action="store_true", help="keep the /tmp/mutant_* copies")
    a = ap.parse_args(argv)
    chosen = [m for m in MUTANTS if not a.names or m.name in a.names]
    if a.list:
        for m in MUTANTS:
            print(f"{m.name:32s} {m.path}: {m.what}  [{' '.join(m.tests)}]")
        return 0
    unknown = set(a.names) - {m.name for m in MUTANTS}
    if unknown:
        ap.error(f"unknown mutants: {sorted(unknown)}")

    server_tests = ("tests/test_oracle_kv_heads", "tests/test_server", "tests/test_bad_input")
    if a.baseline:
        dest = Path("/tmp/mutant_baseline")
        make_copy(dest)
        for sel in dict.fromkeys(m.tests for m in chosen):
            rc, out, secs, lines = run_tests(dest, sel, a.timeout)
            ok = rc in (0, 5) and isolated(dest, lines, False)  # 5: nothing selected (reported below)
            print(f"baseline {' '.join(sel)}: rc={rc} {secs:.0f}s {'ok' if ok else 'FAILED'}"
                  + ("" if rc != 5 else " (no test selected)"), flush=True)
            if not ok:
                print(out[-3000:])
                return 1
        shutil.rmtree(dest)

    rows, bad = [], 0
    for m in chosen:
        dest = Path(f"/tmp/mutant_{m.name}")
        make_copy(dest)
        if not apply(dest, m):
            verdict, test, secs = "patch-missing", "", 0.0
        else:
            rc, out, secs, lines = run_tests(dest, m.tests, a.timeout)
            needs_server = any(t.startswith(server_tests) for t in m.tests)
            if not isolated(dest, lines, needs_server and rc != 5):
                verdict, test = "not-isolated", ""
            elif rc is None:
                verdict, test = "killed (timeout)", ""
            elif rc == 5:
                verdict, test = "SURVIVED (no test selected)", ""
            elif rc == 0:
                verdict, test = "SURVIVED", ""
            else:
                verdict, test = "killed", first_failure(out) or f"pytest rc={rc}"
                if rc not in (1,):  # collection/usage errors are not kills
                    verdict = f"error rc={rc}"
                    print(out[-2000:])
        bad += not verdict.startswith("killed")
        rows.append((m, verdict, test, secs))
        print(f"{m.name:32s} {verdict:28s} {secs:6.0f}s  {test}", flush=True)
        if not a.keep:
            shutil.rmtree(dest, ignore_errors=True)

    table = ["| mutant | what it breaks | result | killed by | time |", "|---|---|---|---|---|"]
    for m, verdict, test, secs in rows:
        table.append(f"| `{m.name}` | {m.what} (`{m.path}`) | {verdict} | `{test}` | {secs:.0f} s |" if test else
                     f"| `{m.name}` | {m.what} (`{m.path}`) | {verdict} | | {secs:.0f} s |")
    print("\n".join(table))
    if a.markdown:
        a.markdown.write_text("\n".join(table) + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
