#!/usr/bin/env bash
# Installs qemu-system-x86 (the peer VMM of the guest tests and benchmarks)
# and qemu-utils (qemu-img, the oracle of the CLI tests) when missing. Debian's qemu-system-x86 and a newer qemu-utils (from
# backports) cannot be installed side by side: apt would remove qemu-utils or
# refuse, so every qemu package is pinned to the one version that
# qemu-system-x86 has.
set -euo pipefail
command -v qemu-system-x86_64 >/dev/null && command -v qemu-img >/dev/null && exit 0
[ "$(id -u)" = 0 ] || { echo "install-qemu.sh: need root to install qemu-system-x86" >&2; exit 1; }
export DEBIAN_FRONTEND=noninteractive
v=$(apt-cache policy qemu-system-x86 | awk '/Candidate/{print $2}')
if [ -z "$v" ] || [ "$v" = "(none)" ]; then
    apt-get update -q >&2
    v=$(apt-cache policy qemu-system-x86 | awk '/Candidate/{print $2}')
fi
echo "install-qemu.sh: installing qemu-system-x86 $v" >&2
apt-get install -y -q --no-install-recommends --allow-downgrades \
    "qemu-system-x86=$v" "qemu-utils=$v" "qemu-system-common=$v" "qemu-block-extra=$v" >&2
