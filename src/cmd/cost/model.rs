//! What `palisade cost` computes, apart from where the numbers come from: the rows by caller
//! identity or by route with the request-counting rule, the prices, and the JSON. The cost
//! counters themselves, and their increase over a window, are read by [`crate::observe`]
//! (one scrape of the proxies or one Prometheus read for every command).

use std::collections::BTreeMap;

use crate::observe::cost::Key;
pub use crate::observe::cost::{Counters, Direction, Series};

/// What the rows are keyed by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum By {
    /// The caller's SPIFFE ID (`src_identity`).
    Identity,
    /// The route rule (`namespace/name/rule`); traffic no route applied to is keyed by its
    /// destination's SPIFFE ID.
    Route,
}

impl By {
    pub fn field(self) -> &'static str {
        match self {
            By::Identity => "identity",
            By::Route => "route",
        }
    }
}

/// Prices, in one currency.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Prices {
    pub vcpu_hour: f64,
    pub gb: f64,
}

impl Prices {
    pub fn cost(&self, cpu_seconds: f64, bytes: f64) -> f64 {
        cpu_seconds / 3600.0 * self.vcpu_hour + bytes / 1e9 * self.gb
    }
}

/// One consumer: a caller identity or a route.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub key: String,
    pub requests: f64,
    pub bytes: f64,
    pub cpu_seconds: f64,
    pub cost: f64,
}

impl Row {
    pub fn cost_per_1000_requests(&self) -> Option<f64> {
        (self.requests.round() > 0.0).then(|| self.cost / self.requests.round() * 1000.0)
    }
}

/// The rows of `counters` (every proxy's, added up), most expensive first.
///
/// CPU of a key adds up over the proxies: a request between two meshed workloads is worked on
/// by both. Requests and bytes are counted once: a key's inbound counts (summed over the
/// proxies) when it has inbound requests, else its outbound counts (a caller whose callee has
/// no proxy, or egress): the bytes crossed the network once.
pub fn rows(counters: &Counters, by: By, prices: Prices) -> Vec<Row> {
    #[derive(Default)]
    struct Usage {
        cpu: f64,
        inbound_bytes: f64,
        outbound_bytes: f64,
        inbound: f64,
        outbound: f64,
    }
    let mut per_key: BTreeMap<&Key, Usage> = BTreeMap::new();
    for (series, &v) in &counters.0 {
        match series {
            Series::Cpu(k) => per_key.entry(k).or_default().cpu += v,
            Series::Bytes(k, Direction::Inbound) => {
                per_key.entry(k).or_default().inbound_bytes += v
            }
            Series::Bytes(k, Direction::Outbound) => {
                per_key.entry(k).or_default().outbound_bytes += v
            }
            Series::Requests(k, Direction::Inbound) => per_key.entry(k).or_default().inbound += v,
            Series::Requests(k, Direction::Outbound) => per_key.entry(k).or_default().outbound += v,
            Series::Unattributed => {}
        }
    }
    let mut grouped: BTreeMap<&str, Row> = BTreeMap::new();
    for (k, u) in per_key {
        let name = match by {
            By::Identity => k.src.as_str(),
            By::Route if k.route.is_empty() => k.dst.as_str(),
            By::Route => k.route.as_str(),
        };
        let row = grouped.entry(name).or_insert_with(|| Row {
            key: name.to_string(),
            requests: 0.0,
            bytes: 0.0,
            cpu_seconds: 0.0,
            cost: 0.0,
        });
        // Requests and their bytes from one side: the callee's when it counted them.
        let (requests, bytes) = if u.inbound > 0.0 {
            (u.inbound, u.inbound_bytes)
        } else {
            (u.outbound, u.outbound_bytes)
        };
        row.requests += requests;
        row.bytes += bytes;
        row.cpu_seconds += u.cpu;
    }
    let mut out: Vec<Row> = grouped
        .into_values()
        .filter(|r| r.requests > 0.0 || r.bytes > 0.0 || r.cpu_seconds > 0.0)
        .map(|mut r| {
            r.cost = prices.cost(r.cpu_seconds, r.bytes);
            r
        })
        .collect();
    out.sort_by(|a, b| b.cost.total_cmp(&a.cost).then_with(|| a.key.cmp(&b.key)));
    out
}

/// Everything the command reports.
#[derive(Clone, Debug)]
pub struct Report {
    pub by: By,
    pub rows: Vec<Row>,
    pub currency: String,
    pub prices: Prices,
    /// Seconds the figures cover; None when no proxy said when it started.
    pub window: Option<f64>,
    pub unattributed_cpu_seconds: f64,
    /// `proxies` (scraped) or `prometheus`.
    pub source: &'static str,
}

impl Report {
    pub fn json(&self) -> serde_json::Value {
        let rows: Vec<serde_json::Value> = self
            .rows
            .iter()
            .map(|r| {
                let mut m = serde_json::Map::new();
                m.insert(self.by.field().into(), r.key.clone().into());
                m.insert("requests".into(), (r.requests.round() as u64).into());
                m.insert("bytes".into(), (r.bytes.round() as u64).into());
                m.insert("cpuSeconds".into(), r.cpu_seconds.into());
                m.insert("cost".into(), r.cost.into());
                m.insert(
                    "costPer1000Requests".into(),
                    r.cost_per_1000_requests().into(),
                );
                serde_json::Value::Object(m)
            })
            .collect();
        serde_json::json!({
            "rows": rows,
            "currency": self.currency,
            "window": self.window,
            "by": self.by.field(),
            "prices": { "vcpuHour": self.prices.vcpu_hour, "gb": self.prices.gb },
            "unattributedCpuSeconds": self.unattributed_cpu_seconds,
            "unattributedCost": self.prices.cost(self.unattributed_cpu_seconds, 0.0),
            "source": self.source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmd::prom;
    use crate::observe::cost::{BYTES, CPU, REQUESTS, UNATTRIBUTED};

    const WEB: &str = "spiffe://cluster.local/ns/demo/sa/web";
    const BATCH: &str = "spiffe://cluster.local/ns/demo/sa/batch";
    const API: &str = "spiffe://cluster.local/ns/demo/sa/api";
    const PRICES: Prices = Prices {
        vcpu_hour: 0.04,
        gb: 0.01,
    };

    fn series(src: &str, dst: &str, route: &str) -> String {
        format!(r#"src_identity="{src}",dst_identity="{dst}",route="{route}""#)
    }

    /// One proxy's cost metrics for one key: cpu, request and response bytes, requests.
    fn proxy(lines: &[(&str, &str, &str, &str, f64, f64, f64)]) -> Counters {
        let mut text = String::from("# TYPE palisade_cost_cpu_seconds counter\n");
        for &(dir, src, dst, route, cpu, bytes, requests) in lines {
            let l = series(src, dst, route);
            text.push_str(&format!("{CPU}{{{l}}} {cpu}\n"));
            text.push_str(&format!(
                "{BYTES}{{{l},flow=\"request\",direction=\"{dir}\"}} {}\n",
                bytes / 2.0
            ));
            text.push_str(&format!(
                "{BYTES}{{{l},flow=\"response\",direction=\"{dir}\"}} {}\n",
                bytes / 2.0
            ));
            text.push_str(&format!(
                "{REQUESTS}{{{l},direction=\"{dir}\"}} {requests}\n"
            ));
        }
        text.push_str(&format!("{UNATTRIBUTED} 0.25\n# EOF\n"));
        Counters::from_samples(&prom::parse(&text))
    }

    /// web and batch call api (both ends meshed); batch also calls out of the mesh.
    fn mesh() -> Counters {
        let web = proxy(&[("outbound", WEB, API, "", 0.9, 9000.0, 900.0)]);
        let batch = proxy(&[
            ("outbound", BATCH, API, "", 0.1, 1000.0, 100.0),
            ("outbound", BATCH, "example.org", "", 0.2, 500.0, 7.0),
        ]);
        let api = proxy(&[
            ("inbound", WEB, API, "", 1.8, 9000.0, 900.0),
            ("inbound", BATCH, API, "", 0.2, 1000.0, 100.0),
        ]);
        let mut all = Counters::default();
        for p in [&web, &batch, &api] {
            all.add(p);
        }
        all
    }

    #[test]
    fn requests_and_bytes_are_counted_once_and_cpu_adds_up_over_both_proxies() {
        let rows = rows(&mesh(), By::Identity, PRICES);
        let get = |k: &str| rows.iter().find(|r| r.key == k).expect(k).clone();
        let web = get(WEB);
        assert_eq!(web.requests, 900.0, "inbound count only, not 1800");
        assert!((web.cpu_seconds - 2.7).abs() < 1e-9);
        assert_eq!(
            web.bytes, 9000.0,
            "the callee's side only: bytes cross once"
        );
        let batch = get(BATCH);
        // 100 to api (inbound counted), 7 to example.org (no inbound side: outbound count).
        assert_eq!(batch.requests, 107.0);
        assert!((batch.cpu_seconds - 0.5).abs() < 1e-9);
        assert_eq!(batch.bytes, 1500.0);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].key, WEB, "most expensive first");
        assert!((mesh().unattributed_cpu() - 0.75).abs() < 1e-9);
    }

    #[test]
    fn pricing() {
        let p = Prices {
            vcpu_hour: 0.04,
            gb: 0.01,
        };
        // One vCPU hour and one GB.
        assert!((p.cost(3600.0, 1e9) - 0.05).abs() < 1e-12);
        assert_eq!(p.cost(0.0, 0.0), 0.0);
        let rows = rows(&mesh(), By::Identity, p);
        let web = &rows[0];
        let want = 2.7 / 3600.0 * 0.04 + 9000.0 / 1e9 * 0.01;
        assert!((web.cost - want).abs() < 1e-15);
        let per_k = web.cost_per_1000_requests().unwrap();
        assert!((per_k - want / 900.0 * 1000.0).abs() < 1e-15);
        let idle = Row {
            key: "x".into(),
            requests: 0.0,
            bytes: 10.0,
            cpu_seconds: 1.0,
            cost: 1.0,
        };
        assert_eq!(idle.cost_per_1000_requests(), None);
    }

    #[test]
    fn by_route_keys_routeless_traffic_by_its_destination() {
        let mut c = mesh();
        c.add(&proxy(&[
            (
                "outbound",
                WEB,
                API,
                "demo/api-split/canary",
                0.3,
                100.0,
                10.0,
            ),
            (
                "inbound",
                WEB,
                API,
                "demo/api-split/canary",
                0.3,
                100.0,
                10.0,
            ),
        ]));
        let rows = rows(&c, By::Route, PRICES);
        let keys: Vec<&str> = rows.iter().map(|r| r.key.as_str()).collect();
        assert_eq!(keys, [API, "demo/api-split/canary", "example.org"]);
        assert_eq!(rows[0].requests, 1000.0);
        assert_eq!(rows[1].requests, 10.0);
        assert_eq!(rows[2].requests, 7.0);
    }

    #[test]
    fn increase_over_a_window_and_counter_resets() {
        let before = proxy(&[("outbound", WEB, API, "", 1.0, 100.0, 10.0)]);
        let after = proxy(&[
            ("outbound", WEB, API, "", 1.5, 300.0, 30.0),
            ("outbound", BATCH, API, "", 0.5, 50.0, 5.0),
        ]);
        let d = Counters::increase(&before, &after);
        let rows = rows(&d, By::Identity, PRICES);
        let web = rows.iter().find(|r| r.key == WEB).unwrap();
        assert_eq!((web.requests, web.bytes), (20.0, 200.0));
        assert!((web.cpu_seconds - 0.5).abs() < 1e-9);
        let batch = rows.iter().find(|r| r.key == BATCH).unwrap();
        assert_eq!(
            batch.requests, 5.0,
            "a series new in the window counts whole"
        );
        assert_eq!(d.unattributed_cpu(), 0.0);
        // The proxy restarted: its counters start again below the earlier values.
        let restarted = proxy(&[("outbound", WEB, API, "", 0.2, 40.0, 4.0)]);
        let d = Counters::increase(&after, &restarted);
        let rows = super::rows(&d, By::Identity, PRICES);
        assert_eq!(rows[0].requests, 4.0);
    }

    #[test]
    fn unrelated_metrics_and_unknown_directions_are_ignored() {
        let text = format!(
            "palisade_requests_total{{direction=\"inbound\"}} 5\n{REQUESTS}{{{},direction=\"sideways\"}} 3\n",
            series(WEB, API, "")
        );
        assert_eq!(
            Counters::from_samples(&prom::parse(&text)),
            Counters::default()
        );
    }

    #[test]
    fn json_has_the_spec_shape() {
        let report = Report {
            by: By::Identity,
            rows: rows(&mesh(), By::Identity, PRICES),
            currency: "EUR".into(),
            prices: PRICES,
            window: Some(30.5),
            unattributed_cpu_seconds: 0.75,
            source: "proxies",
        };
        let j = report.json();
        assert_eq!(j["currency"], "EUR");
        assert_eq!(j["window"], 30.5);
        assert_eq!(j["by"], "identity");
        let row = &j["rows"][0];
        assert_eq!(row["identity"], WEB);
        assert_eq!(row["requests"], 900);
        assert_eq!(row["bytes"], 9000);
        assert!(row["cpuSeconds"].as_f64().unwrap() > 2.69);
        assert!(row["cost"].as_f64().unwrap() > 0.0);
        assert!(row["costPer1000Requests"].as_f64().unwrap() > 0.0);
        assert!(row.get("route").is_none());
        let by_route = Report {
            by: By::Route,
            rows: rows(&mesh(), By::Route, PRICES),
            window: None,
            ..report
        }
        .json();
        assert_eq!(by_route["rows"][0]["route"], API);
        assert!(by_route["window"].is_null());
        assert!(by_route["rows"][0].get("identity").is_none());
    }
}
