#!/usr/bin/env bash
# Regenerates link/symbol-order.txt: runs the release sidecars of `palisade bench` under
# callgrind (HTTP/1.1, HTTP/2 and opaque TCP, so every common path runs), both as
# `palisade-proxy` and as `palisade proxy` (what `palisade up` starts), then lists every
# function they ran, hottest first (link/symbol-order.py): `palisade-proxy`'s, then those only
# `palisade` has (its own copies of generic code, the CLI's startup). Needs valgrind and
# python3; run it after changes to the request path and commit the result (build.rs explains
# the why).
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"
cargo build --release --bin palisade --bin palisade-proxy --bin palisade-bench
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# One wrapper per binary; `palisade up --proxy-bin` passes the sidecar's flags to it.
cat > "$work/proxy.sh" <<SH
#!/bin/sh
exec valgrind --tool=callgrind --dump-instr=yes --demangle=no \
  --callgrind-out-file="$work/proxy/callgrind.out.%p" "$target/release/palisade-proxy" "\$@"
SH
cat > "$work/cli.sh" <<SH
#!/bin/sh
exec valgrind --tool=callgrind --dump-instr=yes --demangle=no \
  --callgrind-out-file="$work/cli/callgrind.out.%p" "$target/release/palisade" proxy "\$@"
SH
chmod +x "$work/proxy.sh" "$work/cli.sh"
mkdir -p "$work/proxy" "$work/cli"
for wrapper in proxy cli; do
  for protocol in http1 http2 tcp; do
    "$target/release/palisade" bench --protocol "$protocol" --rate 50 --duration 8s \
      --connections 16 --no-max --proxy-bin "$work/$wrapper.sh" > /dev/null
  done
done
# callgrind writes its file as each proxy exits; wait for every one to be complete.
for _ in $(seq 1 100); do
  pgrep -f "valgrind.*$work" > /dev/null || break
  sleep 0.2
done
{
  python3 link/symbol-order.py palisade-proxy "$work"/proxy/callgrind.out.*
  python3 link/symbol-order.py palisade "$work"/cli/callgrind.out.*
} | awk '!seen[$0]++' > link/symbol-order.txt
wc -l link/symbol-order.txt
