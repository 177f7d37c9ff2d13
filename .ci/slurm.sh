#!/usr/bin/env bash
# A single-node Slurm on localhost for the cluster tests (tests/test_cluster.py), from Debian's
# packages, as root, without systemd or cgroups.
#
#   .ci/slurm.sh start [--no-accounting] [--cpus N]   install what is missing, start, wait idle
#   .ci/slurm.sh stop                                  stop only the daemons `start` started
#   .ci/slurm.sh env                                   the variables clients need (eval it)
#
# Everything lives under $TRAITSAE_SLURM_DIR (default /tmp/traitsae-slurm): slurm.conf, spool,
# logs, the MariaDB data dir and one pid file per daemon started. `stop` cancels the jobs, then
# kills those pids (slurmd, slurmctld, slurmdbd, mariadbd, munged) and nothing else.
# With accounting (the default) slurmdbd + MariaDB make `sacct` work; --no-accounting runs
# without them, as many small clusters do (submitit then cannot ask sacct how a job ended).
# --cpus N declares N CPUs on the node (default: the real count); more than the real cores lets
# the test jobs, which mostly wait on imports and polls, run side by side.
set -euo pipefail

DIR=${TRAITSAE_SLURM_DIR:-/tmp/traitsae-slurm}
CONF=$DIR/slurm.conf
PIDS=$DIR/pids
CLUSTER=traitsae
# The default MariaDB socket: slurmdbd 22.05 reaches the database through it.
MYSQL_RUN=/run/mysqld

log() { echo "slurm.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

install_packages() {
    local want=(slurmctld slurmd slurm-client munge)
    [[ $accounting == yes ]] && want+=(slurmdbd mariadb-server)
    local missing=()
    for pkg in "${want[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
    done
    [[ ${#missing[@]} -eq 0 ]] && return
    log "installing ${missing[*]} (apt-get)"
    local apt_log=$DIR/log/apt.log
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >"$apt_log" 2>&1; then
        cat "$apt_log" >&2
        die "apt-get install failed (log above)"
    fi
}

# Start "$@" in the background, detached from this shell, its pid recorded as $PIDS/<name>.pid.
spawn() {
    local name=$1
    shift
    setsid "$@" >"$DIR/log/$name.out" 2>&1 </dev/null &
    echo $! >"$PIDS/$name.pid"
}

alive() { [[ -f $PIDS/$1.pid ]] && kill -0 "$(cat "$PIDS/$1.pid")" 2>/dev/null; }

# Wait up to $2 seconds for the command "${@:3}" to succeed; daemon $1 must stay alive meanwhile.
wait_for() {
    local name=$1 seconds=$2
    shift 2
    for _ in $(seq $((seconds * 5))); do
        "$@" >/dev/null 2>&1 && return 0
        alive "$name" || { tail -20 "$DIR/log/$name".* >&2; die "$name exited (its log above)"; }
        sleep 0.2
    done
    tail -20 "$DIR/log/$name".* >&2
    die "$name did not come up within ${seconds}s (its log above)"
}

write_slurm_conf() {
    local host node real_mem mem
    host=$(hostname -s)
    getent hosts "$host" >/dev/null || die "the short hostname $host does not resolve (add it to /etc/hosts): Slurm and DDP connect to it"
    node=$(slurmd -C | head -1)
    real_mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node")
    mem=$((real_mem * 9 / 10))                      # a little under the machine's
    cpus=${cpus:-$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$node")}
    cat >"$CONF" <<EOF
# Written by .ci/slurm.sh: one node on localhost, no systemd, no cgroups.
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
# Credentials expire after 10 s instead of 120: a requeued job may start again that soon.
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# The node line may declare more CPUs than slurmd finds (--cpus).
SlurmdParameters=config_overrides
ReturnToService=2
MailProg=/bin/true
KillWait=5
MinJobAge=600
StateSaveLocation=$DIR/spool/ctld
SlurmdSpoolDir=$DIR/spool/d
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
# Without it a job that asks no memory takes all of it and blocks the others.
DefMemPerCPU=$((mem / cpus))
EOF
    if [[ $accounting == yes ]]; then
        cat >>"$CONF" <<EOF
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/none
EOF
        # slurmdbd refuses a config that others can read.
        install -m 600 /dev/stdin "$DIR/slurmdbd.conf" <<EOF
DbdHost=localhost
SlurmUser=root
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=slurm_acct_db
EOF
    fi
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        log "munged is already running (not started here, so not stopped here)"
        return
    fi
    [[ -f /etc/munge/munge.key ]] || mungekey --create
    install -d -o munge -g munge -m 755 /run/munge
    spawn munged setpriv --reuid=munge --regid=munge --clear-groups /usr/sbin/munged -F
    wait_for munged 20 sh -c 'munge -n | unmunge'
}

start_mariadb() {
    local data=$DIR/mysql
    # Every folder above the data dir must be traversable by mysql.
    chmod 755 "$DIR"
    install -d -o mysql -g mysql -m 755 "$MYSQL_RUN" "$data"
    [[ -S $MYSQL_RUN/mysqld.sock ]] && die "a MariaDB already listens on $MYSQL_RUN/mysqld.sock; stop it first"
    if [[ ! -d $data/mysql ]]; then
        mariadb-install-db --user=mysql --datadir="$data" --skip-test-db >"$DIR/log/mariadb-install.log" 2>&1 ||
            { cat "$DIR/log/mariadb-install.log" >&2; die "mariadb-install-db failed"; }
    fi
    spawn mariadbd /usr/sbin/mariadbd --user=mysql --datadir="$data" --skip-networking \
        --socket="$MYSQL_RUN/mysqld.sock" --pid-file="$MYSQL_RUN/traitsae.pid" \
        --log-error="$DIR/log/mariadbd.log"
    wait_for mariadbd 60 mariadb -e 'select 1'
    spawn slurmdbd /usr/sbin/slurmdbd -D   # reads slurmdbd.conf next to $SLURM_CONF
    wait_for slurmdbd 60 sacctmgr -n list cluster
    sacctmgr -n list cluster format=cluster | grep -qw $CLUSTER || sacctmgr -i add cluster $CLUSTER >/dev/null
}

start() {
    accounting=yes
    cpus=
    while [[ $# -gt 0 ]]; do
        case $1 in
        --no-accounting) accounting=no ;;
        --cpus) cpus=$2; shift ;;
        *) die "unknown option $1 (start [--no-accounting] [--cpus N])" ;;
        esac
        shift
    done
    [[ $(id -u) == 0 ]] || die "run as root (installs packages, starts daemons)"
    if [[ -d $PIDS ]] && compgen -G "$PIDS/*.pid" >/dev/null; then
        die "$DIR holds pids of a running Slurm: run '$0 stop' first"
    fi
    rm -rf "$DIR/spool" "$DIR/log" "$DIR/run"
    mkdir -p "$DIR/spool/ctld" "$DIR/spool/d" "$DIR/log" "$DIR/run" "$PIDS"
    install_packages
    write_slurm_conf
    export SLURM_CONF=$CONF
    start_munge
    [[ $accounting == yes ]] && start_mariadb
    spawn slurmctld /usr/sbin/slurmctld -D -i -f "$CONF"
    wait_for slurmctld 30 scontrol ping
    spawn slurmd /usr/sbin/slurmd -D -f "$CONF"
    wait_for slurmd 30 sh -c "sinfo -h -N -o %T | grep -qx idle"
    [[ $accounting == yes ]] && wait_for slurmctld 30 sacct -n -X
    echo "$accounting" >"$DIR/accounting"
    log "up: $(sinfo -h -N -o '%N %T %c CPUs %m MB'), accounting: $accounting"
    log "clients need: export SLURM_CONF=$CONF"
}

stop() {
    export SLURM_CONF=$CONF
    [[ -d $PIDS ]] || { log "nothing started here ($PIDS missing)"; return 0; }
    if alive slurmctld; then
        scancel --full --user="$(id -un)" 2>/dev/null || true
    fi
    local name pid
    for name in slurmd slurmctld slurmdbd mariadbd munged; do
        [[ -f $PIDS/$name.pid ]] || continue
        pid=$(cat "$PIDS/$name.pid")
        if kill -0 "$pid" 2>/dev/null; then
            kill "$pid"
            for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
            log "stopped $name (pid $pid)"
        fi
        rm -f "$PIDS/$name.pid"
    done
}

case ${1:-} in
start) shift; start "$@" ;;
stop) stop ;;
env) echo "export SLURM_CONF=$CONF" ;;
*) die "usage: $0 start [--no-accounting] [--cpus N] | stop | env" ;;
esac
