#!/usr/bin/env bash
# Boots a pure cgroup v2 Debian host with systemd as PID 1 under qemu and runs
# tests/vm/guest/checks.sh in it against the installed carapace service.
#
#   tests/vm/run.sh OUTDIR
#
# Environment:
#   CARAPACE_VM_DEB      the Debian package to install (supervisor/packaging/build-deb; required)
#   CARAPACE_VM_TESTBINS colon-separated test executables to run inside the guest (optional; the
#                        Rust test passes the cgroup module's test binary here)
#   CARAPACE_VM_ESCAPE   colon-separated escape suite executables (tests/tests/escape*.rs) to run
#                        inside the guest as root (optional)
#   CARAPACE_VM_ATTACKS  the compiled attack directory of those (/var/tmp/carapace-attacks-*,
#                        carapace_tests::attacks()); copied to the same path in the guest, with
#                        tests/attacks and policies/ of this checkout at this checkout's path
#                        (the escape tests hash and read them there)
#   CARAPACE_VM_CACHE    cache directory for the root and the kernel (default /var/cache/carapace-vm)
#   CARAPACE_VM_TIMEOUT  seconds before qemu is killed (default 600)
#
# Writes OUTDIR/console.log (the guest's console), OUTDIR/results.log (the checks' report, from
# the guest's second serial port) and OUTDIR/times.log (this script's stage times). Exit 0 only
# when the report ends with a summary line saying that nothing failed; 2 when the VM could not be
# built or booted; 1 when checks failed or the report is incomplete.
#
# Needs root, qemu-system-x86_64, debootstrap, mkfs.ext4 (e2fsprogs >= 1.43), cc (the bombs are
# compiled on the host, statically), dpkg-deb. tests/vm/setup.sh installs them.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
out=${1:?usage: run.sh OUTDIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
VM_CACHE=${CARAPACE_VM_CACHE:-/var/cache/carapace-vm}
deb=${CARAPACE_VM_DEB:-}
timeout_s=${CARAPACE_VM_TIMEOUT:-600}
: >"$out/times.log"
: >"$out/console.log"
: >"$out/results.log"

die() {
  echo "vm: $*" >&2
  exit 2
}
now() { date +%s.%N; }
stage() { # stage NAME START
  awk -v n="$1" -v a="$2" -v b="$(now)" 'BEGIN { printf "%s: %.1f s\n", n, b - a }' |
    tee -a "$out/times.log" >&2
}

[ "$(id -u)" -eq 0 ] || die "must run as root (debootstrap, chroot, image ownership)"
for tool in qemu-system-x86_64 debootstrap mkfs.ext4 dpkg-deb apt-get cc; do
  command -v "$tool" >/dev/null || die "$tool is missing: run tests/vm/setup.sh (as root) first"
done
mkdir -p "$VM_CACHE"

# shellcheck source=tests/vm/root.sh
source "$here/root.sh"

# --- the cached root and kernel --------------------------------------------------------------
t=$(now)
base=$(vm_root) || die "building the root failed"
stage "image: root + kernel (cold build or cache)" "$t"

# --- this run's root -------------------------------------------------------------------------
t=$(now)
work="$out/work"
rm -rf "$work"
mkdir -p "$work"
root="$work/root"
cp -a "$base/root" "$root"

# install_carapace ROOT: the Debian package, installed by the guest's own dpkg in a chroot, so
# its maintainer scripts run for real (without a running systemd there, deb-systemd-helper only
# records the units' state). The package must enable and start nothing: the checks start what
# they need themselves.
install_carapace() {
  local r=$1 name
  [ -n "$deb" ] || die "CARAPACE_VM_DEB is not set (the .deb from supervisor/packaging/build-deb)"
  [ -f "$deb" ] || die "the package $deb is missing"
  name=$(basename "$deb")
  cp "$deb" "$r/tmp/$name"
  chroot "$r" env DEBIAN_FRONTEND=noninteractive dpkg -i "/tmp/$name" >"$out/dpkg.log" 2>&1 ||
    die "dpkg -i $name in the guest root failed: $(cat "$out/dpkg.log")"
  rm -f "$r/tmp/$name"
  chroot "$r" dpkg-query -W -f '${Package} ${Version} ${Status}\n' carapace >>"$out/dpkg.log"
  grep -q ' install ok installed$' "$out/dpkg.log" || die "carapace is not installed: $(cat "$out/dpkg.log")"
  local enabled
  enabled=$(find "$r/etc/systemd/system" -name 'carapace*' -printf '%P\n' 2>/dev/null)
  [ -z "$enabled" ] || die "the package enabled units by itself: $enabled"
  for b in usr/bin/carapace usr/bin/carapace-client usr/libexec/carapace/carapace-gateway \
    usr/libexec/carapace/carapace-channel usr/lib/systemd/system/carapace.service \
    usr/lib/systemd/system/carapace.socket; do
    [ -e "$r/$b" ] || die "the package did not install /$b"
  done
}
install_carapace "$root"

# The checks, their helpers and the unit that runs them at boot and powers off.
lib="$root/usr/local/lib/carapace-vm"
mkdir -p "$lib/tests"
install -m 0755 "$here/guest/checks.sh" "$lib/checks.sh"
install -m 0644 "$here/guest/carapace.toml" "$lib/"
# The checks' policies: the default policy with rules for the bombs (tool profile) and for the
# probe whose decision a reload changes (/usr/bin/id: denied, then allowed), and a broken one.
vm_policy() { # vm_policy APPROVAL-OF-ID
  local extra
  extra=$(
    cat <<EOF
[[exec]]
why = "VM checks: the memory bomb and the fork bomb, under the tool profile's limits"
programs = ["/usr/local/lib/carapace-vm/membomb", "/usr/local/lib/carapace-vm/forkbomb"]
profile = "tool"
approval = "allow"

[[exec]]
why = "VM checks: the probe whose decision a reload changes"
programs = ["/usr/bin/id"]
profile = "tool"
approval = "$1"

EOF
  )
  awk -v extra="$extra" '!done && $0 == "[[exec]]" { print extra; done = 1 } { print }' \
    "$repo/policies/default.toml"
}
vm_policy deny >"$lib/policy-deny-id.toml"
vm_policy allow >"$lib/policy-allow-id.toml"
printf 'version = 1\n[profiles.tool\nthis is not TOML\n' >"$lib/policy-broken.toml"
for p in policy-deny-id policy-allow-id; do
  "$root/usr/bin/carapace" policy check "$lib/$p.toml" >"$out/$p.check" 2>&1 ||
    die "$p.toml is not a valid policy: $(cat "$out/$p.check")"
done
for prog in membomb forkbomb; do
  cc -O1 -static -Wall -o "$lib/$prog" "$here/guest/$prog.c" || die "cannot compile $prog.c"
done
if [ -n "${CARAPACE_VM_TESTBINS:-}" ]; then
  IFS=: read -r -a testbins <<<"$CARAPACE_VM_TESTBINS"
  for b in "${testbins[@]}"; do
    [ -x "$b" ] || die "test binary $b is missing"
    install -m 0755 "$b" "$lib/tests/"
  done
fi
if [ -n "${CARAPACE_VM_ESCAPE:-}" ]; then
  mkdir -p "$lib/escape"
  IFS=: read -r -a escbins <<<"$CARAPACE_VM_ESCAPE"
  for b in "${escbins[@]}"; do
    [ -x "$b" ] || die "escape test binary $b is missing"
    # The name without cargo's hash: escape-0123abcd -> escape.
    install -m 0755 "$b" "$lib/escape/$(basename "$b" | sed 's/-[0-9a-f]\{16\}$//')"
  done
  attacks=${CARAPACE_VM_ATTACKS:?CARAPACE_VM_ATTACKS must name the compiled attacks}
  [ -x "$attacks/attack" ] && [ -u "$attacks/suid-whoami" ] ||
    die "$attacks does not hold the compiled attacks (attack, set-uid suid-whoami)"
  mkdir -p "$root$(dirname "$attacks")" "$root$repo/tests" "$root$repo/policies"
  cp -a "$attacks" "$root$attacks"
  cp -a "$repo/tests/attacks" "$root$repo/tests/"
  cp -a "$repo/policies/default.toml" "$root$repo/policies/"
fi
# Rootless: the user unit for `carapace run` under carapace-user's `systemd --user` (lingering,
# so its user manager starts at boot) and that user's configuration.
install -D -m 0644 "$here/guest/carapace-user.service" \
  "$root/home/carapace-user/.config/systemd/user/carapace.service"
install -D -m 0644 "$here/guest/carapace-user.toml" \
  "$root/home/carapace-user/.config/carapace/carapace.toml"
install -m 0644 "$lib/policy-allow-id.toml" "$root/home/carapace-user/.config/carapace/policy.toml"
chroot "$root" chown -R carapace-user: /home/carapace-user
mkdir -p "$root/var/lib/systemd/linger"
touch "$root/var/lib/systemd/linger/carapace-user"
install -m 0644 "$here/guest/carapace-vm-checks.service" "$root/etc/systemd/system/"
mkdir -p "$root/etc/systemd/system/multi-user.target.wants"
ln -sf ../carapace-vm-checks.service \
  "$root/etc/systemd/system/multi-user.target.wants/carapace-vm-checks.service"

# The image: an ext4 file system made from the directory (no loop mount), with room to spare
# for the service's state, the journal and the escape suite's disk fill (a sparse file).
img="$work/disk.img"
size_mb=$(($(du -sm "$root" | cut -f1) + 1536))
mkfs.ext4 -q -F -L carapace-vm -d "$root" "$img" "${size_mb}M" || die "mkfs.ext4 failed"
rm -rf "$root"
stage "image: per-run copy, install, mkfs.ext4" "$t"

# --- boot ------------------------------------------------------------------------------------
# The cloud kernel has NVMe, ext4 and the 8250 serial console built in: no initramfs. ttyS0 is
# the console, ttyS1 the checks' report (both into files, nothing is scraped from the console).
# panic=1 with -no-reboot: a kernel panic ends qemu instead of hanging until the timeout.
t=$(now)
set +e
timeout --kill-after=10 "$timeout_s" qemu-system-x86_64 \
  -accel tcg -m 6144 -smp 2 \
  -display none -monitor none -no-reboot \
  -kernel "$base/vmlinuz" \
  -append "root=/dev/nvme0n1 rw rootfstype=ext4 console=ttyS0 panic=1 systemd.unified_cgroup_hierarchy=1 systemd.show_status=1 systemd.log_color=0 quiet" \
  -drive "file=$img,if=none,id=root,format=raw" -device nvme,drive=root,serial=carapace-vm \
  -serial "file:$out/console.log" -serial "file:$out/results.log" \
  -nic none
qemu_rc=$?
set -e
stage "boot + checks (qemu, until power-off)" "$t"
rm -f "$img"
if [ "$qemu_rc" -eq 124 ] || [ "$qemu_rc" -eq 137 ]; then
  echo "vm: qemu killed after ${timeout_s}s (hung guest)" >&2
  exit 2
fi
[ "$qemu_rc" -eq 0 ] || die "qemu exited with status $qemu_rc"

# --- the report ------------------------------------------------------------------------------
tr -d '\r' <"$out/results.log" >"$out/results.txt"
summary=$(grep -E '^SUMMARY ' "$out/results.txt" | tail -n1 || true)
if [ -z "$summary" ]; then
  echo "vm: no SUMMARY line in the report (the checks did not finish)" >&2
  exit 1
fi
echo "vm: $summary" >&2
case "$summary" in
*" failed=0 "*) exit 0 ;;
*) exit 1 ;;
esac
