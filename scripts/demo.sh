#!/usr/bin/env bash
# The seed's story in one command: a base disk image with an installed OS (an
# ext4 root with busybox), an add-cow file whose backing file is that image,
# and vmm booting from it to a shell on the serial console. Whatever you
# change lands in demo/demo.raw; demo/base.img stays byte-identical; after
# you type `exit`, `addcow info` shows the clusters you allocated.
#
# Run it again to continue where you left off; `rm -r demo` starts afresh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

echo "demo: building the guest (first run: a few minutes)" >&2
artefacts=$(resources/build.sh --quiet)
kernel=$(sed -n 's/^kernel=//p' <<<"$artefacts")
rootfs=$(sed -n 's/^rootfs=//p' <<<"$artefacts")
cmdline=$(sed -n 's/^cmdline=//p' <<<"$artefacts")

echo "demo: building vmm and addcow" >&2
cargo build --release --quiet --bins -p vmm -p addcow
bin=target/release

mkdir -p demo
if [ ! -f demo/demo.add-cow ]; then
    cp "$rootfs" demo/base.img
    chmod a-w demo/base.img
    "$bin/addcow" create --image demo.raw --backing base.img --backing-fmt raw demo/demo.add-cow
fi
sha256sum demo/base.img > demo/base.img.sha256

echo "demo: booting; type 'poweroff' (or 'exit') in the guest shell to stop it" >&2
status=0
"$bin/vmm" --kernel "$kernel" --cmdline "$cmdline root=/dev/vda rw" --disk demo/demo.add-cow || status=$?

echo
"$bin/addcow" info demo/demo.add-cow
sha256sum --quiet -c demo/base.img.sha256 && echo "demo: base.img is unchanged"
exit "$status"
