//! The admin port's `GET /config`: what this proxy holds right now, as JSON, for
//! `palisade describe` (docs/observe.md, "describe").
//!
//! Its identity and the certificate it serves (subject, issuer, validity, serial, and whether
//! the chain verifies against the trust bundle it holds), the version and digest of its config,
//! the inbound side it enforces (mTLS modes, default policy, the authorization policies by
//! `namespace/name` and action, the routes it labels requests with) and the outbound services
//! it calls, with their endpoints and the balancer's view of each.
//!
//! Redacted by construction: it is built field by field from what is held, and no field reads
//! a private key, a token or a request. Still, it tells whoever reads it the mesh's topology
//! and policy, so it answers loopback callers only, refuses a request that carries `Origin`
//! (a web page's `fetch`), and refuses a `Host` that is a name other than `localhost` (a page
//! of a rebound DNS name, whose own origin would send no `Origin` on a GET).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use serde_json::{Value, json};

use crate::Ctx;
use crate::balance::{HasLoad, Strategy};

/// Answers `GET /config`.
pub(crate) fn handle<B>(ctx: &Ctx, req: &Request<B>, remote: SocketAddr) -> Response<Full<Bytes>> {
    if let Some((status, why)) = refusal(req, remote) {
        tracing::debug!(%remote, reason = why.trim_end(), "admin /config refused");
        return crate::admin::text(status, why);
    }
    let mut rsp = crate::admin::text(StatusCode::OK, held(ctx).to_string());
    let headers = rsp.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    headers.insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    rsp
}

/// Why a `/config` request is refused, or None to answer it.
fn refusal<B>(req: &Request<B>, remote: SocketAddr) -> Option<(StatusCode, &'static str)> {
    use crate::admin::NotLocal;
    Some(match crate::admin::not_local(req, remote)? {
        NotLocal::Remote => (
            StatusCode::FORBIDDEN,
            "/config is answered to loopback callers only\n",
        ),
        NotLocal::WebPage => (
            StatusCode::FORBIDDEN,
            "/config is not answered to a web page (the request has an Origin header)\n",
        ),
        NotLocal::ForeignHost => (
            StatusCode::FORBIDDEN,
            "/config is answered to requests for an IP address or localhost only\n",
        ),
    })
}

/// What the proxy holds now.
pub(crate) fn held(ctx: &Ctx) -> Value {
    let snap = ctx.snapshot.load();
    let inbound = &snap.inbound;
    let port = ctx.workload_port(ctx.cfg.inbound_addr.port());
    let mut port_modes: Vec<_> = inbound.port_modes.iter().collect();
    port_modes.sort_by_key(|(p, _)| **p);
    let policies: Vec<Value> = inbound
        .authz
        .policies()
        .map(|(name, action)| json!({ "name": name, "action": action }))
        .collect();
    json!({
        "workload": ctx.cfg.workload,
        "identity": ctx.store.id().as_str(),
        "ready": ctx.store.is_ready() && ctx.config_ready(),
        "certificate": certificate(ctx),
        "configVersion": snap.version,
        "configDigest": ctx.config_digest.load(Ordering::Relaxed),
        "configReceived": ctx.config_ready(),
        "inbound": {
            "workloadPort": port,
            "mode": inbound.mode.as_str(),
            "effectiveMode": inbound.mode_for(port).as_str(),
            "portModes": port_modes
                .iter()
                .map(|(p, m)| (p.to_string(), Value::from(m.as_str())))
                .collect::<serde_json::Map<_, _>>(),
            "defaultPolicy": inbound.authz.default_policy().as_str(),
            "authorizationPolicies": policies,
            "appProtocol": inbound.app_protocol.as_str(),
            "pathNormalization": inbound.path_normalization.as_str(),
            "rateLimitPolicy": inbound.rate_limit.as_ref().map(|l| l.name.0.to_string()),
            "egressPolicy": inbound.egress.as_ref().map(|e| e.name().to_string()),
            "routes": routes(&inbound.routes),
        },
        "balancer": match ctx.cfg.balancer {
            Strategy::PeakEwma => "peak-ewma",
            Strategy::RoundRobin => "round-robin",
        },
        "outbound": outbound(ctx, &snap),
        "upstreamListeners": ctx
            .cfg
            .upstreams
            .iter()
            .map(|u| json!({ "service": u.service, "listen": u.listen.to_string() }))
            .collect::<Vec<_>>(),
    })
}

/// The certificate served, without its key; null before the first one.
fn certificate(ctx: &Ctx) -> Value {
    let Some(creds) = ctx.store.current() else {
        return Value::Null;
    };
    let svid = &creds.svid;
    let info = palisade_certs::verify::inspect(svid.leaf()).ok();
    let bundle = ctx.store.bundle().load();
    let verified = palisade_certs::verify_svid(
        &svid.chain,
        &bundle,
        Some(&ctx.store.id().trust_domain()),
        rustls_pki_types::UnixTime::now(),
    );
    json!({
        "spiffeId": svid.id.as_str(),
        "subject": info.as_ref().map(|i| i.subject.clone()),
        "issuer": info.as_ref().map(|i| i.issuer.clone()),
        "serial": info.as_ref().map(|i| i.serial.clone()),
        "notBefore": svid.not_before,
        "notAfter": svid.not_after,
        "chainLength": svid.chain.len(),
        "verified": verified.is_ok(),
        "verifyError": verified.err().map(|e| e.to_string()),
    })
}

/// Routes by `namespace/name`, with their rules' `route` labels.
fn routes(routes: &crate::routing::Routes) -> Vec<Value> {
    routes
        .source()
        .iter()
        .map(|r| {
            let name = format!("{}/{}", r.namespace, r.name);
            json!({
                "name": name,
                "kind": if r.grpc { "GRPCRoute" } else { "HTTPRoute" },
                "hostnames": r.hostnames,
                "rules": r
                    .rules
                    .iter()
                    .map(|rule| format!("{name}/{}", rule.name))
                    .collect::<Vec<_>>(),
            })
        })
        .collect()
}

/// The services the proxy can call, by key, each endpoint with the balancer's state of it.
fn outbound(ctx: &Ctx, snap: &crate::Snapshot) -> Vec<Value> {
    let table = ctx.outbound.load();
    let now = Instant::now();
    let mut keys: Vec<&String> = snap.services.keys().collect();
    keys.sort();
    keys.into_iter()
        .map(|key| {
            let svc = &snap.services[key];
            let live = table.get(key);
            let endpoints: Vec<Value> = svc
                .endpoints
                .iter()
                .map(|e| {
                    let state = live.and_then(|s| {
                        s.balancer
                            .endpoints()
                            .iter()
                            .find(|x| x.cfg.addr == e.addr && x.cfg.identity == e.identity)
                    });
                    json!({
                        "addr": e.addr.to_string(),
                        "workload": e.workload,
                        "identity": e.identity.as_str(),
                        "weight": e.weight,
                        // null: not in the balancer (its TLS config could not be built).
                        "ejected": state.map(|s| s.load().is_ejected()),
                        "failing": state.map(|s| s.load().is_suspect()),
                        "idleMs": state.map(|s| {
                            u64::try_from(s.load().idle_for(now).as_millis()).unwrap_or(u64::MAX)
                        }),
                    })
                })
                .collect();
            json!({
                "service": key,
                "protocol": svc.protocol.as_str(),
                "timeoutMs": svc.timeout.map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
                "routes": routes(&svc.routes),
                "endpoints": endpoints,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::get("/config");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).expect("request")
    }

    #[test]
    fn config_answers_loopback_without_origin_for_a_local_host_only() {
        let lo: SocketAddr = "127.0.0.1:40000".parse().expect("addr");
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:40000".parse().expect("addr");
        let v6: SocketAddr = "[::1]:40000".parse().expect("addr");
        let remote: SocketAddr = "10.0.0.7:40000".parse().expect("addr");
        let ok = get(&[("host", "127.0.0.1:4191")]);
        assert_eq!(refusal(&ok, lo), None);
        assert_eq!(refusal(&ok, mapped), None, "dual-stack loopback");
        assert_eq!(refusal(&ok, v6), None);
        assert_eq!(refusal(&get(&[]), lo), None, "no Host (HTTP/1.0)");
        assert_eq!(
            refusal(&ok, remote).map(|r| r.0),
            Some(StatusCode::FORBIDDEN)
        );
        let page = get(&[
            ("host", "127.0.0.1:4191"),
            ("origin", "http://evil.example"),
        ]);
        assert_eq!(refusal(&page, lo).map(|r| r.0), Some(StatusCode::FORBIDDEN));
        let null_origin = get(&[("origin", "null")]);
        assert_eq!(
            refusal(&null_origin, lo).map(|r| r.0),
            Some(StatusCode::FORBIDDEN)
        );
        let rebound = get(&[("host", "evil.example:4191")]);
        assert_eq!(
            refusal(&rebound, lo).map(|r| r.0),
            Some(StatusCode::FORBIDDEN)
        );
    }

    #[test]
    fn local_hosts_are_ip_addresses_and_localhost() {
        for h in [
            "127.0.0.1",
            "127.0.0.1:4191",
            "localhost",
            "LOCALHOST:80",
            "[::1]",
            "[::1]:4191",
            "10.1.2.3:4191",
            "::1",
        ] {
            assert!(crate::admin::local_host(h.as_bytes()), "{h}");
        }
        for h in [
            "evil.example",
            "evil.example:4191",
            "localhost.evil.example",
            "127.0.0.1:99999",
            "127.0.0.1:x",
            "[::1",
            "[evil]:80",
            "[::1]x",
            "",
        ] {
            assert!(!crate::admin::local_host(h.as_bytes()), "{h}");
        }
    }
}
