#!/usr/bin/env bash
# Installs what Bulwark needs on a Debian 12 host, idempotently: Debian packages and npm modules.
#   scripts/setup.sh            what a one-host install needs to run
#   scripts/setup.sh --test     that, plus what the test suite needs (databases, peers, guest build)
set -euo pipefail
cd "$(dirname "$0")/.."

mode=runtime
[ "${1:-}" = "--test" ] && mode=test

# What the product itself runs: QEMU and its tools, NBD peers, FUSE and file-system tools for
# file-level restore, libvirt's client.
runtime_pkgs=(qemu-utils qemu-system-x86 qemu-block-extra libnbd-bin nbdkit fuse3 e2fsprogs xfsprogs
  btrfs-progs dosfstools mtools socat iproute2 nftables libvirt-clients util-linux
  ovmf)  # UEFI firmware: restore and instant recovery of VMs that boot OVMF
# What only the tests and the test guest build need.
test_pkgs=(postgresql postgresql-client libvirt-daemon-system busybox-static xz-utils cpio parted
  fdisk kmod iputils-ping sqlite3 curl openssl qemu-guest-agent restic borgbackup lvm2
  extlinux)  # the BIOS-bootable test guest (test/fixtures/bios-guest.ts)

want=("${runtime_pkgs[@]}")
[ "$mode" = test ] && want+=("${test_pkgs[@]}")

missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "setup: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # apt-get update only when the lists are older than a day or absent.
  if [ -z "$(find /var/lib/apt/lists -maxdepth 1 -name '*Packages*' -mmin -1440 2>/dev/null | head -1)" ]; then
    $sudo apt-get update -qq
  fi
  $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# /dev/kvm as Debian's udev rule leaves it (root:kvm 0660). A host without udev keeps it
# root:root 0600, and libvirtd then throws its QEMU capabilities cache away on every lookup
# (each `virsh define` took 35-63 s instead of about 1 s; docs/restore-vm.md).
if [ -c /dev/kvm ] && kvm_gid=$(getent group kvm | cut -d: -f3) && [ -n "$kvm_gid" ] \
   && [ "$(stat -c '%g %a' /dev/kvm)" != "$kvm_gid 660" ] && [ "$(id -u)" -eq 0 ]; then
  chown root:kvm /dev/kvm && chmod 0660 /dev/kvm || echo "setup: could not set /dev/kvm to root:kvm 0660" >&2
fi

# npm modules: reinstall only when the lock changed since the last install.
# Native modules (better-sqlite3, zstd-napi) build from source here (about 3 minutes), so a built
# node_modules is kept per lock hash in a machine-wide cache and reused when it still loads.
stamp=node_modules/.bulwark-lock-hash
hash=$(sha256sum package-lock.json | cut -d' ' -f1)
cache_dir=${BULWARK_CACHE:-/var/cache/bulwark}
cached="$cache_dir/node_modules-$hash-node$(node -p process.versions.modules).tar"
modules_load() {
  node -e 'require("better-sqlite3")(":memory:").close(); require("zstd-napi"); require("lz4-napi"); require("@node-rs/crc32"); require("@node-rs/argon2")' 2>/dev/null
}
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$hash" ] || ! modules_load; then
  if [ -f "$cached" ]; then
    echo "setup: restoring npm modules from $cached"
    rm -rf node_modules && tar -xf "$cached"
  fi
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$hash" ] || ! modules_load; then
    echo "setup: installing npm modules (native modules build from source: about 3 minutes)"
    npm ci --no-audit --no-fund --loglevel=error
    echo "$hash" > "$stamp"
    modules_load || { echo "setup: npm modules installed but a native module does not load" >&2; exit 1; }
    if mkdir -p "$cache_dir" 2>/dev/null && [ -w "$cache_dir" ]; then
      tar -cf "$cached.tmp" node_modules && mv "$cached.tmp" "$cached"
      find "$cache_dir" -name 'node_modules-*.tar' ! -name "$(basename "$cached")" -mmin +1440 -delete 2>/dev/null || true
    fi
  fi
fi
