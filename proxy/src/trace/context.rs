//! W3C Trace Context propagation (`traceparent`, `tracestate`): every request leaves each proxy
//! with a `traceparent` whose trace id is the caller's (or a new one when the request came
//! without), and whose parent id is this proxy's own span for the request, so the app and the
//! next hop continue one trace. B3 (`b3`, `x-b3-*`, Zipkin's and Istio's older headers) is
//! accepted when no valid `traceparent` came. A caller's `tracestate` passes through untouched;
//! a trace this proxy starts with a sampling ratio below 1 gets `tracestate: ot=th:…`, the
//! OpenTelemetry consistent-probability threshold it was sampled with.

use std::task::{Context, Poll};

use http::{HeaderMap, HeaderValue, Request};

use super::Sampler;

const TRACEPARENT: &str = "traceparent";

/// A trace id, the caller's span and its sampled flag, as read from the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Parent {
    trace_id: [u8; 16],
    span_id: [u8; 8],
    sampled: bool,
}

/// The ids of this proxy's span for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceIds {
    pub trace_id: [u8; 16],
    /// This proxy's span: the parent id the app or the next hop receives.
    pub span_id: [u8; 8],
    /// The caller's span, when the request came with a trace.
    pub parent_span_id: Option<[u8; 8]>,
    /// The head decision: the caller's flag, or this proxy's sampler for a new trace.
    pub sampled: bool,
}

fn hex_nibble(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    }
}

/// Lower-case hex of exactly `out.len() * 2` characters.
fn unhex(s: &[u8], out: &mut [u8]) -> Option<()> {
    if s.len() != out.len() * 2 {
        return None;
    }
    for (i, o) in out.iter_mut().enumerate() {
        *o = hex_nibble(s[2 * i])? << 4 | hex_nibble(s[2 * i + 1])?;
    }
    Some(())
}

/// `00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`; all-zero ids are invalid. A
/// version above 00 is read by its 00 prefix, as the spec says.
fn parse_traceparent(v: &[u8]) -> Option<Parent> {
    if v.len() < 55 || (v.len() > 55 && v[55] != b'-') {
        return None;
    }
    let version = &v[0..2];
    if version == b"ff" || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let mut ver = [0u8; 1];
    unhex(version, &mut ver)?;
    if ver[0] == 0 && v.len() != 55 {
        return None;
    }
    let mut trace_id = [0u8; 16];
    unhex(&v[3..35], &mut trace_id)?;
    let mut parent = [0u8; 8];
    unhex(&v[36..52], &mut parent)?;
    let mut flags = [0u8; 1];
    unhex(&v[53..55], &mut flags)?;
    if trace_id == [0; 16] || parent == [0; 8] {
        return None;
    }
    Some(Parent {
        trace_id,
        span_id: parent,
        sampled: flags[0] & 1 == 1,
    })
}

/// A B3 trace id: 16 or 32 hex characters (a 64-bit id is the low half of a W3C trace id).
fn b3_trace_id(s: &[u8]) -> Option<[u8; 16]> {
    let mut id = [0u8; 16];
    match s.len() {
        32 => unhex(s, &mut id)?,
        16 => unhex(s, &mut id[8..])?,
        _ => return None,
    }
    (id != [0; 16]).then_some(id)
}

/// `b3: {traceid}-{spanid}[-{sampled}[-{parentspanid}]]`, or the multi-header form.
fn parse_b3(h: &HeaderMap) -> Option<Parent> {
    if let Some(v) = h.get("b3") {
        let mut parts = v.as_bytes().split(|b| *b == b'-');
        let trace_id = b3_trace_id(parts.next()?)?;
        let mut span_id = [0u8; 8];
        unhex(parts.next()?, &mut span_id)?;
        let sampled = !matches!(parts.next(), Some(b"0"));
        return Some(Parent {
            trace_id,
            span_id,
            sampled,
        });
    }
    let trace_id = b3_trace_id(h.get("x-b3-traceid")?.as_bytes())?;
    let mut span_id = [0u8; 8];
    unhex(h.get("x-b3-spanid")?.as_bytes(), &mut span_id)?;
    let sampled = !matches!(
        h.get("x-b3-sampled").map(HeaderValue::as_bytes),
        Some(b"0" | b"false")
    );
    Some(Parent {
        trace_id,
        span_id,
        sampled,
    })
}

/// Lower-case hex of an id, for logs.
pub fn hex(id: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(id.len() * 2);
    for b in id {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 15)]));
    }
    out
}

pub(crate) fn random_nonzero<const N: usize>() -> [u8; N] {
    loop {
        let id: [u8; N] = rand::random();
        if id != [0; N] {
            return id;
        }
    }
}

/// The `traceparent` this proxy sends on: the trace it continues (or starts) with its own span.
fn next_traceparent(ids: &TraceIds) -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let (p, span) = (ids, ids.span_id);
    let mut out = [0u8; 55];
    out[..3].copy_from_slice(b"00-");
    for (i, b) in p.trace_id.iter().enumerate() {
        out[3 + 2 * i] = HEX[usize::from(b >> 4)];
        out[4 + 2 * i] = HEX[usize::from(b & 15)];
    }
    out[35] = b'-';
    for (i, b) in span.iter().enumerate() {
        out[36 + 2 * i] = HEX[usize::from(b >> 4)];
        out[37 + 2 * i] = HEX[usize::from(b & 15)];
    }
    out[52] = b'-';
    out[53] = b'0';
    out[54] = if p.sampled { b'1' } else { b'0' };
    // Only hex digits and dashes: always a valid header value. Marked sensitive so HTTP/2's
    // HPACK sends it as a literal never indexed: a value that differs on every request would
    // otherwise be inserted into the connection's dynamic table each time, evicting the
    // headers that do repeat.
    let mut v = HeaderValue::from_bytes(&out).unwrap_or_else(|_| HeaderValue::from_static(""));
    v.set_sensitive(true);
    v
}

/// Gives the request this proxy's `traceparent` (see the module docs) and returns the ids of
/// this proxy's span, with the head sampling decision of `sampler`.
pub fn propagate(h: &mut HeaderMap, sampler: &Sampler) -> TraceIds {
    let parent = h
        .get(TRACEPARENT)
        .and_then(|v| parse_traceparent(v.as_bytes()))
        .or_else(|| parse_b3(h));
    let ids = match parent {
        Some(p) => TraceIds {
            trace_id: p.trace_id,
            span_id: random_nonzero(),
            parent_span_id: Some(p.span_id),
            sampled: sampler.continues(p.trace_id, p.sampled),
        },
        None => {
            // A malformed traceparent starts a new trace, and so does its tracestate.
            h.remove(TRACESTATE);
            let trace_id = random_nonzero();
            let sampled = sampler.samples(trace_id);
            if let (true, Some(th)) = (sampled, sampler.tracestate()) {
                h.insert(TRACESTATE, th.clone());
            }
            TraceIds {
                trace_id,
                span_id: random_nonzero(),
                parent_span_id: None,
                sampled,
            }
        }
    };
    h.insert(TRACEPARENT, next_traceparent(&ids));
    ids
}

const TRACESTATE: &str = "tracestate";

/// The stage that calls [`propagate`] on every request, for stacks that keep no span (tests).
#[derive(Clone, Default)]
pub struct TraceContextLayer(pub Sampler);

impl<S> tower::Layer<S> for TraceContextLayer {
    type Service = TraceContext<S>;
    fn layer(&self, inner: S) -> TraceContext<S> {
        TraceContext {
            inner,
            sampler: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct TraceContext<S> {
    inner: S,
    sampler: Sampler,
}

impl<S, B> tower::Service<Request<B>> for TraceContext<S>
where
    S: tower::Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> S::Future {
        propagate(req.headers_mut(), &self.sampler);
        self.inner.call(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn after(headers: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        propagate(&mut h, &Sampler::default());
        h
    }

    fn parts(h: &HeaderMap) -> Vec<String> {
        h[TRACEPARENT]
            .to_str()
            .unwrap()
            .split('-')
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn a_valid_traceparent_keeps_its_trace_and_gets_this_proxys_span() {
        let h = after(&[(TRACEPARENT, TP), ("tracestate", "vendor=x")]);
        let p = parts(&h);
        assert_eq!(p[0], "00");
        assert_eq!(p[1], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_ne!(p[2], "00f067aa0ba902b7");
        assert_eq!(p[2].len(), 16);
        assert_eq!(p[3], "01");
        assert_eq!(h["tracestate"], "vendor=x");
        // Not sampled stays not sampled.
        let h = after(&[(TRACEPARENT, &TP.replace("-01", "-00"))]);
        assert_eq!(parts(&h)[3], "00");
    }

    #[test]
    fn a_missing_or_malformed_traceparent_starts_a_trace() {
        for bad in [
            "",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
            "é-garbage",
        ] {
            let h = after(&[(TRACEPARENT, bad), ("tracestate", "vendor=x")]);
            let p = parts(&h);
            assert_ne!(p[1], "4bf92f3577b34da6a3ce929d0e0e4736", "{bad:?}");
            assert_eq!((p[1].len(), p[2].len(), p[3].as_str()), (32, 16, "01"));
            assert!(h.get("tracestate").is_none(), "{bad:?}");
        }
        let fresh = after(&[]);
        assert_eq!(parts(&fresh).len(), 4);
        // A later version is read by its 00 prefix.
        let h = after(&[(TRACEPARENT, &format!("01{}-more", &TP[2..]))]);
        assert_eq!(parts(&h)[1], "4bf92f3577b34da6a3ce929d0e0e4736");
    }

    #[test]
    fn b3_continues_its_trace_when_no_traceparent_came() {
        let h = after(&[("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1")]);
        assert_eq!(parts(&h)[1], "80f198ee56343ba864fe8b2a57d3eff7");
        let h = after(&[
            ("x-b3-traceid", "64fe8b2a57d3eff7"),
            ("x-b3-spanid", "e457b5a2e4d86bd1"),
            ("x-b3-sampled", "0"),
        ]);
        let p = parts(&h);
        assert_eq!(p[1], "000000000000000064fe8b2a57d3eff7");
        assert_eq!(p[3], "00");
        // A valid traceparent wins over B3.
        let h = after(&[
            (TRACEPARENT, TP),
            ("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1"),
        ]);
        assert_eq!(parts(&h)[1], "4bf92f3577b34da6a3ce929d0e0e4736");
    }
}
