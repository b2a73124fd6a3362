//! The control socket (`--api-socket PATH`) and its client (`tandem ctl`).
//!
//! HTTP/1.1 on a Unix stream socket, as Cloud Hypervisor and Firecracker do, so `curl
//! --unix-socket PATH` works as well as `tandem ctl`. The server answers one request per
//! connection (every response carries `Connection: close`) and one connection at a time.
//! The VM behind it is reached only through the [`VmControl`] trait.
//!
//! ```no_run
//! # use std::sync::Arc;
//! # fn demo(control: Arc<dyn vmm::api::VmControl>) -> Result<(), Box<dyn std::error::Error>> {
//! let server = vmm::api::ApiServer::start("/run/tandem/vm0.sock".as_ref(), control)?;
//! // ... run the VM ...
//! server.stop(); // also on drop; removes the socket file
//! let out = vmm::api::run_ctl("/run/tandem/vm0.sock".as_ref(), &["info".to_string()])?;
//! # Ok(()) }
//! ```
//!
//! # Protocol, version 1
//!
//! Requests: `METHOD /api/v1/ROUTE HTTP/1.1` (1.0 is accepted too), headers, and for routes
//! that take one a JSON body sized by `Content-Length` (at most 64 KiB; chunked encoding is
//! refused). A request must arrive complete within 5 s of connecting. Responses are either
//! `200` with a JSON body, `204` with none, or an error status with the body
//! `{"error": "<what was wrong and what to do>"}`. Every response body is
//! `Content-Type: application/json`.
//!
//! | route | method | request body | success |
//! |---|---|---|---|
//! | `/api/v1/info` | `GET` | none | `200`, the VM's description (config, state, devices) |
//! | `/api/v1/counters` | `GET` | none | `200`, per-device bytes/packets, per path (VF, standby), VM exits |
//! | `/api/v1/pause` | `PUT` | none | `204`; `409` when already paused |
//! | `/api/v1/resume` | `PUT` | none | `204`; `409` when not paused |
//! | `/api/v1/nmi` | `PUT` | none | `204` once every vCPU has it queued (a paused VM takes it on resume); `409` when the VM has ended |
//! | `/api/v1/shutdown` | `PUT` | none | `204`; the VM stops after the reply |
//! | `/api/v1/device-remove` | `PUT` | `{"id": "vf0"}` | `204`; `404` unknown id, `409` already being removed |
//! | `/api/v1/device-add` | `PUT` | `{"vf": "pf=eth0,index=0,id=vf0"}`, `{"device": "path=/sys/bus/pci/devices/0000:01:00.0"}`, or `{"id": "vf0"}` for a failover VF held out of the guest | `200`, the added device (`{"id", "host_bdf", "guest_pci"}`); `409` when it is in use, present already or held back |
//!
//! "none" means an empty body; `{}` is accepted as well. The `vf` and `device` strings take
//! exactly the syntax of the `--vf` and `--device` command-line flags.
//!
//! Errors:
//!
//! | status | when |
//! |---|---|
//! | `400` | malformed HTTP or JSON, a body that is not the object the route takes, an unknown or missing field, an invalid device spec |
//! | `404` | an unknown route, or an unknown device id |
//! | `405` | a known route with the wrong method (the `Allow` header names the right one) |
//! | `408` | the request did not arrive complete in time |
//! | `409` | the request conflicts with the VM's state (already paused, removing twice, device in use) |
//! | `413`, `414`, `431` | body over 64 KiB, request line or a header over 8 KiB, more than 32 headers |
//! | `500` | the VMM failed to do what was asked |
//! | `501`, `505` | `Transfer-Encoding`, an HTTP version other than 1.0/1.1 |
//!
//! Whatever the error, the VM keeps running and the next connection is served.

mod client;
mod http;
mod protocol;
mod server;

#[cfg(test)]
mod tests;

/// The server's request path without its socket, for the fuzz targets under fuzz/: the
/// bounded HTTP reader, the router, and the response writer and reader.
#[doc(hidden)]
pub mod fuzzing {
    pub use super::http::{read_request, read_response, write_response, HttpError, REQUEST_LIMITS, RESPONSE_LIMITS};
    pub use super::protocol::{handle, Response};
}

pub use client::{request, run_ctl, ClientError, CTL_USAGE};
pub use server::{ApiServer, ServerError};

use serde_json::Value;

/// What the socket can ask of a VM. The VMM implements it; the server calls it from its own
/// thread, one request at a time.
pub trait VmControl: Send + Sync {
    /// A description of the VM for `GET /api/v1/info`.
    fn info(&self) -> Value;
    /// Device and VM-exit counters for `GET /api/v1/counters`.
    fn counters(&self) -> Value;
    fn pause(&self) -> Result<(), ApiError>;
    fn resume(&self) -> Result<(), ApiError>;
    /// Injects a non-maskable interrupt into every vCPU (QEMU's `inject-nmi`): a guest
    /// booted with `unknown_nmi_panic` (or a kdump kernel) prints where it was stuck.
    fn nmi(&self) -> Result<(), ApiError>;
    /// Asks the VM to stop; the reply is sent before the VM is gone, so it must not wait for
    /// the server to stop.
    fn shutdown(&self) -> Result<(), ApiError>;
    fn device_remove(&self, id: &str) -> Result<(), ApiError>;
    /// `request` is the route's body, already checked to be an object with exactly one of
    /// `"vf"`, `"device"` (a new device) or `"id"` (a failover VF held out of the guest),
    /// a non-empty string. Returns the JSON to answer with.
    fn device_add(&self, request: &Value) -> Result<Value, ApiError>;
    /// Where the server tells of its own troubles (a failing accept).
    fn notices(&self) -> devices::Notices {
        devices::Notices::discard()
    }
}

/// Why a [`VmControl`] request failed; the variant picks the HTTP status and the message
/// becomes the `"error"` of the response, so it should say what was wrong and what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// 400: the request is well-formed but asks for something invalid (a bad device spec).
    #[error("{0}")]
    BadRequest(String),
    /// 404: no such device.
    #[error("{0}")]
    NotFound(String),
    /// 409: the VM's state does not allow it now (already paused, being removed, in use).
    #[error("{0}")]
    Conflict(String),
    /// 500: the VMM tried and failed.
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// The HTTP status the error is answered with.
    pub fn status(&self) -> u16 {
        match self {
            ApiError::BadRequest(_) => 400,
            ApiError::NotFound(_) => 404,
            ApiError::Conflict(_) => 409,
            ApiError::Internal(_) => 500,
        }
    }
}
