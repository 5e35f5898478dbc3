#!/usr/bin/env bash
# run.sh benchmarks productsvc with wrk against three reference servers
# (bench/refhttp: net/http alone; bench/refsqlite: net/http + SQLite;
# bench/refpgx: net/http + a pgx pool on PostgreSQL) and writes
# bench/results.md (also printed). productsvc runs on SQLite, on SQLite with
# Redis, and on a throwaway PostgreSQL server (Debian's postgresql package,
# durable settings); then, on that server and one Redis, as a fleet: one
# replica directly and behind HAProxy, and two replicas behind HAProxy
# (the reads, workloads a and b). `make bench` runs it from the repo root.
#
# Environment (all optional):
#   BENCH_DURATION    seconds per measured wrk run (default 5)
#   BENCH_REPEATS     measured runs per workload and server (default 3)
#   BENCH_WARMUP      unmeasured seconds of the same load first (default 1; 0 = none)
#   BENCH_THREADS     wrk -t (default 2)
#   BENCH_CONNS       wrk -c (default 32)
#   BENCH_PRODUCTS    products to seed (default 10000)
#   BENCH_WORKLOADS   which of a..i to run (default "a b c d e f g h i")
#   BENCH_PRODUCTSVC  run this binary as productsvc instead of building it
#                     (only to test the harness while the service does not build)
#   BENCH_POSTGRES    0 skips the PostgreSQL runs, the fleet's too (default 1)
#   BENCH_FLEET       0 skips the fleet runs (default 1); they need haproxy
#                     (/usr/sbin/haproxy or on PATH) for all but fleet-1-direct
#   BENCH_HAPROXY     the haproxy binary (default /usr/sbin/haproxy, else
#                     haproxy on PATH)
#   BENCH_HAPROXY_THREADS  HAProxy's nbthread (default 1: the one thread
#                     used well under a core in these runs, and a second
#                     one measured no faster)
#   BENCH_RELAY       0 skips the relay's rows of workload i (default 1):
#                     otherwise workload i runs productsvc with AMQP_URL on
#                     a throwaway rabbitmq-server (Debian's package; skipped
#                     with a note when it is missing) and `harness relaylag`
#                     measures the lag from commit to broker delivery
#   BENCH_BACKUP      0 skips the backup rows (default 1): productsvc on
#                     SQLite seeded with BENCH_BACKUP_PRODUCTS products
#                     (default 200000), a backup alone, and write runs with
#                     and without a backup beside them
#
# Only 127.0.0.1 is used, every load is bounded by -d, and everything this
# script starts is stopped on exit.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

DUR=${BENCH_DURATION:-5}
DUR=${DUR%s}
REPEATS=${BENCH_REPEATS:-3}
WARMUP=${BENCH_WARMUP:-1}
WARMUP=${WARMUP%s}
THREADS=${BENCH_THREADS:-2}
CONNS=${BENCH_CONNS:-32}
N=${BENCH_PRODUCTS:-10000}
WORKLOADS=${BENCH_WORKLOADS:-a b c d e f g h i}
TOKEN=bench-token

OUT=bench/.out
DATA=$OUT/data
HARNESS=$OUT/harness
LUA=bench/wrk.lua
RUN_ID=$$$(date +%s)

# wrk.lua mode for each workload letter.
declare -A MODE=([a]=get [b]=list [c]=category [d]=search [e]=create [f]=adjust_hot [g]=mix [h]=hold_confirm [i]=writes)

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
	log "ERROR: $*"
	exit 1
}
# note records a problem for the report's "Problems" section.
note() {
	log "WARNING: $*"
	printf '%s\n' "$*" >>"$DATA/notes.txt"
}

# ---- tools ----------------------------------------------------------------
missing=()
for t in wrk curl redis-server redis-cli lscpu; do
	command -v "$t" >/dev/null || missing+=("$t")
done
if ((${#missing[@]} > 0)); then
	if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
		log "installing wrk redis-server curl util-linux (missing: ${missing[*]})"
		apt-get update -qq >/dev/null && apt-get install -y -qq wrk redis-server curl util-linux >/dev/null
	else
		die "missing ${missing[*]}: apt-get install -y wrk redis-server curl"
	fi
fi
command -v go >/dev/null || die "go is not on PATH"
HAPROXY=""
if [[ -n ${BENCH_HAPROXY:-} ]]; then
	[[ ! -x $BENCH_HAPROXY ]] || HAPROXY=$BENCH_HAPROXY
elif [[ -x /usr/sbin/haproxy ]]; then
	HAPROXY=/usr/sbin/haproxy
elif command -v haproxy >/dev/null; then
	HAPROXY=$(command -v haproxy)
fi
HAP_THREADS=${BENCH_HAPROXY_THREADS:-1}

# ---- processes: everything started is tracked and stopped on exit ---------
PIDS=()
WORK=$(mktemp -d "${TMPDIR:-/tmp}/productsvc-bench.XXXXXX")

running() { [[ -e /proc/$1 ]] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null; }

# stop_pid sends SIGTERM, waits up to 10s, then SIGKILL. It sets STOP_RC to the
# process's exit status.
stop_pid() {
	local pid=$1 i
	STOP_RC=0
	if running "$pid"; then
		kill -TERM "$pid" 2>/dev/null || true
		for ((i = 0; i < 100; i++)); do
			running "$pid" || break
			sleep 0.1
		done
		if running "$pid"; then
			kill -KILL "$pid" 2>/dev/null || true
		fi
	fi
	wait "$pid" 2>/dev/null || STOP_RC=$?
	local keep=() p
	for p in "${PIDS[@]}"; do [[ $p == "$pid" ]] || keep+=("$p"); done
	PIDS=("${keep[@]}")
}

cleanup() {
	local rc=$? pid
	trap - EXIT INT TERM
	for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
	rm -rf "$WORK"
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

now_ns() { echo "${EPOCHREALTIME/./}000"; }
vm_kb() { awk -v f="$2:" '$1 == f {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

# ---- build -----------------------------------------------------------------
rm -rf "$OUT/raw" "$OUT/logs" "$DATA"
mkdir -p "$OUT/raw" "$OUT/logs" "$DATA"
: >"$DATA/results.tsv"
: >"$DATA/startup.tsv"
: >"$DATA/feedlag.tsv"
: >"$DATA/relaylag.tsv"
: >"$DATA/fence.tsv"
: >"$DATA/cpu.tsv"
: >"$DATA/backup.tsv"
: >"$DATA/notes.txt"

log "building into $OUT/"
export CGO_ENABLED=0
# Every server is built the way `make build` builds productsvc (stripped).
go build -trimpath -ldflags "-s -w" -o "$OUT/refhttp" ./bench/refhttp
go build -trimpath -ldflags "-s -w" -o "$OUT/refsqlite" ./bench/refsqlite
go build -trimpath -ldflags "-s -w" -o "$OUT/refpgx" ./bench/refpgx
go build -trimpath -o "$HARNESS" ./bench/harness
if [[ -n ${BENCH_PRODUCTSVC:-} ]]; then
	SVC_BIN=$BENCH_PRODUCTSVC
	note "productsvc was not built: BENCH_PRODUCTSVC=$SVC_BIN stood in for it"
else
	SVC_BIN=$OUT/productsvc
	go build -trimpath -ldflags "-s -w" -o "$SVC_BIN" . || die "productsvc does not build (set BENCH_PRODUCTSVC to test the harness)"
fi

# ---- metadata --------------------------------------------------------------
# shellcheck disable=SC2016 # the backticks are Markdown, not command substitution
{
	printf 'date\t%s\n' "$(date -u '+%Y-%m-%d %H:%M:%S UTC')"
	printf 'uname\t`%s`\n' "$(uname -a)"
	printf 'cpu\t%s, nproc %s\n' "$(lscpu | sed -n 's/^Model name:[[:space:]]*//p' | head -1)" "$(nproc)"
	printf 'go\t%s\n' "$(go version)"
	printf 'wrk\t%s, `-t%s -c%s --latency --timeout 5s`, HTTP/1.1 keep-alive on 127.0.0.1; wrk shares the %s cores with the server under test\n' \
		"$( (wrk -v 2>&1 || true) | head -1 | awk '{print $1, $2}')" "$THREADS" "$CONNS" "$(nproc)"
	printf 'settings\t%s s per measured run, %s repeats, %s s unmeasured warm-up per workload and server\n' "$DUR" "$REPEATS" "$WARMUP"
} >"$DATA/meta.tsv"

# ---- workloads -------------------------------------------------------------
# start_feedlag SERVER URL FILE follows the server's change feed with the
# harness for a little longer than one measured run and sets LAG_PID once it
# has reached the end of the feed (or LAG_PID="" if it could not start).
start_feedlag() {
	local server=$1 url=$2 f=$3 i
	: >"$f.log" # exists before the poll below, whoever runs first
	"$HARNESS" feedlag -url "$url" -token "$TOKEN" -duration "$((DUR + 1))s" -o "$f" >"$f.log" 2>&1 &
	LAG_PID=$!
	PIDS+=("$LAG_PID")
	for ((i = 0; i < 6000; i++)); do
		grep -q '^following' "$f.log" && return
		running "$LAG_PID" || break
		sleep 0.01
	done
	note "$server: the feed consumer did not start: $(tail -3 "$f.log" | tr '\n' ' ')"
	stop_pid "$LAG_PID"
	LAG_PID=""
}

# finish_feedlag SERVER REP FILE waits for the feed consumer to end its run
# and records its summary.
finish_feedlag() {
	local server=$1 rep=$2 f=$3 i
	for ((i = 0; i < 100 * (DUR + 30); i++)); do
		running "$LAG_PID" || break
		sleep 0.01
	done
	stop_pid "$LAG_PID"
	if ((STOP_RC == 0)) && [[ -s $f ]]; then
		printf '%s\t%s\t%s\n' "$server" "$rep" "$f" >>"$DATA/feedlag.tsv"
		log "  $server feed lag run $rep: $(cat "$f")"
	else
		note "$server: the feed consumer failed in run $rep: $(tail -3 "$f.log" | tr '\n' ' ')"
	fi
}

# wait_relay_backlog SERVER URL waits until the relay of the server at URL
# has published its backlog (relay_backlog_events 0 on /metrics): at its
# first start it publishes the whole feed.
wait_relay_backlog() {
	local server=$1 url=$2 i
	for ((i = 0; i < 600; i++)); do
		curl -s --max-time 2 "$url/metrics" | grep -q '^relay_backlog_events 0$' && return
		sleep 0.1
	done
	note "$server: the relay had not published its backlog after 60 s; its lag includes the rest"
}

# start_relaylag SERVER FILE consumes the relay's exchange with the harness
# for a little longer than one measured run and sets RLAG_PID once it
# consumes (or RLAG_PID="").
start_relaylag() {
	local server=$1 f=$2 i
	: >"$f.log" # exists before the poll below, whoever runs first
	"$HARNESS" relaylag -amqp "$RABBIT_URL" -exchange "$SVC_EXCHANGE" -duration "$((DUR + 1))s" -o "$f" >"$f.log" 2>&1 &
	RLAG_PID=$!
	PIDS+=("$RLAG_PID")
	for ((i = 0; i < 6000; i++)); do
		grep -q '^following' "$f.log" && return
		running "$RLAG_PID" || break
		sleep 0.01
	done
	note "$server: the relay's consumer did not start: $(tail -3 "$f.log" | tr '\n' ' ')"
	stop_pid "$RLAG_PID"
	RLAG_PID=""
}

# finish_relaylag SERVER REP FILE waits for the relay's consumer to end its
# run and records its summary.
finish_relaylag() {
	local server=$1 rep=$2 f=$3 i
	for ((i = 0; i < 100 * (DUR + 30); i++)); do
		running "$RLAG_PID" || break
		sleep 0.01
	done
	stop_pid "$RLAG_PID"
	if ((STOP_RC == 0)) && [[ -s $f ]]; then
		printf '%s\t%s\t%s\n' "$server" "$rep" "$f" >>"$DATA/relaylag.tsv"
		log "  $server relay lag run $rep: $(cat "$f")"
	else
		note "$server: the relay's consumer failed in run $rep: $(tail -3 "$f.log" | tr '\n' ' ')"
	fi
}

# raise_hot_stock URL gives the hot products 1..4 enough stock that workload
# h's holds never run short.
raise_hot_stock() {
	local server=$1 url=$2 id
	for id in 1 2 3 4; do
		check "$server" 200 POST "$url/products/$id/stock/adjustments" '{"delta":100000000}' || true
	done
}

# alive PIDS reports whether every process of the comma-separated PIDS runs.
alive() {
	local p
	for p in ${1//,/ }; do running "$p" || return 1; done
}

# peak_kb PIDS prints the largest VmHWM of the comma-separated PIDS.
peak_kb() {
	local p v top=0
	for p in ${1//,/ }; do
		v=$(vm_kb "$p" VmHWM)
		((${v:-0} > top)) && top=$v
	done
	echo "$top"
}

# PROBE_URLS (replicas' base URLs) and PROBE_PROCS (NAME=PID) are scraped
# (/metrics) and sampled (harness cpu) before and after each measured run
# of run_workload while they are set; fence.tsv and cpu.tsv list the files.
PROBE_URLS=()
PROBE_PROCS=()

# probe STAGE F writes the scrapes to F.rN.STAGE and the CPU sample to
# F.cpu.STAGE; then the CPU time of this shell's children (wrk's, in the
# difference) is added to it: see children_cpu.
probe() {
	local stage=$1 f=$2 i
	for i in "${!PROBE_URLS[@]}"; do
		curl -s --max-time 5 -o "$f.r$((i + 1)).$stage" "${PROBE_URLS[$i]}/metrics" || true
	done
	if ((${#PROBE_PROCS[@]} > 0)); then
		"$HARNESS" cpu "${PROBE_PROCS[@]}" >"$f.cpu.$stage" 2>>"$OUT/logs/cpu.log" || true
	fi
}

# probe_wrk STAGE F adds WRK_CPU to F.cpu.STAGE.
probe_wrk() {
	[[ ! -s $2.cpu.$1 ]] || printf 'wrk %s\n' "$WRK_CPU" >>"$2.cpu.$1"
}

# children_cpu sets WRK_CPU to the CPU seconds (user + system) of the
# children this shell has waited for: sampled just before and just after a
# measured run, the difference is wrk's. (times must run in this shell,
# not in a $(...) subshell, whose children are its own.)
WRK_CPU=0
children_cpu() {
	times >"$WORK/times"
	WRK_CPU=$(awk 'NR == 2 { for (i = 1; i <= 2; i++) { split($i, p, /[ms]/); t += p[1] * 60 + p[2] } printf "%.2f", t }' "$WORK/times")
}

# probed SERVER LETTER REP F records the probe files of a measured run.
probed() {
	local server=$1 wl=$2 rep=$3 f=$4 i
	for i in "${!PROBE_URLS[@]}"; do
		if [[ -s $f.r$((i + 1)).before && -s $f.r$((i + 1)).after ]]; then
			printf '%s\t%s\t%s\tr%s\t%s\t%s\n' "$wl" "$server" "$rep" "$((i + 1))" "$f.r$((i + 1)).before" "$f.r$((i + 1)).after" >>"$DATA/fence.tsv"
		else
			note "$server: /metrics of replica r$((i + 1)) could not be scraped around run $rep of workload $wl"
		fi
	done
	if [[ -s $f.cpu.before && -s $f.cpu.after ]]; then
		printf '%s\t%s\t%s\t%s\t%s\n' "$wl" "$server" "$rep" "$f.cpu.before" "$f.cpu.after" >>"$DATA/cpu.tsv"
	fi
}

# run_workload SERVER LETTER PIDS URL runs one workload: a warm-up, then
# REPEATS measured wrk runs, each followed by a read of the server's VmHWM
# (the largest of PIDS, comma-separated: the processes serving URL).
# Workload i runs a feed consumer (harness feedlag) beside each measured run,
# and while the server's relay publishes (SVC_EXCHANGE set) a consumer of its
# exchange (harness relaylag).
run_workload() {
	local server=$1 wl=$2 pid=$3 url=$4 rep f hwm rps
	local args=(mode="${MODE[$wl]}" n="$N" token="$TOKEN")
	if ! alive "$pid"; then
		note "$server is not running; skipped workload $wl"
		return
	fi
	[[ $wl != h ]] || raise_hot_stock "$server" "$url"
	if ((WARMUP > 0)); then
		wrk -t"$THREADS" -c"$CONNS" -d"${WARMUP}s" -s "$LUA" "$url" -- "${args[@]}" nonce="$RUN_ID.${server//+/}.${wl}w" >/dev/null 2>&1 || true
	fi
	for ((rep = 1; rep <= REPEATS; rep++)); do
		f=$OUT/raw/${server//+/-}.$wl.$rep.txt
		LAG_PID="" RLAG_PID=""
		# The relay's backlog first: the consumers' runs, which start when
		# they are ready, must not be spent waiting for it.
		[[ $wl != i || -z $SVC_EXCHANGE ]] || wait_relay_backlog "$server" "$url"
		[[ $wl != i ]] || start_feedlag "$server" "$url" "$f.lag"
		[[ $wl != i || -z $SVC_EXCHANGE ]] || start_relaylag "$server" "$f.rlag"
		probe before "$f"
		children_cpu
		probe_wrk before "$f"
		if ! wrk -t"$THREADS" -c"$CONNS" -d"${DUR}s" --timeout 5s --latency -s "$LUA" "$url" \
			-- "${args[@]}" nonce="$RUN_ID.${server//+/}.$wl$rep" >"$f" 2>&1; then
			note "wrk failed for workload $wl on $server (see $f)"
			[[ -z $LAG_PID ]] || stop_pid "$LAG_PID"
			[[ -z $RLAG_PID ]] || stop_pid "$RLAG_PID"
			continue
		fi
		children_cpu
		probe after "$f"
		probe_wrk after "$f"
		[[ -z $LAG_PID ]] || finish_feedlag "$server" "$rep" "$f.lag"
		[[ -z $RLAG_PID ]] || finish_relaylag "$server" "$rep" "$f.rlag"
		hwm=$(peak_kb "$pid")
		printf '%s\t%s\t%s\t%s\t%s\n' "$wl" "$server" "$rep" "$f" "${hwm:-0}" >>"$DATA/results.tsv"
		probed "$server" "$wl" "$rep" "$f"
		rps=$(awk '/^Requests\/sec:/ {print $2}' "$f")
		log "  $server $wl (${MODE[$wl]}) run $rep/$REPEATS: ${rps:-?} req/s$(grep -o 'Non-2xx or 3xx responses: [0-9]*' "$f" | sed 's/^/, /' || true)"
		if ! alive "$pid"; then
			note "$server exited during workload $wl"
			return
		fi
	done
}

# check SERVER WANT METHOD URL [BODY] makes one request and notes a status
# other than WANT, with the start of the body.
check() {
	local server=$1 want=$2 method=$3 url=$4 body=${5:-} code
	local curl_args=(-s -o "$WORK/check.body" -w '%{http_code}' --max-time 5 -X "$method")
	if [[ -n $body ]]; then
		curl_args+=(-H 'Content-Type: application/json' -H "Authorization: Bearer $TOKEN" --data-binary "$body")
	fi
	code=$(curl "${curl_args[@]}" "$url" || true)
	if [[ $code != "$want" ]]; then
		note "$server: $method /${url#http://*/} answered ${code:-no response}, want $want: $(head -c 200 "$WORK/check.body" 2>/dev/null | tr '\n' ' ')"
		return 1
	fi
}

# start_ref NAME ARGS... starts a reference server on 127.0.0.1:0, reads its
# "listening ADDR" line, and sets REF_PID, REF_URL and READY_MS. Its log is
# NAME.log, or REF_LOG.log when REF_LOG is set (a second copy of NAME).
start_ref() {
	local name=$1 logf=$OUT/logs/${REF_LOG:-$1}.log start i addr=""
	shift
	: >"$logf" # exists before the poll below, whoever runs first
	start=$(now_ns)
	"$OUT/$name" "$@" >"$logf" 2>&1 &
	REF_PID=$!
	PIDS+=("$REF_PID")
	for ((i = 0; i < 6000; i++)); do
		addr=$(awk '$1 == "listening" {print $2; exit}' "$logf")
		[[ -n $addr ]] && break
		running "$REF_PID" || die "$name exited at start: $(tail -5 "$logf")"
		sleep 0.01
	done
	[[ -n $addr ]] || die "$name printed no listening line in 60s"
	REF_URL=http://$addr
	READY_MS=$("$HARNESS" ready -url "$REF_URL/ready" -since "$start" -pid "$REF_PID" -timeout 60s)
}

# start_svc LABEL DB REDIS_URL [DATABASE_URL] starts productsvc on a free
# port and sets SVC_PID, SVC_URL and READY_MS (process start to first 200 on
# /ready). With SVC_EXCHANGE set its relay publishes to that exchange on
# RABBIT_URL.
SVC_EXCHANGE=""
SVC_BACKUP_DIR=""
start_svc() {
	local label=$1 db=$2 redis=$3 pg=${4:-} port start
	port=$("$HARNESS" port)
	SVC_URL=http://127.0.0.1:$port
	start=$(now_ns)
	env -u REDIS_URL -u RATE_LIMIT_RPS -u RATE_LIMIT_BURST -u MAX_IN_FLIGHT -u METRICS_ADDR -u ADMIN_ADDR \
		-u OTEL_EXPORTER_OTLP_ENDPOINT -u DB_SYNC -u SHUTDOWN_DELAY -u DATABASE_URL -u AMQP_URL -u AMQP_EXCHANGE \
		-u BACKUP_DIR -u BACKUP_INTERVAL -u BACKUP_KEEP \
		ADDR="127.0.0.1:$port" DB_PATH="$db" API_TOKEN="$TOKEN" LOG_LEVEL=info ${redis:+REDIS_URL="$redis"} \
		${pg:+DATABASE_URL="$pg"} ${SVC_EXCHANGE:+AMQP_URL="$RABBIT_URL" AMQP_EXCHANGE="$SVC_EXCHANGE"} \
		${SVC_BACKUP_DIR:+BACKUP_DIR="$SVC_BACKUP_DIR"} \
		"$SVC_BIN" >>"$OUT/logs/$label.log" 2>&1 &
	SVC_PID=$!
	PIDS+=("$SVC_PID")
	READY_MS=$("$HARNESS" ready -url "$SVC_URL/ready" -since "$start" -pid "$SVC_PID" -timeout 60s) ||
		die "$label did not become ready: $(tail -5 "$OUT/logs/$label.log")"
}

# stop_svc LABEL DB stops productsvc and notes an unclean exit.
stop_svc() {
	stop_pid "$SVC_PID"
	((STOP_RC == 0)) || note "$1 exited with status $STOP_RC after SIGTERM"
	[[ ! -s $2-wal ]] || note "$1 left a non-empty $(basename "$2")-wal after shutdown"
}

# start_redis LABEL starts a throwaway redis-server (no persistence) on a
# free port and sets REDIS_PID and REDIS_URL.
start_redis() {
	local logf=$OUT/logs/$1.log rport i
	rport=$("$HARNESS" port)
	redis-server --port "$rport" --bind 127.0.0.1 --save '' --appendonly no --daemonize no >"$logf" 2>&1 &
	REDIS_PID=$!
	PIDS+=("$REDIS_PID")
	for ((i = 0; i < 100; i++)); do
		[[ $(redis-cli -h 127.0.0.1 -p "$rport" ping 2>/dev/null) == PONG ]] && break
		running "$REDIS_PID" || die "redis-server exited: $(tail -5 "$logf")"
		sleep 0.1
	done
	REDIS_URL=redis://127.0.0.1:$rport/0
}

# haproxy_cfg FILE PORT STATS_PORT URL... writes the HAProxy configuration
# of the fleet runs, balancing PORT over the servers at URL...: the
# timeouts, retries, checks on /ready and round robin of
# deploy/haproxy/haproxy.cfg, with these changes for a benchmark: no
# request log (a log line per request would cost HAProxy more than the
# proxying), nbthread HAP_THREADS, and http-reuse always, so that idle
# connections to a replica serve any client connection's next request
# (every request here is an idempotent GET).
haproxy_cfg() {
	local f=$1 port=$2 stats=$3 i=0 u
	shift 3
	{
		cat <<EOF
global
    maxconn 1024
    nbthread $HAP_THREADS

defaults
    mode http
    timeout connect 1s
    timeout http-request 5s
    timeout client 35s
    timeout server 35s
    timeout http-keep-alive 10s
    timeout check 1s
    retries 2
    retry-on conn-failure empty-response
    option redispatch 1

frontend productsvc
    bind 127.0.0.1:$port
    http-request disable-l7-retry unless METH_GET || METH_HEAD
    default_backend replicas

backend replicas
    balance roundrobin
    http-reuse always
    option httpchk GET /ready
    http-check expect status 200
    default-server check inter 500ms fastinter 200ms downinter 1s rise 2 fall 2
EOF
		for u in "$@"; do
			i=$((i + 1))
			printf '    server r%d %s\n' "$i" "${u#http://}"
		done
		cat <<EOF

listen stats
    bind 127.0.0.1:$stats
    stats enable
    stats uri /
EOF
	} >"$f"
}

# start_haproxy LABEL URL... starts HAProxy in front of the servers at
# URL... and waits until its stats page shows every one UP. It sets HAP_PID
# and HAP_URL, or notes the problem and returns 1.
start_haproxy() {
	local label=$1 cfg=$OUT/logs/$1.haproxy.cfg logf=$OUT/logs/$1.haproxy.log port stats i up=0
	shift
	port=$("$HARNESS" port)
	stats=$("$HARNESS" port)
	haproxy_cfg "$cfg" "$port" "$stats" "$@"
	if ! "$HAPROXY" -c -q -f "$cfg" >"$logf" 2>&1; then
		note "$label: haproxy -c rejected the configuration: $(tail -3 "$logf" | tr '\n' ' ')"
		return 1
	fi
	"$HAPROXY" -db -f "$cfg" >>"$logf" 2>&1 &
	HAP_PID=$!
	PIDS+=("$HAP_PID")
	HAP_URL=http://127.0.0.1:$port
	for ((i = 0; i < 500; i++)); do
		# CSV: proxy name, server name, ..., field 18 the status.
		up=$(curl -s --max-time 1 "http://127.0.0.1:$stats/;csv" |
			awk -F, '$1 == "replicas" && $2 ~ /^r[0-9]+$/ && $18 == "UP"' | wc -l)
		((up == $#)) && return 0
		running "$HAP_PID" || break
		sleep 0.02
	done
	note "$label: HAProxy showed $up of $# servers UP after 10 s: $(tail -3 "$logf" | tr '\n' ' ')"
	stop_pid "$HAP_PID"
	return 1
}

# seed_products URL posts N products through the API, 16 in parallel.
seed_products() {
	local url=$1 cfg=$WORK/seed.curl codes=$WORK/seed.codes start ok
	# Eight common words, so q=WORD (wrk.lua's list) has many hits; 20 categories.
	awk -v n="$N" -v url="$url/products" -v token="$TOKEN" 'BEGIN {
		srand(42)
		split("steel wooden organic portable wireless compact premium classic", adj, " ")
		split("mug lamp chair desk bottle backpack notebook speaker jacket watch", noun, " ")
		split("home office travel kitchen garden outdoor", use, " ")
		for (i = 1; i <= n; i++) {
			a = adj[int(rand() * 8) + 1]; b = adj[int(rand() * 8) + 1]
			o = noun[int(rand() * 10) + 1]; u = use[int(rand() * 6) + 1]
			body = sprintf("{\\\"sku\\\":\\\"SEED-%06d\\\",\\\"name\\\":\\\"%s %s %d\\\",\\\"description\\\":\\\"A %s %s with a %s finish, made for %s use.\\\",\\\"category\\\":\\\"cat-%02d\\\",\\\"price_cents\\\":%d,\\\"stock\\\":%d}",
				i, a, o, i, a, o, b, u, int(rand() * 20), 100 + int(rand() * 99900), int(rand() * 1000))
			if (i > 1) print "next"
			printf "url = \"%s\"\nrequest = \"POST\"\nheader = \"Content-Type: application/json\"\n", url
			printf "header = \"Authorization: Bearer %s\"\ndata = \"%s\"\noutput = \"/dev/null\"\n", token, body
			print "write-out = \"%{http_code}\\n\"\nmax-time = 10"
		}
	}' >"$cfg"
	start=$(now_ns)
	curl -s --parallel --parallel-max 16 -K "$cfg" >"$codes" 2>"$WORK/seed.err" || true
	SEED_S=$(awk -v a="$start" -v b="$(now_ns)" 'BEGIN {printf "%.1f", (b - a) / 1e9}')
	ok=$(grep -c '^201$' "$codes" || true)
	if [[ $ok != "$N" ]]; then
		die "seeding: $ok of $N POST /products answered 201; statuses: $(sort "$codes" | uniq -c | tr '\n' ' ')"
	fi
}

# run_svc_workloads CFG LABEL DB REDIS_URL [DATABASE_URL] runs WORKLOADS on
# the productsvc started by start_svc with those arguments (SVC_PID). For
# workload i (unless RELAY=0) it starts RabbitMQ and restarts the service
# with its relay on (AMQP_URL, the exchange bench.CFG); after it, RabbitMQ
# stops and the service restarts without the relay.
run_svc_workloads() {
	local cfg=$1 label=$2 db=$3 redis=$4 pg=${5:-} wl
	for wl in $WORKLOADS; do
		[[ $wl != i || $RELAY == 0 ]] || start_rabbit "$cfg"
		if [[ $wl == i && -n $RABBIT_URL ]]; then
			stop_svc "$cfg" "$db"
			SVC_EXCHANGE=bench.${cfg//+/-}
			start_svc "$label-relay" "$db" "$redis" "$pg"
			probe_svc "$pg"
			run_workload "$cfg" "$wl" "$SVC_PID" "$SVC_URL"
			grep -q '^relay_leader 1$' <(curl -s --max-time 5 "$SVC_URL/metrics") ||
				note "$cfg: relay_leader was not 1 after workload i: the relay did not publish"
			stop_svc "$cfg" "$db"
			stop_rabbit
			SVC_EXCHANGE=""
			start_svc "$label" "$db" "$redis" "$pg"
			probe_svc "$pg"
		else
			run_workload "$cfg" "$wl" "$SVC_PID" "$SVC_URL"
		fi
	done
}

# probe_svc DATABASE_URL points the probes of the PostgreSQL runs at the
# current SVC_PID and SVC_URL.
probe_svc() {
	[[ -z $1 ]] || {
		PROBE_URLS=("$SVC_URL")
		PROBE_PROCS=(productsvc="$SVC_PID" postgres="$PG_PID")
	}
}

# ---- RabbitMQ, for the relay's rows of workload i ----------------------------
# It runs only around workload i (its idle Erlang schedulers would take CPU
# from the other workloads): start_rabbit and stop_rabbit, once per server.
has() { [[ " $WORKLOADS " == *" $1 "* ]]; }
RELAY=0
RABBIT_URL="" RABBIT_PID=""
if [[ ${BENCH_RELAY:-1} == 0 ]]; then
	log "relay: skipped (BENCH_RELAY=0)"
elif ! has i; then
	log "relay: skipped (it runs with workload i; BENCH_WORKLOADS has not)"
elif [[ ! -x /usr/lib/rabbitmq/bin/rabbitmq-server ]] && ! command -v rabbitmq-server >/dev/null; then
	note "relay: rabbitmq-server is not installed (apt-get install rabbitmq-server): workload i ran without the relay's rows"
else
	RELAY=1
	printf 'rabbitmq\t%s on 127.0.0.1 (internal/rabbittest: own node, ports and epmd), started for workload i only\n' \
		"$(dpkg-query -W -f '${Version}' rabbitmq-server 2>/dev/null || echo rabbitmq-server)" >>"$DATA/meta.tsv"
fi

# start_rabbit SERVER starts a throwaway RabbitMQ server (harness rabbitmq:
# its directories under WORK) and sets RABBIT_PID and RABBIT_URL, or notes
# the problem and leaves RABBIT_URL empty.
start_rabbit() {
	local rlog=$OUT/logs/rabbitmq-${1//+/-}.log i
	: >"$rlog"
	mkdir -p "$WORK/rabbitmq"
	TMPDIR=$WORK/rabbitmq "$HARNESS" rabbitmq >"$rlog" 2>&1 &
	RABBIT_PID=$!
	PIDS+=("$RABBIT_PID")
	RABBIT_URL=""
	for ((i = 0; i < 1200; i++)); do
		RABBIT_URL=$(awk '$1 == "listening" {print $2; exit}' "$rlog")
		[[ -n $RABBIT_URL ]] && return
		running "$RABBIT_PID" || break
		sleep 0.1
	done
	note "$1: RabbitMQ did not start, workload i ran without the relay: $(tail -3 "$rlog" | tr '\n' ' ')"
	stop_rabbit
}

# stop_rabbit stops the RabbitMQ server start_rabbit started.
stop_rabbit() {
	[[ -z $RABBIT_PID ]] || stop_pid "$RABBIT_PID"
	RABBIT_PID="" RABBIT_URL=""
}

# ---- reference servers -------------------------------------------------------

log "refhttp"
start_ref refhttp
sleep 0.5
printf 'refhttp\t%s\t%s\t%s\t%s\n' "$(stat -c %s "$OUT/refhttp")" "$READY_MS" "$(vm_kb "$REF_PID" VmRSS)" "fixed body, no storage" >>"$DATA/startup.tsv"
check refhttp 200 GET "$REF_URL/products/1" || true
! has a || run_workload refhttp a "$REF_PID" "$REF_URL"
stop_pid "$REF_PID"

log "refsqlite (seeding $N products in one transaction)"
mkdir -p "$WORK/ref"
start_ref refsqlite -seed "$N" -db "$WORK/ref/ref.db"
sleep 0.5
printf 'refsqlite\t%s\t%s\t%s\t%s\n' "$(stat -c %s "$OUT/refsqlite")" "$READY_MS" "$(vm_kb "$REF_PID" VmRSS)" "start includes seeding $N rows in one transaction" >>"$DATA/startup.tsv"
check refsqlite 200 GET "$REF_URL/products/$N" || true
! has a || run_workload refsqlite a "$REF_PID" "$REF_URL"
! has e || run_workload refsqlite e "$REF_PID" "$REF_URL"
stop_pid "$REF_PID"

# ---- productsvc: seed once through the API, then one copy per configuration -
log "productsvc: seeding $N products through POST /products"
mkdir -p "$WORK/seed"
start_svc productsvc-seed "$WORK/seed/products.db" ""
EMPTY_READY_MS=$READY_MS
seed_products "$SVC_URL"
log "seeded $N products in ${SEED_S}s"
check productsvc 200 GET "$SVC_URL/products/1" || true
check productsvc 200 GET "$SVC_URL/products/$N" || true
stop_svc productsvc-seed "$WORK/seed/products.db"
printf 'data\t%s products seeded through POST /products (curl --parallel, 16 in flight) in %s s into an empty DB (start to ready on the empty DB: %s ms); every productsvc configuration starts from a copy of that DB\n' \
	"$N" "$SEED_S" "$EMPTY_READY_MS" >>"$DATA/meta.tsv"

REDIS_PID=""
for cfg in productsvc productsvc+redis; do
	dir=$WORK/${cfg//+/-}
	mkdir -p "$dir"
	cp "$WORK/seed/products.db" "$dir/"
	[[ ! -f $WORK/seed/products.db-wal ]] || cp "$WORK/seed/products.db-wal" "$dir/"
	redis_url=""
	if [[ $cfg == *redis ]]; then
		start_redis redis
		redis_url=$REDIS_URL
	fi

	log "$cfg: start on the $N-product DB"
	start_svc "${cfg//+/-}" "$dir/products.db" "$redis_url"
	sleep 1
	printf '%s\t%s\t%s\t%s\t%s\n' "$cfg" "$(stat -c %s "$SVC_BIN")" "$READY_MS" "$(vm_kb "$SVC_PID" VmRSS)" \
		"restart on the $N-product DB${redis_url:+, with Redis}" >>"$DATA/startup.tsv"

	# One request of each kind first, so a broken endpoint shows up by name.
	check "$cfg" 200 GET "$SVC_URL/products/2" || true
	check "$cfg" 200 GET "$SVC_URL/products?limit=20" || true
	check "$cfg" 200 GET "$SVC_URL/products?category=cat-03&sort=-price_cents&limit=20" || true
	if check "$cfg" 200 GET "$SVC_URL/products?q=steel&limit=20" && command -v jq >/dev/null; then
		[[ $(jq '.items | length' "$WORK/check.body" 2>/dev/null) -gt 0 ]] ||
			note "$cfg: GET /products?q=steel&limit=20 returned no items although about a third of the seeded products contain steel"
	fi
	check "$cfg" 201 POST "$SVC_URL/products" "{\"sku\":\"check-$RUN_ID-${cfg//+/-}\",\"name\":\"check\",\"price_cents\":1}" || true
	check "$cfg" 200 POST "$SVC_URL/products/5/stock/adjustments" '{"delta":1}' || true

	run_svc_workloads "$cfg" "${cfg//+/-}" "$dir/products.db" "$redis_url"
	stop_svc "$cfg" "$dir/products.db"
	if [[ -n $REDIS_PID ]]; then
		stop_pid "$REDIS_PID"
		REDIS_PID=""
	fi
done

# ---- backups: an online backup of a large catalog under writes ---------------
# productsvc on SQLite with BACKUP_DIR, on a catalog of BACKUP_N products
# seeded through the API. First a backup with no load (its time and MB/s);
# then BENCH_REPEATS pairs of wrk runs of the writes mix (workload i's: half
# creates, half stock adjustments over the whole catalog) from 8
# connections, the same length: one without a backup, one with a backup
# started 1 s in. The runs last the idle backup's time plus 2 s, so most of
# the second run is spent beside the backup.
backup_bench() {
	local dir=$WORK/backup rep f0 f1 secs bpid code
	BACKUP_N=${BENCH_BACKUP_PRODUCTS:-200000}
	log "backups: seeding $BACKUP_N products through POST /products"
	mkdir -p "$dir"
	SVC_BACKUP_DIR=$dir/backups
	start_svc productsvc-backup "$dir/products.db" ""
	N=$BACKUP_N seed_products "$SVC_URL"
	log "seeded $BACKUP_N products in ${SEED_S}s"
	printf 'backup_data\t%s products seeded through POST /products in %s s, %s MB on disk before the backups\n' \
		"$BACKUP_N" "$SEED_S" "$(awk -v b="$(cat "$dir"/products.db* | wc -c)" 'BEGIN {printf "%.1f", b / 1e6}')" >>"$DATA/meta.tsv"
	f0=$OUT/raw/backup.alone.json
	code=$(curl -s --max-time 600 -o "$f0" -w '%{http_code}' -X POST -H "Authorization: Bearer $TOKEN" "$SVC_URL/admin/backups" || true)
	if [[ $code != 201 ]]; then
		note "backups: POST /admin/backups with no load answered ${code:-no response}: $(head -c 200 "$f0" 2>/dev/null | tr '\n' ' ')"
		stop_svc productsvc-backup "$dir/products.db"
		SVC_BACKUP_DIR=""
		return
	fi
	printf 'alone\t%s\n' "$f0" >>"$DATA/backup.tsv"
	secs=$(awk '{ if (match($0, /"duration_ms": *[0-9]+/)) { v = substr($0, RSTART, RLENGTH); sub(/.*: */, "", v); printf "%d", v / 1000 + 3 } }' "$f0")
	log "  a backup with no load: $(tr -d ' \n' <"$f0" | grep -o '"duration_ms":[0-9]*'); writes runs of ${secs:-10}s"
	local args=(mode=writes n="$BACKUP_N" token="$TOKEN")
	for ((rep = 1; rep <= REPEATS; rep++)); do
		f0=$OUT/raw/backup.without.$rep.txt
		f1=$OUT/raw/backup.with.$rep.txt
		wrk -t1 -c8 -d"${secs:-10}s" --timeout 5s --latency -s "$LUA" "$SVC_URL" -- "${args[@]}" nonce="$RUN_ID.bk0$rep" >"$f0" 2>&1 ||
			note "backups: wrk failed in run $rep without a backup (see $f0)"
		(sleep 1 && curl -s --max-time 600 -o "$f1.json" -w '%{http_code}' -X POST -H "Authorization: Bearer $TOKEN" \
			"$SVC_URL/admin/backups" >"$f1.code") &
		bpid=$!
		wrk -t1 -c8 -d"${secs:-10}s" --timeout 5s --latency -s "$LUA" "$SVC_URL" -- "${args[@]}" nonce="$RUN_ID.bk1$rep" >"$f1" 2>&1 ||
			note "backups: wrk failed in run $rep beside a backup (see $f1)"
		wait "$bpid" || true
		if [[ $(cat "$f1.code" 2>/dev/null) != 201 ]]; then
			note "backups: POST /admin/backups during run $rep answered $(cat "$f1.code" 2>/dev/null): $(head -c 200 "$f1.json" 2>/dev/null)"
			continue
		fi
		printf 'pair\t%s\t%s\t%s\t%s\n' "$rep" "$f0" "$f1" "$f1.json" >>"$DATA/backup.tsv"
		log "  backups run $rep: writes p99 $(awk '$1 == "99%" {print $2}' "$f0") without, $(awk '$1 == "99%" {print $2}' "$f1") beside a backup"
	done
	stop_svc productsvc-backup "$dir/products.db"
	SVC_BACKUP_DIR=""
}
if [[ ${BENCH_BACKUP:-1} != 0 ]]; then
	backup_bench
else
	log "backups: skipped (BENCH_BACKUP=0)"
fi

# ---- fleet: replicas on one PostgreSQL database and one Redis -----------------
# The reads only: GET by id (a) and listings (b), as far as BENCH_WORKLOADS
# has them. Writes land on PostgreSQL whatever serves them.
FLEET_WL=""
for wl in a b; do ! has "$wl" || FLEET_WL+="$wl "; done

# start_replica LABEL starts one fleet replica (DATABASE_URL=PG_FLEET,
# REDIS_URL=FLEET_REDIS) and sets R_PID and R_URL.
start_replica() {
	start_svc "$1" "$WORK/$1.db" "$FLEET_REDIS" "$PG_FLEET"
	R_PID=$SVC_PID
	R_URL=$SVC_URL
	check "$1" 200 GET "$R_URL/products/2" || true
	check "$1" 200 GET "$R_URL/products?limit=20" || true
}

# run_fleet measures fleet-1-direct (one replica, no proxy), fleet-1 (it
# behind HAProxy) and fleet-2 (it and a second replica behind HAProxy),
# each on FLEET_WL, scraping every replica's /metrics around each run. Then
# the same HAProxy in front of one and two refhttp servers (GET by id
# only): what the step from one to two servers costs on this machine
# without any of productsvc's coordination.
run_fleet() {
	local cfg wl r1_pid r1_url r2_pid r2_url ref1_pid ref1_url ref2_pid ref2_url
	log "fleet: -copy-to the $N-product catalog into a third database, then one replica with Redis"
	DB_PATH=$WORK/seed/products.db "$SVC_BIN" -copy-to "$PG_FLEET" >>"$OUT/logs/copy-fleet.log" 2>&1 ||
		die "-copy-to (fleet) failed: $(tail -5 "$OUT/logs/copy-fleet.log")"
	start_redis fleet-redis
	FLEET_REDIS=$REDIS_URL

	start_replica fleet-r1
	r1_pid=$R_PID r1_url=$R_URL
	sleep 1
	printf '%s\t%s\t%s\t%s\t%s\n' "fleet replica" "$(stat -c %s "$SVC_BIN")" "$READY_MS" "$(vm_kb "$r1_pid" VmRSS)" \
		"restart on the $N-product PostgreSQL database, with Redis" >>"$DATA/startup.tsv"

	cfg=fleet-1-direct
	PROBE_URLS=("$r1_url")
	PROBE_PROCS=(r1="$r1_pid" postgres="$PG_PID" redis="$REDIS_PID")
	for wl in $FLEET_WL; do
		run_workload "$cfg" "$wl" "$r1_pid" "$r1_url"
	done

	if [[ -z $HAPROXY ]]; then
		note "fleet: haproxy is not installed (${BENCH_HAPROXY:-/usr/sbin/haproxy, or on PATH}; apt-get install haproxy): only fleet-1-direct was measured, not fleet-1, fleet-2 or the refhttp-fleet rows"
	else
		printf 'haproxy\t%s, nbthread %s, balance roundrobin, option httpchk GET /ready, http-reuse always, no request log; the rest as deploy/haproxy/haproxy.cfg\n' \
			"$("$HAPROXY" -v | awk 'NR == 1 {print $1, $3}')" "$HAP_THREADS" >>"$DATA/meta.tsv"
		cfg=fleet-1
		if start_haproxy "$cfg" "$r1_url"; then
			PROBE_PROCS+=(haproxy="$HAP_PID")
			for wl in $FLEET_WL; do
				run_workload "$cfg" "$wl" "$r1_pid" "$HAP_URL"
			done
			running "$HAP_PID" || note "$cfg: HAProxy exited during the runs: $(tail -3 "$OUT/logs/$cfg.haproxy.log" | tr '\n' ' ')"
			stop_pid "$HAP_PID"
		fi

		log "fleet: a second replica on the same database and Redis"
		start_replica fleet-r2
		r2_pid=$R_PID r2_url=$R_URL
		sleep 1
		cfg=fleet-2
		if start_haproxy "$cfg" "$r1_url" "$r2_url"; then
			PROBE_URLS=("$r1_url" "$r2_url")
			PROBE_PROCS=(r1="$r1_pid" r2="$r2_pid" haproxy="$HAP_PID" postgres="$PG_PID" redis="$REDIS_PID")
			for wl in $FLEET_WL; do
				run_workload "$cfg" "$wl" "$r1_pid,$r2_pid" "$HAP_URL"
			done
			running "$HAP_PID" || note "$cfg: HAProxy exited during the runs: $(tail -3 "$OUT/logs/$cfg.haproxy.log" | tr '\n' ' ')"
			stop_pid "$HAP_PID"
		fi
		SVC_PID=$r2_pid
		stop_svc fleet-r2 "$WORK/fleet-r2.db"

		if [[ " $FLEET_WL " == *" a "* ]]; then
			log "fleet: the same HAProxy in front of one, then two refhttp servers"
			PROBE_URLS=()
			REF_LOG=refhttp-fleet-r1 start_ref refhttp
			ref1_pid=$REF_PID ref1_url=$REF_URL
			REF_LOG=refhttp-fleet-r2 start_ref refhttp
			ref2_pid=$REF_PID ref2_url=$REF_URL
			cfg=refhttp-fleet-1
			if start_haproxy "$cfg" "$ref1_url"; then
				PROBE_PROCS=(r1="$ref1_pid" haproxy="$HAP_PID")
				run_workload "$cfg" a "$ref1_pid" "$HAP_URL"
				stop_pid "$HAP_PID"
			fi
			cfg=refhttp-fleet-2
			if start_haproxy "$cfg" "$ref1_url" "$ref2_url"; then
				PROBE_PROCS=(r1="$ref1_pid" r2="$ref2_pid" haproxy="$HAP_PID")
				run_workload "$cfg" a "$ref1_pid,$ref2_pid" "$HAP_URL"
				stop_pid "$HAP_PID"
			fi
			stop_pid "$ref1_pid"
			stop_pid "$ref2_pid"
		fi
	fi
	PROBE_URLS=()
	PROBE_PROCS=()
	SVC_PID=$r1_pid
	stop_svc fleet-r1 "$WORK/fleet-r1.db"
	stop_pid "$REDIS_PID"
}

# ---- PostgreSQL: the pgx reference, then productsvc on a copy of the seed ---
if [[ ${BENCH_POSTGRES:-1} != 0 ]]; then
	log "postgres: starting a throwaway server"
	pglog=$OUT/logs/postgres.log
	: >"$pglog"
	"$HARNESS" postgres >"$pglog" 2>&1 &
	PG_PID=$!
	PIDS+=("$PG_PID")
	pgline=""
	for ((i = 0; i < 6000; i++)); do
		pgline=$(awk '$1 == "listening" {print; exit}' "$pglog")
		[[ -n $pgline ]] && break
		running "$PG_PID" || die "PostgreSQL did not start: $(tail -5 "$pglog")"
		sleep 0.01
	done
	[[ -n $pgline ]] || die "PostgreSQL printed no listening line in 60s"
	read -r _ PG_SVC PG_REF PG_FLEET <<<"$pgline"

	log "refpgx (seeding $N products with COPY)"
	start_ref refpgx -seed "$N" -url "$PG_REF"
	sleep 0.5
	printf 'refpgx\t%s\t%s\t%s\t%s\n' "$(stat -c %s "$OUT/refpgx")" "$READY_MS" "$(vm_kb "$REF_PID" VmRSS)" "start includes seeding $N rows with COPY" >>"$DATA/startup.tsv"
	check refpgx 200 GET "$REF_URL/products/$N" || true
	! has a || run_workload refpgx a "$REF_PID" "$REF_URL"
	! has e || run_workload refpgx e "$REF_PID" "$REF_URL"
	stop_pid "$REF_PID"

	cfg=productsvc+postgres
	log "$cfg: -copy-to the $N-product catalog, then start"
	DB_PATH=$WORK/seed/products.db "$SVC_BIN" -copy-to "$PG_SVC" >>"$OUT/logs/copy.log" 2>&1 ||
		die "-copy-to failed: $(tail -5 "$OUT/logs/copy.log")"
	start_svc productsvc-postgres "$WORK/unused.db" "" "$PG_SVC"
	sleep 1
	printf '%s\t%s\t%s\t%s\t%s\n' "$cfg" "$(stat -c %s "$SVC_BIN")" "$READY_MS" "$(vm_kb "$SVC_PID" VmRSS)" \
		"restart on the $N-product PostgreSQL database" >>"$DATA/startup.tsv"
	check "$cfg" 200 GET "$SVC_URL/products/2" || true
	check "$cfg" 200 GET "$SVC_URL/products?q=steel&limit=20" || true
	check "$cfg" 201 POST "$SVC_URL/products" "{\"sku\":\"check-$RUN_ID-pg\",\"name\":\"check\",\"price_cents\":1}" || true
	probe_svc "$PG_SVC"
	run_svc_workloads "$cfg" productsvc-postgres "$WORK/unused.db" "" "$PG_SVC"
	PROBE_URLS=()
	PROBE_PROCS=()
	stop_svc "$cfg" "$WORK/unused.db"

	if [[ ${BENCH_FLEET:-1} == 0 ]]; then
		log "fleet: skipped (BENCH_FLEET=0)"
	elif [[ -z $FLEET_WL ]]; then
		log "fleet: skipped (it runs workloads a and b; BENCH_WORKLOADS has neither)"
	else
		run_fleet
	fi
	stop_pid "$PG_PID"
elif [[ ${BENCH_FLEET:-1} != 0 ]]; then
	log "fleet: skipped (it runs on PostgreSQL, and BENCH_POSTGRES=0)"
fi

# ---- report ------------------------------------------------------------------
log "writing bench/results.md"
"$HARNESS" report -dir "$DATA" -o bench/results.md
