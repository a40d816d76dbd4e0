#!/usr/bin/env bash
# Stop the one-node SLURM of slurm/local/start.sh: cancel its jobs, stop slurmd and slurmctld,
# and munged if start.sh started it. Idempotent; the state directory stays for inspection.
set -euo pipefail

DIR=${ZOPIPE_SLURM_DIR:-/tmp/zopipe-slurm}
say() { echo "[slurm-local] $*"; }

if [ "$(id -u)" -ne 0 ]; then
    echo "Error: slurm/local/stop.sh must run as root (it stops slurmctld and slurmd)" >&2
    exit 1
fi
if [ -f "$DIR/slurm.conf" ] && [ -s "$DIR/slurmctld.pid" ] \
        && kill -0 "$(cat "$DIR/slurmctld.pid")" 2>/dev/null; then
    SLURM_CONF=$DIR/slurm.conf scancel --full --quiet --user=root 2>/dev/null || true
fi
for daemon in slurmd slurmctld; do
    pidfile=$DIR/$daemon.pid
    if [ -s "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        pid=$(cat "$pidfile")
        say "stopping $daemon (pid $pid)"
        kill "$pid"
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    else
        say "$daemon not running"
    fi
    rm -f "$pidfile"
done
if [ -f "$DIR/munged.started" ]; then
    pid=$(cat /run/munge/munged.pid 2>/dev/null || true)
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        say "stopping munged (pid $pid)"
        kill "$pid"
    fi
    rm -f "$DIR/munged.started"
fi
if [ "$(readlink /etc/slurm/slurm.conf 2>/dev/null)" = "$DIR/slurm.conf" ]; then
    rm -f /etc/slurm/slurm.conf
    say "removed the /etc/slurm/slurm.conf link"
fi
