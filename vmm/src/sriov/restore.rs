//! Putting devices back from their journals: on release, on drop, for a stale journal met at
//! start, and for every stale journal in `tandem cleanup`.
//!
//! Every step looks at the device as it is now before acting, so a restore can start from any
//! phase — including one whose last step may or may not have happened — and can be run again
//! after a partial failure.

use std::path::{Path, PathBuf};

use super::netlink::{NetlinkError, VfAttr};
use super::state::{self, DeviceRecord, Journal, PfPhase, PfRecord, Phase, RuntimeLock};
use super::sysfs::{Sysfs, SysfsError};
use super::{Host, SriovError};

/// How a journal's device is named in messages: `vf0 (VF 1 of eth0)`, `dev0 (0000:03:00.0)`.
pub(crate) fn describe(record: &DeviceRecord) -> String {
    match (&record.vf, &record.bdf) {
        (Some(vf), _) => format!("{} (VF {} of {})", record.id, vf.index, vf.pf),
        (None, Some(bdf)) => format!("{} ({bdf})", record.id),
        (None, None) => record.id.clone(),
    }
}

/// Failures another run could fix (privileges, a busy PF, a socket); the others — the driver
/// refusing the old value — will not change, so they are reported and the restore goes on.
fn retry_may_help(e: &NetlinkError) -> bool {
    match e {
        NetlinkError::Refused { source, .. } => {
            matches!(source.raw_os_error(), Some(libc::EPERM | libc::EACCES | libc::EBUSY | libc::EAGAIN))
        }
        NetlinkError::Socket(_) | NetlinkError::Io { .. } => true,
        NetlinkError::NoVfInfo { .. } | NetlinkError::BadReply(_) => false,
    }
}

/// Back to the original driver, or unbound if it had none, with the original driver_override.
fn undo_binding(sysfs: &Sysfs, record: &DeviceRecord, bdf: &str) -> Result<(), SysfsError> {
    let original = record.driver.as_deref();
    let current = sysfs.driver(bdf)?;
    if current.is_some() && current.as_deref() != original {
        sysfs.unbind(bdf)?;
    }
    if let Some(driver) = original {
        if sysfs.driver(bdf)?.as_deref() != Some(driver) {
            // Through the override: a VF whose PF has sriov_drivers_autoprobe off can be bound
            // only to the driver it is pinned to.
            sysfs.set_driver_override(bdf, Some(driver))?;
            sysfs.bind(bdf, driver)?;
        }
    }
    if sysfs.driver_override(bdf)? != record.driver_override {
        sysfs.set_driver_override(bdf, record.driver_override.as_deref())?;
    }
    Ok(())
}

/// Undoes a device journal's changes, VF settings first so that the host driver binds with the
/// original MAC. Returns (warnings, failures).
fn undo_device(host: &Host, record: &DeviceRecord) -> (Vec<String>, Vec<String>) {
    let dev = describe(record);
    let (mut warnings, mut failures) = (Vec::new(), Vec::new());
    if let (Some(vf), Some(original)) = (&record.vf, &record.original) {
        // Every setting that differs now, not only those Tandem set: the guest may have set its
        // MAC (or, trusted, more) through the VF->PF mailbox, and some PF drivers keep that across
        // the VF's reset, so the VF would leave with the guest's MAC.
        let attrs: Vec<VfAttr> = match host.netlink.vf_config(vf.pf_ifindex, vf.index) {
            Ok(now) => VfAttr::ALL.into_iter().rev().filter(|a| a.differs(&now, original)).collect(),
            Err(e) => {
                // Put back what Tandem set, blind; the guest's own changes stay unknown, so the
                // journal stays for another run if that one may read them.
                if retry_may_help(&e) {
                    failures.push(format!("reading the VF's settings on {}: {e}", vf.pf));
                }
                record.changed.iter().rev().copied().collect()
            }
        };
        for attr in attrs {
            if let Err(e) = attr.apply(&*host.netlink, vf.pf_ifindex, vf.index, original) {
                let what = format!("putting back {} on {}: {e}", attr.name(), vf.pf);
                if retry_may_help(&e) {
                    failures.push(what);
                } else {
                    warnings.push(format!("{dev}: {what}; left as it is"));
                }
            }
        }
    }
    if let (true, Some(bdf)) = (record.phase >= Phase::Binding, &record.bdf) {
        if !host.sysfs.device_path(bdf).exists() {
            warnings.push(format!("{dev}: {bdf} is gone, so there is no driver to put back"));
        } else if let Err(e) = undo_binding(&host.sysfs, record, bdf) {
            failures.push(e.to_string());
        }
    }
    (warnings, failures)
}

/// Restores a device journal and deletes it; then, for a VF, removes the VFs Tandem created on
/// its PF once no journal refers to that PF. The caller holds the [`RuntimeLock`].
pub(crate) fn restore_journal(host: &Host, journal: Journal<DeviceRecord>) -> Result<Vec<String>, SriovError> {
    // A VF given as `--device` may be the last user of VFs Tandem created for a `--vf`. Its PF is
    // read now, while the device is surely there; if unreadable, those VFs wait for `tandem cleanup`.
    let pf_bdf = match (&journal.record.vf, &journal.record.bdf) {
        (Some(vf), _) => Some(vf.pf_bdf.clone()),
        (None, Some(bdf)) => host.sysfs.physfn(bdf).ok().flatten(),
        (None, None) => None,
    };
    let warnings = restore_device(host, journal)?;
    if let Some(pf_bdf) = pf_bdf {
        restore_pf_if_unused(host, &pf_bdf)?;
    }
    Ok(warnings)
}

/// Restores a device journal and deletes it, leaving its PF's record alone.
fn restore_device(host: &Host, journal: Journal<DeviceRecord>) -> Result<Vec<String>, SriovError> {
    let (warnings, failures) = undo_device(host, &journal.record);
    if !failures.is_empty() {
        let dev = describe(&journal.record);
        return Err(SriovError::Restore { dev, journal: journal.path().to_path_buf(), failures });
    }
    journal.remove()?;
    Ok(warnings)
}

/// Whether a device journal still refers to one of the PF's VFs, by name: a `--vf` lease's
/// carries the PF's address, a `--device` lease's the device's own, which may be one of the PF's
/// VFs. Removing the VFs would pull that one from under a running VM (and the write to
/// `sriov_numvfs` can block while vfio-pci holds it). Stale and damaged journals count too: a
/// stale one's device is put back first, then the VFs (see [`cleanup`]); a damaged one may be
/// live, so its VFs wait until the user has seen to it.
fn pf_in_use(host: &Host, pf: &Journal<PfRecord>) -> Result<bool, SriovError> {
    let names: Vec<String> = state::list(&host.runtime_dir)?
        .iter()
        .filter_map(|p| p.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .collect();
    let prefix = format!("vf-{}-", pf.record.pf_bdf);
    if names.iter().any(|n| n.starts_with(&prefix)) {
        return Ok(true);
    }
    let vfs = host.sysfs.virtfns(&pf.record.pf_bdf).map_err(|e| pf_failure(&pf.record, pf.path(), e))?;
    Ok(vfs.iter().any(|bdf| names.contains(&state::device_journal_name(bdf))))
}

fn restore_pf_if_unused(host: &Host, pf_bdf: &str) -> Result<(), SriovError> {
    let path = host.runtime_dir.join(state::pf_journal_name(pf_bdf));
    if !path.exists() {
        return Ok(());
    }
    match Journal::load(path)? {
        Some(journal) if !pf_in_use(host, &journal)? => restore_pf_journal(host, journal),
        // In use; or a claim cut short, now deleted, which had created nothing.
        _ => Ok(()),
    }
}

fn pf_failure(record: &PfRecord, journal: &Path, e: SysfsError) -> SriovError {
    SriovError::Restore {
        dev: format!("the VFs Tandem created on {} ({})", record.pf, record.pf_bdf),
        journal: journal.to_path_buf(),
        failures: vec![e.to_string()],
    }
}

/// Removes the VFs Tandem created on a PF and turns autoprobe back as it was; then deletes the record.
pub(crate) fn restore_pf_journal(host: &Host, journal: Journal<PfRecord>) -> Result<(), SriovError> {
    let (sysfs, record) = (&host.sysfs, &journal.record);
    let undo = || -> Result<(), SysfsError> {
        if record.phase >= PfPhase::NumVfs && sysfs.sriov_numvfs(&record.pf_bdf)? != 0 {
            sysfs.set_sriov_numvfs(&record.pf_bdf, 0)?;
        }
        if record.phase >= PfPhase::Autoprobe && sysfs.sriov_autoprobe(&record.pf_bdf)? != record.autoprobe {
            sysfs.set_sriov_autoprobe(&record.pf_bdf, record.autoprobe)?;
        }
        Ok(())
    };
    if let Err(e) = undo() {
        return Err(pf_failure(record, journal.path(), e));
    }
    Ok(journal.remove()?)
}

/// What `tandem cleanup` did.
#[derive(Debug, Default)]
pub struct CleanupReport {
    /// Devices (and PFs' VF counts) put back, one line each.
    pub restored: Vec<String>,
    /// Devices whose tandem is still running, left alone.
    pub in_use: Vec<String>,
    /// What could not be put back exactly but needs no retry (a PF driver refusing an old MAC),
    /// and journals deleted with nothing to put back (claims cut short by a kill).
    pub warnings: Vec<String>,
    /// What could not be put back; those journals stay for another run.
    pub failed: Vec<String>,
}

fn dead_claim(path: &Path) -> String {
    format!(
        "deleted {}: its tandem was killed while writing it, before it changed anything, so there was nothing \
         to put back",
        path.display()
    )
}

/// A journal for `cleanup` to work on; a dead claim (deleted) or an unreadable journal is
/// reported instead.
fn load_for_cleanup<R: state::Record>(path: PathBuf, report: &mut CleanupReport) -> Option<Journal<R>> {
    match Journal::<R>::load(path.clone()) {
        Ok(Some(j)) => Some(j),
        Ok(None) => {
            report.warnings.push(dead_claim(&path));
            None
        }
        Err(e) => {
            report.failed.push(e.to_string());
            None
        }
    }
}

/// Restores every device whose tandem is gone (killed, crashed) and removes the VFs it created.
pub fn cleanup(host: &Host) -> Result<CleanupReport, SriovError> {
    let _lock = RuntimeLock::take(&host.runtime_dir)?;
    let mut report = CleanupReport::default();
    let (pfs, devices): (Vec<_>, Vec<_>) =
        state::list(&host.runtime_dir)?.into_iter().partition(|p| state::is_pf_journal(p));
    for path in devices {
        let Some(journal) = load_for_cleanup::<DeviceRecord>(path, &mut report) else { continue };
        let dev = describe(&journal.record);
        if journal.record.owner.is_alive() {
            report.in_use.push(format!("{dev}: in use by tandem pid {}", journal.record.owner.pid));
            continue;
        }
        match restore_device(host, journal) {
            Ok(warnings) => {
                report.restored.push(dev);
                report.warnings.extend(warnings);
            }
            Err(e) => report.failed.push(e.to_string()),
        }
    }
    // Then the VFs created for devices that are now all back, or for none (the tandem died
    // between creating them and journaling the VF).
    for path in pfs {
        let Some(journal) = load_for_cleanup::<PfRecord>(path, &mut report) else { continue };
        let (pf, pf_bdf) = (journal.record.pf.clone(), journal.record.pf_bdf.clone());
        match pf_in_use(host, &journal) {
            Ok(false) => {}
            Ok(true) => continue,
            Err(e) => {
                report.failed.push(e.to_string());
                continue;
            }
        }
        match restore_pf_journal(host, journal) {
            Ok(()) => report.restored.push(format!("the VFs Tandem created on {pf} ({pf_bdf})")),
            Err(e) => report.failed.push(e.to_string()),
        }
    }
    Ok(report)
}
