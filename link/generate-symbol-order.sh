#!/usr/bin/env bash
# Regenerates link/symbol-order.txt: runs the release sidecars of `palisade bench` under
# callgrind (HTTP/1.1, HTTP/2 and opaque TCP, so every common path runs), then lists every
# function they ran, hottest first (link/symbol-order.py). Needs valgrind and python3; run it
# after changes to the request path and commit the result (build.rs explains the why).
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"
cargo build --release --bin palisade --bin palisade-proxy --bin palisade-bench
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cat > "$work/proxy.sh" <<SH
#!/bin/sh
exec valgrind --tool=callgrind --dump-instr=yes --demangle=no \
  --callgrind-out-file="$work/callgrind.out.%p" "$target/release/palisade-proxy" "\$@"
SH
chmod +x "$work/proxy.sh"
for protocol in http1 http2 tcp; do
  "$target/release/palisade" bench --protocol "$protocol" --rate 50 --duration 8s \
    --connections 16 --no-max --proxy-bin "$work/proxy.sh" > /dev/null
done
# callgrind writes its file as each proxy exits; wait for every one to be complete.
for _ in $(seq 1 100); do
  pgrep -f "valgrind.*$work" > /dev/null || break
  sleep 0.2
done
python3 link/symbol-order.py palisade-proxy "$work"/callgrind.out.* > link/symbol-order.txt
wc -l link/symbol-order.txt
