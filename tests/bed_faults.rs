//! Faults, in the nested bed: tandem stopped by SIGINT, SIGTERM or SIGKILL, mid-boot or
//! mid-traffic, takes its tap with it; a guest that triple-faults or panics ends tandem with status 1
//! and the reason; disks that fill up or shrink under the guest give it I/O errors while
//! the VMM lives; a tap deleted under a running NIC leaves the device loop idle.

use std::sync::OnceLock;

use tandem_tests::{kv, repo_root, run_bed, BedLog, BedOptions};

fn bed() -> &'static BedLog {
    static BED: OnceLock<BedLog> = OnceLock::new();
    BED.get_or_init(|| {
        let opts = BedOptions { timeout_s: 900, ..Default::default() };
        run_bed("faults", &repo_root().join("tests/scenarios/faults.sh"), &opts)
    })
}

fn l1<'a>(bed: &'a BedLog, marker: &str) -> &'a str {
    bed.text.lines().find(|l| l.starts_with(marker)).unwrap_or_else(|| panic!("no {marker:?} line:\n{}", bed.tail(80)))
}

fn number(line: &str, key: &str) -> u64 {
    kv(line, key).and_then(|v| v.trim_end_matches(',').parse().ok()).unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

/// The signals of the fault matrix, with tandem's exit status for each.
const SIGNALS: [(&str, &str); 3] = [("INT", "130"), ("TERM", "143"), ("KILL", "137")];

#[test]
fn sigint_sigterm_and_sigkill_mid_boot_end_tandem_and_its_tap_goes() {
    let bed = bed();
    for (sig, rc) in SIGNALS {
        let before = l1(bed, &format!("L1-FAULT-boot_{sig}-BEFORE"));
        assert_eq!(kv(before, "tap"), Some("left"), "tandem had not made its tap yet: {before}");
        assert_eq!(kv(before, "booted"), Some("0"), "the guest had finished booting: not mid-boot: {before}");
        let after = l1(bed, &format!("L1-FAULT-boot_{sig} "));
        assert_eq!((kv(after, "rc"), kv(after, "tap")), (Some(rc), Some("gone")), "{after}");
    }
}

#[test]
fn sigint_sigterm_and_sigkill_mid_traffic_leave_no_tap_and_nothing_to_clean_up() {
    let bed = bed();
    for (sig, rc) in SIGNALS {
        let traffic = l1(bed, &format!("L1-FAULT-{sig}-TRAFFIC"));
        assert!(number(traffic, "rx_bytes") > 100_000, "no traffic when the signal came: {traffic}");
        let after = l1(bed, &format!("L1-FAULT-{sig} "));
        assert_eq!((kv(after, "rc"), kv(after, "tap")), (Some(rc), Some("gone")), "{after}");
    }
    let cleanup = l1(bed, "L1-FAULT-CLEANUP-RC");
    assert_eq!(kv(cleanup, "rc"), Some("0"), "{cleanup}");
    assert!(bed.text.contains("L1-FAULT-CLEANUP tandem cleanup: nothing to restore"), "{}", bed.tail(80));
}

#[test]
fn a_triple_fault_ends_tandem_with_status_1_and_says_why() {
    let run = bed().run("triple");
    assert!(run.lines.iter().any(|l| l.contains("L2-FAULT-TRIPLE")), "{}", run.console());
    assert_eq!(run.rc, Some(1), "{}", run.console());
    assert!(run.console().contains("tandem: vCPU 0 triple-faulted"), "{}", run.console());
}

#[test]
fn a_guest_kernel_panic_ends_tandem_with_status_1_and_the_panic_on_the_console() {
    let run = bed().run("panic");
    let console = run.console();
    assert_eq!(run.rc, Some(1), "{console}");
    // The guest printed why before tandem ended it, and tandem says what happened.
    assert!(console.contains("Kernel panic - not syncing: sysrq triggered crash"), "{console}");
    assert!(console.contains("tandem: the guest kernel panicked"), "{console}");
    assert!(!console.contains("INSMOD-FAIL"), "{console}");
}

#[test]
fn disks_that_fill_up_or_shrink_give_the_guest_io_errors_and_the_vmm_lives() {
    let bed = bed();
    let run = bed.run("disks");
    let console = run.console();
    assert!(run.lines.iter().any(|l| l.contains("L2-FAULT-ALIVE")), "{console}");
    assert_eq!(run.rc, Some(0), "the VM did not end cleanly after the disk errors: {console}");
    let full = run.line("L2-FULL-DD");
    assert_ne!(kv(full, "rc"), Some("0"), "writing 16 MiB onto a 4 MiB file system succeeded: {full}");
    let counters = l1(bed, "L1-FAULT-DISK-COUNTERS");
    for disk in ["full", "shrink"] {
        let at = counters.find(&format!(r#""{disk}":{{"#)).unwrap_or_else(|| panic!("no {disk} in {counters}"));
        let errors = counters[at..].split(r#""errors":"#).nth(1).and_then(|r| r.split([',', '}']).next());
        let errors: u64 = errors.and_then(|e| e.parse().ok()).unwrap_or_else(|| panic!("{counters}"));
        assert!(errors > 0, "disk {disk} counted no errors: {counters}");
    }
}

#[test]
fn a_tap_deleted_under_a_running_nic_leaves_the_device_loop_idle() {
    let bed = bed();
    let run = bed.run("gone");
    assert!(run.lines.iter().any(|l| l.contains("L2-GONE-PING-OK")), "{}", run.console());
    assert_eq!(kv(l1(bed, "L1-GONE-DELETED"), "tap"), Some("gone"));
    // 5 s of a busy loop would be ~500 ticks; an idle loop takes none.
    let cpu = l1(bed, "L1-GONE-LOOP-CPU");
    assert!(number(cpu, "ticks") <= 25, "the device loop spun after its tap went: {cpu}");
    assert!(run.lines.iter().any(|l| l.contains("L2-GONE-END")), "the guest stopped: {}", run.console());
    assert_eq!(run.rc, Some(0), "{}", run.console());
}

#[test]
fn no_vmm_thread_made_a_call_outside_its_seccomp_filter() {
    let bed = bed();
    assert!(bed.text.contains("L1-SCENARIO-EXIT"), "the scenario did not finish:\n{}", bed.tail(40));
    assert_eq!(bed.seccomp_violations(), Vec::<&str>::new());
}
