//! Just enough HTTP/1.1 for the control socket: a strict, bounded reader for one request
//! (or, on the client side, one response) and writers for both. No keep-alive, no chunked
//! encoding. Every limit is checked before memory is spent, so a client controls nothing
//! but the error it gets. Time limits belong to the caller's `Read` (see the server).

use std::io::{self, Read, Write};

/// Bounds on what one message may make us hold.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Longest request/status line or header line, CRLF included.
    pub max_line: usize,
    pub max_headers: usize,
    pub max_body: usize,
}

/// What the server accepts from a client.
pub const REQUEST_LIMITS: Limits = Limits { max_line: 8 * 1024, max_headers: 32, max_body: 64 * 1024 };
/// What the client accepts from the server: counters may be larger than any request.
pub const RESPONSE_LIMITS: Limits = Limits { max_line: 8 * 1024, max_headers: 32, max_body: 4 * 1024 * 1024 };

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("the connection closed before anything was sent")]
    Empty,
    #[error("the connection closed in the middle of the message")]
    Truncated,
    #[error("the message did not arrive complete in time")]
    TimedOut,
    #[error("reading the message failed: {0}")]
    Io(#[source] io::Error),
    #[error("the request line is longer than {0} bytes")]
    RequestLineTooLong(usize),
    #[error("a header line is longer than {0} bytes")]
    HeaderTooLong(usize),
    #[error("more than {0} headers")]
    TooManyHeaders(usize),
    #[error("a line ends in a bare LF or holds a stray CR; HTTP lines end in CRLF")]
    BadLineEnding,
    #[error("the message head is not ASCII text")]
    NotAscii,
    #[error("malformed request line {0:?}: expected `METHOD /path HTTP/1.1`")]
    BadRequestLine(String),
    #[error("malformed status line {0:?}: expected `HTTP/1.1 200 OK`")]
    BadStatusLine(String),
    #[error("HTTP version {0:?} is not supported; use HTTP/1.1")]
    BadVersion(String),
    #[error("malformed header {0:?}: expected `Name: value`")]
    BadHeader(String),
    #[error("bad Content-Length {0:?}: expected one decimal byte count")]
    BadContentLength(String),
    #[error("Transfer-Encoding is not supported; send the body with a Content-Length")]
    TransferEncoding,
    #[error("the body is {len} bytes, more than the limit of {limit}")]
    BodyTooLarge { len: u64, limit: usize },
}

impl HttpError {
    /// The status to answer a request that failed this way with, or `None` when there is
    /// nobody left to answer (the client went away).
    pub fn status(&self) -> Option<u16> {
        match self {
            HttpError::Empty | HttpError::Truncated | HttpError::Io(_) => None,
            HttpError::TimedOut => Some(408),
            HttpError::RequestLineTooLong(_) => Some(414),
            HttpError::HeaderTooLong(_) | HttpError::TooManyHeaders(_) => Some(431),
            HttpError::BodyTooLarge { .. } => Some(413),
            HttpError::TransferEncoding => Some(501),
            HttpError::BadVersion(_) => Some(505),
            HttpError::BadLineEnding
            | HttpError::NotAscii
            | HttpError::BadRequestLine(_)
            | HttpError::BadStatusLine(_)
            | HttpError::BadHeader(_)
            | HttpError::BadContentLength(_) => Some(400),
        }
    }
}

/// One parsed request; the server needs no header but the body's length.
#[derive(Debug)]
pub struct Request {
    pub method: String,
    pub target: String,
    pub body: Vec<u8>,
}

/// One parsed response.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

/// Reads one request from `r`; bytes after its body are left unread or discarded.
pub fn read_request<R: Read>(r: &mut R, limits: &Limits) -> Result<Request, HttpError> {
    let mut reader = LineReader::new(r);
    let line = match reader.line(limits.max_line) {
        Err(HttpError::HeaderTooLong(n)) => return Err(HttpError::RequestLineTooLong(n)),
        other => other?,
    };
    let (method, target) = parse_request_line(&line)?;
    let headers = reader.headers(limits)?;
    let len = content_length(&headers, limits)?.unwrap_or(0);
    let body = reader.body(len)?;
    Ok(Request { method, target, body })
}

/// Reads one response from `r`. Without a Content-Length the body runs to end of stream.
pub fn read_response<R: Read>(r: &mut R, limits: &Limits) -> Result<Response, HttpError> {
    let mut reader = LineReader::new(r);
    let line = reader.line(limits.max_line)?;
    let status = parse_status_line(&line)?;
    let headers = reader.headers(limits)?;
    let body = match content_length(&headers, limits)? {
        _ if status == 204 || status == 304 || (100..200).contains(&status) => Vec::new(),
        Some(len) => reader.body(len)?,
        None => reader.body_to_eof(limits.max_body)?,
    };
    Ok(Response { status, body })
}

/// Writes a whole response in one `write_all`. `body` is JSON; `extra` adds headers (`Allow`).
pub fn write_response<W: Write>(w: &mut W, status: u16, body: Option<&[u8]>, extra: &[(&str, &str)]) -> io::Result<()> {
    let mut out = format!("HTTP/1.1 {status} {}\r\n", reason(status));
    for (name, value) in extra {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    // A 204 carries neither a body nor a Content-Length (RFC 9110 §8.6).
    if status != 204 {
        let body = body.unwrap_or_default();
        if !body.is_empty() {
            out.push_str("Content-Type: application/json\r\n");
        }
        out.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    out.push_str("Connection: close\r\n\r\n");
    let mut bytes = out.into_bytes();
    if status != 204 {
        bytes.extend_from_slice(body.unwrap_or_default());
    }
    w.write_all(&bytes)?;
    w.flush()
}

/// Writes a whole request in one `write_all`.
pub fn write_request<W: Write>(w: &mut W, method: &str, target: &str, body: Option<&[u8]>) -> io::Result<()> {
    let mut out = format!("{method} {target} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n");
    if let Some(body) = body {
        out.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()));
    }
    out.push_str("Connection: close\r\n\r\n");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(body.unwrap_or_default());
    w.write_all(&bytes)?;
    w.flush()
}

pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Content Too Large",
        414 => "URI Too Long",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

fn parse_request_line(line: &str) -> Result<(String, String), HttpError> {
    let bad = || HttpError::BadRequestLine(line.to_string());
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad());
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(bad());
    }
    if !target.starts_with('/') || target.bytes().any(|b| b.is_ascii_control()) {
        return Err(bad());
    }
    check_version(version).ok_or_else(bad)??;
    Ok((method.to_string(), target.to_string()))
}

/// `None` when `version` is not an HTTP version at all, `Some(Err)` when it is one we do
/// not speak.
fn check_version(version: &str) -> Option<Result<(), HttpError>> {
    let rest = version.strip_prefix("HTTP/")?;
    Some(match rest {
        "1.1" | "1.0" => Ok(()),
        _ => Err(HttpError::BadVersion(version.to_string())),
    })
}

fn parse_status_line(line: &str) -> Result<u16, HttpError> {
    let bad = || HttpError::BadStatusLine(line.to_string());
    let mut parts = line.splitn(3, ' ');
    let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
        return Err(bad());
    };
    check_version(version).ok_or_else(bad)??;
    if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    code.parse().map_err(|_| bad())
}

/// The body length the headers announce; refuses what we cannot or will not read.
fn content_length(headers: &[(String, String)], limits: &Limits) -> Result<Option<u64>, HttpError> {
    if headers.iter().any(|(name, _)| name == "transfer-encoding") {
        return Err(HttpError::TransferEncoding);
    }
    let mut length = None;
    for (_, value) in headers.iter().filter(|(name, _)| name == "content-length") {
        let bad = || HttpError::BadContentLength(value.clone());
        if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let len: u64 = value.parse().map_err(|_| bad())?;
        // Two different lengths is how requests get smuggled; refuse rather than pick one.
        if length.is_some_and(|l| l != len) {
            return Err(bad());
        }
        length = Some(len);
    }
    match length {
        Some(len) if len > limits.max_body as u64 => Err(HttpError::BodyTooLarge { len, limit: limits.max_body }),
        other => Ok(other),
    }
}

/// Splits a stream into CRLF lines and a body without ever holding more than a line's
/// limit (or the body's) plus one read.
struct LineReader<'a, R> {
    inner: &'a mut R,
    pending: Vec<u8>,
    /// Bytes taken from the stream so far, to tell an empty connection from a cut one.
    total: usize,
}

impl<'a, R: Read> LineReader<'a, R> {
    fn new(inner: &'a mut R) -> Self {
        Self { inner, pending: Vec::new(), total: 0 }
    }

    /// Reads more into `pending`; false at end of stream.
    fn fill(&mut self) -> Result<bool, HttpError> {
        let mut chunk = [0u8; 4096];
        loop {
            match self.inner.read(&mut chunk) {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    self.pending.extend_from_slice(&chunk[..n]);
                    self.total += n;
                    return Ok(true);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if matches!(e.kind(), io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock) => {
                    return Err(HttpError::TimedOut)
                }
                Err(e) => return Err(HttpError::Io(e)),
            }
        }
    }

    fn eof_error(&self) -> HttpError {
        if self.total == 0 {
            HttpError::Empty
        } else {
            HttpError::Truncated
        }
    }

    /// One line without its CRLF. Too long is reported as [`HttpError::HeaderTooLong`].
    fn line(&mut self, max: usize) -> Result<String, HttpError> {
        loop {
            if let Some(i) = self.pending.iter().position(|&b| b == b'\n') {
                if i + 1 > max {
                    return Err(HttpError::HeaderTooLong(max));
                }
                let mut line: Vec<u8> = self.pending.drain(..=i).collect();
                line.pop();
                if line.pop() != Some(b'\r') || line.contains(&b'\r') {
                    return Err(HttpError::BadLineEnding);
                }
                if !line.is_ascii() {
                    return Err(HttpError::NotAscii);
                }
                return String::from_utf8(line).map_err(|_| HttpError::NotAscii);
            }
            if self.pending.len() >= max {
                return Err(HttpError::HeaderTooLong(max));
            }
            if !self.fill()? {
                return Err(self.eof_error());
            }
        }
    }

    /// Header lines up to the blank line, as (lower-cased name, trimmed value).
    fn headers(&mut self, limits: &Limits) -> Result<Vec<(String, String)>, HttpError> {
        let mut headers = Vec::new();
        loop {
            let line = self.line(limits.max_line)?;
            if line.is_empty() {
                return Ok(headers);
            }
            if headers.len() == limits.max_headers {
                return Err(HttpError::TooManyHeaders(limits.max_headers));
            }
            let Some((name, value)) = line.split_once(':') else {
                return Err(HttpError::BadHeader(line));
            };
            // No space before the colon, no obsolete line folding (RFC 9112 §5.1, §5.2).
            let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
            if name.is_empty() || !name.bytes().all(token) {
                return Err(HttpError::BadHeader(line));
            }
            headers.push((name.to_ascii_lowercase(), value.trim_matches([' ', '\t']).to_string()));
        }
    }

    /// Exactly `len` bytes; `len` was checked against the body limit by the caller.
    fn body(&mut self, len: u64) -> Result<Vec<u8>, HttpError> {
        let len = usize::try_from(len).map_err(|_| HttpError::BodyTooLarge { len, limit: usize::MAX })?;
        while self.pending.len() < len {
            if !self.fill()? {
                return Err(HttpError::Truncated);
            }
        }
        self.pending.truncate(len);
        Ok(std::mem::take(&mut self.pending))
    }

    fn body_to_eof(&mut self, max: usize) -> Result<Vec<u8>, HttpError> {
        // Part of the body may have come in with the head.
        loop {
            if self.pending.len() > max {
                return Err(HttpError::BodyTooLarge { len: self.pending.len() as u64, limit: max });
            }
            if !self.fill()? {
                return Ok(std::mem::take(&mut self.pending));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &[u8]) -> Result<Request, HttpError> {
        read_request(&mut &raw[..], &REQUEST_LIMITS)
    }

    #[test]
    fn reads_a_request_with_a_body() {
        let req =
            parse(b"PUT /api/v1/device-remove HTTP/1.1\r\nHost: x\r\nCONTENT-length:  9 \r\n\r\n{\"id\":1}\nextra")
                .unwrap();
        assert_eq!((req.method.as_str(), req.target.as_str()), ("PUT", "/api/v1/device-remove"));
        assert_eq!(req.body, b"{\"id\":1}\n");
    }

    #[test]
    fn reads_a_request_without_a_body_and_http_1_0() {
        let req = parse(b"GET /api/v1/info HTTP/1.0\r\n\r\n").unwrap();
        assert!(req.body.is_empty());
    }

    /// A reader that hands out one byte per call, as a slow client would.
    struct Trickle<'a>(&'a [u8]);
    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.0.len().min(1).min(buf.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn reads_a_request_byte_by_byte() {
        let raw = b"PUT /a HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}";
        let req = read_request(&mut Trickle(raw), &REQUEST_LIMITS).unwrap();
        assert_eq!(req.body, b"{}");
    }

    fn status_of(raw: &[u8]) -> Option<u16> {
        let err = parse(raw).expect_err("malformed input must be refused");
        assert!(!err.to_string().is_empty());
        err.status()
    }

    #[test]
    fn refuses_malformed_request_lines() {
        for raw in [
            &b"GET /api/v1/info\r\n\r\n"[..],
            b"GET  /api/v1/info HTTP/1.1\r\n\r\n",
            b"get /api/v1/info HTTP/1.1\r\n\r\n",
            b"GET api/v1/info HTTP/1.1\r\n\r\n",
            b"GET /a\x01b HTTP/1.1\r\n\r\n",
            b"GET /api/v1/info FTP/1.1\r\n\r\n",
            b"GET /api/v1/info HTTP/1.1 extra\r\n\r\n",
            b"\r\n",
            b"GET /api/v1/info HTTP/1.1\n\n",
            b"GET /a\rb HTTP/1.1\r\n\r\n",
            b"GET /\xc3\xa9 HTTP/1.1\r\n\r\n",
            b"GET /\xff HTTP/1.1\r\n\r\n",
        ] {
            assert_eq!(status_of(raw), Some(400), "{:?}", String::from_utf8_lossy(raw));
        }
        assert_eq!(status_of(b"GET / HTTP/2.0\r\n\r\n"), Some(505));
    }

    #[test]
    fn refuses_malformed_headers() {
        for raw in [
            &b"GET / HTTP/1.1\r\nNoColon\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nName : v\r\n\r\n",
            b"GET / HTTP/1.1\r\n folded: v\r\n\r\n",
            b"GET / HTTP/1.1\r\n: v\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: 1 2\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: \r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        ] {
            assert_eq!(status_of(raw), Some(400), "{:?}", String::from_utf8_lossy(raw));
        }
        assert_eq!(status_of(b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"), Some(501));
    }

    #[test]
    fn enforces_limits() {
        let long_target = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(REQUEST_LIMITS.max_line));
        assert_eq!(status_of(long_target.as_bytes()), Some(414));
        // A line with no newline at all must stop at the limit, not grow forever.
        assert_eq!(status_of(&vec![b'G'; 100_000]), Some(414));
        let long_header = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "v".repeat(REQUEST_LIMITS.max_line));
        assert_eq!(status_of(long_header.as_bytes()), Some(431));
        let many = format!("GET / HTTP/1.1\r\n{}\r\n", "X: y\r\n".repeat(REQUEST_LIMITS.max_headers + 1));
        assert_eq!(status_of(many.as_bytes()), Some(431));
        let big = format!("PUT / HTTP/1.1\r\nContent-Length: {}\r\n\r\n", REQUEST_LIMITS.max_body + 1);
        assert_eq!(status_of(big.as_bytes()), Some(413));
        let exact = format!("PUT / HTTP/1.1\r\nContent-Length: {}\r\n\r\n", REQUEST_LIMITS.max_body);
        let mut raw = exact.into_bytes();
        raw.resize(raw.len() + REQUEST_LIMITS.max_body, b' ');
        assert_eq!(parse(&raw).unwrap().body.len(), REQUEST_LIMITS.max_body);
    }

    #[test]
    fn tells_empty_from_truncated_connections() {
        assert!(matches!(parse(b""), Err(HttpError::Empty)));
        assert!(matches!(parse(b"GET / HT"), Err(HttpError::Truncated)));
        assert!(matches!(parse(b"GET / HTTP/1.1\r\nA: b\r\n"), Err(HttpError::Truncated)));
        assert!(matches!(parse(b"PUT / HTTP/1.1\r\nContent-Length: 5\r\n\r\n{}"), Err(HttpError::Truncated)));
        assert_eq!(parse(b"").unwrap_err().status(), None);
    }

    struct TimesOut;
    impl Read for TimesOut {
        fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
            Err(io::ErrorKind::WouldBlock.into())
        }
    }

    #[test]
    fn maps_read_timeouts_to_408() {
        let err = read_request(&mut TimesOut, &REQUEST_LIMITS).unwrap_err();
        assert!(matches!(err, HttpError::TimedOut));
        assert_eq!(err.status(), Some(408));
    }

    #[test]
    fn writes_and_reads_back_responses() {
        let mut out = Vec::new();
        write_response(&mut out, 200, Some(b"{\"a\":1}"), &[]).unwrap();
        let text = String::from_utf8(out.clone()).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.contains("Content-Type: application/json\r\nContent-Length: 7\r\nConnection: close\r\n\r\n"));
        let resp = read_response(&mut &out[..], &RESPONSE_LIMITS).unwrap();
        assert_eq!((resp.status, resp.body.as_slice()), (200, &b"{\"a\":1}"[..]));

        let mut out = Vec::new();
        write_response(&mut out, 204, Some(b"ignored"), &[]).unwrap();
        assert_eq!(out, b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n");
        let resp = read_response(&mut &out[..], &RESPONSE_LIMITS).unwrap();
        assert_eq!((resp.status, resp.body.len()), (204, 0));

        let mut out = Vec::new();
        write_response(&mut out, 405, Some(b"{}"), &[("Allow", "GET")]).unwrap();
        assert!(String::from_utf8(out).unwrap().contains("\r\nAllow: GET\r\n"));
    }

    #[test]
    fn reads_responses_without_length_to_eof_and_refuses_bad_ones() {
        let resp = read_response(&mut &b"HTTP/1.1 200 OK\r\n\r\n{\"x\":2}"[..], &RESPONSE_LIMITS).unwrap();
        assert_eq!(resp.body, b"{\"x\":2}");
        for raw in [&b"HTTP/1.1 20 OK\r\n\r\n"[..], b"HTTX/1.1 200 OK\r\n\r\n", b"HTTP/1.1\r\n\r\n", b"SSH-2.0\r\n"] {
            assert!(read_response(&mut &raw[..], &RESPONSE_LIMITS).is_err(), "{raw:?}");
        }
        let small = Limits { max_body: 4, ..RESPONSE_LIMITS };
        assert!(matches!(
            read_response(&mut &b"HTTP/1.1 200 OK\r\n\r\n123456"[..], &small),
            Err(HttpError::BodyTooLarge { .. })
        ));
    }

    #[test]
    fn writes_requests_the_reader_accepts() {
        let mut out = Vec::new();
        write_request(&mut out, "PUT", "/api/v1/pause", Some(b"{}")).unwrap();
        let req = parse(&out).unwrap();
        assert_eq!((req.method.as_str(), req.body.as_slice()), ("PUT", &b"{}"[..]));
        let mut out = Vec::new();
        write_request(&mut out, "GET", "/api/v1/info", None).unwrap();
        assert!(parse(&out).unwrap().body.is_empty());
    }
}
