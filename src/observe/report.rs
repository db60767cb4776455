//! A [`Window`] turned into rows: traffic per workload or per route (`palisade stat`) and per
//! edge, caller → callee (`palisade edges`), with their JSON.
//!
//! Every request is counted once, where the callee's proxy saw it: its inbound side
//! (`palisade_requests_total{direction="inbound"}`), whose `src_identity` is the caller's
//! SPIFFE ID, or `unknown` for a plaintext caller. Only a request to a callee whose proxy was
//! not read (outside the mesh, or not answering) is counted from the caller's outbound side.
//! docs/observe.md has the definitions of every figure.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::UNKNOWN;
use super::histogram::Histogram;
use super::mesh::MeshView;
use super::snapshot::{Counters, Series, Window};

/// What `stat` has a row for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum By {
    /// One row per workload of the mesh.
    Workload,
    /// One row per route rule (`namespace/name/rule`) the callees' proxies matched.
    Route,
}

/// Requests of some kind over a window, added up.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Traffic {
    pub requests: f64,
    /// Answered without a 5xx.
    pub ok: f64,
    /// Over mTLS: the peer's identity is known.
    pub secured: f64,
    /// Answered 403.
    pub forbidden: f64,
    /// The latency histogram of these requests.
    pub latency: Histogram,
    /// Requests per second; None when a proxy's window is unknown.
    pub rps: Option<f64>,
}

/// Whether a status is a success: any response but a 5xx (0 is no response at all).
pub fn success(status: u16) -> bool {
    (1..500).contains(&status)
}

impl Traffic {
    /// The requests of one proxy's `counters` whose series `keep` selects; `secured` says
    /// which of them came (inbound) or went (outbound) over mTLS.
    pub fn of(
        counters: &Counters,
        seconds: Option<f64>,
        keep: impl Fn(&Series) -> bool,
        secured: impl Fn(&Series) -> bool,
    ) -> Traffic {
        let mut t = Traffic::default();
        for (s, n) in counters.requests.iter().filter(|(s, _)| keep(s)) {
            t.requests += n;
            if success(s.status) {
                t.ok += n;
            }
            if secured(s) {
                t.secured += n;
            }
            if s.status == 403 {
                t.forbidden += n;
            }
        }
        for (_, h) in counters.latency.iter().filter(|(s, _)| keep(s)) {
            t.latency.add(h);
        }
        t.rps = match seconds {
            Some(s) if s > 0.0 => Some(t.requests / s),
            _ if t.requests == 0.0 => Some(0.0),
            _ => None,
        };
        t
    }

    /// Adds another part (another proxy's) to this one.
    pub fn merge(&mut self, o: &Traffic) {
        self.requests += o.requests;
        self.ok += o.ok;
        self.secured += o.secured;
        self.forbidden += o.forbidden;
        self.latency.add(&o.latency);
        self.rps = self.rps.zip(o.rps).map(|(a, b)| a + b);
    }

    fn share(&self, n: f64) -> Option<f64> {
        (self.requests > 0.0).then(|| n / self.requests)
    }

    /// The share of requests answered without a 5xx; None without requests.
    pub fn success_rate(&self) -> Option<f64> {
        self.share(self.ok)
    }

    /// The share of requests over mTLS; None without requests.
    pub fn mtls_share(&self) -> Option<f64> {
        self.share(self.secured)
    }

    /// A latency quantile in milliseconds; None without observations.
    pub fn latency_ms(&self, q: f64) -> Option<f64> {
        self.latency.quantile(q).map(|s| s * 1000.0)
    }

    fn latency_json(&self) -> Value {
        json!({
            "p50": self.latency_ms(0.5),
            "p95": self.latency_ms(0.95),
            "p99": self.latency_ms(0.99),
        })
    }
}

/// How many of `forbidden` 403 answers of one callee's proxy were its own denials, when all
/// its inbound 403s were `all_forbidden` and its authorization denied `denials` requests:
/// every 403 when it denied at least as many; else (its app answered 403s itself) at most
/// `denials` — an upper bound (docs/observe.md).
fn denied_share(forbidden: f64, all_forbidden: f64, denials: f64) -> f64 {
    if all_forbidden <= denials {
        forbidden
    } else {
        forbidden.min(denials)
    }
}

/// One row of `stat`: a workload, or a route.
#[derive(Clone, Debug, PartialEq)]
pub struct StatRow {
    /// The workload's name, or the route (`namespace/name/rule`).
    pub name: String,
    /// The requests it received (at its proxy's inbound side).
    pub traffic: Traffic,
    /// Requests (and TCP connections) its proxy's authorization denied.
    pub denied: f64,
    /// Requests (and TCP connections) its proxy's authorization allowed (per workload only).
    pub allowed: Option<f64>,
    /// For a route: the workloads whose proxies matched it.
    pub workloads: Vec<String>,
}

impl StatRow {
    /// The row's JSON, with `key` (`name` or `route`) naming it.
    pub fn json(&self, by: By) -> Value {
        let t = &self.traffic;
        let mut v = json!({
            "requests": t.requests.round() as u64,
            "rps": t.rps,
            "successRate": t.success_rate(),
            "latencyMs": t.latency_json(),
            "mtlsShare": t.mtls_share(),
            "denied": self.denied.round() as u64,
        });
        match by {
            By::Workload => {
                v["name"] = json!(self.name);
                v["allowed"] = json!(self.allowed.map(|a| a.round() as u64));
            }
            By::Route => {
                v["route"] = json!(self.name);
                v["workloads"] = json!(self.workloads);
            }
        }
        v
    }
}

/// The rows of `stat` over `window`: every workload of the mesh whose proxy was read (or only
/// `only`), or every route their inbound sides matched.
pub fn stat(mesh: &MeshView, window: &Window, by: By, only: Option<&str>) -> Vec<StatRow> {
    let selected = |name: &str| only.is_none_or(|o| o == name);
    match by {
        By::Workload => mesh
            .workloads
            .iter()
            .filter(|w| selected(&w.name))
            .filter_map(|w| {
                let p = window.proxies.get(&w.name)?;
                let c = &p.counters;
                Some(StatRow {
                    name: w.name.clone(),
                    traffic: Traffic::of(c, p.seconds, Series::inbound, |s| s.src != UNKNOWN),
                    denied: c.decisions("deny"),
                    allowed: Some(c.decisions("allow")),
                    workloads: vec![],
                })
            })
            .collect(),
        By::Route => {
            let mut rows: BTreeMap<String, StatRow> = BTreeMap::new();
            for w in mesh.workloads.iter().filter(|w| selected(&w.name)) {
                let Some(p) = window.proxies.get(&w.name) else {
                    continue;
                };
                let c = &p.counters;
                let all_forbidden = Traffic::of(c, p.seconds, Series::inbound, |_| false).forbidden;
                let denials = c.decisions("deny");
                let routes: std::collections::BTreeSet<&str> = c
                    .requests
                    .keys()
                    .filter(|s| s.inbound() && !s.route.is_empty())
                    .map(|s| s.route.as_str())
                    .collect();
                for route in routes {
                    let t = Traffic::of(
                        c,
                        p.seconds,
                        |s| s.inbound() && s.route == route,
                        |s| s.src != UNKNOWN,
                    );
                    let row = rows.entry(route.to_string()).or_insert_with(|| StatRow {
                        name: route.to_string(),
                        traffic: Traffic {
                            rps: Some(0.0),
                            ..Traffic::default()
                        },
                        denied: 0.0,
                        allowed: None,
                        workloads: vec![],
                    });
                    row.denied += denied_share(t.forbidden, all_forbidden, denials);
                    row.traffic.merge(&t);
                    row.workloads.push(w.name.clone());
                }
            }
            rows.into_values().collect()
        }
    }
}

/// Where an edge's requests were counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum CountedAt {
    /// The callee's proxy, inbound: every edge to a workload whose proxy was read.
    Inbound,
    /// The caller's proxy, outbound: the callee's proxy was not read (outside the mesh, or
    /// not answering).
    Outbound,
}

impl CountedAt {
    pub fn as_str(self) -> &'static str {
        match self {
            CountedAt::Inbound => "inbound",
            CountedAt::Outbound => "outbound",
        }
    }
}

/// Caller → callee, over a window.
#[derive(Clone, Debug, PartialEq)]
pub struct EdgeRow {
    /// The caller's workload name (names, comma-separated, when several share its identity;
    /// the identity when no workload of the mesh has it; `unknown` for plaintext).
    pub src: String,
    /// The callee's workload name (same rules).
    pub dst: String,
    pub src_identity: String,
    pub dst_identity: String,
    /// The requests came over mTLS (the caller's identity is known).
    pub secured: bool,
    pub traffic: Traffic,
    /// Requests of this edge the callee's authorization denied (403s; docs/observe.md).
    pub denied: f64,
    pub counted_at: CountedAt,
}

impl EdgeRow {
    pub fn json(&self) -> Value {
        let t = &self.traffic;
        json!({
            "src": self.src,
            "dst": self.dst,
            "srcIdentity": self.src_identity,
            "dstIdentity": self.dst_identity,
            "secured": self.secured,
            "requests": t.requests.round() as u64,
            "rps": t.rps,
            "successRate": t.success_rate(),
            "latencyMs": t.latency_json(),
            "denied": self.denied.round() as u64,
            "countedAt": self.counted_at.as_str(),
        })
    }
}

/// Every edge the proxies counted over `window`: from each read proxy's inbound side by
/// caller, and from each read proxy's outbound side by callee for callees whose proxy was not
/// read. Edges of a series that did not grow are kept, with 0 requests: the proxies know of
/// them, they were quiet in the window.
pub fn edges(mesh: &MeshView, window: &Window) -> Vec<EdgeRow> {
    let mut out = Vec::new();
    let read_identity = |id: &str| {
        mesh.workloads_of(id)
            .iter()
            .any(|n| window.proxies.contains_key(*n))
    };
    for (name, p) in &window.proxies {
        let c = &p.counters;
        let all_forbidden = Traffic::of(c, p.seconds, Series::inbound, |_| false).forbidden;
        let denials = c.decisions("deny");
        let callers: std::collections::BTreeSet<(&str, &str)> = c
            .requests
            .keys()
            .filter(|s| s.inbound())
            .map(|s| (s.src.as_str(), s.dst.as_str()))
            .collect();
        for (src, dst) in callers {
            let t = Traffic::of(
                c,
                p.seconds,
                |s| s.inbound() && s.src == src && s.dst == dst,
                |s| s.src != UNKNOWN,
            );
            out.push(EdgeRow {
                src: mesh.display_name(src),
                dst: name.clone(),
                src_identity: src.to_string(),
                dst_identity: dst.to_string(),
                secured: src != UNKNOWN,
                denied: denied_share(t.forbidden, all_forbidden, denials),
                traffic: t,
                counted_at: CountedAt::Inbound,
            });
        }
        let callees: std::collections::BTreeSet<(&str, &str)> = c
            .requests
            .keys()
            .filter(|s| s.outbound() && !read_identity(&s.dst))
            .map(|s| (s.src.as_str(), s.dst.as_str()))
            .collect();
        for (src, dst) in callees {
            let t = Traffic::of(
                c,
                p.seconds,
                |s| s.outbound() && s.src == src && s.dst == dst,
                |s| s.dst != UNKNOWN,
            );
            out.push(EdgeRow {
                src: name.clone(),
                dst: mesh.display_name(dst),
                src_identity: src.to_string(),
                dst_identity: dst.to_string(),
                secured: dst != UNKNOWN,
                // Not the callee's count: its 403s as the caller saw them, an upper bound.
                denied: if dst == UNKNOWN { 0.0 } else { t.forbidden },
                traffic: t,
                counted_at: CountedAt::Outbound,
            });
        }
    }
    out.sort_by(|a, b| {
        (&a.src, &a.dst, &a.src_identity, a.counted_at).cmp(&(
            &b.src,
            &b.dst,
            &b.src_identity,
            b.counted_at,
        ))
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::mesh::LocalMesh;
    use crate::observe::snapshot::{ProxyWindow, Snapshot};

    const WEB: &str = "spiffe://cluster.local/ns/demo/sa/web";
    const API: &str = "spiffe://cluster.local/ns/demo/sa/api";
    const DB: &str = "spiffe://cluster.local/ns/demo/sa/db";
    const EXT: &str = "spiffe://other.example/ns/x/sa/ext";

    fn mesh() -> LocalMesh {
        let w = |n: &str, id: &str| json!({"name": n, "spiffeId": id, "adminAddr": "127.0.0.1:1"});
        LocalMesh::from_json(
            &json!({"workloads": [w("web", WEB), w("api", API), w("db", DB)]}),
            "mesh.json".into(),
        )
        .unwrap()
    }

    /// One `palisade_requests_total` line and its latency buckets (all under 1 ms but `slow`
    /// of them, under 10 ms).
    fn req(dir: &str, src: &str, dst: &str, status: u16, route: &str, n: u64, slow: u64) -> String {
        let l = format!(
            r#"direction="{dir}",src_identity="{src}",dst_identity="{dst}",status_code="{status}",route="{route}""#
        );
        format!(
            "palisade_requests_total{{{l}}} {n}\n\
             palisade_request_duration_seconds_bucket{{le=\"0.001\",{l}}} {}\n\
             palisade_request_duration_seconds_bucket{{le=\"0.01\",{l}}} {n}\n\
             palisade_request_duration_seconds_bucket{{le=\"+Inf\",{l}}} {n}\n",
            n - slow
        )
    }

    fn window(proxies: &[(&str, String)], seconds: f64) -> Window {
        let mut w = Window::default();
        for (name, text) in proxies {
            w.proxies.insert(
                name.to_string(),
                ProxyWindow {
                    counters: Snapshot::proxy_from_text(text).counters,
                    seconds: Some(seconds),
                },
            );
        }
        w.seconds = Some(seconds);
        w
    }

    fn demo() -> Window {
        let api = [
            req("inbound", WEB, API, 200, "demo/api/hello", 16, 0),
            req("inbound", WEB, API, 503, "demo/api/hello", 2, 2),
            req("inbound", UNKNOWN, API, 200, "", 2, 0),
            req("outbound", API, DB, 200, "", 3, 0),
            "palisade_authz_decisions_total{decision=\"allow\",policy=\"demo/api-from-web\"} 20\n"
                .into(),
        ]
        .concat();
        let db = [
            req("inbound", API, DB, 200, "", 3, 0),
            req("inbound", WEB, DB, 403, "", 5, 0),
            "palisade_authz_decisions_total{decision=\"deny\",policy=\"no_allow_match\"} 5\n"
                .into(),
            "palisade_authz_decisions_total{decision=\"allow\",policy=\"demo/db-from-api\"} 3\n"
                .into(),
        ]
        .concat();
        let web = [
            req("outbound", WEB, API, 200, "", 16, 0),
            req("outbound", WEB, API, 503, "", 2, 2),
            req("outbound", WEB, DB, 403, "", 5, 0),
            req("outbound", WEB, EXT, 200, "", 4, 0),
            req("outbound", WEB, UNKNOWN, 503, "", 1, 0),
        ]
        .concat();
        window(&[("web", web), ("api", api), ("db", db)], 10.0)
    }

    #[test]
    fn stat_per_workload_counts_at_the_inbound_side() {
        let rows = stat(&mesh(), &demo(), By::Workload, None);
        let names: Vec<&str> = rows.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["web", "api", "db"]);
        let api = &rows[1];
        assert_eq!(api.traffic.requests, 20.0);
        assert_eq!(api.traffic.rps, Some(2.0));
        assert_eq!(api.traffic.success_rate(), Some(0.9));
        assert_eq!(api.traffic.mtls_share(), Some(0.9));
        assert_eq!(api.denied, 0.0);
        // 18 of 20 under 1 ms: p50 and p95 in the first bucket, p99 in (1, 10] ms.
        let p50 = api.traffic.latency_ms(0.5).unwrap();
        assert!((p50 - 10.0 / 18.0).abs() < 1e-9, "{p50}");
        let p99 = api.traffic.latency_ms(0.99).unwrap();
        assert!((p99 - (1.0 + 9.0 * 1.8 / 2.0)).abs() < 1e-9, "{p99}");
        let db = &rows[2];
        assert_eq!((db.traffic.requests, db.denied), (8.0, 5.0));
        assert_eq!(db.traffic.success_rate(), Some(1.0), "403 is not a failure");
        assert_eq!(db.allowed, Some(3.0));
        // web receives nothing: 0 requests, no rates.
        let web = &rows[0];
        let j = web.json(By::Workload);
        assert_eq!(j["requests"], 0);
        assert_eq!(j["rps"], 0.0);
        assert_eq!(j["successRate"], Value::Null);
        assert_eq!(j["mtlsShare"], Value::Null);
        assert_eq!(j["latencyMs"]["p99"], Value::Null);
        assert_eq!(j["name"], "web");
        // One workload.
        let only = stat(&mesh(), &demo(), By::Workload, Some("db"));
        assert_eq!(only.len(), 1);
        assert_eq!(only[0].name, "db");
    }

    #[test]
    fn stat_per_route() {
        let rows = stat(&mesh(), &demo(), By::Route, None);
        assert_eq!(rows.len(), 1);
        let r = &rows[0];
        assert_eq!(r.name, "demo/api/hello");
        assert_eq!(r.traffic.requests, 18.0);
        assert_eq!(r.workloads, ["api"]);
        let j = r.json(By::Route);
        assert_eq!(j["route"], "demo/api/hello");
        assert_eq!(j["requests"], 18);
        assert!(j.get("name").is_none());
    }

    #[test]
    fn edges_from_the_callee_side_and_outbound_only_callees() {
        let e = edges(&mesh(), &demo());
        let find = |src: &str, dst: &str| {
            e.iter()
                .find(|r| r.src == src && r.dst == dst)
                .unwrap_or_else(|| panic!("no {src} -> {dst} in {e:#?}"))
        };
        let web_api = find("web", "api");
        assert!(web_api.secured);
        assert_eq!(web_api.traffic.requests, 18.0);
        assert_eq!(web_api.counted_at, CountedAt::Inbound);
        assert_eq!(web_api.dst_identity, API);
        let plain = find("unknown", "api");
        assert!(!plain.secured);
        assert_eq!(plain.traffic.requests, 2.0);
        let web_db = find("web", "db");
        assert_eq!((web_db.traffic.requests, web_db.denied), (5.0, 5.0));
        assert_eq!(find("api", "db").denied, 0.0);
        // Counted once: web's outbound side adds only the callees no proxy read counted.
        let ext = find("web", EXT);
        assert_eq!(ext.counted_at, CountedAt::Outbound);
        assert!(ext.secured);
        assert_eq!(ext.traffic.requests, 4.0);
        let nowhere = find("web", "unknown");
        assert!(!nowhere.secured);
        assert_eq!(nowhere.traffic.success_rate(), Some(0.0));
        assert_eq!(e.len(), 6, "{e:#?}");
        let j = web_db.json();
        for k in [
            "src",
            "dst",
            "srcIdentity",
            "dstIdentity",
            "secured",
            "requests",
            "successRate",
            "denied",
        ] {
            assert!(j.get(k).is_some(), "{k} missing from {j}");
        }

        // db's proxy not read: web -> db comes from web's outbound side.
        let mut w = demo();
        w.proxies.remove("db");
        let e = edges(&mesh(), &w);
        let web_db = e.iter().find(|r| r.src == "web" && r.dst == "db").unwrap();
        assert_eq!(web_db.counted_at, CountedAt::Outbound);
        assert_eq!((web_db.traffic.requests, web_db.denied), (5.0, 5.0));
        let api_db = e.iter().find(|r| r.src == "api" && r.dst == "db").unwrap();
        assert_eq!(api_db.traffic.requests, 3.0);
    }

    #[test]
    fn denials_are_capped_by_what_the_proxy_denied() {
        assert_eq!(denied_share(5.0, 5.0, 5.0), 5.0);
        assert_eq!(denied_share(2.0, 5.0, 7.0), 2.0);
        // The app answered 403s too: never more than the proxy denied.
        assert_eq!(denied_share(4.0, 6.0, 3.0), 3.0);
        assert_eq!(denied_share(1.0, 6.0, 3.0), 1.0);
        assert_eq!(denied_share(3.0, 3.0, 0.0), 0.0);
    }
}
