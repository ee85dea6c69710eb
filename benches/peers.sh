#!/usr/bin/env bash
# Side-by-side numbers for tokengate (target G) against HAProxy and nginx, measured by the shared
# harness in ../shared/bench/peers (its README has the contract, the columns and a baseline).
#
#   bash benches/peers.sh                  # wall clock (run.sh): TARGETS="direct A B C G", ROUNDS=2
#   ROUNDS=4 TARGETS="A B G" bash benches/peers.sh
#   bash benches/peers.sh callgrind        # instructions/request (callgrind.sh): TARGETS="A B G"
#   BUILD=0 bash benches/peers.sh          # skip `cargo build --release`
# Every other knob of run.sh / callgrind.sh (DUR, CONNS, WARM, PIN, N1, N2, ...) passes through the
# environment. Needs: apt-get install -y --no-install-recommends haproxy nginx wrk nghttp2-client
# valgrind linux-perf (plus python3, openssl, curl).
#
# How the gateway finds the harness's certificate: the harness wipes RUN_DIR and writes a fresh
# tls.crt/tls.key into it before it starts G, and TOML cannot expand variables. So this script fixes
# RUN_DIR (default ${TMPDIR:-/tmp}/peers-run, or .../peers-run-cg for callgrind) and writes a copy of
# benches/peers.toml to target/peers/<run dir name>.toml (outside RUN_DIR, which gets wiped) with the
# cert and key paths rewritten to that RUN_DIR. The JWT secret reaches the gateway as env:JWT_SECRET,
# exported here with the harness's default unless already set.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PEERS="$ROOT/../shared/bench/peers"
[ -d "$PEERS" ] || { echo "peers harness not found at $PEERS" >&2; exit 1; }

MODE=${1:-run}
case $MODE in
  run)       SCRIPT=run.sh;       export RUN_DIR=${RUN_DIR:-${TMPDIR:-/tmp}/peers-run}
             export TARGETS=${TARGETS:-"direct A B C G"} ;;
  callgrind) SCRIPT=callgrind.sh; export RUN_DIR=${RUN_DIR:-${TMPDIR:-/tmp}/peers-run-cg}
             export TARGETS=${TARGETS:-"A B G"} ;;
  *) echo "usage: $0 [run|callgrind]" >&2; exit 2 ;;
esac
case $RUN_DIR in /*) ;; *) echo "RUN_DIR must be an absolute path" >&2; exit 2 ;; esac
export JWT_SECRET=${JWT_SECRET:-perf-harness-shared-secret-0123456789abcdef}

if [ "${BUILD:-1}" = 1 ]; then cargo build --release; fi
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/tokengate"
[ -x "$BIN" ] || { echo "no gateway binary at $BIN (build with cargo build --release)" >&2; exit 1; }

mkdir -p "$ROOT/target/peers"
CONFIG="$ROOT/target/peers/$(basename "$RUN_DIR").toml"
sed "s#/tmp/peers-run/#$RUN_DIR/#g" benches/peers.toml > "$CONFIG"

# Fail here, with the gateway's own message, rather than as "target G not ready" later. The cert
# does not exist yet (the harness makes it), so check a copy that points at the repo's dev cert.
sed -e "s#$RUN_DIR/tls.crt#$ROOT/certs/localhost.pem#" -e "s#$RUN_DIR/tls.key#$ROOT/certs/localhost-key.pem#" \
  "$CONFIG" > "$CONFIG.check"
"$BIN" check --config "$CONFIG.check" >/dev/null

# run.sh word-splits G_CMD (no shell) and starts it pinned to the SUT CPU; its output goes to
# $RUN_DIR/G.out (run.sh) or $RUN_DIR/cg_G.out (callgrind.sh).
export G_CMD="$BIN --config $CONFIG"
export G_URL=${G_URL:-https://127.0.0.1:18449/}
echo "# repo HEAD $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet HEAD 2>/dev/null || echo '+dirty'); binary built $(date -r "$BIN" -Is); G_CMD=$G_CMD; RUN_DIR=$RUN_DIR"
echo "# machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
exec bash "$PEERS/$SCRIPT"
