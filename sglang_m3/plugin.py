"""Every touch-point between sglang-m3 and SGLang 0.5.17, in one place.

`register()` is the `sglang.srt.plugins` entry point. SGLang calls it in the launching process before CLI
parsing and again in every scheduler subprocess (spawned, so nothing is inherited); it must be idempotent
and do all registration itself. `SGLANG_PLUGINS` without `sglang_m3` leaves SGLang's own M3 in charge.

What it changes, all keyed on the two released M3 architecture names:
- config: `AutoConfig` learns the flat text-only `model_type: minimax_m3`;
- model: our classes replace SGLang's under both names; the VL packaging is served as a text model;
- in-tree M3 logic (`is_minimax_sparse`: its pool, cell size, hybrid backend, per-arch defaults) is off;
- quantization: method `m3_mxfp8_block` (the MXFP8 checkpoint as 128x128 block FP8), declared for M3 on sm90;
- attention: backend `m3_msa` (dense layers through an SGLang backend, sparse layers through ours),
  chosen by default; any dense backend named with --attention-backend is wrapped the same way;
- fused-MoE configs: the packaged files tuned for M3's expert shapes (moe_configs) while an M3 model is served;
- KV pool: `M3KVPool` (index-key lane, at the model dtype even with an fp8 K/V cache) with a cell size that
  counts it;
- flags that would silently drop the index lane (HiCache) or that we do not serve are refused;
- checkpoint files: a truncated or corrupt safetensors shard stops loading, naming the file, before any is read;
- logprobs: SGLang's `token_ids_logprob` results keep one type per batch (its mixed list ended the scheduler);
- requests: a generate request the model or the scheduler cannot serve (id outside the vocabulary, empty prompt
  in a batch, mistyped sampling field, ...) is refused with HTTP 400 before it is sent (request_validation.py).
Client side (the frontend language's process, which loads no plugins): `register_frontend_chat_template()`, called
by `import sglang_m3.frontend`, adds M3's role markup to sglang.lang's chat-template matching.
"""

from __future__ import annotations

import functools
import logging

logger = logging.getLogger(__name__)

BACKEND_NAME = "m3_msa"
# K/V cache dtypes we serve: the model dtype, or fp8 e4m3 (K/V in fp8, the index-key lane at the model dtype).
# Others (fp8_e5m2, mxfp8, nvfp4, ...) need scale layouts or kernel variants the sparse layers do not have.
SUPPORTED_KV_CACHE_DTYPES = ("auto", "bfloat16", "bf16", "fp8_e4m3")
_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True

    from transformers import AutoConfig
    from sglang.srt.arg_groups import overrides
    from sglang.srt.configs import model_config
    from sglang.srt.layers.attention import attention_registry
    from sglang.srt.models.registry import ModelRegistry
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType
    from sglang.srt.server_args import add_attention_backend_choices

    from sglang_m3 import model as m3_model
    from sglang_m3.config import M3_ARCHS, VL_ARCH, MiniMaxM3Config

    AutoConfig.register(MiniMaxM3Config.model_type, MiniMaxM3Config, exist_ok=True)
    for cls in m3_model.EntryClass:
        ModelRegistry.models[cls.__name__] = cls

    # The VL packaging carries a vision tower we do not serve: treat the architecture as text-only so
    # SGLang neither loads an image processor nor routes image inputs to a model that would drop them.
    if VL_ARCH in model_config.multimodal_model_archs:
        model_config.multimodal_model_archs.remove(VL_ARCH)
    HookRegistry.register("sglang.srt.configs.model_config.ModelConfig.__init__", _text_only_model_config,
                          HookType.AROUND)
    HookRegistry.register("sglang.srt.utils.hf_transformers.config.get_config", _typed_sub_configs,
                          HookType.AROUND)

    # In-tree M3 logic keys on the architecture name; with our classes behind those names it must not fire (its
    # pools, backend choice, scheduler defaults). One of its uses is an M3 exclusion in ServerArgs' post-capture KV
    # sizing; that function returns earlier whenever prefill graphs are off, and ours always are (_eager_prefill).
    HookRegistry.register("sglang.srt.configs.model_config.is_minimax_sparse", _never, HookType.REPLACE)
    for arch in M3_ARCHS:
        overrides._MODEL_OVERRIDE_FNS[arch] = [_m3_server_overrides]

    attention_registry.register_attention_backend(BACKEND_NAME)(_create_m3_backend)
    add_attention_backend_choices([BACKEND_NAME])
    # Quantized checkpoints: the MXFP8 -> 128x128 block-FP8 method Hopper serves them with (quant.py).
    from sglang_m3.quant import register as register_quantization

    register_quantization()
    HookRegistry.register("sglang.srt.layers.attention.attention_registry.attn_backend_wrapper",
                          _wrap_dense_backend, HookType.AROUND)
    HookRegistry.register("sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator._build_mha_kv_pool",
                          _build_m3_pool, HookType.AROUND)
    HookRegistry.register("sglang.srt.model_executor.pool_configurator.DefaultPoolConfigurator._compute_cell_size",
                          _cell_size_with_index_k, HookType.AROUND)
    # SGLang bug (sgl-project/sglang#34719): a `token_ids_logprob` request (or /v1/score) in a batch with a request
    # without one ended the scheduler, every request in flight with it.
    HookRegistry.register("sglang.srt.layers.logprob_processor.get_token_ids_logprobs_raw",
                          _token_ids_logprobs_all_tensors, HookType.AROUND)
    # Checkpoint files: every safetensors shard's header against its size before SGLang reads any (a truncated
    # shard otherwise fails mid-load with a SafetensorError that names no file).
    HookRegistry.register("sglang.srt.model_loader.loader.DefaultModelLoader._prepare_weights",
                          _check_checkpoint_files, HookType.AROUND)
    # /update_weights_from_disk: an unknown load_format, or a checkpoint our strict loader refuses, ended the
    # server (the first raised in the scheduler; for the second SGLang's rollback re-read the refused checkpoint).
    HookRegistry.register("sglang.srt.model_executor.model_runner_components.weight_updater.WeightUpdater."
                          "update_weights_from_disk", _weight_update_keeps_the_model, HookType.AROUND)
    HookRegistry.register("sglang.srt.server_args.ServerArgs._handle_cuda_graph_config",
                          _eager_prefill, HookType.AROUND)
    HookRegistry.register("sglang.srt.speculative.draft_utils.DraftBackendFactory.__init__",
                          _draft_backends_not_ours, HookType.AROUND)
    # Fused-MoE kernel configs: ours for the names we ship (moe_configs), SGLang's lookup for every other. Its only
    # callers (try_get_optimal_moe_config, and get_moe_configs itself for the down-projection fallback) call it by
    # module global, and no module imports it by name, so patching the module attribute covers every call.
    HookRegistry.register("sglang.srt.layers.moe.moe_runner.triton_utils.fused_moe_triton_config.get_moe_configs",
                          _packaged_moe_configs, HookType.AROUND)

    # Requests are checked in the tokenizer manager (HTTP server process): the raw request before SGLang's
    # normalization indexes into it, a batch before its first item is sent, each prompt's final token ids.
    tokenizer_manager = "sglang.srt.managers.tokenizer_manager.TokenizerManager."
    HookRegistry.register(tokenizer_manager + "generate_request", _check_request_shape, HookType.AROUND)
    HookRegistry.register(tokenizer_manager + "_handle_batch_request", _check_batch_request, HookType.AROUND)
    HookRegistry.register(tokenizer_manager + "_validate_one_request", _check_one_request, HookType.BEFORE)
    HookRegistry.register(tokenizer_manager + "create_abort_task", _no_abort_for_refused, HookType.AROUND)
    # A chat body that is JSON but not an object fails inside SGLang's own request model (HTTP 500): answer 400 first.
    HookRegistry.register("sglang.srt.entrypoints.http_server.launch_server", _json_object_bodies, HookType.BEFORE)


def enable() -> None:
    """Register sglang-m3 in this process — needed only where SGLang does not load plugins itself, e.g. before
    `sgl.Runtime(...)` / `sgl.Engine(...)` builds its ServerArgs in the user's process."""
    from sglang.srt.plugins import load_plugins

    load_plugins()


def register_frontend_chat_template() -> None:
    """sglang.lang (the frontend language) picks a client-side ChatTemplate by the server's model path through its
    matching functions; ours answers for a local M3 checkpoint directory (frontend.match) and goes first, since
    SGLang's own match name fragments (e.g. "chat") an M3 directory's path may contain; RuntimeEndpoint warns when
    its server serves M3 and the template it picked is not ours. Idempotent."""
    from sglang.lang.backend.runtime_endpoint import RuntimeEndpoint
    from sglang.lang.chat_template import matching_function_registry

    from sglang_m3.frontend import match

    if match not in matching_function_registry:
        matching_function_registry.insert(0, match)
    # The matching functions see the model path alone; an M3 server whose path this client cannot read (an HF id, a
    # path on the server's machine) would silently get SGLang's "default" template. /get_model_info also names the
    # architecture, so the endpoint warns then. (Patched directly: this process loads no plugins, so HookRegistry
    # hooks are never applied in it.)
    if not getattr(RuntimeEndpoint.__init__, "_m3_template_check", False):
        RuntimeEndpoint.__init__ = _warn_unless_m3_template(RuntimeEndpoint.__init__)


def _warn_unless_m3_template(init):
    """RuntimeEndpoint.__init__, then frontend.warn_unless_m3_template unless the caller named a template."""
    import inspect

    signature = inspect.signature(init)

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if not signature.bind(self, *args, **kwargs).arguments.get("chat_template_name"):  # as RuntimeEndpoint tests it
            from sglang_m3.frontend import warn_unless_m3_template

            warn_unless_m3_template(self.model_info, self.chat_template)

    wrapper._m3_template_check = True
    return wrapper


# ---- helpers the hooks use ------------------------------------------------------------------------------
def _never(*_args, **_kwargs) -> bool:
    return False


def _is_m3(hf_config) -> bool:
    from sglang_m3.config import is_m3_architecture

    return is_m3_architecture(getattr(hf_config, "architectures", None))


def _m3_server_overrides(server_args, hf_config) -> dict:
    """Per-architecture defaults and refusals, applied by ServerArgs before anything is built."""
    from sglang_m3.config import m3_text_view

    view = m3_text_view(hf_config)  # an unsupported config (overrides merged in) fails here, before weights are read
    sp = view.sparse
    logger.info("sglang-m3: MiniMax-M3 sparse attention on layers %s: block %d, top-%d blocks (dense up to %d "
                "tokens), init %d, local %d, %d index heads x %d; rope_theta %g, max_position_embeddings %d%s",
                list(view.sparse_layers), sp.block_size, sp.topk_blocks, sp.dense_limit, sp.init_blocks,
                sp.local_blocks, sp.num_index_heads, sp.index_dim, view.rope_theta, view.max_position_embeddings,
                f" (--json-model-override-args {server_args.json_model_override_args})"
                if server_args.json_model_override_args not in (None, "", "{}") else "")
    if getattr(server_args, "enable_hierarchical_cache", False):
        raise ValueError("sglang-m3: --enable-hierarchical-cache is not supported for MiniMax-M3: its host pool "
                         "does not carry the per-slot index keys of the sparse layers (they would be lost on "
                         "reload, corrupting sparse attention). Run without HiCache.")
    spec_declared = _speculative_overrides(server_args)
    _cpu_engine_refusals(server_args)
    if getattr(server_args, "disaggregation_mode", "null") not in (None, "null"):
        raise ValueError("sglang-m3: PD disaggregation is not supported for MiniMax-M3 yet "
                         "(the index-key lane is not transferred).")
    kv_dtype = getattr(server_args, "kv_cache_dtype", "auto")
    if kv_dtype not in SUPPORTED_KV_CACHE_DTYPES:
        raise ValueError(f"sglang-m3: --kv-cache-dtype {kv_dtype} is not supported for MiniMax-M3 (supported: "
                         f"{', '.join(SUPPORTED_KV_CACHE_DTYPES)}; fp8_e4m3 stores K/V in fp8 with per-tensor "
                         "scales, the sparse kernels widen it on load).")
    model_dtype = str(getattr(server_args, "dtype", "auto")).lower().removeprefix("torch.")  # Engine: torch dtypes too
    if kv_dtype in ("bfloat16", "bf16"):
        # the index-key lane and the kernels' q side run at the model dtype; a bf16 cache under another one is a
        # mixed-dtype path the sparse kernels do not have
        shown = model_dtype
        if model_dtype == "auto":
            # the checkpoint's dtype as SGLang resolves it (its own rule: a float32 checkpoint serves as float16),
            # so M3's bf16 release passes and a float32 one (the tiny checkpoints) does not
            from sglang.srt.configs.model_config import _get_and_verify_dtype, get_hf_text_config

            model_dtype = str(_get_and_verify_dtype(get_hf_text_config(hf_config), "auto")).removeprefix("torch.")
            shown = f"auto (= {model_dtype} for this checkpoint)"
        if model_dtype not in ("bfloat16", "bf16"):
            raise ValueError(f"sglang-m3: --kv-cache-dtype {kv_dtype} with --dtype {shown} is not supported for "
                             "MiniMax-M3: the K/V cache must be in the model dtype or fp8_e4m3 (use --kv-cache-dtype "
                             "auto).")
    declared: dict = dict(spec_declared)
    if server_args.is_attention_backend_not_set():
        declared["attention_backend"] = BACKEND_NAME
    # The clamped SwiGLU (gemm1_alpha / gemm1_clamp_limit, non-interleaved gate|up) is implemented by the
    # Triton MoE runner; "auto" may pick a runner that ignores those arguments and returns wrong numbers.
    if getattr(server_args, "moe_runner_backend", "auto") == "auto":
        declared["moe_runner_backend"] = "triton"
    elif server_args.moe_runner_backend != "triton":
        raise ValueError(f"sglang-m3: --moe-runner-backend {server_args.moe_runner_backend} is not supported for "
                         "MiniMax-M3 (its clamped SwiGLU needs the triton runner).")
    declared.update(_quantization_overrides(server_args, hf_config))
    return declared


# SGLang's CPU engine (--device cpu) has its own attention backends only (it fills in intel_amx on x86, torch_native on
# Arm), allocates K/V one token at a time and has no speculative decoding; other flags failed deep in its start-up
# instead (Triton's "0 active drivers", a NameError from flashinfer's wrapper, no module sgl_kernel.speculative:
# session 22's probe).
CPU_ATTENTION_BACKENDS = (BACKEND_NAME, "torch_native", "intel_amx")


def _cpu_engine_refusals(server_args) -> None:
    """Raise ValueError naming the flag for what SGLang's CPU engine cannot serve; nothing off CPU."""
    if getattr(server_args, "device", None) != "cpu":
        return
    for field in ("attention_backend", "prefill_attention_backend", "decode_attention_backend"):
        backend = getattr(server_args, field, None)
        if backend is not None and backend not in CPU_ATTENTION_BACKENDS:
            raise ValueError(f"sglang-m3: --{field.replace('_', '-')} {backend} does not run on SGLang's CPU engine "
                             f"(--device cpu): name one of {', '.join(CPU_ATTENTION_BACKENDS)} or leave it unset.")
    page_size = getattr(server_args, "page_size", None)
    if page_size not in (None, 1):
        raise ValueError(f"sglang-m3: --page-size {page_size} is not supported on SGLang's CPU engine (--device cpu): "
                         "it allocates the K/V cache one token at a time (use --page-size 1).")
    algo = getattr(server_args, "speculative_algorithm", None)
    if algo:
        raise ValueError(f"sglang-m3: --speculative-algorithm {algo} is not supported on SGLang's CPU engine "
                         "(--device cpu): it has no speculative decoding (served on CUDA).")


def _quantization_overrides(server_args, hf_config) -> dict:
    """The MXFP8 checkpoint runs as block FP8 on Hopper, SGLang's MXFP8 on Blackwell, nowhere else (quant.py)."""
    import torch

    from sglang_m3.quant import server_quantization

    on_cuda = getattr(server_args, "device", None) in (None, "cuda") and torch.cuda.is_available()
    capability = torch.cuda.get_device_capability() if on_cuda else None
    return server_quantization(server_args.quantization, hf_config, capability)


# Speculative algorithms whose target-verify path the sparse backend serves (chain and tree verify); the
# EAGLE/EAGLE3 drafts are separate (Llama-style) models on a dense SGLang backend.
SUPPORTED_SPECULATIVE = ("EAGLE", "EAGLE3", "NGRAM")


def _speculative_overrides(server_args) -> dict:
    """Refuse the speculative algorithms we do not serve, by name; keep the draft model off our backend."""
    algo = getattr(server_args, "speculative_algorithm", None)
    if not algo:
        return {}
    if algo.upper() not in SUPPORTED_SPECULATIVE:
        raise ValueError(f"sglang-m3: --speculative-algorithm {algo} is not supported for MiniMax-M3 (supported: "
                         f"{', '.join(SUPPORTED_SPECULATIVE)}; M3 ships no MTP weights and no DFlash/standalone "
                         "draft path is implemented).")
    draft_backend = getattr(server_args, "speculative_draft_attention_backend", None)
    if draft_backend == BACKEND_NAME:
        raise ValueError(f"sglang-m3: --speculative-draft-attention-backend {BACKEND_NAME} is for the M3 target; "
                         "the EAGLE draft is a dense model: use an SGLang backend (e.g. triton).")
    return {}  # the draft's backends: _draft_backends_not_ours (the flag is not model-overridable in 0.5.17)


def _draft_backends_not_ours(original, factory, server_args, *args, **kwargs):
    """EAGLE's draft decode/extend backends come from --speculative-draft-attention-backend, else the decode/prefill
    backend, else --attention-backend (0.5.17 speculative/draft_utils.py DraftBackendFactory): when that would be
    ours (the M3 default), give the dense Llama-style draft the dense backend we wrap instead."""
    original(factory, server_args, *args, **kwargs)
    if factory.draft_attn_backend is None and BACKEND_NAME in (
            getattr(server_args, "decode_attention_backend", None),
            getattr(server_args, "prefill_attention_backend", None), server_args.attention_backend):
        factory.draft_attn_backend = _dense_backend_name(factory.draft_model_runner)


def _request_limits(tokenizer_manager, obj):
    """What an M3 server accepts in a generate request; None for other requests and models (SGLang's business)."""
    from sglang.srt.managers.io_struct import GenerateReqInput

    from sglang_m3.request_validation import Limits

    model_config = tokenizer_manager.model_config
    if not isinstance(obj, GenerateReqInput) or not _is_m3(model_config.hf_config):
        return None
    server_args = tokenizer_manager.server_args
    preferred = server_args.preferred_sampling_params
    return Limits(vocab_size=model_config.vocab_size, grammar_refusal=_grammar_refusal(server_args),
                  grammar_backend=server_args.grammar_backend,
                  preferred_sampling_params=preferred if isinstance(preferred, dict) else None)


def _grammar_refusal(server_args) -> str | None:
    """SGLang 0.5.17 cannot constrain decoding with llguidance under --reasoning-parser: its ReasonerGrammarBackend
    calls allocate_vocab_mask, which llguidance's GuidanceBackend lacks, and the request came back with a 400 naming
    only that attribute. Such a server refuses grammar requests up front, saying why and what works."""
    if server_args.reasoning_parser and server_args.grammar_backend == "llguidance":
        return ("constrained decoding (regex, json_schema, ebnf, structural_tag; also what response_format and "
                "tool_choice 'required' or a named function ask for) is unavailable on this server: SGLang 0.5.17's "
                "llguidance grammar backend fails under --reasoning-parser. Serve without --reasoning-parser, or "
                "with --grammar-backend xgrammar where it runs (GPU).")
    return None


def _check_request_shape(original, tokenizer_manager, obj, *args, **kwargs):
    """Before `generate_request` normalizes the request (raising here is inside every caller's ValueError → 400)."""
    from sglang_m3.request_validation import check_shape

    limits = _request_limits(tokenizer_manager, obj)
    if limits:
        check_shape(obj, limits)
    return original(tokenizer_manager, obj, *args, **kwargs)


def _no_abort_for_refused(original, tokenizer_manager, obj, *args, **kwargs):
    """A streamed request refused by _check_request_shape never reached SGLang's normalization (no `is_single`)
    nor the scheduler: nothing to abort. SGLang's abort task, which the streaming routes schedule 2 s after the
    stream ends, read `obj.is_single` and logged "Exception in ASGI application" with a traceback for every refused
    stream (session 19's newcomer probe)."""
    if not hasattr(obj, "is_single"):
        from fastapi import BackgroundTasks

        return BackgroundTasks()
    return original(tokenizer_manager, obj, *args, **kwargs)


def _check_batch_request(original, tokenizer_manager, obj, *args, **kwargs):
    """Every item of a batch before the first is sent: SGLang sends text batches item by item."""
    from sglang_m3.request_validation import check_batch

    limits = _request_limits(tokenizer_manager, obj)
    if limits:
        check_batch(obj, limits)
    return original(tokenizer_manager, obj, *args, **kwargs)


def _check_one_request(tokenizer_manager, obj, input_ids, *args, **kwargs):
    """SGLang's own per-request check point, with the prompt's final token ids (after tokenization)."""
    from sglang_m3.request_validation import check_request

    limits = _request_limits(tokenizer_manager, obj)
    if limits:
        check_request(obj, limits, input_ids, tokenized=True)


def _json_object_bodies(server_args, *args, **kwargs):
    """Before the HTTP server starts (its app takes no middleware later): for an M3 server, put
    json_body.JsonObjectBody in front of SGLang's routes."""
    from sglang.srt.entrypoints.http_server import app

    from sglang_m3.json_body import JsonObjectBody

    if _is_m3(server_args.get_model_config().hf_config) and not any(
            m.cls is JsonObjectBody for m in app.user_middleware):
        app.add_middleware(JsonObjectBody)


def _eager_prefill(original, server_args):
    """Prefill runs eagerly for M3; decode CUDA graphs stay on.

    The sparse extend path hands extra tensors (index q/k) to the backend, which the graphed-prefill custom op
    of RadixAttention rejects. Model overrides apply too late to steer the graph config, hence this hook.
    """
    if _is_m3(server_args.get_model_config().hf_config):
        requested = server_args.cuda_graph_backend_prefill
        if requested not in (None, "disabled"):
            raise ValueError(f"sglang-m3: --cuda-graph-backend-prefill {requested} is not supported for MiniMax-M3 "
                             "(prefill runs eagerly; decode CUDA graphs are on). Drop the flag.")
        server_args.disable_prefill_cuda_graph = True
    return original(server_args)


def _typed_sub_configs(original, *args, **kwargs):
    """SGLang's VL config class leaves `text_config`/`vision_config` as plain dicts when loaded from a file,
    which code reading `.model_type` off them trips over; give them config objects. For M3, apply
    --json-model-override-args ourselves, merging nested objects (config.apply_overrides)."""
    import copy

    from transformers import PretrainedConfig

    from sglang_m3.config import MiniMaxM3Config, apply_overrides

    overrides = kwargs.get("model_override_args")
    if overrides:
        config = original(*args, **{**kwargs, "model_override_args": None})
        if not _is_m3(config):
            return original(*args, **kwargs)  # SGLang's own override logic for other models
        config = copy.deepcopy(config)  # get_config is cached: the un-overridden entry must stay as it is
    else:
        config = original(*args, **kwargs)
    if _is_m3(config):
        if isinstance(getattr(config, "text_config", None), dict):
            config.text_config = MiniMaxM3Config(**config.text_config)
        if isinstance(getattr(config, "vision_config", None), dict):
            config.vision_config = PretrainedConfig(**config.vision_config)
        if overrides:
            apply_overrides(config, overrides)
    return config


def _text_only_model_config(original, model_config, *args, **kwargs):
    """Build the VL-packaged M3 config as a text model (its nested text_config otherwise marks it multimodal).
    Also notes that this process serves M3 (the packaged MoE configs apply from then on)."""
    from sglang_m3.config import VL_ARCH

    global _m3_served
    original(model_config, *args, **kwargs)
    _m3_served = _m3_served or _is_m3(model_config.hf_config)
    if (model_config.hf_config.architectures or [None])[0] == VL_ARCH and model_config.is_multimodal:
        if kwargs.get("enable_multimodal"):
            raise ValueError("sglang-m3 serves the text model of MiniMax-M3; image/video inputs are not "
                             "supported. Drop --enable-multimodal.")
        original(model_config, *args, **{**kwargs, "enable_multimodal": False})


def _dense_backend_name(runner) -> str:
    """The SGLang backend that serves M3's dense layers under `m3_msa` (no --attention-backend named).

    FA3 on Hopper with CUDA >= 12.3, as SGLang itself picks for MHA models there (0.5.17 server_args.py, its
    `is_hopper_with_cuda_12_3` branch): in session 17 on an H200 (GPU_RESULTS.md, "Session 17"), with the backend
    named, the 4-layer real-dimension model served 32768/256 at concurrency 1 at 348 tok/s over FA3 and 293 over
    Triton (ITL 1.66 vs 1.87 ms, TTFT 305 vs 396 ms; one run each), and ours over FA3 passed the forced-token
    consistency check against ours over Triton (decode and radix-hit decode, tiny checkpoint, prompts up to 3K).
    Only where that was checked: page size 1, a bf16 K/V cache (runner.kv_cache_dtype, resolved before the backends
    are built) and no speculative decoding (the verify path and the EAGLE draft, whose runner carries the same flag,
    were verified over Triton). Triton elsewhere on CUDA, and where sgl_kernel's FA3 module does not import (a wheel
    set without it: SGLang's own default dies at start-up there; ours logs why and serves). `torch_native` off
    CUDA."""
    import torch
    from sglang.srt.utils import common

    if not str(runner.device).startswith("cuda"):
        return "torch_native"
    if (not runner.server_args.speculative_algorithm and runner.page_size == 1
            and runner.kv_cache_dtype == torch.bfloat16 and common.is_hopper_with_cuda_12_3() and _fa3_importable()):
        return "fa3"
    return "triton"


@functools.cache
def _fa3_importable() -> bool:
    try:
        import sgl_kernel.flash_attn  # noqa: F401  (imports the compiled flash_ops; ImportError when it is absent)
    except ImportError as exc:
        logger.warning("sglang-m3: sgl_kernel's FA3 module does not import (%s); M3's dense layers run over Triton",
                       exc)
        return False
    return True


def _create_m3_backend(runner):
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS

    from sglang_m3.attention.backend import M3SparseAttnBackend

    dense = ATTENTION_BACKENDS[_dense_backend_name(runner)](runner)
    if not _is_m3(runner.model_config.hf_config):
        return dense  # a draft model (EAGLE) on the same server: dense attention only
    return M3SparseAttnBackend(runner, _widen_dense_kv_splits(dense, runner))


# M3's dense layers read the whole context at decode. With SGLang's default cap of 8 KV splits, Triton's decode grid
# at batch 1 is 4 head groups x 8 splits = 32 programs on 132 SMs: one dense layer took 266 us of a 2044 us decode
# step at 32K on an H200 (benchmarks/profile_decode.py), more than the three sparse layers' attention together.
# SGLang's own split heuristic (get_num_kv_splits_triton) already picks fewer splits for big batches and short
# contexts; only its cap is raised. An explicit --triton-attention-num-kv-splits is kept as given.
DENSE_MAX_KV_SPLITS = 64


def _widen_dense_kv_splits(dense, runner):
    """Raise the Triton dense delegate's KV-split cap to DENSE_MAX_KV_SPLITS when the server runs SGLang's default
    (set before any buffer is sized: the graph state and the per-batch logits buffers read it later). Other
    backends, deterministic inference and fixed split tiles are left alone. Returns `dense`."""
    from sglang.srt.layers.attention.triton_backend import TritonAttnBackend
    from sglang.srt.server_args import ServerArgs

    args = runner.server_args
    if (isinstance(dense, TritonAttnBackend) and not getattr(dense, "use_mla", False)
            and args.triton_attention_num_kv_splits == ServerArgs.triton_attention_num_kv_splits
            and getattr(dense, "split_tile_size", None) is None and not getattr(dense, "enable_deterministic", False)):
        dense.max_kv_splits = max(dense.max_kv_splits, DENSE_MAX_KV_SPLITS)
    return dense


def _wrap_dense_backend(original, runner, full_attn_backend):
    from sglang_m3.attention.backend import M3SparseAttnBackend

    if not _is_m3(runner.model_config.hf_config):
        return original(runner, full_attn_backend)
    if isinstance(full_attn_backend, M3SparseAttnBackend):
        return full_attn_backend
    return M3SparseAttnBackend(runner, _widen_dense_kv_splits(full_attn_backend, runner))


def _build_m3_pool(original, configurator, *, max_total_num_tokens, mha_pool_class, **kwargs):
    import functools

    from sglang_m3.attention.pool import M3KVPool
    from sglang_m3.config import m3_text_view

    if _is_m3(configurator.model_config.hf_config):
        view = m3_text_view(configurator.model_config.hf_config)
        mha_pool_class = functools.partial(M3KVPool, sparse_layer_ids=view.sparse_layers,
                                           index_dim=view.sparse.index_dim, index_dtype=configurator.model_dtype)
    return original(configurator, max_total_num_tokens=max_total_num_tokens, mha_pool_class=mha_pool_class,
                    **kwargs)


def _token_ids_logprobs_all_tensors(original, logprobs, token_ids_logprobs_list, stage, *args, **kwargs):
    """SGLang's get_token_ids_logprobs_raw, with an empty tensor instead of `[]` for a request that asked for no
    token ids when the values stay on the device (`no_copy_to_cpu`, the decode stage).

    Why: there SGLang returns tensors for the requests that asked and a bare `[]` for the others, and both result
    processors then call `.tolist()` on every entry (`AttributeError: 'list' object has no attribute 'tolist'` in
    the scheduler: a `/generate` with `token_ids_logprob`, or `/v1/score`, next to any other running request ended
    the server; sgl-project/sglang#34719, open for 0.5.14-0.5.17). `logprobs.new_empty(0)` is what SGLang's own
    batched variant puts there (`get_token_ids_logprobs_batch_optimized`); its `.tolist()` is the `[]` the request
    would have had. Only while M3 is served in this process; the prefill stage is left as SGLang made it."""
    vals, idxs = original(logprobs, token_ids_logprobs_list, stage, *args, **kwargs)
    no_copy = kwargs.get("no_copy_to_cpu", args[1] if len(args) > 1 else False)
    if _m3_served and no_copy and getattr(stage, "name", None) == "DECODE":
        vals = [logprobs.new_empty(0) if isinstance(v, list) and not v else v for v in vals]
    return vals, idxs


def _weight_update_keeps_the_model(original, updater, model_path, load_format=None, *args, **kwargs):
    """WeightUpdater.update_weights_from_disk while M3 is served; returns (success, message) as SGLang's does.

    A `load_format` whose loader is not SGLang's DefaultModelLoader (the only one it updates from; an unknown name
    raised inside the scheduler and ended the server) is answered (False, message) before anything is touched.
    SGLang sets `model_config.model_path` to the new checkpoint before loading and leaves it there when the update
    fails; its rollback after a failed load reads that path, so it raises again (our loader refuses a mismatched
    checkpoint by name, CheckpointMismatchError) and the server ended. Here a failed update puts the old path and
    the runner's LoadConfig back, and one that raised has the served weights read again; (False, the error) is
    returned."""
    if not _m3_served:
        return original(updater, model_path, load_format, *args, **kwargs)
    from sglang.srt.configs.load_config import LoadConfig
    from sglang.srt.model_loader.loader import DefaultModelLoader, get_model_loader

    try:
        loader = get_model_loader(LoadConfig(load_format=load_format), updater.model_config)
    except Exception as e:  # (an unknown name: LoadFormat's ValueError)
        return False, f"load_format {load_format!r}: {e}; the weights are unchanged"
    if not isinstance(loader, DefaultModelLoader):
        return False, (f"load_format {load_format!r} gives {type(loader).__name__}; weights are updated from disk "
                       "only through SGLang's DefaultModelLoader (e.g. auto, safetensors, pt); the weights are "
                       "unchanged")
    runner = updater.get_model_runner()
    old_path, old_load_config = updater.model_config.model_path, runner.load_config
    try:
        ok, message = original(updater, model_path, load_format, *args, **kwargs)
    except Exception as e:  # (SGLang's rollback itself raised: the model may hold part of the new weights)
        logger.error("sglang-m3: weight update from %s failed (%s); reloading %s", model_path, e, old_path)
        updater.model_config.model_path = old_path
        ok, reload_message = original(updater, old_path, old_load_config.load_format)
        runner.load_config = old_load_config
        if not ok:
            raise RuntimeError(f"weight update from {model_path} failed ({e}) and reloading {old_path} failed too "
                               f"({reload_message})") from e
        return False, f"Failed to update weights from {model_path}: {e}. The original weights were reloaded."
    if not ok:
        updater.model_config.model_path = old_path
        runner.load_config = old_load_config
    return ok, message


def _check_checkpoint_files(original, model_loader, *args, **kwargs):
    """DefaultModelLoader._prepare_weights ((folder, weight files, use_safetensors)), then, while M3 is served in
    this process, loader.check_safetensors_files on those files: raises loader.CheckpointFileError naming a
    truncated or corrupt shard before SGLang's weight iterator opens any (its SafetensorError names no file)."""
    result = original(model_loader, *args, **kwargs)
    if _m3_served and isinstance(result, tuple) and len(result) == 3 and result[2]:
        from sglang_m3.loader import check_safetensors_files

        check_safetensors_files(result[1])
    return result


def _cell_size_with_index_k(original, pool_configurator, kvc, num_layers: int) -> int:
    """SGLang's per-token bytes (K/V of every layer at the KV-cache dtype) plus the index lane at the model dtype."""
    from sglang_m3.attention.pool import index_k_bytes_per_token
    from sglang_m3.config import m3_text_view

    cell = original(pool_configurator, kvc, num_layers)
    if _is_m3(kvc.model_config.hf_config):
        view = m3_text_view(kvc.model_config.hf_config)
        cell += index_k_bytes_per_token(view.sparse_layers, kvc.layer_info.start_layer, kvc.layer_info.end_layer,
                                        view.sparse.index_dim, kvc.model_dtype)
    return cell


# Set once an M3 ModelConfig is built in this process (the scheduler builds one before loading the model). The
# packaged MoE configs are used only then: SGLang's file names carry E and N but not the hidden size, and M3's
# N=768 (TP4) and N=384 (TP8) names are also those of other 128-expert models (SGLang bundles H200 files for them).
_m3_served = False


@functools.lru_cache(maxsize=None)
def _packaged_moe_file(E, N, dtype, block_n, block_k, per_channel_quant, down_moe):
    from sglang_m3 import moe_configs

    return moe_configs.lookup(E, N, dtype, block_n, block_k, per_channel_quant, down_moe)


def _packaged_moe_configs(original, E, N, dtype, block_n=0, block_k=0, per_channel_quant=False, down_moe=False):
    """SGLang's ``get_moe_configs`` ({token count M: Triton config} or None), answered from sglang_m3's packaged
    files for the names we ship while M3 is served; SGLang's own lookup, unchanged, for every other call.

    For a name we ship without a ``_down`` file the down-projection answer is None, so the down GEMM runs the
    up-projection config, as it ran when tuned (benchmarks/tune_moe.py times ``fused_experts`` under one
    ``override_config``), rather than SGLang's fallback to another Triton version's or model's file.
    Deterministic inference keeps SGLang's answer (its default config)."""
    from sglang.srt.layers.moe.moe_runner.triton_utils import fused_moe_triton_config as sglang_moe_config

    if _m3_served and not sglang_moe_config.get_exec().deterministic.enable_deterministic_inference:
        up = _packaged_moe_file(E, N, dtype, block_n, block_k, per_channel_quant, False)
        if up is not None:
            return _packaged_moe_file(E, N, dtype, block_n, block_k, per_channel_quant, True) if down_moe else up
    return original(E, N, dtype, block_n, block_k, per_channel_quant=per_channel_quant, down_moe=down_moe)
