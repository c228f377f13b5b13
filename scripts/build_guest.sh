#!/bin/bash
# Build vionet's test guest: a Debian cloud kernel and a busybox initramfs
# with the virtio-net modules, iperf3 and ethtool (issue 4, item 3).
#
#   scripts/build_guest.sh [CACHE_DIR]
#
# CACHE_DIR defaults to $VIONET_GUEST_DIR, else <repo>/.cache/guest (gitignored).
# Outputs: CACHE_DIR/vmlinuz, CACHE_DIR/initramfs.gz, CACHE_DIR/stamp.
# Idempotent: when both outputs exist and the stamp matches (this script, the
# guest's /init and the package versions), nothing is rebuilt.
#
# Debian packages are fetched with `apt-get download` and unpacked with
# `dpkg-deb -x` inside CACHE_DIR; nothing is installed into the host's /boot.
# Only the host tools the build needs are installed with apt-get.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
out="${1:-${VIONET_GUEST_DIR:-$repo/.cache/guest}}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"

log() { echo "build_guest: $*" >&2; }
die() {
  echo "build_guest: error: $*" >&2
  exit 1
}

# Order matters: each module needs the ones before it (no udev in the guest).
modules=(virtio_pci_legacy_dev virtio_pci_modern_dev virtio_ring virtio virtio_pci
  failover net_failover virtio_net)

# Host tools: QEMU to run the guest, busybox-static for the guest's userland,
# cpio and gzip to pack it, kmod for depmod.
host_pkgs=(qemu-system-x86 busybox-static cpio gzip kmod)
missing=()
for p in "${host_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  log "installing host packages: ${missing[*]}"
  [ "$(id -u)" = 0 ] || die "need root to apt-get install ${missing[*]}"
  apt-get update -qq || true
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# The current cloud kernel: the meta package depends on linux-image-<abi>-cloud-amd64.
kernel_pkg="$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
  awk '/Depends: linux-image-[0-9].*-cloud-amd64/ { print $2; exit }')"
if [ -z "$kernel_pkg" ]; then
  apt-get update -qq || true
  kernel_pkg="$(apt-cache depends linux-image-cloud-amd64 |
    awk '/Depends: linux-image-[0-9].*-cloud-amd64/ { print $2; exit }')"
fi
[ -n "$kernel_pkg" ] || die "cannot find the kernel behind linux-image-cloud-amd64 (apt-cache depends)"

guest_pkgs=("$kernel_pkg" iperf3 libiperf0 libsctp1 libssl3 ethtool libmnl0 libc6)
# One apt-cache call for all candidates: "pkg=version" per line.
candidates="$(apt-cache policy "${guest_pkgs[@]}" |
  awk '/^[^ ].*:$/ { sub(/:(amd64)?:?$/, ""); p = $1 } /^  Candidate:/ { print p "=" $2 }')"
candidate() { echo "$candidates" | awk -F= -v p="$1" '$1 == p { print $2 }'; }
versions=""
for p in "${guest_pkgs[@]}"; do
  v="$(candidate "$p")"
  [ -n "$v" ] && [ "$v" != "(none)" ] || die "no candidate version for package $p"
  versions+="$p=$v "
done
busybox_version="$(dpkg-query -W -f='${Version}' busybox-static)"

stamp="$(
  {
    echo "format 1"
    echo "$versions"
    echo "busybox-static=$busybox_version"
    sha256sum "$here/build_guest.sh" "$here/guest_init.sh" | awk '{ print $1 }'
  } | sha256sum | awk '{ print $1 }'
)"
if [ -f "$out/vmlinuz" ] && [ -f "$out/initramfs.gz" ] && [ -f "$out/stamp" ] &&
  [ "$(cat "$out/stamp")" = "$stamp" ]; then
  log "up to date: $out (stamp $stamp)"
  exit 0
fi
rm -f "$out/stamp"

# Download and unpack the guest packages (cached by file name).
debs="$out/debs"
tree="$out/tree"
mkdir -p "$debs"
for p in "${guest_pkgs[@]}"; do
  v="$(candidate "$p")"
  have="$(ls "$debs/${p}_"*.deb 2>/dev/null | head -n1 || true)"
  if [ -z "$have" ] || [ "$(dpkg-deb -f "$have" Version)" != "$v" ]; then
    rm -f "$debs/${p}_"*.deb
    log "downloading $p $v"
    (cd "$debs" && apt-get download -qq -o APT::Sandbox::User=root "$p=$v") || die "apt-get download $p=$v failed"
  fi
done
rm -rf "$tree"
mkdir -p "$tree"
for p in "${guest_pkgs[@]}"; do
  dpkg-deb -x "$(ls "$debs/${p}_"*.deb | head -n1)" "$tree"
done

kver="${kernel_pkg#linux-image-}"
[ -f "$tree/boot/vmlinuz-$kver" ] || die "no $tree/boot/vmlinuz-$kver in $kernel_pkg"
moddir="$tree/lib/modules/$kver"
[ -d "$moddir" ] || die "no $moddir in $kernel_pkg"

# Assemble the initramfs root.
root="$out/root"
rm -rf "$root"
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,run,etc,lib64,lib/x86_64-linux-gnu}
cp /bin/busybox "$root/bin/busybox"
for applet in $("$root/bin/busybox" --list); do
  [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
done
install -m 0755 "$here/guest_init.sh" "$root/init"

# Only the modules the guest loads, then depmod on that small tree.
gmod="$root/lib/modules/$kver"
mkdir -p "$gmod"
cp "$moddir/modules.order" "$moddir/modules.builtin" "$gmod/" 2>/dev/null || true
[ -f "$moddir/modules.builtin.modinfo" ] && cp "$moddir/modules.builtin.modinfo" "$gmod/"
for m in "${modules[@]}"; do
  f="$(find "$moddir/kernel" -name "$m.ko*" | head -n1)"
  if [ -z "$f" ]; then
    grep -q "/$m.ko" "$moddir/modules.builtin" 2>/dev/null && continue
    die "module $m is neither in $kernel_pkg nor built in"
  fi
  rel="${f#"$moddir"/}"
  mkdir -p "$gmod/$(dirname "$rel")"
  cp "$f" "$gmod/$rel"
done
depmod -b "$root" "$kver"
printf '%s\n' "${modules[@]}" >"$root/etc/vionet-modules"

# iperf3 and ethtool, with the libraries the extracted loader resolves for them.
# (The package's /lib64 entry is an absolute symlink into the host; use the real file.)
loader="$tree/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
[ -e "$loader" ] || die "no loader at $loader (libc6)"
libpath="$tree/lib/x86_64-linux-gnu:$tree/usr/lib/x86_64-linux-gnu"
cp "$tree/usr/bin/iperf3" "$root/usr/bin/iperf3"
cp "$(ls "$tree/usr/sbin/ethtool" "$tree/sbin/ethtool" 2>/dev/null | head -n1)" "$root/usr/sbin/ethtool"
# ethtool and iperf3 replace busybox's applets of the same name, if any.
for bin in "$root/usr/bin/iperf3" "$root/usr/sbin/ethtool"; do
  rm -f "$root/bin/$(basename "$bin")"
  "$loader" --library-path "$libpath" --list "$bin" >"$out/ldd.txt" ||
    die "the extracted loader cannot resolve $(basename "$bin"): $(cat "$out/ldd.txt")"
  if grep -q 'not found' "$out/ldd.txt"; then
    die "unresolved libraries for $(basename "$bin"): $(grep 'not found' "$out/ldd.txt")"
  fi
  awk '/=> \// { print $3 }' "$out/ldd.txt" | while read -r lib; do
    cp -L "$lib" "$root/lib/x86_64-linux-gnu/$(basename "$lib")"
  done
done
cp -L "$loader" "$root/lib64/ld-linux-x86-64.so.2"
rm -f "$out/ldd.txt"

echo "vionet-guest" >"$root/etc/hostname"
echo "root:x:0:0:root:/root:/bin/sh" >"$root/etc/passwd"
echo "root:x:0:" >"$root/etc/group"

log "packing initramfs"
(cd "$root" && find . -print0 | LC_ALL=C sort -z |
  cpio --null --create --format=newc --owner=0:0 --quiet) | gzip -6 >"$out/initramfs.gz.tmp"
mv "$out/initramfs.gz.tmp" "$out/initramfs.gz"
cp "$tree/boot/vmlinuz-$kver" "$out/vmlinuz"
echo "$kver" >"$out/kernel-version"
rm -rf "$tree" "$root"
echo "$stamp" >"$out/stamp"
log "built $out/vmlinuz ($kver) and $out/initramfs.gz ($(du -h "$out/initramfs.gz" | cut -f1))"
