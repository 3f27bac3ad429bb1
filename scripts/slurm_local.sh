#!/usr/bin/env bash
# A one-node SLURM cluster with accounting on this machine, to try the cluster paths on a workstation and
# to test them in CI. Debian's slurm-wlm, no systemd: every daemon is started by hand. Needs root.
#   sudo scripts/slurm_local.sh start    # install (apt) what is missing, write the configs, start the daemons
#   sudo scripts/slurm_local.sh stop     # stop the daemons (configs and packages stay)
#   scripts/slurm_local.sh status        # sinfo
# Partition `cpu` (default) holds the whole node: all its cores, its memory less 1 GB.
set -euo pipefail

CLUSTER=${SLURM_CLUSTER:-digits}
NODE=$(hostname -s)
PIDS=/run/slurm-local
PACKAGES=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server)

install_packages() {
  local missing=()
  for p in "${PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if ((${#missing[@]})); then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

write_configs() {
  local cpus mem_mb
  cpus=$(nproc)
  mem_mb=$(($(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) - 1024))
  mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm "$PIDS"
  cat >/etc/slurm/slurm.conf <<EOF
ClusterName=$CLUSTER
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# a requeued job's credential expires in 10 s, not 2 min, so it restarts at once
AuthInfo=cred_expire=10
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$PIDS/slurmctld.pid
SlurmdPidFile=$PIDS/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
# no cgroups without systemd: track processes by parent id, bind no tasks
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=task=2
JobAcctGatherParams=OverMemoryKill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# without it a job takes the node's whole memory and every other job waits
DefMemPerCPU=1024
# a request no partition can ever satisfy fails at sbatch instead of waiting forever
EnforcePartLimits=ALL
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
ReturnToService=2
KillWait=5
MinJobAge=60
InactiveLimit=0
NodeName=$NODE CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=cpu Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
  cat >/etc/slurm/slurmdbd.conf <<EOF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
PidFile=$PIDS/slurmdbd.pid
LogFile=/var/log/slurm/slurmdbd.log
EOF
  chmod 600 /etc/slurm/slurmdbd.conf
}

wait_for() {  # wait_for <seconds> <command...>: until the command succeeds
  local deadline=$((SECONDS + $1))
  shift
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || { echo "slurm_local: timed out waiting for: $*" >&2; return 1; }
    sleep 0.5
  done
}

start() {
  [ "$(id -u)" = 0 ] || { echo "slurm_local: start needs root" >&2; exit 1; }
  if sinfo -h -o %T 2>/dev/null | grep -qx idle; then echo "slurm_local: already running"; return; fi
  install_packages
  write_configs
  mkdir -p /run/munge && chown munge:munge /run/munge
  pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged
  service mariadb start >/dev/null
  mysql -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
            GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
  pgrep -x slurmdbd >/dev/null || /usr/sbin/slurmdbd
  wait_for 60 sacctmgr -n list cluster
  sacctmgr -n list cluster format=cluster | grep -qw "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null
  pgrep -x slurmctld >/dev/null || /usr/sbin/slurmctld
  pgrep -x slurmd >/dev/null || /usr/sbin/slurmd
  wait_for 60 sh -c "sinfo -h -o %T | grep -qx idle"
  echo "slurm_local: cluster $CLUSTER up: $(sinfo -h -o '%P %D %c CPUs %m MB %T')"
}

stop() {
  for daemon in slurmd slurmctld slurmdbd; do pkill -x "$daemon" || true; done
  service mariadb stop >/dev/null 2>&1 || true
  pkill -x munged || true
  echo "slurm_local: stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) sinfo ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
