"""sglang-m3: MiniMax-M3 for SGLang 0.5.17 — model, MSA attention backend and index-key KV pool (see README).

SGLang loads this package as a plugin by itself (entry point `sglang.srt.plugins`); call `enable()` only where it
does not, e.g. before `sgl.Runtime(...)` / `sgl.Engine(...)` in your own process.
"""


def enable() -> None:
    from sglang_m3.plugin import enable as _enable

    _enable()
