#!/usr/bin/env bash
# A one-node SLURM on this machine, for trying the templates and for the tests (run as root).
#
#   sudo slurm/local/start.sh          # install (Debian/Ubuntu apt) if missing, then start
#   export SLURM_CONF=/tmp/zopipe-slurm/slurm.conf   # if /etc/slurm/slurm.conf is not ours
#   sbatch ... ; squeue ; slurm/local/stop.sh
#
# Idempotent: a running cluster with this configuration is left alone. Everything it writes
# (config, state, spool, logs, pid files) lives under $ZOPIPE_SLURM_DIR (default
# /tmp/zopipe-slurm); the daemons listen on non-default ports so they do not meet a site SLURM.
set -euo pipefail

DIR=${ZOPIPE_SLURM_DIR:-/tmp/zopipe-slurm}
CTLD_PORT=${ZOPIPE_SLURMCTLD_PORT:-16817}
SLURMD_PORT=${ZOPIPE_SLURMD_PORT:-16818}
CONF=$DIR/slurm.conf
say() { echo "[slurm-local] $*"; }

if [ "$(id -u)" -ne 0 ]; then
    echo "Error: slurm/local/start.sh must run as root (it installs packages and starts" \
         "munged, slurmctld and slurmd); run it with sudo or in a root container" >&2
    exit 1
fi

missing=()
for cmd in munged slurmctld slurmd sbatch; do
    command -v "$cmd" >/dev/null || missing+=("$cmd")
done
if [ ${#missing[@]} -gt 0 ]; then
    if ! command -v apt-get >/dev/null; then
        echo "Error: ${missing[*]} not installed and apt-get is unavailable; install SLURM" \
             "(slurmctld, slurmd, slurm-client) and munge with your package manager" >&2
        exit 1
    fi
    say "installing slurmctld slurmd slurm-client munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q slurmctld slurmd slurm-client munge >/dev/null 2>&1 || {
        apt-get update -q >/dev/null && apt-get install -y -q slurmctld slurmd slurm-client munge
    }
fi

# munge: one key, one daemon (SLURM authenticates every RPC through it).
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    if [ ! -s /etc/munge/munge.key ]; then
        say "creating /etc/munge/munge.key"
        mkdir -p /etc/munge
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
    fi
    chown munge:munge /etc/munge/munge.key 2>/dev/null || true
    chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
    say "starting munged"
    if id munge >/dev/null 2>&1; then
        runuser -u munge -- munged
    else
        munged --force
    fi
    mkdir -p "$DIR" && touch "$DIR/munged.started"  # stop.sh stops only a munged we started
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
    munge -n | unmunge >/dev/null || { echo "Error: munged did not start" >&2; exit 1; }
else
    say "munged already running"
fi

node=$(hostname -s)
cpus=$(nproc --all)
mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
new_conf=$(cat <<CONF
# Written by slurm/local/start.sh: one node, this machine.
ClusterName=zopipe-local
SlurmctldHost=$node
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job may start again cred_expire+1 s after its requeue (default 121 s): short here.
AuthInfo=cred_expire=5
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
MpiDefault=none
ReturnToService=2
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=600
KillWait=10
NodeName=$node CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
CONF
)
running() { [ -s "$DIR/$1.pid" ] && kill -0 "$(cat "$DIR/$1.pid")" 2>/dev/null; }
if [ -f "$CONF" ] && [ "$(cat "$CONF")" != "$new_conf" ] && { running slurmctld || running slurmd; }; then
    say "configuration changed: restarting"
    "$(dirname "$0")/stop.sh"
fi
printf '%s\n' "$new_conf" > "$CONF"
export SLURM_CONF=$CONF

# Plain `sbatch` reads /etc/slurm/slurm.conf: point it at ours unless a site config is there.
if [ ! -e /etc/slurm/slurm.conf ] || [ "$(readlink /etc/slurm/slurm.conf)" = "$CONF" ]; then
    mkdir -p /etc/slurm
    ln -sfn "$CONF" /etc/slurm/slurm.conf
    linked=1
else
    linked=0
fi

if running slurmctld; then
    say "slurmctld already running (pid $(cat "$DIR/slurmctld.pid"))"
else
    say "starting slurmctld on $node:$CTLD_PORT (state in $DIR)"
    slurmctld -f "$CONF"
fi
if running slurmd; then
    say "slurmd already running (pid $(cat "$DIR/slurmd.pid"))"
else
    say "starting slurmd for node $node ($cpus CPUs)"
    slurmd -f "$CONF"
fi

for _ in $(seq 100); do
    state=$(sinfo -h -n "$node" -o %T 2>/dev/null || true)
    case $state in idle*|mixed*|allocated*) break ;; esac
    sleep 0.2
done
case $state in
    idle*|mixed*|allocated*) ;;
    *) echo "Error: node $node is '${state:-unreachable}', not idle; see $DIR/log/" >&2; exit 1 ;;
esac
say "ready: node $node ($cpus CPUs, partition debug) is $state"
if [ "$linked" = 1 ]; then
    say "/etc/slurm/slurm.conf -> $CONF"
else
    say "/etc/slurm/slurm.conf belongs to another SLURM: export SLURM_CONF=$CONF"
fi
