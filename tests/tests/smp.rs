//! `--vcpus 2`: the guest brings up both CPUs (from the ACPI MADT), sees a
//! consistent topology, the TSC-deadline timer and its disks in the DSDT,
//! and does disk I/O from each of them (pinned with `taskset`); the host then
//! checks every byte each CPU wrote. One boot, many checks.

use std::fs;

use e2e::{boot_smp, Disk, KernelImage};

/// Bytes each CPU writes, at offset `cpu * CHUNK` of the disk.
const CHUNK: usize = 64 << 10;

/// What CPU `cpu` writes: a pattern only it makes.
fn chunk_of(cpu: usize) -> Vec<u8> {
    (0..CHUNK)
        .map(|i| {
            (i as u32)
                .wrapping_mul(2_654_435_761)
                .rotate_left(cpu as u32 * 8 + 3) as u8
        })
        .collect()
}

/// What the kernel prints when a user process of an SMP guest on a host
/// without VT-x/AMD-V (KVM's PVM backend) reads its thread-local data as
/// zeros and follows the null pointer: busybox's `mov %fs:-0x90,%rax; mov
/// (%rax),%rax`. An open bug, cause unknown: seen on either CPU, in user
/// mode only, never with one vCPU; in 4 of 5 two-vCPU boots with FSGSBASE
/// shown and 1 of 8 with it hidden (see `vmm/src/x86_64/cpuid.rs`); never
/// in `scripts/smp-stress.sh` (about 2800 process starts in seven vmm
/// boots; one QEMU `-smp 2` boot), nor in 18 runs of this test on
/// 2026-12-03 (8 on a quiet host, 8 beside a host busy loop, 2 in CI). One
/// boot that shows it is run again, so that the rest of SMP stays tested; a
/// second one fails the test.
const PVM_SEGFAULT: &str = "segfault at 0 ip 00000000004a4d02";

/// Whether the host's CPU lists the `vmx` or `svm` flag.
fn host_has_hardware_virtualization() -> bool {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

#[test]
fn two_vcpus_come_up_and_both_do_disk_io() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    // vdb: the two chunks each CPU copies from; vda: where it copies them to.
    let mut source = chunk_of(0);
    source.extend(chunk_of(1));
    fs::write(d.join("source.img"), &source).expect("source disk");
    fs::write(d.join("target.img"), vec![0u8; 4 * CHUNK]).expect("target disk");

    // Each CPU copies its chunk from vdb to vda with O_DIRECT and fsync,
    // reads back the other CPU's chunk once both are done, and reports the
    // CPU it ran on (field 39 of /proc/self/stat).
    let script = r#"
check nproc "$(nproc)"
check fsgsbase "$(grep -c fsgsbase /proc/cpuinfo)"
check processors "$(grep -c ^processor /proc/cpuinfo)"
check online "$(cat /sys/devices/system/cpu/online)"
for c in 0 1; do
    check "core_id$c" "$(cat /sys/devices/system/cpu/cpu$c/topology/core_id)"
    check "siblings$c" "$(cat /sys/devices/system/cpu/cpu$c/topology/thread_siblings_list)"
    check "package$c" "$(cat /sys/devices/system/cpu/cpu$c/topology/core_siblings_list)"
    check "apicid$c" "$(grep ^apicid /proc/cpuinfo | sed -n "$((c + 1))p" | tr -dc 0-9)"
done
check tsc_deadline "$(grep -c tsc_deadline_timer /proc/cpuinfo)"
check madt "$(dmesg | grep -c 'Using ACPI (MADT) for SMP configuration')"
check acpi_disks "$(for d in /sys/block/vd*; do readlink -f $d/device; done | grep -c /LNRO0005:)"
for c in 0 1; do
    taskset -c $c sh -c "
        dd if=/dev/vdb of=/dev/vda bs=64k skip=$c seek=$c count=1 iflag=direct oflag=direct conv=fsync 2>/dev/null &&
        echo CHECK wrote$c \$(cut -d' ' -f39 /proc/self/stat)" &
done
wait
for c in 0 1; do
    other=$((1 - c))
    taskset -c $c sh -c "
        echo CHECK read$c \$(dd if=/dev/vda bs=64k skip=$other count=1 iflag=direct 2>/dev/null | md5sum | cut -c1-32) \$(cut -d' ' -f39 /proc/self/stat)"
done
check expected0 "$(dd if=/dev/vdb bs=64k skip=1 count=1 2>/dev/null | md5sum | cut -c1-32)"
check expected1 "$(dd if=/dev/vdb bs=64k skip=0 count=1 2>/dev/null | md5sum | cut -c1-32)"
check segfaults "$(dmesg | grep -c segfault)"
exit 0
"#;
    let disks = [
        Disk::new(d.join("target.img"), ",format=raw"),
        Disk::new(d.join("source.img"), ",ro,format=raw"),
    ];
    let hw_virt = host_has_hardware_virtualization();
    let mut run = boot_smp(d, KernelImage::Vmlinux, 2, "", &disks, script, |_| None);
    if !hw_virt && run.console.contains(PVM_SEGFAULT) {
        // The open intermittent user-mode fault (see PVM_SEGFAULT): one
        // more boot, on a fresh target; a second fault fails the test.
        eprintln!(
            "the guest hit the intermittent SMP segfault; booting once more:\n{}",
            run.console
        );
        fs::write(d.join("target.img"), vec![0u8; 4 * CHUNK]).expect("target disk");
        run = boot_smp(d, KernelImage::Vmlinux, 2, "", &disks, script, |_| None);
    }
    let report = format!("console:\n{}\nstderr:\n{}", run.console, run.stderr);
    assert_eq!(run.status, Some(0), "{report}");
    assert!(
        run.console
            .contains("smpboot: Total of 2 processors activated"),
        "{report}"
    );
    assert_eq!(run.check("nproc"), "2", "{report}");
    assert_eq!(run.check("processors"), "2", "{report}");
    assert_eq!(run.check("online"), "0-1", "{report}");
    for c in 0..2 {
        // One package of two single-thread cores, APIC ID = CPU number.
        assert_eq!(run.check(&format!("core_id{c}")), c.to_string(), "{report}");
        assert_eq!(
            run.check(&format!("siblings{c}")),
            c.to_string(),
            "{report}"
        );
        assert_eq!(run.check(&format!("package{c}")), "0-1", "{report}");
        assert_eq!(run.check(&format!("apicid{c}")), c.to_string(), "{report}");
    }
    // The CPUs came from the ACPI MADT, the disks (two and the script's)
    // from the DSDT.
    assert_eq!(run.check("madt"), "1", "{report}");
    assert_eq!(run.check("acpi_disks"), "3", "{report}");
    assert_eq!(
        run.check("tsc_deadline"),
        "2",
        "TSC-deadline on both CPUs\n{report}"
    );
    // Without VT-x/AMD-V, FSGSBASE is hidden (user processes lost their TLS
    // data more often with it); with them, both CPUs have it if the host does.
    if !hw_virt {
        assert_eq!(run.check("fsgsbase"), "0", "FSGSBASE hidden\n{report}");
    }
    assert_eq!(run.check("segfaults"), "0", "{report}");
    // Each write and read ran on the CPU it was pinned to.
    assert_eq!(run.check("wrote0"), "0", "{report}");
    assert_eq!(run.check("wrote1"), "1", "{report}");
    let read0 = run.check("read0").to_string();
    let read1 = run.check("read1").to_string();
    assert_eq!(read0, format!("{} 0", run.check("expected0")), "{report}");
    assert_eq!(read1, format!("{} 1", run.check("expected1")), "{report}");

    // On the host: each CPU's chunk where it wrote it, nothing else touched.
    let target = fs::read(d.join("target.img")).expect("read target");
    assert_eq!(&target[..CHUNK], &chunk_of(0)[..], "CPU 0's write");
    assert_eq!(&target[CHUNK..2 * CHUNK], &chunk_of(1)[..], "CPU 1's write");
    assert!(target[2 * CHUNK..].iter().all(|&b| b == 0));
}
