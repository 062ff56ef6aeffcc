#!/usr/bin/env bash
# A real single-node SLURM cluster on localhost for the tests (Debian 12, root, no systemd).
#
#   scripts/slurm_cluster.sh start    install what is missing, start munge, MariaDB, slurmdbd, slurmctld, slurmd
#   scripts/slurm_cluster.sh stop     cancel every job, wait for the queue to drain, stop the daemons
#   scripts/slurm_cluster.sh status   exit 0 when the node takes jobs
#
# Partitions: `debug` (default, PriorityTier=1) and `high` (PriorityTier=10); a job in `high` preempts `debug`
# jobs with REQUEUE, signalling them first so submitit can checkpoint. State, spool, logs and PID files live in
# $DNDETR_SLURM_DIR (default /tmp/dndetr-slurm); /etc/slurm/{slurm,slurmdbd}.conf are links into it so that the
# client commands (sbatch, squeue, sacct) find the cluster without SLURM_CONF.
set -euo pipefail

STATE=${DNDETR_SLURM_DIR:-/tmp/dndetr-slurm}
DB_PORT=${DNDETR_SLURM_DB_PORT:-3307}  # not 3306, so a system MariaDB cannot collide with ours
HOST=$(hostname -s)
PACKAGES=(munge libmunge2 slurmctld slurmd slurm-client slurm-wlm-basic-plugins
          slurmdbd slurm-wlm-mysql-plugin mariadb-server)

log() { echo "[slurm_cluster] $*" >&2; }
die() { log "error: $*"; exit 1; }

# wait_until SECONDS DESCRIPTION COMMAND...: poll COMMAND every 0.2 s
wait_until() {
    local timeout=$1 what=$2; shift 2
    local deadline=$((SECONDS + timeout))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || die "timed out after ${timeout}s waiting for $what (logs: $STATE/log)"
        sleep 0.2
    done
}

pid_alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

install_packages() {
    local missing=()
    for pkg in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
    done
    ((${#missing[@]} == 0)) && return
    [[ $(id -u) == 0 ]] || die "installing ${missing[*]} needs root"
    log "installing ${missing[*]}"
    # Keep the packages' init scripts from starting system-wide daemons: we run our own copies.
    local policy=/usr/sbin/policy-rc.d own_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && own_policy=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    if ((own_policy)); then rm -f "$policy"; fi
}

ensure_hostname_resolves() {
    getent hosts "$HOST" >/dev/null || echo "127.0.1.1 $HOST" >>/etc/hosts
}

start_munge() {
    install -d -o munge -g munge -m 0755 /run/munge
    [[ -s /etc/munge/munge.key ]] || runuser -u munge -- mungekey --create
    if ! pid_alive /run/munge/munged.pid; then
        runuser -u munge -- munged
        touch "$STATE/run/munged.ours"  # stop only a munged we started
    fi
    wait_until 10 munge bash -c 'munge -n | unmunge'
}

start_mariadb() {
    local db=$STATE/mysql
    install -d -o mysql -g mysql -m 0750 "$db"
    if [[ ! -d $db/data/mysql ]]; then
        mariadb-install-db --no-defaults --user=mysql --datadir="$db/data" --skip-test-db \
            --auth-root-authentication-method=socket >"$STATE/log/mariadb-install.log" 2>&1
    fi
    if ! pid_alive "$db/mysqld.pid"; then
        setsid mariadbd --no-defaults --user=mysql --datadir="$db/data" --socket="$db/mysqld.sock" \
            --pid-file="$db/mysqld.pid" --log-error="$STATE/log/mariadb.log" \
            --bind-address=127.0.0.1 --port="$DB_PORT" --skip-name-resolve </dev/null >/dev/null 2>&1 &
    fi
    wait_until 60 MariaDB mariadb-admin --socket="$db/mysqld.sock" ping
    mariadb --socket="$db/mysqld.sock" -u root -e "
        CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
}

write_configs() {
    # RealMemory above what slurmd detects marks the node INVALID: declare 95 % of it.
    local node mem
    node=$(slurmd -C | head -n1)
    mem=$(sed -E 's/.*RealMemory=([0-9]+).*/\1/' <<<"$node")
    node=$(sed -E "s/^NodeName=[^ ]+/NodeName=$HOST/; s/RealMemory=[0-9]+/RealMemory=$((mem * 95 / 100))/" <<<"$node")

    cat >"$STATE/etc/slurm.conf" <<EOF
ClusterName=dndetr
SlurmctldHost=$HOST
SlurmUser=root
AuthType=auth/munge
# A requeued job may restart only after the job credential expires (default 120 s).
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
# No cgroups on the test machine.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
KillWait=10
MailProg=/bin/true
MpiDefault=none
ReturnToService=2
# A requeued job becomes eligible again cred_expire seconds later; look for it every 2 s, not every 60 s.
SchedulerParameters=sched_interval=2,bf_interval=2
# submitit reads job states through sacct.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$HOST
JobCompType=jobcomp/none
# Preemption: without preempt_send_user_signal the victim only gets SIGTERM, which submitit ignores.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
$node State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES PriorityTier=1 GraceTime=20 MaxTime=INFINITE State=UP
PartitionName=high Nodes=$HOST PriorityTier=10 MaxTime=INFINITE State=UP
EOF
    cat >"$STATE/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=$HOST
SlurmUser=root
PidFile=$STATE/run/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
    chmod 0600 "$STATE/etc/slurmdbd.conf"

    mkdir -p /etc/slurm
    local name
    for name in slurm.conf slurmdbd.conf; do
        if [[ -e /etc/slurm/$name && ! -L /etc/slurm/$name ]]; then
            die "/etc/slurm/$name exists and is not ours; move it away to use this test cluster"
        fi
        ln -sfn "$STATE/etc/$name" "/etc/slurm/$name"
    done
}

node_takes_jobs() {
    sinfo -h -n "$HOST" -o %t 2>/dev/null | grep -Eq '^(idle|mix|alloc|comp)'
}

start_slurm() {
    pid_alive "$STATE/run/slurmdbd.pid" || slurmdbd
    wait_until 60 slurmdbd sacctmgr -n list cluster
    pid_alive "$STATE/run/slurmctld.pid" || slurmctld
    wait_until 60 slurmctld scontrol ping
    pid_alive "$STATE/run/slurmd.pid" || slurmd
    # A node left DOWN by an unclean stop needs a nudge.
    if sinfo -h -n "$HOST" -o %t 2>/dev/null | grep -Eq '^(down|drain|drng|fail)'; then
        scontrol update NodeName="$HOST" State=RESUME || true
    fi
    wait_until 60 "node $HOST to take jobs" node_takes_jobs
}

start() {
    if status >/dev/null 2>&1; then
        log "already running"
        return
    fi
    local began=$SECONDS
    install_packages
    mkdir -p "$STATE"/{etc,run,log,ctld,spool}
    chmod 0755 "$STATE"  # mysql must traverse it
    ensure_hostname_resolves
    write_configs
    start_munge
    start_mariadb
    start_slurm
    log "up in $((SECONDS - began)) s: $(sinfo -h -o '%P %c CPUs %m MB %t' | tr '\n' ';')"
}

# stop_pid PIDFILE NAME: TERM, wait up to 30 s, then KILL
stop_pid() {
    local pidfile=$1 name=$2
    pid_alive "$pidfile" || return 0
    local pid
    pid=$(cat "$pidfile")
    kill "$pid"
    local deadline=$((SECONDS + 30))
    while kill -0 "$pid" 2>/dev/null; do
        if ((SECONDS >= deadline)); then
            log "$name did not stop in 30 s; killing it"
            kill -9 "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.2
    done
}

queue_empty() { [[ -z $(squeue -h -o %i 2>/dev/null) ]]; }

stop() {
    local began=$SECONDS
    # Stopping slurmctld while a job is completing can hang slurmd's shutdown for minutes: drain first.
    if pid_alive "$STATE/run/slurmctld.pid"; then
        local jobs
        jobs=$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')
        [[ -z $jobs ]] || scancel $jobs || true
        wait_until 60 "the queue to drain" queue_empty
    fi
    stop_pid "$STATE/run/slurmd.pid" slurmd
    stop_pid "$STATE/run/slurmctld.pid" slurmctld
    stop_pid "$STATE/run/slurmdbd.pid" slurmdbd
    stop_pid "$STATE/mysql/mysqld.pid" mariadbd
    if [[ -f $STATE/run/munged.ours ]]; then
        stop_pid /run/munge/munged.pid munged
        rm -f "$STATE/run/munged.ours"
    fi
    log "stopped in $((SECONDS - began)) s"
}

status() {
    command -v sinfo >/dev/null || { echo "SLURM is not installed"; return 1; }
    scontrol ping >/dev/null 2>&1 || { echo "slurmctld is not responding"; return 1; }
    node_takes_jobs || { echo "node $HOST does not take jobs: $(sinfo -h -n "$HOST" -o %t)"; return 1; }
    sacctmgr -n list cluster >/dev/null 2>&1 || { echo "slurmdbd is not responding"; return 1; }
    sinfo
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
