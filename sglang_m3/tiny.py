"""Write small MiniMax-M3 checkpoints in the *released* layout (tests, README demo, benchmarks).

    python -m sglang_m3.tiny OUT_DIR                      # VL-packaged tiny model, like the release
    python -m sglang_m3.tiny OUT_DIR --flat               # text-only packaging (model_type minimax_m3)
    python -m sglang_m3.tiny OUT_DIR --config-only --real-dims --layers 4 --dense-layers 1
                                                          # real widths, no weights (--load-format dummy)
    python -m sglang_m3.tiny OUT_DIR --quant mxfp8        # the same weights in the MXFP8 release's layout

Why a writer instead of a stored fixture: the loaders, the sparse attention and the chat plumbing must be
exercised against exactly what MiniMax ships (M3_SPEC.md §1 config, §4.1 tensor names/dtypes, §5 chat
format), at sizes that run on a laptop CPU in seconds. Everything is derived from one config dict, so a
test can ask for 1 KV head, 2 layers or a smaller block size and still get a coherent checkpoint.

What the output directory holds:
- ``config.json``: VL packaging (default) = top-level ``minimax_m3_vl`` config with a tiny ``vision_config``
  and the text fields under ``text_config``; flat packaging = the text config itself.
- ``model.safetensors`` (unless config-only): text tensors under ``language_model.`` (VL) or bare (flat),
  names and dtypes of §4.1 (router gate and ``e_score_correction_bias`` fp32, the rest ``dtype``), plus a
  complete tiny vision tower/projector in the VL packaging, so text-only loaders must skip it.
- with ``--quant mxfp8``: ``quantization_config`` in config.json as the MXFP8 release declares it (ignore list
  included), and every quantized text weight as float8_e4m3fn ``weight`` + uint8 ``weight_scale_inv`` [N, K/32],
  quantized from the same fp32 values the bf16 checkpoint of the same seed rounds (M3_SPEC §4.3);
- ``generation_config.json``, ``tokenizer.json``, ``tokenizer_config.json``, ``chat_template.jinja``:
  a byte-level tokenizer (one token per byte) carrying M3's special strings, and a chat template that
  follows §5. Token ids are small (256..), so ``bos_token_id``/``eos_token_id`` in the configs are the
  tiny tokenizer's ids, not 200034/200020.

The pieces live in one module per job: tiny_config (config dicts), tiny_weights (tensors), tiny_tokenizer
(tokenizer files; the chat template is the package file chat_template.jinja). This module writes the directory.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sglang_m3.tiny_config import (FLAT_CONFIG_MODULE, FLAT_CONFIG_SOURCE, REAL_TEXT_CONFIG,  # noqa: F401 (re-exported)
                                   build_flat_config, build_text_config, build_vl_config, mxfp8_quantization_config)
from sglang_m3.tiny_tokenizer import (BOS, BYTE_TOKENS, CHAT_TEMPLATE, EOS, IMAGE, IMAGE_END,  # noqa: F401
                                      IMAGE_START, PRINTABLE_BYTES, ROLE, SPECIAL_TOKENS, VIDEO, token_ids,
                                      write_tokenizer)
from sglang_m3.tiny_weights import build_state_dict, text_tensor_specs  # noqa: F401

QUANT_METHODS = ("mxfp8",)


def write_tiny_checkpoint(out_dir, *, flat: bool = False, config_only: bool = False, real_dims: bool = False,
                          dtype: str = "bfloat16", seed: int = 0, dense_layers: int | None = None,
                          quant: str | None = None, quant_ignored: tuple[str, ...] = (), **overrides) -> Path:
    """Write a MiniMax-M3 checkpoint directory and return its path.

    flat: text-only packaging (``model_type: minimax_m3``, tensors without ``language_model.``, no vision).
    config_only: config + tokenizer only (for ``--load-format dummy``); real_dims: the release's widths.
    dtype: "bfloat16" | "float16" | "float32" for everything but the router (always fp32).
    dense_layers: number of leading dense layers (default 1 tiny, 3 real).
    quant: "mxfp8" for the MXFP8 release's layout (quantization_config + e4m3 weights with UE8M0 scales); the
    unquantized tensors (embeddings, lm_head, norms; router fp32) stay in `dtype`. quant_ignored: extra module names
    for its ignored_layers (left unquantized), e.g. ("self_attn.index_q_proj", "self_attn.index_k_proj").
    overrides: text-config fields (e.g. num_hidden_layers=2, num_key_value_heads=1, sparse_topk_blocks=4,
    sparse_block_size=64) or their aliases (layers, num_kv_heads, topk_blocks, block_size, ...).
    """
    if dtype not in ("bfloat16", "float16", "float32"):
        raise ValueError(f"dtype must be bfloat16, float16 or float32, not {dtype!r}")
    if quant not in (None, *QUANT_METHODS):
        raise ValueError(f"quant must be one of {QUANT_METHODS} (or None), not {quant!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    ids = token_ids()
    n_tokens = BYTE_TOKENS + len(SPECIAL_TOKENS)
    text_cfg = build_text_config(real_dims=real_dims, dense_layers=dense_layers, **overrides)
    if text_cfg["vocab_size"] < n_tokens:
        raise ValueError(f"vocab_size {text_cfg['vocab_size']} < tokenizer size {n_tokens}")
    text_cfg["bos_token_id"] = ids[BOS]
    text_cfg["eos_token_id"] = ids[EOS]

    if flat:
        config, vl = build_flat_config(text_cfg, dtype=dtype), None
    else:
        config = build_vl_config(text_cfg, image_token_id=ids[IMAGE], video_token_id=ids[VIDEO], dtype=dtype,
                                 real_dims=real_dims)
        vl = config
    quant_cfg = mxfp8_quantization_config(text_cfg, tuple(quant_ignored), prefix="" if flat else "language_model.") \
        if quant else None
    if quant_cfg:
        config["quantization_config"] = quant_cfg  # top level, where HF configs (and SGLang) keep it
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if flat:
        (out / f"{FLAT_CONFIG_MODULE}.py").write_text(FLAT_CONFIG_SOURCE)
    (out / "generation_config.json").write_text(json.dumps({
        # sampling defaults as inferred for the release (reference/m3_generation_config_inferred.json)
        "bos_token_id": ids[BOS], "eos_token_id": ids[EOS],
        "do_sample": True, "temperature": 1.0, "top_p": 0.95, "top_k": 40,
    }, indent=2) + "\n")
    # Dummy-weight (config-only) checkpoints serve benchmarks: their tokenizer covers the model's whole vocabulary.
    write_tokenizer(out, model_max_length=text_cfg["max_position_embeddings"],
                    vocab_size=text_cfg["vocab_size"] if config_only else None)

    weights = out / "model.safetensors"
    if config_only:
        if weights.exists():
            weights.unlink()  # a stale weight file would contradict the new config
        return out

    from safetensors.torch import save_file

    unused = [ids[s] for s in (BOS, ROLE, IMAGE, VIDEO, IMAGE_START, IMAGE_END)]
    tensors = build_state_dict(text_cfg, seed=seed, dtype=dtype, vl_cfg=vl, n_tokens=n_tokens,
                               unused_token_ids=unused, quantization_config=quant_cfg)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(weights), metadata={"format": "pt"})
    return out


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(prog="python -m sglang_m3.tiny", description=__doc__.split("\nWhy")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--flat", action="store_true", help="text-only packaging (model_type minimax_m3)")
    ap.add_argument("--config-only", action="store_true", help="config + tokenizer, no weights")
    ap.add_argument("--real-dims", action="store_true", help="the release's widths (use with --config-only)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quant", choices=QUANT_METHODS, help="mxfp8: the MXFP8 release's layout, same source weights")
    ap.add_argument("--layers", type=int, help="num_hidden_layers (tiny 4, real 60)")
    ap.add_argument("--dense-layers", type=int, help="leading dense layers (tiny 1, real 3)")
    ap.add_argument("--hidden-size", type=int)
    ap.add_argument("--heads", type=int, help="num_attention_heads")
    ap.add_argument("--num-kv-heads", type=int, help="num_key_value_heads (= index heads unless --index-heads)")
    ap.add_argument("--index-heads", type=int, help="sparse_num_index_heads (the server refuses a value other "
                    "than the KV heads' count)")
    ap.add_argument("--head-dim", type=int, help="head_dim (rotary_dim and index dim follow)")
    ap.add_argument("--vocab-size", type=int)
    ap.add_argument("--num-experts", type=int)
    ap.add_argument("--experts-per-tok", type=int)
    ap.add_argument("--intermediate-size", type=int, help="routed (and shared) expert width")
    ap.add_argument("--dense-intermediate-size", type=int)
    ap.add_argument("--topk-blocks", type=int, help="sparse_topk_blocks (tiny 2, real 16)")
    ap.add_argument("--block-size", type=int, help="sparse_block_size (128)")
    ap.add_argument("--max-position-embeddings", type=int)
    a = ap.parse_args(argv)
    out = write_tiny_checkpoint(
        a.out_dir, flat=a.flat, config_only=a.config_only, real_dims=a.real_dims, dtype=a.dtype, seed=a.seed,
        quant=a.quant,
        dense_layers=a.dense_layers, num_hidden_layers=a.layers, hidden_size=a.hidden_size,
        num_attention_heads=a.heads, num_key_value_heads=a.num_kv_heads, sparse_num_index_heads=a.index_heads,
        head_dim=a.head_dim, vocab_size=a.vocab_size, num_local_experts=a.num_experts,
        num_experts_per_tok=a.experts_per_tok, intermediate_size=a.intermediate_size,
        dense_intermediate_size=a.dense_intermediate_size, sparse_topk_blocks=a.topk_blocks,
        sparse_block_size=a.block_size, max_position_embeddings=a.max_position_embeddings,
    )
    cfg = json.loads((out / "config.json").read_text())
    tc = cfg.get("text_config", cfg)
    what = "config only" if a.config_only else f"{(out / 'model.safetensors').stat().st_size / 2**20:.1f} MiB weights"
    quantized = f", {cfg['quantization_config']['quant_method']}" if "quantization_config" in cfg else ""
    print(f"wrote {out} ({cfg['model_type']}, {tc['num_hidden_layers']} layers, hidden {tc['hidden_size']}, "
          f"{what}{quantized})")
    return out


if __name__ == "__main__":
    main()
