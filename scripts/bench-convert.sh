#!/usr/bin/env bash
# Convert benchmark (issue 16, goal 2): flatten a 1 GiB virtual disk with
# 64 KiB clusters, every other cluster written, over a 1 GiB raw backing file
# of random data, three ways, alternated, median of RUNS runs:
#   addcow    addcow convert d.add-cow out.raw       (the add-cow overlay)
#   qemu-img  qemu-img convert -O raw ov.qcow2 out.raw (a qcow2 overlay with the same data)
#   cp        cp --sparse=never base.raw out.raw      (a plain 1 GiB copy)
# Both overlays get their data from the same qemu-io script, and the three
# outputs are compared byte for byte. Before every timed run the previous
# output is deleted and `sync` is run (untimed), so that no engine pays for
# the write-back of another's output. Inputs are warm in the page cache.
# addcow's convert ends with fdatasync (the output is durable when it
# returns); qemu-img convert (cache=unsafe by default) and cp do not sync, so
# the table also shows each peer followed by `sync FILE`, and `addcow convert
# --no-sync` (no write-back started, no sync): each engine's ratio is to the
# addcow run that syncs as it does. CPU is user + system time of the process
# (and its children).
# Usage: scripts/bench-convert.sh [RUNS] [DIR]   (default 5, /var/tmp)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
runs=${1:-5}
parent=${2:-/var/tmp}

cargo build --release --quiet -p addcow
addcow=$PWD/target/release/addcow
command -v qemu-img >/dev/null && command -v qemu-io >/dev/null || {
    echo "bench-convert: needs qemu-img and qemu-io (apt-get install qemu-utils)" >&2
    exit 2
}

work=$(mktemp -d "$parent/bench-convert.XXXXXX")
trap 'rm -rf "$work"' EXIT
cd "$work"

# 1 GiB of random backing data, half the clusters written in each overlay.
head -c 1G /dev/urandom > base.raw
truncate -s 1G img.raw
"$addcow" create --image img.raw --backing base.raw --backing-fmt raw --cluster-size 64K d.add-cow >/dev/null
qemu-img create -q -f qcow2 -o cluster_size=64k -b base.raw -F raw ov.qcow2
for ((c = 0; c < 16384; c += 2)); do
    echo "write -P $(((c / 2) % 255 + 1)) $((c * 65536)) 64k"
done > script.qemu-io
# The same writes through the add-cow file itself (qemu-io does not know
# add-cow): the image file gets the bytes, the bitmap the bits (0x55: every
# even cluster).
qemu-io -f raw img.raw < script.qemu-io >/dev/null
qemu-io -f qcow2 ov.qcow2 < script.qemu-io >/dev/null
printf '\x55%.0s' $(seq 2048) | dd of=d.add-cow bs=64K seek=1 conv=notrunc status=none
"$addcow" check d.add-cow >/dev/null
sync

engine() {
    case $1 in
        addcow) "$addcow" convert d.add-cow out.raw ;;
        addcow--no-sync) "$addcow" convert --no-sync d.add-cow out.raw ;;
        qemu-img) qemu-img convert -O raw ov.qcow2 out.raw ;;
        qemu-img+sync) qemu-img convert -O raw ov.qcow2 out.raw && sync out.raw ;;
        cp) cp --sparse=never base.raw out.raw ;;
        cp+sync) cp --sparse=never base.raw out.raw && sync out.raw ;;
    esac
}

engines=(addcow addcow--no-sync qemu-img cp qemu-img+sync cp+sync)
declare -A wall cpu
TIMEFORMAT='%R %U %S'
for ((r = 0; r < runs; r++)); do
    for e in "${engines[@]}"; do
        rm -f out.raw
        sync
        read -r real user sys < <({ time engine "$e" >/dev/null; } 2>&1)
        wall[$e]+="$real "
        cpu[$e]+="$(echo "$user + $sys" | bc) "
        case $e in
            addcow) sum=$(sha256sum < out.raw) ;;
            *) [ "$(sha256sum < out.raw)" = "$sum" ] || [ "${e#cp}" != "$e" ] || {
                   echo "bench-convert: $e and addcow differ" >&2; exit 1; } ;;
        esac
    done
done
rm -f out.raw

median() { tr ' ' '\n' | grep . | sort -g | awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}'; }
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg), $(nproc) CPUs; median of $runs runs"
printf '| engine | wall s | CPU s | addcow/engine wall | addcow/engine CPU | wall of each run (s) |\n'
printf '|---|---:|---:|---:|---:|---|\n'
declare -A mw mc
for e in "${engines[@]}"; do
    mw[$e]=$(echo "${wall[$e]}" | median)
    mc[$e]=$(echo "${cpu[$e]}" | median)
done
for e in "${engines[@]}"; do
    # Like with like: the peers that do not sync against addcow --no-sync.
    case $e in addcow--no-sync) a=$e ;; addcow | *+sync) a=addcow ;; *) a=addcow--no-sync ;; esac
    printf '| %s | %.2f | %.2f | %.2f | %.2f | %s|\n' "$e" "${mw[$e]}" "${mc[$e]}" \
        "$(echo "${mw[$a]} / ${mw[$e]}" | bc -l)" "$(echo "${mc[$a]} / ${mc[$e]}" | bc -l)" "${wall[$e]}"
done
