#!/usr/bin/env bash
# Stop the test Slurm started by slurm-up.sh: slurmd, slurmctld, slurmdbd, and munged only if
# slurm-up.sh started it. By pid; SIGKILL after a few seconds.
set -euo pipefail

DIR="${EXPFLOW_SLURM_DIR:-/tmp/expflow-slurm}"

stop() {  # stop PID
  local pid=$1
  kill -0 "$pid" 2>/dev/null || return 0
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
}

for d in slurmd slurmctld slurmdbd; do
  if [ -f "$DIR/$d.pid" ]; then
    stop "$(cat "$DIR/$d.pid")"
    rm -f "$DIR/$d.pid"
  fi
done
if [ -f "$DIR/munged.ours" ]; then
  for f in /run/munge/munged.pid /var/run/munge/munged.pid; do
    if [ -f "$f" ]; then stop "$(cat "$f")"; break; fi
  done
  rm -f "$DIR/munged.ours"
fi
echo "slurm stopped"
