"""CPU stand-in for `sgl_kernel` (the PyPI wheel is CUDA-only and fails to import without libcuda).

SGLang 0.5.17's CPU engine imports exactly two helpers from it at import time; they are written here in plain
torch. Any other `sgl_kernel` name raises, so a CPU run never silently takes a path this shim cannot serve.
Only put this directory on PYTHONPATH for CPU runs (tests, CI, the README demo); never on a GPU host.
"""

import ctypes

import torch


def assign_req_to_token_pool_cpu(req_pool_indices, req_to_token, start_offset, end_offset, out_cache_loc,
                                 _max_context_len):
    """req_to_token[r, start:end] = the request's slice of out_cache_loc (requests packed in order)."""
    pos = 0
    for r, s, e in zip(req_pool_indices.tolist(), start_offset.tolist(), end_offset.tolist()):
        req_to_token[r, s:e] = out_cache_loc[pos:pos + e - s].to(req_to_token.dtype)
        pos += e - s


def copy_all_layer_kv_cache_cpu(data_ptrs, strides, tgt_loc, src_loc):
    """For every buffer (raw pointer + row stride in bytes) copy row src_loc[i] to row tgt_loc[i]."""
    pairs = list(zip(tgt_loc.tolist(), src_loc.tolist()))
    for ptr, stride in zip(data_ptrs.tolist(), strides.tolist()):
        for tgt, src in pairs:
            ctypes.memmove(ptr + tgt * stride, ptr + src * stride, stride)


def __getattr__(name):
    # SGLang imports more `*_cpu` helpers at import time (speculative decoding, ...) than a plain CPU serve
    # calls: hand out a function that fails loudly if it is ever called, instead of failing every import.
    if name.endswith("_cpu"):
        def unavailable(*_args, **_kwargs):
            raise NotImplementedError(f"sgl_kernel CPU stand-in (cpu_shim/) does not implement {name}")

        unavailable.__name__ = name
        return unavailable
    raise AttributeError(f"sgl_kernel CPU stand-in (cpu_shim/) does not provide {name!r}")


__version__ = "0.0.0+cpu-shim"
