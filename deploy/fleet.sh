#!/usr/bin/env bash
# fleet.sh runs productsvc as three replicas behind HAProxy on this machine,
# on one PostgreSQL database and one Redis, everything on 127.0.0.1:
#
#   127.0.0.1:8080         HAProxy: the service (deploy/haproxy/haproxy.cfg)
#   127.0.0.1:8404         HAProxy's stats page
#   127.0.0.1:8081..8083   the replicas (ADDR), each with SHUTDOWN_DELAY=1s
#   127.0.0.1:16379        a throwaway redis-server, unless REDIS_URL is set
#   a free port            a throwaway PostgreSQL (Debian's postgresql
#                          package), unless DATABASE_URL is set
#
# It builds ./productsvc (make build), starts everything, and runs until
# Ctrl-C or SIGTERM, or until HAProxy, Redis or PostgreSQL exits (a replica
# that exits is reported and left out); then it stops them all: HAProxy,
# the replicas (SIGTERM: they drain and exit), Redis and PostgreSQL, whose
# data goes with it. `make fleet` runs it. Needs Linux and bash 5.1+.
#
# Exit status: 0 after Ctrl-C or SIGTERM when everything stopped by itself
# (a stop asked for is not a failure, so `make fleet` reports none); 1 when
# something failed to start, exited by itself, or had to be SIGKILLed.
#
# Environment (all optional):
#   DATABASE_URL      use this PostgreSQL database instead of a throwaway one
#                     (the replicas migrate it)
#   REDIS_URL         use this Redis instead of a throwaway one
#   API_TOKEN         the replicas' write token (default: generated, printed)
#   FLEET_REDIS_PORT  the throwaway Redis's port (default 16379)
#   FLEET_LOGS        where the logs and pid files go (default ${TMPDIR:-/tmp}/productsvc-fleet;
#                     replaced at each start, kept after the fleet stops)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

CFG=$ROOT/deploy/haproxy/haproxy.cfg
LOGS=${FLEET_LOGS:-${TMPDIR:-/tmp}/productsvc-fleet}
REDIS_PORT=${FLEET_REDIS_PORT:-16379}
REPLICA_PORTS=(8081 8082 8083) # the servers of haproxy.cfg
PROXY_PORTS=(8080 8404)        # its frontend and stats page

log() { printf '[fleet %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
	log "ERROR: $*"
	exit 1
}

# ---- processes: each runs in a session of its own, so a Ctrl-C reaches
# only this script, which then stops them in order -------------------------
NAMES=()
PIDS=()
running() { [[ -e /proc/$1 ]] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null; }

# start NAME LOGFILE CMD... runs CMD in the background with its output in
# LOGFILE (- for this script's stderr) and records its pid in PID.
start() {
	local name=$1 out=$2
	shift 2
	if [[ $out == - ]]; then
		setsid "$@" >&2 &
	else
		setsid "$@" >"$out" 2>&1 &
	fi
	PID=$!
	NAMES+=("$name")
	PIDS+=("$PID")
}

# stop_all sends SIGTERM to each of the named processes at once, waits up
# to 15 s for them (a replica takes SHUTDOWN_DELAY plus its drain), then
# SIGKILLs what is left and returns 1.
# shellcheck disable=SC2317 # reached from the EXIT trap
stop_all() {
	local want=" $* " i pid left=()
	for i in "${!PIDS[@]}"; do
		[[ $want == *" ${NAMES[$i]} "* ]] || continue
		pid=${PIDS[$i]}
		if running "$pid"; then
			kill -TERM "$pid" 2>/dev/null || true
			left+=("$i")
		fi
	done
	for ((t = 0; t < 150 && ${#left[@]} > 0; t++)); do
		sleep 0.1
		local still=()
		for i in "${left[@]}"; do running "${PIDS[$i]}" && still+=("$i"); done
		left=("${still[@]}")
	done
	for i in "${left[@]}"; do
		log "${NAMES[$i]} did not stop within 15s: SIGKILL"
		kill -KILL "${PIDS[$i]}" 2>/dev/null || true
	done
	for i in "${!PIDS[@]}"; do
		[[ $want == *" ${NAMES[$i]} "* ]] || continue
		wait "${PIDS[$i]}" 2>/dev/null || true
	done
	((${#left[@]} == 0))
}

# shellcheck disable=SC2317 # the EXIT trap
cleanup() {
	local rc=$?
	trap - EXIT INT TERM
	if ((${#PIDS[@]} > 0)); then
		log "stopping"
		# HAProxy first, so no request reaches a replica that is stopping;
		# then the replicas, which drain and close their connections; then
		# what they depend on.
		stop_all haproxy || rc=1
		stop_all r1 r2 r3 || rc=1
		stop_all redis postgres || rc=1
		log "stopped; logs in $LOGS"
	fi
	exit "$rc"
}
trap cleanup EXIT
# Ctrl-C and SIGTERM are how the fleet is meant to stop: exit 0, unless
# the cleanup finds something that would not stop.
trap 'exit 0' INT TERM

# ---- checks ----------------------------------------------------------------
missing=()
for t in go curl; do command -v "$t" >/dev/null || missing+=("$t"); done
# Debian installs HAProxy in /usr/sbin, which is not on every user's PATH.
HAPROXY=$(command -v haproxy || echo /usr/sbin/haproxy)
[[ -x $HAPROXY ]] || missing+=(haproxy)
[[ -n ${REDIS_URL:-} ]] || command -v redis-server >/dev/null || missing+=(redis-server)
if [[ -z ${DATABASE_URL:-} ]] && ! compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null && ! command -v initdb >/dev/null; then
	missing+=(postgresql)
fi
((${#missing[@]} == 0)) || die "missing ${missing[*]}: apt-get install -y haproxy redis-server postgresql curl"

[[ $REDIS_PORT =~ ^[0-9]+$ && " ${PROXY_PORTS[*]} ${REPLICA_PORTS[*]} " != *" $REDIS_PORT "* ]] ||
	die "FLEET_REDIS_PORT=$REDIS_PORT: want a port number other than ${PROXY_PORTS[*]} ${REPLICA_PORTS[*]}"

# in_use PORT reports whether something accepts connections on 127.0.0.1:PORT.
in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
ports=("${PROXY_PORTS[@]}" "${REPLICA_PORTS[@]}")
[[ -n ${REDIS_URL:-} ]] || ports+=("$REDIS_PORT")
for p in "${ports[@]}"; do
	if in_use "$p"; then
		hint=""
		[[ $p == "$REDIS_PORT" ]] && hint=" (set FLEET_REDIS_PORT or REDIS_URL)"
		die "127.0.0.1:$p is already in use$hint"
	fi
done

mkdir -p "$LOGS"
rm -f "$LOGS"/{r1,r2,r3,redis,postgres}.log "$LOGS"/r{1,2,3}.pid "$LOGS/harness"

if [[ -z ${API_TOKEN:-} ]]; then
	API_TOKEN=$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')
	log "API_TOKEN is not set; writes need the generated token $API_TOKEN"
fi
export API_TOKEN

# ---- build -----------------------------------------------------------------
log "building ./productsvc"
make -s build

# ---- PostgreSQL ------------------------------------------------------------
if [[ -z ${DATABASE_URL:-} ]]; then
	# bench/harness starts the same throwaway server the benchmarks use:
	# initdb into a temporary directory (as the postgres user when run as
	# root), durable settings, a free 127.0.0.1 port; on SIGTERM it stops the
	# server and removes its files.
	log "starting a throwaway PostgreSQL"
	go build -o "$LOGS/harness" ./bench/harness
	start postgres "$LOGS/postgres.log" "$LOGS/harness" postgres
	line=""
	for ((i = 0; i < 600; i++)); do
		line=$(awk '$1 == "listening" {print; exit}' "$LOGS/postgres.log")
		[[ -n $line ]] && break
		running "$PID" || die "PostgreSQL did not start: $(tail -5 "$LOGS/postgres.log")"
		sleep 0.1
	done
	[[ -n $line ]] || die "PostgreSQL did not start within 60s"
	read -r _ DATABASE_URL _ <<<"$line"
fi
export DATABASE_URL
# The URL as printed: without its password.
DB_SHOWN=$(sed -E 's#(://[^:/@]*:)[^@]*@#\1***@#' <<<"$DATABASE_URL")

# ---- Redis -----------------------------------------------------------------
if [[ -z ${REDIS_URL:-} ]]; then
	# A pure cache, as in deploy/kubernetes/redis.yaml: nothing on disk,
	# bounded by maxmemory without eviction (entries expire by CACHE_TTL).
	log "starting redis-server on 127.0.0.1:$REDIS_PORT"
	start redis "$LOGS/redis.log" redis-server --port "$REDIS_PORT" --bind 127.0.0.1 \
		--save '' --appendonly no --maxmemory 64mb --maxmemory-policy noeviction
	for ((i = 0; i < 100; i++)); do
		in_use "$REDIS_PORT" && break
		running "$PID" || die "redis-server did not start: $(tail -5 "$LOGS/redis.log")"
		sleep 0.1
	done
	in_use "$REDIS_PORT" || die "redis-server did not start within 10s"
	REDIS_URL=redis://127.0.0.1:$REDIS_PORT/0
fi
export REDIS_URL

# ---- the replicas ----------------------------------------------------------
# All three start at once; on PostgreSQL they migrate under an advisory
# lock, so each migration runs once. Their working directory is $LOGS, so
# nothing lands in the repository. Every connection to a replica comes from
# HAProxy's address, so the per-address connection limit is off
# (MAX_CONNS_PER_IP=0); MAX_CONNS still bounds the total.
declare -A REPLICA_PID
for i in 1 2 3; do
	start "r$i" "$LOGS/r$i.log" env -C "$LOGS" ADDR="127.0.0.1:${REPLICA_PORTS[i - 1]}" SHUTDOWN_DELAY=1s MAX_CONNS_PER_IP=0 "$ROOT/productsvc"
	REPLICA_PID[$i]=$PID
	echo "$PID" >"$LOGS/r$i.pid"
done
for i in 1 2 3; do
	url=127.0.0.1:${REPLICA_PORTS[i - 1]}/health/startup
	for ((t = 0; t < 300; t++)); do
		curl -sf "$url" >/dev/null && break
		running "${REPLICA_PID[$i]}" || die "replica r$i exited: $(tail -3 "$LOGS/r$i.log")"
		sleep 0.1
	done
	curl -sf "$url" >/dev/null || die "replica r$i did not start within 30s"
done
log "replicas r1 r2 r3 up on 127.0.0.1:${REPLICA_PORTS[0]}..${REPLICA_PORTS[2]}"

# ---- HAProxy ---------------------------------------------------------------
start haproxy - "$HAPROXY" -db -f "$CFG"
for ((t = 0; t < 100; t++)); do
	in_use 8080 && break
	running "$PID" || die "haproxy did not start"
	sleep 0.1
done

cat >&2 <<EOF
[fleet] up: productsvc on http://127.0.0.1:8080 (HAProxy), three replicas on
        PostgreSQL ($DB_SHOWN)
        and Redis ($REDIS_URL).
  curl -s 127.0.0.1:8080/ready
  curl -s -X POST 127.0.0.1:8080/products -H 'Authorization: Bearer $API_TOKEN' \\
    -H 'Content-Type: application/json' -d '{"sku":"PEN-1","name":"Fountain pen","price_cents":2450,"stock":10}'
  curl -s 127.0.0.1:8081/products/1     # each replica directly: 8081, 8082, 8083
  curl -s '127.0.0.1:8404/;csv'         # HAProxy's view (or http://127.0.0.1:8404/)
  Logs: $LOGS (r1.log r2.log r3.log: the replicas' JSON logs; r1.pid ...). Ctrl-C stops everything.
EOF

# Runs until a signal (the traps), or until HAProxy, Redis or PostgreSQL
# exits by itself. A replica that exits is only reported: HAProxy takes it
# out of rotation and the others serve (kill -TERM "$(cat "$LOGS/r2.pid")"
# shows a replica leaving without a failed request).
live=("${PIDS[@]}")
while :; do
	gone="" name=""
	set +e
	wait -n -p gone "${live[@]}"
	rc=$?
	set -e
	for i in "${!PIDS[@]}"; do [[ ${PIDS[$i]} == "$gone" ]] && name=${NAMES[$i]}; done
	keep=()
	for p in "${live[@]}"; do [[ $p == "$gone" ]] || keep+=("$p"); done
	live=("${keep[@]}")
	case $name in
	r?) log "replica $name exited (status $rc); HAProxy takes it out, the others serve" ;;
	*) die "$name exited by itself (status $rc); see $LOGS" ;;
	esac
done
