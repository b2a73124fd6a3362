//! The host side of the NIC: a tap interface opened through `/dev/net/tun`.
//!
//! Every queue is opened with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR (and IFF_MULTI_QUEUE
//! for more than one queue), non-blocking, with a 12-byte vnet header so that frames
//! carry exactly the guest's `virtio_net_hdr_v1`.
//!
//! Lifetime: a tap that did not exist is created by the first TUNSETIFF and is *not*
//! made persistent (no TUNSETPERSIST), so the kernel deletes it when its last fd closes
//! — when the device and every worker are gone, or when the VMM exits or dies. A tap
//! that existed (typically made persistent by the admin, with its bridge or addresses
//! set up) is attached to and left in place. Which case applied is in [`TapInfo`].

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::Path;

use super::backend::NetBackend;
use super::VNET_HDR_LEN;

const TUN_PATH: &str = "/dev/net/tun";

/// `struct ifreq` as the tun ioctls and SIOCGIFFLAGS/SIOCSIFFLAGS use it: a name and the flags
/// member of the union (the rest is padding up to the kernel's 40 bytes).
#[repr(C, align(8))]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

const _: () = assert!(std::mem::size_of::<IfReq>() == std::mem::size_of::<libc::ifreq>());

impl IfReq {
    fn new(name: &str, flags: libc::c_int) -> Self {
        let mut req = IfReq { name: [0; libc::IFNAMSIZ], flags: flags as libc::c_short, _pad: [0; 22] };
        // validate_name() keeps names below IFNAMSIZ, leaving the terminating NUL.
        let len = name.len().min(libc::IFNAMSIZ - 1);
        req.name[..len].copy_from_slice(&name.as_bytes()[..len]);
        req
    }

    fn name(&self) -> String {
        let end = self.name.iter().position(|&b| b == 0).unwrap_or(self.name.len());
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("invalid tap name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("cannot open {TUN_PATH}: {0} (is the tun module loaded?)")]
    NoTunDevice(#[source] io::Error),
    #[error("{what} needs root or CAP_NET_ADMIN{hint}: {source}")]
    PermissionDenied { what: String, hint: &'static str, source: io::Error },
    #[error("tap {0} is busy: a single-queue tap can be attached by only one process")]
    Busy(String),
    #[error(
        "interface {name} exists but is not a tap, or its multi-queue setting does not match {queues} queue pair(s) \
         (a multi-queue tap needs queue_pairs > 1 and the reverse): {source}"
    )]
    Mismatch { name: String, queues: u16, source: io::Error },
    #[error("tap {name}: {op} failed: {source}")]
    Io { name: String, op: &'static str, source: io::Error },
}

/// How the tap was found and set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TapInfo {
    pub name: String,
    /// The interface existed before Tandem opened it (it is then left in place);
    /// otherwise Tandem created it and the kernel deletes it with the last fd.
    pub existed: bool,
    /// The tap is persistent (IFF_PERSIST, set by whoever created it): it outlives
    /// Tandem. Never true for a tap Tandem created.
    pub persistent: bool,
    /// Queues opened: one per queue pair.
    pub queues: usize,
}

/// An open tap: one non-blocking fd per queue.
#[derive(Debug)]
pub struct Tap {
    info: TapInfo,
    queues: Vec<TapQueue>,
}

/// One queue of a tap, usable as a queue pair's [`NetBackend`].
#[derive(Debug)]
pub struct TapQueue {
    fd: OwnedFd,
    multi_queue: bool,
}

/// Checks `name` the way the kernel will (dev_valid_name), so that the user hears why
/// instead of a bare EINVAL. '%' is refused too: the kernel would treat it as a
/// template and pick a name of its own.
pub(super) fn validate_name(name: &str) -> Result<(), TapError> {
    let bad = |reason| Err(TapError::InvalidName { name: name.to_string(), reason });
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.len() >= libc::IFNAMSIZ {
        return bad("interface names are at most 15 bytes");
    }
    if name == "." || name == ".." {
        return bad("'.' and '..' are not interface names");
    }
    if name.chars().any(|c| c == '/' || c == ':' || c == '%' || c.is_whitespace() || c.is_control()) {
        return bad("it must not contain '/', ':', '%', whitespace or control characters");
    }
    Ok(())
}

fn tun_flags(multi_queue: bool) -> libc::c_int {
    let mut flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
    if multi_queue {
        flags |= libc::IFF_MULTI_QUEUE;
    }
    flags
}

fn is_permission(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EPERM) | Some(libc::EACCES))
}

impl Tap {
    /// Opens (creating it if needed) the tap `name` with `queues` queues, sets the
    /// vnet header size and brings the link up if it is down.
    pub fn open(name: &str, queues: u16) -> Result<Tap, TapError> {
        validate_name(name)?;
        let queues = queues.max(1);
        let multi_queue = queues > 1;
        // Checked before the first TUNSETIFF, which would create it. (Another process
        // creating the same name in between would make this answer wrong; harmless.)
        let existed = Path::new("/sys/class/net").join(name).exists();
        let no_perm_hint = if existed { ", or the tap to be owned by this user" } else { "" };

        let mut opened = Vec::with_capacity(usize::from(queues));
        for _ in 0..queues {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open(TUN_PATH)
                .map_err(|e| {
                    if is_permission(&e) {
                        TapError::PermissionDenied { what: format!("opening {TUN_PATH}"), hint: "", source: e }
                    } else {
                        TapError::NoTunDevice(e)
                    }
                })?;
            let fd = OwnedFd::from(file);
            let mut req = IfReq::new(name, tun_flags(multi_queue));
            ioctl_ptr(fd.as_fd(), libc::TUNSETIFF, &mut req).map_err(|e| {
                if is_permission(&e) {
                    let what =
                        if existed { format!("attaching to tap {name}") } else { format!("creating tap {name}") };
                    TapError::PermissionDenied { what, hint: no_perm_hint, source: e }
                } else if e.raw_os_error() == Some(libc::EBUSY) {
                    TapError::Busy(name.to_string())
                } else if e.raw_os_error() == Some(libc::EINVAL) && existed {
                    TapError::Mismatch { name: name.to_string(), queues, source: e }
                } else {
                    TapError::Io { name: name.to_string(), op: "TUNSETIFF", source: e }
                }
            })?;
            if req.name() != name {
                // Cannot happen with a validated name; refuse rather than drive another interface.
                return Err(TapError::Io {
                    name: name.to_string(),
                    op: "TUNSETIFF",
                    source: io::Error::other(format!("the kernel attached interface {:?} instead", req.name())),
                });
            }
            opened.push(TapQueue { fd, multi_queue });
        }
        let io_err = |op| move |source| TapError::Io { name: name.to_string(), op, source };

        let first = opened[0].fd.as_fd();
        let mut req = IfReq::new(name, 0);
        ioctl_ptr(first, libc::TUNGETIFF, &mut req).map_err(io_err("TUNGETIFF"))?;
        let persistent = libc::c_int::from(req.flags) & libc::IFF_PERSIST != 0;

        let mut hdr_len = VNET_HDR_LEN as libc::c_int;
        ioctl_ptr(first, libc::TUNSETVNETHDRSZ, &mut hdr_len).map_err(io_err("TUNSETVNETHDRSZ"))?;
        // Nothing offloaded until the driver says what it accepts (activate()).
        ioctl_val(first, libc::TUNSETOFFLOAD, 0).map_err(io_err("TUNSETOFFLOAD"))?;

        bring_up(name).map_err(|e| {
            if is_permission(&e) {
                TapError::PermissionDenied { what: format!("bringing tap {name} up"), hint: no_perm_hint, source: e }
            } else {
                TapError::Io { name: name.to_string(), op: "bringing the link up", source: e }
            }
        })?;

        let info = TapInfo { name: name.to_string(), existed, persistent, queues: opened.len() };
        Ok(Tap { info, queues: opened })
    }

    pub fn info(&self) -> &TapInfo {
        &self.info
    }

    pub fn into_queues(self) -> (TapInfo, Vec<TapQueue>) {
        (self.info, self.queues)
    }
}

/// Sets IFF_UP unless it is already set (which needs no privilege).
fn bring_up(name: &str) -> io::Result<()> {
    // Any socket reaches the SIOC*IFFLAGS ioctls; a Unix one exists in every netns.
    let sock = UnixDatagram::unbound()?;
    let mut req = IfReq::new(name, 0);
    ioctl_ptr(sock.as_fd(), libc::SIOCGIFFLAGS as _, &mut req)?;
    if libc::c_int::from(req.flags) & libc::IFF_UP == 0 {
        req.flags |= libc::IFF_UP as libc::c_short;
        ioctl_ptr(sock.as_fd(), libc::SIOCSIFFLAGS as _, &mut req)?;
    }
    Ok(())
}

impl AsFd for TapQueue {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl NetBackend for TapQueue {
    fn duplicate(&self) -> io::Result<Box<dyn NetBackend>> {
        Ok(Box::new(TapQueue { fd: self.fd.try_clone()?, multi_queue: self.multi_queue }))
    }

    fn set_offload(&self, tun_flags: u32) -> io::Result<()> {
        ioctl_val(self.fd.as_fd(), libc::TUNSETOFFLOAD, libc::c_ulong::from(tun_flags))
    }

    fn set_queue_enabled(&self, enabled: bool) -> io::Result<()> {
        if !self.multi_queue {
            return Ok(());
        }
        let flags = if enabled { libc::IFF_ATTACH_QUEUE } else { libc::IFF_DETACH_QUEUE };
        let mut req = IfReq::new("", flags);
        match ioctl_ptr(self.fd.as_fd(), libc::TUNSETQUEUE, &mut req) {
            // The kernel answers EINVAL to attaching an attached queue or detaching a
            // detached one; the queue is then already as asked.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
            other => other,
        }
    }
}

/// An ioctl whose argument points at `arg`.
fn ioctl_ptr<T>(fd: BorrowedFd<'_>, request: libc::c_ulong, arg: &mut T) -> io::Result<()> {
    // SAFETY: `fd` is open for the call; each request used with this helper reads or
    // writes at most one `T` at `arg` (an `IfReq` laid out as `struct ifreq`, or a
    // c_int), which is valid, exclusively borrowed memory.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, arg as *mut T) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// An ioctl whose argument is a plain value.
fn ioctl_val(fd: BorrowedFd<'_>, request: libc::c_ulong, arg: libc::c_ulong) -> io::Result<()> {
    // SAFETY: `fd` is open for the call; the request takes its argument by value and
    // touches no memory of ours.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, arg) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
pub(super) mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[test]
    fn names_are_checked_before_the_kernel_sees_them() {
        for good in ["tap0", "a", "tandem-net.1_x", "123456789012345"] {
            validate_name(good).unwrap();
        }
        for bad in ["", "1234567890123456", ".", "..", "a/b", "a b", "a\tb", "tap%d", "a:1", "a\u{7}"] {
            let e = validate_name(bad).unwrap_err();
            assert!(e.to_string().contains("invalid tap name"), "{bad:?}: {e}");
        }
    }

    /// A tap name unique to this test run, short enough for IFNAMSIZ.
    pub(in crate::virtio::net) fn unique_name() -> String {
        static N: AtomicU32 = AtomicU32::new(0);
        format!("tdt{}x{}", std::process::id() % 100_000, N.fetch_add(1, Ordering::Relaxed))
    }

    /// Opens a tap for a test, failing loudly (never skipping) without the privilege.
    pub(in crate::virtio::net) fn open_test_tap(name: &str, queues: u16) -> Tap {
        Tap::open(name, queues).unwrap_or_else(|e| {
            panic!("this test creates tap interfaces and needs {TUN_PATH} and root or CAP_NET_ADMIN: {e}")
        })
    }

    pub(in crate::virtio::net) fn exists(name: &str) -> bool {
        Path::new("/sys/class/net").join(name).exists()
    }

    fn is_up(name: &str) -> bool {
        let flags = std::fs::read_to_string(Path::new("/sys/class/net").join(name).join("flags")).unwrap();
        let flags = u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).unwrap();
        flags & libc::IFF_UP as u32 != 0
    }

    fn set_persist(fd: BorrowedFd<'_>, on: bool) {
        ioctl_val(fd, libc::TUNSETPERSIST, libc::c_ulong::from(on)).unwrap();
    }

    #[test]
    fn a_created_tap_is_up_and_vanishes_with_its_last_fd() {
        let name = unique_name();
        assert!(!exists(&name));
        let tap = open_test_tap(&name, 1);
        assert_eq!(tap.info(), &TapInfo { name: name.clone(), existed: false, persistent: false, queues: 1 });
        assert!(exists(&name) && is_up(&name));

        let (_, queues) = tap.into_queues();
        let mut hdr: libc::c_int = 0;
        ioctl_ptr(queues[0].as_fd(), libc::TUNGETVNETHDRSZ, &mut hdr).unwrap();
        assert_eq!(hdr as usize, VNET_HDR_LEN);

        // A worker's duplicate keeps it alive; the last close deletes it.
        let dup = queues[0].duplicate().unwrap();
        drop(queues);
        assert!(exists(&name));
        drop(dup);
        assert!(!exists(&name), "tap {name} outlived its fds");
    }

    #[test]
    fn an_existing_persistent_tap_is_left_in_place() {
        let name = unique_name();
        // Make a persistent tap the way an admin's `ip tuntap add` would.
        {
            let tap = open_test_tap(&name, 1);
            set_persist(tap.queues[0].as_fd(), true);
        }
        assert!(exists(&name));

        let tap = open_test_tap(&name, 1);
        assert!(tap.info().existed && tap.info().persistent);
        drop(tap);
        assert!(exists(&name), "Tandem removed a persistent tap it did not create");

        // Clean up.
        let tap = open_test_tap(&name, 1);
        set_persist(tap.queues[0].as_fd(), false);
        drop(tap);
        assert!(!exists(&name));
    }

    #[test]
    fn multi_queue_taps_attach_and_detach_queues() {
        let name = unique_name();
        let tap = open_test_tap(&name, 3);
        assert_eq!(tap.info().queues, 3);
        let q = &tap.queues[2];
        q.set_queue_enabled(false).unwrap();
        q.set_queue_enabled(false).unwrap();
        q.set_queue_enabled(true).unwrap();
        q.set_queue_enabled(true).unwrap();
        tap.queues[0].set_offload(libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6).unwrap();

        // A single-queue open of a multi-queue tap is refused with an explanation.
        let e = Tap::open(&name, 1).unwrap_err();
        assert!(matches!(e, TapError::Mismatch { .. }), "{e}");
        drop(tap);
        assert!(!exists(&name));
    }

    #[test]
    fn a_busy_single_queue_tap_is_reported() {
        let name = unique_name();
        let _tap = open_test_tap(&name, 1);
        let e = Tap::open(&name, 1).unwrap_err();
        assert!(matches!(e, TapError::Busy(_)), "{e}");
    }
}
