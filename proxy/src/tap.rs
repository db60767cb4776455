//! Tap: the requests flowing through this proxy now, streamed to whoever asks on the admin
//! port (`GET /tap`, what `palisade tap WORKLOAD` reads).
//!
//! The per-request telemetry stage ([`crate::telemetry::request`]) asks [`Tap::active`]
//! when a request arrives — one relaxed load of a counter — and does nothing more while nobody
//! taps: no allocation, no lock. When a tap is connected it keeps the request's method and path
//! (without the query, which may hold secrets), and once the response has ended it publishes a
//! small [`Event`] on a `tokio::sync::broadcast` ring of [`CAPACITY`] events, created on the
//! first tap. Publishing never waits: a tap that reads too slowly falls behind the ring and
//! loses the oldest events, which it is told (`{"dropped": N}` in its stream) and which
//! `palisade_tap_events_dropped_total` counts. A slow tap never slows a request.
//!
//! Who may tap: a tap exposes request metadata (identities, methods, paths), so `/tap` answers
//! loopback peers only (403 otherwise) and refuses a request carrying `Origin` (a web page;
//! 403), and at most [`MAX_TAPS`] taps run at once (503 beyond). docs/observe.md ("Tap").
//!
//! The stream (`Content-Type: application/x-ndjson`) is one JSON object per line:
//!
//! ```json
//! {"time":"2026-01-02T03:04:05.678Z","direction":"inbound","srcIdentity":"spiffe://…/sa/web",
//!  "dstIdentity":"spiffe://…/sa/api","method":"GET","path":"/hello","status":200,
//!  "latencyMs":0.812,"durationMs":0.9,"authz":"allow","policy":"demo/api-from-web","route":null}
//! ```
//!
//! an empty line every [`HEARTBEAT`] without events (a keep-alive, which also tells the proxy
//! when a tap has gone so that its slot is freed), and `{"dropped": N}` when N events were lost.
//! Filters are query parameters: `path` (a prefix of the path), `method` (exact), `to` (the
//! destination's SPIFFE ID, exact); `GET /tap?method=GET&path=/api`.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, StreamBody};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast, watch};

use crate::telemetry::{Direction, Label, RequestLabels};

/// Events the ring holds for each tap: one that falls further behind loses the oldest.
pub const CAPACITY: usize = 1024;
/// Taps connected at once; one more is answered 503.
pub const MAX_TAPS: usize = 4;
/// The longest path an event keeps, in bytes (cut at a character boundary).
pub const MAX_PATH: usize = 1024;
/// An empty line is sent after this long without anything else.
pub const HEARTBEAT: Duration = Duration::from_secs(5);
/// A chunk of the stream is cut after this many bytes of events ready at once.
const CHUNK: usize = 64 * 1024;

/// The body of a `/tap` response (and of the admin server's others, boxed alike).
pub type Body = UnsyncBoxBody<Bytes, Infallible>;

/// The tap hub of one proxy (in [`crate::telemetry::Metrics`], shared by every stack).
pub struct Tap {
    /// Taps connected: what the request path reads.
    taps: AtomicUsize,
    /// Made by the first tap, kept after.
    tx: OnceLock<broadcast::Sender<Arc<Event>>>,
    slots: Arc<Semaphore>,
    /// `palisade_tap_events_dropped_total`: events a tap lost because it fell behind.
    dropped: Counter,
    /// `palisade_tap_clients`: taps connected now.
    clients: Gauge,
}

impl Default for Tap {
    fn default() -> Self {
        Tap {
            taps: AtomicUsize::new(0),
            tx: OnceLock::new(),
            slots: Arc::new(Semaphore::new(MAX_TAPS)),
            dropped: Counter::default(),
            clients: Gauge::default(),
        }
    }
}

impl Tap {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "palisade_tap_events_dropped",
            "Request events a tap (admin /tap) lost because it read too slowly; requests are never slowed by a tap",
            self.dropped.clone(),
        );
        registry.register(
            "palisade_tap_clients",
            "Taps (admin /tap) connected now",
            self.clients.clone(),
        );
    }

    /// Whether anyone taps: the one check a request pays while nobody does.
    #[inline]
    pub fn active(&self) -> bool {
        self.taps.load(Ordering::Relaxed) != 0
    }

    /// Hands a finished request to the connected taps, never waiting.
    pub fn publish(&self, event: Event) {
        if let Some(tx) = self.tx.get() {
            // No receiver left (the last tap went between the check and now): nothing to do.
            let _ = tx.send(Arc::new(event));
        }
    }

    /// A new tap, or None when [`MAX_TAPS`] are connected. Subscribed before it counts as
    /// active, so every request that sees it active reaches it.
    pub fn subscribe(self: &Arc<Self>) -> Option<Subscription> {
        let permit = self.slots.clone().try_acquire_owned().ok()?;
        let rx = self
            .tx
            .get_or_init(|| broadcast::channel(CAPACITY).0)
            .subscribe();
        self.taps.fetch_add(1, Ordering::Relaxed);
        self.clients.inc();
        Some(Subscription {
            rx,
            tap: self.clone(),
            _permit: permit,
        })
    }

    /// Events lost by taps that fell behind, so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.get()
    }
}

/// One connected tap; it stops counting when dropped.
pub struct Subscription {
    rx: broadcast::Receiver<Arc<Event>>,
    tap: Arc<Tap>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.tap.taps.fetch_sub(1, Ordering::Relaxed);
        self.tap.clients.dec();
    }
}

/// What a tapped request keeps from its arrival until its response ends; made only while a
/// tap is connected.
#[derive(Debug)]
pub struct Start {
    time: SystemTime,
    method: Method,
    path: Arc<str>,
    /// The authorization decision and the policy that made it (inbound only).
    pub authz: Option<(bool, Label)>,
}

impl Start {
    pub fn new<B>(req: &Request<B>) -> Box<Start> {
        Box::new(Start {
            time: SystemTime::now(),
            method: req.method().clone(),
            path: Arc::from(truncate(req.uri().path(), MAX_PATH)),
            authz: None,
        })
    }

    /// The event of the finished request: `head` until the response head (the latency
    /// metrics' figure), `total` until its end.
    pub fn finish(
        self,
        direction: Direction,
        labels: &RequestLabels,
        head: Duration,
        total: Duration,
    ) -> Event {
        let Start {
            time,
            method,
            path,
            authz,
        } = self;
        Event {
            time,
            direction,
            src: labels.src_identity.clone(),
            dst: labels.dst_identity.clone(),
            method,
            path,
            status: labels.status_code,
            latency: head,
            duration: total,
            authz,
            route: labels.route.clone(),
        }
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// One finished request, as the taps see it.
#[derive(Clone, Debug)]
pub struct Event {
    /// When the request arrived.
    pub time: SystemTime,
    pub direction: Direction,
    pub src: Label,
    pub dst: Label,
    pub method: Method,
    /// The path without the query.
    pub path: Arc<str>,
    /// 0: no response (the caller went away first).
    pub status: u16,
    /// Until the response head.
    pub latency: Duration,
    /// Until the response's end.
    pub duration: Duration,
    pub authz: Option<(bool, Label)>,
    /// `namespace/name/rule`; empty when no route applied.
    pub route: Label,
}

impl Event {
    /// The event's JSON line (with its newline), fields in the documented order.
    pub fn json_line(&self, out: &mut String) {
        #[derive(serde::Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Line<'a> {
            time: String,
            direction: &'static str,
            src_identity: &'a str,
            dst_identity: &'a str,
            method: &'a str,
            path: &'a str,
            status: Option<u16>,
            latency_ms: f64,
            duration_ms: f64,
            authz: Option<&'static str>,
            policy: Option<&'a str>,
            route: Option<&'a str>,
        }
        let ms = |d: Duration| (d.as_secs_f64() * 1_000_000.0).round() / 1000.0;
        let line = Line {
            time: rfc3339(self.time),
            direction: match self.direction {
                Direction::inbound => "inbound",
                Direction::outbound => "outbound",
            },
            src_identity: &self.src.0,
            dst_identity: &self.dst.0,
            method: self.method.as_str(),
            path: &self.path,
            status: (self.status != 0).then_some(self.status),
            latency_ms: ms(self.latency),
            duration_ms: ms(self.duration),
            authz: self
                .authz
                .as_ref()
                .map(|(allowed, _)| if *allowed { "allow" } else { "deny" }),
            policy: self.authz.as_ref().map(|(_, p)| &*p.0),
            route: (!self.route.0.is_empty()).then_some(&*self.route.0),
        };
        if let Ok(text) = serde_json::to_string(&line) {
            out.push_str(&text);
            out.push('\n');
        }
    }
}

/// UTC, to the millisecond: `2026-01-02T03:04:05.678Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let (secs, millis) = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (d.as_secs() as i64, d.subsec_millis()),
        Err(e) => {
            // Before 1970: only a broken clock; count back.
            let d = e.duration();
            let ms = d.as_millis() as i64;
            ((-ms).div_euclid(1000), (-ms).rem_euclid(1000) as u32)
        }
    };
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Days to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// What a tap asked to see (`/tap?path=…&method=…&to=…`); empty: everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    /// A prefix of the path.
    pub path: Option<String>,
    /// The method, exactly.
    pub method: Option<String>,
    /// The destination's SPIFFE ID, exactly.
    pub to: Option<String>,
}

impl Filter {
    /// The filter of a query string; an unknown parameter is an error (a typo must not tap
    /// everything silently).
    pub fn parse(query: Option<&str>) -> Result<Filter, String> {
        let mut f = Filter::default();
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = decode(v).ok_or_else(|| format!("the tap filter {k:?} is not valid UTF-8"))?;
            match decode(k).as_deref() {
                Some("path") => f.path = Some(v),
                Some("method") => f.method = Some(v),
                Some("to") => f.to = Some(v),
                _ => return Err(format!("unknown tap filter {k:?} (path, method, to)")),
            }
        }
        Ok(f)
    }

    pub fn matches(&self, e: &Event) -> bool {
        self.path.as_deref().is_none_or(|p| e.path.starts_with(p))
            && self
                .method
                .as_deref()
                .is_none_or(|m| e.method.as_str() == m)
            && self.to.as_deref().is_none_or(|t| &*e.dst.0 == t)
    }
}

/// Percent-decoding of a query value (`+` is a space, as in forms).
fn decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len()
                && b[i + 1].is_ascii_hexdigit()
                && b[i + 2].is_ascii_hexdigit() =>
            {
                let hex = |c: u8| (c as char).to_digit(16).unwrap_or(0) as u8;
                out.push((hex(b[i + 1]) << 4) | hex(b[i + 2]));
                i += 3;
                continue;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// Why a `/tap` request is refused, or None to tap.
pub fn refusal<B>(req: &Request<B>, remote: SocketAddr) -> Option<(StatusCode, &'static str)> {
    use crate::admin::NotLocal;
    if req.method() != Method::GET {
        return Some((StatusCode::METHOD_NOT_ALLOWED, "use GET\n"));
    }
    Some(match crate::admin::not_local(req, remote)? {
        NotLocal::Remote => (
            StatusCode::FORBIDDEN,
            "tap is allowed from loopback only (request metadata stays in the pod)\n",
        ),
        NotLocal::WebPage => (
            StatusCode::FORBIDDEN,
            "tap is not allowed from a web page (the request has an Origin header)\n",
        ),
        NotLocal::ForeignHost => (
            StatusCode::FORBIDDEN,
            "tap answers requests for an IP address or localhost only\n",
        ),
    })
}

fn plain(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    crate::admin::text(status, body).map(BodyExt::boxed_unsync)
}

/// `GET /tap`: the stream, or the reason why not.
pub(crate) fn serve<B>(
    tap: &Arc<Tap>,
    req: &Request<B>,
    remote: SocketAddr,
    stop: watch::Receiver<bool>,
) -> Response<Body> {
    if let Some((status, why)) = refusal(req, remote) {
        tracing::info!(%remote, reason = why.trim_end(), "admin /tap refused");
        return plain(status, why);
    }
    let filter = match Filter::parse(req.uri().query()) {
        Ok(f) => f,
        Err(e) => return plain(StatusCode::BAD_REQUEST, format!("{e}\n")),
    };
    let Some(sub) = tap.subscribe() else {
        return plain(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{MAX_TAPS} taps are connected already; try again when one ends\n"),
        );
    };
    tracing::info!(%remote, ?filter, "tap connected");
    let stream = Stream { sub, filter, stop };
    let frames = futures_util::stream::unfold(stream, |mut s| async move {
        let chunk = s.next_chunk().await?;
        Some((Ok::<_, Infallible>(http_body::Frame::data(chunk)), s))
    });
    let mut rsp = Response::new(StreamBody::new(frames).boxed_unsync());
    let h = rsp.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/x-ndjson"),
    );
    h.insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    h.insert(
        http::header::X_CONTENT_TYPE_OPTIONS,
        http::HeaderValue::from_static("nosniff"),
    );
    rsp
}

/// One tap's side of the ring.
pub struct Stream {
    sub: Subscription,
    filter: Filter,
    stop: watch::Receiver<bool>,
}

impl Stream {
    /// The next piece of the stream: the events ready (at least one, or a `dropped` line), an
    /// empty line after [`HEARTBEAT`] without any, or None when the proxy stops.
    pub async fn next_chunk(&mut self) -> Option<Bytes> {
        let beat = tokio::time::Instant::now() + HEARTBEAT;
        let mut out = String::new();
        loop {
            let first = tokio::select! {
                r = self.sub.rx.recv() => r,
                _ = tokio::time::sleep_until(beat) => return Some(Bytes::from_static(b"\n")),
                _ = stopped(&mut self.stop) => return None,
            };
            self.take(first, &mut out)?;
            while out.len() < CHUNK {
                match self.sub.rx.try_recv() {
                    Ok(e) => self.take(Ok(e), &mut out)?,
                    Err(broadcast::error::TryRecvError::Lagged(n)) => {
                        self.take(Err(broadcast::error::RecvError::Lagged(n)), &mut out)?
                    }
                    Err(_) => break,
                }
            }
            if !out.is_empty() {
                return Some(Bytes::from(out));
            }
        }
    }

    fn take(
        &self,
        got: Result<Arc<Event>, broadcast::error::RecvError>,
        out: &mut String,
    ) -> Option<()> {
        match got {
            Ok(e) if self.filter.matches(&e) => e.json_line(out),
            Ok(_) => {}
            Err(broadcast::error::RecvError::Lagged(n)) => {
                self.sub.tap.dropped.inc_by(n);
                let _ = writeln!(out, "{{\"dropped\":{n}}}");
            }
            Err(broadcast::error::RecvError::Closed) => return None,
        }
        Some(())
    }
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    loop {
        if *stop.borrow_and_update() {
            return;
        }
        if stop.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(path: &str, method: Method, dst: &str) -> Event {
        Event {
            time: UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            direction: Direction::inbound,
            src: Label::new("spiffe://cluster.local/ns/demo/sa/web"),
            dst: Label::new(dst),
            method,
            path: Arc::from(path),
            status: 200,
            latency: Duration::from_micros(1234),
            duration: Duration::from_micros(1500),
            authz: Some((true, Label::new("demo/api-from-web"))),
            route: Label::new(""),
        }
    }

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_millis(1_700_000_000_123)),
            "2023-11-14T22:13:20.123Z"
        );
        // A leap day.
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400 + 86_399)),
            "2000-02-29T23:59:59.000Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(4_102_444_800)),
            "2100-01-01T00:00:00.000Z"
        );
    }

    #[test]
    fn an_event_is_one_json_line() {
        let mut out = String::new();
        event(
            "/hello",
            Method::GET,
            "spiffe://cluster.local/ns/demo/sa/api",
        )
        .json_line(&mut out);
        assert!(
            out.ends_with('\n') && out.matches('\n').count() == 1,
            "{out}"
        );
        assert!(out.starts_with("{\"time\":"), "the documented order: {out}");
        let v: serde_json::Value = serde_json::from_str(&out).expect("json");
        assert_eq!(v["time"], "2023-11-14T22:13:20.123Z");
        assert_eq!(v["direction"], "inbound");
        assert_eq!(v["srcIdentity"], "spiffe://cluster.local/ns/demo/sa/web");
        assert_eq!(v["dstIdentity"], "spiffe://cluster.local/ns/demo/sa/api");
        assert_eq!(v["method"], "GET");
        assert_eq!(v["path"], "/hello");
        assert_eq!(v["status"], 200);
        assert_eq!(v["latencyMs"], 1.234);
        assert_eq!(v["durationMs"], 1.5);
        assert_eq!(v["authz"], "allow");
        assert_eq!(v["policy"], "demo/api-from-web");
        assert_eq!(v["route"], serde_json::Value::Null);
        let mut e = event("/", Method::POST, "x");
        e.authz = None;
        e.status = 0;
        e.route = Label::new("demo/r/0");
        let mut out = String::new();
        e.json_line(&mut out);
        let v: serde_json::Value = serde_json::from_str(&out).expect("json");
        assert_eq!(v["authz"], serde_json::Value::Null);
        assert_eq!(v["status"], serde_json::Value::Null);
        assert_eq!(v["route"], "demo/r/0");
    }

    #[test]
    fn the_path_has_no_query_and_a_bound() {
        let req = Request::get("/pay?card=4111111111111111&token=secret")
            .body(())
            .expect("request");
        let s = Start::new(&req);
        assert_eq!(&*s.path, "/pay");
        let long = format!("/{}", "é".repeat(MAX_PATH));
        let req = Request::get(long.as_str()).body(()).expect("request");
        let s = Start::new(&req);
        assert!(s.path.len() <= MAX_PATH && long.starts_with(&*s.path));
    }

    #[test]
    fn filters_come_from_the_query() {
        assert_eq!(Filter::parse(None), Ok(Filter::default()));
        let f = Filter::parse(Some(
            "path=%2Fcall%20me&method=GET&to=spiffe%3A%2F%2Fcluster.local%2Fns%2Fdemo%2Fsa%2Fapi",
        ))
        .expect("filter");
        assert_eq!(f.path.as_deref(), Some("/call me"));
        assert_eq!(f.method.as_deref(), Some("GET"));
        assert_eq!(
            f.to.as_deref(),
            Some("spiffe://cluster.local/ns/demo/sa/api")
        );
        assert!(Filter::parse(Some("pth=/x")).is_err(), "a typo is an error");
        assert_eq!(decode("100%").as_deref(), Some("100%"));
        assert_eq!(decode("a%2").as_deref(), Some("a%2"));
        assert_eq!(decode("%zz").as_deref(), Some("%zz"));
        assert_eq!(decode("%+1").as_deref(), Some("% 1"));

        let api = "spiffe://cluster.local/ns/demo/sa/api";
        let e = event("/call/api", Method::GET, api);
        assert!(Filter::default().matches(&e));
        assert!(Filter::parse(Some("path=/call")).expect("f").matches(&e));
        assert!(!Filter::parse(Some("path=/other")).expect("f").matches(&e));
        assert!(!Filter::parse(Some("method=POST")).expect("f").matches(&e));
        assert!(
            Filter::parse(Some(&format!("to={api}")))
                .expect("f")
                .matches(&e)
        );
        assert!(
            !Filter::parse(Some("to=spiffe://x/y"))
                .expect("f")
                .matches(&e)
        );
    }

    #[test]
    fn tap_needs_get_loopback_and_no_origin() {
        let lo: SocketAddr = "127.0.0.1:40000".parse().expect("addr");
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:40000".parse().expect("addr");
        let v6: SocketAddr = "[::1]:40000".parse().expect("addr");
        let remote: SocketAddr = "10.0.0.7:40000".parse().expect("addr");
        let get = Request::get("/tap").body(()).expect("request");
        assert_eq!(refusal(&get, lo), None);
        assert_eq!(refusal(&get, mapped), None, "dual-stack loopback");
        assert_eq!(refusal(&get, v6), None);
        assert_eq!(
            refusal(&get, remote).map(|r| r.0),
            Some(StatusCode::FORBIDDEN)
        );
        let page = Request::get("/tap")
            .header("origin", "http://evil.example")
            .body(())
            .expect("request");
        assert_eq!(refusal(&page, lo).map(|r| r.0), Some(StatusCode::FORBIDDEN));
        for (host, ok) in [
            ("127.0.0.1:4191", true),
            ("[::1]:4191", true),
            ("localhost:4191", true),
            ("LOCALHOST", true),
            ("evil.example:4191", false),
            ("localhost.evil.example", false),
            ("127.0.0.1:x", false),
        ] {
            let req = Request::get("/tap")
                .header("host", host)
                .body(())
                .expect("request");
            assert_eq!(refusal(&req, lo).is_none(), ok, "Host: {host}");
        }
        let post = Request::post("/tap").body(()).expect("request");
        assert_eq!(
            refusal(&post, lo).map(|r| r.0),
            Some(StatusCode::METHOD_NOT_ALLOWED)
        );
    }

    #[tokio::test]
    async fn nobody_tapping_costs_a_load_and_taps_are_bounded() {
        let tap = Arc::new(Tap::default());
        assert!(!tap.active());
        // Nobody taps: publishing is a no-op (no channel even exists).
        tap.publish(event("/", Method::GET, "x"));
        assert!(tap.tx.get().is_none());
        let subs: Vec<_> = (0..MAX_TAPS)
            .map(|_| tap.subscribe().expect("a slot"))
            .collect();
        assert!(tap.active());
        assert_eq!(tap.clients.get(), MAX_TAPS as i64);
        assert!(tap.subscribe().is_none(), "one tap too many");
        drop(subs);
        assert!(!tap.active());
        assert_eq!(tap.clients.get(), 0);
        assert!(tap.subscribe().is_some(), "slots come back");
    }

    #[tokio::test]
    async fn a_slow_tap_loses_events_and_is_told() {
        let tap = Arc::new(Tap::default());
        let (_stop_tx, stop) = watch::channel(false);
        let mut s = Stream {
            sub: tap.subscribe().expect("a slot"),
            filter: Filter::default(),
            stop,
        };
        let extra = 76;
        for i in 0..CAPACITY + extra {
            tap.publish(event(&format!("/{i}"), Method::GET, "x"));
        }
        let mut text = String::new();
        while text.lines().count() < CAPACITY + 1 {
            let chunk = s.next_chunk().await.expect("a chunk");
            text.push_str(std::str::from_utf8(&chunk).expect("utf-8"));
        }
        let mut lines = text.lines();
        assert_eq!(
            lines.next(),
            Some(format!("{{\"dropped\":{extra}}}").as_str())
        );
        let first: serde_json::Value =
            serde_json::from_str(lines.next().expect("an event")).expect("json");
        assert_eq!(first["path"], format!("/{extra}"), "the oldest are lost");
        assert_eq!(tap.dropped(), extra as u64);
        assert_eq!(lines.count(), CAPACITY - 1);
    }

    #[tokio::test(start_paused = true)]
    async fn filters_apply_heartbeats_flow_and_stop_ends_the_stream() {
        let tap = Arc::new(Tap::default());
        let (stop_tx, stop) = watch::channel(false);
        let mut s = Stream {
            sub: tap.subscribe().expect("a slot"),
            filter: Filter::parse(Some("method=POST")).expect("filter"),
            stop,
        };
        tap.publish(event("/a", Method::GET, "x"));
        tap.publish(event("/b", Method::POST, "x"));
        let chunk = s.next_chunk().await.expect("a chunk");
        let text = std::str::from_utf8(&chunk).expect("utf-8");
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.contains("\"/b\""), "{text}");
        // Nothing (or only filtered-out events) for a while: a heartbeat.
        tap.publish(event("/c", Method::GET, "x"));
        assert_eq!(s.next_chunk().await.as_deref(), Some(&b"\n"[..]));
        stop_tx.send_replace(true);
        assert_eq!(s.next_chunk().await, None);
    }
}
