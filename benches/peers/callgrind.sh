#!/usr/bin/env bash
# Instructions per proxied request of each server under test, counted by callgrind: unlike the
# wall clock, the count does not drift with the VM's CPU speed or with other load on the machine,
# so it shows a 1 % change. See benches/peers/README.md.
#
# Each target runs alone under valgrind --tool=callgrind with instrumentation off while it starts;
# then, for N1 and then N2 requests (h2load, CONNS keep-alive connections opened per batch):
# zero the counters, instrument, load, stop instrumenting, dump. Ir/req = (Ir(N2) - Ir(N1)) / (N2 - N1),
# so start-up, handshakes and connection setup cancel. The upstream nginx runs natively.
#
#   bash benches/peers/callgrind.sh                 # TARGETS="A B G", HTTP/1.1, N1=1000 N2=3000
#   LOAD=h2 bash benches/peers/callgrind.sh         # HTTP/2, CONNS × STREAMS in flight
#   callgrind_annotate "$RUN_DIR"/cg.G.*.2 | head -40   # where G's instructions go (the N2 batch)
set -euo pipefail

TARGETS=${TARGETS:-"A B G"}
RUN_DIR=${RUN_DIR:-${TMPDIR:-/tmp}/tokengate-peers-cg}
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# Ir/req does not depend on the batch sizes (500/1500 and 2000/6000 agree within 0.3 %); these
# keep a batch near 10 s under valgrind on a quiet machine.
N1=${N1:-1000}
N2=${N2:-3000}
CONNS=${CONNS:-8}
STREAMS=${STREAMS:-10}
REF=${REF:-A}
READY_SECS=${READY_SECS:-180} # start-up under valgrind is slow

for knob in N1 N2 CONNS STREAMS READY_SECS; do
  [[ ${!knob} =~ ^[0-9]+$ ]] || die "$knob must be a whole number, not '${!knob}'"
done
[ "$N2" -gt "$N1" ] || die "N2 must be larger than N1"
if wants direct; then die "target direct proxies nothing; leave it out of TARGETS here"; fi
need_tools haproxy nginx h2load valgrind callgrind_control python3 openssl curl taskset ss

# h2load REQUESTS: one batch against TARGET; dies unless every request got a 2xx.
batch() { # TARGET REQUESTS
  local t=$1 n=$2 out="$RUN_DIR/cg.$1.batch-$2.out" load
  load=(h2load -n "$n" -c "$CONNS" -t 1 --tls13-ciphers="$TLS_SUITE" -H "authorization: Bearer $(token_for "$t")")
  if [ "$LOAD" = h1 ]; then load+=(--h1); else load+=(-m "$STREAMS"); fi
  if [ -n "$LOAD_CPU" ]; then load=(taskset -c "$LOAD_CPU" "${load[@]}"); fi
  # timeout: a hang guard only; a batch takes seconds.
  "${CLIENT[@]}" timeout 300 "${load[@]}" "$(url_for "$t")" >"$out" 2>&1 || die "h2load failed on $t; see $out"
  grep -q "^status codes: $n 2xx, 0 3xx, 0 4xx, 0 5xx\$" "$out" ||
    die "$t: not every request of the batch of $n got a 2xx; see $out"
}

control() { # TARGET ARGS...: callgrind_control on TARGET's valgrind
  local t=$1
  shift
  callgrind_control "$@" "${PID[$t]}" >"$RUN_DIR/cg.$t.control.out" 2>&1 ||
    die "callgrind_control $* failed on $t: $(cat "$RUN_DIR/cg.$t.control.out")"
}

# The total Ir of TARGET's newest callgrind dump, once `callgrind_control -d` has written it.
dump_ir() { # TARGET
  local t=$1 pid=${PID[$1]} before after file
  before=$(find "$RUN_DIR" -maxdepth 1 -name "cg.$t.$pid.*" -not -name '*.out' | wc -l)
  control "$t" -d
  for _ in $(seq 100); do
    after=$(find "$RUN_DIR" -maxdepth 1 -name "cg.$t.$pid.*" -not -name '*.out' | wc -l)
    [ "$after" -gt "$before" ] && break
    sleep 0.1
  done
  file="$RUN_DIR/cg.$t.$pid.$after"
  [ -s "$file" ] || die "$t: no callgrind dump at $file"
  awk '/^(totals|summary):/ {ir = $2} END {print ir}' "$file"
}

check_ports_free
build_gateway
prepare_run_dir
write_client_tls_config
make_keys
make_tokens
write_configs

server_cmd upstream
spawn upstream "$LOAD_CPU" "${SERVER_CMD[@]}"
wait_ready upstream 15

{
  n_desc="N1=$N1 N2=$N2 CONNS=$CONNS"
  if [ "$LOAD" = h2 ]; then n_desc+=" STREAMS=$STREAMS"; fi
  printf 'command\t%s\n' "LOAD=$LOAD $n_desc TARGETS=\"$TARGETS\" bash benches/peers/callgrind.sh"
  printf 'machine\t%s\n' "$(machine)"
  printf 'versions\t%s\n' "$(versions h2load valgrind)"
  printf 'date\t%s\n' "$(date -u '+%Y-%m-%d %H:%M UTC')"
  printf 'commit\t%s\n' "$(git_commit)"
  printf 'load\t%s\n' "$LOAD"
  printf 'ref\t%s\n' "$REF"
  printf 'n1\t%s\n' "$N1"
  printf 'n2\t%s\n' "$N2"
} >"$RUN_DIR/meta.tsv"
describe_targets >"$RUN_DIR/targets.tsv"
printf 'target\tn1\tn2\tir_n1\tir_n2\tir_per_req\n' >"$RUN_DIR/callgrind.tsv"

for t in "${TARGET_LIST[@]}"; do
  server_cmd "$t" "master_process off;" # nginx: one process, the one valgrind watches
  spawn "$t" "$SUT_CPU" valgrind --tool=callgrind --instr-atstart=no \
    --callgrind-out-file="$RUN_DIR/cg.$t.%p" "${SERVER_CMD[@]}"
  wait_ready "$t" "$READY_SECS"
  gate "$t"
  batch "$t" 200 # warm-up, not counted: caches, the upstream pool
  irs=()
  for n in "$N1" "$N2"; do
    control "$t" -z
    control "$t" -i on
    batch "$t" "$n"
    control "$t" -i off
    irs+=("$(dump_ir "$t")")
  done
  stop_server "$t"
  per_req=$(( (irs[1] - irs[0]) / (N2 - N1) ))
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$t" "$N1" "$N2" "${irs[0]}" "${irs[1]}" "$per_req" >>"$RUN_DIR/callgrind.tsv"
  echo "# $t: $per_req instructions/request (Ir ${irs[0]} after $N1, ${irs[1]} after $N2)"
done

echo
python3 "$PEERS/report.py" callgrind "$RUN_DIR"
echo
echo "Raw counts: $RUN_DIR/callgrind.tsv; profiles: $RUN_DIR/cg.<target>.<pid>.<n> (callgrind_annotate)"
