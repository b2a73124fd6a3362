//! The host side of the serial console: stdin in raw mode while the guest owns it, and
//! a thread that feeds stdin to the guest UART at the pace its FIFO allows.

use crate::seccomp::{SeccompFilters, ThreadKind};
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use devices::legacy::SerialDevice;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Puts a terminal in raw mode (no echo, no line editing) and restores it on drop, so
/// every exit path that unwinds — errors, guest exit, panics — gives the shell back
/// its terminal. Signals stay enabled: Ctrl-C stops the VMM rather than the guest.
pub struct RawTerminal {
    fd: RawFd,
    saved: libc::termios,
}

impl RawTerminal {
    /// Returns `None` when `fd` is not a terminal (a pipe or file needs no mode change).
    pub fn enable(fd: RawFd) -> std::io::Result<Option<Self>> {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(fd) } != 1 {
            return Ok(None);
        }
        // SAFETY: termios is plain data; tcgetattr fills it and we check the result.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `saved` is a valid termios to write into.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut raw = saved;
        raw.c_lflag &= !(libc::ICANON | libc::ECHO | libc::ECHONL | libc::IEXTEN);
        raw.c_iflag &= !(libc::IXON | libc::ICRNL | libc::INLCR | libc::IGNCR);
        raw.c_oflag &= !libc::OPOST;
        raw.c_cc[libc::VMIN] = 1;
        raw.c_cc[libc::VTIME] = 0;
        // SAFETY: `raw` is a valid termios derived from the current one.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Some(Self { fd, saved }))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restores the attributes read from this same descriptor.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}

/// Copies stdin into the guest's UART until stopped or stdin ends.
pub struct StdinPump {
    stop: EventFd,
    thread: JoinHandle<()>,
    _raw: Option<RawTerminal>,
}

impl StdinPump {
    pub fn start(serial: Arc<Mutex<SerialDevice>>, seccomp: &SeccompFilters) -> std::io::Result<Self> {
        let raw = RawTerminal::enable(libc::STDIN_FILENO)?;
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let stop_rx = stop.try_clone()?;
        let thread = crate::seccomp::spawn("serial-input", seccomp, ThreadKind::Devices, move || {
            pump(libc::STDIN_FILENO, &serial, &stop_rx)
        })?;
        Ok(Self { stop, thread, _raw: raw })
    }

    pub fn stop(self) {
        let _ = self.stop.write(1);
        let _ = self.thread.join();
        // `_raw` drops here: the terminal is restored after the last read.
    }
}

fn poll_one(fd: RawFd, stop: &EventFd, timeout_ms: i32) -> (bool, bool) {
    let mut fds = [
        libc::pollfd { fd, events: libc::POLLIN, revents: 0 },
        libc::pollfd { fd: stop.as_raw_fd(), events: libc::POLLIN, revents: 0 },
    ];
    // While input waits for FIFO room we only watch `stop` (fd -1 is skipped by poll).
    if fd < 0 {
        fds[0].fd = -1;
    }
    // SAFETY: `fds` is a valid pollfd array for the call's duration.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout_ms) };
    if n < 0 {
        return (false, false);
    }
    (fds[0].revents != 0, fds[1].revents != 0)
}

fn pump(fd: RawFd, serial: &Mutex<SerialDevice>, stop: &EventFd) {
    let mut buf = [0u8; 64];
    // buf[start..end] is input read from the host and not yet taken by the UART.
    let (mut start, mut end) = (0usize, 0usize);
    let mut eof = false;
    loop {
        if start < end {
            start += serial.lock().unwrap_or_else(|e| e.into_inner()).enqueue_input(&buf[start..end]);
            if start < end {
                // The guest is not draining its FIFO: retry shortly, never spin.
                if poll_one(-1, stop, 10).1 {
                    return;
                }
                continue;
            }
        }
        let (readable, stopped) = poll_one(if eof { -1 } else { fd }, stop, -1);
        if stopped {
            return;
        }
        if !readable {
            continue;
        }
        // SAFETY: reads into a local buffer of the given length.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        match n {
            n if n > 0 => (start, end) = (0, n as usize),
            0 => eof = true,
            _ if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => {}
            _ => eof = true,
        }
    }
}
