//! The control socket, in the nested bed: `tandem ctl` reads a running guest's info and
//! counters, pauses it (its vCPU runs nothing: the guest's ticks stop) and resumes it, gets
//! a JSON error for an unknown device without disturbing the VM, and shuts it down cleanly.

use std::sync::OnceLock;

use tandem_tests::{kv, repo_root, run_bed, BedLog, BedOptions};

fn bed() -> &'static BedLog {
    static BED: OnceLock<BedLog> = OnceLock::new();
    BED.get_or_init(|| {
        let opts = BedOptions { timeout_s: 600, ..Default::default() };
        run_bed("api", &repo_root().join("tests/scenarios/api.sh"), &opts)
    })
}

fn l1<'a>(bed: &'a BedLog, marker: &str) -> &'a str {
    bed.text.lines().find(|l| l.starts_with(marker)).unwrap_or_else(|| panic!("no {marker:?} line:\n{}", bed.tail(60)))
}

fn number(line: &str, key: &str) -> u64 {
    kv(line, key).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no number {key}= in {line:?}"))
}

#[test]
fn info_and_counters_describe_the_running_vm() {
    let bed = bed();
    assert!(!bed.text.contains("L1-API-NO-TICKS"), "the guest never ticked:\n{}", bed.tail(60));
    let info = l1(bed, "L1-API-INFO ");
    for want in
        [r#""state":"running""#, r#""cpus":1"#, r#""memory_mib":256"#, r#""id":"nic0""#, r#""kind":"virtio-net""#]
    {
        assert!(info.contains(want), "{want} missing from {info}");
    }
    let counters = l1(bed, "L1-API-COUNTERS");
    assert!(counters.contains(r#""nic0":{"#) && counters.contains(r#""script":{"#), "{counters}");
    assert!(counters.contains(r#""vm_exits":{"#), "{counters}");
}

#[test]
fn a_paused_guest_stops_ticking_and_resumes() {
    let bed = bed();
    l1(bed, "L1-API-PAUSED");
    let during = l1(bed, "L1-API-DURING-PAUSE");
    assert_eq!(number(during, "before"), number(during, "after"), "the guest ran while paused: {during}");
    assert!(l1(bed, "L1-API-PAUSE-AGAIN").contains("already paused"), "{}", l1(bed, "L1-API-PAUSE-AGAIN"));
    l1(bed, "L1-API-RESUMED");
    assert!(number(l1(bed, "L1-API-AFTER-RESUME"), "ticks") > number(during, "after"), "no ticks after resume");
}

#[test]
fn an_unknown_device_or_malformed_json_is_a_json_error_and_the_vm_keeps_running() {
    let bed = bed();
    let err = l1(bed, "L1-API-REMOVE-UNKNOWN");
    assert!(err.contains("404") && err.contains("no device \"nosuch\""), "{err}");
    let malformed = l1(bed, "L1-API-MALFORMED");
    assert!(malformed.contains("HTTP 400") && malformed.contains("JSON"), "{malformed}");
    assert!(l1(bed, "L1-API-INFO-AGAIN").contains(r#""state":"running""#));
}

#[test]
fn shutdown_ends_the_vm_cleanly_and_removes_the_socket() {
    let bed = bed();
    l1(bed, "L1-API-SHUTDOWN-SENT");
    assert_eq!(bed.run("api").rc, Some(0), "{}", bed.run("api").console());
    assert_eq!(l1(bed, "L1-API-SOCKET-LEFT"), "L1-API-SOCKET-LEFT no");
}
