#!/usr/bin/env bash
# Start a loopback-only, single-node Slurm (munged, slurmctld, slurmd) for tests.
# Idempotent: reuses a Slurm already running with our config. Prints the
# `export SLURM_CONF=...` line clients need (also written to $EXPFLOW_SLURM_DIR/env).
# When Slurm cannot be installed or started it prints one line starting with
# "SKIP:" and exits 0, so tests can skip with that reason.
set -euo pipefail

DIR="${EXPFLOW_SLURM_DIR:-/tmp/expflow-slurm}"
CONF="$DIR/slurm.conf"

skip() { echo "SKIP: $*"; exit 0; }

need_install=0
for b in slurmctld slurmd sinfo munged; do
  command -v "$b" >/dev/null 2>&1 || need_install=1
done
if [ "$need_install" = 1 ]; then
  [ "$(id -u)" = 0 ] || skip "Slurm is not installed and this is not root (cannot apt-get install)"
  command -v apt-get >/dev/null 2>&1 || skip "Slurm is not installed and there is no apt-get"
  if ! { apt-get update -qq >/dev/null 2>&1 &&
         DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
           slurmctld slurmd slurm-client munge >/dev/null 2>&1; }; then
    skip "apt-get install of slurmctld slurmd slurm-client munge failed"
  fi
fi
[ "$(id -u)" = 0 ] || skip "starting slurmctld/slurmd here needs root (SlurmUser=root)"

mkdir -p "$DIR"/{state,spool,log}
export SLURM_CONF="$CONF"
echo "export SLURM_CONF=$CONF" > "$DIR/env"

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# Reuse a Slurm from an earlier run with our config.
if alive "$DIR/slurmctld.pid" && alive "$DIR/slurmd.pid" &&
   sinfo -h -N -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
  echo "export SLURM_CONF=$CONF"
  exit 0
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
AccountingStorageType=accounting_storage/none
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
for d in slurmd slurmctld; do
  if alive "$DIR/$d.pid"; then kill "$(cat "$DIR/$d.pid")" 2>/dev/null || true; sleep 1; fi
done
for port in 6817 6818; do
  if command -v ss >/dev/null && ss -ltn "sport = :$port" 2>/dev/null | grep -q LISTEN; then
    skip "port $port is in use by another program; Slurm needs 6817-6818 free"
  fi
done

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
