"""Markdown report of the MSA kernel benchmark's JSON result (GPU run or --smoke cross-check)."""

from __future__ import annotations

# ----------------------------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------------------------


def _f(v, fmt):
    return "—" if v is None else format(v, fmt)


def markdown(res) -> str:
    env = res["env"]
    page_size = res["args"].get("page_size", 1)  # runs before --page-size existed used the token-slot pool
    lines = [f"# MSA sparse-layer kernel benchmark ({'smoke' if res['smoke'] else 'GPU'}, page size {page_size})", "",
             f"device: {env['device']} · torch {env['torch']} · triton {env['triton']} · sglang {env['sglang']}", ""]
    if res["smoke"]:
        s = res["smoke_result"]
        lines += [f"in-tree paths: {s['intree_paths']}", "",
                  f"**{'PASS' if s['ok'] else 'FAIL'}** (atol {s['atol']}): max |ours − in-tree| "
                  f"{s['max_abs_ours_vs_intree']:.3e}, max |ours − reference| {s['max_abs_ours_vs_ref']:.3e}, "
                  f"max |in-tree − reference| {s['max_abs_intree_vs_ref']:.3e}; selection rows differing "
                  f"ours vs in-tree: {s['sel_mismatch_ours_vs_intree']}", "",
                  "| kind | heads | seq_lens | new | sel ≠ (ours/in-tree, ours/ref, in-tree/ref) "
                  "| max abs ours−in-tree | ours−ref | in-tree−ref |", "|---|---|---|---|---|---|---|---|"]
        for r in s["cases"]:
            lines.append(f"| {r['kind']} | {r['heads']} | {r['seq_lens']} | {r['new_tokens']} | "
                         f"{r['sel_mismatch_ours_vs_intree']}, {r['sel_mismatch_ours_vs_ref']}, "
                         f"{r['sel_mismatch_intree_vs_ref']} | {r['max_abs_ours_vs_intree']:.2e} | "
                         f"{r['max_abs_ours_vs_ref']:.2e} | {r['max_abs_intree_vs_ref']:.2e} |")
        return "\n".join(lines) + "\n"
    g = res["gpu"]
    lines += [f"device-to-device copy bandwidth: {g['copy_bandwidth_bytes_per_s'] / 1e12:.3f} TB/s · "
              f"in-tree paths: {g['intree_paths']} · L2 flushed between replays: {not res['args']['no_l2_flush']}",
              "", "## Decode (one sparse layer, CUDA-graph replay, median µs)", "",
              "| heads | bs | context | ours µs | in-tree µs | MB needed | floor µs | ours/floor | in-tree/floor "
              "| ours TB/s | in-tree TB/s | speed-up | max abs Δ | sel ≠ |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in g["decode"]:
        if "skipped" in r:
            lines.append(f"| {r['heads']} | {r['bs']} | {r['context']} | skipped: {r['skipped']} |")
            continue
        tb = lambda k: None if r.get(k) is None else r[k] / 1e12  # noqa: E731
        lines.append(
            f"| {r['heads']} | {r['bs']} | {r['context']} | {r['ours_us']:.1f} | {_f(r.get('intree_us'), '.1f')} | "
            f"{r['bytes_needed'] / 1e6:.1f} | {r['floor_us']:.1f} | {r['ours_over_floor']:.2f} | "
            f"{_f(r.get('intree_over_floor'), '.2f')} | {tb('ours_bytes_per_s'):.2f} | "
            f"{_f(tb('intree_bytes_per_s'), '.2f')} | {_f(r.get('speedup'), '.2f')} | "
            f"{_f(r.get('max_abs_ours_vs_intree'), '.1e')} | {r.get('sel_mismatch_rows', '—')} |")
    timed = [r for r in g["decode"] if "ours_us" in r]
    if timed:
        lines += ["", "## Where our decode step goes (each stage captured alone, median µs), both indexer variants", "",
                  "| heads | bs | context | meta | store (unfused) | indexer (variant) | attention | indexer two-pass | "
                  "indexer two-pass rank / threshold | indexer split | sel ≠ two-pass / rank / threshold / split |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in timed:
            lines.append(
                f"| {r['heads']} | {r['bs']} | {r['context']} | {_f(r.get('ours_meta_us'), '.1f')} | "
                f"{_f(r.get('ours_store_us'), '.1f')} ({_f(r.get('ours_store_unfused_us'), '.1f')}) | "
                f"{_f(r.get('ours_indexer_us'), '.1f')} "
                f"({r.get('ours_indexer_variant', '?')}) | {_f(r.get('ours_attention_us'), '.1f')} | "
                f"{_f(r.get('ours_indexer_two_pass_us'), '.1f')} | "
                f"{_f(r.get('ours_indexer_two_pass_rank_us'), '.1f')} / "
                f"{_f(r.get('ours_indexer_two_pass_threshold_us'), '.1f')} | "
                f"{_f(r.get('ours_indexer_split_us'), '.1f')} | "
                f"{r.get('sel_mismatch_two_pass_vs_ours', '—')} / "
                f"{r.get('sel_mismatch_two_pass_rank_vs_ours', '—')} / "
                f"{r.get('sel_mismatch_two_pass_threshold_vs_ours', '—')} / "
                f"{r.get('sel_mismatch_split_vs_ours', '—')} |")
    if g["prefill"]:
        lines += ["", "## Prefill (one prompt, one sparse layer, eager, median)", "",
                  "| heads | prompt | ours ms | in-tree ms | ours tok/s | in-tree tok/s | speed-up | max abs Δ | sel ≠ |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in g["prefill"]:
            if "skipped" in r:
                lines.append(f"| {r['heads']} | {r['prompt']} | skipped: {r['skipped']} |")
                continue
            lines.append(
                f"| {r['heads']} | {r['prompt']} | {r['ours_ms']:.2f} | {_f(r.get('intree_ms'), '.2f')} | "
                f"{r['ours_tokens_per_s']:.3g} | {_f(r.get('intree_tokens_per_s'), '.3g')} | "
                f"{_f(r.get('speedup'), '.2f')} | {_f(r.get('max_abs_ours_vs_intree'), '.1e')} | "
                f"{r.get('sel_mismatch_rows', '—')} |")
    profiled = [r for r in timed if "ours_kernels_us" in r]
    if profiled:
        lines += ["", "## Each kernel of one replay (torch profiler, µs; the sum is below the replay time by the gaps "
                  "between launches)", "", "| heads | bs | context | ours | in-tree |", "|---|---|---|---|---|"]
        for r in profiled:
            cell = lambda side: "<br>".join(f"{v:.1f} {k[:48]}" for k, v in  # noqa: E731
                                            list(r.get(f"{side}_kernels_us", {}).items())[:8]) or "—"
            lines.append(f"| {r['heads']} | {r['bs']} | {r['context']} | {cell('ours')} | {cell('intree')} |")
    lines += ["", "Floor = bytes needed (index keys of every visible token + K/V of min(context, topk·block) "
              "tokens per KV head + the new token's K/V/index-key writes) / copy bandwidth. "
              "Stage times: `ours_meta_us` is per forward (shared by all sparse layers; one tiny kernel, so it is "
              "also about the fixed cost of timing any captured graph alone); store = the one-launch store_kv_index, "
              "(unfused) = the pool's K/V write + store_index_k; the variant columns force the "
              "indexer's two-pass (score, then select; two-pass: the radix search for every row; rank: its pass 2 "
              "by all-pairs ranking for rows of <= INDEXER_RANK_MAX_BLOCKS blocks, INDEXER_LONG_ROW_SELECT above; "
              "threshold: the group-maximum threshold for every row) or split (+ merge) kernel; sel ≠ counts rows "
              "whose selection differs from the default variant's (must be 0)."]
    return "\n".join(lines) + "\n"
