"""The decode path's GPU-only kernel forms compile for Hopper (sm_90a) on this CPU: Triton's compiler and the ptxas
its wheel ships. The interpreter tests run these kernels' logic, not their compilation, and some forms exist only on
a GPU (the merge's bitonic top-k) or only at M3's shapes (the select kernel with both its ranked and threshold paths
at RANK_MAX 256): a form that does not compile would stop the server at its first decode-graph warm-up. The launches
are the ones index_block_topk makes for M3's decode shapes, recorded by spies instead of run; ptxas must report no
spills (a spilling select kernel was once 2x slower, common.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

torch = pytest.importorskip("torch")
triton = pytest.importorskip("triton")

_PTR = {torch.int32: "*i32", torch.int64: "*i64", torch.bfloat16: "*bf16", torch.float32: "*fp32"}


def _launches(batch: int, context: int, heads: int = 4, topk: int = 16, block: int = 128) -> dict:
    """{kernel name: (kernel, args, kwargs)} of one decode-shaped index_block_topk call at M3's index geometry."""
    from sglang_m3.attention.kernels import common
    from sglang_m3.attention.kernels import indexer as I
    from tests.test_kernels import indexer_launches

    with indexer_launches() as launches:
        r2t = torch.zeros(batch, context, dtype=torch.int32)
        rows = torch.arange(batch, dtype=torch.int64)
        seq = torch.full((batch,), context, dtype=torch.int64)
        meta = common.MSAMeta(batch, batch, heads, 1, torch.zeros(batch, dtype=torch.int32),
                              torch.full((batch,), context - 1, dtype=torch.int32))
        iq, ik = torch.zeros(batch, heads, 128, dtype=torch.bfloat16), torch.zeros(8, 128, dtype=torch.bfloat16)
        I.index_block_topk(iq, ik, r2t, rows, seq, None, None, block_size=block, topk_blocks=topk, local_blocks=1,
                           meta=meta)
    return {name: (kernel, args, kw) for name, kernel, args, kw in launches}


def _ptxas_report(kernel, args, kw) -> str:
    """Compile the launch (args/kw as recorded) for sm_90a and return ptxas' -v report."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    options = {k: kw[k] for k in ("num_warps", "num_stages") if k in kw}
    sig, constexprs = {}, {}
    for i, p in enumerate(kernel.params):
        if p.is_constexpr:
            sig[p.name] = "constexpr"
            constexprs[(i,)] = kw[p.name] if p.name in kw else p.default
            continue
        v = args[i] if i < len(args) else kw[p.name]
        sig[p.name] = _PTR[v.dtype] if isinstance(v, torch.Tensor) else ("i64" if abs(int(v)) >= 2**31 else "i32")
    compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32), options=options)
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as d:
        ptx = Path(d) / "k.ptx"
        ptx.write_text(compiled.asm["ptx"])
        r = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", str(ptx), "-o", os.devnull], capture_output=True,
                           text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout + r.stderr


@pytest.mark.parametrize("batch,context,name", [
    (1, 133120, "_indexer_select_kernel"),   # two-pass: rows ranked up to RANK_MAX, threshold past it
    (40, 133120, "_indexer_merge_kernel"),   # split (bs > INDEXER_TWO_PASS_MAX_TILES): the bitonic merge
])
def test_decode_kernel_forms_compile_for_sm90_without_spills(batch, context, name):
    from sglang_m3.attention.kernels import common

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this triton wheel has no ptxas")
    launches = _launches(batch, context)
    kernel, args, kw = launches[name]
    if name == "_indexer_select_kernel":  # the form M3 decodes with: both paths compiled in
        assert kw["RANK_MAX"] == common.INDEXER_RANK_MAX_BLOCKS > 0
        assert kw["G"] == (common.INDEXER_THRESHOLD_GROUP if common.INDEXER_LONG_ROW_SELECT == "threshold" else 0)
    else:
        assert kw["BITONIC"]
    report = _ptxas_report(kernel, args, kw)
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", report)]
    print(name, [ln.strip() for ln in report.splitlines() if "registers" in ln])
    assert spills and not any(spills), report
