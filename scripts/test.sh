#!/usr/bin/env bash
# Runs every test of the project on a fresh machine: installs the packages the
# tests need, builds the guest (cached under ~/.cache/addcow-vmm) and the
# workspace, then runs `cargo test` over the whole workspace. The end-to-end
# tests boot real guests and need /dev/kvm.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# qemu-img is the oracle of the add-cow CLI tests.
if ! command -v qemu-img >/dev/null; then
    echo "test.sh: installing qemu-utils" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >&2
    apt-get install -y -q --no-install-recommends qemu-utils >&2
fi
[ -e /dev/kvm ] || { echo "test.sh: /dev/kvm is missing: the end-to-end tests boot real guests" >&2; exit 1; }

echo "test.sh: building the guest (resources/build.sh)" >&2
resources/build.sh --quiet >&2
echo "test.sh: building the workspace" >&2
cargo build --workspace --bins --quiet
cargo test --workspace "$@"
