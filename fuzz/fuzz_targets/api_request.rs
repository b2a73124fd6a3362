#![no_main]
//! The control socket's request path without the socket: the raw bytes a client sends,
//! delivered in reads of an input-chosen size, through the bounded HTTP reader and the
//! router to a fake VM, and the response written as the server writes it.
//!
//! Checked: no panic; a request is either answered or, when the client sent nothing
//! usable (empty, cut short), dropped; every answer has a documented status, an error
//! body naming the error, a body only where the status allows one, and reads back
//! (through the client's reader) as the same status and JSON; the VM is only asked for
//! what a known route with its method names; bodies never exceed the limit.

use std::io::{self, Read};
use std::sync::Mutex;

use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};
use vmm::api::fuzzing::{
    handle, read_request, read_response, write_response, Response, REQUEST_LIMITS, RESPONSE_LIMITS,
};
use vmm::api::{ApiError, VmControl};

const STATUSES: [u16; 13] = [200, 204, 400, 404, 405, 408, 409, 413, 414, 431, 500, 501, 505];

/// A VM that answers every call and counts them.
#[derive(Default)]
struct FakeVm {
    calls: Mutex<usize>,
}

impl FakeVm {
    fn call(&self) {
        *self.calls.lock().unwrap() += 1;
    }
}

impl VmControl for FakeVm {
    fn info(&self) -> Value {
        self.call();
        json!({"state": "running", "devices": ["vf0", "net0"]})
    }
    fn counters(&self) -> Value {
        self.call();
        json!({"vm_exits": 1})
    }
    fn pause(&self) -> Result<(), ApiError> {
        self.call();
        Err(ApiError::Conflict("the VM is already paused".into()))
    }
    fn resume(&self) -> Result<(), ApiError> {
        self.call();
        Ok(())
    }
    fn nmi(&self) -> Result<(), ApiError> {
        self.call();
        Ok(())
    }
    fn shutdown(&self) -> Result<(), ApiError> {
        self.call();
        Ok(())
    }
    fn device_remove(&self, id: &str) -> Result<(), ApiError> {
        self.call();
        match id {
            "vf0" => Ok(()),
            _ => Err(ApiError::NotFound(format!("no device {id:?}"))),
        }
    }
    fn device_add(&self, request: &Value) -> Result<Value, ApiError> {
        self.call();
        assert!(request.is_object(), "device_add got {request}");
        Ok(json!({"id": "vf0", "host_bdf": "0000:01:00.1", "guest_pci": "00:05.0"}))
    }
}

/// The client's bytes, `chunk` at a time, as a socket delivers them.
struct Chunked<'a> {
    data: &'a [u8],
    chunk: usize,
}

impl Read for Chunked<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.data.len().min(self.chunk).min(buf.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, raw)) = data.split_first() else { return };
    let chunk = if first == 0 { usize::MAX } else { usize::from(first) };
    let vm = FakeVm::default();
    let response = match read_request(&mut Chunked { data: raw, chunk }, &REQUEST_LIMITS) {
        Ok(req) => {
            assert!(req.body.len() <= REQUEST_LIMITS.max_body, "a {}-byte body was accepted", req.body.len());
            let response = handle(&vm, &req.method, &req.target, &req.body);
            let called = *vm.calls.lock().unwrap() > 0;
            let routed = !matches!(response.status, 404 | 405);
            assert!(!called || routed, "the VM was called for a {} answer", response.status);
            response
        }
        Err(e) => match e.status() {
            Some(status) => Response::error(status, format!("bad request: {e}")),
            None => return,
        },
    };
    assert!(STATUSES.contains(&response.status), "undocumented status {}", response.status);
    match (response.status, &response.body) {
        (204, body) => assert!(body.is_none(), "a 204 with a body"),
        (200, Some(Value::Object(_))) => {}
        (status, Some(body)) if status >= 400 => {
            assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()), "error without a message: {body}")
        }
        (status, body) => panic!("status {status} with body {body:?}"),
    }
    assert_eq!(response.allow.is_some(), response.status == 405, "Allow on a {}", response.status);

    // As the server writes it, and as `tandem ctl` reads it back.
    let body = response.body.as_ref().map(|b| b.to_string().into_bytes());
    let allow: Vec<(&str, &str)> = response.allow.iter().map(|a| ("Allow", *a)).collect();
    let mut wire = Vec::new();
    write_response(&mut wire, response.status, body.as_deref(), &allow).expect("write to a Vec");
    let back = read_response(&mut &wire[..], &RESPONSE_LIMITS).expect("the client reads what the server wrote");
    assert_eq!(back.status, response.status);
    match &response.body {
        Some(v) => assert_eq!(serde_json::from_slice::<Value>(&back.body).ok().as_ref(), Some(v)),
        None => assert!(back.body.is_empty()),
    }
});
