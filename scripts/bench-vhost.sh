#!/usr/bin/env bash
# vhost-user-blk benchmark: QEMU microvm with its disk served over vhost-user
# by this project's vhost-user-blk (an add-cow overlay) and, alternated in the
# same run, by qemu-storage-daemon (a qcow2 overlay of the same base). The
# guest measures, with dd bs=1M on the 16 MiB disk:
#   backing  first read: every cluster comes from the backing file
#   cow      first write with fsync: every cluster is copied on write
#   read     second read: every cluster is allocated
# Prints the median of RUNS runs per engine, MB/s.
# Usage: scripts/bench-vhost.sh [RUNS]   (default 3)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
runs=${1:-3}

resources/install-qemu.sh
source resources/guest-env.sh
cargo build --release --quiet -p addcow -p vhost-user-blk

work=$(mktemp -d /var/tmp/bench-vhost.XXXXXX)
backend_pid=
cleanup() { [ -z "$backend_pid" ] || kill "$backend_pid" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
head -c 16M /dev/urandom > "$work/base.img"
cat > "$work/script.sh" <<'EOF'
t() { read -r up _ < /proc/uptime; echo "$up"; }
a=$(t); dd if=/dev/vda of=/dev/null bs=1M 2>/dev/null; b=$(t)
dd if=/dev/zero of=/dev/vda bs=1M count=16 conv=fsync 2>/dev/null; c=$(t)
echo 3 > /proc/sys/vm/drop_caches
d=$(t); dd if=/dev/vda of=/dev/null bs=1M 2>/dev/null; e=$(t)
echo "BENCH $a $b $c $d $e"
EOF
truncate -s %512 "$work/script.sh"

# Starts ENGINE's backend on a fresh overlay of base.img.
start_backend() {
    local engine=$1 sock=$work/sock
    rm -f "$sock" "$work"/ov.*
    if [ "$engine" = addcow ]; then
        target/release/addcow create --image "$work/ov.raw" --backing "$work/base.img" \
            --backing-fmt raw "$work/ov.add-cow" >/dev/null
        target/release/vhost-user-blk --socket "$sock" --disk "$work/ov.add-cow" 2>/dev/null &
    else
        qemu-img create -q -f qcow2 -b "$work/base.img" -F raw "$work/ov.qcow2"
        qemu-storage-daemon \
            --blockdev "driver=file,filename=$work/ov.qcow2,node-name=file" \
            --blockdev driver=qcow2,file=file,node-name=disk \
            --export "type=vhost-user-blk,id=exp,node-name=disk,addr.type=unix,addr.path=$sock,writable=on" &
    fi
    backend_pid=$!
    for _ in $(seq 500); do [ -S "$sock" ] && return; sleep 0.02; done
    echo "bench-vhost.sh: $engine made no socket" >&2; exit 1
}

# Runs one engine; prints "backing cow read" in MB/s.
run() {
    local engine=$1 line
    start_backend "$engine"
    while IFS= read -r line; do
        line=${line%$'\r'}
        case "$line" in
            BENCH*)
                set -- $line
                echo "$(echo "16 * 1.048576 / ($3 - $2)" | bc -l)" \
                     "$(echo "16 * 1.048576 / ($4 - $3)" | bc -l)" \
                     "$(echo "16 * 1.048576 / ($6 - $5)" | bc -l)"
                ;;
        esac
    done < <(qemu-system-x86_64 -M microvm,acpi=off,memory-backend=mem \
                 -object memory-backend-memfd,id=mem,size=256M,share=on -m 256 \
                 -enable-kvm -cpu "$cpu" -nographic -no-reboot -global virtio-mmio.force-legacy=false \
                 -kernel "$vmlinux" -initrd "$initrd" -append "$cmdline addcow.run=/dev/vdb" \
                 -chardev "socket,id=c0,path=$work/sock" -device vhost-user-blk,chardev=c0 \
                 -drive "id=s,file=$work/script.sh,format=raw,if=none,readonly=on" \
                 -device virtio-blk-device,drive=s \
                 -device isa-debug-exit,iobase=0xf4,iosize=4 < /dev/null 2>&1 || true)
    kill "$backend_pid" 2>/dev/null || true
    wait "$backend_pid" 2>/dev/null || true
    backend_pid=
}

median() { sort -g | awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}'; }

for engine in addcow qsd; do : > "$work/$engine"; done
for i in $(seq "$runs"); do
    for engine in addcow qsd; do
        run "$engine" >> "$work/$engine"
    done
done
printf '%-28s %12s %10s %10s   (MB/s, median of %s runs)\n' backend backing cow read "$runs"
for engine in addcow qsd; do
    case "$engine" in
        addcow) name="vhost-user-blk (add-cow)" ;;
        qsd) name="qemu-storage-daemon (qcow2)" ;;
    esac
    printf '%-28s %12.2f %10.2f %10.2f\n' "$name" \
        "$(cut -d' ' -f1 "$work/$engine" | median)" \
        "$(cut -d' ' -f2 "$work/$engine" | median)" \
        "$(cut -d' ' -f3 "$work/$engine" | median)"
done
