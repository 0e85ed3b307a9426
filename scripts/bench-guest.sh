#!/usr/bin/env bash
# Guest benchmark: vmm against QEMU microvm (-enable-kvm), same kernel,
# initramfs and disk image, runs alternated. Prints, per engine, the median of
# RUNS runs of:
#   boot   seconds from starting the process to the guest's /init banner
#   read   guest sequential read of a 16 MiB raw virtio disk, MB/s (dd bs=1M)
#   write  guest sequential write of it with fsync, MB/s
# Usage: scripts/bench-guest.sh [RUNS]   (default 5)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
runs=${1:-5}

resources/install-qemu.sh
source resources/guest-env.sh
cargo build --release --quiet -p vmm

work=$(mktemp -d /var/tmp/bench-guest.XXXXXX)
trap 'rm -rf "$work"' EXIT
truncate -s 16M "$work/disk.img"
cat > "$work/script.sh" <<'EOF'
t() { read -r up _ < /proc/uptime; echo "$up"; }
a=$(t); dd if=/dev/vda of=/dev/null bs=1M 2>/dev/null; b=$(t)
dd if=/dev/zero of=/dev/vda bs=1M count=16 conv=fsync 2>/dev/null; c=$(t)
echo "BENCH read $a $b write $b $c"
EOF
truncate -s %512 "$work/script.sh"

# Runs one engine; prints "boot read write".
run() {
    local engine=$1 start line boot=""
    start=$(date +%s.%N)
    if [ "$engine" = vmm ]; then
        cmd=(target/release/vmm --kernel "$vmlinux" --initrd "$initrd" --exit-port
             --cmdline "$cmdline addcow.run=/dev/vdb"
             --disk "$work/disk.img,format=raw" --disk "$work/script.sh,ro,format=raw")
    else
        cmd=(qemu-system-x86_64 -M microvm,acpi=off -enable-kvm -cpu "$cpu" -m 256 -nographic -no-reboot
             -kernel "$vmlinux" -initrd "$initrd" -append "$cmdline addcow.run=/dev/vdb"
             -drive "id=d,file=$work/disk.img,format=raw,if=none" -device virtio-blk-device,drive=d
             -drive "id=s,file=$work/script.sh,format=raw,if=none,readonly=on" -device virtio-blk-device,drive=s
             -device isa-debug-exit,iobase=0xf4,iosize=4)
    fi
    while IFS= read -r line; do
        line=${line%$'\r'}
        case "$line" in
            *"/init started"*) [ -n "$boot" ] || boot=$(echo "$(date +%s.%N) - $start" | bc) ;;
            BENCH*)
                set -- $line
                echo "$boot $(echo "16 * 1.048576 / ($4 - $3)" | bc -l) $(echo "16 * 1.048576 / ($7 - $6)" | bc -l)"
                ;;
        esac
    done < <("${cmd[@]}" < /dev/null 2>&1 || true)
}

median() { sort -g | awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}'; }

for engine in vmm qemu; do : > "$work/$engine"; done
for i in $(seq "$runs"); do
    for engine in vmm qemu; do
        run "$engine" >> "$work/$engine"
    done
done
printf '%-8s %10s %12s %13s   (median of %s runs)\n' engine "boot s" "read MB/s" "write MB/s" "$runs"
for engine in vmm qemu; do
    printf '%-8s %10.2f %12.2f %13.2f\n' "$engine" \
        "$(cut -d' ' -f1 "$work/$engine" | median)" \
        "$(cut -d' ' -f2 "$work/$engine" | median)" \
        "$(cut -d' ' -f3 "$work/$engine" | median)"
done
