"""Registration: what SGLang sees with the plugin enabled, and the SGLANG_PLUGINS switch back to the in-tree M3;
every refusal of the hooks (flags and configs we do not serve), and the cell size that counts the index lane."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import cpu_env
from tests.test_layers import _SHIM  # noqa: F401  (SGLang's CPU setup, before any hook below imports SGLang)

PROBE = """
import sglang_m3
sglang_m3.enable()
sglang_m3.enable()  # idempotent
from transformers import AutoConfig, CONFIG_MAPPING
from sglang.srt.models.registry import ModelRegistry
from sglang.srt.configs import model_config
from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
cls = ModelRegistry.models["MiniMaxM3SparseForConditionalGeneration"]
print("vl", getattr(cls, "__module__", cls))
cls = ModelRegistry.models["MiniMaxM3SparseForCausalLM"]
print("text", getattr(cls, "__module__", cls))
print("config", "minimax_m3" in CONFIG_MAPPING)
print("backend", "m3_msa" in ATTENTION_BACKENDS)
print("minimax_sparse", model_config.is_minimax_sparse(type("C", (), {"architectures": ["MiniMaxM3SparseForCausalLM"]})()))
"""


def probe(**env) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE], env=cpu_env(**env), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return dict(line.split(" ", 1) for line in out.stdout.strip().splitlines())


def test_enable_registers_everything():
    seen = probe()
    assert seen == {"vl": "sglang_m3.model", "text": "sglang_m3.model", "config": "True", "backend": "True",
                    "minimax_sparse": "False"}


def test_sglang_plugins_switch_leaves_the_in_tree_m3():
    seen = probe(SGLANG_PLUGINS="none")
    assert not seen["vl"].startswith("sglang_m3") and not seen["text"].startswith("sglang_m3")
    assert seen["backend"] == "False" and seen["minimax_sparse"] == "True"


# ---- refusals and defaults of the hooks, called directly (no server) -------------------------------------------

def _server_args(**fields):
    """A real ServerArgs (so the flag names are SGLang's own) with the given fields set as the CLI would."""
    from sglang.srt.server_args import ServerArgs

    args = ServerArgs(model_path="dummy", device="cpu")
    for name, value in fields.items():
        assert hasattr(args, name), f"ServerArgs has no {name!r}"
        setattr(args, name, value)
    return args


def _hf_config(arch="MiniMaxM3SparseForCausalLM"):
    from sglang_m3.config import MiniMaxM3Config
    from sglang_m3.tiny import build_text_config

    cfg = MiniMaxM3Config(**build_text_config())
    cfg.architectures = [arch]
    return cfg


# flag (ServerArgs fields) -> text the refusal must contain (it names the flag)
REFUSED = {
    "hierarchical_cache": (dict(enable_hierarchical_cache=True), "--enable-hierarchical-cache"),
    "speculative_unserved_algorithm": (dict(speculative_algorithm="STANDALONE"), "--speculative-algorithm STANDALONE"),
    "speculative_draft_on_m3_backend": (dict(speculative_algorithm="EAGLE", speculative_draft_attention_backend="m3_msa"),
                                        "--speculative-draft-attention-backend m3_msa"),
    "pd_disaggregation_prefill": (dict(disaggregation_mode="prefill"), "PD disaggregation"),
    "pd_disaggregation_decode": (dict(disaggregation_mode="decode"), "PD disaggregation"),
    "kv_cache_dtype_fp8_e5m2": (dict(kv_cache_dtype="fp8_e5m2"), "--kv-cache-dtype fp8_e5m2"),
    "kv_cache_dtype_fp4": (dict(kv_cache_dtype="fp4_e2m1"), "--kv-cache-dtype fp4_e2m1"),
    "kv_cache_bf16_under_fp32": (dict(kv_cache_dtype="bf16", dtype="float32"), "--kv-cache-dtype bf16 with --dtype float32"),
    "kv_cache_bf16_under_fp16": (dict(kv_cache_dtype="bfloat16", dtype="float16"),
                                 "--kv-cache-dtype bfloat16 with --dtype float16"),
    "moe_runner_backend": (dict(moe_runner_backend="flashinfer_cutlass"), "--moe-runner-backend flashinfer_cutlass"),
    # SGLang's CPU engine (_server_args() is --device cpu): no Triton/FlashInfer attention, no pages, no speculation
    "cpu_attention_triton": (dict(attention_backend="triton"), "--attention-backend triton"),
    "cpu_decode_attention_flashinfer": (dict(decode_attention_backend="flashinfer"),
                                        "--decode-attention-backend flashinfer"),
    "cpu_page_size": (dict(page_size=16), "--page-size 16"),
    "cpu_speculative_ngram": (dict(speculative_algorithm="NGRAM"), "--speculative-algorithm NGRAM"),
    # _hf_config() names no dtype, which SGLang reads as float32 and, under "auto", serves as float16
    "kv_cache_bf16_under_auto_fp32_ckpt": (dict(kv_cache_dtype="bf16", dtype="auto"),
                                           "--kv-cache-dtype bf16 with --dtype auto (= float16 for this checkpoint)"),
}


def test_server_overrides_defaults():
    """Control for the refusals below: plain flags pass and get M3's defaults (our backend, the triton MoE runner);
    an explicit --attention-backend is kept (it becomes the dense delegate)."""
    from sglang_m3 import plugin

    declared = plugin._m3_server_overrides(_server_args(), _hf_config())
    assert declared.get("attention_backend") == "m3_msa" and declared.get("moe_runner_backend") == "triton"
    declared = plugin._m3_server_overrides(_server_args(attention_backend="triton", moe_runner_backend="triton",
                                                        device="cuda"), _hf_config())
    assert "attention_backend" not in declared and "moe_runner_backend" not in declared
    plugin._m3_server_overrides(_server_args(kv_cache_dtype="bf16", dtype="bfloat16"), _hf_config())  # model dtype
    import torch
    plugin._m3_server_overrides(_server_args(kv_cache_dtype="bf16", dtype=torch.bfloat16), _hf_config())  # (Engine)
    bf16_ckpt = _hf_config()
    bf16_ckpt.dtype = torch.bfloat16  # as M3's release: "auto" resolves to bf16, so a bf16 cache is the model dtype
    plugin._m3_server_overrides(_server_args(kv_cache_dtype="bf16", dtype="auto"), bf16_ckpt)
    # SGLang's CPU engine: its own attention backend named, page size 1 pass; off CPU its rules do not apply
    for fields in (dict(attention_backend="torch_native"), dict(attention_backend="m3_msa", page_size=1),
                   dict(attention_backend="intel_amx"), dict(decode_attention_backend="torch_native")):
        plugin._m3_server_overrides(_server_args(**fields), _hf_config())
    plugin._m3_server_overrides(_server_args(device="cuda", page_size=16, speculative_algorithm="NGRAM",
                                             attention_backend="flashinfer"), _hf_config())


@pytest.mark.parametrize("case", list(REFUSED))
def test_unserved_flag_is_refused_naming_it(case):
    from sglang_m3 import plugin

    fields, text = REFUSED[case]
    with pytest.raises(ValueError) as info:
        plugin._m3_server_overrides(_server_args(**fields), _hf_config())
    assert "sglang-m3" in str(info.value) and text in str(info.value), str(info.value)


def test_unsupported_config_is_refused_before_weights():
    from sglang_m3 import plugin
    from sglang_m3.config import M3ConfigError

    cfg = _hf_config()
    cfg.attention_output_gate = True
    with pytest.raises(M3ConfigError, match="attention_output_gate"):
        plugin._m3_server_overrides(_server_args(), cfg)


class _WithModel:
    """ServerArgs stand-in for the graph-config hook: only get_model_config().hf_config is read besides the flags."""

    def __init__(self, hf_config, **fields):
        self.__dict__.update(dict(cuda_graph_backend_prefill=None, disable_prefill_cuda_graph=False), **fields)
        self._hf = hf_config

    def get_model_config(self):
        return type("MC", (), {"hf_config": self._hf})()


@pytest.mark.parametrize("requested", ["full", "breakable"])
def test_graphed_prefill_is_refused(requested):
    from sglang_m3 import plugin

    args = _WithModel(_hf_config(), cuda_graph_backend_prefill=requested)
    with pytest.raises(ValueError, match=f"--cuda-graph-backend-prefill {requested}"):
        plugin._eager_prefill(lambda a: pytest.fail("original must not run"), args)


def test_prefill_graphs_off_for_m3_only():
    from sglang_m3 import plugin

    seen = []
    args = _WithModel(_hf_config())
    plugin._eager_prefill(seen.append, args)
    assert args.disable_prefill_cuda_graph is True and seen == [args]
    other = _WithModel(_hf_config(arch="LlamaForCausalLM"), cuda_graph_backend_prefill="full")
    plugin._eager_prefill(seen.append, other)  # not M3: untouched, no refusal
    assert other.disable_prefill_cuda_graph is False and seen[-1] is other


def test_enable_multimodal_is_refused_for_the_vl_packaging(monkeypatch):
    """The VL packaging is served text-only; asking for multimodal is refused, not silently ignored."""
    from sglang_m3 import plugin

    # The hook notes that this process serves M3 (plugin._m3_served, which switches the packaged MoE configs on):
    # restored afterwards, or later tests in this process see SGLang's get_moe_configs answer with ours.
    monkeypatch.setattr(plugin, "_m3_served", plugin._m3_served)

    calls = []

    def original(model_config, *args, **kwargs):
        calls.append(kwargs.get("enable_multimodal"))
        model_config.hf_config = _hf_config(arch="MiniMaxM3SparseForConditionalGeneration")
        model_config.is_multimodal = bool(kwargs.get("enable_multimodal", True))

    mc = type("MC", (), {})()
    with pytest.raises(ValueError, match="--enable-multimodal"):
        plugin._text_only_model_config(original, mc, enable_multimodal=True)
    mc = type("MC", (), {})()
    plugin._text_only_model_config(original, mc)  # default: rebuilt as a text model
    assert mc.is_multimodal is False and calls[-1] is False


# ---- the cell size counts the index lane ------------------------------------------------------------------------

def _kvc(hf_config, start_layer, end_layer, dtype):
    import torch  # noqa: F401

    return type("KVC", (), dict(model_config=type("MC", (), {"hf_config": hf_config})(),
                                layer_info=type("LI", (), dict(start_layer=start_layer, end_layer=end_layer))(),
                                kv_cache_dtype=dtype, model_dtype=dtype))()


@pytest.mark.parametrize("start,end,local_sparse", [(0, 4, 3), (0, 2, 1), (2, 4, 2), (0, 1, 0)],
                         ids=["one-stage", "pp-stage0", "pp-stage1", "dense-only-stage"])
@pytest.mark.parametrize("dtype_name", ["bfloat16", "float32"])
def test_cell_size_adds_this_stages_index_lane(start, end, local_sparse, dtype_name):
    """SGLang's per-token bytes plus, per sparse layer of this pipeline stage, one index key (Di elements at the
    model dtype): tiny M3 has sparse layers 1-3, Di = 32."""
    import torch

    from sglang_m3 import plugin

    dtype = getattr(torch, dtype_name)
    base = 1000
    cell = plugin._cell_size_with_index_k(lambda pc, kvc, n: base, None, _kvc(_hf_config(), start, end, dtype),
                                          end - start)
    assert cell == base + local_sparse * 32 * dtype.itemsize
    other = _hf_config(arch="LlamaForCausalLM")
    assert plugin._cell_size_with_index_k(lambda pc, kvc, n: base, None, _kvc(other, start, end, dtype),
                                          end - start) == base


CELL_PROBE = """
import sglang_m3, torch
sglang_m3.enable()
from types import SimpleNamespace as NS
from sglang.srt.model_executor.pool_configurator import DefaultPoolConfigurator
from sglang.srt.server_args import ServerArgs
from sglang_m3.config import MiniMaxM3Config
from sglang_m3.tiny import build_text_config
cfg = MiniMaxM3Config(**build_text_config())
cfg.architectures = ["MiniMaxM3SparseForCausalLM"]
mc = NS(hf_config=cfg, context_len=4096, get_num_kv_heads=lambda tp: 2, head_dim=32, v_head_dim=32,
        num_attention_layers=4, is_hybrid_swa=False, linear_attn_registry_result=None)
kvc = NS(model_config=mc, kv_cache_dtype=torch.bfloat16, model_dtype=torch.bfloat16, kv_cache_dtype_str="auto",
         layer_info=NS(start_layer=0, end_layer=4, num_effective_layers=4), use_mla_backend=False,
         spec_algorithm=NS(is_eagle=lambda: False, is_standalone=lambda: False, is_dflash_family=lambda: False),
         is_draft_worker=False, server_args=ServerArgs(model_path="dummy", device="cpu"), ps=NS(pp_size=1))
from sglang.srt.runtime_context import get_parallel
with get_parallel().override(tp_size=1, attn_tp_size=1, pp_size=1):
    pc = DefaultPoolConfigurator(kvc)
print("cell", pc._cell_size)
print("tokens", pc.calculate_pool_sizes(10_000_000, 1).max_total_num_tokens)
"""


def test_registered_cell_size_hook_sizes_the_pool():
    """Through SGLang's own DefaultPoolConfigurator with the plugin enabled: the cell is K+V of 4 layers (2 KV
    heads x 32 x 2 B each) plus the lane of 3 sparse layers (32 x 2 B), and a memory budget buys budget // cell
    tokens. (A server sized by --mem-fraction-static is not run: on CPU the budget is free host memory at start-up,
    which no test can predict; this checks the same arithmetic on the configurator the server uses.)"""
    out = subprocess.run([sys.executable, "-c", CELL_PROBE], env=cpu_env(), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = dict(line.split(" ", 1) for line in out.stdout.strip().splitlines() if " " in line)
    kv = 4 * 2 * (2 * 32 * 2)
    lane = 3 * 32 * 2
    assert int(seen["cell"]) == kv + lane, seen
    assert int(seen["tokens"]) == 10_000_000 // (kv + lane), seen


@pytest.mark.parametrize("flag_splits, deterministic, tile, expect", [
    (8, False, None, 64),     # SGLang's default cap: raised for M3's dense layers
    (16, False, None, 16),    # an explicit --triton-attention-num-kv-splits is kept
    (8, True, None, 8),       # deterministic inference keeps its fixed split tiles
    (8, False, 256, 8),       # so does --triton-attention-split-tile-size
])
def test_dense_delegate_kv_split_cap(flag_splits, deterministic, tile, expect):
    """The Triton dense delegate's split cap (read by SGLang when it sizes its decode buffers and by its split
    heuristic get_num_kv_splits_triton) is widened only under SGLang's default settings."""
    from types import SimpleNamespace as NS

    from sglang.srt.layers.attention.triton_backend import TritonAttnBackend
    from sglang_m3.plugin import _widen_dense_kv_splits

    dense = TritonAttnBackend.__new__(TritonAttnBackend)  # the attributes its __init__ sets, without a GPU
    dense.max_kv_splits, dense.use_mla = flag_splits, False
    dense.enable_deterministic, dense.split_tile_size = deterministic, tile
    runner = NS(server_args=NS(triton_attention_num_kv_splits=flag_splits))
    assert _widen_dense_kv_splits(dense, runner) is dense
    assert dense.max_kv_splits == expect
    other = NS(max_kv_splits=8)  # not a Triton backend: untouched
    assert _widen_dense_kv_splits(other, runner).max_kv_splits == 8


@pytest.mark.parametrize("device, hopper, page, kv, spec, fa3, expect", [
    ("cuda", True, 1, "bfloat16", None, True, "fa3"),      # Hopper, CUDA >= 12.3, bf16 cache: SGLang's own pick
    ("cuda", True, 1, "bfloat16", None, False, "triton"),  # ... unless sgl_kernel's FA3 module is missing
    ("cuda", True, 1, "float8_e4m3fn", None, True, "triton"),  # an fp8 K/V cache: the checked path is Triton's
    ("cuda", True, 1, "float16", None, True, "triton"),    # an fp16 model: checked in bf16 only
    ("cuda", True, 128, "bfloat16", None, True, "triton"),  # page size > 1: checked at 1 only
    ("cuda", True, 1, "bfloat16", "EAGLE", True, "triton"),  # speculative verify/draft: checked over Triton
    ("cuda", False, 1, "bfloat16", None, True, "triton"),  # not Hopper (or CUDA < 12.3)
    ("cpu", False, 1, "bfloat16", None, True, "torch_native"),
])
def test_dense_delegate_choice(monkeypatch, device, hopper, page, kv, spec, fa3, expect):
    """What m3_msa builds for M3's dense layers when no backend is named, from the device, page size, resolved K/V
    dtype, speculative decoding and whether sgl_kernel.flash_attn imports."""
    from types import SimpleNamespace as NS

    import torch
    from sglang.srt.utils import common
    from sglang_m3 import plugin

    monkeypatch.setattr(common, "is_hopper_with_cuda_12_3", lambda: hopper)
    monkeypatch.setattr(plugin, "_fa3_importable", lambda: fa3)
    runner = NS(device=device, page_size=page, kv_cache_dtype=getattr(torch, kv),
                server_args=NS(speculative_algorithm=spec))
    assert plugin._dense_backend_name(runner) == expect


def test_fa3_import_failure_falls_back_with_a_warning(monkeypatch, caplog):
    """Without sgl_kernel's compiled FA3 module (SGLang's own Hopper default then dies at start-up), the check says
    False and logs the import error once."""
    import sys

    from sglang_m3 import plugin

    plugin._fa3_importable.cache_clear()
    monkeypatch.setitem(sys.modules, "sgl_kernel.flash_attn", None)  # makes `import sgl_kernel.flash_attn` raise
    try:
        with caplog.at_level("WARNING", logger="sglang_m3.plugin"):
            assert plugin._fa3_importable() is False
            assert plugin._fa3_importable() is False
    finally:
        plugin._fa3_importable.cache_clear()
    warnings = [r for r in caplog.records if "FA3 module does not import" in r.getMessage()]
    assert len(warnings) == 1 and "sgl_kernel.flash_attn" in warnings[0].getMessage()


def test_request_limits_carry_the_servers_grammar_backend():
    """The tokenizer-manager checks judge a `regex` grammar by the server's --grammar-backend (llguidance's parser on
    an llguidance server): the Limits the hook builds for an M3 request name it; other models get none."""
    from types import SimpleNamespace as NS

    from sglang.srt.managers.io_struct import GenerateReqInput

    from sglang_m3.config import TEXT_ARCH
    from sglang_m3.plugin import _request_limits

    for backend in ("llguidance", "xgrammar"):
        tm = NS(model_config=NS(hf_config=NS(architectures=[TEXT_ARCH]), vocab_size=512),
                server_args=NS(grammar_backend=backend, reasoning_parser=None,
                                preferred_sampling_params=None))
        limits = _request_limits(tm, GenerateReqInput(text="hi"))
        assert (limits.vocab_size, limits.grammar_backend, limits.grammar_refusal) == (512, backend, None)
    tm.model_config.hf_config.architectures = ["LlamaForCausalLM"]
    assert _request_limits(tm, GenerateReqInput(text="hi")) is None


def test_dense_backend_wrapped_once_and_only_for_m3(monkeypatch):
    """attn_backend_wrapper hook: an M3 runner's dense backend is wrapped in the sparse backend (which gets the runner
    and that dense backend), an already wrapped one is returned as it is (SGLang may call the wrapper on its own
    result), and any other model's call goes to SGLang's wrapper unchanged."""
    from types import SimpleNamespace as NS

    from sglang_m3 import plugin
    from sglang_m3.attention import backend as m3_backend

    class Sparse:  # stands in for M3SparseAttnBackend (whose constructor needs a whole model runner)
        def __init__(self, runner, dense):
            self.runner, self.dense = runner, dense

    monkeypatch.setattr(m3_backend, "M3SparseAttnBackend", Sparse)
    monkeypatch.setattr(plugin, "_widen_dense_kv_splits", lambda dense, runner: dense)
    m3 = NS(model_config=NS(hf_config=_hf_config()))
    dense = object()
    wrapped = plugin._wrap_dense_backend(lambda *a: pytest.fail("SGLang's wrapper called for M3"), m3, dense)
    assert isinstance(wrapped, Sparse) and (wrapped.runner, wrapped.dense) == (m3, dense)
    assert plugin._wrap_dense_backend(lambda *a: pytest.fail("rewrapped"), m3, wrapped) is wrapped
    llama = NS(model_config=NS(hf_config=_hf_config(arch="LlamaForCausalLM")))
    assert plugin._wrap_dense_backend(lambda runner, b: ("sglang", runner, b), llama, dense) == ("sglang", llama, dense)


@pytest.mark.parametrize("flags, draft_flag, expect", [
    (dict(attention_backend="m3_msa"), None, "torch_native"),             # M3's default: the draft gets a dense one
    (dict(attention_backend="triton", decode_attention_backend="m3_msa"), None, "torch_native"),
    (dict(attention_backend="triton", prefill_attention_backend="m3_msa"), None, "torch_native"),
    (dict(attention_backend="m3_msa"), "triton", "triton"),              # a draft backend named: kept
    (dict(attention_backend="triton"), None, None),                      # ours not involved: SGLang's choice
])
def test_eagle_draft_never_gets_the_sparse_backend(flags, draft_flag, expect):
    """DraftBackendFactory hook: where the draft's backend would fall back to m3_msa (SGLang takes the decode /
    prefill / attention backend when --speculative-draft-attention-backend is not given), the dense Llama-style
    draft gets the backend m3_msa would put under M3's dense layers (torch_native on CPU)."""
    from types import SimpleNamespace as NS

    from sglang_m3 import plugin

    args = NS(**{"decode_attention_backend": None, "prefill_attention_backend": None, **flags})

    def original(factory, server_args):
        factory.draft_attn_backend = draft_flag

    factory = NS(draft_model_runner=NS(device="cpu"))
    plugin._draft_backends_not_ours(original, factory, args)
    assert factory.draft_attn_backend == expect


def test_m3_pool_class_gets_the_index_lane_at_the_model_dtype():
    """KV-pool hook: for M3, SGLang's MHA pool class becomes M3KVPool with the sparse layers, the index dim and the
    lane at the model dtype (bf16 under an fp8 K/V cache: the lane is never fp8); other models keep SGLang's."""
    from types import SimpleNamespace as NS

    import torch

    from sglang_m3 import plugin
    from sglang_m3.attention.pool import M3KVPool

    seen = {}

    def original(configurator, *, max_total_num_tokens, mha_pool_class, **kwargs):
        seen.update(cls=mha_pool_class, tokens=max_total_num_tokens, kwargs=kwargs)
        return "pool"

    cfg = NS(model_config=NS(hf_config=_hf_config()), model_dtype=torch.bfloat16, kv_cache_dtype=torch.float8_e4m3fn)
    assert plugin._build_m3_pool(original, cfg, max_total_num_tokens=77, mha_pool_class="sglang's", x=1) == "pool"
    cls = seen["cls"]
    assert cls.func is M3KVPool and (seen["tokens"], seen["kwargs"]) == (77, {"x": 1})
    assert cls.keywords == {"sparse_layer_ids": (1, 2, 3), "index_dim": 32, "index_dtype": torch.bfloat16}
    other = NS(model_config=NS(hf_config=_hf_config(arch="LlamaForCausalLM")), model_dtype=torch.bfloat16)
    plugin._build_m3_pool(original, other, max_total_num_tokens=5, mha_pool_class="sglang's")
    assert seen["cls"] == "sglang's"


@pytest.mark.parametrize("served", [True, False])
def test_token_ids_logprobs_are_tensors_for_every_request_of_a_decode_batch(monkeypatch, served):
    """sgl-project/sglang#34719: with the values left on the device, SGLang's get_token_ids_logprobs_raw gave a
    bare [] for a request without token ids beside tensors for the others, and the scheduler's `.tolist()` on
    every entry ended the server. Oracle: SGLang's own function (the values it computes for the requests that ask),
    and what the result processors do with the list. Only while M3 is served; the prefill stage is untouched."""
    import torch
    from sglang.srt.layers import logprob_processor as lp

    from sglang_m3 import plugin

    monkeypatch.setattr(plugin, "_m3_served", served)
    logprobs = torch.randn(3, 11).log_softmax(-1)
    asked = [[5, 6], None, [1]]
    hooked = lambda *a, **k: plugin._token_ids_logprobs_all_tensors(lp.get_token_ids_logprobs_raw, *a, **k)  # noqa
    vals, idxs = hooked(logprobs, asked, lp.LogprobStage.DECODE, no_copy_to_cpu=True)
    want, want_idx = lp.get_token_ids_logprobs_raw(logprobs, asked, lp.LogprobStage.DECODE, no_copy_to_cpu=True)
    assert idxs == want_idx and torch.equal(vals[0], want[0]) and torch.equal(vals[2], want[2])
    if served:
        assert [v.tolist() for v in vals] == [logprobs[0, [5, 6]].tolist(), [], logprobs[2, [1]].tolist()]
    else:
        assert vals[1] == [] and not torch.is_tensor(vals[1])  # SGLang's own result, untouched
    # copied to the host already: unchanged either way
    assert hooked(logprobs, asked, lp.LogprobStage.DECODE, None, False) == \
        lp.get_token_ids_logprobs_raw(logprobs, asked, lp.LogprobStage.DECODE, None, False)
    pre = hooked(logprobs, asked, lp.LogprobStage.PREFILL, [1, 1, 1], True)
    assert pre[0][1] == []  # the prefill stage is left as SGLang made it
