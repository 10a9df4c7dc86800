"""Fused-MoE Triton kernel configs tuned for MiniMax-M3's routed-expert shapes, found before SGLang's bundled ones.

Layout and format are SGLang 0.5.17's (``fused_moe_triton_config.get_moe_configs``): ``configs/triton_<version>/
<name>``, ``<name> = get_config_file_name(E, N, dtype, [block_n, block_k], per_channel_quant, down_moe)``, each file
a JSON map from a token count M to one kernel config (the nearest M is used). Written by ``benchmarks/tune_moe.py``
(``scripts/gpu_tune_moe.sh``) for M3's shapes: E = 128, N = w2's last dim = 3072 / TP. ``lookup`` answers only for
names present here, under the running Triton version exactly (configs tuned under one Triton version can be slower
under another, SGLang's own note); every other shape stays with SGLang's lookup (``SGLANG_MOE_CONFIG_DIR`` would
instead replace SGLang's folder and hide its files for other models). The hook that calls ``lookup`` lives in
plugin.py (``_packaged_moe_configs``, active while an M3 model is served).
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@functools.lru_cache(maxsize=None)
def _read(path: Path) -> dict[int, dict] | None:
    if not path.is_file():
        return None
    configs = {int(m): cfg for m, cfg in json.loads(path.read_text()).items()}
    logger.info("sglang-m3: fused-MoE kernel configs from %s", path)  # once per file: this read is cached
    return configs


def lookup(E: int, N: int, dtype: str | None, block_n: int | None = 0, block_k: int | None = 0,
           per_channel_quant: bool = False, down_moe: bool = False, *, config_dir: Path | None = None):
    """The packaged configs for one SGLang config name, as ``get_moe_configs`` returns them ({M: config}), or None
    when this package has no file of that name for the running Triton version. Arguments are
    ``get_moe_configs``'s (E experts, N = intermediate size per partition, dtype selector or None for bf16/fp16).
    Raises what SGLang's ``get_config_file_name`` raises (e.g. without a GPU it has no device name)."""
    import triton
    from sglang.srt.layers.moe.moe_runner.triton_utils.fused_moe_triton_config import get_config_file_name

    name = get_config_file_name(E, N, dtype, [block_n, block_k], per_channel_quant, down_moe=down_moe)
    version_dir = f"triton_{triton.__version__.replace('.', '_')}"
    return _read((config_dir or CONFIG_DIR) / version_dir / name)
