#!/usr/bin/env bash
# tokengate side by side with HAProxy and nginx, on the wall clock: req/s, CPU µs and syscalls per
# request of the server under test, latency, and each target's CPU per request ÷ HAProxy-with-JWT's,
# as the median of per-round ratios. See benches/peers/README.md.
#
#   bash benches/peers/run.sh                       # h1: wrk, 64 connections, 5 rounds × 8 s
#   LOAD=h2 bash benches/peers/run.sh               # h2: h2load, 64 connections × 10 streams
#   TARGETS="A G" ROUNDS=3 DUR=5 bash benches/peers/run.sh
#   G0_BIN=/tmp/old/target/release/tokengate TARGETS="A G G0" bash benches/peers/run.sh
set -euo pipefail

TARGETS=${TARGETS:-"direct A B C G"}
RUN_DIR=${RUN_DIR:-${TMPDIR:-/tmp}/tokengate-peers}
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DUR=${DUR:-8}                 # seconds per measurement (at most 10)
WARM=${WARM:-2}               # seconds of unrecorded load per target before round 1
ROUNDS=${ROUNDS:-5}           # odd rounds run TARGETS in order, even rounds in reverse
CONNS=${CONNS:-64}            # client connections
STREAMS=${STREAMS:-10}        # h2: concurrent streams per connection
THREADS=${THREADS:-1}         # load generator threads
PERF=${PERF:-1}               # 1: count the SUT's syscalls with perf tracepoints
RETRY=${RETRY:-3}             # attempts per (round, target) while foreign CPU exceeds FOREIGN_MAX
FOREIGN_MAX=${FOREIGN_MAX:-10} # % of one core used by processes outside the harness
WAIT_QUIET=${WAIT_QUIET:-0}   # seconds to wait at the start for the machine to quieten
REF=${REF:-A}                 # the target whose CPU per request the others are divided by

for knob in DUR WARM ROUNDS CONNS STREAMS THREADS RETRY FOREIGN_MAX WAIT_QUIET; do
  [[ ${!knob} =~ ^[0-9]+$ ]] || die "$knob must be a whole number, not '${!knob}'"
done
if [ "$DUR" -lt 1 ] || [ "$ROUNDS" -lt 1 ] || [ "$RETRY" -lt 1 ]; then die "DUR, ROUNDS and RETRY must be at least 1"; fi
if [ "$DUR" -gt 10 ]; then DUR=10; fi
if [ "$LOAD" = h1 ]; then LOADGEN=wrk; else LOADGEN=h2load; fi
need_tools haproxy nginx "$LOADGEN" python3 openssl curl taskset ss
if [ "$PERF" = 1 ]; then need_tools perf; fi
HZ=$(getconf CLK_TCK)

# ---------------------------------------------------------------------------------------------
# Counters.

# On-CPU time (ns) of a process tree, all threads, user + kernel.
cpu_ns() {
  local total=0 p f run
  for p in $(tree_pids "$1"); do
    for f in /proc/"$p"/task/*/schedstat; do
      if read -r run _ 2>/dev/null <"$f"; then total=$((total + run)); fi
    done
  done
  echo "$total"
}

# User and kernel ticks of a process tree (all threads; /proc/<pid>/stat utime, stime): "user kernel".
# The comm field may hold spaces, so the fields are counted after its closing parenthesis.
user_kernel_ticks() {
  local u=0 k=0 p line rest f
  for p in $(tree_pids "$1"); do
    if read -r line 2>/dev/null <"/proc/$p/stat"; then
      rest=${line##*) }
      read -r -a f <<<"$rest"
      u=$((u + f[11])) k=$((k + f[12]))
    fi
  done
  echo "$u $k"
}

# Ticks from /proc/stat: all CPUs' busy time, their steal, and the load CPU's busy and total time.
cpu_ticks() {
  awk -v load="cpu${LOAD_CPU:-none}" '
    $1 == "cpu" { busy = $2 + $3 + $4 + $7 + $8; steal = $9 }
    $1 == load  { lb = $2 + $3 + $4 + $7 + $8; lt = lb + $5 + $6 + $9 }
    END { print busy, steal, lb + 0, lt + 0 }' /proc/stat
}

# CPU ticks of this shell's reaped children: the load generator, once waited for.
children_ticks() {
  local st
  read -r -a st </proc/$$/stat
  echo $((st[15] + st[16]))
}

calc() { awk "BEGIN { printf \"%.${2:-2}f\", $1 }"; }

# ---------------------------------------------------------------------------------------------
# One measurement: load TARGET for SECS seconds; append a row to results.tsv (not for warm-up).

COLUMNS_TSV="round attempt target secs reqs rps bad p50_us p99_us sut_cpu_us_per_req sut_util_pct"
COLUMNS_TSV+=" load_cpu_busy_pct foreign_pct steal_pct syscalls_per_req csw_per_req sut_kernel_pct"
LAST_FOREIGN=0
FAILED=0

measure() { # TARGET ROUND ATTEMPT SECS
  local t=$1 round=$2 attempt=$3 secs=$4
  local base="$RUN_DIR/load/$t.$round.$attempt" sut=${PID[$t]} token load=()
  token=$(token_for "$t")
  if [ "$LOAD" = h1 ]; then
    load=(wrk -t"$THREADS" -c"$CONNS" -d"${secs}s" --latency -H "Authorization: Bearer $token" "$(url_for "$t")")
  else
    load=(h2load -t"$THREADS" -c"$CONNS" -m"$STREAMS" -D "$secs" --tls13-ciphers="$TLS_SUITE"
      --log-file="$base.log" -H "authorization: Bearer $token" "$(url_for "$t")")
  fi
  if [ -n "$LOAD_CPU" ]; then load=(taskset -c "$LOAD_CPU" "${load[@]}"); fi

  local perf_pid=""
  if [ "$PERF" = 1 ]; then  # attached before the load starts, stopped after it ends
    perf stat -x, -e raw_syscalls:sys_enter,context-switches -p "$(tree_pids "$sut" | paste -sd,)" \
      -o "$base.perf" >/dev/null 2>&1 &
    perf_pid=$!
    TRANSIENT=("$perf_pid")
    sleep 0.3
  fi
  local s0 c0 u0 l0 t0 k0 s1 c1 u1 l1 t1 k1 status=0
  s0=$(cpu_ticks) c0=$(cpu_ns "$sut") u0=$(cpu_ns "${PID[upstream]}") l0=$(children_ticks)
  k0=$(user_kernel_ticks "$sut")
  t0=$EPOCHREALTIME
  "${CLIENT[@]}" "${load[@]}" >"$base.out" 2>&1 &
  local load_pid=$!
  TRANSIENT+=("$load_pid")
  wait "$load_pid" || status=$?
  l1=$(children_ticks) t1=$EPOCHREALTIME
  c1=$(cpu_ns "$sut") u1=$(cpu_ns "${PID[upstream]}") s1=$(cpu_ticks)
  k1=$(user_kernel_ticks "$sut")
  if [ -n "$perf_pid" ]; then
    kill -INT "$perf_pid" 2>/dev/null || true
    wait "$perf_pid" || true
  fi
  TRANSIENT=()  # reaped: their PIDs may belong to someone else from now on
  [ "$status" = 0 ] || die "$LOADGEN exited with $status on $t; see $base.out"
  if [ "$LOAD" = h2 ]; then  # h2load says what it negotiated; wrk does not (the gate checked it)
    local proto=h2
    if [ "$t" = direct ]; then proto=h2c; fi
    grep -q "^Application protocol: $proto\$" "$base.out" || die "$t: h2load did not use $proto; see $base.out"
    if [ "$t" != direct ]; then
      grep -q "^Cipher: $TLS_SUITE\$" "$base.out" || die "$t: h2load did not use $TLS_SUITE; see $base.out"
    fi
  fi

  local stats reqs rps bad p50 p99 latency_log=()
  if [ "$LOAD" = h2 ]; then latency_log=("$base.log"); fi
  stats=$(python3 "$PEERS/report.py" load "$LOADGEN" "$base.out" "${latency_log[@]}") || die "$t: unreadable load output"
  read -r reqs rps bad p50 p99 <<<"$stats"
  rm -f "$base.log"
  if [ "$bad" != 0 ]; then
    echo "peers: ERROR $t round $round: $bad requests failed (non-2xx or socket errors); see $base.out" >&2
    if [ "$round" = warm ]; then die "$t fails under load; not measuring it"; fi
    FAILED=1
  fi
  [ "$reqs" -gt 0 ] || die "$t: no request completed; see $base.out"
  [ "$round" = warm ] && return 0

  local wall busy0 steal0 lb0 lt0 busy1 steal1 lb1 lt1
  wall=$(calc "$t1 - $t0" 3)
  read -r busy0 steal0 lb0 lt0 <<<"$s0"
  read -r busy1 steal1 lb1 lt1 <<<"$s1"
  local sut_s up_s load_s cpu_per_req sut_util load_busy foreign steal
  sut_s=$(calc "($c1 - $c0) / 1e9" 4)
  up_s=$(calc "($u1 - $u0) / 1e9" 4)
  load_s=$(calc "($l1 - $l0) / $HZ" 4)
  cpu_per_req=$(calc "$sut_s * 1e6 / $reqs")
  sut_util=$(calc "100 * $sut_s / $wall" 0)
  load_busy=na
  if [ -n "$LOAD_CPU" ]; then load_busy=$(calc "100 * ($lb1 - $lb0) / ($lt1 - $lt0 + 1e-9)" 0); fi
  # Foreign: busy CPU time on the whole machine that is neither the SUT, the upstream nor the
  # load generator, as % of one core. For target direct the SUT is nginx and the upstream idles.
  foreign=$(calc "100 * (($busy1 - $busy0) / $HZ - $sut_s - $up_s - $load_s) / $wall" 0)
  if [ "$foreign" -lt 0 ]; then foreign=0; fi
  steal=$(calc "100 * ($steal1 - $steal0) / $HZ / $wall" 0)
  local syscalls=na csw=na
  if [ -s "$base.perf" ]; then
    syscalls=$(awk -F, -v n="$reqs" '$3 == "raw_syscalls:sys_enter" && $1 ~ /^[0-9]+$/ {printf "%.2f", $1 / n}' "$base.perf")
    csw=$(awk -F, -v n="$reqs" '$3 == "context-switches" && $1 ~ /^[0-9]+$/ {printf "%.3f", $1 / n}' "$base.perf")
  fi
  # The kernel's share of the SUT's CPU time (system calls, and the TCP work loopback does in the
  # sender's context: the receiving side of every segment the SUT sends).
  local ku0 kk0 ku1 kk1 kernel_pct=na
  read -r ku0 kk0 <<<"$k0"
  read -r ku1 kk1 <<<"$k1"
  if [ $((ku1 - ku0 + kk1 - kk0)) -gt 0 ]; then
    kernel_pct=$(calc "100 * ($kk1 - $kk0) / ($ku1 - $ku0 + $kk1 - $kk0)" 0)
  fi
  LAST_FOREIGN=$foreign
  local row=("$round" "$attempt" "$t" "$wall" "$reqs" "$rps" "$bad" "$p50" "$p99" "$cpu_per_req"
    "$sut_util" "$load_busy" "$foreign" "$steal" "${syscalls:-na}" "${csw:-na}" "$kernel_pct")
  (IFS=$'\t'; echo "${row[*]}") >>"$RUN_DIR/results.tsv"
  printf '%-6s round %-2s try %s  %9.0f req/s  %7s µs/req (kernel %3s%%)  %5s sysc/req  SUT %3s%%  load %3s%%  foreign %3s%%  steal %s%%\n' \
    "$t" "$round" "$attempt" "$rps" "$cpu_per_req" "$kernel_pct" "${syscalls:-na}" "$sut_util" "$load_busy" "$foreign" "$steal"
}

# ---------------------------------------------------------------------------------------------
# Set up, gate, measure.

check_ports_free
build_gateway
prepare_run_dir
mkdir -p "$RUN_DIR/load"
write_client_tls_config
make_keys
make_tokens
write_configs

server_cmd upstream
spawn upstream "$LOAD_CPU" "${SERVER_CMD[@]}"
for t in "${TARGET_LIST[@]}"; do
  server_cmd "$t"
  spawn "$t" "$SUT_CPU" "${SERVER_CMD[@]}"
done
for t in "${TARGET_LIST[@]}"; do wait_ready "$t" 15; done
for t in "${TARGET_LIST[@]}"; do gate "$t"; done

quiet_pct() { # foreign CPU over one second, % of one core (nothing of ours is busy yet)
  local b0 b1
  read -r b0 _ <<<"$(cpu_ticks)"
  sleep 1
  read -r b1 _ <<<"$(cpu_ticks)"
  echo $((100 * (b1 - b0) / HZ))
}
quiet=$(quiet_pct)
waited=0
while [ "$quiet" -gt "$FOREIGN_MAX" ] && [ "$waited" -lt "$WAIT_QUIET" ]; do
  sleep 4
  waited=$((waited + 5))
  quiet=$(quiet_pct)
done
echo "# foreign CPU before the first run: $quiet % of one core"

cmd="LOAD=$LOAD ROUNDS=$ROUNDS DUR=$DUR CONNS=$CONNS"
if [ "$LOAD" = h2 ]; then cmd+=" STREAMS=$STREAMS"; fi
if [ "$PIN" != split ]; then cmd+=" PIN=$PIN"; fi
cmd+=" TARGETS=\"$TARGETS\" bash benches/peers/run.sh"
{
  printf 'command\t%s\n' "$cmd"
  printf 'machine\t%s\n' "$(machine)"
  printf 'versions\t%s\n' "$(versions "$LOADGEN")"
  printf 'date\t%s\n' "$(date -u '+%Y-%m-%d %H:%M UTC')"
  printf 'commit\t%s\n' "$(git_commit)"
  printf 'load\t%s\n' "$LOAD"
  printf 'ref\t%s\n' "$REF"
  printf 'foreign_max\t%s\n' "$FOREIGN_MAX"
} >"$RUN_DIR/meta.tsv"
describe_targets >"$RUN_DIR/targets.tsv"
tr ' ' '\t' <<<"$COLUMNS_TSV" >"$RUN_DIR/results.tsv"
echo "# $cmd"
echo "# RUN_DIR=$RUN_DIR; SUT on CPU${SUT_CPU:-(any)}, $LOADGEN and upstream on CPU${LOAD_CPU:-(any)}"

for t in "${TARGET_LIST[@]}"; do measure "$t" warm 1 "$WARM"; done
for round in $(seq "$ROUNDS"); do
  order=("${TARGET_LIST[@]}")
  if [ $((round % 2)) = 0 ]; then
    order=()
    for ((i = ${#TARGET_LIST[@]} - 1; i >= 0; i--)); do order+=("${TARGET_LIST[$i]}"); done
  fi
  for t in "${order[@]}"; do
    for attempt in $(seq "$RETRY"); do
      measure "$t" "$round" "$attempt" "$DUR"
      [ "$LAST_FOREIGN" -gt "$FOREIGN_MAX" ] || break
      if [ "$attempt" -lt "$RETRY" ]; then sleep 2; fi
    done
  done
done

echo
python3 "$PEERS/report.py" rounds "$RUN_DIR"
echo
echo "Per-run rows: $RUN_DIR/results.tsv; summary: $RUN_DIR/summary.tsv; this table: $RUN_DIR/table.md"
if [ "$FAILED" = 1 ]; then die "some requests failed (see ERROR lines above): the figures are not valid"; fi
