#!/bin/sh
# /init of vionet's test guest (PID 1 of the initramfs built by build_guest.sh).
#
# Kernel command line:
#   vionet.ip=198.18.0.2/24       address for eth0 (optional: no address, link still up)
#   vionet.gw=198.18.0.1          default route (optional)
#   vionet.ethtool="-K eth0 tso off"   ethtool arguments applied after eth0 is up (optional)
#
# Console (ttyS0): kernel and init messages, for humans.
# Control channel (ttyS1, raw): a line protocol with the harness (tests/e2e/guest.ts).
#   guest -> host  __VIONET_READY__ <net-status>          once, after setup; net-status is
#                  ok, no-carrier (eth0 configured, link down after 10 s) or failed
#   host -> guest  __VIONET_RUN__ <id> <seconds> <base64 of a sh script>
#   guest -> host  __VIONET_OUT__ <id>
#                  <base64 of the script's stdout+stderr, wrapped>
#                  __VIONET_DONE__ <id> <exit status>
#   host -> guest  __VIONET_POWEROFF__                    sync and power off at once
#   guest -> host  __VIONET_BAD__ <length>                 a line that is not a command
#                  (a garbled one: the harness fails the pending command at once)
# The script runs under `timeout -s KILL <seconds>` (status 137 when killed), with
# stdin from /dev/null. Background jobs it starts keep running between commands.
#
# The agent runs in a child of PID 1, not in PID 1 itself: background jobs
# outlive the script that started them and are reparented to PID 1 (so is
# busybox timeout's watcher), and their exit signals SIGCHLD there. busybox
# ash's `read`, interrupted by a signal, starts over and drops what it had read
# of the line, so a command arriving as such a job ended lost its beginning and
# was never answered (seen: the restart test's final command after a stream).
# The agent's own children are all waited for before it reads again.

export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm /root
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run

hostname vionet-guest

say() { echo "vionet-init: $*" >/dev/console; }

# The value of `name=value` or `name="value with spaces"` on /proc/cmdline.
param() {
  awk -v key="$1" '
    {
      line = $0; n = length(line); i = 1
      while (i <= n) {
        while (i <= n && substr(line, i, 1) == " ") i++
        tok = ""; q = 0
        while (i <= n) {
          c = substr(line, i, 1)
          if (c == "\"") { q = !q } else if (c == " " && !q) { break } else { tok = tok c }
          i++
        }
        eq = index(tok, "=")
        if (eq > 0 && substr(tok, 1, eq - 1) == key) { print substr(tok, eq + 1); exit }
      }
    }' /proc/cmdline
}

net_status=ok
fail() {
  say "$*"
  net_status=failed
}

for m in $(cat /etc/vionet-modules); do
  modprobe "$m" || fail "modprobe $m failed"
done

ip link set lo up
i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 50 ]; do
  sleep 0.1
  i=$((i + 1))
done
if [ -e /sys/class/net/eth0 ]; then
  addr="$(param vionet.ip)"
  gw="$(param vionet.gw)"
  eth="$(param vionet.ethtool)"
  ip link set eth0 up || fail "ip link set eth0 up failed"
  if [ -n "$addr" ]; then ip addr add "$addr" dev eth0 || fail "ip addr add $addr failed"; fi
  if [ -n "$gw" ]; then ip route add default via "$gw" || fail "ip route add default via $gw failed"; fi
  # Word splitting is wanted: the value is an ethtool argument list.
  # shellcheck disable=SC2086
  if [ -n "$eth" ]; then ethtool $eth || fail "ethtool $eth failed"; fi
  # Carrier follows the device's VIRTIO_NET_S_LINK_UP; operstate (and IFF_RUNNING)
  # follow carrier through linkwatch, up to a second later.
  i=0
  while [ "$(cat /sys/class/net/eth0/operstate 2>/dev/null)" != up ] && [ $i -lt 100 ]; do
    sleep 0.1
    i=$((i + 1))
  done
  if [ "$(cat /sys/class/net/eth0/operstate 2>/dev/null)" != up ] && [ "$net_status" = ok ]; then
    say "eth0 has no carrier after 10 s"
    net_status=no-carrier
  fi
else
  fail "no eth0 after loading the virtio modules"
fi
say "network setup: $net_status"

agent() {
  echo "__VIONET_READY__ $net_status"
  while IFS= read -r line; do
    line="${line%"$(printf '\r')"}"
    case "$line" in
      "__VIONET_RUN__ "*)
        # shellcheck disable=SC2086
        set -- $line
        id="$2"
        secs="$3"
        echo "$4" | base64 -d >/tmp/.cmd.$id
        timeout -s KILL "$secs" sh /tmp/.cmd.$id </dev/null >/tmp/.out.$id 2>&1
        status=$?
        echo "__VIONET_OUT__ $id"
        base64 </tmp/.out.$id
        echo "__VIONET_DONE__ $id $status"
        rm -f /tmp/.cmd.$id /tmp/.out.$id
        ;;
      "__VIONET_POWEROFF__")
        sync
        poweroff -f
        ;;
      "") ;;
      *)
        echo "__VIONET_BAD__ ${#line}"
        say "control channel: not a command (${#line} characters)"
        ;;
    esac
  done
}

stty -F /dev/ttyS1 raw -echo 2>/dev/null || say "stty on ttyS1 failed"
agent </dev/ttyS1 >/dev/ttyS1 2>&1 &
agent_pid=$!
while kill -0 "$agent_pid" 2>/dev/null; do wait "$agent_pid"; done
say "control channel closed; powering off"
poweroff -f
