//! Failover (issue 5, cold-plugged so far): a VF paired with a virtio-net standby
//! (`--net ...,standby=on` + `--vf ...,failover=<id>`) in the nested bed with an igb NIC.
//! The guest's net_failover joins them under one master with one MAC, the VF as primary,
//! and the master's traffic goes over the VF, not the standby. `tandem ctl device-remove`
//! then takes the VF out of the running guest through ACPI hot-unplug and hands it back to
//! the host while the VM runs on.

use std::sync::OnceLock;

use tandem_tests::{kv, repo_root, run_bed, BedLog, BedOptions};

fn bed() -> &'static BedLog {
    static BED: OnceLock<BedLog> = OnceLock::new();
    BED.get_or_init(|| {
        let opts = BedOptions { iommu: true, igb: true, timeout_s: 600, ..Default::default() };
        run_bed("failover", &repo_root().join("tests/scenarios/failover.sh"), &opts)
    })
}

#[test]
fn the_guest_pairs_vf_and_standby_under_one_failover_master() {
    let run = bed().run("failover");
    assert_eq!(run.rc, Some(0), "console:\n{}", run.console());
    let pair = run.line("L2-FO-MASTER");
    let (master, primary, standby) = (kv(pair, "if"), kv(pair, "primary"), kv(pair, "standby"));
    assert!(standby.is_some_and(|s| s != "-"), "no standby under the master: {pair}");
    let ifs: Vec<&&str> = run.lines.iter().filter(|l| l.starts_with("L2-FO-IF")).collect();
    let of = |name: Option<&str>| {
        ifs.iter().find(|l| kv(l, "if") == name).unwrap_or_else(|| panic!("no interface {name:?}: {ifs:?}"))
    };
    let (vf, sb) = (of(primary), of(standby));
    assert_eq!((kv(vf, "driver"), kv(vf, "master")), (Some("igbvf"), master), "{vf}");
    assert_eq!((kv(sb, "driver"), kv(sb, "master")), (Some("virtio_net"), master), "{sb}");
    // One MAC for all three: the pair's, settled by Tandem.
    let mac = kv(of(master), "mac");
    assert!(mac.is_some() && kv(vf, "mac") == mac && kv(sb, "mac") == mac, "{ifs:?}");
}

#[test]
fn traffic_goes_over_the_vf_while_it_is_there() {
    let bed = bed();
    let run = bed.run("failover");
    assert_eq!(kv(run.line("L2-FO-PING"), "received"), Some("20"), "{}", run.console());
    let stats = run.line("L2-FO-STATS");
    let n = |k| kv(stats, k).and_then(|v| v.parse::<u64>().ok()).unwrap_or_else(|| panic!("{k} in {stats}"));
    assert!(n("vf_tx") >= 20, "the pings did not leave over the VF: {stats}");
    assert_eq!(n("standby_tx"), 0, "the standby carried traffic while the VF was up: {stats}");
    let after = bed.text.lines().find(|l| l.starts_with("L1-AFTER-FAILOVER")).unwrap_or("");
    assert!(after.ends_with("numvfs=0"), "the VFs Tandem made are still there: {after}");
}

#[test]
fn device_remove_takes_the_vf_out_of_the_running_guest_and_gives_it_back_to_the_host() {
    let bed = bed();
    let l1 = |m: &str| {
        bed.text.lines().find(|l| l.starts_with(m)).unwrap_or_else(|| panic!("no {m:?} line:\n{}", bed.tail(60)))
    };
    assert_eq!(l1("L1-UNPLUG-CTL"), "L1-UNPLUG-CTL removed vf0");
    let run = bed.run("unplug");
    // The guest ejected it (ACPI), no forced removal.
    assert!(run.line("tandem: vf0: removed").contains("the guest gave it back"), "{}", run.console());
    let gone = run.line("L2-UNPLUG-GONE");
    assert_eq!(kv(gone, "vf_devices"), Some("0"), "{gone}");
    // Released on the host while the VM still ran: the VFs Tandem made are gone already.
    assert!(l1("L1-UNPLUG-HOST").ends_with("numvfs=0"), "{}", l1("L1-UNPLUG-HOST"));
    let again = l1("L1-UNPLUG-AGAIN");
    assert!(again.contains("404") && again.contains("no device \"vf0\""), "{again}");
    let info = l1("L1-UNPLUG-INFO");
    assert!(info.contains(r#""state":"running""#) && !info.contains("vf0"), "{info}");
    assert_eq!(run.rc, Some(0), "console:\n{}", run.console());
}
