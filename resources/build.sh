#!/usr/bin/env bash
# Builds everything the guest needs, from Debian packages, and prints where it is:
#
#   kernel=PATH    bzImage (LZ4, 64-bit boot protocol)
#   vmlinux=PATH   the same kernel as an uncompressed ELF
#   initrd=PATH    busybox initramfs whose /init runs `addcow.run=SCRIPT`
#   rootfs=PATH    ext4 demo root filesystem with busybox (the add-cow base image)
#   cmdline=STR    kernel command line this guest needs on this host
#
# Artefacts are cached under $ADDCOW_CACHE_DIR (default ~/.cache/addcow-vmm), each
# keyed by a hash of every input, so a warm run only hashes and prints.
#
# Options (or the environment variable in brackets):
#   --host-workarounds=auto|on|off  [ADDCOW_HOST_WORKAROUNDS]  kernel patches and
#       command line for KVM without hardware virtualization; auto = on when
#       /proc/cpuinfo shows neither vmx nor svm.
#   --quiet                          build logs go to files only.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${ADDCOW_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/addcow-vmm}
workarounds=${ADDCOW_HOST_WORKAROUNDS:-auto}
quiet=0
for arg in "$@"; do
    case "$arg" in
        --host-workarounds=*) workarounds=${arg#*=} ;;
        --quiet) quiet=1 ;;
        -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "build.sh: unknown option '$arg' (try --help)" >&2; exit 2 ;;
    esac
done
case "$workarounds" in
    auto) if grep -qw -e vmx -e svm /proc/cpuinfo; then workarounds=off; else workarounds=on; fi ;;
    on|off) ;;
    *) echo "build.sh: --host-workarounds must be auto, on or off, not '$workarounds'" >&2; exit 2 ;;
esac

log() { echo "build.sh: $*" >&2; }

# Runs a build step, its output on stderr or, with --quiet, in a log file only.
run_logged() {
    local logfile=$1; shift
    if [ "$quiet" = 1 ]; then
        "$@" >"$logfile" 2>&1 || { log "failed; last lines of $logfile:"; tail -n 30 "$logfile" >&2; return 1; }
    else
        "$@" 2>&1 | tee "$logfile" >&2
    fi
}

# --- packages -------------------------------------------------------------------
packages=(linux-source-6.1 build-essential bc flex bison libelf-dev libssl-dev
          busybox-static cpio e2fsprogs lz4 xz-utils)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    [ "$(id -u)" = 0 ] || { log "need root to apt-get install ${missing[*]}"; exit 1; }
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >&2
    apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
fi

linux_version=$(dpkg-query -W -f='${Version}' linux-source-6.1)
busybox_version=$(dpkg-query -W -f='${Version}' busybox-static)
linux_tarball=/usr/src/linux-source-6.1.tar.xz

# Hash of the named files and extra strings: the cache key of one artefact.
inputs_hash() {
    local extra=$1; shift
    { printf '%s\n' "$extra"; for f in "$@"; do printf '%s\n' "${f#"$here"/}"; cat "$f"; done; } |
        sha256sum | cut -c1-16
}

mkdir -p "$cache"

# --- kernel ---------------------------------------------------------------------
patches=()
if [ "$workarounds" = on ]; then
    mapfile -t patches < <(find "$here/kernel/patches" -name '*.patch' | sort)
fi
kernel_key=$(inputs_hash "linux=$linux_version workarounds=$workarounds" \
    "$here/kernel/config.fragment" ${patches[@]+"${patches[@]}"})
kernel_dir=$cache/kernel-$kernel_key

build_kernel() {
    local work=$kernel_dir.work
    rm -rf "$work" && mkdir -p "$work"
    log "building the guest kernel in $work (a few minutes; log in $work/build.log)"
    tar -xf "$linux_tarball" -C "$work"
    local src=$work/linux-source-6.1
    for p in ${patches[@]+"${patches[@]}"}; do
        patch -d "$src" -p1 --forward --quiet < "$p"
    done
    (
        cd "$src"
        make -s tinyconfig
        scripts/kconfig/merge_config.sh -m .config "$here/kernel/config.fragment" >/dev/null
        make -s olddefconfig
        # Every symbol of the fragment must have survived olddefconfig.
        local bad=0 line sym
        while IFS= read -r line; do
            case "$line" in
                CONFIG_*=*) grep -qxF "$line" .config || { log "config: '$line' did not stick"; bad=1; } ;;
                "# CONFIG_"*" is not set")
                    sym=${line#\# }; sym=${sym%% *}
                    if grep -q "^$sym=" .config; then log "config: $sym should be unset"; bad=1; fi ;;
            esac
        done < "$here/kernel/config.fragment"
        [ "$bad" = 0 ]
    )
    run_logged "$work/build.log" make -C "$src" -j"$(nproc)" KBUILD_BUILD_TIMESTAMP=2013-05-30 \
        KBUILD_BUILD_USER=addcow KBUILD_BUILD_HOST=addcow bzImage vmlinux
    mkdir -p "$work/out"
    cp "$src/arch/x86/boot/bzImage" "$src/vmlinux" "$src/.config" "$work/out/"
    gcc -O2 -o "$work/out/gen_init_cpio" "$src/usr/gen_init_cpio.c"
    rm -rf "$kernel_dir"
    mv "$work/out" "$kernel_dir"
    rm -rf "$work"
}
[ -f "$kernel_dir/bzImage" ] || build_kernel

# --- initramfs ------------------------------------------------------------------
# Lists a root made of busybox, /bin/sh and the files under $1, in
# gen_init_cpio's format (device nodes need no root there). No other applet
# links: Debian's busybox-static runs its applets from the shell and from
# applets that exec others (FEATURE_SH_STANDALONE, FEATURE_PREFER_APPLETS),
# and each link cost the guest ~14 ms to unpack on KVM's PVM backend: its 268
# links were 3.7 s of every test boot (resources/README.md).
busybox_tree_spec() {
    local overlay=$1 dir dirs=" /bin /sbin /usr /usr/bin /usr/sbin /dev /proc /sys /tmp /mnt /root /etc "
    for dir in $dirs; do
        echo "dir $dir 0755 0 0"
    done
    echo "nod /dev/console 0600 0 0 c 5 1"
    echo "file /bin/busybox /bin/busybox 0755 0 0"
    echo "slink /bin/sh /bin/busybox 0777 0 0"
    (cd "$overlay" && find . -mindepth 1 | sort) | while IFS= read -r path; do
        path=${path#.}
        if [ -d "$overlay$path" ]; then
            # Listed above already (the overlay's /etc).
            case $dirs in *" $path "*) continue ;; esac
            echo "dir $path 0755 0 0"
        else
            echo "file $path $overlay$path $(stat -c %a "$overlay$path") 0 0"
        fi
    done
}

initrd_spec=$(busybox_tree_spec "$here/initramfs")
# The key: the spec without this checkout's path, and every overlay file.
mapfile -t initrd_files < <(find "$here/initramfs" -type f | sort)
initrd_key=$(inputs_hash "busybox=$busybox_version ${initrd_spec//"$here"/}" "${initrd_files[@]}")
initrd=$cache/initramfs-$initrd_key.cpio
if [ ! -f "$initrd" ]; then
    log "building the initramfs"
    printf '%s\n' "$initrd_spec" > "$initrd.spec"
    "$kernel_dir/gen_init_cpio" -t 0 "$initrd.spec" > "$initrd.tmp"
    mv "$initrd.tmp" "$initrd"
    rm -f "$initrd.spec"
fi

# --- demo root filesystem -------------------------------------------------------------
mapfile -t rootfs_files < <(find "$here/rootfs" -type f | sort)
rootfs_key=$(inputs_hash "busybox=$busybox_version" "${rootfs_files[@]}")
rootfs=$cache/rootfs-$rootfs_key.ext4
if [ ! -f "$rootfs" ]; then
    log "building the demo root filesystem"
    stage=$(mktemp -d)
    trap 'rm -rf "$stage"' EXIT
    mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,mnt,root}
    cp /bin/busybox "$stage/bin/busybox"
    for applet in $(/bin/busybox --list-full); do
        [ "$applet" = bin/busybox ] || ln -sf /bin/busybox "$stage/$applet"
    done
    cp -r "$here/rootfs/." "$stage/"
    rm -f "$rootfs.tmp"
    mke2fs -q -t ext4 -d "$stage" -L addcow-demo -E root_owner=0:0 "$rootfs.tmp" 64M
    mv "$rootfs.tmp" "$rootfs"
fi

# --- the guest's command line on this host ----------------------------------------------
# reboot=k: reboot through the keyboard controller, which the VMM turns into
# a clean exit; panic=-1: reboot at once on panic; pci=off: there is no PCI.
cmdline="console=ttyS0 reboot=k panic=-1 pci=off"
if [ "$workarounds" = on ]; then
    # The instruction emulator of KVM without hardware virtualization fails on
    # XSAVE-family instructions, CMPXCHG16B, POPCNT and CLAC/STAC (SMAP). Some
    # host CPUID bits leak through the VMM's filter on such hosts, so the
    # kernel is told as well. nofsgsbase: with WRFSBASE/RDFSBASE user
    # processes there intermittently read their thread-local data as zeros
    # (see FSGSBASE in vmm/src/x86_64/cpuid.rs). rodata=off: write-protecting
    # the kernel's text and read-only data, page-table changes and TLB
    # flushes under shadow paging, took 2 s of each boot there.
    # That KVM emulates every instruction of the guest kernel, a string
    # instruction once per element: erms,fsrm make the kernel's memcpy,
    # memset and clear_page move 8 bytes per step instead of one (a page
    # cleared in ~0.1 ms instead of ~0.8 ms; 2.8 s of each boot), and
    # noreplace-smp keeps the kernel from rewriting its 2400 LOCK prefixes
    # one text_poke at a time when it finds one CPU (0.3 s).
    cmdline="$cmdline clearcpuid=erms,fsrm,popcnt,cx16,xsave,xsaveopt,xsavec,xsaves,smap nofsgsbase rodata=off noreplace-smp"
fi

echo "kernel=$kernel_dir/bzImage"
echo "vmlinux=$kernel_dir/vmlinux"
echo "initrd=$initrd"
echo "rootfs=$rootfs"
echo "cmdline=$cmdline"
