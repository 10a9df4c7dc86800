# Source me: creates (once) or reuses the Python environment with SGLang 0.5.17 + this package, and sets the
# variables SGLang needs on a CPU-only machine. The environment lives outside the checkout so clones share it;
# the checkout that sourced it last is the installed one (a process started inside a checkout imports that
# checkout's files first anyway: the current directory leads sys.path).
#   SGLANG_M3_VENV   where the venv lives (default ~/.cache/sglang-m3/venv)
# The caller's errexit setting is restored at the end (set -e holds only while this file sets up).
case $- in *e*) _m3_errexit=1 ;; *) _m3_errexit= ;; esac
set -e
_repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SGLANG_M3_VENV=${SGLANG_M3_VENV:-$HOME/.cache/sglang-m3/venv}
if ! "$SGLANG_M3_VENV/bin/python" -c "import sglang, pytest, wheel; assert sglang.__version__ == '0.5.17'" 2>/dev/null; then
  echo "[sglang-m3] creating $SGLANG_M3_VENV (sglang==0.5.17, ~10 min, ~9 GB) ..."
  python3 -m venv "$SGLANG_M3_VENV"
  "$SGLANG_M3_VENV/bin/pip" install -q sglang==0.5.17 pytest wheel "setuptools>=70,<82" 2>&1 | grep -v "^WARNING: Location" || true
  "$SGLANG_M3_VENV/bin/python" -c "import sglang; assert sglang.__version__ == '0.5.17'"
fi
# (Re)register this checkout as the installed sglang-m3 (entry point sglang.srt.plugins -> sglang_m3).
# (Checked from / : in the checkout, the current directory would shadow whatever is installed.)
if [ "$(cd / && "$SGLANG_M3_VENV/bin/python" -c 'import sglang_m3, os; print(os.path.dirname(os.path.dirname(sglang_m3.__file__)))' 2>/dev/null)" != "$_repo" ]; then
  "$SGLANG_M3_VENV/bin/pip" install -q --no-deps --no-build-isolation -e "$_repo" 2>&1 | grep -v "^WARNING: Location" || true
fi
export PATH="$SGLANG_M3_VENV/bin:$PATH" HF_HUB_OFFLINE=1
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi >/dev/null 2>&1; then
  # CPU only: SGLang's CPU engine, plus a torch stand-in for the CUDA-only sgl_kernel wheel (see cpu_shim/).
  export SGLANG_USE_CPU_ENGINE=1 PYTHONPATH="$_repo/cpu_shim${PYTHONPATH:+:$PYTHONPATH}" SGLANG_M3_DEVICE=cpu
else
  export SGLANG_M3_DEVICE=cuda
fi
[ -n "$_m3_errexit" ] || set +e
unset _m3_errexit
