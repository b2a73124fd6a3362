//! The control socket's view of a VM: [`api::VmControl`] over a [`VmHandle`], its typed
//! answers turned into the protocol's JSON.

use serde_json::{json, Value};

use crate::api::{ApiError, VmControl};
use crate::handle::VmHandle;
use crate::passthrough::{AddRequest, PlugError};
use crate::runner::RunError;
use crate::sriov::{DeviceSpec, VfSpec};

fn plug_error(e: PlugError) -> ApiError {
    match e {
        PlugError::NotFound(m) => ApiError::NotFound(m),
        PlugError::Conflict(m) => ApiError::Conflict(m),
        PlugError::BadRequest(m) => ApiError::BadRequest(m),
        PlugError::Failed(m) => ApiError::Internal(m),
    }
}

fn run_error(e: RunError) -> ApiError {
    match e {
        RunError::AlreadyPaused | RunError::NotPaused | RunError::Ended => ApiError::Conflict(e.to_string()),
        other => ApiError::Internal(other.to_string()),
    }
}

/// Typed answers are plain data: serializing them cannot fail, but say so if it did.
fn to_json(v: impl serde::Serialize) -> Value {
    serde_json::to_value(v).unwrap_or_else(|e| json!({ "error": format!("cannot describe the VM: {e}") }))
}

impl VmControl for VmHandle {
    fn info(&self) -> Value {
        to_json(VmHandle::info(self))
    }

    fn counters(&self) -> Value {
        to_json(VmHandle::counters(self))
    }

    fn pause(&self) -> Result<(), ApiError> {
        VmHandle::pause(self).map_err(run_error)
    }

    fn resume(&self) -> Result<(), ApiError> {
        VmHandle::resume(self).map_err(run_error)
    }

    fn nmi(&self) -> Result<(), ApiError> {
        self.inject_nmi().map_err(run_error)
    }

    fn shutdown(&self) -> Result<(), ApiError> {
        VmHandle::shutdown(self);
        Ok(())
    }

    fn device_remove(&self, id: &str) -> Result<(), ApiError> {
        self.remove_device(id).map(|_| ()).map_err(plug_error)
    }

    fn device_add(&self, request: &Value) -> Result<Value, ApiError> {
        let field = |k: &str| request.get(k).and_then(Value::as_str);
        let bad = |e: crate::config::ConfigError| ApiError::BadRequest(e.to_string());
        let add = if let Some(spec) = field("vf") {
            AddRequest::Vf(VfSpec::parse(spec, 0).map_err(bad)?)
        } else if let Some(spec) = field("device") {
            AddRequest::Device(DeviceSpec::parse(spec, 0).map_err(bad)?)
        } else if let Some(id) = field("id") {
            AddRequest::Parked(id.to_string())
        } else {
            return Err(ApiError::BadRequest("device-add needs one of vf, device or id".into()));
        };
        let plugged = self.add_device(add).map_err(plug_error)?;
        Ok(json!({ "id": plugged.id, "host_bdf": plugged.bdf, "guest_pci": format!("0000:00:{:02x}.0", plugged.slot) }))
    }

    fn notices(&self) -> devices::Notices {
        VmHandle::notices(self).clone()
    }
}
