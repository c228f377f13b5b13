#!/usr/bin/env bash
# Installs what vionet needs on a fresh Debian machine of this kind.
#   scripts/setup.sh          Deno (pinned, from the npm registry) and iproute2: enough to run the daemon
#   scripts/setup.sh --test   also what the tests use: ethtool, tcpdump, iperf3, ping, QEMU, curl, libvirt, systemd's tools, and the test guest
# Idempotent: what is already there is left alone.
set -euo pipefail

DENO_VERSION=2.9.6
here=$(cd "$(dirname "$0")/.." && pwd)
want_test=0
for arg in "$@"; do
  case "$arg" in
    --test) want_test=1 ;;
    -h|--help) sed -n '2,5p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option $arg (try --help)" >&2; exit 2 ;;
  esac
done

say() { printf 'setup: %s\n' "$*" >&2; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# Deno from the npm registry, at the pinned version (JSR and other hosts are not reachable here).
if ! command -v deno >/dev/null 2>&1 || [ "$(deno --version | awk 'NR==1{print $2}')" != "$DENO_VERSION" ]; then
  command -v npm >/dev/null 2>&1 || { say "npm is needed to install Deno"; exit 1; }
  say "installing deno@$DENO_VERSION from the npm registry"
  as_root npm install --global --no-audit --no-fund "deno@$DENO_VERSION" >&2
fi

apt_packages=(iproute2)
if [ "$want_test" = 1 ]; then
  # linux-libc-dev: asm/unistd_64.h, against which a test checks the seccomp table's numbers
  apt_packages+=(ethtool tcpdump iperf3 qemu-system-x86 busybox-static cpio kmod gcc linux-libc-dev iputils-ping)
  # The libvirt recipe's test runs a private libvirtd that starts QEMU as libvirt-qemu.
  apt_packages+=(libvirt-daemon-system libvirt-clients)
  # curl: the metrics test scrapes with curl --unix-socket; systemd: systemd-analyze verify of
  # contrib/systemd and systemd-socket-activate (the tests need no running systemd)
  apt_packages+=(curl systemd)
fi
missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  say "installing ${missing[*]} with apt-get"
  as_root apt-get update -qq >&2
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

# The type checker resolves node: modules through @types/node; fetch it once so that
# the daemon itself can run with --cached-only.
(cd "$here" && deno check main.ts >/dev/null)

if [ "$want_test" = 1 ] && [ -x "$here/scripts/build_guest.sh" ]; then
  say "building the test guest (cached)"
  "$here/scripts/build_guest.sh" >&2
fi
say "done"
