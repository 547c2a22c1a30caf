#!/usr/bin/env bash
# A real two-node Slurm cluster on one machine, for tests: munge, slurmctld and two slurmd daemons
# (node1, node2) on 127.0.0.1. Needs root and Debian's slurm-wlm + munge packages (installed on `start`
# with apt-get when missing).
#
#   slurm/local-cluster.sh start     # install if needed, write the config, start the daemons, wait until idle
#   slurm/local-cluster.sh status    # daemons and node states; exit 0 only when both nodes are up
#   slurm/local-cluster.sh stop      # scontrol shutdown + stop munged
#   slurm/local-cluster.sh env       # print `export SLURM_CONF=...` for sbatch/srun/squeue/scontrol
#
# State lives under $MOETRON_SLURM_DIR (default /tmp/moetron-slurm): slurm.conf, logs, spool.
set -euo pipefail

DIR="${MOETRON_SLURM_DIR:-/tmp/moetron-slurm}"
CONF="$DIR/slurm.conf"
CPUS="${MOETRON_SLURM_CPUS:-2}"  # CPUs each simulated node advertises

log() { echo "local-cluster: $*" >&2; }

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
    return
  fi
  [ "$(id -u)" = 0 ] || { log "slurm-wlm/munge are missing and installing them needs root"; exit 1; }
  log "installing slurm-wlm and munge with apt-get"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

hosts_entries() {  # `scontrol show hostnames` gives node1/node2; they must resolve
  for n in node1 node2; do
    if ! grep -Eq "^[^#]*[[:space:]]$n([[:space:]]|\$)" /etc/hosts; then
      echo "127.0.0.1 $n" >> /etc/hosts
    fi
  done
}

start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return; fi
  [ -f /etc/munge/munge.key ] || { mkdir -p /etc/munge; dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; }
  mkdir -p /var/log/munge /var/lib/munge /run/munge
  chown -R munge:munge /etc/munge /var/log/munge /var/lib/munge /run/munge
  chmod 0700 /etc/munge /var/log/munge /var/lib/munge
  chmod 0400 /etc/munge/munge.key
  chmod 0755 /run/munge
  su -s /bin/sh munge -c munged
  for _ in $(seq 50); do
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return
    sleep 0.1
  done
  log "munged did not come up"; exit 1
}

write_conf() {
  mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
  cat > "$CONF" <<CONF
# Written by slurm/local-cluster.sh: two nodes on 127.0.0.1 for tests.
ClusterName=moetron-local
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
CryptoType=crypto/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
JobRequeue=1
# Job credentials expire after 10 s (default 120); a requeued job may start again after that long.
AuthInfo=cred_expire=10
KillWait=30
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/d-%n.log
SlurmctldPort=16817
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
MessageTimeout=20
SlurmdTimeout=120
InactiveLimit=0
MinJobAge=600
NodeName=node[1-2] NodeHostname=localhost NodeAddr=127.0.0.1 Port=17001-17002 CPUs=$CPUS RealMemory=10000 State=UNKNOWN
PartitionName=debug Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
}

nodes_idle() {
  local states
  states="$(SLURM_CONF="$CONF" sinfo -h -N -o '%N %t' 2>/dev/null || true)"
  [ "$(echo "$states" | grep -Ec '^node[12] (idle|mix|alloc)')" = 2 ]
}

start() {
  install_packages
  hosts_entries
  start_munge
  if [ -f "$DIR/slurmctld.pid" ] && kill -0 "$(cat "$DIR/slurmctld.pid")" 2>/dev/null && nodes_idle; then
    log "already running (SLURM_CONF=$CONF)"; return
  fi
  write_conf
  slurmctld -f "$CONF"
  slurmd -f "$CONF" -N node1
  slurmd -f "$CONF" -N node2
  for _ in $(seq 120); do
    if nodes_idle; then
      log "up: node1 node2 idle (export SLURM_CONF=$CONF)"
      return
    fi
    sleep 0.5
  done
  log "nodes did not become idle; see $DIR/log"
  SLURM_CONF="$CONF" sinfo -N >&2 || true
  exit 1
}

stop() {
  if [ -f "$CONF" ]; then
    SLURM_CONF="$CONF" scontrol shutdown >/dev/null 2>&1 || true
    for _ in $(seq 50); do
      alive=0
      for pidfile in "$DIR"/slurmctld.pid "$DIR"/slurmd-*.pid; do
        [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null && alive=1
      done
      [ $alive = 0 ] && break
      sleep 0.2
    done
  fi
  if [ -f /run/munge/munged.pid ]; then
    kill "$(cat /run/munge/munged.pid)" 2>/dev/null || true
  fi
  log "stopped"
}

status() {
  local rc=0
  for pidfile in "$DIR"/slurmctld.pid "$DIR"/slurmd-node1.pid "$DIR"/slurmd-node2.pid; do
    name="$(basename "$pidfile" .pid)"
    if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
      echo "$name: running (pid $(cat "$pidfile"))"
    else
      echo "$name: stopped"; rc=1
    fi
  done
  if [ $rc = 0 ]; then SLURM_CONF="$CONF" sinfo -N; nodes_idle || rc=1; fi
  return $rc
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
