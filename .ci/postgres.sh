#!/usr/bin/env bash
# Find or start a PostgreSQL for the tests, on loopback.
#
#   .ci/postgres.sh start DIR   print the DSN of a PostgreSQL with a database
#                               named test and trust authentication (the only
#                               line written to stdout). When one already
#                               answers on 127.0.0.1:5432, that one; otherwise
#                               a throwaway server on a free port, installed
#                               from the distribution's packages if missing,
#                               whose pid is kept in DIR
#   .ci/postgres.sh stop DIR    stop the server that start started, if any,
#                               and remove its files
#
# IDEMPOTENCY_PG_FORCE_LOCAL=1 skips the look at port 5432 and always starts
# a throwaway server.
#
# Typical use:
#   IDEMPOTENCY_POSTGRES_DSN=$(.ci/postgres.sh start "$dir")
#   trap '.ci/postgres.sh stop "$dir"' EXIT
set -euo pipefail

usage() {
	echo "usage: $0 start|stop DIR" >&2
	exit 2
}

log() { echo "postgres: $*" >&2; }

apt_updated=
need_pkg() { # need_pkg COMMAND PACKAGE
	if ! command -v "$1" >/dev/null 2>&1; then
		install_pkg "$2"
	fi
}

install_pkg() { # install_pkg PACKAGE
	if [[ -z $apt_updated ]]; then
		apt-get update -qq >&2
		apt_updated=1
	fi
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$1" >/dev/null
}

# port_free PORT: nothing listens on 127.0.0.1:PORT.
port_free() {
	! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# as_pg CMD...: run CMD as the postgres user when root (the server refuses
# to run as root), as the current user otherwise.
as_pg() {
	if ((EUID == 0)); then
		runuser -u postgres -- "$@"
	else
		"$@"
	fi
}

# server_bin: the directory of the newest installed server binaries.
server_bin() {
	local d
	d=$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin -type d 2>/dev/null | sort -V | tail -n 1)
	if [[ -n $d && -x $d/initdb ]]; then
		echo "$d"
	fi
}

# existing_dsn: the DSN of the server on 127.0.0.1:5432 if it answers with
# trust authentication and has a database named test.
existing_dsn() {
	pg_isready -q -h 127.0.0.1 -p 5432 || return 1
	local user
	for user in postgres root; do
		if psql -h 127.0.0.1 -p 5432 -U "$user" -d test -w -Atqc 'select 1' >/dev/null 2>&1; then
			echo "postgres://$user@127.0.0.1:5432/test?sslmode=disable"
			return 0
		fi
	done
	log "a server answers on 127.0.0.1:5432 but not as postgres or root to database test without a password"
	return 1
}

start() {
	local dir=$1
	mkdir -p "$dir"
	dir=$(cd "$dir" && pwd)
	if [[ -e $dir/postgres.pid ]]; then
		log "$dir already holds a pid file; stop that server first"
		exit 1
	fi

	need_pkg pg_isready postgresql-client
	need_pkg psql postgresql-client
	if [[ -z ${IDEMPOTENCY_PG_FORCE_LOCAL:-} ]] && existing_dsn; then
		return 0
	fi

	local bin
	bin=$(server_bin)
	if [[ -z $bin ]]; then
		log "installing the PostgreSQL server"
		install_pkg postgresql
		bin=$(server_bin)
		[[ -n $bin ]] || { log "no initdb found after installing postgresql"; exit 1; }
	fi
	if ((EUID == 0)) && ! id postgres >/dev/null 2>&1; then
		log "no postgres user to run the server as"
		exit 1
	fi

	# The server's files live in a directory of their own that the postgres
	# user can reach: DIR's parents may be closed to it.
	local data
	data=$(mktemp -d /tmp/idempotency-pg.XXXXXX)
	echo "$data" >"$dir/datadir"
	if ((EUID == 0)); then
		chown postgres: "$data"
	fi

	# Whatever goes wrong from here, leave no server behind.
	trap "stop '$dir'" EXIT

	# A port below the kernel's ephemeral range (32768 and up on Linux), so
	# that no outgoing connection takes it between this check and the bind.
	local port=$((23000 + RANDOM % 2000)) tries=0
	until port_free "$port"; do
		port=$((port + 1))
		if ((++tries > 500)); then
			log "no free port found"
			exit 1
		fi
	done

	as_pg "$bin/initdb" -D "$data/db" -U postgres -A trust -E UTF8 --no-sync >"$data/initdb.log" 2>&1 || {
		cat "$data/initdb.log" >&2
		exit 1
	}
	as_pg "$bin/pg_ctl" -D "$data/db" -l "$data/server.log" -w -t 60 \
		-o "-c listen_addresses=127.0.0.1 -p $port -c unix_socket_directories=''" start >&2 || {
		tail -n 20 "$data/server.log" >&2 || true
		exit 1
	}
	head -n 1 "$data/db/postmaster.pid" >"$dir/postgres.pid"
	as_pg "$bin/psql" -h 127.0.0.1 -p "$port" -U postgres -d postgres -w -Atqc 'CREATE DATABASE test' >&2

	trap - EXIT
	log "started on 127.0.0.1:$port, pid $(<"$dir/postgres.pid")"
	echo "postgres://postgres@127.0.0.1:$port/test?sslmode=disable"
}

stop() {
	local dir=$1 pid data
	if [[ -e $dir/postgres.pid ]]; then
		pid=$(<"$dir/postgres.pid")
		# Only a postgres process: a stale pid may have been reused. SIGINT is
		# the fast shutdown (clients are disconnected); SIGQUIT, if that did
		# not end it within 10 seconds, the immediate one.
		if [[ $(cat "/proc/$pid/comm" 2>/dev/null) == postgres* ]]; then
			kill -INT "$pid" 2>/dev/null || true
			for _ in $(seq 100); do
				kill -0 "$pid" 2>/dev/null || break
				sleep 0.1
			done
			kill -QUIT "$pid" 2>/dev/null || true
		fi
		rm -f "$dir/postgres.pid"
	fi
	if [[ -e $dir/datadir ]]; then
		data=$(<"$dir/datadir")
		case $data in
		/tmp/idempotency-pg.*) rm -rf "$data" ;;
		esac
		rm -f "$dir/datadir"
	fi
}

(($# == 2)) || usage
case $1 in
start) start "$2" ;;
stop) stop "$2" ;;
*) usage ;;
esac
