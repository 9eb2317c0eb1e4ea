#!/usr/bin/env bash
# Start or stop a throwaway Redis Sentinel setup on loopback ports: a master,
# one replica (both appendonly yes) and three Sentinels that monitor them
# with a quorum of 2 and short timeouts, so a failover takes a few seconds.
#
#   .ci/redis-sentinel.sh start DIR   start it, keeping its files in DIR, and
#                                     print two lines to stdout (nothing else
#                                     goes there):
#                                       IDEMPOTENCY_REDIS_SENTINEL_ADDRS=host:port,host:port,host:port
#                                       IDEMPOTENCY_REDIS_SENTINEL_MASTER=name
#   .ci/redis-sentinel.sh stop DIR    stop the processes whose pid files are in DIR
#
# Each server runs from its own config file in DIR (DIR/PORT.conf), which
# the Sentinels rewrite as they reconfigure it; a test that kills a server
# restarts it from the executable and config_file that INFO server reports.
#
# Typical use:
#   sentinel_env=$(.ci/redis-sentinel.sh start "$dir")
#   trap '.ci/redis-sentinel.sh stop "$dir"' EXIT
#   export $sentinel_env
set -euo pipefail

readonly master_name=idempotency-test

usage() {
	echo "usage: $0 start|stop DIR" >&2
	exit 2
}

log() { echo "redis-sentinel: $*" >&2; }

# port_free PORT: nothing listens on 127.0.0.1:PORT.
port_free() {
	! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

start() {
	local dir=$1
	mkdir -p "$dir"
	dir=$(cd "$dir" && pwd)
	if compgen -G "$dir/*.pid" >/dev/null; then
		log "$dir already holds pid files; stop that setup first"
		exit 1
	fi

	# Five free ports, all below the kernel's ephemeral range (32768 and up
	# on Linux), so that no outgoing connection can take one between this
	# check and the bind. The range is apart from the cluster script's.
	local ports=() port=$((23000 + RANDOM % 2000))
	while ((${#ports[@]} < 5)); do
		if ((port > 25700)); then
			log "no free ports found"
			exit 1
		fi
		if port_free "$port"; then
			ports+=("$port")
		fi
		port=$((port + 1))
	done
	local master=${ports[0]} replica=${ports[1]} sentinels=("${ports[@]:2}")

	# Whatever goes wrong from here, leave no process behind.
	trap "stop '$dir'" EXIT

	for port in "$master" "$replica"; do
		cat >"$dir/$port.conf" <<EOF
port $port
bind 127.0.0.1
daemonize yes
pidfile $dir/$port.pid
logfile $dir/$port.log
dir $dir
dbfilename dump-$port.rdb
appendonly yes
appendfilename appendonly-$port.aof
appenddirname appendonly-$port
save ""
repl-diskless-sync-delay 0
EOF
	done
	echo "replicaof 127.0.0.1 $master" >>"$dir/$replica.conf"

	for port in "$master" "$replica"; do
		redis-server "$dir/$port.conf" >&2
	done
	for port in "$master" "$replica"; do
		if ! wait_for "server on port $port" redis-cli -p "$port" ping; then
			tail -n 20 "$dir/$port.log" >&2 || true
			exit 1
		fi
	done
	wait_for "replica on port $replica in sync" replica_up "$replica" || exit 1

	for port in "${sentinels[@]}"; do
		cat >"$dir/$port.conf" <<EOF
port $port
bind 127.0.0.1
daemonize yes
pidfile $dir/$port.pid
logfile $dir/$port.log
dir $dir
sentinel monitor $master_name 127.0.0.1 $master 2
sentinel down-after-milliseconds $master_name 1000
sentinel failover-timeout $master_name 4000
sentinel parallel-syncs $master_name 1
EOF
		redis-server "$dir/$port.conf" --sentinel >&2
	done
	for port in "${sentinels[@]}"; do
		if ! wait_for "sentinel on port $port to see the whole setup" sentinel_ready "$port"; then
			tail -n 20 "$dir/$port.log" >&2 || true
			exit 1
		fi
	done

	trap - EXIT
	local addrs=() IFS=,
	for port in "${sentinels[@]}"; do
		addrs+=("127.0.0.1:$port")
	done
	echo "IDEMPOTENCY_REDIS_SENTINEL_ADDRS=${addrs[*]}"
	echo "IDEMPOTENCY_REDIS_SENTINEL_MASTER=$master_name"
}

replica_up() {
	redis-cli -p "$1" info replication | tr -d '\r' | grep -qx 'master_link_status:up'
}

# sentinel_ready PORT: the Sentinel on PORT knows the other two and the
# replica, and could authorise a failover.
sentinel_ready() {
	local info
	redis-cli -p "$1" sentinel ckquorum "$master_name" | grep -q '^OK' || return 1
	info=$(redis-cli -p "$1" sentinel master "$master_name" | tr -d '\r')
	grep -A1 -x 'num-slaves' <<<"$info" | tail -n 1 | grep -qx 1 &&
		grep -A1 -x 'num-other-sentinels' <<<"$info" | tail -n 1 | grep -qx 2
}

# wait_for WHAT CMD...: run CMD until it succeeds, for up to 30 seconds.
wait_for() {
	local what=$1
	shift
	for _ in $(seq 300); do
		if "$@" >/dev/null 2>&1; then
			return 0
		fi
		sleep 0.1
	done
	log "timed out waiting for $what"
	return 1
}

stop() {
	local dir=$1 pidfile pid
	for pidfile in "$dir"/*.pid; do
		[[ -e $pidfile ]] || continue
		pid=$(<"$pidfile")
		if kill "$pid" 2>/dev/null; then
			for _ in $(seq 100); do
				kill -0 "$pid" 2>/dev/null || break
				sleep 0.1
			done
		fi
		rm -f "$pidfile"
	done
}

(($# == 2)) || usage
case $1 in
start) start "$2" ;;
stop) stop "$2" ;;
*) usage ;;
esac
