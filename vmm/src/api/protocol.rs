//! Routes of protocol v1 (documented in `api/mod.rs`): from a parsed request to a call on
//! [`VmControl`] and the response to send. Nothing here touches a socket.

use serde_json::{json, Map, Value};

use super::{ApiError, VmControl};

/// What to answer. `body: None` is a 204 (or an error without a body, which we never send).
#[derive(Debug, PartialEq)]
pub struct Response {
    pub status: u16,
    pub body: Option<Value>,
    /// The `Allow` header of a 405.
    pub allow: Option<&'static str>,
}

impl Response {
    fn ok(body: Value) -> Self {
        Self { status: 200, body: Some(body), allow: None }
    }

    fn no_content() -> Self {
        Self { status: 204, body: None, allow: None }
    }

    pub fn error(status: u16, message: impl Into<String>) -> Self {
        Self { status, body: Some(json!({ "error": message.into() })), allow: None }
    }
}

impl From<ApiError> for Response {
    fn from(e: ApiError) -> Self {
        Response::error(e.status(), e.to_string())
    }
}

#[derive(Debug, Clone, Copy)]
enum Route {
    Info,
    Counters,
    Pause,
    Nmi,
    Resume,
    Shutdown,
    DeviceRemove,
    DeviceAdd,
}

const PREFIX: &str = "/api/v1/";

/// (name under /api/v1/, method, route).
const ROUTES: [(&str, &str, Route); 8] = [
    ("info", "GET", Route::Info),
    ("counters", "GET", Route::Counters),
    ("pause", "PUT", Route::Pause),
    ("resume", "PUT", Route::Resume),
    ("nmi", "PUT", Route::Nmi),
    ("shutdown", "PUT", Route::Shutdown),
    ("device-remove", "PUT", Route::DeviceRemove),
    ("device-add", "PUT", Route::DeviceAdd),
];

/// Answers one request. Never panics on anything the client sent.
pub fn handle(control: &dyn VmControl, method: &str, target: &str, body: &[u8]) -> Response {
    let Some(&(name, allowed, route)) = target.strip_prefix(PREFIX).and_then(|n| ROUTES.iter().find(|r| r.0 == n))
    else {
        let known: Vec<String> = ROUTES.iter().map(|(n, m, _)| format!("{m} {PREFIX}{n}")).collect();
        return Response::error(404, format!("unknown route {target:?}; the routes are {}", known.join(", ")));
    };
    if method != allowed {
        let mut response = Response::error(405, format!("{PREFIX}{name} takes {allowed}, not {method}"));
        response.allow = Some(allowed);
        return response;
    }
    // Refusals travel as `Err(Response)` so `?` can carry them; both sides are answers.
    dispatch(control, name, route, body).unwrap_or_else(|refusal| refusal)
}

fn dispatch(control: &dyn VmControl, name: &str, route: Route, body: &[u8]) -> Result<Response, Response> {
    match route {
        Route::Info => {
            no_body(name, body)?;
            Ok(Response::ok(control.info()))
        }
        Route::Counters => {
            no_body(name, body)?;
            Ok(Response::ok(control.counters()))
        }
        Route::Pause => {
            no_body(name, body)?;
            control.pause()?;
            Ok(Response::no_content())
        }
        Route::Resume => {
            no_body(name, body)?;
            control.resume()?;
            Ok(Response::no_content())
        }
        Route::Nmi => {
            no_body(name, body)?;
            control.nmi()?;
            Ok(Response::no_content())
        }
        Route::Shutdown => {
            no_body(name, body)?;
            control.shutdown()?;
            Ok(Response::no_content())
        }
        Route::DeviceRemove => {
            let fields = object(name, body, r#"{"id": "vf0"}"#)?;
            let id = only_string_field(name, &fields, &["id"], r#"{"id": "vf0"}"#)?.1;
            control.device_remove(id)?;
            Ok(Response::no_content())
        }
        Route::DeviceAdd => {
            const EXAMPLE: &str = r#"{"vf": "pf=eth0,index=0"}, {"device": "path=/sys/bus/pci/devices/BDF"} or {"id": "vf0"} (a parked VF)"#;
            let fields = object(name, body, EXAMPLE)?;
            only_string_field(name, &fields, &["vf", "device", "id"], EXAMPLE)?;
            Ok(Response::ok(control.device_add(&Value::Object(fields))?))
        }
    }
}

/// Routes without parameters take an empty body or `{}` — anything else is a mistake the
/// client should hear about rather than have ignored.
fn no_body(name: &str, body: &[u8]) -> Result<(), Response> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) if map.is_empty() => Ok(()),
        Ok(_) => Err(Response::error(400, format!("{name} takes no body (or {{}}); send it without one"))),
        Err(e) => Err(malformed(e)),
    }
}

fn malformed(e: serde_json::Error) -> Response {
    Response::error(400, format!("malformed JSON body: {e}"))
}

fn object(name: &str, body: &[u8], example: &str) -> Result<Map<String, Value>, Response> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(Response::error(400, format!("{name} needs a JSON body like {example}")));
    }
    match serde_json::from_slice::<Value>(body).map_err(malformed)? {
        Value::Object(map) => Ok(map),
        other => Err(Response::error(400, format!("{name} needs a JSON object like {example}, not {}", kind(&other)))),
    }
}

/// Checks that `fields` holds exactly one of `allowed`, a non-empty string, and nothing else.
fn only_string_field<'a>(
    name: &str,
    fields: &'a Map<String, Value>,
    allowed: &[&'static str],
    example: &str,
) -> Result<(&'static str, &'a str), Response> {
    if let Some(unknown) = fields.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(Response::error(400, format!("unknown field {unknown:?} in {name}; expected {example}")));
    }
    let present: Vec<&'static str> = allowed.iter().copied().filter(|k| fields.contains_key(*k)).collect();
    let [key] = present[..] else {
        let which = if present.is_empty() { "missing" } else { "more than one" };
        return Err(Response::error(400, format!("{which} of {allowed:?} in {name}; expected {example}")));
    };
    match fields.get(key) {
        Some(Value::String(s)) if !s.trim().is_empty() => Ok((key, s)),
        Some(Value::String(_)) => Err(Response::error(400, format!("{key:?} in {name} is empty; expected {example}"))),
        other => Err(Response::error(
            400,
            format!("{key:?} in {name} must be a string, not {}; expected {example}", other.map_or("nothing", kind)),
        )),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// Records calls; fails the ones whose argument says so.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<String>>);

    impl Recorder {
        fn log(&self, s: String) {
            self.0.lock().unwrap().push(s);
        }
        fn calls(&self) -> Vec<String> {
            self.0.lock().unwrap().clone()
        }
    }

    impl VmControl for Recorder {
        fn info(&self) -> Value {
            self.log("info".into());
            json!({"cpus": 2})
        }
        fn counters(&self) -> Value {
            self.log("counters".into());
            json!({"exits": 7})
        }
        fn pause(&self) -> Result<(), ApiError> {
            self.log("pause".into());
            Err(ApiError::Conflict("the VM is already paused".into()))
        }
        fn nmi(&self) -> Result<(), ApiError> {
            self.log("nmi".into());
            Ok(())
        }
        fn resume(&self) -> Result<(), ApiError> {
            self.log("resume".into());
            Ok(())
        }
        fn shutdown(&self) -> Result<(), ApiError> {
            self.log("shutdown".into());
            Err(ApiError::Internal("cannot".into()))
        }
        fn device_remove(&self, id: &str) -> Result<(), ApiError> {
            self.log(format!("remove {id}"));
            match id {
                "vf0" => Ok(()),
                _ => Err(ApiError::NotFound(format!("no device {id:?}"))),
            }
        }
        fn device_add(&self, request: &Value) -> Result<Value, ApiError> {
            self.log(format!("add {request}"));
            Ok(json!({"id": "vf0"}))
        }
    }

    fn call(r: &Recorder, method: &str, target: &str, body: &str) -> Response {
        handle(r, method, target, body.as_bytes())
    }

    fn error_of(resp: &Response) -> &str {
        resp.body.as_ref().and_then(|b| b["error"].as_str()).expect("an error body")
    }

    #[test]
    fn routes_each_call() {
        let r = Recorder::default();
        assert_eq!(call(&r, "GET", "/api/v1/info", ""), Response::ok(json!({"cpus": 2})));
        assert_eq!(call(&r, "GET", "/api/v1/counters", " {} "), Response::ok(json!({"exits": 7})));
        assert_eq!(call(&r, "PUT", "/api/v1/resume", ""), Response::no_content());
        assert_eq!(call(&r, "PUT", "/api/v1/device-remove", r#"{"id":"vf0"}"#), Response::no_content());
        let added = call(&r, "PUT", "/api/v1/device-add", r#"{"vf":"pf=eth0,index=0"}"#);
        assert_eq!(added, Response::ok(json!({"id": "vf0"})));
        let expected = ["info", "counters", "resume", "remove vf0", r#"add {"vf":"pf=eth0,index=0"}"#];
        assert_eq!(r.calls(), expected);
    }

    #[test]
    fn passes_control_errors_through_with_their_status() {
        let r = Recorder::default();
        let resp = call(&r, "PUT", "/api/v1/pause", "");
        assert_eq!((resp.status, error_of(&resp)), (409, "the VM is already paused"));
        assert_eq!(call(&r, "PUT", "/api/v1/shutdown", "").status, 500);
        assert_eq!(call(&r, "PUT", "/api/v1/device-remove", r#"{"id":"nope"}"#).status, 404);
    }

    #[test]
    fn refuses_unknown_routes_and_wrong_methods() {
        let r = Recorder::default();
        for target in ["/", "/api/v1/", "/api/v1/info/", "/api/v2/info", "/api/v1/info?x=1", "/api/v1/reboot"] {
            let resp = call(&r, "GET", target, "");
            assert_eq!(resp.status, 404, "{target}");
            assert!(error_of(&resp).contains("GET /api/v1/info"), "lists the routes");
        }
        let resp = call(&r, "PUT", "/api/v1/info", "");
        assert_eq!((resp.status, resp.allow), (405, Some("GET")));
        assert_eq!(error_of(&resp), "/api/v1/info takes GET, not PUT");
        assert_eq!(call(&r, "GET", "/api/v1/pause", "").allow, Some("PUT"));
        assert_eq!(call(&r, "POST", "/api/v1/device-add", "").status, 405);
        assert!(r.calls().is_empty());
    }

    #[test]
    fn refuses_bad_bodies_without_calling_the_vm() {
        let r = Recorder::default();
        let cases = [
            ("info", "[1]", "takes no body"),
            ("pause", "{\"now\": true}", "takes no body"),
            ("pause", "{", "malformed JSON"),
            ("device-remove", "", "needs a JSON body"),
            ("device-remove", "{\"id\": \"vf0\"", "malformed JSON"),
            ("device-remove", "\"vf0\"", "not a string"),
            ("device-remove", "{}", "missing"),
            ("device-remove", "{\"id\": 3}", "must be a string, not a number"),
            ("device-remove", "{\"id\": \"\"}", "is empty"),
            ("device-remove", "{\"id\": \"vf0\", \"force\": true}", "unknown field \"force\""),
            ("device-add", "{\"vf\": \"pf=a,index=0\", \"device\": \"path=/x\"}", "more than one"),
            ("device-add", "{\"nic\": \"x\"}", "unknown field"),
            ("device-add", "{\"vf\": null}", "must be a string, not null"),
            ("device-add", "\u{0}", "malformed JSON"),
            ("device-add", "\u{ff}", "malformed JSON"),
        ];
        for (route, body, message) in cases {
            let method = if route == "info" { "GET" } else { "PUT" };
            let resp = call(&r, method, &format!("/api/v1/{route}"), body);
            assert_eq!(resp.status, 400, "{route} {body}");
            assert!(error_of(&resp).contains(message), "{route} {body}: {}", error_of(&resp));
        }
        assert!(r.calls().is_empty(), "{:?}", r.calls());
    }

    #[test]
    fn survives_deeply_nested_json() {
        let r = Recorder::default();
        let body = "[".repeat(100_000);
        assert_eq!(call(&r, "PUT", "/api/v1/device-add", &body).status, 400);
    }
}
