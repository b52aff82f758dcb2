#!/usr/bin/env bash
# Builds what every VM run starts from, once, into a cache directory:
#   $CACHE/root-$KEY/root     a minimal Debian bookworm root with systemd as PID 1
#   $CACHE/root-$KEY/vmlinuz  the kernel from bookworm-backports (6.12, cloud flavour)
# KEY is a hash of this file, so changing the package list or a step below builds a new root;
# older roots are removed. Sourced by run.sh (needs root, debootstrap, apt-get, dpkg-deb).
#
# The kernel .deb is fetched with a private apt configuration under $CACHE/apt that knows only
# bookworm-backports: the host's own apt sources and pin priorities are left as they are.

# Packages on top of debootstrap's minbase: as little as boots to systemd and runs the checks
# (python3: the cgroup module's tests run python3 as their memory hog and fork bomb, and the
# escape suite's python attacks need ctypes and socket, which python3-minimal lacks). No C
# compiler: the escape suite's attack programs are compiled on the host and copied in. kmod: the
# kernel's on-demand module loading (modprobe) of the vsock modules. libpam-systemd: without
# pam_systemd, user@.service has no $XDG_RUNTIME_DIR and `systemd --user` does not start. make:
# escape_build checks its attacks run under the same confinement as the default policy's build
# tools, taking /usr/bin/make as the sample.
VM_PACKAGES=systemd,systemd-sysv,dbus,libpam-systemd,python3,kmod,make
VM_SUITE=bookworm
VM_MIRROR=http://deb.debian.org/debian
# The kernel: the cloud flavour has virtio (block, console, net) and ext4 built in, so it boots
# without an initramfs; 6.12 has every cgroup v2 controller and Landlock ABI 6.
VM_KERNEL_META=linux-image-cloud-amd64

vm_root_key() {
  sha256sum "${BASH_SOURCE[0]}" | cut -c1-16
}

# vm_private_apt ARGS...: apt-get with only bookworm-backports, state under $CACHE/apt.
vm_private_apt() {
  local a="$VM_CACHE/apt"
  mkdir -p "$a/lists/partial" "$a/cache/archives/partial" "$a/etc"
  [ -f "$a/etc/sources.list" ] ||
    echo "deb $VM_MIRROR bookworm-backports main" >"$a/etc/sources.list"
  "$@" -o Dir::Etc::SourceList="$a/etc/sources.list" -o Dir::Etc::SourceParts=/dev/null \
    -o Dir::State::Lists="$a/lists" -o Dir::Cache="$a/cache" -o APT::Get::List-Cleanup=0 -q
}

# vm_fetch_kernel DIR: extract the newest 6.x cloud kernel from bookworm-backports into DIR.
vm_fetch_kernel() {
  local dir=$1 pkg deb
  vm_private_apt apt-get update >&2
  # The metapackage names the current kernel package (linux-image-6.12.N+bpo-cloud-amd64).
  pkg=$(vm_private_apt apt-cache depends "$VM_KERNEL_META" |
    sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-cloud-amd64\)$/\1/p' | head -n1)
  [ -n "$pkg" ] || { echo "vm: cannot find the kernel package behind $VM_KERNEL_META" >&2; return 1; }
  echo "vm: kernel package $pkg" >&2
  (cd "$dir" && vm_private_apt apt-get download "$pkg" >&2)
  deb=$(ls "$dir"/linux-image-*.deb)
  dpkg-deb -x "$deb" "$dir/kernel"
  cp "$dir"/kernel/boot/vmlinuz-* "$dir/vmlinuz"
  cp "$dir"/kernel/boot/config-* "$dir/kernel.config"
  echo "$pkg" >"$dir/kernel.package"
  # Modules are not needed (see VM_KERNEL_META) but for AF_VSOCK (vsock, vsock_loopback): the
  # escape suite's vsock attack needs the family to work unconfined on the host for its CONTROL.
  mkdir -p "$dir/modules"
  cp -a "$dir"/kernel/lib/modules/* "$dir/modules/" 2>/dev/null || true
  find "$dir/modules" -mindepth 1 -maxdepth 1 -type d | while read -r v; do
    find "$v" -mindepth 1 -maxdepth 1 ! -name kernel -exec rm -rf {} +
    find "$v/kernel" -mindepth 1 -maxdepth 1 ! -name net -exec rm -rf {} +
    find "$v/kernel/net" -mindepth 1 -maxdepth 1 ! -name vmw_vsock -exec rm -rf {} +
  done
  rm -rf "$dir/kernel" "$deb"
}

# vm_debootstrap DIR: the root file system.
vm_debootstrap() {
  local root=$1/root
  debootstrap --variant=minbase --include="$VM_PACKAGES" "$VM_SUITE" "$root" "$VM_MIRROR" >&2
  # No network, no console login needed: the checks unit runs and powers off.
  echo carapace-vm >"$root/etc/hostname"
  : >"$root/etc/machine-id"
  # The root is given on the kernel command line; nothing else to mount.
  : >"$root/etc/fstab"
  # Units that only cost boot time in a throw-away VM without network or logins (without udev,
  # a getty waits 90 s for its device unit).
  for u in apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer \
    fstrim.timer systemd-networkd-wait-online.service getty@tty1.service \
    serial-getty@ttyS0.service; do
    ln -sf /dev/null "$root/etc/systemd/system/$u"
  done
  # The vsock modules kept by vm_fetch_kernel (loaded on demand by the kernel through modprobe).
  mkdir -p "$root/lib/modules"
  cp -a "$1"/modules/* "$root/lib/modules/"
  for v in "$root"/lib/modules/*; do chroot "$root" depmod "$(basename "$v")"; done
  # A user for the rootless checks (uid 1000 like the sandbox user, a home, lingering allowed).
  chroot "$root" useradd --create-home --uid 1000 --shell /bin/bash carapace-user >&2 || true
  rm -rf "$root/var/cache/apt/archives/"*.deb "$root/var/lib/apt/lists/"* "$root/usr/share/doc" \
    "$root/usr/share/man" "$root/usr/share/locale"
}

# vm_root: print the path of the cached root directory (root/ and vmlinuz inside), building it
# first if it is missing.
vm_root() {
  local key dir tmp
  key=$(vm_root_key)
  dir="$VM_CACHE/root-$key"
  if [ -f "$dir/complete" ]; then
    touch "$dir/complete"
    echo "vm: cached root $dir" >&2
    echo "$dir"
    return 0
  fi
  echo "vm: building the root $dir (cold)" >&2
  tmp="$VM_CACHE/tmp-root-$key.$$"
  rm -rf "$tmp"
  mkdir -p "$tmp"
  vm_fetch_kernel "$tmp" || return 1
  vm_debootstrap "$tmp" || return 1
  touch "$tmp/complete"
  # Roots of other versions of this file, unused for a day (other checkouts on this machine may
  # still use theirs: removing it at once would make them rebuild it on every run).
  for old in "$VM_CACHE"/root-*; do
    [ "$old" != "$dir" ] || continue
    if [ ! -f "$old/complete" ] || [ -n "$(find "$old/complete" -mmin +1440)" ]; then
      rm -rf "$old"
    fi
  done
  rm -rf "$dir"
  mv "$tmp" "$dir"
  echo "$dir"
}
