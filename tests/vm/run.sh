#!/usr/bin/env bash
# Boots a pure cgroup v2 Debian host with systemd as PID 1 under qemu and runs
# tests/vm/guest/checks.sh in it against the installed carapace service.
#
#   tests/vm/run.sh OUTDIR
#
# Environment:
#   CARAPACE_VM_BINDIR   directory with carapace, carapace-client, carapace-gateway,
#                        carapace-channel (default: target/debug of this checkout)
#   CARAPACE_VM_TESTBINS colon-separated test executables to run inside the guest (optional; the
#                        Rust test passes the cgroup module's test binary here)
#   CARAPACE_VM_CACHE    cache directory for the root and the kernel (default /var/cache/carapace-vm)
#   CARAPACE_VM_TIMEOUT  seconds before qemu is killed (default 600)
#
# Writes OUTDIR/console.log (the guest's console), OUTDIR/results.log (the checks' report, from
# the guest's second serial port) and OUTDIR/times.log (this script's stage times). Exit 0 only
# when the report ends with a summary line saying that nothing failed; 2 when the VM could not be
# built or booted; 1 when checks failed or the report is incomplete.
#
# Needs root, qemu-system-x86_64, debootstrap, mkfs.ext4 (e2fsprogs >= 1.43), cc (the bombs are
# compiled on the host, statically). tests/vm/setup.sh installs them.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
out=${1:?usage: run.sh OUTDIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
VM_CACHE=${CARAPACE_VM_CACHE:-/var/cache/carapace-vm}
bindir=${CARAPACE_VM_BINDIR:-$repo/target/debug}
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

# install_carapace ROOT: the programs and the shipped units. Replace the body with
# `dpkg --root`/`chroot ROOT dpkg -i carapace_*.deb` once the Debian package is built in CI.
install_carapace() {
  local r=$1 b
  for b in carapace carapace-client carapace-gateway carapace-channel; do
    [ -x "$bindir/$b" ] || die "$bindir/$b is missing: cargo build --workspace --bins first"
    install -m 0755 "$bindir/$b" "$r/usr/bin/$b"
  done
  install -m 0644 "$repo/supervisor/systemd/carapace.service" \
    "$repo/supervisor/systemd/carapace.socket" "$r/usr/lib/systemd/system/"
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
  "$bindir/carapace" policy check "$lib/$p.toml" >"$out/$p.check" 2>&1 ||
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
install -m 0644 "$here/guest/carapace-vm-checks.service" "$root/etc/systemd/system/"
mkdir -p "$root/etc/systemd/system/multi-user.target.wants"
ln -sf ../carapace-vm-checks.service \
  "$root/etc/systemd/system/multi-user.target.wants/carapace-vm-checks.service"

# The image: an ext4 file system made from the directory (no loop mount), with room to spare
# for the service's state and the journal.
img="$work/disk.img"
size_mb=$(($(du -sm "$root" | cut -f1) + 512))
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
  -accel tcg -m 2048 -smp 2 \
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
