//! The server and client together on a real socket, against a fake VM that records calls.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::http::{self, RESPONSE_LIMITS};
use super::*;

const TIMEOUT: Duration = Duration::from_millis(300);

#[derive(Default)]
struct FakeVm {
    calls: Mutex<Vec<String>>,
    paused: Mutex<bool>,
    devices: Mutex<BTreeSet<String>>,
}

impl FakeVm {
    fn new() -> Arc<Self> {
        let vm = FakeVm::default();
        vm.devices.lock().unwrap().extend(["vf0".to_string(), "nic1".to_string()]);
        Arc::new(vm)
    }

    fn log(&self, call: String) {
        self.calls.lock().unwrap().push(call);
    }

    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }

    fn set_paused(&self, want: bool, already: &str) -> Result<(), ApiError> {
        let mut paused = self.paused.lock().unwrap();
        if *paused == want {
            return Err(ApiError::Conflict(already.into()));
        }
        *paused = want;
        Ok(())
    }
}

impl VmControl for FakeVm {
    fn info(&self) -> Value {
        self.log("info".into());
        json!({"paused": *self.paused.lock().unwrap(), "devices": *self.devices.lock().unwrap()})
    }
    fn counters(&self) -> Value {
        self.log("counters".into());
        json!({"vm_exits": 42})
    }
    fn pause(&self) -> Result<(), ApiError> {
        self.log("pause".into());
        self.set_paused(true, "the VM is already paused")
    }
    fn nmi(&self) -> Result<(), ApiError> {
        self.log("nmi".into());
        Ok(())
    }
    fn resume(&self) -> Result<(), ApiError> {
        self.log("resume".into());
        self.set_paused(false, "the VM is not paused")
    }
    fn shutdown(&self) -> Result<(), ApiError> {
        self.log("shutdown".into());
        Ok(())
    }
    fn device_remove(&self, id: &str) -> Result<(), ApiError> {
        self.log(format!("device_remove {id}"));
        if self.devices.lock().unwrap().remove(id) {
            Ok(())
        } else if id == "vf0" {
            Err(ApiError::Conflict("vf0 is already removed".into()))
        } else {
            Err(ApiError::NotFound(format!("no device with id {id:?}")))
        }
    }
    fn device_add(&self, request: &Value) -> Result<Value, ApiError> {
        self.log(format!("device_add {request}"));
        if request["vf"] == "panic" {
            panic!("fake VMM bug (expected by the test)");
        }
        self.devices.lock().unwrap().insert("vf0".into());
        Ok(json!({"id": "vf0"}))
    }
}

/// A fresh directory for one test's socket, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("tandem-api-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn sock(&self) -> PathBuf {
        self.0.join("api.sock")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn start(dir: &TempDir) -> (Arc<FakeVm>, ApiServer) {
    let vm = FakeVm::new();
    let server = ApiServer::start_with_timeout(&dir.sock(), vm.clone(), TIMEOUT, &Default::default()).unwrap();
    (vm, server)
}

fn ctl(path: &Path, words: &[&str]) -> Result<String, ClientError> {
    run_ctl(path, &words.iter().map(|w| w.to_string()).collect::<Vec<_>>())
}

/// Sends raw bytes and returns the status and JSON body of the answer.
fn raw(path: &Path, bytes: &[u8]) -> (u16, Value) {
    let mut stream = UnixStream::connect(path).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = stream.write_all(bytes);
    let response = http::read_response(&mut stream, &RESPONSE_LIMITS).unwrap();
    let body = if response.body.is_empty() { Value::Null } else { serde_json::from_slice(&response.body).unwrap() };
    (response.status, body)
}

fn error_text(body: &Value) -> &str {
    body["error"].as_str().unwrap_or_else(|| panic!("no error message in {body}"))
}

#[test]
fn every_route_through_the_client() {
    let dir = TempDir::new();
    let (vm, server) = start(&dir);
    let sock = dir.sock();
    let info: Value = serde_json::from_str(&ctl(&sock, &["info"]).unwrap()).unwrap();
    assert_eq!(info, json!({"paused": false, "devices": ["nic1", "vf0"]}));
    assert!(ctl(&sock, &["counters"]).unwrap().contains("\"vm_exits\": 42"));
    assert_eq!(ctl(&sock, &["pause"]).unwrap(), "paused");
    assert_eq!(ctl(&sock, &["resume"]).unwrap(), "resumed");
    assert_eq!(ctl(&sock, &["nmi"]).unwrap(), "NMI sent");
    assert_eq!(ctl(&sock, &["device-remove", "vf0"]).unwrap(), "removed vf0");
    let added = ctl(&sock, &["device-add", "vf=pf=eth0,index=0,id=vf0"]).unwrap();
    assert_eq!(serde_json::from_str::<Value>(&added).unwrap(), json!({"id": "vf0"}));
    ctl(&sock, &["device-add", "device=path=/sys/bus/pci/devices/0000:01:00.0"]).unwrap();
    assert_eq!(ctl(&sock, &["shutdown"]).unwrap(), "shutting down");
    assert_eq!(
        vm.calls(),
        [
            "info",
            "counters",
            "pause",
            "resume",
            "nmi",
            "device_remove vf0",
            r#"device_add {"vf":"pf=eth0,index=0,id=vf0"}"#,
            r#"device_add {"device":"path=/sys/bus/pci/devices/0000:01:00.0"}"#,
            "shutdown",
        ]
    );
    server.stop();
}

#[test]
fn raw_requests_reach_the_server_unchecked() {
    let dir = TempDir::new();
    let (vm, _server) = start(&dir);
    let sock = dir.sock();
    let err = ctl(&sock, &["raw", "PUT", "device-remove", "{\"id\": "]).unwrap_err();
    assert!(matches!(err, ClientError::Failed { status: 400, .. }), "{err}");
    assert!(err.to_string().contains("JSON"), "{err}");
    assert_eq!(ctl(&sock, &["raw", "PUT", "device-remove", r#"{"id": "vf0"}"#]).unwrap(), "done");
    assert_eq!(ctl(&sock, &["raw", "GET", "info"]).unwrap(), ctl(&sock, &["info"]).unwrap());
    assert_eq!(vm.calls(), ["device_remove vf0", "info", "info"], "the malformed one never reached the VM");
}

#[test]
fn vm_errors_come_back_as_json_and_the_vm_keeps_running() {
    let dir = TempDir::new();
    let (vm, _server) = start(&dir);
    let sock = dir.sock();
    ctl(&sock, &["pause"]).unwrap();
    let err = ctl(&sock, &["pause"]).unwrap_err();
    assert!(matches!(err, ClientError::Failed { status: 409, .. }), "{err}");
    assert_eq!(err.to_string(), "pause: the VM is already paused (HTTP 409)");
    ctl(&sock, &["device-remove", "vf0"]).unwrap();
    let twice = ctl(&sock, &["device-remove", "vf0"]).unwrap_err();
    assert!(matches!(twice, ClientError::Failed { status: 409, .. }), "{twice}");
    let (status, body) = request(&sock, "PUT", "/api/v1/device-remove", Some(&json!({"id": "ghost"}))).unwrap();
    assert_eq!((status, error_text(&body)), (404, "no device with id \"ghost\""));
    assert!(ctl(&sock, &["info"]).unwrap().contains("\"paused\": true"));
    assert_eq!(vm.calls().len(), 6);
}

#[test]
fn bad_requests_get_json_errors_and_never_reach_the_vm() {
    let dir = TempDir::new();
    let (vm, _server) = start(&dir);
    let sock = dir.sock();

    let (status, body) = request(&sock, "GET", "/api/v1/nope", None).unwrap();
    assert_eq!(status, 404);
    assert!(error_text(&body).starts_with("unknown route \"/api/v1/nope\""));
    let (status, body) = request(&sock, "GET", "/api/v1/pause", None).unwrap();
    assert_eq!((status, error_text(&body)), (405, "/api/v1/pause takes PUT, not GET"));
    let (status, _) = request(&sock, "PUT", "/api/v1/device-remove", Some(&json!({"id": "vf0", "x": 1}))).unwrap();
    assert_eq!(status, 400);

    let malformed = b"PUT /api/v1/device-remove HTTP/1.1\r\nContent-Length: 7\r\n\r\n{\"id\": ";
    let (status, body) = raw(&sock, malformed);
    assert_eq!(status, 400);
    assert!(error_text(&body).starts_with("malformed JSON body"), "{body}");

    let (status, body) = raw(&sock, b"HELLO\r\n\r\n");
    assert_eq!(status, 400);
    assert!(error_text(&body).contains("malformed request line"), "{body}");

    // Announced too large: refused from the headers, the body never read.
    let head = format!("PUT /api/v1/device-add HTTP/1.1\r\nContent-Length: {}\r\n\r\n", 1 << 20);
    let (status, body) = raw(&sock, head.as_bytes());
    assert_eq!(status, 413);
    assert!(error_text(&body).contains("limit of 65536"), "{body}");
    // Sent too large through the client, which must still read the refusal.
    let big = json!({ "vf": "x".repeat(1 << 20) });
    let (status, _) = request(&sock, "PUT", "/api/v1/device-add", Some(&big)).unwrap();
    assert_eq!(status, 413);

    assert!(vm.calls().is_empty(), "{:?}", vm.calls());
    ctl(&sock, &["info"]).unwrap();
}

#[test]
fn a_panic_behind_the_socket_costs_one_request() {
    let dir = TempDir::new();
    let (_vm, _server) = start(&dir);
    let sock = dir.sock();
    let (status, body) = request(&sock, "PUT", "/api/v1/device-add", Some(&json!({"vf": "panic"}))).unwrap();
    assert_eq!(status, 500);
    assert!(error_text(&body).contains("VMM failed"), "{body}");
    ctl(&sock, &["info"]).unwrap();
}

#[test]
fn a_silent_client_is_dropped_and_the_next_one_served() {
    let dir = TempDir::new();
    let (_vm, _server) = start(&dir);
    let sock = dir.sock();
    let mut silent = UnixStream::connect(&sock).unwrap();
    let started = Instant::now();
    ctl(&sock, &["info"]).unwrap();
    let waited = started.elapsed();
    assert!(waited < TIMEOUT * 5, "served {waited:?} after a silent client");
    silent.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut answer = String::new();
    silent.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 408 Request Timeout\r\n"), "{answer}");
}

#[test]
fn a_trickling_client_cannot_outlast_the_deadline() {
    let dir = TempDir::new();
    let (_vm, _server) = start(&dir);
    let mut slow = UnixStream::connect(dir.sock()).unwrap();
    let started = Instant::now();
    for b in b"GET /api/v1/info HTTP/1.1\r\nX-Padding: ".iter().chain([b'a'; 100].iter()) {
        if slow.write_all(&[*b]).is_err() {
            break; // the server gave up on us, as it should
        }
        std::thread::sleep(Duration::from_millis(20));
        if started.elapsed() > TIMEOUT * 4 {
            break;
        }
    }
    slow.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let response = http::read_response(&mut slow, &RESPONSE_LIMITS).unwrap();
    assert_eq!(response.status, 408);
    ctl(&dir.sock(), &["info"]).unwrap();
}

#[test]
fn stop_and_drop_remove_the_socket_even_with_a_client_waiting() {
    let dir = TempDir::new();
    let (_vm, server) = start(&dir);
    assert!(dir.sock().exists());
    let _silent = UnixStream::connect(dir.sock()).unwrap();
    std::thread::sleep(Duration::from_millis(20)); // let the server start reading it
    let started = Instant::now();
    server.stop();
    assert!(started.elapsed() < TIMEOUT, "stop waited out the silent client");
    assert!(!dir.sock().exists());
    let err = ctl(&dir.sock(), &["info"]).unwrap_err();
    assert!(matches!(err, ClientError::NoSocket(_)), "{err}");

    let (_vm, server) = start(&dir);
    drop(server);
    assert!(!dir.sock().exists());
}

#[test]
fn start_refuses_a_live_socket_and_replaces_a_stale_one() {
    let dir = TempDir::new();
    let (_vm, server) = start(&dir);
    let err = ApiServer::start(&dir.sock(), FakeVm::new()).unwrap_err();
    assert!(matches!(err, ServerError::InUse(_)), "{err}");
    assert!(err.to_string().contains("choose another --api-socket"), "{err}");
    ctl(&dir.sock(), &["info"]).unwrap();
    server.stop();

    drop(UnixListener::bind(dir.sock()).unwrap()); // leaves a socket file nobody serves
    let err = ctl(&dir.sock(), &["info"]).unwrap_err();
    assert!(matches!(err, ClientError::NotListening(_)), "{err}");
    let (_vm, server) = start(&dir);
    ctl(&dir.sock(), &["info"]).unwrap();
    server.stop();

    std::fs::write(dir.sock(), b"not a socket").unwrap();
    let err = ApiServer::start(&dir.sock(), FakeVm::new()).unwrap_err();
    assert!(matches!(err, ServerError::NotASocket(_)), "{err}");
    assert!(dir.sock().exists(), "a regular file is never removed");

    let err = ApiServer::start(&dir.0.join("missing/api.sock"), FakeVm::new()).unwrap_err();
    assert!(matches!(err, ServerError::Bind { .. }), "{err}");
}

#[test]
fn stop_leaves_a_socket_that_replaced_ours() {
    let dir = TempDir::new();
    let (_vm, server) = start(&dir);
    std::fs::remove_file(dir.sock()).unwrap();
    let _other = UnixListener::bind(dir.sock()).unwrap();
    server.stop();
    assert!(dir.sock().exists());
}
