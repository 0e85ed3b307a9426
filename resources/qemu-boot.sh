#!/usr/bin/env bash
# Boots the guest built by build.sh under QEMU's microvm (the peer), running
# SCRIPT as /init's job, exactly as the tests do with vmm: the script goes on a
# raw virtio disk and its exit status comes back through isa-debug-exit
# (QEMU exits with (status << 1) | 1). Usage: [SMP=N] qemu-boot.sh SCRIPT [DISK...]
# (SMP: vCPUs, default 1)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
[ $# -ge 1 ] || { echo "usage: $0 SCRIPT [DISK...]" >&2; exit 2; }
script=$1; shift
"$here/install-qemu.sh"
source "$here/guest-env.sh"
padded=$(mktemp)
trap 'rm -f "$padded"' EXIT
cat "$script" > "$padded"
truncate -s %512 "$padded"
args=()
letter=a
for disk in "$@"; do
    args+=(-drive "id=d$letter,file=$disk,format=raw,if=none" -device "virtio-blk-device,drive=d$letter")
    letter=$(echo "$letter" | tr a-y b-z)
done
args+=(-drive "id=script,file=$padded,format=raw,if=none,readonly=on" -device virtio-blk-device,drive=script)
exec qemu-system-x86_64 -M microvm,acpi=off -enable-kvm -cpu "$cpu" -smp "${SMP:-1}" -m 128 \
    -nographic -no-reboot \
    -kernel "$vmlinux" -initrd "$initrd" -append "$cmdline addcow.run=/dev/vd$letter" \
    -device isa-debug-exit,iobase=0xf4,iosize=4 "${args[@]}"
