#!/usr/bin/env bash
# Screenshot of the status page in a real browser: starts `kfrtrl serve` on loopback with a
# temporary data directory, streams text to three streams (so that the page has loss curves and
# busy streams to show), drives Debian's headless Chromium to `/`, types into the text box, waits
# for the predictions, and saves docs/status.png.
#   scripts/screenshot.sh [OUT.png]      (needs: chromium, node >= 20, curl; KFRTRL_BIN to pick a binary)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-docs/status.png}

bin=${KFRTRL_BIN:-}
if [[ -z $bin ]]; then
  for candidate in target/release/kfrtrl target/debug/kfrtrl; do
    [[ -x $candidate ]] && { bin=$candidate; break; }
  done
fi
if [[ -z $bin ]]; then
  cargo build --release --bin kfrtrl
  bin=target/release/kfrtrl
fi

work=$(mktemp -d)
server_pid=
traffic_pid=
cleanup() {
  [[ -n $traffic_pid ]] && kill "$traffic_pid" 2>/dev/null || true
  [[ -n $server_pid ]] && kill -TERM "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

"$bin" serve --listen 127.0.0.1:0 --data-dir "$work/data" --log-format json 2>"$work/server.log" &
server_pid=$!
for _ in $(seq 300); do
  grep -q '"message":"ready"' "$work/server.log" 2>/dev/null && break
  sleep 0.1
done
addr=$(sed -n 's/.*"message":"listening".*"addr":"\([^"]*\)".*/\1/p; s/.*"addr":"\([^"]*\)".*"message":"listening".*/\1/p' \
  "$work/server.log" | head -1)
[[ -n $addr ]] || { cat "$work/server.log"; echo "the server did not start" >&2; exit 1; }
echo "server on $addr ($bin)"

# Live traffic: the README, in 160-byte chunks, round robin over three streams.
python3 - "$work/chunks" <<'PY'
import json, sys
text = open("README.md", encoding="utf-8").read()
with open(sys.argv[1], "w") as out:
    for i in range(0, len(text), 160):
        out.write(json.dumps({"text": text[i:i + 160], "top_k": 0}) + "\n")
PY
(
  end=$((SECONDS + 60))
  while ((SECONDS < end)); do
    i=0
    while IFS= read -r chunk && ((SECONDS < end)); do
      stream=$(printf 'reader-%d' $((i % 3 + 1)))
      [[ $((i % 3)) -eq 2 ]] && sleep 0.1 # one reader is slower than the others
      curl -s -o /dev/null "http://$addr/v1/models/default/streams/$stream/tokens" -d "$chunk"
      i=$((i + 1))
    done <"$work/chunks"
  done
) &
traffic_pid=$!

node_flags=()
node -e 'process.exit(typeof WebSocket === "function" ? 0 : 1)' || node_flags=(--experimental-websocket)
mkdir -p "$(dirname "$out")"
node "${node_flags[@]}" scripts/screenshot.mjs "http://$addr/" "$out"
