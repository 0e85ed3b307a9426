#!/usr/bin/env bash
# Test-boot benchmark (issue 16, goal 5): boots the guest the way the tests do
# (vmlinux, test initramfs, the tests' command line and memory, one vCPU, a
# script `true` on a raw disk), under vmm and under QEMU microvm, alternated.
# Prints one line per boot:
#   run_init   guest clock at the kernel's "Run /init as init process", s
#   init       guest clock at /init's banner ("/init started at"), s
#   wall       process start to exit, s
# The guest clock runs on while the vCPU waits for a host CPU: the numbers
# are an idle host's only (the header prints the load average).
# A boot that does not reach /init, exits with another status than a clean
# poweroff, or takes more than 600 s fails the script.
# Usage: scripts/bench-boot.sh [ROUNDS]   (default 2)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
rounds=${1:-2}
case $rounds in '' | *[!0-9]* | 0) echo "usage: $0 [ROUNDS >= 1]" >&2; exit 2 ;; esac
mem=$(sed -n 's/^pub const GUEST_MEM: &str = "\([0-9]*\)M";$/\1/p' tests/src/lib.rs)
[ -n "$mem" ] || { echo "bench-boot: GUEST_MEM not found in tests/src/lib.rs" >&2; exit 1; }

resources/install-qemu.sh
source resources/guest-env.sh
cargo build --release --quiet -p vmm

work=$(mktemp -d /var/tmp/bench-boot.XXXXXX)
trap 'rm -rf "$work"' EXIT
echo true > "$work/script.sh"
truncate -s %512 "$work/script.sh"

# Boots one engine once; prints "run_init init wall".
boot() {
    local engine=$1 start end status expected cmd run_init init log=$work/log
    if [ "$engine" = vmm ]; then
        expected=0
        cmd=(target/release/vmm --kernel "$vmlinux" --initrd "$initrd" --exit-port --mem "${mem}M"
             --cmdline "$cmdline addcow.run=/dev/vda" --disk "$work/script.sh,ro,format=raw")
    else
        expected=1 # isa-debug-exit: (status << 1) | 1
        cmd=(qemu-system-x86_64 -M microvm,acpi=off -enable-kvm -cpu "$cpu" -smp 1 -m "$mem"
             -nographic -no-reboot -kernel "$vmlinux" -initrd "$initrd"
             -append "$cmdline addcow.run=/dev/vda" -device isa-debug-exit,iobase=0xf4,iosize=4
             -drive "id=s,file=$work/script.sh,format=raw,if=none,readonly=on"
             -device virtio-blk-device,drive=s)
    fi
    start=$(date +%s.%N)
    status=0
    timeout 600 "${cmd[@]}" < /dev/null > "$log" 2>&1 || status=$?
    end=$(date +%s.%N)
    run_init=$(sed -n 's/^\[ *\([0-9.]*\)\] Run \/init as init process.*/\1/p' "$log" | head -n1)
    init=$(sed -n 's/.*\/init started at \([0-9.]*\)s.*/\1/p' "$log" | head -n1)
    if [ -z "$run_init" ] || [ -z "$init" ] || [ "$status" != "$expected" ]; then
        echo "bench-boot: $engine exited $status (clean: $expected), /init at '$init' s; its output:" >&2
        cat "$log" >&2
        exit 1
    fi
    printf '%-5s %8.2f %7.2f %7.2f\n' "$engine" "$run_init" "$init" "$(echo "$end - $start" | bc)"
}

echo "# ${mem} MiB, 1 vCPU, script true; guest clock s, wall s; load average $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-5s %8s %7s %7s\n' engine run_init init wall
for _ in $(seq "$rounds"); do
    boot vmm
    boot qemu
done
