#!/usr/bin/env bash
# Builds the tiny test guest the integration tests boot under QEMU (TCG): a stock Debian kernel
# (ELF vmlinux for PVH boot, and vmlinuz), a busybox initramfs that loads the virtio and ext4
# modules, and an ext4 root disk (root.qcow2, label guestroot) with busybox, qemu-guest-agent and
# /srv/testdata (files, a dir with spaces, a symlink, SHA256SUMS). Nothing is installed on the
# host: packages are fetched with `apt-get download` and unpacked with `dpkg-deb -x`.
#
# The result is cached by the SHA-256 of its recipe (this script + test/fixtures/guest/*) in
#   ${BULWARK_TEST_CACHE:-/var/tmp/bulwark-test-cache}/guest-<hash>/
# built once under a lock (parallel callers wait, then reuse it). The last line printed on
# stdout is that directory. Usage: scripts/build-test-guest.sh [--print-hash]
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
inputs="$here/test/fixtures/guest"
cache=${BULWARK_TEST_CACHE:-/var/tmp/bulwark-test-cache}

recipe_hash() {
  {
    sha256sum "$here/scripts/build-test-guest.sh" | cut -d' ' -f1
    (cd "$inputs" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum)
  } | sha256sum | cut -c1-16
}
hash=$(recipe_hash)
if [ "${1:-}" = "--print-hash" ]; then echo "$hash"; exit 0; fi

out="$cache/guest-$hash"
mkdir -p "$cache"
if [ -f "$out/guest.json" ]; then echo "$out"; exit 0; fi

exec 9>"$cache/guest-$hash.lock"
flock 9
if [ -f "$out/guest.json" ]; then echo "$out"; exit 0; fi

log() { echo "build-test-guest: $*" >&2; }
started=$(date +%s.%N)
work=$(mktemp -d "$cache/.guest-$hash.build.XXXXXX")
trap 'rm -rf "$work"' EXIT
debs="$work/debs" kern="$work/kernel" initrd="$work/initrd" root="$work/root"
mkdir -p "$debs" "$kern" "$initrd" "$root"

# --- packages -------------------------------------------------------------------------------
kernel_pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
if [ -z "$kernel_pkg" ]; then
  log "apt lists do not know linux-image-amd64; running apt-get update"
  apt-get update -qq
  kernel_pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
fi
[ -n "$kernel_pkg" ] || { log "cannot resolve the kernel package of linux-image-amd64"; exit 1; }
# qemu-guest-agent and its shared-library closure (checked below with the guest's own ld.so).
root_pkgs=(busybox-static qemu-guest-agent libc6 libgcc-s1 libglib2.0-0 libnuma1 libudev1 liburing2
  libffi8 libmount1 libblkid1 libselinux1 libpcre2-8-0 zlib1g)
log "downloading $kernel_pkg ${root_pkgs[*]}"
download() { (cd "$debs" && apt-get download -qq "$@" 2>&1 | grep -v 'unsandboxed' >&2 || true); }
download "$kernel_pkg" "${root_pkgs[@]}"
if [ "$(ls "$debs"/*.deb | wc -l)" -lt $((${#root_pkgs[@]} + 1)) ]; then
  log "some downloads failed; running apt-get update and retrying"
  apt-get update -qq
  rm -f "$debs"/*.deb
  download "$kernel_pkg" "${root_pkgs[@]}"
fi
[ "$(ls "$debs"/*.deb | wc -l)" -eq $((${#root_pkgs[@]} + 1)) ] || { log "apt-get download failed"; ls "$debs" >&2; exit 1; }

# --- kernel -----------------------------------------------------------------------------------
dpkg-deb -x "$debs/${kernel_pkg}"_*.deb "$kern"
kver=$(ls "$kern/lib/modules" | head -1)
cp "$kern/boot/vmlinuz-$kver" "$work/vmlinuz"
# vmlinuz = boot stub + xz payload; the payload is the ELF vmlinux, which QEMU boots via PVH
# (about 2 s faster under TCG than the bzImage decompressor).
xz_at=$(grep -abo $'\xfd7zXZ\x00' "$work/vmlinuz" | head -1 | cut -d: -f1)
[ -n "$xz_at" ] || { log "no xz payload in vmlinuz-$kver"; exit 1; }
tail -c +$((xz_at + 1)) "$work/vmlinuz" | xz -dc -q > "$work/vmlinux" 2>/dev/null || true
[ "$(head -c 4 "$work/vmlinux" | od -An -tx1 | tr -d ' ')" = 7f454c46 ] || { log "extracted vmlinux is not ELF"; exit 1; }
depmod -b "$kern" "$kver"

# Modules in load order (dependencies first), resolved from modules.dep; built-ins are skipped.
moddir="$kern/lib/modules/$kver"
declare -A loaded=()
order=()
find_module() { # name -> relative path in modules.dep, or empty
  local n=${1//-/_} line path base
  while IFS= read -r line; do
    path=${line%%:*}; base=${path##*/}; base=${base%%.ko*}; base=${base//-/_}
    [ "$base" = "$n" ] && { echo "$path"; return; }
  done < "$moddir/modules.dep"
}
add_module() { # relative path
  local path=$1 deps d
  [ -n "${loaded[$path]:-}" ] && return
  loaded[$path]=1
  deps=$(grep -m1 "^$path:" "$moddir/modules.dep" | cut -d: -f2)
  for d in $deps; do add_module "$d"; done
  order+=("$path")
}
for m in virtio_pci virtio_blk virtio_console virtio-rng crc32c_generic ext4; do
  p=$(find_module "$m")
  if [ -z "$p" ]; then
    grep -q "/${m//-/_}.ko\|/${m}.ko" "$moddir/modules.builtin" && continue
    log "kernel module $m not found in $kver"; exit 1
  fi
  add_module "$p"
done
log "kernel $kver, modules: ${order[*]##*/}"

# --- initramfs --------------------------------------------------------------------------------
mkdir -p "$initrd/bin" "$initrd/lib/modules"
dpkg-deb -x "$debs"/busybox-static_*.deb "$work/bb"
cp "$work/bb/bin/busybox" "$initrd/bin/busybox"
: > "$initrd/modules.load"
for p in "${order[@]}"; do
  name=${p##*/}
  case "$name" in
    *.ko.xz) xz -dc "$moddir/$p" > "$initrd/lib/modules/${name%.xz}"; name=${name%.xz} ;;
    *.ko.zst) zstd -qdc "$moddir/$p" > "$initrd/lib/modules/${name%.zst}"; name=${name%.zst} ;;
    *) cp "$moddir/$p" "$initrd/lib/modules/$name" ;;
  esac
  echo "$name" >> "$initrd/modules.load"
done
install -m 0755 "$inputs/initramfs-init" "$initrd/init"
(cd "$initrd" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet) | gzip -9n > "$work/initrd.img"

# --- root file system -------------------------------------------------------------------------
for d in "$debs"/*.deb; do
  case "$d" in */"$kernel_pkg"_*) continue ;; esac
  dpkg-deb -x "$d" "$root"
done
mkdir -p "$root"/{proc,sys,dev,run,tmp,root,etc,var/log,srv,sbin,bin,usr/bin,usr/sbin}
ln -sfn ../run "$root/var/run"
chmod 1777 "$root/tmp"
# busybox applets as symlinks, except where a real file (or our init/shutdown) is installed.
for a in $("$root/bin/busybox" --list-full); do
  [ -e "$root/$a" ] || [ -L "$root/$a" ] || ln -s /bin/busybox "$root/$a"
done
install -m 0755 "$inputs/rootfs-init" "$root/sbin/init"
install -m 0755 "$inputs/rootfs-shutdown" "$root/sbin/shutdown"
echo "root:x:0:0:root:/root:/bin/sh" > "$root/etc/passwd"
echo "root:x:0:" > "$root/etc/group"
echo bulwark-guest > "$root/etc/hostname"
printf '/dev/vda / ext4 rw 0 1\n' > "$root/etc/fstab"
# The agent must load with the guest's own libraries only.
ldso="$root/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
libpath="$root/lib/x86_64-linux-gnu:$root/usr/lib/x86_64-linux-gnu"
if "$ldso" --library-path "$libpath" --list "$root/usr/sbin/qemu-ga" | grep -q 'not found'; then
  log "qemu-ga misses libraries in the guest:"; "$ldso" --library-path "$libpath" --list "$root/usr/sbin/qemu-ga" >&2; exit 1
fi
ldconfig -r "$root" 2>/dev/null || true

# Test data: deterministic contents with unaligned sizes, checked by the tests after a restore.
td="$root/srv/testdata"
mkdir -p "$td/dir with spaces"
stream() { (openssl enc -aes-128-ctr -nosalt -pass "pass:$1" -pbkdf2 -in /dev/zero 2>/dev/null || true) | head -c "$2"; }
for i in $(seq 1 400); do echo "line $i of the Bulwark test guest's text file"; done > "$td/alpha.txt"
stream bulwark-one $((1024 * 1024 + 123)) > "$td/random-1m.bin"
stream bulwark-three $((3 * 1024 * 1024 + 4097)) > "$td/random-3m.bin"
head -c $((256 * 1024)) /dev/zero > "$td/zeros-256k.bin"
: > "$td/empty"
echo "a file in a directory whose name has spaces" > "$td/dir with spaces/file with spaces.txt"
ln -s alpha.txt "$td/link-to-alpha"
(cd "$td" && find . -type f -print0 | LC_ALL=C sort -z | sed -z 's|^\./||' | xargs -0 sha256sum) > "$work/SHA256SUMS"
mv "$work/SHA256SUMS" "$td/SHA256SUMS"

# ext4 made from the directory (no mount), 128 MiB virtual, fixed UUID for reproducibility.
truncate -s 128M "$work/root.raw"
mkfs.ext4 -q -F -L guestroot -U 6b756c77-6172-4b00-8000-000000000001 -E root_owner=0:0 \
  -d "$root" "$work/root.raw"
qemu-img convert -q -f raw -O qcow2 "$work/root.raw" "$work/root.qcow2"

# --- publish ----------------------------------------------------------------------------------
elapsed=$(awk "BEGIN { printf \"%.1f\", $(date +%s.%N) - $started }")
{
  echo "{"
  echo "  \"recipeHash\": \"$hash\","
  echo "  \"kernelPackage\": \"$kernel_pkg\","
  echo "  \"kernelVersion\": \"$kver\","
  echo "  \"rootLabel\": \"guestroot\","
  echo "  \"testdataDir\": \"/srv/testdata\","
  echo "  \"buildSeconds\": $elapsed,"
  echo "  \"testdata\": {"
  first=1
  while IFS= read -r line; do
    sum=${line%% *}; name=${line#*  }
    [ $first = 1 ] || echo ","
    printf '    "%s": "%s"' "$name" "$sum"
    first=0
  done < "$td/SHA256SUMS"
  echo ""
  echo "  }"
  echo "}"
} > "$work/guest.json"
mkdir -p "$work/out"
mv "$work/vmlinux" "$work/vmlinuz" "$work/initrd.img" "$work/root.qcow2" "$work/out/"
mv "$work/guest.json" "$work/out/guest.json"
rm -rf "$out"
mv "$work/out" "$out"
log "built $out in ${elapsed}s"
echo "$out"
