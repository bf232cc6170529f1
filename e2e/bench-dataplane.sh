#!/usr/bin/env bash
# Benchmark of the l2mesh dataplane against VXLAN over wireguard-go and plain
# kernel VXLAN, pod to pod across two "nodes" (network namespaces joined by a
# veth underlay). Not a test: prints Gbit/s (1 and 4 TCP streams), ratios,
# ping RTT and CPU seconds per GB (whole machine, from /proc/stat).
#
# Usage: sudo e2e/bench-dataplane.sh            (builds the release binary)
#        BIN=/path/to/l2mesh-dataplane DURATION=10 sudo -E e2e/bench-dataplane.sh
#        PATHS="l2mesh wggo" sudo -E e2e/bench-dataplane.sh   (a subset of l2mesh wggo vxlan
#          direct; direct is both pods on one bridge, no tunnel: this machine's ceiling)
#        BEFORE=/old/l2mesh-dataplane PATHS="before l2mesh wggo" ...  (an earlier build too)
#        PROFILE=/tmp/prof sudo -E e2e/bench-dataplane.sh  (perf profiles of the tunnel
#          processes: /tmp/prof-<path>-{tcp1,tcp4,64B}.data)
#        taskset -c 0 sudo -E e2e/bench-dataplane.sh  (everything on one core: with the
#          two-core figures, how each path scales with cores)
#        REPEAT=3 sudo -E e2e/bench-dataplane.sh  (three interleaved rounds, medians)
#        COUNT=1 sudo -E e2e/bench-dataplane.sh  (system calls and context switches per
#          64-byte packet, from perf stat)
# Needs: root, ip, iperf3, ping, wireguard-go, wg.
set -euo pipefail

DURATION=${DURATION:-8}
TAG="l2bench-$$"
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d)
PIDS=()

if [[ -z "${BIN:-}" ]]; then
  (cd "$ROOT" && cargo build --release -q -p l2mesh-dataplane)
  BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/l2mesh-dataplane"
fi
if [[ -z "${FLOOD:-}" ]]; then
  (cd "$ROOT" && cargo build --release -q -p l2mesh-e2e --bin l2mesh-udpflood)
  FLOOD="${CARGO_TARGET_DIR:-$ROOT/target}/release/l2mesh-udpflood"
fi
for t in ip iperf3 ping wireguard-go wg; do
  command -v "$t" >/dev/null || { echo "missing tool: $t" >&2; exit 2; }
done

# ns is called in $(...) subshells, so the names to clean up go to a file.
ROUND=1
ns() { local n="$TAG-$ROUND-$1"; echo "$n" >>"$WORK/netns"; ip netns add "$n"; ip -n "$n" link set lo up; echo "$n"; }
# Stops everything in the namespaces made so far and removes them.
teardown() {
  for n in $(cat "$WORK/netns" 2>/dev/null); do
    for p in $(ip netns pids "$n" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
    ip netns del "$n" 2>/dev/null || true
  done
  : >"$WORK/netns"
  rm -f /var/run/wireguard/"bw$$"*.sock
}
cleanup() {
  for p in "${PIDS[@]:-}"; do [[ -n "$p" ]] && kill "$p" 2>/dev/null || true; done
  sleep 0.3
  teardown
  rm -rf "$WORK"
}
trap cleanup EXIT

# Two nodes joined by a veth underlay 10.250.0.1/.2; pods 10.9.0.1/.2.
mk_nodes() {
  A=$(ns "$1-a"); B=$(ns "$1-b")
  ip -n "$A" link add eth0 type veth peer name eth0 netns "$B"
  ip -n "$A" addr add 10.250.0.1/24 dev eth0; ip -n "$A" link set eth0 up
  ip -n "$B" addr add 10.250.0.2/24 dev eth0; ip -n "$B" link set eth0 up
  PA=$(ns "$1-pa"); PB=$(ns "$1-pb")
}
mk_pod() { # node pod addr mtu bridge
  ip -n "$1" link add "$6" type veth peer name eth0 netns "$2"
  ip -n "$2" link set eth0 mtu "$4" up; ip -n "$2" addr add "$3" dev eth0
  if [[ -n "$5" ]]; then ip -n "$1" link set "$6" master "$5" mtu "$4" up; fi
}

cpu_busy() { awk '/^cpu /{print $2+$3+$4+$7+$8}' /proc/stat; }
# CPU ticks (user+system) of the userspace tunnel processes in $DAEMONS;
# unlike the machine-wide figure this ignores whatever else runs.
cpu_daemons() {
  local t=0 p
  for p in ${DAEMONS:-}; do
    t=$((t + $(awk '{print $14+$15}' "/proc/$p/stat" 2>/dev/null || echo 0)))
  done
  echo "$t"
}
HZ=$(getconf CLK_TCK)

# flood_run RATE SECONDS: l2mesh-udpflood from PA to PB at RATE datagrams
# per second (0: flat out); prints "received-kpps offered-kpps received".
flood_run() {
  ip netns exec "$PB" "$FLOOD" recv --bind 10.9.0.2:5300 --idle 1 --max-seconds $(($2 + 15)) \
    >"$WORK/flood-recv" &
  local counter=$!
  sleep 0.3
  ip netns exec "$PA" "$FLOOD" send --to 10.9.0.2:5300 --seconds "$2" --rate "$1" >"$WORK/flood-send" || true
  wait "$counter" || true
  python3 -c "
import json
s=json.load(open('$WORK/flood-send')); r=json.load(open('$WORK/flood-recv')); t=max(s['seconds'],1e-9)
print('%.0f %.0f %d' % (r['packets']/t/1e3, s['packets']/t/1e3, r['packets']))" 2>/dev/null || echo "nan nan 0"
}

# measure NAME: iperf3 from PA to PB, prints a result line into $WORK/results
measure() {
  local name=$1
  ip netns exec "$PB" iperf3 -s -D -1 >/dev/null 2>&1 || true
  sleep 0.5
  ip netns exec "$PA" ping -c 20 -i 0.05 -q 10.9.0.2 >/dev/null 2>&1 || true # warm up
  local rtt
  rtt=$(ip netns exec "$PA" ping -c 20 -i 0.05 -q 10.9.0.2 | awk -F/ '/rtt/{print $5}')
  local res=()
  for streams in 1 4; do
    ip netns exec "$PB" iperf3 -s -D -1 >/dev/null 2>&1 || true
    sleep 0.3
    local c0 c1 d0 d1 out bps bytes pinger=""
    c0=$(cpu_busy); d0=$(cpu_daemons)
    if [[ $streams == 1 ]]; then # RTT under load, alongside the one stream
      (sleep 1; ip netns exec "$PA" ping -c $(((DURATION - 2) * 20)) -i 0.05 -q 10.9.0.2 |
        awk -F/ '/rtt/{print $5}' >"$WORK/loaded-rtt") &
      pinger=$!
    fi
    local tprof=""
    if [[ -n "${PROFILE:-}" && -n "${DAEMONS// /}" ]]; then
      perf record -q -e cpu-clock -g -p "$(echo $DAEMONS | tr ' ' ,)" -o "$PROFILE-$name-tcp$streams.data" \
        -- sleep "$DURATION" >/dev/null 2>&1 &
      tprof=$!
    fi
    out=$(ip netns exec "$PA" iperf3 -c 10.9.0.2 -t "$DURATION" -P "$streams" -J)
    c1=$(cpu_busy); d1=$(cpu_daemons)
    [[ -n $tprof ]] && wait "$tprof"
    [[ -n $pinger ]] && wait "$pinger"
    pinger=""
    bps=$(echo "$out" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["end"]["sum_received"]["bits_per_second"])')
    bytes=$(echo "$out" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["end"]["sum_received"]["bytes"])')
    local gbps cpus dcpus
    gbps=$(python3 -c "print(f'{$bps/1e9:.3f}')")
    cpus=$(python3 -c "print(f'{($c1-$c0)/$HZ/max($bytes/1e9,1e-9):.2f}')")
    dcpus=$(python3 -c "print(f'{($d1-$d0)/$HZ/max($bytes/1e9,1e-9):.2f}')")
    res+=("$gbps" "$cpus" "$dcpus")
  done
  # Small frames: 64-byte UDP payloads as fast as one sender goes; packets
  # per second that arrive.
  ip netns exec "$PB" iperf3 -s -D -1 >/dev/null 2>&1 || true
  sleep 0.3
  local pps u0 u1 udp_out
  u0=$(cpu_daemons)
  local prof=""
  if [[ -n "${PROFILE:-}" && -n "${DAEMONS// /}" ]]; then # perf profile of the tunnel processes
    perf record -q -e cpu-clock -g -p "$(echo $DAEMONS | tr ' ' ,)" -o "$PROFILE-$name-64B.data" \
      -- sleep "$DURATION" >/dev/null 2>&1 &
    prof=$!
  fi
  local counts=""
  if [[ -n "${COUNT:-}" && -n "${DAEMONS// /}" ]]; then # syscalls and context switches of the tunnel processes
    counts="$WORK/counts-$name"
    perf stat -x, -e raw_syscalls:sys_enter,context-switches -p "$(echo $DAEMONS | tr ' ' ,)" -o "$counts" \
      -- sleep "$DURATION" >/dev/null 2>&1 &
    prof="${prof:-} $!"
  fi
  udp_out=$(ip netns exec "$PA" iperf3 -c 10.9.0.2 -u -b 0 -l 64 -t "$DURATION" -J || true)
  u1=$(cpu_daemons)
  [[ -n $prof ]] && wait $prof
  if [[ -n $counts ]]; then
    echo "$udp_out" | python3 -c "
import json,sys
s=json.load(sys.stdin)['end']['sum']; got=max(s['packets']-s['lost_packets'],1)
c={l.split(',')[2]: float(l.split(',')[0]) for l in open('$counts') if l.count(',')>3 and l[0].isdigit()}
print('$name 64B: %.2f syscalls/pkt, %.3f context switches/pkt (tunnel processes, per packet received)' % (c.get('raw_syscalls:sys_enter',0)/got, c.get('context-switches',0)/got))" >>"$WORK/counts" || true
  fi
  # kpps received, and the tunnel processes' CPU microseconds per packet
  # received (robust when other work shares the machine).
  pps=$(echo "$udp_out" | python3 -c "
import json,sys
s=json.load(sys.stdin)['end']['sum']; got=max(s['packets']-s['lost_packets'],1)
print('%.0f' % (got/max(s['seconds'],1e-9)/1e3), '%.1f' % (($u1-$u0)/$HZ/got*1e6) if '$DAEMONS'.strip() else '-')" ||
    echo "nan nan")
  # The same with l2mesh-udpflood, whose sender batches with sendmmsg and
  # so offers far more than iperf3's one datagram per system call: what
  # arrives then says what the path carries, not what the sender manages.
  local fk fo fgot fu="-"
  u0=$(cpu_daemons)
  read -r fk fo fgot < <(flood_run 0 "$DURATION")
  u1=$(cpu_daemons)
  if [[ -n "${DAEMONS// /}" ]]; then
    fu=$(python3 -c "print('%.1f' % (($u1-$u0)/$HZ/max($fgot,1)*1e6))" 2>/dev/null || echo nan)
  fi
  # Flat out, the sender takes a whole core from the path. Offered at 1.0,
  # 1.2 and 1.4 times what arrived, it leaves the rest to the path; the most
  # that arrives at any of the four rates is the path's maximum forwarding
  # rate (RFC 2889), the figure to compare.
  local best=$fk f rate got
  for f in 1.0 1.2 1.4; do
    rate=$(python3 -c "print(int(float('$fk') * 1000 * $f))" 2>/dev/null || echo 0)
    [[ $rate -gt 0 ]] || continue
    read -r got _ _ < <(flood_run "$rate" "$(((DURATION + 1) / 2))")
    best=$(python3 -c "print('%.0f' % max(float('$best'), float('$got')))" 2>/dev/null || echo "$best")
  done
  local flood="$fk $fo $fu $best"
  local lrtt
  lrtt=$(cat "$WORK/loaded-rtt" 2>/dev/null)
  echo "$name ${res[*]} ${rtt:-nan} $pps ${lrtt:-nan} $flood" >> "$WORK/results"
}

# ---------------------------------------------------------------- l2mesh
bench_l2mesh() { # [binary] [name] [namespace tag]
  local BIN=${1:-$BIN} label=${2:-l2mesh-dataplane} tag=${3:-dp}
  DAEMONS=""
  mk_nodes "$tag"
  local keys=() ports=()
  for n in "$A" "$B"; do
    ip netns exec "$n" "$BIN" run --socket "$WORK/$n.sock" --state-dir "$WORK/$n" --listen-port 0 \
      >"$WORK/$n.log" 2>&1 &
    PIDS+=($!)
    disown "$!" # torn down with kill -9: no job-status noise
    DAEMONS="${DAEMONS:-} $!"
  done
  for n in "$A" "$B"; do
    for _ in $(seq 50); do [[ -S "$WORK/$n.sock" ]] && break; sleep 0.1; done
    sleep 0.2
    keys+=("$("$BIN" --socket "$WORK/$n.sock" pubkey)")
    ports+=("$("$BIN" --socket "$WORK/$n.sock" status | awk '/^node/{for(i=1;i<NF;i++) if($i=="port") print $(i+1)}')")
  done
  cat >"$WORK/a.json" <<EOF
{"revision":1,"node_name":"a","tunnel_ip":"100.64.0.1","networks":[{"name":"bench","vni":42}],
 "peers":[{"public_key":"${keys[1]}","endpoint":"10.250.0.2:${ports[1]}","tunnel_ip":"100.64.0.2","vnis":[42],"group":"local","name":"b"}]}
EOF
  cat >"$WORK/b.json" <<EOF
{"revision":1,"node_name":"b","tunnel_ip":"100.64.0.2","networks":[{"name":"bench","vni":42}],
 "peers":[{"public_key":"${keys[0]}","endpoint":"10.250.0.1:${ports[0]}","tunnel_ip":"100.64.0.1","vnis":[42],"group":"local","name":"a"}]}
EOF
  "$BIN" --socket "$WORK/$A.sock" apply "$WORK/a.json" >/dev/null
  "$BIN" --socket "$WORK/$B.sock" apply "$WORK/b.json" >/dev/null
  mk_pod "$A" "$PA" 10.9.0.1/24 1390 "" hpa
  mk_pod "$B" "$PB" 10.9.0.2/24 1390 "" hpb
  "$BIN" --socket "$WORK/$A.sock" attach bench hpa >/dev/null
  "$BIN" --socket "$WORK/$B.sock" attach bench hpb >/dev/null
  ip netns exec "$PA" ping -c 3 -W 2 10.9.0.2 >/dev/null
  measure "$label"
}

# The same with an earlier build ($BEFORE), for before/after in one run.
bench_before() {
  [[ -n "${BEFORE:-}" ]] || { echo "PATHS has before: set BEFORE=/path/to/old/l2mesh-dataplane" >&2; exit 2; }
  bench_l2mesh "$BEFORE" l2mesh-before bf
}

# ---------------------------------------------------------------- vxlan over wireguard-go
bench_wggo() {
  DAEMONS=""
  mk_nodes wg
  local i=0 pubs=() ifs=()
  for n in "$A" "$B"; do
    local ifn="bw$$$i"
    ifs+=("$ifn")
    ip netns exec "$n" env WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1 wireguard-go -f "$ifn" >/dev/null 2>&1 &
    PIDS+=($!)
    disown "$!" # torn down with kill -9: no job-status noise
    DAEMONS="${DAEMONS:-} $!"
    (umask 077; wg genkey >"$WORK/wg$i.key")
    pubs+=("$(wg pubkey <"$WORK/wg$i.key")")
    i=$((i + 1))
  done
  sleep 1
  local ips=(100.64.0.1 100.64.0.2) under=(10.250.0.1 10.250.0.2) nodes=("$A" "$B")
  for i in 0 1; do
    local n=${nodes[$i]} o=$((1 - i))
    ip netns exec "$n" wg set "${ifs[$i]}" private-key "$WORK/wg$i.key" listen-port $((40000 + i))
    ip netns exec "$n" wg set "${ifs[$i]}" peer "${pubs[$o]}" endpoint "${under[$o]}:$((40000 + o))" allowed-ips "${ips[$o]}/32"
    ip -n "$n" addr add "${ips[$i]}/24" dev "${ifs[$i]}"
    ip -n "$n" link set "${ifs[$i]}" up
    ip -n "$n" link add vx0 type vxlan id 42 local "${ips[$i]}" remote "${ips[$o]}" dstport 4789 dev "${ifs[$i]}"
    ip -n "$n" link add br0 type bridge
    ip -n "$n" link set vx0 master br0 up
    ip -n "$n" link set br0 up
  done
  mk_pod "$A" "$PA" 10.9.0.1/24 1370 br0 hpa
  mk_pod "$B" "$PB" 10.9.0.2/24 1370 br0 hpb
  ip netns exec "$PA" ping -c 3 -W 2 10.9.0.2 >/dev/null
  measure "vxlan-over-wireguard-go"
}

# ---------------------------------------------------------------- plain kernel vxlan
bench_vxlan() {
  DAEMONS=""
  mk_nodes vx
  local under=(10.250.0.1 10.250.0.2) nodes=("$A" "$B")
  for i in 0 1; do
    local n=${nodes[$i]} o=$((1 - i))
    ip -n "$n" link add vx0 type vxlan id 42 local "${under[$i]}" remote "${under[$o]}" dstport 4789 dev eth0
    ip -n "$n" link add br0 type bridge
    ip -n "$n" link set vx0 master br0 up
    ip -n "$n" link set br0 up
  done
  mk_pod "$A" "$PA" 10.9.0.1/24 1450 br0 hpa
  mk_pod "$B" "$PB" 10.9.0.2/24 1450 br0 hpb
  ip netns exec "$PA" ping -c 3 -W 2 10.9.0.2 >/dev/null
  measure "kernel-vxlan"
}

# ---------------------------------------------------------------- no tunnel at all
# Both pods on one bridge in one node: what the pods, veths and the load
# generators cost by themselves, the ceiling no tunnel can pass on this
# machine.
bench_direct() {
  DAEMONS=""
  mk_nodes dr
  ip -n "$A" link add br0 type bridge
  ip -n "$A" link set br0 up
  mk_pod "$A" "$PA" 10.9.0.1/24 1500 br0 hpa
  mk_pod "$A" "$PB" 10.9.0.2/24 1500 br0 hpb
  ip netns exec "$PA" ping -c 3 -W 2 10.9.0.2 >/dev/null
  measure "no-tunnel-one-bridge"
}

# REPEAT rounds of all paths, interleaved so that drift in what else the
# machine does touches every path alike; the table gives medians.
for ROUND in $(seq "${REPEAT:-1}"); do
  for p in ${PATHS:-l2mesh wggo vxlan direct}; do
    case $p in
      l2mesh | before | wggo | vxlan | direct) "bench_$p" ;;
      *) echo "unknown path $p (use l2mesh, before, wggo, vxlan, direct)" >&2; exit 2 ;;
    esac
    teardown
  done
done

[[ -f "$WORK/counts" ]] && cat "$WORK/counts"
python3 - "$WORK/results" <<'EOF'
import sys
import statistics
runs = {}
for l in open(sys.argv[1]):
    f = l.split()
    runs.setdefault(f[0], []).append(f[1:])
def median(col):
    try:
        v = statistics.median(float(x) for x in col)
        return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.3g}"
    except ValueError:
        return col[0]
rows = [[name] + [median(col) for col in zip(*rs)] for name, rs in runs.items()]
if any(len(rs) > 1 for rs in runs.values()):
    print(f"medians of {max(len(rs) for rs in runs.values())} interleaved rounds")
ref = {r[0]: r for r in rows}
wg = ref.get("vxlan-over-wireguard-go")
print("CPU s/GB: whole machine (noisy when it is shared) / tunnel processes only; (1) and (4) streams")
print("64B kpps: 64-byte UDP datagrams received per second (thousands), one iperf3 sender")
print("us/pkt: tunnel processes' CPU microseconds per 64-byte datagram received")
print("flood: the same with l2mesh-udpflood (sendmmsg batches): received kpps / offered kpps / us/pkt")
print("max fwd: the most kpps received with the flood offered flat out or paced at 1.0/1.2/1.4x what arrived")
print("RTT ms: idle / while one stream runs")
print(f"{'path':<26}{'1 stream':>12}{'4 streams':>13}{'CPU s/GB(1)':>15}{'CPU s/GB(4)':>15}{'RTT ms':>14}{'64B kpps':>10}{'us/pkt':>8}{'flood':>18}{'max fwd':>9}{'vs wg-go (1/4/64B/max fwd)':>28}")
for name, g1, c1, d1, g4, c4, d4, rtt, pps, upp, lrtt, fk, fo, fu, fbest in rows:
    ratio = ""
    if wg:
        r = lambda a, b: f"{float(a)/max(float(b),1e-9):.2f}x"
        ratio = f"{r(g1, wg[1])}/{r(g4, wg[4])}/{r(pps, wg[8])}/{r(fbest, wg[14])}"
    print(f"{name:<26}{g1+' Gb/s':>12}{g4+' Gb/s':>13} {c1+' / '+d1:>14} {c4+' / '+d4:>14} {rtt+' / '+lrtt:>13} {pps:>9} {upp:>7} {fk+' / '+fo+' / '+fu:>17} {fbest:>8} {ratio:>27}")
EOF
