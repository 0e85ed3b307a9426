#!/usr/bin/env bash
# Boots the guest built by build.sh under QEMU's microvm (the peer), running
# SCRIPT as /init's job, exactly as the tests do with vmm: the script goes on a
# raw virtio disk and its exit status comes back through isa-debug-exit
# (QEMU exits with (status << 1) | 1). Usage: qemu-boot.sh SCRIPT [DISK...]
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
[ $# -ge 1 ] || { echo "usage: $0 SCRIPT [DISK...]" >&2; exit 2; }
script=$1; shift
command -v qemu-system-x86_64 >/dev/null || {
    # qemu-system-x86 would remove the newer qemu-utils: install both at one version.
    v=$(apt-cache policy qemu-system-x86 | awk '/Candidate/{print $2}')
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends --allow-downgrades \
        "qemu-system-x86=$v" "qemu-utils=$v" "qemu-system-common=$v" "qemu-block-extra=$v" >&2
}
eval "$("$here/build.sh" --quiet | sed -E 's/^([a-z]+)=(.*)$/\1="\2"/')"
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
exec qemu-system-x86_64 -M microvm,acpi=off -enable-kvm -cpu host -m 256 -nographic -no-reboot \
    -kernel "$vmlinux" -initrd "$initrd" -append "$cmdline addcow.run=/dev/vd$letter" \
    -device isa-debug-exit,iobase=0xf4,iosize=4 "${args[@]}"
