#!/usr/bin/env bash
# Start or stop a throwaway 3-master Redis Cluster on loopback ports.
#
#   .ci/redis-cluster.sh start DIR   start it, keeping its files in DIR, and
#                                    print the comma-separated seed addresses
#                                    (the only line written to stdout)
#   .ci/redis-cluster.sh stop DIR    stop the servers whose pid files are in DIR
#
# Typical use:
#   IDEMPOTENCY_REDIS_CLUSTER_ADDRS=$(.ci/redis-cluster.sh start "$dir")
#   trap '.ci/redis-cluster.sh stop "$dir"' EXIT
set -euo pipefail

usage() {
	echo "usage: $0 start|stop DIR" >&2
	exit 2
}

log() { echo "redis-cluster: $*" >&2; }

# port_free PORT: nothing listens on 127.0.0.1:PORT.
port_free() {
	! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

start() {
	local dir=$1
	mkdir -p "$dir"
	dir=$(cd "$dir" && pwd)
	if compgen -G "$dir/*.pid" >/dev/null; then
		log "$dir already holds pid files; stop that cluster first"
		exit 1
	fi

	# Three ports whose cluster bus ports (port + 10000) are free too, all
	# below the kernel's ephemeral range (32768 and up on Linux), so that no
	# outgoing connection can take one between this check and the bind.
	local ports=() port=$((20000 + RANDOM % 2000))
	while ((${#ports[@]} < 3)); do
		if ((port > 22700)); then
			log "no free ports found"
			exit 1
		fi
		if port_free "$port" && port_free $((port + 10000)); then
			ports+=("$port")
		fi
		port=$((port + 1))
	done

	# Whatever goes wrong from here, leave no server behind.
	trap "stop '$dir'" EXIT

	local addrs=()
	for port in "${ports[@]}"; do
		redis-server --port "$port" --bind 127.0.0.1 \
			--cluster-enabled yes --cluster-config-file "$dir/nodes-$port.conf" \
			--cluster-node-timeout 5000 \
			--save "" --appendonly no --dir "$dir" \
			--daemonize yes --pidfile "$dir/$port.pid" --logfile "$dir/$port.log" >&2
		addrs+=("127.0.0.1:$port")
	done

	for port in "${ports[@]}"; do
		if ! wait_for "server on port $port" redis-cli -p "$port" ping; then
			tail -n 20 "$dir/$port.log" >&2 || true
			exit 1
		fi
	done

	redis-cli --cluster create "${addrs[@]}" --cluster-replicas 0 --cluster-yes >&2

	for port in "${ports[@]}"; do
		wait_for "cluster_state:ok on port $port" cluster_ok "$port" || exit 1
	done

	trap - EXIT
	local IFS=,
	echo "${addrs[*]}"
}

cluster_ok() {
	redis-cli -p "$1" cluster info | tr -d '\r' | grep -qx 'cluster_state:ok'
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
	rm -f "$dir"/nodes-*.conf
}

(($# == 2)) || usage
case $1 in
start) start "$2" ;;
stop) stop "$2" ;;
*) usage ;;
esac
