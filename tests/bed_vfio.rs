//! SR-IOV VF passthrough with VFIO, in the nested bed with an emulated Intel IOMMU and an igb
//! NIC (run-l1.sh --iommu --igb): L2 gets a VF with its own MSI-X and MAC and moves traffic
//! over it; the VF goes back to the host exactly as it was after a poweroff, and after
//! SIGTERM, SIGINT and SIGKILL plus `tandem cleanup`, each mid-boot and mid-traffic;
//! devices VFIO cannot isolate, and hosts without interrupt remapping, are refused with a
//! message that says what to do.
//!
//! The emulated igb has each VF alone in its IOMMU group, so the shared-group refusal is
//! shown with `--device` on one of two e1000e functions that share a group (run-l1.sh); VFs
//! have no INTx, so INTx is shown with QEMU's "edu" test device passed with `--device`.

use std::sync::OnceLock;

use tandem_tests::{kv, repo_root, run_bed, BedLog, BedOptions};

fn options(append: &str) -> BedOptions {
    BedOptions { mem_mib: 3072, iommu: true, igb: true, timeout_s: 1200, append: append.into(), ..Default::default() }
}

/// Interrupt remapping on (the emulated IOMMU's default).
fn bed() -> &'static BedLog {
    static BED: OnceLock<BedLog> = OnceLock::new();
    BED.get_or_init(|| run_bed("vfio", &repo_root().join("tests/scenarios/vfio.sh"), &options("")))
}

/// L1 booted with intremap=off.
fn bed_without_ir() -> &'static BedLog {
    static BED: OnceLock<BedLog> = OnceLock::new();
    BED.get_or_init(|| {
        run_bed("vfio-noir", &repo_root().join("tests/scenarios/vfio-noir.sh"), &options("intremap=off"))
    })
}

/// The L1 line starting with `marker` (outside the runs).
fn l1<'a>(bed: &'a BedLog, marker: &str) -> &'a str {
    bed.text.lines().find(|l| l.starts_with(marker)).unwrap_or_else(|| panic!("no {marker:?} line:\n{}", bed.tail(80)))
}

/// VF 0's state as L1 printed it: (bdf, driver, mac, numvfs).
fn vf(line: &str) -> (&str, &str, &str, &str) {
    let get = |k| kv(line, k).unwrap_or_else(|| panic!("no {k}= in {line:?}"));
    (get("bdf"), get("driver"), get("mac"), get("numvfs"))
}

#[test]
fn guest_drives_the_vf_with_msix_and_the_mac_asked_for() {
    let run = bed().run("create");
    assert_eq!(run.rc, Some(0), "console:\n{}", run.console());
    assert!(run.line("tandem: vf0:").contains("interrupt remapping active"), "{}", run.console());
    let pci = run.line("device=0x10ca");
    assert_eq!((kv(pci, "driver"), kv(pci, "msix")), (Some("igbvf"), Some("on")), "{pci}");
    assert!(kv(pci, "msi_irqs").and_then(|n| n.parse::<u32>().ok()).unwrap_or(0) >= 2, "{pci}");
    let vf = run.line("L2-VF if=");
    assert_eq!(kv(vf, "mac"), Some("02:00:00:00:aa:01"), "{vf}");
    let irq = |k| kv(vf, k).and_then(|n| n.parse::<u64>().ok()).unwrap_or_else(|| panic!("{k} in {vf}"));
    assert!(irq("irqs_after") > irq("irqs_before"), "the VF's MSI-X vectors did not fire: {vf}");
    // Over the emulated wire to L0's tap, and to L1's own PF (the igb switches VF <-> PF).
    run.line("L2-VF-PING-WIRE-OK");
    run.line("L2-VF-PING-PF-OK");
}

#[test]
fn vfs_tandem_created_are_removed_when_it_exits() {
    let bed = bed();
    assert_eq!(vf(l1(bed, "L1-PF ")).3, "0", "the PF had VFs before the test");
    assert_eq!(bed.run("create").rc, Some(0));
    assert_eq!(vf(l1(bed, "L1-AFTER-CREATE")), ("-", "-", "-", "0"));
    let left: Vec<&str> = bed.text.lines().filter(|l| l.starts_with("L1-JOURNAL-LEFT")).collect();
    assert!(left.iter().all(|l| l.ends_with(" lock")), "journals left behind: {left:?}");
}

#[test]
fn a_borrowed_vf_returns_to_its_driver_and_mac_after_poweroff() {
    let bed = bed();
    let before = vf(l1(bed, "L1-HOST-VF"));
    assert_eq!(before.1, "igbvf", "the host's VF 0 should start on igbvf");
    let run = bed.run("borrow");
    assert_eq!(run.rc, Some(0), "console:\n{}", run.console());
    assert_eq!(kv(run.line("L2-VF if="), "mac"), Some("02:00:00:00:aa:02"));
    // That run's RAM was hugepage-backed: DMA-mapped like any other.
    assert!(run.line("tandem: vf0:").contains("mapped for DMA: 512 MiB"), "{}", run.console());
    assert_eq!(vf(l1(bed, "L1-AFTER-BORROW")), before);
}

/// The guest's pings reached the PF over the VF in the second before the signal (100
/// sent; a slow bed answers fewer, a VF not passing traffic none).
fn mid_traffic(during: &str) {
    let rx = kv(during, "pf_rx").and_then(|n| n.parse::<u64>().ok());
    assert!(rx.is_some_and(|n| n >= 10), "no traffic over the VF when the signal came: {during}");
}

/// The signals of the fault matrix, with tandem's exit status for each.
const SIGNALS: [(&str, i32); 3] = [("TERM", 128 + 15), ("INT", 128 + 2), ("KILL", 128 + 9)];

/// Run `<phase>_<sig>` of vfio.sh (the n-th of the matrix, MAC 02:00:00:00:aa:<05 + n>):
/// while it ran the VF was on vfio-pci with the MAC asked for; SIGTERM and SIGINT give the
/// VF back as the host had it, SIGKILL leaves it to `tandem cleanup`, which gives it back.
fn vf_given_back_after_each_signal(phase: &str, first: usize, during_check: impl Fn(&str, &str)) {
    let bed = bed();
    let host = vf(l1(bed, "L1-HOST-VF"));
    for (i, (sig, status)) in SIGNALS.iter().enumerate() {
        let r = format!("{phase}_{sig}");
        let run = bed.run(&r);
        assert_eq!(run.rc, Some(*status), "{r}: console:\n{}", run.console());
        let during = l1(bed, &format!("L1-DURING-{r} "));
        let mac = format!("02:00:00:00:aa:{:02x}", first + i);
        assert_eq!((vf(during).1, vf(during).2), ("vfio-pci", mac.as_str()), "{r}: while the guest ran");
        during_check(&r, during);
        let after = vf(l1(bed, &format!("L1-AFTER-{r} ")));
        if *sig == "KILL" {
            assert_eq!(after.1, "vfio-pci", "{r}: nothing of tandem runs after SIGKILL");
            let cleanup = l1(bed, &format!("L1-CLEANUP-{r} "));
            assert!(cleanup.contains("restored vf0"), "{r}: {cleanup}");
            assert_eq!(vf(l1(bed, &format!("L1-AFTER-CLEANUP-{r} "))), host, "{r}: after cleanup");
        } else {
            assert_eq!(after, host, "{r}: after tandem ended");
        }
    }
}

#[test]
fn a_vf_is_given_back_after_sigterm_sigint_and_sigkill_plus_cleanup_mid_boot() {
    vf_given_back_after_each_signal("boot", 5, |r, _| {
        let run = bed().run(r);
        assert!(!run.console().contains("TANDEM-L2-INIT"), "{r}: the guest had booted already:\n{}", run.console());
    });
}

#[test]
fn a_vf_is_given_back_after_sigterm_sigint_and_sigkill_plus_cleanup_mid_traffic() {
    vf_given_back_after_each_signal("traffic", 8, |r, during| {
        assert_eq!(kv(bed().run(r).line("L2-VF-UP"), "mac"), Some(kv(during, "mac").unwrap_or("?")), "{r}");
        mid_traffic(during);
    });
}

#[test]
fn a_device_whose_group_holds_a_bound_device_is_refused_naming_it() {
    let bed = bed();
    // "L1-GROUP dev=<bdf> members=<bdf> <bdf> ...": the member that is not the device.
    let group = l1(bed, "L1-GROUP");
    let dev = kv(group, "dev").unwrap_or("?");
    let members = group.split_once("members=").map_or("", |(_, m)| m);
    let other = members.split_whitespace().find(|m| *m != dev).unwrap_or_else(|| panic!("no other member: {group}"));
    let run = bed.run("shared");
    assert_ne!(run.rc, Some(0));
    let err = run.line("tandem: error:");
    assert!(err.contains(&format!("{other} (bound to e1000e)")), "{err}");
    // Refused before anything changed: the device is still on its driver.
    assert_eq!(l1(bed, "L1-AFTER-SHARED"), "L1-AFTER-SHARED driver=e1000e override=(null)");
}

#[test]
fn without_interrupt_remapping_vfio_is_refused_with_the_way_out() {
    let bed = bed_without_ir();
    assert_eq!(kv(l1(bed, "L1-IR-CHIPS"), "n"), Some("0"), "L1 still remaps interrupts");
    let run = bed.run("refused");
    assert_ne!(run.rc, Some(0));
    let err = run.line("tandem: error:");
    for want in ["does not remap interrupts", "intremap=off", "allow_unsafe_interrupts"] {
        assert!(err.contains(want), "{want:?} missing: {err}");
    }
    assert_eq!(vf(l1(bed, "L1-AFTER-REFUSED")).3, "0", "refused before any VF was made");
}

#[test]
fn with_allow_unsafe_interrupts_the_vf_attaches_with_a_warning() {
    let bed = bed_without_ir();
    let run = bed.run("unsafe");
    assert_eq!(run.rc, Some(0), "console:\n{}", run.console());
    assert!(run.line("tandem: vf0:").contains("WARNING: interrupt remapping is OFF"), "{}", run.console());
    assert_eq!(kv(run.line("L2-VF-UP"), "mac"), Some("02:00:00:00:bb:02"));
    assert_eq!(vf(l1(bed, "L1-AFTER-UNSAFE")).3, "0");
}

#[test]
fn a_device_with_intx_interrupts_the_guest_through_the_ioapic() {
    let bed = bed();
    let run = bed.run("intx");
    assert_eq!(run.rc, Some(0), "console:\n{}", run.console());
    let edu = run.line("L2-EDU");
    // A register round trip through the BAR (mapped into the guest), the INTx pin shown.
    assert_eq!((kv(edu, "ident"), kv(edu, "liveness")), (Some("0x010000ED"), Some("0xEDCBA987")), "{edu}");
    assert_eq!((kv(edu, "driver"), kv(edu, "pin")), (Some("uio_pci_generic"), Some("1")), "{edu}");
    let intx = run.line("L2-INTX");
    let n = |k| kv(intx, k).and_then(|v| v.parse::<u64>().ok()).unwrap_or_else(|| panic!("{k} in {intx}"));
    assert!(n("after") > n("before"), "the device's interrupt never reached the guest: {intx}");
    let irq = run.line("L2-IRQ");
    assert!(irq.contains("IO-APIC") && irq.contains("fasteoi"), "not a level IOAPIC line: {irq}");
    // It had no driver on the host before; it has none again.
    assert_eq!(l1(bed, "L1-AFTER-INTX"), "L1-AFTER-INTX driver=");
}
