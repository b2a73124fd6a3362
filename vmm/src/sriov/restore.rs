//! Putting devices back from their journals: on release, on drop, for a stale journal met at
//! start, and for every stale journal in `tandem cleanup`.
//!
//! Every step looks at the device as it is now before acting, so a restore can start from any
//! phase — including one whose last step may or may not have happened — and can be run again
//! after a partial failure.

use super::netlink::NetlinkError;
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
        for attr in record.changed.iter().rev() {
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
    let pf_bdf = journal.record.vf.as_ref().map(|vf| vf.pf_bdf.clone());
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

/// Whether a device journal still refers to the PF (by name: VF journals carry the PF's address).
fn pf_in_use(host: &Host, pf_bdf: &str) -> Result<bool, SriovError> {
    let prefix = format!("vf-{pf_bdf}-");
    let journals = state::list(&host.runtime_dir)?;
    Ok(journals.iter().any(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&prefix))))
}

fn restore_pf_if_unused(host: &Host, pf_bdf: &str) -> Result<(), SriovError> {
    let path = host.runtime_dir.join(state::pf_journal_name(pf_bdf));
    if !path.exists() || pf_in_use(host, pf_bdf)? {
        return Ok(());
    }
    restore_pf_journal(host, Journal::load(path)?)
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
        return Err(SriovError::Restore {
            dev: format!("the VFs Tandem created on {} ({})", record.pf, record.pf_bdf),
            journal: journal.path().to_path_buf(),
            failures: vec![e.to_string()],
        });
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
    /// What could not be put back exactly but needs no retry (a PF driver refusing an old MAC).
    pub warnings: Vec<String>,
    /// What could not be put back; those journals stay for another run.
    pub failed: Vec<String>,
}

/// Restores every device whose tandem is gone (killed, crashed) and removes the VFs it created.
pub fn cleanup(host: &Host) -> Result<CleanupReport, SriovError> {
    let _lock = RuntimeLock::take(&host.runtime_dir)?;
    let mut report = CleanupReport::default();
    let (pfs, devices): (Vec<_>, Vec<_>) =
        state::list(&host.runtime_dir)?.into_iter().partition(|p| state::is_pf_journal(p));
    for path in devices {
        let journal = match Journal::<DeviceRecord>::load(path) {
            Ok(j) => j,
            Err(e) => {
                report.failed.push(e.to_string());
                continue;
            }
        };
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
        let journal = match Journal::<PfRecord>::load(path) {
            Ok(j) => j,
            Err(e) => {
                report.failed.push(e.to_string());
                continue;
            }
        };
        let (pf, pf_bdf) = (journal.record.pf.clone(), journal.record.pf_bdf.clone());
        if pf_in_use(host, &pf_bdf)? {
            continue;
        }
        match restore_pf_journal(host, journal) {
            Ok(()) => report.restored.push(format!("the VFs Tandem created on {pf} ({pf_bdf})")),
            Err(e) => report.failed.push(e.to_string()),
        }
    }
    Ok(report)
}
