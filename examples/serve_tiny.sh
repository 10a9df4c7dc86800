#!/usr/bin/env bash
# Set up the environment, write a tiny MiniMax-M3 checkpoint (released VL layout), serve it with
# `python -m sglang.launch_server` (CPU if there is no GPU) and send one real chat request.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
CKPT=${CKPT:-$HOME/.cache/sglang-m3/tiny-m3}
PORT=${PORT:-30000}
[ -f "$CKPT/model.safetensors" ] || python -m sglang_m3.tiny "$CKPT" --dtype float32
flags=(--model-path "$CKPT" --port "$PORT" --reasoning-parser minimax-m3 --tool-call-parser minimax-m3)
if [ "$SGLANG_M3_DEVICE" = cpu ]; then
  # --sleep-on-idle: an idle CPU scheduler would otherwise busy-poll a whole core.
  flags+=(--device cpu --dtype float32 --max-total-tokens 8192 --grammar-backend llguidance --sleep-on-idle)
fi
if curl -s --max-time 2 -o /dev/null "http://127.0.0.1:$PORT/health" 2>/dev/null; then
  echo "[sglang-m3] something already answers on port $PORT: stop it or pick another port (PORT=30001 $0)"; exit 1
fi
LOG=/tmp/sglang-m3-serve-$(id -un)-$PORT.log
python -m sglang.launch_server "${flags[@]}" > "$LOG" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null' EXIT
for _ in $(seq 300); do
  curl -sf "http://127.0.0.1:$PORT/health_generate" >/dev/null 2>&1 && break
  kill -0 $server 2>/dev/null || { tail -40 "$LOG"; exit 1; }
  sleep 2
done
echo "[sglang-m3] server up (log: $LOG); one chat request:"
curl -s "http://127.0.0.1:$PORT/v1/chat/completions" -H 'Content-Type: application/json' -d '{
  "model": "default", "max_tokens": 32, "temperature": 0,
  "messages": [{"role": "user", "content": "Hello! Who are you?"}],
  "chat_template_kwargs": {"thinking_mode": "disabled"}}' | python -m json.tool
grep -m1 "sglang-m3 MSA backend" "$LOG" >/dev/null \
  || { echo "[sglang-m3] the server did not log the sglang-m3 MSA backend: plugin not loaded? see $LOG"; exit 1; }
echo "[sglang-m3] served by the sglang-m3 plugin; the server stops now. To keep one up (stop it with Ctrl-C):"
echo "  source $PWD/scripts/env.sh && python -m sglang.launch_server ${flags[*]}"
