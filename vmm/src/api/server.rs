//! The control-socket server: a Unix listener served by one thread, one connection at a
//! time, each with a deadline so a silent or slow client cannot hold the socket.

use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::http::{self, REQUEST_LIMITS};
use super::protocol::{self, Response};
use super::VmControl;
use crate::seccomp::{SeccompFilters, ThreadKind};

/// How long a client has to send its whole request, and the server to write the answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(
        "{} is in use: a running tandem answers there; stop that VM or choose another --api-socket path",
        .0.display()
    )]
    InUse(PathBuf),
    #[error("{} exists and is not a socket; choose another --api-socket path or remove the file", .0.display())]
    NotASocket(PathBuf),
    #[error("cannot tell whether {} is in use: {source}; choose another --api-socket path", path.display())]
    Probe {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot remove the stale socket {} left by an earlier tandem: {source}; remove it by hand", path.display())]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "cannot listen on {}: {source}; check that its directory exists and is writable \
         (and that the path is under 108 bytes)",
        path.display()
    )]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot start the control socket server on {}: {source}", path.display())]
    Setup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A running control socket. Stopping it (or dropping it) joins its thread and removes the
/// socket file.
#[derive(Debug)]
pub struct ApiServer {
    path: PathBuf,
    /// (st_dev, st_ino) of the socket we bound, so we never remove another server's socket
    /// that replaced ours at the same path.
    identity: (u64, u64),
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl ApiServer {
    /// Listens on `path` (mode 0600: the socket controls the VM) and serves `control` from a
    /// new thread. Refuses a path where a live server answers or that is not a socket;
    /// replaces a stale socket.
    pub fn start(path: &Path, control: Arc<dyn VmControl>) -> Result<ApiServer, ServerError> {
        Self::start_with_timeout(path, control, REQUEST_TIMEOUT, &SeccompFilters::default())
    }

    /// [`start`](Self::start), the server's thread filtered with `seccomp`: it installs
    /// the API filter before it serves anything; [`SeccompFilters::settle`] (which
    /// [`Vm::start`](crate::Vm::start) calls) says whether it could.
    pub fn start_filtered(
        path: &Path,
        control: Arc<dyn VmControl>,
        seccomp: &SeccompFilters,
    ) -> Result<ApiServer, ServerError> {
        Self::start_with_timeout(path, control, REQUEST_TIMEOUT, seccomp)
    }

    pub(crate) fn start_with_timeout(
        path: &Path,
        control: Arc<dyn VmControl>,
        timeout: Duration,
        seccomp: &SeccompFilters,
    ) -> Result<ApiServer, ServerError> {
        remove_stale(path)?;
        let listener = UnixListener::bind(path).map_err(|source| ServerError::Bind { path: path.into(), source })?;
        // From here on a failure must not leave our socket file behind.
        let cleanup = |source: io::Error| {
            let _ = std::fs::remove_file(path);
            ServerError::Setup { path: path.into(), source }
        };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(cleanup)?;
        let meta = std::fs::symlink_metadata(path).map_err(cleanup)?;
        listener.set_nonblocking(true).map_err(cleanup)?;
        let stop = EventFd::new(EFD_NONBLOCK).map_err(cleanup)?;
        let stop_rx = stop.try_clone().map_err(cleanup)?;
        let thread = crate::seccomp::spawn("api-server", seccomp, ThreadKind::Api, move || {
            serve(&listener, &*control, &stop_rx, timeout)
        })
        .map_err(cleanup)?;
        Ok(ApiServer { path: path.into(), identity: (meta.dev(), meta.ino()), stop, thread: Some(thread) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops serving (a request in progress is cut short unless the VM is already acting on
    /// it), joins the thread and removes the socket file.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let Some(thread) = self.thread.take() else { return };
        let _ = self.stop.write(1);
        // A VmControl that drops the server from inside a request would join itself.
        if thread.thread().id() != std::thread::current().id() {
            let _ = thread.join();
        }
        let ours = std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.identity);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Clears the way for bind: nothing there, or a socket nobody answers on (removed).
fn remove_stale(path: &Path) -> Result<(), ServerError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => return Err(ServerError::Probe { path: path.into(), source }),
    };
    if !meta.file_type().is_socket() {
        return Err(ServerError::NotASocket(path.into()));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(ServerError::InUse(path.into())),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            std::fs::remove_file(path).map_err(|source| ServerError::RemoveStale { path: path.into(), source })
        }
        Err(source) => Err(ServerError::Probe { path: path.into(), source }),
    }
}

fn serve(listener: &UnixListener, control: &dyn VmControl, stop: &EventFd, timeout: Duration) {
    loop {
        match wait_readable(listener.as_raw_fd(), stop, None) {
            Ok(Ready::Stop) => return,
            Ok(Ready::Fd | Ready::Timeout) => {}
            Err(e) => {
                control.notices().warn(format_args!("control socket: poll failed: {e}; the socket stops answering"));
                return;
            }
        }
        match listener.accept() {
            Ok((stream, _)) => serve_one(stream, control, stop, timeout),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => {}
            Err(e) => {
                // Out of fds or memory: say so, and do not spin while it lasts.
                control.notices().warn(format_args!("control socket: accept failed: {e}"));
                if let Ok(Ready::Stop) = wait_readable(-1, stop, Some(Duration::from_millis(100))) {
                    return;
                }
            }
        }
    }
}

fn serve_one(stream: UnixStream, control: &dyn VmControl, stop: &EventFd, timeout: Duration) {
    // Accepted sockets do not inherit the listener's O_NONBLOCK on Linux; make sure.
    if stream.set_nonblocking(false).is_err() || stream.set_write_timeout(Some(timeout)).is_err() {
        return;
    }
    let mut conn = Deadline { stream: &stream, stop, deadline: Instant::now() + timeout };
    let response = match http::read_request(&mut conn, &REQUEST_LIMITS) {
        Ok(req) => {
            // A bug behind VmControl must cost one request, not the socket.
            catch_unwind(AssertUnwindSafe(|| protocol::handle(control, &req.method, &req.target, &req.body)))
                .unwrap_or_else(|_| Response::error(500, "the VMM failed handling this request (see its log)"))
        }
        Err(e) => match e.status() {
            Some(status) => Response::error(status, format!("bad request: {e}")),
            None => return,
        },
    };
    let body = response.body.as_ref().map(|b| b.to_string().into_bytes());
    let allow: Vec<(&str, &str)> = response.allow.iter().map(|a| ("Allow", *a)).collect();
    // The client may have gone; there is nobody to tell.
    let _ = http::write_response(&mut &stream, response.status, body.as_deref(), &allow);
}

/// A connection read under one overall deadline that also ends when the server stops:
/// a per-read timeout alone would let a client trickle a byte at a time forever.
struct Deadline<'a> {
    stream: &'a UnixStream,
    stop: &'a EventFd,
    deadline: Instant,
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::ErrorKind::TimedOut.into());
            }
            match wait_readable(self.stream.as_raw_fd(), self.stop, Some(left))? {
                Ready::Stop => return Err(io::Error::new(io::ErrorKind::ConnectionAborted, "the server is stopping")),
                Ready::Timeout => continue,
                Ready::Fd => return (&mut &*self.stream).read(buf),
            }
        }
    }
}

enum Ready {
    Fd,
    Stop,
    Timeout,
}

/// Waits until `fd` is readable (or hung up), `stop` is signalled (it wins ties), or
/// `timeout` passes. `fd` -1 waits on `stop` alone.
fn wait_readable(fd: RawFd, stop: &EventFd, timeout: Option<Duration>) -> io::Result<Ready> {
    let mut fds = [
        libc::pollfd { fd: stop.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        libc::pollfd { fd, events: libc::POLLIN, revents: 0 },
    ];
    // Round up so a sub-millisecond remainder does not become a busy loop of 0 ms polls.
    let ms = timeout.map_or(-1, |t| i32::try_from(t.as_micros().div_ceil(1000)).unwrap_or(i32::MAX));
    // SAFETY: `fds` is a valid array of two pollfds for the duration of the call.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted { Ok(Ready::Timeout) } else { Err(e) };
    }
    Ok(if fds[0].revents != 0 {
        Ready::Stop
    } else if fds[1].revents != 0 {
        Ready::Fd
    } else {
        Ready::Timeout
    })
}
