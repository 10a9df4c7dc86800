"""Tiny checkpoint writer (sglang_m3.tiny), its tokenizer and chat template, and the HF oracle (tests/hf_oracle.py).

CPU only; the HF model load is the slow part (transformers' model module import, ~10 s the first time).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

from sglang_m3 import tiny, tiny_tokenizer  # noqa: E402

try:
    from tests.hf_oracle import hf_greedy, hf_is_exact_msa, hf_logits, hf_model, read_config
except ImportError:  # tests/ on sys.path instead of the repo root
    from hf_oracle import hf_greedy, hf_is_exact_msa, hf_logits, hf_model, read_config

REFERENCE = Path("/work/shared/reference")  # the release's config dumps, when present on this machine
NS = "]<]minimax[>["


# ------------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def vl_dir(tmp_path_factory):
    return tiny.write_tiny_checkpoint(tmp_path_factory.mktemp("vl"))


@pytest.fixture(scope="module")
def flat_dir(tmp_path_factory):
    return tiny.write_tiny_checkpoint(tmp_path_factory.mktemp("flat"), flat=True)


@pytest.fixture(scope="module")
def tok(vl_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(vl_dir))


def _config(d) -> dict:
    return json.loads((Path(d) / "config.json").read_text())


def _tensors(d) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    out = {}
    with safe_open(str(Path(d) / "model.safetensors"), "pt") as f:
        for k in f.keys():
            t = f.get_tensor(k)
            out[k] = (tuple(t.shape), t.dtype)
    return out


def _expected_text_tensors(tc: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    """Spec §4.1, written out independently of the writer: name -> (shape, "fp32" | "model")."""
    H, hd, nq, nkv = tc["hidden_size"], tc["head_dim"], tc["num_attention_heads"], tc["num_key_value_heads"]
    sp = tc["sparse_attention_config"]
    E, I, Ish, Id, V = (tc["num_local_experts"], tc["intermediate_size"], tc["shared_intermediate_size"],
                        tc["dense_intermediate_size"], tc["vocab_size"])
    ni, di = sp["sparse_num_index_heads"], sp["sparse_index_dim"]
    exp = {"model.embed_tokens.weight": ((V, H), "model"), "lm_head.weight": ((V, H), "model"),
           "model.norm.weight": ((H,), "model")}
    for l in range(tc["num_hidden_layers"]):
        p = f"model.layers.{l}."
        exp |= {p + "input_layernorm.weight": ((H,), "model"), p + "post_attention_layernorm.weight": ((H,), "model"),
                p + "self_attn.q_proj.weight": ((nq * hd, H), "model"), p + "self_attn.k_proj.weight": ((nkv * hd, H), "model"),
                p + "self_attn.v_proj.weight": ((nkv * hd, H), "model"), p + "self_attn.o_proj.weight": ((H, nq * hd), "model"),
                p + "self_attn.q_norm.weight": ((hd,), "model"), p + "self_attn.k_norm.weight": ((hd,), "model")}
        if sp["sparse_attention_freq"][l]:
            exp |= {p + "self_attn.index_q_proj.weight": ((ni * di, H), "model"),
                    p + "self_attn.index_k_proj.weight": ((di, H), "model"),
                    p + "self_attn.index_q_norm.weight": ((di,), "model"),
                    p + "self_attn.index_k_norm.weight": ((di,), "model")}
        if tc["moe_layer_freq"][l]:
            m = p + "block_sparse_moe."
            exp |= {m + "gate.weight": ((E, H), "fp32"), m + "e_score_correction_bias": ((E,), "fp32")}
            for e in range(E):
                exp |= {m + f"experts.{e}.w1.weight": ((I, H), "model"), m + f"experts.{e}.w3.weight": ((I, H), "model"),
                        m + f"experts.{e}.w2.weight": ((H, I), "model")}
            exp |= {m + "shared_experts.gate_proj.weight": ((Ish, H), "model"),
                    m + "shared_experts.up_proj.weight": ((Ish, H), "model"),
                    m + "shared_experts.down_proj.weight": ((H, Ish), "model")}
        else:
            exp |= {p + "mlp.gate_proj.weight": ((Id, H), "model"), p + "mlp.up_proj.weight": ((Id, H), "model"),
                    p + "mlp.down_proj.weight": ((H, Id), "model")}
    return exp


# ------------------------------------------------------------------------------------------------ config

def test_vl_config_matches_release_structure(vl_dir):
    cfg = _config(vl_dir)
    tc = cfg["text_config"]
    assert cfg["model_type"] == "minimax_m3_vl"
    assert cfg["architectures"] == ["MiniMaxM3SparseForConditionalGeneration"]
    assert tc["architectures"] == ["MiniMaxM3SparseForCausalLM"] and "model_type" not in tc
    # every key of the released text_config / sparse_attention_config, in the release's order
    real_tc = json.loads((REFERENCE / "m3_config_real.json").read_text())["text_config"] if REFERENCE.exists() \
        else tiny.REAL_TEXT_CONFIG
    assert [k for k in tc if k in real_tc] == list(real_tc)
    assert set(tc) - set(real_tc) == {"bos_token_id", "eos_token_id"}
    assert list(tc["sparse_attention_config"]) == list(real_tc["sparse_attention_config"])
    if REFERENCE.exists():
        real = json.loads((REFERENCE / "m3_config_real.json").read_text())
        assert set(cfg) - set(real) == {"bos_token_id", "eos_token_id"}
        assert set(real) - set(cfg) == {"auto_map"}  # remote-code file not shipped (see build_vl_config)
        assert set(cfg["vision_config"]) == set(real["vision_config"])
    # tiny sizes of the brief
    sp = tc["sparse_attention_config"]
    want = dict(vocab_size=512, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                head_dim=32, rotary_dim=16, partial_rotary_factor=0.5, intermediate_size=64,
                shared_intermediate_size=64, dense_intermediate_size=192, num_local_experts=8, num_experts_per_tok=2,
                n_shared_experts=1, rope_theta=5000000, routed_scaling_factor=2.0, swiglu_alpha=1.702,
                swiglu_limit=7.0, use_gemma_norm=True, qk_norm_type="per_head", attention_output_gate=False,
                tie_word_embeddings=False, hidden_act="swigluoai", scoring_func="sigmoid")
    assert {k: tc[k] for k in want} == want
    assert tc["max_position_embeddings"] >= 8192
    assert tc["moe_layer_freq"] == sp["sparse_attention_freq"] == sp["sparse_disable_index_value"] == [0, 1, 1, 1]
    assert (sp["sparse_num_index_heads"], sp["sparse_index_dim"], sp["sparse_block_size"], sp["sparse_topk_blocks"],
            sp["sparse_init_block"], sp["sparse_local_block"], sp["sparse_score_type"]) == (2, 32, 128, 2, 0, 1, "max")
    # ids are the tiny tokenizer's
    ids = tiny.token_ids()
    assert tc["bos_token_id"] == cfg["bos_token_id"] == ids["]~!b["]
    assert tc["eos_token_id"] == cfg["eos_token_id"] == ids["[e~["]
    assert cfg["image_token_index"] == ids["]<]image[>["] and cfg["video_token_index"] == ids["]<]video[>["]
    gen = json.loads((Path(vl_dir) / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (tc["bos_token_id"], tc["eos_token_id"])


def test_flat_config(flat_dir, vl_dir):
    cfg = _config(flat_dir)
    assert cfg["model_type"] == "minimax_m3" and cfg["architectures"] == ["MiniMaxM3SparseForCausalLM"]
    vl_tc = _config(vl_dir)["text_config"]
    assert {k: v for k, v in cfg.items() if k not in ("model_type", "torch_dtype", "auto_map")} == vl_tc
    # The flat export ships its config class (for SGLang's in-tree M3 with --trust-remote-code).
    module, cls = cfg["auto_map"]["AutoConfig"].split(".")
    assert (flat_dir / f"{module}.py").read_text().count(f"class {cls}(PretrainedConfig)") == 1
    if REFERENCE.exists():  # same keys as the flattened reference config
        assert set(cfg) - {"auto_map"} == set(json.loads((REFERENCE / "m3_text_config.json").read_text()))


def test_overrides_and_cli(tmp_path):
    out = tiny.main([str(tmp_path / "c"), "--flat", "--num-kv-heads", "1", "--layers", "3", "--topk-blocks", "3",
                     "--block-size", "64", "--seed", "5", "--dtype", "float32"])
    cfg = _config(out)
    sp = cfg["sparse_attention_config"]
    assert (cfg["num_key_value_heads"], sp["sparse_num_index_heads"], cfg["num_hidden_layers"]) == (1, 1, 3)
    assert (sp["sparse_topk_blocks"], sp["sparse_block_size"]) == (3, 64)
    assert cfg["moe_layer_freq"] == sp["sparse_attention_freq"] == sp["sparse_disable_index_value"] == [0, 1, 1]
    assert cfg["torch_dtype"] == "float32"
    assert {dt for _, dt in _tensors(out).values()} == {torch.float32}
    with pytest.raises(TypeError):
        tiny.write_tiny_checkpoint(tmp_path / "bad", not_a_field=1)



def test_every_cli_flag_reaches_its_config_field(tmp_path):
    """Each size flag of `python -m sglang_m3.tiny` lands in its own config field (values all distinct, so a flag
    wired to another field shows)."""
    out = tiny.main([str(tmp_path / "c"), "--flat", "--config-only", "--layers", "5", "--dense-layers", "2",
                     "--hidden-size", "96", "--heads", "6", "--num-kv-heads", "3", "--index-heads", "6",
                     "--head-dim", "48", "--vocab-size", "700", "--num-experts", "7", "--experts-per-tok", "3",
                     "--intermediate-size", "40", "--dense-intermediate-size", "88", "--topk-blocks", "4",
                     "--block-size", "32", "--max-position-embeddings", "4096"])
    cfg = _config(out)
    sp = cfg["sparse_attention_config"]
    assert {k: cfg[k] for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                                "head_dim", "vocab_size", "num_local_experts", "num_experts_per_tok",
                                "intermediate_size", "dense_intermediate_size", "max_position_embeddings")} == dict(
        num_hidden_layers=5, hidden_size=96, num_attention_heads=6, num_key_value_heads=3, head_dim=48,
        vocab_size=700, num_local_experts=7, num_experts_per_tok=3, intermediate_size=40, dense_intermediate_size=88,
        max_position_embeddings=4096)
    assert (sp["sparse_num_index_heads"], sp["sparse_topk_blocks"], sp["sparse_block_size"]) == (6, 4, 32)
    assert cfg["moe_layer_freq"] == sp["sparse_attention_freq"] == [0, 0, 1, 1, 1]


def test_tied_sizes_follow_their_anchor_unless_given():
    """The release ties some sizes together (M3_SPEC §1): index dim = head dim, rotary dim = head dim x 0.5, index
    heads = KV heads, shared-expert width = routed width x n_shared_experts (1). Overriding the anchor moves the
    tied size; an explicit value wins; partial_rotary_factor is always rotary_dim / head_dim (HF reads the factor,
    SGLang the dim). Aliases name their own field; forced blocks that cannot fit in top-k are refused."""
    from sglang_m3.tiny_config import build_text_config

    cfg = build_text_config(head_dim=64, intermediate_size=48, num_kv_heads=4, heads=8)
    sp = cfg["sparse_attention_config"]
    assert (sp["sparse_index_dim"], cfg["rotary_dim"], cfg["partial_rotary_factor"]) == (64, 32, 0.5)
    assert (cfg["shared_intermediate_size"], sp["sparse_num_index_heads"]) == (48, 4)
    cfg = build_text_config(head_dim=64, index_dim=16, rotary_dim=16, intermediate_size=48,
                            shared_intermediate_size=40, num_kv_heads=2, index_heads=4)
    sp = cfg["sparse_attention_config"]
    assert (sp["sparse_index_dim"], cfg["rotary_dim"], cfg["partial_rotary_factor"]) == (16, 16, 0.25)
    assert (cfg["shared_intermediate_size"], sp["sparse_num_index_heads"]) == (40, 4)
    sp = build_text_config(topk_blocks=4, init_blocks=1, local_blocks=2)["sparse_attention_config"]
    assert (sp["sparse_topk_blocks"], sp["sparse_init_block"], sp["sparse_local_block"]) == (4, 1, 2)
    with pytest.raises(AssertionError, match="forced blocks must fit"):
        build_text_config(topk_blocks=2, init_blocks=1, local_blocks=2)


def test_config_only_over_a_weighted_checkpoint_removes_its_weights(tmp_path):
    """Rewriting a directory as config-only removes the old model.safetensors (it would contradict the config)."""
    d = tiny.write_tiny_checkpoint(tmp_path / "d", layers=2)
    assert (d / "model.safetensors").exists()
    tiny.write_tiny_checkpoint(d, layers=3, config_only=True)
    assert not (d / "model.safetensors").exists() and _config(d)["text_config"]["num_hidden_layers"] == 3


def test_config_only_real_dims(tmp_path):
    vl = tiny.write_tiny_checkpoint(tmp_path / "vl", config_only=True, real_dims=True, layers=4, dense_layers=1)
    flat = tiny.main([str(tmp_path / "flat"), "--config-only", "--real-dims", "--layers", "5", "--flat"])
    assert not (vl / "model.safetensors").exists() and not (flat / "model.safetensors").exists()
    assert (vl / "tokenizer.json").exists() and (flat / "tokenizer_config.json").exists()
    cfg = _config(vl)
    tc = cfg["text_config"]
    real = tiny.REAL_TEXT_CONFIG
    for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "num_local_experts",
              "num_experts_per_tok", "intermediate_size", "dense_intermediate_size", "vocab_size",
              "max_position_embeddings", "rotary_dim"):
        assert tc[k] == real[k], k
    assert (tc["hidden_size"], tc["num_attention_heads"], tc["num_local_experts"]) == (6144, 64, 128)
    assert tc["sparse_attention_config"]["sparse_topk_blocks"] == 16
    assert tc["num_hidden_layers"] == 4 and tc["moe_layer_freq"] == [0, 1, 1, 1]
    assert cfg["vision_config"]["hidden_size"] == 1280 and cfg["projector_hidden_size"] == 6144
    fc = _config(flat)
    assert fc["model_type"] == "minimax_m3" and fc["hidden_size"] == 6144
    assert fc["moe_layer_freq"] == fc["sparse_attention_config"]["sparse_attention_freq"] == [0, 0, 0, 1, 1]
    if REFERENCE.exists():
        real_cfg = json.loads((REFERENCE / "m3_config_real.json").read_text())
        strip = lambda d: {k: v for k, v in d.items() if k not in ("num_hidden_layers", "moe_layer_freq",  # noqa: E731
                                                                    "sparse_attention_config", "bos_token_id",
                                                                    "eos_token_id")}
        assert strip(tc) == strip(real_cfg["text_config"])
        assert cfg["vision_config"] == real_cfg["vision_config"]
        assert cfg["image_grid_pinpoints"] == real_cfg["image_grid_pinpoints"]

    # the dummy-weight checkpoint's tokenizer covers the model's whole vocabulary (benchmarks draw prompt ids from
    # the tokenizer's vocab_size and need every output id to render)
    from transformers import PreTrainedTokenizerFast

    ftok = PreTrainedTokenizerFast(tokenizer_file=str(flat / "tokenizer.json"))
    assert ftok.vocab_size == fc["vocab_size"] == 200064
    assert ftok.decode([200063, 70000]) == tiny_tokenizer.filler_token(200063) + tiny_tokenizer.filler_token(70000)


def test_filled_tokenizer_keeps_bytes_and_specials():
    """Filling the vocabulary adds decodable words past the specials and changes nothing else: the unfilled
    tokenizer is the oracle for encoding, special ids and byte decoding."""
    plain, filled = tiny_tokenizer.build_tokenizer(), tiny_tokenizer.build_tokenizer(vocab_size=1000)
    sizes = plain.get_vocab_size(with_added_tokens=False), filled.get_vocab_size(with_added_tokens=False)
    assert sizes == (256, 1000)
    text = "hi ]~!b[ <mm:think>x</mm:think>\n" + tiny_tokenizer.EOS
    assert filled.encode(text).ids == plain.encode(text).ids
    assert [filled.token_to_id(c) for c in tiny_tokenizer.token_ids()] == list(tiny_tokenizer.token_ids().values())
    first = tiny_tokenizer.BYTE_TOKENS + len(tiny_tokenizer.SPECIAL_TOKENS)
    assert filled.decode(list(range(104, 106)) + [first, 999]) == "hi" + " w%d w999" % first
    assert len({filled.decode([i]) for i in range(first, 1000)}) == 1000 - first  # every filler word distinct
    with pytest.raises(ValueError, match="vocab_size 100"):
        tiny_tokenizer.build_tokenizer(vocab_size=100)


# ------------------------------------------------------------------------------------------------ tensors

def test_vl_tensors_follow_spec(vl_dir):
    tc = _config(vl_dir)["text_config"]
    got = _tensors(vl_dir)
    exp = {"language_model." + k: v for k, v in _expected_text_tensors(tc).items()}
    text = {k: v for k, v in got.items() if k.startswith("language_model.")}
    assert set(text) == set(exp)
    L, S, E = tc["num_hidden_layers"], sum(tc["moe_layer_freq"]), tc["num_local_experts"]
    D = L - S
    assert len(text) == 3 + 8 * L + 3 * D + S * (4 + 2 + 3 * E + 3) == 137
    for k, (shape, kind) in exp.items():
        assert got[k][0] == shape, k
        assert got[k][1] == (torch.float32 if kind == "fp32" else torch.bfloat16), k
    # the vision side is there (loaders must skip it) and nothing else
    vision = set(got) - set(text)
    assert vision and all(k.startswith(("vision_tower.vision_model.", "multi_modal_projector.", "patch_merge_mlp."))
                          for k in vision)
    assert {"vision_tower.vision_model.embeddings.patch_embedding.weight",
            "multi_modal_projector.linear_1.weight", "patch_merge_mlp.linear_2.bias"} <= vision
    assert got["vision_tower.vision_model.embeddings.patch_embedding.weight"][1] == torch.float32
    assert not any(k.endswith(".bias") for k in text)  # no biases anywhere in the text model


def test_flat_tensors_follow_spec(flat_dir):
    tc = _config(flat_dir)
    got = _tensors(flat_dir)
    exp = _expected_text_tensors(tc)
    assert set(got) == set(exp)
    assert all(got[k][0] == shape for k, (shape, _) in exp.items())


def test_weights_deterministic_per_seed_and_name(tmp_path):
    from safetensors.torch import load_file

    a = load_file(str(tiny.write_tiny_checkpoint(tmp_path / "a", flat=True, seed=1) / "model.safetensors"))
    b = load_file(str(tiny.write_tiny_checkpoint(tmp_path / "b", flat=True, seed=1, layers=2) / "model.safetensors"))
    c = load_file(str(tiny.write_tiny_checkpoint(tmp_path / "c", flat=True, seed=2) / "model.safetensors"))
    assert set(b) < set(a)
    assert all(torch.equal(a[k], b[k]) for k in b)  # a tensor depends only on (seed, name)
    assert not torch.equal(a["model.layers.1.self_attn.q_proj.weight"], c["model.layers.1.self_attn.q_proj.weight"])
    # ... and on the name: tensors of one shape under different names differ
    assert not torch.equal(a["model.layers.1.self_attn.q_proj.weight"], a["model.layers.2.self_attn.q_proj.weight"])
    assert not torch.equal(a["model.layers.1.block_sparse_moe.experts.0.w1.weight"],
                           a["model.layers.1.block_sparse_moe.experts.1.w1.weight"])
    bias = a["model.layers.1.block_sparse_moe.e_score_correction_bias"]
    assert bias.std() > 0.03  # random correction bias, so it changes some expert choices
    assert a["model.layers.1.input_layernorm.weight"].abs().max() > 0  # Gemma offsets are not all zero


# ------------------------------------------------------------------------------------------------ HF oracle

def test_hf_loads_both_packagings_without_missing_keys(vl_dir, flat_dir):
    # hf_model asserts "no missing / unexpected / mismatched keys" itself
    vl = hf_model(vl_dir)
    assert type(vl).__name__ == "MiniMaxM3SparseForConditionalGeneration"
    flat = hf_model(flat_dir)
    assert type(flat).__name__ == "MiniMaxM3VLForCausalLM"
    ids = list(b"]~!b[ hello tiny MiniMax-M3, how are you? 0123456789")
    a, b, c = hf_logits(vl_dir, ids), hf_logits(flat_dir, ids), hf_logits(vl_dir, ids, text_only=True)
    assert a.shape == (len(ids), 512) and a.dtype == torch.float32
    assert torch.isfinite(a).all()
    assert torch.equal(a, b) and torch.equal(a, c)  # same seed -> same weights in both packagings
    real = a[:, : len(tiny.SPECIAL_TOKENS) + 256]
    assert real.std(dim=-1).min() > 1.0  # logits spread, not flat
    assert len(set(a.argmax(-1).tolist())) > len(ids) // 3  # predictions vary with position/context


def test_hf_reads_block_selection_from_config(vl_dir, tmp_path):
    tc = _config(vl_dir)["text_config"]
    sp = tc["sparse_attention_config"]
    model = hf_model(vl_dir)
    layers = model.model.language_model.layers
    assert [layer.self_attn.indexer is not None for layer in layers] == [bool(f) for f in sp["sparse_attention_freq"]]
    idx = layers[1].self_attn.indexer
    assert (idx.block_size, idx.topk_blocks, idx.local_blocks, idx.num_heads, idx.head_dim) == (
        sp["sparse_block_size"], sp["sparse_topk_blocks"], sp["sparse_local_block"],
        sp["sparse_num_index_heads"], sp["sparse_index_dim"])
    assert [type(layer.mlp).__name__ for layer in layers] == [
        "MiniMaxM3VLSparseMoeBlock" if f else "MiniMaxM3VLDenseMLP" for f in tc["moe_layer_freq"]]
    # behaviour: same weights with top-64 blocks (= dense up to 8192 tokens) agree up to 256 = 2 blocks, then not.
    # Up to 256 tokens both models select every block, but through different top-k sizes and masks: the same
    # function by different arithmetic, so equal within fp32 rounding, not bit for bit (issue 8: 1.9e-6 on another
    # CPU). DENSE_ATOL = 1e-4 on logits of magnitude ~10 after 4 layers leaves 50x that margin and stays 1000x
    # below the sparse-region gap (> 0.1 mean of per-position max), which a top-k not read from the config
    # (both models selecting the same blocks) would close.
    DENSE_ATOL = 1e-4
    dense = tiny.write_tiny_checkpoint(tmp_path / "dense", topk_blocks=64)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(32, 127, (400,), generator=g).tolist()
    a, b = hf_logits(vl_dir, ids), hf_logits(dense, ids)
    blocks = sp["sparse_topk_blocks"] * sp["sparse_block_size"]
    dense_gap = (a[:blocks] - b[:blocks]).abs().max().item()
    sparse_gap = (a[blocks:] - b[blocks:]).abs().amax(-1).mean().item()
    assert dense_gap <= DENSE_ATOL, dense_gap
    assert sparse_gap > 0.1, sparse_gap
    assert hf_is_exact_msa(tc, blocks) and not hf_is_exact_msa(tc, blocks + 1)


def test_hf_one_kv_head(tmp_path):
    d = tiny.write_tiny_checkpoint(tmp_path / "kv1", num_kv_heads=1)
    tc, is_vl = read_config(d)
    assert is_vl and tc["num_key_value_heads"] == tc["sparse_attention_config"]["sparse_num_index_heads"] == 1
    assert hf_model(d).model.language_model.layers[1].self_attn.indexer.num_heads == 1
    assert hf_is_exact_msa(tc, 10_000)
    assert torch.isfinite(hf_logits(d, list(range(32, 300)))).all()


def test_greedy_generation_is_varied_text(vl_dir, tok):
    prompt = tok.apply_chat_template([{"role": "user", "content": "Tell me a story."}], add_generation_prompt=True,
                                     thinking_mode="disabled", tokenize=False)
    ids = tok.encode(prompt)
    out = hf_greedy(vl_dir, ids, 24)
    assert all(i < len(tok) for i in out)  # never an id beyond the tokenizer
    assert len(set(out)) >= 8, out
    # only printable ASCII / newline bytes and the non-structural specials (valid UTF-8 when streamed)
    allowed = tiny.PRINTABLE_BYTES | {tiny.token_ids()[s] for s in ("[e~[", "<mm:think>", "</mm:think>", "<think>",
                                                                     "</think>", NS)}
    assert set(out) <= allowed, out


def test_hf_cached_decode_matches_recompute_in_sparse_region(tmp_path):
    # 16-token blocks, top-2: sparse from position 32 on, so decode runs through HF's index-key cache
    d = tiny.write_tiny_checkpoint(tmp_path / "b16", block_size=16)
    ids = list(b"Once upon a time, in a land far away, there")
    assert len(ids) > 32
    # Teacher-forced on HF's own cached greedy tokens: the logits of every cached decode step equal those of
    # one recompute of the whole sequence (different arithmetic: fp32, stated tolerance; token equality on a
    # random model would hinge on near-ties).
    toks = hf_greedy(d, ids, 8, use_cache=True)
    model, seq = hf_model(d), ids + toks
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), use_cache=True)
        cached = [out.logits[0, -1].float()]
        for t in toks[:-1]:
            out = model(input_ids=torch.tensor([[t]]), past_key_values=out.past_key_values, use_cache=True)
            cached.append(out.logits[0, -1].float())
    full = hf_logits(d, seq)[len(ids) - 1:-1]
    torch.testing.assert_close(torch.stack(cached), full, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------ tokenizer

def test_tokenizer_bytes_and_specials(tok, vl_dir):
    ids = tiny.token_ids()
    assert len(tok) == 256 + len(tiny.SPECIAL_TOKENS) <= _config(vl_dir)["text_config"]["vocab_size"]
    for text in ["Hello, world!", "héllo 世界 🙂\n\ttabs  and  spaces ", "a" * 300]:
        enc = tok.encode(text)
        assert enc == list(text.encode())  # one token per byte, no BOS added implicitly
        assert tok.decode(enc) == text
    for s in ["]~!b[", "]~b]", "[e~[", "<mm:think>", "</mm:think>", "<think>", "</think>", NS, "]<]image[>[",
              "]<]video[>["]:
        assert tok.encode(s) == [ids[s]], s
        assert tok.convert_ids_to_tokens(ids[s]) == s
    assert (tok.bos_token, tok.eos_token) == ("]~!b[", "[e~[")
    assert (tok.bos_token_id, tok.eos_token_id) == (ids["]~!b["], ids["[e~["])
    text = f"]~!b[]~b]ai\n<mm:think>why</mm:think>answer{NS}<tool_call>[e~["
    enc = tok.encode(text)
    assert tok.decode(enc) == text
    # parsers read think tags and the namespace token from decoded text: they must survive skip_special_tokens
    assert tok.decode(enc, skip_special_tokens=True) == f"ai\n<mm:think>why</mm:think>answer{NS}<tool_call>"


# ------------------------------------------------------------------------------------------------ chat template

SYSTEM_HEAD = (
    "]~!b[]~b]system\nYou are MiniMax-M3, an AI assistant developed by MiniMax.\n\n<thinking_instructions>\n"
    "You can reason privately in a thinking block before you answer; the answer follows the block.\n"
    "- enabled: always reason before answering.\n- disabled: do not reason; answer directly.\n"
    "- adaptive: reason only when the request needs it.\nCurrent thinking mode: {mode}\n</thinking_instructions>[e~[\n"
)
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather forecast",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}]
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "reasoning_content": "Need the tool.", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {
            "city": "Paris", "days": 3, "tags": ["a", "b"], "opts": {"unit": "C", "exact": True}}}},
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Nice"}}}]},
    {"role": "tool", "content": "sunny"},
    {"role": "tool", "content": "rain"},
    {"role": "assistant", "content": "Paris sunny, Nice rain."},
    {"role": "user", "content": "Thanks!"},
]


def _expected_conversation(mode: str, past_reasoning: bool) -> str:
    tool_json = json.dumps(TOOLS[0]["function"], ensure_ascii=False)
    first_ai = "<mm:think>Need the tool.</mm:think>" if past_reasoning else "</mm:think>"
    return (
        SYSTEM_HEAD.format(mode=mode)
        + "]~b]developer\nBe brief.\n\n# Tools\nYou may call one or more of these tools to help with the request:\n"
        + f"<tools><tool>{tool_json}</tool></tools>\n\nTo call tools, reply with one block in exactly this format:\n"
        + f'{NS}<tool_call>\n{NS}<invoke name="tool_name">{NS}<argument_name>value{NS}</argument_name>{NS}</invoke>\n'
        + f"{NS}</tool_call>[e~[\n"
        + "]~b]user\nWeather in Paris?[e~[\n"
        + f"]~b]ai\n{first_ai}{NS}<tool_call>\n"
        + f'{NS}<invoke name="get_weather">{NS}<city>Paris{NS}</city>{NS}<days>3{NS}</days>'
        + f"{NS}<tags>{NS}<item>a{NS}</item>{NS}<item>b{NS}</item>{NS}</tags>"
        + f"{NS}<opts>{NS}<unit>C{NS}</unit>{NS}<exact>true{NS}</exact>{NS}</opts>{NS}</invoke>\n"
        + f'{NS}<invoke name="get_weather">{NS}<city>Nice{NS}</city>{NS}</invoke>\n'
        + f"{NS}</tool_call>[e~[\n"
        + "]~b]tool\n<response>sunny</response>\n<response>rain</response>[e~[\n"
        + "]~b]ai\n</mm:think>Paris sunny, Nice rain.[e~[\n"
    )


@pytest.mark.parametrize("mode,prefix", [(None, ""), ("adaptive", ""), ("enabled", "<mm:think>"),
                                         ("disabled", "</mm:think>")])
def test_chat_template_layout(tok, mode, prefix):
    kwargs = {} if mode is None else {"thinking_mode": mode}
    got = tok.apply_chat_template(CONVERSATION, tools=TOOLS, tokenize=False, add_generation_prompt=True, **kwargs)
    # the first ai turn lies before the last user message: its reasoning is dropped (bare closer)
    want = _expected_conversation(mode or "adaptive", past_reasoning=False)
    assert got == want + "]~b]user\nThanks![e~[\n]~b]ai\n" + prefix
    ids = tok.apply_chat_template(CONVERSATION, tools=TOOLS, add_generation_prompt=True, return_dict=False, **kwargs)
    assert tok.decode(ids) == got and ids[0] == tok.bos_token_id


def test_chat_template_current_turn_reasoning_and_defaults(tok):
    # no trailing user turn: the tool loop is the current turn, so its reasoning is kept
    msgs = CONVERSATION[:-1]
    got = tok.apply_chat_template(msgs, tools=TOOLS, tokenize=False, add_generation_prompt=False)
    assert got == _expected_conversation("adaptive", past_reasoning=True)
    # no system message: default developer prompt, no tools section; inline think tags in content are understood
    got = tok.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
         {"role": "assistant", "content": "<mm:think>hmm</mm:think>hello"}],
        tokenize=False, thinking_mode="enabled")
    assert got == (SYSTEM_HEAD.format(mode="enabled") + "]~b]developer\nYou are a helpful assistant.[e~[\n"
                   + "]~b]user\nhi[e~[\n]~b]ai\n<mm:think>hmm</mm:think>hello[e~[\n")
    with pytest.raises(Exception, match="thinking_mode"):
        tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, thinking_mode="sometimes")
    # the template also ships as chat_template.jinja and is the one in tokenizer_config.json
    assert tok.chat_template == tiny.CHAT_TEMPLATE


def test_rendered_assistant_turn_parses_with_sglang_minimax_m3_parsers(tok):
    """The template's assistant format round-trips through SGLang's own `minimax-m3` reasoning and tool-call
    parsers (used, not copied), i.e. what the model is taught to emit is what the server will parse."""
    fc = pytest.importorskip("sglang.srt.function_call.minimax_m3")
    from sglang.srt.entrypoints.openai.protocol import Function, Tool
    from sglang.srt.parser.reasoning_parser import ReasoningParser

    schema = {"type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}},
        "opts": {"type": "object", "properties": {"unit": {"type": "string"}, "exact": {"type": "boolean"}}}}}
    tools = [Tool(type="function", function=Function(name="get_weather", parameters=schema))]
    msgs = CONVERSATION[:3]  # system, user, assistant(reasoning + two tool calls): the current turn
    rendered = tok.apply_chat_template(msgs, tools=TOOLS, tokenize=False)
    # what the model would have generated for that turn: between the ai role header and the end-of-message
    turn = rendered.rsplit("]~b]ai\n", 1)[1].removesuffix("[e~[\n")
    reasoning, normal = ReasoningParser(model_type="minimax-m3", stream_reasoning=False).parse_non_stream(turn)
    assert reasoning == msgs[2]["reasoning_content"]
    result = fc.MinimaxM3Detector().detect_and_parse(normal, tools)
    assert result.normal_text.strip() == ""
    assert [(c.name, json.loads(c.parameters)) for c in result.calls] == [
        (call["function"]["name"], call["function"]["arguments"]) for call in msgs[2]["tool_calls"]]
    # thinking_mode=disabled puts the closer into the prompt; a stray closer in output is dropped too
    reasoning, normal = ReasoningParser(model_type="minimax-m3", stream_reasoning=False).parse_non_stream(
        "</mm:think>Hello")
    assert (reasoning or "", normal) == ("", "Hello")
