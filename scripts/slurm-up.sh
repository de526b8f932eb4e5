#!/usr/bin/env bash
# Start a loopback-only, single-node Slurm (munged, slurmctld, slurmd) for tests,
# with accounting (slurmdbd on the local MariaDB, so `sacct` works) when a MariaDB
# answers on loopback as root; without one, accounting stays off.
# Idempotent: reuses a Slurm already running with our config. Prints the
# `export SLURM_CONF=...` line clients need (also written to $EXPFLOW_SLURM_DIR/env).
# When Slurm cannot be installed or started it prints one line starting with
# "SKIP:" and exits 0, so tests can skip with that reason.
set -euo pipefail

DIR="${EXPFLOW_SLURM_DIR:-/tmp/expflow-slurm}"
CONF="$DIR/slurm.conf"

skip() { echo "SKIP: $*"; exit 0; }

need_install=0
for b in slurmctld slurmd sinfo munged slurmdbd; do
  command -v "$b" >/dev/null 2>&1 || need_install=1
done
if [ "$need_install" = 1 ]; then
  [ "$(id -u)" = 0 ] || skip "Slurm is not installed and this is not root (cannot apt-get install)"
  command -v apt-get >/dev/null 2>&1 || skip "Slurm is not installed and there is no apt-get"
  if ! { apt-get update -qq >/dev/null 2>&1 &&
         DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
           slurmctld slurmd slurm-client munge slurmdbd >/dev/null 2>&1; }; then
    skip "apt-get install of slurmctld slurmd slurm-client munge slurmdbd failed"
  fi
fi
[ "$(id -u)" = 0 ] || skip "starting slurmctld/slurmd here needs root (SlurmUser=root)"

mkdir -p "$DIR"/{state,spool,log}
export SLURM_CONF="$CONF"
echo "export SLURM_CONF=$CONF" > "$DIR/env"

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# Reuse a Slurm from an earlier run with our config.
if alive "$DIR/slurmctld.pid" && alive "$DIR/slurmd.pid" &&
   { [ ! -f "$DIR/accounting" ] || alive "$DIR/slurmdbd.pid"; } &&
   sinfo -h -N -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
  echo "export SLURM_CONF=$CONF"
  exit 0
fi

# Accounting: slurmdbd on the local MariaDB (root, empty password, on loopback).
acct="AccountingStorageType=accounting_storage/none"
rm -f "$DIR/accounting"
sql() { mariadb -uroot -h127.0.0.1 --connect-timeout=3 -e "$1" >/dev/null 2>&1; }
if command -v slurmdbd >/dev/null && command -v mariadb >/dev/null && sql "SELECT 1"; then
  dbpass="expflow-$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')"
  sql "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
       CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$dbpass';
       ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$dbpass';
       GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';" && {
    umask 077
    cat > "$DIR/slurmdbd.conf" <<DBDEOF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
PidFile=$DIR/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=3306
StorageUser=slurm
StoragePass=$dbpass
StorageLoc=slurm_acct_db
DBDEOF
    umask 022
    acct="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819"
    touch "$DIR/accounting"
  }
fi

mem_mb=$(awk '/MemTotal/ {printf "%d", $2/1024*0.9}' /proc/meminfo)
cat > "$CONF" <<CONFEOF
ClusterName=expflow
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=kill_invalid_depend
ReturnToService=2
KillWait=5
MailProg=/bin/true
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
$acct
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONFEOF

# munge: a key, then the daemon as the munge user.
if [ ! -s /etc/munge/munge.key ]; then
  mkdir -p /etc/munge
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
mkdir -p /run/munge /var/lib/munge /var/log/munge
chown munge:munge /run/munge /var/lib/munge /var/log/munge
if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
  if command -v runuser >/dev/null; then
    runuser -u munge -- munged --force
  else
    su -s /bin/sh munge -c "munged --force"
  fi
  echo started > "$DIR/munged.ours"
  for _ in $(seq 50); do munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
fi

# Stale daemons of ours (one alive, the other dead): stop them before starting again.
for d in slurmd slurmctld slurmdbd; do
  if alive "$DIR/$d.pid"; then kill "$(cat "$DIR/$d.pid")" 2>/dev/null || true; sleep 1; fi
done
for port in 6817 6818 6819; do
  if command -v ss >/dev/null && ss -ltn "sport = :$port" 2>/dev/null | grep -q LISTEN; then
    skip "port $port is in use by another program; Slurm needs 6817-6819 free"
  fi
done

if [ -f "$DIR/accounting" ]; then
  slurmdbd || skip "slurmdbd failed to start (see $DIR/log/slurmdbd.log)"
  for _ in $(seq 100); do
    ss -ltn "sport = :6819" 2>/dev/null | grep -q LISTEN && break
    sleep 0.1
  done
  sacctmgr -i add cluster expflow >/dev/null 2>&1 || true
fi
slurmctld -f "$CONF" || skip "slurmctld failed to start (see $DIR/log/slurmctld.log)"
slurmd -f "$CONF" -N localhost || skip "slurmd failed to start (see $DIR/log/slurmd.log)"

deadline=$((SECONDS + 30))
until sinfo -h -N -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; do
  if [ "$SECONDS" -ge "$deadline" ]; then
    skip "node did not become idle within 30 s (see $DIR/log)"
  fi
  sleep 0.3
done
echo "export SLURM_CONF=$CONF"
