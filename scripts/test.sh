#!/usr/bin/env bash
# Runs every test of the project on a fresh machine: installs the packages the
# tests need, builds the guest (cached under ~/.cache/addcow-vmm) and the
# workspace, then runs `cargo test` over the whole workspace. The end-to-end
# tests boot real guests and need /dev/kvm.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# qemu-img is the oracle of the add-cow CLI tests, QEMU the peer of the
# vhost-user-blk guest test: both at one pinned version.
resources/install-qemu.sh
# strace shows the CLI tests that create fsyncs the new files' directory.
if ! command -v strace >/dev/null; then
    echo "test.sh: installing strace" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >&2
    apt-get install -y -q --no-install-recommends strace >&2
fi
[ -e /dev/kvm ] || { echo "test.sh: /dev/kvm is missing: the end-to-end tests boot real guests" >&2; exit 1; }

echo "test.sh: building the guest (resources/build.sh)" >&2
resources/build.sh --quiet >&2
echo "test.sh: building the workspace" >&2
cargo build --workspace --bins --quiet
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --no-fail-fast "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e

# Benchmark smoke runs (no timing is checked).
if [ "$status" = 0 ]; then
    echo "test.sh: benchmark smoke run (addcow-bench --scale)" >&2
    cargo run --quiet -p addcow --bin addcow-bench -- --scale --runs 1 >&2 || status=1
    echo "test.sh: benchmark smoke run (devices block_throughput --smoke)" >&2
    cargo bench --quiet -p devices --bench block_throughput -- --smoke >&2 || status=1
    # One round each: convert checks its output against qemu-img's byte for
    # byte; a boot that does not reach /init or exit cleanly fails.
    echo "test.sh: benchmark smoke run (bench-convert.sh 1)" >&2
    scripts/bench-convert.sh 1 >&2 || status=1
    echo "test.sh: benchmark smoke run (bench-boot.sh 1)" >&2
    scripts/bench-boot.sh 1 >&2 || status=1
fi

# Fuzz smoke run over the committed corpus (long runs: see README). The corpus
# is copied so that the run adds nothing to the checkout.
if [ "$status" = 0 ] && [ "${SKIP_FUZZ:-0}" != 1 ]; then
    command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --quiet
    for target in header_open image_io virtio_blk; do
        scratch=$(mktemp -d)
        mkdir -p "fuzz/corpus/$target"
        echo "test.sh: fuzz smoke run of $target" >&2
        # RUSTC_BOOTSTRAP lets the stable toolchain take the sanitizer flags cargo-fuzz passes.
        if ! RUSTC_BOOTSTRAP=1 cargo fuzz run -O "$target" "$scratch" "fuzz/corpus/$target" -- \
                -runs=30000 >"$scratch.log" 2>&1; then
            tail -n 40 "$scratch.log" >&2
            if grep -q "Test unit written to" "$scratch.log"; then
                echo "fuzz: $target found a crash (input saved under fuzz/artifacts/$target)" >&2
            else
                echo "fuzz: $target could not run" >&2
            fi
            status=1
        else
            grep -E '^Done' "$scratch.log" | sed "s/^/fuzz $target: /" >&2
        fi
        rm -rf "$scratch" "$scratch.log"
    done
fi

passed=$(awk '/^test result:/ {n += $4} END {print n + 0}' "$log")
failed=$(awk '/^test result:/ {n += $6} END {print n + 0}' "$log")
echo "tests: $passed passed, $failed failed"
exit "$status"
