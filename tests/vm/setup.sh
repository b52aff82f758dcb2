#!/usr/bin/env bash
# Installs what tests/vm/run.sh needs on a Debian bookworm host (as root; idempotent):
#   qemu-system-x86 from bookworm-backports (>= 8): bookworm's 7.2 corrupts guest state under
#     software emulation on hosts with AVX-512 (double faults and garbage EFLAGS in the guest
#     kernel within seconds of boot, with or without -smp 1),
#   debootstrap, e2fsprogs (mkfs.ext4 -d), gcc + libc6-dev (the bombs are linked statically).
# The backports suite is added with its normal (low) pin priority, so nothing else comes from
# it unless asked for with -t.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
  echo "tests/vm/setup.sh: must run as root" >&2
  exit 1
fi

list=/etc/apt/sources.list.d/bookworm-backports.list
if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  echo "deb http://deb.debian.org/debian bookworm-backports main" >"$list"
  apt-get update -qq
fi

need=()
qemu_major=$(dpkg-query -W -f '${Version}' qemu-system-x86 2>/dev/null | sed 's/^[0-9]*://; s/\..*//')
if [ -z "$qemu_major" ] || [ "$qemu_major" -lt 8 ]; then
  need_bpo=(qemu-system-x86)
else
  need_bpo=()
fi
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v cc >/dev/null || need+=(gcc)
[ -e /usr/lib/x86_64-linux-gnu/libc.a ] || need+=(libc6-dev)
if [ ${#need[@]} -gt 0 ] || [ ${#need_bpo[@]} -gt 0 ]; then
  apt-get update -qq
fi
if [ ${#need[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
if [ ${#need_bpo[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    -t bookworm-backports "${need_bpo[@]}"
fi
qemu-system-x86_64 --version | head -n1
