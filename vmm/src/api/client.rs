//! The `tandem ctl` side: one request per connection to a running tandem's control socket.

use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use super::http::{self, HttpError, RESPONSE_LIMITS};

/// How long to wait for an answer. Generous: removing a device waits for the guest to
/// release it before tandem forces the removal.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

/// The commands `run_ctl` understands, for `--help` texts and usage errors.
pub const CTL_USAGE: &str = "\
commands:
  info                      describe the VM (JSON)
  counters                  device and VM-exit counters (JSON)
  pause | resume            stop or restart the vCPUs
  nmi                       inject an NMI into every vCPU (a guest booted with
                            unknown_nmi_panic prints a backtrace of where it was)
  shutdown                  stop the VM
  device-remove ID          unplug the device with that id
  device-add vf=SPEC        plug an SR-IOV VF; SPEC as for --vf, e.g. vf=pf=eth0,index=0,id=vf0
  device-add device=SPEC    plug a whole PCI device; SPEC as for --device
  device-add ID             plug back a failover VF that device-remove (or its PF's link) took out
  raw METHOD ROUTE [BODY]   send BODY as it is (no JSON check) to /api/v1/ROUTE, e.g. for scripts
                            or to see how tandem answers a malformed request";

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}\n{CTL_USAGE}")]
    Usage(String),
    #[error("no control socket at {}: is tandem running with --api-socket {}?", .0.display(), .0.display())]
    NoSocket(PathBuf),
    #[error(
        "nothing answers on {}: the tandem that made it has exited (remove the file) or was \
         started with another --api-socket",
        .0.display()
    )]
    NotListening(PathBuf),
    #[error("permission denied on {}: run tandem ctl as the user that started tandem (or as root)", .0.display())]
    PermissionDenied(PathBuf),
    #[error("cannot connect to {}: {source}; is tandem running with --api-socket {}?", path.display(), path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("talking to tandem on {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "tandem on {} did not answer within {} s; it may be busy (a removal waits for the guest); try again",
        path.display(),
        CLIENT_TIMEOUT.as_secs()
    )]
    TimedOut { path: PathBuf },
    #[error("{} did not answer like a tandem control socket: {reason}", path.display())]
    BadResponse { path: PathBuf, reason: String },
    /// The server refused or failed the request; `message` is its `"error"`.
    #[error("{command}: {message} (HTTP {status})")]
    Failed { command: String, status: u16, message: String },
}

/// Sends one request and returns the status with the JSON body (`Value::Null` when empty),
/// whatever the status; only failing to get an answer is an error.
pub fn request(path: &Path, method: &str, route: &str, body: Option<&Value>) -> Result<(u16, Value), ClientError> {
    let body = body.map(|b| b.to_string().into_bytes());
    request_bytes(path, method, route, body.as_deref())
}

/// As [`request`], with a body sent exactly as given.
pub fn request_bytes(path: &Path, method: &str, route: &str, body: Option<&[u8]>) -> Result<(u16, Value), ClientError> {
    let stream = UnixStream::connect(path).map_err(|e| connect_error(path, e))?;
    let io_err = |source| ClientError::Io { path: path.into(), source };
    stream.set_read_timeout(Some(CLIENT_TIMEOUT)).map_err(io_err)?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT)).map_err(io_err)?;
    if let Err(e) = http::write_request(&mut &stream, method, route, body) {
        // A server refusing the request (too large, bad route) may close before taking the
        // whole body; its answer is still there to read.
        if !matches!(e.kind(), io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset) {
            return Err(io_err(e));
        }
    }
    let response = http::read_response(&mut &stream, &RESPONSE_LIMITS).map_err(|e| match e {
        HttpError::TimedOut => ClientError::TimedOut { path: path.into() },
        HttpError::Io(source) => io_err(source),
        other => ClientError::BadResponse { path: path.into(), reason: other.to_string() },
    })?;
    if response.body.iter().all(u8::is_ascii_whitespace) {
        return Ok((response.status, Value::Null));
    }
    let value = serde_json::from_slice(&response.body)
        .map_err(|e| ClientError::BadResponse { path: path.into(), reason: format!("body is not JSON: {e}") })?;
    Ok((response.status, value))
}

fn connect_error(path: &Path, e: io::Error) -> ClientError {
    match e.kind() {
        io::ErrorKind::NotFound => ClientError::NoSocket(path.into()),
        io::ErrorKind::ConnectionRefused => ClientError::NotListening(path.into()),
        io::ErrorKind::PermissionDenied => ClientError::PermissionDenied(path.into()),
        _ => ClientError::Connect { path: path.into(), source: e },
    }
}

/// Runs one `tandem ctl` command (`args` after the socket option, e.g. `["device-remove",
/// "vf0"]`) and returns what to print: the JSON answer pretty-printed, or a short
/// confirmation for commands that have none.
pub fn run_ctl(path: &Path, args: &[String]) -> Result<String, ClientError> {
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    if let ["raw", method, route, ref rest @ ..] = words[..] {
        if rest.len() > 1 {
            return Err(ClientError::Usage("raw takes METHOD ROUTE and at most one BODY (quote it)".into()));
        }
        let body = rest.first().map(|b| b.as_bytes());
        let (status, answer) = request_bytes(path, method, &format!("/api/v1/{route}"), body)?;
        return finish(path, &words, status, answer, "done");
    }
    let (method, route, body, done) = match words[..] {
        ["info"] => ("GET", "info", None, ""),
        ["counters"] => ("GET", "counters", None, ""),
        ["pause"] => ("PUT", "pause", None, "paused"),
        ["resume"] => ("PUT", "resume", None, "resumed"),
        ["nmi"] => ("PUT", "nmi", None, "NMI sent"),
        ["shutdown"] => ("PUT", "shutdown", None, "shutting down"),
        ["device-remove", id] if !id.is_empty() => ("PUT", "device-remove", Some(json!({ "id": id })), "removed"),
        ["device-add", spec] => ("PUT", "device-add", Some(device_add_body(spec)?), ""),
        [] => return Err(ClientError::Usage("tandem ctl needs a command".into())),
        [command, ..] => return Err(ClientError::Usage(usage_error(command))),
    };
    let (status, answer) = request(path, method, &format!("/api/v1/{route}"), body.as_ref())?;
    let done = if route == "device-remove" { format!("{done} {}", words[1]) } else { done.to_string() };
    finish(path, &words, status, answer, &done)
}

/// What a command prints: its JSON answer, `done` when it has none, or the server's
/// error.
fn finish(path: &Path, words: &[&str], status: u16, answer: Value, done: &str) -> Result<String, ClientError> {
    if !(200..300).contains(&status) {
        let message = match answer.get("error").and_then(Value::as_str) {
            Some(m) => m.to_string(),
            None => format!("tandem answered {status} {}", http::reason(status)),
        };
        return Err(ClientError::Failed { command: words.join(" "), status, message });
    }
    if answer.is_null() {
        return Ok(done.to_string());
    }
    serde_json::to_string_pretty(&answer)
        .map_err(|e| ClientError::BadResponse { path: path.into(), reason: format!("cannot print the answer: {e}") })
}

/// `vf=SPEC` or `device=SPEC` → `{"vf": "SPEC"}`, a bare `ID` → `{"id": "ID"}`; the spec
/// itself is checked by tandem.
fn device_add_body(arg: &str) -> Result<Value, ClientError> {
    match arg.split_once('=') {
        Some((key @ ("vf" | "device"), spec)) if !spec.is_empty() => Ok(json!({ key: spec })),
        None if !arg.is_empty() && !arg.contains(',') => Ok(json!({ "id": arg })),
        _ => Err(ClientError::Usage(format!(
            "device-add takes vf=SPEC or device=SPEC, not {arg:?} (e.g. device-add vf=pf=eth0,index=0)"
        ))),
    }
}

fn usage_error(command: &str) -> String {
    match command {
        "info" | "counters" | "pause" | "resume" | "nmi" | "shutdown" => format!("{command} takes no arguments"),
        "device-remove" => "device-remove takes one device id".into(),
        "device-add" => "device-add takes one vf=SPEC, device=SPEC or ID".into(),
        "raw" => "raw takes METHOD ROUTE [BODY], e.g. raw PUT device-remove '{\"id\": \"vf0\"}'".into(),
        _ => format!("unknown command {command:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(words: &[&str]) -> Vec<String> {
        words.iter().map(|w| w.to_string()).collect()
    }

    #[test]
    fn refuses_bad_command_lines_before_connecting() {
        let nowhere = Path::new("/nonexistent/tandem.sock");
        for (words, message) in [
            (&[][..], "needs a command"),
            (&["reboot"], "unknown command \"reboot\""),
            (&["info", "x"], "info takes no arguments"),
            (&["device-remove"], "one device id"),
            (&["device-remove", "a", "b"], "one device id"),
            (&["device-remove", ""], "one device id"),
            (&["device-add", "pf=eth0,index=0"], "vf=SPEC or device=SPEC"),
            (&["device-add", "vf="], "vf=SPEC or device=SPEC"),
            (&["device-add"], "one vf=SPEC"),
            (&["raw", "PUT"], "METHOD ROUTE [BODY]"),
            (&["raw", "PUT", "pause", "{}", "x"], "at most one BODY"),
        ] {
            let err = run_ctl(nowhere, &args(words)).unwrap_err();
            assert!(matches!(err, ClientError::Usage(_)), "{words:?}: {err}");
            assert!(err.to_string().contains(message), "{words:?}: {err}");
            assert!(err.to_string().contains("device-add vf=SPEC"), "usage is listed");
        }
    }

    #[test]
    fn device_add_keeps_everything_after_the_first_equals() {
        let body = device_add_body("vf=pf=eth0,index=0,mac=02:00:00:00:00:01").unwrap();
        assert_eq!(body, json!({"vf": "pf=eth0,index=0,mac=02:00:00:00:00:01"}));
        assert_eq!(device_add_body("device=path=/sys/x").unwrap(), json!({"device": "path=/sys/x"}));
        assert_eq!(device_add_body("vf0").unwrap(), json!({"id": "vf0"}), "a parked VF by its id");
    }

    #[test]
    fn names_the_socket_and_the_fix_when_nobody_is_there() {
        let err = run_ctl(Path::new("/nonexistent/tandem.sock"), &args(&["info"])).unwrap_err();
        assert!(matches!(err, ClientError::NoSocket(_)), "{err}");
        assert!(err.to_string().contains("--api-socket /nonexistent/tandem.sock"), "{err}");
    }
}
