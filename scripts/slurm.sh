#!/usr/bin/env bash
# A single-node Slurm cluster for bd3's tests (and for trying `bd3 launch slurm` by hand), run by
# hand without systemd or cgroups:
#
#   scripts/slurm.sh install      Debian's slurm-wlm and munge, when missing (about 20 s, once)
#   scripts/slurm.sh start DIR    install, write a config into DIR, start munged, slurmctld and
#                                 slurmd, wait until the node is idle; prints `SLURM_CONF=…`,
#                                 which Slurm's commands (sbatch, srun, scancel, …) need
#   scripts/slurm.sh stop DIR     cancel every job, wait for them to end, stop the daemons by PID
#
# Starting a cluster that runs already, or stopping one that does not, does nothing. The daemons
# and their state, logs and sockets live only in DIR; ports are a free pair drawn at random from
# 20000-29999 (not Slurm's 6817/6818), so that clusters started at the same moment by concurrent
# test runs, or a real Slurm on this machine, do not meet.
# The scheduler runs every 2 s and job credentials expire after 10 s (Slurm's default is 120 s,
# and a requeued job waits that long before it may start again), so a requeue reruns in seconds.
set -euo pipefail

log() { printf '[slurm] %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

PACKAGES=(slurm-wlm munge)

install() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    ((${#missing[@]})) || return 0
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo=sudo
    log "installing Debian packages: ${missing[*]}"
    # Another apt or dpkg (scripts/setup.sh, say) may hold the lock: wait for it instead of failing.
    local wait_lock=(-o DPkg::Lock::Timeout=600)
    if ! apt-cache policy slurm-wlm 2>/dev/null | grep -q 'Candidate: [0-9]'; then
        $sudo apt-get "${wait_lock[@]}" update -qq
    fi
    DEBIAN_FRONTEND=noninteractive $sudo apt-get "${wait_lock[@]}" install -y -qq --no-install-recommends \
        "${missing[@]}" >&2
}

# The PID in a daemon's PID file when that process still runs.
running_pid() {
    local pid
    pid=$(cat "$1" 2>/dev/null) || return 1
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

# TCP ports something listens on, in decimal.
listening_ports() {
    awk 'NR > 1 && $4 == "0A" { split($2, a, ":"); print a[2] }' /proc/net/tcp /proc/net/tcp6 2>/dev/null |
        while read -r hex; do echo $((16#$hex)); done
}

write_config() {
    local dir=$1 host=$2
    local busy port=$((20000 + 2 * (RANDOM % 5000)))
    busy=$(listening_ports)
    while grep -qx -e "$port" -e "$((port + 1))" <<<"$busy"; do port=$((20000 + 2 * (RANDOM % 5000))); done
    cat >"$dir/slurm.conf" <<EOF
# Written by scripts/slurm.sh: a single-node cluster whose state lives in $dir.
ClusterName=bd3
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge-run/munge.socket,cred_expire=10
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
# No cgroups here: processes are tracked through their parents, and tasks are not bound to cores.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=sched_interval=2,bf_interval=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
ReturnToService=2
JobRequeue=1
KillWait=5
# The node declares 4 CPUs whatever the machine has, so two 2-task jobs fit on a 2-core machine.
SlurmdParameters=config_overrides
NodeName=$host NodeAddr=127.0.0.1 CPUs=4 RealMemory=2048 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

node_state() {
    SLURM_CONF=$1/slurm.conf scontrol show node "$2" 2>/dev/null | sed -n 's/.*State=\([A-Z+_]*\).*/\1/p' | head -1
}

start() {
    local dir=$1 host
    host=$(hostname -s)
    install
    mkdir -p "$dir"/{munge,munge-run,state,spool,run,log}
    # munged refuses a key in a directory others can read, and a socket in a directory others
    # cannot enter.
    chmod 0700 "$dir/munge"
    chmod 0755 "$dir/munge-run"
    if ! running_pid "$dir/munge-run/munged.pid" >/dev/null; then
        [ -f "$dir/munge/munge.key" ] || mungekey -c -k "$dir/munge/munge.key"
        munged --socket="$dir/munge-run/munge.socket" --key-file="$dir/munge/munge.key" \
            --pid-file="$dir/munge-run/munged.pid" --seed-file="$dir/munge/seed" \
            --log-file="$dir/log/munged.log"
        munge -S "$dir/munge-run/munge.socket" -n | unmunge -S "$dir/munge-run/munge.socket" >/dev/null ||
            die "munged does not answer; see $dir/log/munged.log"
    fi
    [ -f "$dir/slurm.conf" ] || write_config "$dir" "$host"
    export SLURM_CONF=$dir/slurm.conf
    running_pid "$dir/run/slurmctld.pid" >/dev/null || slurmctld -f "$SLURM_CONF"
    running_pid "$dir/run/slurmd.pid" >/dev/null || slurmd -f "$SLURM_CONF"
    local state="" i
    for i in $(seq 1 300); do
        state=$(node_state "$dir" "$host")
        [ "$state" = IDLE ] || [ "$state" = MIXED ] || [ "$state" = ALLOCATED ] && break
        sleep 0.1
    done
    if [ "$state" != IDLE ] && [ "$state" != MIXED ] && [ "$state" != ALLOCATED ]; then
        tail -n 20 "$dir/log/slurmctld.log" "$dir/log/slurmd.log" >&2 || true
        die "node $host is ${state:-unknown} after 30 s, not idle; logs in $dir/log"
    fi
    log "node $host is up ($state); logs in $dir/log"
    echo "SLURM_CONF=$SLURM_CONF"
}

# Sends SIGTERM to the process in PID file $1 and waits for it to end (SIGKILL after 15 s).
stop_daemon() {
    local pid i
    pid=$(running_pid "$1") || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    for i in $(seq 1 150); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    log "process $pid ($1) ignored SIGTERM for 15 s: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
}

stop() {
    local dir=$1 i jobs
    [ -f "$dir/slurm.conf" ] || return 0
    export SLURM_CONF=$dir/slurm.conf
    # Jobs first: under proctrack/linuxproc their slurmstepd and tasks outlive slurmd.
    if running_pid "$dir/run/slurmctld.pid" >/dev/null; then
        jobs=$(squeue -h -o %A 2>/dev/null || true)
        if [ -n "$jobs" ]; then
            # shellcheck disable=SC2086 # one argument per job id
            scancel $jobs 2>/dev/null || true
            for i in $(seq 1 300); do
                [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break
                sleep 0.1
            done
        fi
    fi
    stop_daemon "$dir/run/slurmd.pid"
    stop_daemon "$dir/run/slurmctld.pid"
    stop_daemon "$dir/munge-run/munged.pid"
    log "stopped the cluster in $dir"
}

case "${1:-}" in
install) install ;;
start)
    [ $# -eq 2 ] || die "usage: $0 start DIR"
    start "$(realpath -m "$2")"
    ;;
stop)
    [ $# -eq 2 ] || die "usage: $0 stop DIR"
    stop "$(realpath -m "$2")"
    ;;
*) die "usage: $0 install | start DIR | stop DIR" ;;
esac
