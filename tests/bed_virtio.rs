//! virtio-net and virtio-blk on the PCI bus, in the nested bed: the guest enumerates
//! them through ACPI with MMCONFIG and MSI-X, pings L1 over the tap, moves 64 MiB each
//! way intact, and reads and writes disks that L1 checks from the image files.

use std::sync::OnceLock;

use tandem_tests::{kv, repo_root, run_bed, BedLog, BedOptions};

fn bed() -> &'static BedLog {
    static BED: OnceLock<BedLog> = OnceLock::new();
    BED.get_or_init(|| {
        let opts = BedOptions { mem_mib: 2048, smp: 2, timeout_s: 600, ..Default::default() };
        run_bed("virtio", &repo_root().join("tests/scenarios/virtio.sh"), &opts)
    })
}

/// A line of the whole L1 log (L1's own checks run after the guest has gone).
fn log_line<'a>(bed: &'a BedLog, marker: &str) -> &'a str {
    bed.text.lines().find(|l| l.contains(marker)).unwrap_or_else(|| panic!("no {marker:?} line:\n{}", bed.tail(60)))
}

#[test]
fn guest_sees_the_devices_through_acpi_mmconfig_and_msix() {
    let run = bed().run("virtio");
    assert!(run.lines.iter().any(|l| l.contains("L2-KMSG") && l.contains("MMCONFIG") && l.contains("reserved")));
    for bad in ["not using MMCONFIG", "PCI: Fatal"] {
        assert!(!run.lines.iter().any(|l| l.contains(bad)), "{bad:?} in the guest log:\n{}", run.console());
    }
    let pci: Vec<&String> = run.lines.iter().filter(|l| l.starts_with("L2-PCI ")).collect();
    let net = pci.iter().find(|l| l.contains("virtio=virtio_net")).expect("virtio-net in the guest's PCI list");
    let blk = pci.iter().filter(|l| l.contains("virtio=virtio_blk")).count();
    assert_eq!(blk, 5, "five disks: {pci:?}");
    assert_eq!(kv(net, "msix"), Some("on"), "{net}");
    assert!(kv(net, "msi_irqs").and_then(|n| n.parse::<u32>().ok()).unwrap_or(0) >= 2, "{net}");
    assert!(kv(net, "bars").is_some_and(|b| b.contains("mem64")), "{net}");
    assert_eq!(run.rc, Some(0), "console:\n{}", run.console());
}

#[test]
fn guest_pings_l1_over_virtio_net() {
    let run = bed().run("virtio");
    run.line("L2-PING-OK");
    let nic = run.line("L2-NET if=eth0");
    assert_eq!(kv(nic, "mac"), Some("02:00:00:00:77:02"), "{nic}");
    // queues=2: the guest drives two queue pairs (negotiated over the control queue).
    assert_eq!((kv(nic, "rxq"), kv(nic, "txq")), (Some("2"), Some("2")), "{nic}");
}

#[test]
fn tcp_64_mib_each_way_arrives_intact() {
    let bed = bed();
    let to_l1 = log_line(bed, "L1-TCP-RECV port=5001");
    assert_eq!((kv(to_l1, "bytes"), kv(to_l1, "pattern")), (Some("67108864"), Some("ok")), "{to_l1}");
    let run = bed.run("virtio");
    let to_guest = run.line("TCP-RECV port=5002");
    assert_eq!((kv(to_guest, "bytes"), kv(to_guest, "pattern")), (Some("67108864"), Some("ok")), "{to_guest}");
}

#[test]
fn disk_bytes_cross_between_guest_and_image_file() {
    let bed = bed();
    let run = bed.run("virtio");
    run.line("L2-DATA-WRITTEN");
    // The guest verified L1's pattern; L1 verified the guest's, from the image file.
    let guest_read = run.line("BLKBENCH mode=pattern-verify");
    assert_eq!((kv(guest_read, "result"), kv(guest_read, "seed")), (Some("ok"), Some("5")), "{guest_read}");
    let l1_read = log_line(bed, "L1-DATA BLKBENCH");
    assert_eq!((kv(l1_read, "result"), kv(l1_read, "len")), (Some("ok"), Some("33554432")), "{l1_read}");
}

#[test]
fn readonly_disk_refuses_guest_writes() {
    let bed = bed();
    let run = bed.run("virtio");
    assert_ne!(kv(run.line("L2-RO-WRITE"), "rc"), Some("0"), "a write to a readonly disk succeeded");
    let ro = run.lines.iter().find(|l| l.starts_with("L2-BLK") && l.contains("serial=ro")).expect("ro disk listed");
    assert_eq!(kv(ro, "ro"), Some("1"), "{ro}");
    assert_eq!(kv(log_line(bed, "L1-RO BLKBENCH"), "result"), Some("ok"), "the readonly image changed");
}

#[test]
fn direct_disk_is_opened_o_direct_and_keeps_guest_writes() {
    let bed = bed();
    assert!(!bed.text.contains("L1-LOSETUP-FAILED"), "L1 could not make a loop device:\n{}", bed.tail(60));
    let fd = log_line(bed, "L1-DIRECT-FD");
    // fdinfo prints the open flags in octal; O_DIRECT is 0o40000 on x86.
    let flags = kv(fd, "flags").and_then(|f| u32::from_str_radix(f, 8).ok()).unwrap_or_else(|| panic!("{fd}"));
    assert_ne!(flags & libc::O_DIRECT as u32, 0, "direct=on did not open the disk O_DIRECT: {fd}");
    bed.run("virtio").line("L2-DIRECT-WRITTEN");
    let l1_read = log_line(bed, "L1-DIRECT BLKBENCH");
    assert_eq!((kv(l1_read, "result"), kv(l1_read, "seed")), (Some("ok"), Some("13")), "{l1_read}");
}

#[test]
fn no_vmm_thread_made_a_call_outside_its_seccomp_filter() {
    let bed = bed();
    assert!(bed.text.contains("L1-SCENARIO-EXIT"), "the scenario did not finish:\n{}", bed.tail(40));
    assert_eq!(bed.seccomp_violations(), Vec::<&str>::new());
}
