# shellcheck shell=bash
# The part of the peers harness that run.sh and callgrind.sh share: settings, ports, the processes
# it starts (and stops, by PID), the run's keys and tokens, every server's configuration, and the
# correctness gate. Sourced by them after they set their own defaults; not meant to be run.

# shellcheck disable=SC2034 # the settings below are used by the scripts that source this one
PEERS=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$PEERS/../.." && pwd)

die() { echo "peers: $*" >&2; exit 1; }

# ---------------------------------------------------------------------------------------------
# Settings (environment). The entry script has set TARGETS and RUN_DIR defaults already.

LOAD=${LOAD:-h1}
PIN=${PIN:-split}
BUILD=${BUILD:-1}
PORT_BASE=${PORT_BASE:-28080}
export JWT_SECRET=${JWT_SECRET:-perf-harness-shared-secret-0123456789abcdef}
G_BIN=${G_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/tokengate}
G0_BIN=${G0_BIN:-}
read -r -a TARGET_LIST <<< "$TARGETS"

case $LOAD in h1|h2) ;; *) die "LOAD must be h1 or h2, not '$LOAD'" ;; esac
case $PIN in split|none) ;; *) die "PIN must be split or none, not '$PIN'" ;; esac
case $RUN_DIR in /*) ;; *) die "RUN_DIR must be an absolute path, not '$RUN_DIR'" ;; esac
if ! [[ $PORT_BASE =~ ^[0-9]+$ ]] || [ "$PORT_BASE" -lt 1024 ] || [ "$PORT_BASE" -gt 65000 ]; then
  die "PORT_BASE must be a number between 1024 and 65000"
fi
[ ${#TARGET_LIST[@]} -gt 0 ] || die "TARGETS is empty"

# The server under test gets CPU1 to itself; the load generator and the shared upstream share CPU0.
if [ "$PIN" = split ]; then
  [ "$(nproc)" -ge 2 ] || die "PIN=split needs 2 CPUs (this machine has $(nproc)); use PIN=none"
  SUT_CPU=1 LOAD_CPU=0
else
  SUT_CPU="" LOAD_CPU=""
fi

declare -A PORT=(
  [upstream]=$PORT_BASE [direct]=$((PORT_BASE + 1))
  [A]=$((PORT_BASE + 10)) [B]=$((PORT_BASE + 11)) [C]=$((PORT_BASE + 12))
  [A_rs]=$((PORT_BASE + 13)) [A_es]=$((PORT_BASE + 14))
  [G]=$((PORT_BASE + 20)) [G0]=$((PORT_BASE + 21))
)
declare -A ADMIN_PORT=([G]=$((PORT_BASE + 30)) [G0]=$((PORT_BASE + 31)))

# What each target is, for the tables (the versions go in the table's header).
declare -A WHAT=(
  [direct]="nginx answering itself, no proxy (plain HTTP)"
  [A]="HAProxy TLS + HS256 JWT check"
  [B]="HAProxy TLS, no check"
  [C]="nginx TLS proxy, no check"
  [A_rs]="HAProxy TLS + RS256 JWT check"
  [A_es]="HAProxy TLS + ES256 JWT check"
  [G]="tokengate, token checked"
  [G0]="tokengate baseline build (G0_BIN), token checked"
)
# The algorithm of the tokens a target is sent; targets without an entry check no token.
declare -A JWT_ALG=([A]=HS256 [A_rs]=RS256 [A_es]=ES256 [G]=HS256 [G0]=HS256)

for t in "${TARGET_LIST[@]}"; do
  [ -n "${WHAT[$t]:-}" ] || die "unknown target '$t' (known: direct A B C A_rs A_es G G0)"
done
wants() { [[ " ${TARGET_LIST[*]} " == *" $1 "* ]]; }
if wants G0 && [ ! -x "$G0_BIN" ]; then die "target G0 needs G0_BIN, a tokengate binary to compare with"; fi

# ---------------------------------------------------------------------------------------------
# Processes. Every process started here is recorded by PID and stopped on exit, with its children
# (nginx workers), whatever way the script ends. Never by name: other runs may share the machine.

declare -A PID=()
STARTED=()   # servers, for the whole run
TRANSIENT=() # the load generator and perf while they run

# PID and the PIDs of all its descendants.
tree_pids() {
  local child
  echo "$1"
  for child in $(ps -o pid= --ppid "$1" 2>/dev/null); do tree_pids "$child"; done
}

# stop_pids PID...: TERM each process and its descendants, KILL what is left after 5 s.
stop_pids() {
  local all=() p alive=()
  for p in "$@"; do
    if kill -0 "$p" 2>/dev/null; then mapfile -t -O "${#all[@]}" all < <(tree_pids "$p"); fi
  done
  [ ${#all[@]} -gt 0 ] || return 0
  kill -TERM "${all[@]}" 2>/dev/null || true
  for _ in $(seq 50); do # valgrind'd servers write their last profile on the way out
    alive=()
    for p in "${all[@]}"; do if kill -0 "$p" 2>/dev/null; then alive+=("$p"); fi; done
    [ ${#alive[@]} -gt 0 ] || break
    sleep 0.1
  done
  if [ ${#alive[@]} -gt 0 ]; then kill -KILL "${alive[@]}" 2>/dev/null || true; fi
  for p in "$@"; do wait "$p" 2>/dev/null || true; done
}

# stop_server NAME: stop one server before the run ends, and forget its PID.
stop_server() {
  local pid=${PID[$1]} p kept=()
  stop_pids "$pid"
  for p in "${STARTED[@]}"; do if [ "$p" != "$pid" ]; then kept+=("$p"); fi; done
  STARTED=("${kept[@]}")
  unset "PID[$1]"
}

stop_all() { stop_pids "${TRANSIENT[@]}" "${STARTED[@]}"; }
trap stop_all EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# spawn NAME CPU COMMAND...: start COMMAND in the background (pinned to CPU unless empty), output in
# $RUN_DIR/NAME.log; PID[NAME] is the server's own PID (taskset and env exec, they do not fork).
spawn() {
  local name=$1 cpu=$2 pin=()
  shift 2
  if [ -n "$cpu" ]; then pin=(taskset -c "$cpu"); fi
  "${pin[@]}" "$@" >"$RUN_DIR/$name.log" 2>&1 &
  PID[$name]=$!
  STARTED+=("$!")
}

# ---------------------------------------------------------------------------------------------
# Preflight.

need_tools() {
  local tool missing=()
  for tool in "$@"; do if ! type -P "$tool" >/dev/null; then missing+=("$tool"); fi; done
  [ ${#missing[@]} -eq 0 ] || die "missing ${missing[*]}; install with:
    apt-get install -y haproxy nginx wrk nghttp2-client valgrind linux-perf python3 openssl curl"
}

check_ports_free() {
  local name
  for name in upstream direct "${TARGET_LIST[@]}"; do
    if ss -Hltn "sport = :${PORT[$name]}" | grep -q .; then
      die "port ${PORT[$name]} ($name) is in use, perhaps by another run; set PORT_BASE to move the harness's ports"
    fi
  done
  for name in G G0; do
    if wants $name && ss -Hltn "sport = :${ADMIN_PORT[$name]}" | grep -q .; then
      die "port ${ADMIN_PORT[$name]} ($name admin) is in use; set PORT_BASE"
    fi
  done
}

# A release build of the gateway when G is measured (BUILD=0: use the binary as it is).
build_gateway() {
  wants G || return 0
  if [ "$BUILD" = 1 ]; then
    (cd "$ROOT" && cargo build --release --bin tokengate) || die "cargo build --release failed"
  fi
  [ -x "$G_BIN" ] || die "no tokengate binary at $G_BIN (BUILD=1 builds it, or set G_BIN)"
}

# RUN_DIR is wiped each run, so refuse a directory this harness did not make.
prepare_run_dir() {
  if [ -d "$RUN_DIR" ] && [ -n "$(ls -A "$RUN_DIR")" ] && [ ! -e "$RUN_DIR/.peers-run-dir" ]; then
    die "RUN_DIR $RUN_DIR is not empty and was not made by this harness; refusing to wipe it"
  fi
  rm -rf "$RUN_DIR"
  mkdir -p "$RUN_DIR/tokens"
  touch "$RUN_DIR/.peers-run-dir"
}

# ---------------------------------------------------------------------------------------------
# TLS. The servers are set to TLS 1.3 and TLS_AES_128_GCM_SHA256 where they can be; tokengate has
# no cipher setting, so the clients (curl, wrk, h2load, openssl s_client, all OpenSSL) also offer
# only that suite, through this OpenSSL config. Every target then runs the same cipher.

TLS_SUITE=TLS_AES_128_GCM_SHA256
CLIENT=(env OPENSSL_CONF="$RUN_DIR/openssl-client.cnf")

write_client_tls_config() {
  cat >"$RUN_DIR/openssl-client.cnf" <<EOF
openssl_conf = init
[init]
ssl_conf = ssl
[ssl]
system_default = client
[client]
MinProtocol = TLSv1.3
Ciphersuites = $TLS_SUITE
EOF
}

# The run's certificate (ECDSA P-256, self-signed) and, for A_rs/A_es, their signing keys.
make_keys() {
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj /CN=localhost -addext subjectAltName=DNS:localhost,IP:127.0.0.1 \
    -keyout "$RUN_DIR/tls.key" -out "$RUN_DIR/tls.crt" 2>/dev/null
  cat "$RUN_DIR/tls.crt" "$RUN_DIR/tls.key" >"$RUN_DIR/tls.pem"  # HAProxy wants both in one file
  if wants A_rs; then
    openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$RUN_DIR/jwt_rs256.key" 2>/dev/null
    openssl pkey -in "$RUN_DIR/jwt_rs256.key" -pubout -out "$RUN_DIR/jwt_rs256.pub"
  fi
  if wants A_es; then
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$RUN_DIR/jwt_es256.key" 2>/dev/null
    openssl pkey -in "$RUN_DIR/jwt_es256.key" -pubout -out "$RUN_DIR/jwt_es256.pub"
  fi
}

# $RUN_DIR/tokens/ALG.KIND for every algorithm in use; KIND: valid expired tampered none.
make_tokens() {
  local t alg kind key
  declare -A done_alg=([HS256]=1)
  for kind in valid expired tampered none; do
    python3 "$PEERS/jwt.py" HS256 "$kind" >"$RUN_DIR/tokens/HS256.$kind"
  done
  for t in "${TARGET_LIST[@]}"; do
    alg=${JWT_ALG[$t]:-}
    if [ -z "$alg" ] || [ -n "${done_alg[$alg]:-}" ]; then continue; fi
    done_alg[$alg]=1
    key="$RUN_DIR/jwt_${alg,,}.key"
    for kind in valid expired tampered none; do
      python3 "$PEERS/jwt.py" "$alg" "$kind" "$key" >"$RUN_DIR/tokens/$alg.$kind"
    done
  done
}

# The valid token a target is loaded with (targets that check nothing get the HS256 one too, so
# every request carries the same header bytes).
token_for() { cat "$RUN_DIR/tokens/${JWT_ALG[$1]:-HS256}.valid"; }

url_for() {
  case $1 in
    upstream | direct) echo "http://127.0.0.1:${PORT[$1]}/" ;;
    *) echo "https://127.0.0.1:${PORT[$1]}/" ;;
  esac
}

# ---------------------------------------------------------------------------------------------
# Server configurations, written to $RUN_DIR.

# nginx answering `ok` itself: the shared upstream, and target `direct` (over h2c when LOAD=h2).
nginx_ok_conf() { # NAME PORT LISTEN_FLAGS
  cat <<EOF
worker_processes 1;
pid $RUN_DIR/$1.pid;
error_log $RUN_DIR/$1.error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout 120s;
$(nginx_temp_paths "$1")
  server {
    listen 127.0.0.1:$2 backlog=4096$3;
    location / { return 200 "ok"; }
  }
}
EOF
}

nginx_temp_paths() { # NAME: keep nginx's scratch files inside RUN_DIR
  local d="$RUN_DIR/$1.tmp" kind
  for kind in client_body proxy fastcgi uwsgi scgi; do echo "  ${kind}_temp_path $d/$kind;"; done
}

# Target C: nginx terminating TLS and proxying to the upstream over a keep-alive pool.
nginx_proxy_conf() {
  local h2=""
  if [ "$LOAD" = h2 ]; then h2=" http2"; fi
  cat <<EOF
worker_processes 1;
pid $RUN_DIR/C.pid;
error_log $RUN_DIR/C.error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout 120s;
$(nginx_temp_paths C)
  upstream ok { server 127.0.0.1:${PORT[upstream]}; keepalive 128; keepalive_requests 1000000; }
  server {
    listen 127.0.0.1:${PORT[C]} ssl$h2 backlog=4096;
    ssl_certificate $RUN_DIR/tls.crt;
    ssl_certificate_key $RUN_DIR/tls.key;
    ssl_protocols TLSv1.3;
    ssl_conf_command Ciphersuites $TLS_SUITE;
    ssl_session_tickets off;
    location / {
      proxy_pass http://ok;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
EOF
}

# Targets A, A_rs, A_es (a JWT check with ALG and KEY) and B (ALG "none": no check).
haproxy_conf() { # TARGET ALG KEY
  local alpn=http/1.1
  if [ "$LOAD" = h2 ]; then alpn=h2,http/1.1; fi
  cat <<EOF
global
  nbthread 1
  maxconn 4096
  ssl-default-bind-ciphersuites $TLS_SUITE
  ssl-default-bind-options ssl-min-ver TLSv1.3 no-tls-tickets
defaults
  mode http
  option http-keep-alive
  http-reuse always
  timeout connect 5s
  timeout client 120s
  timeout server 120s
  timeout http-keep-alive 120s
frontend in
  bind 127.0.0.1:${PORT[$1]} ssl crt $RUN_DIR/tls.pem alpn $alpn
EOF
  if [ "$2" != none ]; then
    # HAProxy's documented JWT recipe: a bearer token, its alg pinned, its signature verified
    # (on every request: HAProxy keeps no cache), its exp in the future.
    cat <<EOF
  http-request set-var(txn.bearer) http_auth_bearer
  http-request deny unless { var(txn.bearer) -m found }
  http-request deny unless { var(txn.bearer),jwt_header_query('\$.alg') -m str $2 }
  http-request deny unless { var(txn.bearer),jwt_verify("$2","$3") -m int 1 }
  http-request set-var(txn.exp) var(txn.bearer),jwt_payload_query('\$.exp','int')
  http-request set-var(txn.now) date()
  http-request deny unless { var(txn.exp),sub(txn.now) -m int gt 0 }
EOF
  fi
  cat <<EOF
  default_backend upstream
backend upstream
  server ok 127.0.0.1:${PORT[upstream]}
EOF
}

# Targets G and G0: benches/peers/tokengate.toml.in with this run's ports and certificate.
tokengate_conf() { # TARGET
  python3 - "$PEERS/tokengate.toml.in" <<EOF
import string, sys
try:
    print(string.Template(open(sys.argv[1]).read()).substitute(
        run_dir="$RUN_DIR", port=${PORT[$1]}, admin_port=${ADMIN_PORT[$1]},
        upstream_port=${PORT[upstream]}), end="")
except (KeyError, ValueError) as e:
    sys.exit(f"{sys.argv[1]}: no value for placeholder {e}")
EOF
}

write_configs() {
  local t listen_direct=""
  if [ "$LOAD" = h2 ]; then listen_direct=" http2"; fi
  nginx_ok_conf upstream "${PORT[upstream]}" "" >"$RUN_DIR/upstream.nginx.conf"
  for t in "${TARGET_LIST[@]}"; do
    case $t in
      direct) nginx_ok_conf direct "${PORT[direct]}" "$listen_direct" >"$RUN_DIR/direct.nginx.conf" ;;
      A) haproxy_conf A HS256 "$JWT_SECRET" >"$RUN_DIR/A.haproxy.cfg" ;;
      A_rs) haproxy_conf A_rs RS256 "$RUN_DIR/jwt_rs256.pub" >"$RUN_DIR/A_rs.haproxy.cfg" ;;
      A_es) haproxy_conf A_es ES256 "$RUN_DIR/jwt_es256.pub" >"$RUN_DIR/A_es.haproxy.cfg" ;;
      B) haproxy_conf B none "" >"$RUN_DIR/B.haproxy.cfg" ;;
      C) nginx_proxy_conf >"$RUN_DIR/C.nginx.conf" ;;
      G | G0) tokengate_conf "$t" >"$RUN_DIR/$t.tokengate.toml" || die "cannot render tokengate.toml.in" ;;
    esac
  done
  mkdir -p "$RUN_DIR"/{upstream,direct,C}.tmp
  for t in "$RUN_DIR"/*.haproxy.cfg; do
    [ -e "$t" ] || continue
    haproxy -c -q -f "$t" || die "HAProxy rejects $t"
  done
  for t in "$RUN_DIR"/*.nginx.conf; do
    nginx -t -q -e "$RUN_DIR/nginx-test.log" -c "$t" 2>/dev/null || die "nginx rejects $t: $(cat "$RUN_DIR/nginx-test.log")"
  done
  local bin
  for t in G G0; do
    wants $t || continue
    bin=$G_BIN; [ $t = G0 ] && bin=$G0_BIN
    "$bin" check --config "$RUN_DIR/$t.tokengate.toml" >"$RUN_DIR/$t.check.log" 2>&1 ||
      die "tokengate rejects $RUN_DIR/$t.tokengate.toml: $(cat "$RUN_DIR/$t.check.log")"
  done
}

# The command line that serves TARGET, in the array SERVER_CMD. NGINX_GLOBALS: more nginx
# main-context directives (callgrind.sh runs nginx without its master process).
server_cmd() { # TARGET [NGINX_GLOBALS]
  case $1 in
    upstream | direct | C) SERVER_CMD=(nginx -e "$RUN_DIR/$1.error.log" -c "$RUN_DIR/$1.nginx.conf" -g "daemon off; ${2:-}") ;;
    A | B | A_rs | A_es) SERVER_CMD=(haproxy -db -f "$RUN_DIR/$1.haproxy.cfg") ;;
    G) SERVER_CMD=("$G_BIN" --config "$RUN_DIR/G.tokengate.toml") ;;
    G0) SERVER_CMD=("$G0_BIN" --config "$RUN_DIR/G0.tokengate.toml") ;;
  esac
}

# ---------------------------------------------------------------------------------------------
# Readiness and the correctness gate.

# status TARGET TOKEN_OR_EMPTY -> HTTP status (000 when no answer); checks the protocol too.
http_status() {
  local t=$1 token=$2 args=(-sk -o /dev/null --max-time 30 -w '%{http_code} %{http_version}')
  if [ -n "$token" ]; then args+=(-H "Authorization: Bearer $token"); fi
  if [ "$LOAD" = h1 ]; then
    args+=(--http1.1) # as wrk: no h2 in ALPN (tokengate would pick it)
  elif [ "$t" = direct ]; then
    args+=(--http2-prior-knowledge)
  else
    args+=(--http2)
  fi
  "${CLIENT[@]}" curl "${args[@]}" "$(url_for "$t")" || true
}

wait_ready() { # TARGET SECONDS
  local t=$1 deadline=$((SECONDS + $2)) answer=""
  while [ $SECONDS -lt "$deadline" ]; do
    kill -0 "${PID[$t]}" 2>/dev/null || die "$t exited before answering; see $RUN_DIR/$t.log:
$(tail -5 "$RUN_DIR/$t.log")"
    answer=$(http_status "$t" "$(token_for "$t")")
    [ "${answer%% *}" = 200 ] && return 0
    sleep 0.2
  done
  die "$t did not answer 200 within $2 s (last: ${answer:-nothing}); see $RUN_DIR/$t.log"
}

# A target passes when the valid token gets 200 over the protocol measured, every bad token gets
# a 4xx (a fast refusal must never be measured as throughput), and TLS is 1.3 with the one suite.
gate() { # TARGET
  local t=$1 alg=${JWT_ALG[$1]:-} answer want_version=1.1 kind tls
  if [ "$LOAD" = h2 ]; then want_version=2; fi
  answer=$(http_status "$t" "$(token_for "$t")")
  [ "$answer" = "200 $want_version" ] || die "gate: $t answered '$answer' to a valid token (want '200 $want_version')"
  local report="valid=200"
  if [ -n "$alg" ]; then
    answer=$(http_status "$t" "")
    [[ $answer == 4* ]] || die "gate: $t answered '$answer' without a token; its JWT check is not enforced"
    report+=" missing=${answer%% *}"
    for kind in expired tampered none; do
      answer=$(http_status "$t" "$(cat "$RUN_DIR/tokens/$alg.$kind")")
      [[ $answer == 4* ]] || die "gate: $t answered '$answer' to a token that is $kind; its JWT check is not enforced"
      report+=" $kind=${answer%% *}"
    done
  fi
  if [ "$t" != direct ]; then
    tls=$("${CLIENT[@]}" openssl s_client -connect "127.0.0.1:${PORT[$t]}" -brief </dev/null 2>&1 |
      awk -F': ' '/^Protocol version/ {v=$2} /^Ciphersuite/ {c=$2} END {print v " " c}')
    [ "$tls" = "TLSv1.3 $TLS_SUITE" ] || die "gate: $t negotiated '$tls', want 'TLSv1.3 $TLS_SUITE'"
    report+=" tls=$TLS_SUITE"
  fi
  echo "# gate $t ($alg${alg:+ }HTTP/$want_version): $report"
}

# ---------------------------------------------------------------------------------------------
# What the tables say about the run.

git_commit() {
  local c
  c=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null) || { echo unknown; return; }
  if ! git -C "$ROOT" diff --quiet HEAD -- 2>/dev/null; then c+="+dirty"; fi
  echo "$c"
}

machine() {
  echo "$(nproc) × $(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo), Linux $(uname -r)"
}

versions() { # TOOL...: the load tools (and valgrind) this run used
  local v tool
  v="HAProxy $(haproxy -v | awk 'NR==1 {print $3}' | sed 's/-.*//'), nginx $(nginx -v 2>&1 | sed 's|.*nginx/||')"
  for tool in "$@"; do
    case $tool in
      wrk) v+=", wrk $(wrk -v 2>&1 | awk 'NR==1 {print $2}' | sed 's|.*/||;s|-.*||')" ;;
      h2load) v+=", h2load $(h2load --version | awk '{print $2}' | sed 's|.*/||')" ;;
      valgrind) v+=", valgrind $(valgrind --version | sed 's/valgrind-//')" ;;
    esac
  done
  echo "$v"
}

# TARGET<TAB>description, for report.py.
describe_targets() {
  local t
  for t in "${TARGET_LIST[@]}"; do printf '%s\t%s\n' "$t" "${WHAT[$t]}"; done
}
