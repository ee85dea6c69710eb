#!/usr/bin/env bash
# Instructions per refresh-token rotation on the gateway's worker thread, counted by callgrind
# (deterministic, unlike this VM's clock: a 1 % change shows). Runs the load bench's `refresh`
# scenario twice under valgrind, for D1 and D2 seconds, and divides the difference in the `gw`
# thread's instructions by the difference in rotations, so start-up and logins cancel.
#
#   bash benches/refresh-callgrind.sh                  # EdDSA (the shipped config)
#   SIGNING=HS256 bash benches/refresh-callgrind.sh
#   BIN=/path/to/an/older/load-bench bash benches/refresh-callgrind.sh   # compare two builds
#
# Needs valgrind (apt-get install -y valgrind). About a minute.
set -euo pipefail
cd "$(dirname "$0")/.."

D1=${D1:-4}
D2=${D2:-10}
SIGNING=${SIGNING:-EdDSA}
for knob in D1 D2; do
  [[ ${!knob} =~ ^[0-9]+$ ]] || { echo "$knob must be a whole number of seconds" >&2; exit 1; }
done
[ "$D2" -gt "$D1" ] || { echo "D2 must be larger than D1" >&2; exit 1; }
command -v valgrind >/dev/null || { echo "valgrind is missing: apt-get install -y valgrind" >&2; exit 1; }

if [ -z "${BIN:-}" ]; then
  BIN=$(cargo bench --bench load --no-run 2>&1 | sed -n 's/.*Executable benches\/load.rs (\(.*\))/\1/p' | tail -n 1)
  [ -x "$BIN" ] || { echo "could not build or find the load bench binary" >&2; exit 1; }
fi

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

# One run of D seconds: prints "<rotations> <instructions of the gw thread>".
run() {
  local d=$1 dir=$out/$1 n best=0 ir f
  mkdir -p "$dir"
  valgrind --tool=callgrind --separate-threads=yes --callgrind-out-file="$dir/cg.%p" \
    "$BIN" --bench --scenario refresh --signing "$SIGNING" --gw-threads 1 --connections 4 \
    --duration "$d" >"$dir/out.txt" 2>"$dir/err.txt" || { cat "$dir/err.txt" >&2; exit 1; }
  n=$(grep -o 'refreshes [0-9]*' "$dir/out.txt" | awk '{print $2}')
  [ -n "$n" ] || { echo "no refresh count in the bench's output ($dir/out.txt)" >&2; exit 1; }
  # The gateway's worker: of the threads that ran the token grant, the one that did the most
  # work (with --gw-threads 1 there is one).
  for f in "$dir"/cg.*-*; do
    if grep -q token_grant "$f"; then
      ir=$(awk '/^totals:/ {print $2}' "$f")
      [ "$ir" -gt "$best" ] && best=$ir
    fi
  done
  [ "$best" -gt 0 ] || { echo "no thread ran the token grant" >&2; exit 1; }
  echo "$n $best"
}

read -r n1 i1 < <(run "$D1")
read -r n2 i2 < <(run "$D2")
[ "$n2" -gt "$n1" ] || { echo "the longer run made no more rotations ($n1, $n2)" >&2; exit 1; }
echo "rotations $n1 / $n2; gw thread instructions $i1 / $i2"
echo "instructions per rotation ($SIGNING): $(((i2 - i1) / (n2 - n1)))"
