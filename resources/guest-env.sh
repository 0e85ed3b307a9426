# Sourced by the scripts that boot the test guest (resources/qemu-boot.sh,
# scripts/bench-*.sh, scripts/smp-stress.sh): builds it (build.sh, cached),
# sets its artefacts' variables (vmlinux, bzimage, initrd, cmdline, ...:
# build.sh's output) and `cpu`, the CPU model QEMU boots the same guest with.
# An assignment, not `eval "$(build.sh | sed)"`: under `set -e` the caller
# stops if build.sh fails, instead of going on with no variables set.
artefacts=$("$(dirname "${BASH_SOURCE[0]}")/build.sh" --quiet)
eval "$(sed -E 's/^([a-z]+)=(.*)$/\1="\2"/' <<<"$artefacts")"
# QEMU 7.2's -cpu host aborts on hosts without VT-x/AMD-V (MSR 0x10a).
if grep -qw -e vmx -e svm /proc/cpuinfo; then cpu=host; else cpu=qemu64,-cx16,-popcnt; fi
