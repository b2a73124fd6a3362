//! The lease lifecycle against the fake host: what acquire changes, that release, drop and
//! `cleanup` put back exactly what was there (the whole tree and every VF setting), from any
//! step a tandem may die at.

use super::fake::{FakeHost, FRESH_VF};
use super::*;

const PF: &str = "0000:01:00.0";
const IFX: u32 = 3;

fn vf_spec(s: &str) -> VfSpec {
    VfSpec::parse(s, 0).unwrap()
}

fn dev_spec(bdf: &str) -> DeviceSpec {
    DeviceSpec::parse(&format!("path=/sys/bus/pci/devices/{bdf}"), 0).unwrap()
}

/// An igb PF `eth0` with 7 VFs possible and `numvfs` of them present.
fn igb(numvfs: u32, autoprobe: bool) -> FakeHost {
    let fx = FakeHost::new();
    fx.add_pf("eth0", PF, IFX, 7, numvfs, autoprobe);
    fx
}

fn kernel_log(fx: &FakeHost) -> Vec<String> {
    std::mem::take(&mut *fx.kernel.log.lock().unwrap())
}

#[test]
fn a_vf_is_set_up_and_put_back_exactly() {
    let fx = igb(2, true);
    fx.set_vf_settings(IFX, 1, VfConfig { mac: [2, 0, 0, 0, 0, 0x11], ..FRESH_VF });
    let before = fx.snapshot();
    let spec = vf_spec("pf=eth0,index=1,mac=02:00:00:00:00:99,vlan=100,spoofchk=off,trust=on,id=lan");
    let vf = VfLease::acquire(&spec, &fx.host()).unwrap();

    let bdf = "0000:01:10.1";
    assert_eq!((vf.id(), vf.bdf(), vf.group()), ("lan", bdf, 101));
    assert_eq!(vf.sysfs_path(), fx.root.join("sys/bus/pci/devices").join(bdf));
    assert_eq!(fx.driver(bdf).as_deref(), Some("vfio-pci"));
    assert!(fx.root.join("dev/vfio/101").exists());
    let set = VfConfig { mac: [2, 0, 0, 0, 0, 0x99], vlan: 100, qos: 0, spoofchk: false, trust: true };
    assert_eq!(fx.vf_settings(IFX, 1), set);
    assert_eq!(fx.vf_settings(IFX, 0), FRESH_VF, "the other VF is not touched");
    assert_eq!(fx.driver("0000:01:10.0").as_deref(), Some("igbvf"));
    assert!(vf.warnings().is_empty());
    let dir = format!("sys/bus/pci/devices/{bdf}");
    assert_eq!(
        kernel_log(&fx),
        [
            format!("{dir}/driver_override <- vfio-pci"),
            format!("{dir}/driver/unbind <- {bdf}"),
            format!("sys/bus/pci/drivers_probe <- {bdf}"),
        ]
    );
    assert_eq!(fx.journals(), ["vf-0000:01:00.0-1.state"]);
    let journal = std::fs::read_to_string(fx.runtime.join("vf-0000:01:00.0-1.state")).unwrap();
    for line in
        ["phase=bound", "bdf=0000:01:10.1", "driver=igbvf", "mac=02:00:00:00:00:11", "changed=mac,vlan,spoofchk,trust"]
    {
        assert!(journal.lines().any(|l| l == line), "{line} in\n{journal}");
    }

    assert_eq!(vf.release().unwrap(), Vec::<String>::new());
    assert_eq!(fx.snapshot(), before);
    assert!(fx.journals().is_empty());
    assert_eq!(
        kernel_log(&fx),
        [
            format!("{dir}/driver/unbind <- {bdf}"),
            format!("{dir}/driver_override <- igbvf"),
            format!("sys/bus/pci/drivers/igbvf/bind <- {bdf}"),
            format!("{dir}/driver_override <- "),
        ]
    );
}

#[test]
fn dropping_a_lease_puts_the_vf_back() {
    let fx = igb(1, true);
    let before = fx.snapshot();
    let vf = VfLease::acquire(&vf_spec("pf=eth0,index=0,trust=on"), &fx.host()).unwrap();
    assert!(fx.vf_settings(IFX, 0).trust);
    drop(vf);
    assert_eq!(fx.snapshot(), before);
    assert!(fx.journals().is_empty());
}

#[test]
fn a_vf_the_host_made_again_is_taken_afresh_and_given_back_as_the_host_made_it() {
    let fx = igb(1, true);
    fx.set_vf_settings(IFX, 0, VfConfig { mac: [2, 0, 0, 0, 0, 0x11], ..FRESH_VF });
    let mut vf = VfLease::acquire(&vf_spec("pf=eth0,index=0,mac=02:00:00:00:00:99,id=fo"), &fx.host()).unwrap();
    assert!(vf.vf_present());
    // The host removes the PF's VFs (once tandem has closed the device) and makes them again.
    let sysfs = fx.host().sysfs;
    sysfs.set_sriov_numvfs(PF, 0).unwrap();
    assert!(!vf.vf_present());
    sysfs.set_sriov_numvfs(PF, 1).unwrap();
    assert!(vf.vf_present());
    let remade = fx.snapshot();
    assert_eq!(fx.driver("0000:01:10.0").as_deref(), Some("igbvf"));

    vf.retake().unwrap();
    assert_eq!(fx.driver("0000:01:10.0").as_deref(), Some("vfio-pci"));
    assert_eq!(fx.vf_settings(IFX, 0).mac, [2, 0, 0, 0, 0, 0x99]);
    let journal = std::fs::read_to_string(fx.runtime.join("vf-0000:01:00.0-0.state")).unwrap();
    assert!(journal.contains("driver=igbvf") && journal.contains("mac=00:00:00:00:00:00"), "{journal}");
    // What it is given back to is the new VF as the host made it, not the one it removed.
    vf.release().unwrap();
    assert_eq!(fx.snapshot(), remade);
    assert_eq!(fx.vf_settings(IFX, 0), FRESH_VF);
    assert!(fx.journals().is_empty());
}

#[test]
fn taking_a_vf_again_while_the_host_has_none_never_makes_one_and_gives_all_back() {
    let fx = igb(0, true);
    let before = fx.snapshot();
    let mut vf = VfLease::acquire(&vf_spec("pf=eth0,index=0,create=on,id=fo"), &fx.host()).unwrap();
    fx.host().sysfs.set_sriov_numvfs(PF, 0).unwrap();
    let e = vf.retake().unwrap_err().to_string();
    assert!(e.contains("fo (VF 0 of eth0)"), "{e}");
    assert_eq!(fx.read("sys/bus/pci/devices/0000:01:00.0/sriov_numvfs"), "0", "no VF made");
    // The failed retake gave everything back, the PF's autoprobe too; the lease is empty.
    assert_eq!(fx.snapshot(), before);
    assert!(fx.journals().is_empty());
    // Once the host has the VF again, the next retake takes it from scratch.
    fx.host().sysfs.set_sriov_numvfs(PF, 1).unwrap();
    vf.retake().unwrap();
    assert_eq!(fx.driver("0000:01:10.0").as_deref(), Some("vfio-pci"));
    assert_eq!(fx.journals(), ["vf-0000:01:00.0-0.state"]);
    vf.release().unwrap();
    assert!(fx.journals().is_empty());
}

#[test]
fn create_on_makes_the_vfs_and_removes_them() {
    let fx = igb(0, true);
    let before = fx.snapshot();
    let vf = VfLease::acquire(&vf_spec("pf=eth0,index=1,create=on,mac=02:00:00:00:00:01"), &fx.host()).unwrap();
    assert_eq!(fx.read("sys/bus/pci/devices/0000:01:00.0/sriov_numvfs"), "2");
    assert_eq!(fx.read("sys/bus/pci/devices/0000:01:00.0/sriov_drivers_autoprobe"), "0");
    assert_eq!(fx.driver("0000:01:10.0"), None, "the other new VF is not probed");
    assert_eq!(fx.driver("0000:01:10.1").as_deref(), Some("vfio-pci"));
    assert_eq!(fx.journals(), ["pf-0000:01:00.0.state", "vf-0000:01:00.0-1.state"]);
    let log = kernel_log(&fx);
    let dir = "sys/bus/pci/devices/0000:01:00.0";
    assert_eq!(log[..2], [format!("{dir}/sriov_drivers_autoprobe <- 0"), format!("{dir}/sriov_numvfs <- 2")]);

    vf.release().unwrap();
    assert_eq!(fx.snapshot(), before);
    assert!(fx.journals().is_empty());
    let log = kernel_log(&fx);
    assert_eq!(
        log[log.len() - 2..],
        [format!("{dir}/sriov_numvfs <- 0"), format!("{dir}/sriov_drivers_autoprobe <- 1")]
    );
}

#[test]
fn created_vfs_stay_until_the_last_lease_on_the_pf_ends() {
    let fx = igb(0, true);
    let before = fx.snapshot();
    let specs = [vf_spec("pf=eth0,index=0,create=on"), VfSpec::parse("pf=eth0,index=2,create=on", 1).unwrap()];
    let mut vfs = VfLease::acquire_all(&specs, &fx.host()).unwrap();
    assert_eq!(fx.read("sys/bus/pci/devices/0000:01:00.0/sriov_numvfs"), "3", "created in one go");
    let second = vfs.pop().unwrap();
    let first = vfs.pop().unwrap();
    first.release().unwrap();
    assert_eq!(fx.read("sys/bus/pci/devices/0000:01:00.0/sriov_numvfs"), "3", "VF 2 still uses them");
    second.release().unwrap();
    assert_eq!(fx.snapshot(), before);
}

#[test]
fn a_pf_with_vfs_is_never_resized() {
    let fx = igb(1, true);
    let before = fx.snapshot();
    let e = VfLease::acquire(&vf_spec("pf=eth0,index=2,create=on"), &fx.host()).unwrap_err().to_string();
    assert!(e.contains("eth0 already has 1 VFs and VF 2 needs 3") && e.contains("does not resize"), "{e}");
    assert_eq!(fx.snapshot(), before);
    assert!(fx.journals().is_empty());
}

#[test]
fn host_side_mistakes_are_named() {
    let fx = igb(0, true);
    fx.add_device("0000:05:00.0", 9, "e1000e", true, false);
    fx.add_netdev("eno1", "0000:05:00.0", 7);
    let before = fx.snapshot();
    for (spec, why) in [
        ("pf=eth0,index=0", "eth0 has 0 VFs, so there is no VF 0: add create=on"),
        ("pf=eth0,index=7,create=on", "supports 7 VFs (sriov_totalvfs), so there is no VF 7"),
        ("pf=eth9,index=0", "no network interface \"eth9\""),
        ("pf=eno1,index=0", "eno1 (0000:05:00.0) has no SR-IOV capability"),
    ] {
        let e = VfLease::acquire(&vf_spec(spec), &fx.host()).unwrap_err().to_string();
        assert!(e.starts_with("vf0 (VF ") && e.contains(why), "{spec}: {e}");
    }
    let e = DeviceLease::acquire(&dev_spec("0000:0a:00.0"), &fx.host()).unwrap_err().to_string();
    assert!(e.contains("no PCI device 0000:0a:00.0"), "{e}");
    assert_eq!(fx.snapshot(), before);
    assert!(fx.journals().is_empty());
}

#[test]
fn a_group_with_a_bound_device_is_refused_by_name() {
    let fx = igb(1, true);
    fx.add_device("0000:02:00.0", 100, "e1000e", true, false);
    fx.add_device("0000:02:00.1", 100, "e1000e", false, false);
    fx.add_device("0000:00:1c.0", 100, "shpchp", true, true);
    let before = fx.snapshot();
    let e = VfLease::acquire(&vf_spec("pf=eth0,index=0,mac=02:00:00:00:00:01"), &fx.host()).unwrap_err().to_string();
    assert!(e.contains("IOMMU group 100 of 0000:01:10.0 also holds 0000:02:00.0 (bound to e1000e):"), "{e}");
    assert!(!e.contains("02:00.1") && !e.contains("1c.0"), "unbound devices and bridges are fine: {e}");
    assert_eq!(fx.snapshot(), before, "refused before anything changed");
    assert!(fx.journals().is_empty());
}

#[test]
fn a_device_is_bound_to_vfio_and_back() {
    let fx = FakeHost::new();
    fx.add_device("0000:03:00.0", 7, "e1000e", true, false);
    let before = fx.snapshot();
    let dev = DeviceLease::acquire(&dev_spec("0000:03:00.0"), &fx.host()).unwrap();
    assert_eq!((dev.id(), dev.bdf(), dev.group()), ("dev0", "0000:03:00.0", 7));
    assert_eq!(dev.sysfs_path(), fx.root.join("sys/bus/pci/devices/0000:03:00.0"));
    assert_eq!(fx.driver("0000:03:00.0").as_deref(), Some("vfio-pci"));
    assert_eq!(fx.journals(), ["dev-0000:03:00.0.state"]);
    dev.release().unwrap();
    assert_eq!(fx.snapshot(), before);

    fx.add_device("0000:03:00.1", 7, "snd_hda_intel", true, false);
    let before = fx.snapshot();
    let e = DeviceLease::acquire(&dev_spec("0000:03:00.0"), &fx.host()).unwrap_err().to_string();
    assert!(e.contains("also holds 0000:03:00.1 (bound to snd_hda_intel)"), "{e}");
    assert_eq!(fx.snapshot(), before);
}

#[test]
fn a_device_that_had_no_driver_is_left_without_one() {
    let fx = FakeHost::new();
    fx.add_device("0000:03:00.0", 7, "e1000e", false, false);
    let before = fx.snapshot();
    DeviceLease::acquire(&dev_spec("0000:03:00.0"), &fx.host()).unwrap().release().unwrap();
    assert_eq!(fx.snapshot(), before);
}

/// Kills the "process" before and after each host-changing step of `lease` (which acquires and
/// drops) in turn, then runs `tandem cleanup` as a new process would: the host must be exactly
/// as it was.
fn survive_a_kill_at_every_step(fx_for: impl Fn() -> FakeHost, lease: impl Fn(&Host) -> Result<(), SriovError>) {
    for op in 0.. {
        for after_effect in [false, true] {
            let fx = fx_for();
            let before = fx.snapshot();
            fx.gate.kill_at(op, after_effect);
            let result = lease(&fx.host());
            if !fx.gate.is_dead() {
                assert!(op > 6, "a lease has more than {op} steps");
                result.unwrap();
                assert_eq!(fx.snapshot(), before, "released after a full set-up");
                return;
            }
            // Ok when the kill came while the lease was being dropped.
            if let Err(e) = result {
                assert!(e.to_string().contains("killed (test)"), "op {op}: {e}");
            }
            fx.gate.revive();
            fx.orphan_journals();
            let report = cleanup(&fx.host()).unwrap();
            assert!(report.failed.is_empty() && report.in_use.is_empty(), "op {op}/{after_effect}: {report:?}");
            assert_eq!(fx.snapshot(), before, "killed at step {op} (after it took effect: {after_effect})");
            assert!(fx.journals().is_empty(), "op {op}/{after_effect}: {:?}", fx.journals());
        }
    }
}

#[test]
fn a_kill_at_any_step_of_creating_a_vf_is_cleaned_up() {
    survive_a_kill_at_every_step(
        || igb(0, true),
        |host| {
            let spec = vf_spec("pf=eth0,index=1,create=on,mac=02:00:00:00:00:01,vlan=5,spoofchk=off,trust=on");
            VfLease::acquire(&spec, host).map(drop)
        },
    );
}

#[test]
fn a_kill_at_any_step_of_taking_a_bound_vf_is_cleaned_up() {
    survive_a_kill_at_every_step(
        || {
            let fx = igb(2, true);
            fx.set_vf_settings(IFX, 1, VfConfig { mac: [2, 0, 0, 0, 0, 0x11], vlan: 9, qos: 3, ..FRESH_VF });
            fx
        },
        |host| VfLease::acquire(&vf_spec("pf=eth0,index=1,mac=02:00:00:00:00:99,vlan=100"), host).map(drop),
    );
}

#[test]
fn a_kill_at_any_step_of_taking_a_device_is_cleaned_up() {
    survive_a_kill_at_every_step(
        || {
            let fx = FakeHost::new();
            fx.add_device("0000:03:00.0", 7, "e1000e", true, false);
            fx
        },
        |host| DeviceLease::acquire(&dev_spec("0000:03:00.0"), host).map(drop),
    );
}

#[test]
fn live_leases_are_refused_and_stale_ones_restored() {
    let fx = igb(2, true);
    let before = fx.snapshot();
    let host = fx.host();
    let vf = VfLease::acquire(&vf_spec("pf=eth0,index=0,mac=02:00:00:00:00:01"), &host).unwrap();

    let me = std::process::id();
    let e = VfLease::acquire(&vf_spec("pf=eth0,index=0"), &host).unwrap_err().to_string();
    assert!(e.contains(&format!("0000:01:10.0 is in use by tandem pid {me}")), "{e}");
    let e = DeviceLease::acquire(&dev_spec("0000:01:10.0"), &host).unwrap_err().to_string();
    assert!(e.contains(&format!("in use by tandem pid {me}")), "the same VF as --device: {e}");
    let report = cleanup(&host).unwrap();
    assert_eq!(report.in_use, [format!("vf0 (VF 0 of eth0): in use by tandem pid {me}")]);
    assert!(report.restored.is_empty());

    // SIGKILL: no drop, and the owner is gone.
    std::mem::forget(vf);
    fx.orphan_journals();
    // The next start puts the VF back before taking it again.
    let vf = VfLease::acquire(&vf_spec("pf=eth0,index=0,mac=02:00:00:00:00:02"), &host).unwrap();
    assert_eq!(fx.vf_settings(IFX, 0).mac, [2, 0, 0, 0, 0, 2]);
    vf.release().unwrap();
    assert_eq!(fx.snapshot(), before);

    std::mem::forget(VfLease::acquire(&vf_spec("pf=eth0,index=1,trust=on"), &host).unwrap());
    fx.orphan_journals();
    let report = cleanup(&host).unwrap();
    assert_eq!(report.restored, ["vf0 (VF 1 of eth0)"]);
    assert_eq!(fx.snapshot(), before);
    assert!(fx.journals().is_empty());
}

#[test]
fn cleanup_removes_vfs_created_by_a_dead_tandem() {
    let fx = igb(0, false);
    let before = fx.snapshot();
    std::mem::forget(VfLease::acquire(&vf_spec("pf=eth0,index=0,create=on"), &fx.host()).unwrap());
    fx.orphan_journals();
    let report = cleanup(&fx.host()).unwrap();
    assert_eq!(report.restored, ["vf0 (VF 0 of eth0)", "the VFs Tandem created on eth0 (0000:01:00.0)"]);
    assert_eq!(fx.snapshot(), before);
}

#[test]
fn cleanup_reports_a_damaged_journal_and_keeps_it() {
    let fx = igb(0, true);
    std::fs::create_dir_all(&fx.runtime).unwrap();
    std::fs::write(fx.runtime.join("vf-0000:01:00.0-0.state"), "owner_pid=1\nphase=bound\n").unwrap();
    let report = cleanup(&fx.host()).unwrap();
    assert_eq!(report.failed.len(), 1);
    assert!(report.failed[0].contains("is damaged (no owner_start=)"), "{:?}", report.failed);
    assert_eq!(fx.journals(), ["vf-0000:01:00.0-0.state"]);
}

#[test]
fn a_refused_setting_undoes_the_ones_before_it() {
    let fx = igb(1, true);
    let before = fx.snapshot();
    *fx.netlink.refuse.lock().unwrap() = Some(("trust", libc::EOPNOTSUPP));
    let e = VfLease::acquire(&vf_spec("pf=eth0,index=0,mac=02:00:00:00:00:01,trust=on"), &fx.host()).unwrap_err();
    let e = e.to_string();
    assert!(e.contains("vf0 (VF 0 of eth0): on eth0: trust of VF 0 failed") && e.contains("cannot set this"), "{e}");
    assert_eq!(fx.snapshot(), before, "the MAC is back, the binding untouched");
}

#[test]
fn binding_failures_are_explained_and_undone() {
    let fx = igb(1, true);
    fx.kernel.no_vfio_nodes.store(true, std::sync::atomic::Ordering::SeqCst);
    let before = fx.snapshot();
    let e = VfLease::acquire(&vf_spec("pf=eth0,index=0,mac=02:00:00:00:00:01"), &fx.host()).unwrap_err();
    assert!(e.to_string().contains("dev/vfio/100 did not appear within 50 ms of binding 0000:01:10.0"), "{e}");
    assert_eq!(fx.snapshot(), before);

    std::fs::remove_dir(fx.root.join("sys/bus/pci/drivers/vfio-pci")).unwrap();
    let before = fx.snapshot();
    let e = VfLease::acquire(&vf_spec("pf=eth0,index=0"), &fx.host()).unwrap_err();
    assert!(e.to_string().contains("vfio-pci is not loaded") && e.to_string().contains("modprobe vfio-pci"), "{e}");
    assert_eq!(fx.snapshot(), before);
}

#[test]
fn a_restore_the_driver_refuses_is_a_warning() {
    let fx = igb(1, true);
    let vf = VfLease::acquire(&vf_spec("pf=eth0,index=0,mac=02:00:00:00:00:01"), &fx.host()).unwrap();
    *fx.netlink.refuse.lock().unwrap() = Some(("mac", libc::EINVAL));
    let warnings = vf.release().unwrap();
    assert_eq!(warnings.len(), 1);
    assert!(warnings[0].starts_with("vf0 (VF 0 of eth0): putting back mac on eth0:"), "{warnings:?}");
    assert_eq!(fx.driver("0000:01:10.0").as_deref(), Some("igbvf"), "the rest is restored");
    assert!(fx.journals().is_empty(), "retrying would not help");
}

#[test]
fn a_restore_that_may_work_later_keeps_its_journal() {
    let fx = igb(1, true);
    let before = fx.snapshot();
    let vf = VfLease::acquire(&vf_spec("pf=eth0,index=0,mac=02:00:00:00:00:01"), &fx.host()).unwrap();
    *fx.netlink.refuse.lock().unwrap() = Some(("mac", libc::EPERM));
    let e = vf.release().unwrap_err().to_string();
    assert!(e.contains("CAP_NET_ADMIN") && e.contains("stays so that `tandem cleanup` can finish"), "{e}");
    assert_eq!(fx.journals(), ["vf-0000:01:00.0-0.state"]);

    *fx.netlink.refuse.lock().unwrap() = None;
    fx.orphan_journals();
    assert!(cleanup(&fx.host()).unwrap().failed.is_empty());
    assert_eq!(fx.snapshot(), before);
}

#[test]
fn a_pf_that_is_down_is_a_warning() {
    let fx = igb(1, true);
    std::fs::write(fx.root.join("sys/class/net/eth0/flags"), "0x1002\n").unwrap();
    let vf = VfLease::acquire(&vf_spec("pf=eth0,index=0"), &fx.host()).unwrap();
    assert_eq!(vf.warnings().len(), 1);
    assert!(vf.warnings()[0].contains("eth0 is down") && vf.warnings()[0].contains("ip link set eth0 up"));
}

#[test]
fn created_vfs_stay_while_one_is_leased_as_a_device() {
    let fx = igb(0, true);
    let before = fx.snapshot();
    let host = fx.host();
    let numvfs = || fx.read("sys/bus/pci/devices/0000:01:00.0/sriov_numvfs");
    let vf = VfLease::acquire(&vf_spec("pf=eth0,index=1,create=on"), &host).unwrap();
    // Another VM takes VF 0, which Tandem created for the first, by its address.
    let dev = DeviceLease::acquire(&dev_spec("0000:01:10.0"), &host).unwrap();
    vf.release().unwrap();
    assert_eq!(numvfs(), "2", "VF 0 is still in a VM");
    assert_eq!(fx.driver("0000:01:10.0").as_deref(), Some("vfio-pci"));
    assert_eq!(fx.journals(), ["dev-0000:01:10.0.state", "pf-0000:01:00.0.state"]);
    let report = cleanup(&host).unwrap();
    assert!(report.restored.is_empty() && report.failed.is_empty(), "{report:?}");
    assert_eq!(numvfs(), "2", "cleanup leaves them too");
    // The last user's release removes them.
    dev.release().unwrap();
    assert_eq!(fx.snapshot(), before);
    assert!(fx.journals().is_empty());

    // And so does cleanup, once that user is gone.
    let vf = VfLease::acquire(&vf_spec("pf=eth0,index=1,create=on"), &host).unwrap();
    std::mem::forget(DeviceLease::acquire(&dev_spec("0000:01:10.0"), &host).unwrap());
    vf.release().unwrap();
    assert_eq!(numvfs(), "2");
    fx.orphan_journals();
    let report = cleanup(&host).unwrap();
    assert_eq!(report.restored, ["dev0 (0000:01:10.0)", "the VFs Tandem created on eth0 (0000:01:00.0)"]);
    assert_eq!(fx.snapshot(), before);
    assert!(fx.journals().is_empty());
}

#[test]
fn settings_the_guest_changed_are_put_back() {
    let fx = igb(2, true);
    let host_side = VfConfig { mac: [2, 0, 0, 0, 0, 0x11], ..FRESH_VF };
    fx.set_vf_settings(IFX, 0, host_side);
    let before = fx.snapshot();
    let host = fx.host();

    // No settings asked for: the originals are journaled all the same.
    let vf = VfLease::acquire(&vf_spec("pf=eth0,index=0"), &host).unwrap();
    let journal = std::fs::read_to_string(fx.runtime.join("vf-0000:01:00.0-0.state")).unwrap();
    for line in ["mac=02:00:00:00:00:11", "vlan=0", "spoofchk=1", "trust=0", "changed="] {
        assert!(journal.lines().any(|l| l == line), "{line} in\n{journal}");
    }
    // The guest sets its own MAC through the VF->PF mailbox, and the PF keeps it.
    fx.set_vf_settings(IFX, 0, VfConfig { mac: [2, 0, 0, 0, 0, 0x66], ..host_side });
    assert_eq!(vf.release().unwrap(), Vec::<String>::new());
    assert_eq!(fx.snapshot(), before);

    // Trusted, it changes its MAC over the one Tandem set; and the tandem is killed.
    let vf = VfLease::acquire(&vf_spec("pf=eth0,index=1,mac=02:00:00:00:00:99,trust=on"), &host).unwrap();
    fx.set_vf_settings(IFX, 1, VfConfig { mac: [2, 0, 0, 0, 0, 0x77], trust: true, ..FRESH_VF });
    std::mem::forget(vf);
    fx.orphan_journals();
    let report = cleanup(&host).unwrap();
    assert!(report.failed.is_empty() && report.warnings.is_empty(), "{report:?}");
    assert_eq!(fx.snapshot(), before);
}

#[test]
fn a_pf_that_cannot_report_vf_settings_is_fine_without_any() {
    let fx = igb(1, true);
    let before = fx.snapshot();
    let host = fx.host();
    *fx.netlink.refuse_read.lock().unwrap() = Some(libc::EOPNOTSUPP);
    let vf = VfLease::acquire(&vf_spec("pf=eth0,index=0"), &host).unwrap();
    let journal = std::fs::read_to_string(fx.runtime.join("vf-0000:01:00.0-0.state")).unwrap();
    assert!(!journal.contains("mac="), "nothing known to journal:\n{journal}");
    assert_eq!(vf.release().unwrap(), Vec::<String>::new());
    assert_eq!(fx.snapshot(), before);

    let e = VfLease::acquire(&vf_spec("pf=eth0,index=0,mac=02:00:00:00:00:01"), &host).unwrap_err().to_string();
    assert!(e.contains("on eth0: reading the settings of VF 0 failed"), "{e}");
    assert_eq!(fx.snapshot(), before);
    assert!(fx.journals().is_empty());
}

#[test]
fn a_claim_cut_short_by_a_kill_is_deleted() {
    let fx = igb(1, true);
    let before = fx.snapshot();
    let host = fx.host();
    std::fs::create_dir_all(&fx.runtime).unwrap();
    // What a tandem killed between creating a journal and writing it left, whole or in part.
    let torn = [
        ("dev-0000:01:10.0.state", ""),
        ("pf-0000:01:00.0.state", "owner_pid=1\nowner_start=2\nphase=claimed\npf=eth0\npf_b"),
        ("vf-0000:01:00.0-0.state", "owner_pid=1\nowner_start=2\nphase=cla"),
    ];
    for (name, text) in torn {
        std::fs::write(fx.runtime.join(name), text).unwrap();
    }
    let report = cleanup(&host).unwrap();
    assert!(report.failed.is_empty() && report.restored.is_empty(), "{report:?}");
    assert_eq!(report.warnings.len(), 3, "{report:?}");
    assert!(report.warnings[0].contains("dev-0000:01:10.0.state: its tandem was killed while writing it"));
    assert!(fx.journals().is_empty());
    assert_eq!(fx.snapshot(), before);

    // The next lease of the device takes the name over.
    std::fs::write(fx.runtime.join("vf-0000:01:00.0-0.state"), "").unwrap();
    let vf = VfLease::acquire(&vf_spec("pf=eth0,index=0,mac=02:00:00:00:00:01"), &host).unwrap();
    assert_eq!(fx.vf_settings(IFX, 0).mac, [2, 0, 0, 0, 0, 1]);
    vf.release().unwrap();
    assert_eq!(fx.snapshot(), before);

    // One past its claim is damaged, not torn: it stays for the user.
    std::fs::write(fx.runtime.join("vf-0000:01:00.0-0.state"), "owner_pid=1\nphase=binding").unwrap();
    assert_eq!(cleanup(&host).unwrap().failed.len(), 1);
    assert_eq!(fx.journals(), ["vf-0000:01:00.0-0.state"]);
}

#[test]
fn claims_are_whole_or_absent() {
    use state::{DeviceRecord, Journal, Owner, Phase, Record};
    let fx = FakeHost::new();
    std::fs::create_dir_all(&fx.runtime).unwrap();
    let path = fx.runtime.join("dev-0000:03:00.0.state");
    let record = |id: &str| DeviceRecord {
        owner: Owner { pid: 1, start: 2 },
        phase: Phase::Claimed,
        id: id.into(),
        vf: None,
        bdf: Some("0000:03:00.0".into()),
        group: None,
        driver: None,
        driver_override: None,
        original: None,
        changed: Vec::new(),
    };
    let mut mine = Journal::claim(path.clone(), record("a")).unwrap().expect("the name is free");
    assert!(Journal::claim(path.clone(), record("b")).unwrap().is_none(), "the name is taken");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), record("a").to_text());
    let names: Vec<_> = std::fs::read_dir(&fx.runtime).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, ["dev-0000:03:00.0.state"], "no temporary file is left");

    // A kill between linking a claim and unlinking its temporary name leaves a second link to
    // the journal: the next save must replace the journal (a new file renamed over it), not
    // truncate and rewrite it in place through that link.
    let tmp = fx.runtime.join(format!(".dev-0000:03:00.0.state.{}.tmp", std::process::id()));
    std::fs::hard_link(&path, &tmp).unwrap();
    let inode = |p: &std::path::Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());
    let claimed = inode(&path);
    mine.record.phase = Phase::Recorded;
    mine.save().unwrap();
    assert_ne!(inode(&path), claimed, "a new file");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), mine.record.to_text());
    assert!(!tmp.exists());
}
