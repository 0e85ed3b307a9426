#!/usr/bin/env bash
# SMP stress of the test guest, under vmm or QEMU microvm (the peer): four
# shells each start PROCS processes, every one pinned with `taskset` to
# alternating CPUs, while a fifth shell moves the four between the CPUs.
# Prints the guest seconds it took and how many segfaults `dmesg` counted.
# This is how the KVM PV feature bits of vmm/src/x86_64/cpuid.rs were
# measured; a busy loop on the host beside it makes the host preempt vCPUs.
# Usage: scripts/smp-stress.sh [--qemu] [PROCS]   (default 100; 2 vCPUs)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
engine=vmm
if [ "${1:-}" = --qemu ]; then engine=qemu; shift; fi
procs=${1:-100}
case $procs in '' | *[!0-9]*) echo "usage: $0 [--qemu] [PROCS]" >&2; exit 2 ;; esac

source resources/guest-env.sh
work=$(mktemp -d /var/tmp/smp-stress.XXXXXX)
trap 'rm -rf "$work"' EXIT
{ echo "N=$procs"; cat <<'EOF'
t0=$(cut -d' ' -f1 /proc/uptime)
pids=
for w in 0 1 2 3; do
    (
        i=0
        while [ $i -lt $N ]; do
            taskset -c $(( (i + w) % 2 )) cat /proc/self/stat > /dev/null
            i=$((i + 1))
        done
    ) &
    pids="$pids $!"
done
(
    j=0
    while [ $j -lt $((N / 2)) ]; do
        for p in $pids; do taskset -p -c $((j % 2)) $p > /dev/null 2>&1; done
        j=$((j + 1))
    done
) &
wait
t1=$(cut -d' ' -f1 /proc/uptime)
echo "STRESS cpus $(nproc) seconds $t0 -> $t1 segfaults $(dmesg | grep -c segfault)"
dmesg | grep segfault || true
EOF
} > "$work/script.sh"
truncate -s %512 "$work/script.sh"

if [ "$engine" = vmm ]; then
    cargo build --release --quiet -p vmm
    target/release/vmm --kernel "$vmlinux" --initrd "$initrd" --exit-port --vcpus 2 \
        --cmdline "$cmdline addcow.run=/dev/vda" --disk "$work/script.sh,ro,format=raw" \
        </dev/null | grep -E "STRESS|segfault|Total of"
else
    # The peer boots the same guest and script (resources/qemu-boot.sh); its
    # exit status is (status << 1) | 1.
    SMP=2 resources/qemu-boot.sh "$work/script.sh" </dev/null | grep -E "STRESS|segfault|Total of" || true
fi
