#!/usr/bin/env bash
# A real one-node Slurm cluster on localhost, everything in one scratch directory: for trying the sbatch
# templates without a cluster, and for tests/launch/test_slurm.py. Needs root and Debian's packages:
#   apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge
#
#   slurm/local_cluster.sh start DIR     # munged + slurmctld + slurmd, ready in about 10 s
#   export SLURM_CONF=DIR/slurm.conf     # sbatch, srun, squeue, sinfo now talk to it
#   python launch/submit.py --tasks-per-node 2 --wait model=tiny_llama ...
#   slurm/local_cluster.sh stop DIR      # stops the three daemons (by their pid files in DIR)
#
# The node claims LOCAL_SLURM_CPUS CPUs (default 8) whatever the machine has (SlurmdParameters=
# config_overrides), so a 2-core machine can run 8 one-CPU tasks. Process tracking is linuxproc and there is
# no task plugin: the cgroup plugins need a cgroup.conf and a writable cgroup tree that containers rarely
# give. munged runs as root with its own key and socket in DIR, so it never meets a system munged; the
# daemons listen on free ports, so two such clusters can run side by side.
set -euo pipefail
export PATH=$PATH:/usr/sbin:/sbin  # the daemons live in sbin, which a non-login shell may not search

usage() { echo "usage: $0 start|stop|status DIR" >&2; exit 2; }
[[ $# -eq 2 ]] || usage
action=$1
dir=$(mkdir -p "$2" && cd "$2" && pwd)
conf=$dir/slurm.conf
export SLURM_CONF=$conf

# wait_for SECONDS WHAT COMMAND...: retry COMMAND every 0.5 s; fail naming WHAT and the logs to read.
wait_for() {
    local limit=$1 what=$2; shift 2
    local deadline=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            echo "error: $what did not happen within ${limit}s; logs in $dir/log/" >&2
            tail -n 20 "$dir"/log/*.log >&2 || true
            exit 1
        fi
        sleep 0.5
    done
}

free_port() { "${PYTHON:-python3}" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'; }

stop_daemon() {  # stop_daemon NAME: SIGTERM the pid in DIR/NAME.pid, wait up to 15 s, then SIGKILL
    local pidfile=$dir/$1.pid pid
    [[ -s $pidfile ]] || return 0
    pid=$(cat "$pidfile")
    if kill "$pid" 2>/dev/null; then
        for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
}

node_idle() { sinfo -h -n localhost -o %t | grep -qx idle; }

start() {
    [[ $(id -u) -eq 0 ]] || { echo "error: the local cluster's daemons run as root; run as root" >&2; exit 1; }
    local cmd
    for cmd in munged mungekey slurmctld slurmd scontrol sinfo sbatch; do
        command -v "$cmd" >/dev/null || {
            echo "error: $cmd not found; install: apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge" >&2
            exit 1
        }
    done
    [[ -s $dir/slurmctld.pid ]] && kill -0 "$(cat "$dir/slurmctld.pid")" 2>/dev/null && {
        echo "error: a cluster is already running in $dir (stop it first: $0 stop $dir)" >&2; exit 1; }
    mkdir -p "$dir/state" "$dir/spool" "$dir/log"
    chmod 755 "$dir"

    [[ -s $dir/munge.key ]] || mungekey -c -k "$dir/munge.key"
    # --force: DIR may lie below a directory only root can enter (pytest's tmp), which munged otherwise
    # refuses for its socket; only root uses this cluster.
    munged --force --socket="$dir/munge.sock" --key-file="$dir/munge.key" --pid-file="$dir/munged.pid" \
        --log-file="$dir/log/munged.log" --seed-file="$dir/munged.seed"

    cat > "$conf" <<EOF
# Written by slurm/local_cluster.sh: a one-node cluster on localhost.
ClusterName=local
SlurmctldHost=localhost
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge.sock
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
SlurmdParameters=config_overrides
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
KillWait=5
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
NodeName=localhost NodeAddr=127.0.0.1 CPUs=${LOCAL_SLURM_CPUS:-8} RealMemory=8000 State=UNKNOWN
PartitionName=local Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF

    slurmctld -f "$conf"
    wait_for 30 "slurmctld answering 'scontrol ping'" bash -c 'scontrol ping | grep -q UP'
    slurmd -f "$conf" -N localhost
    wait_for 30 "node localhost idle in sinfo" node_idle
    echo "Slurm is up. Use it with: export SLURM_CONF=$conf"
}

case $action in
    start) start ;;
    stop) for d in slurmd slurmctld munged; do stop_daemon "$d"; done ;;
    status) scontrol ping && sinfo ;;
    *) usage ;;
esac
