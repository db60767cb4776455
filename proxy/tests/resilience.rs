//! Balancing that reacts to failure, end to end: three endpoints behind one service, one whose
//! app dies and then one whose proxy dies, with traffic flowing the whole time.

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use palisade_proxy::Proxy;
use support::*;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

/// An HTTP app that answers its name, and can be killed: aborting it closes its listener and
/// every connection it holds, as a crashed process would.
async fn killable_app(name: &'static str) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let mut conns = JoinSet::new();
        while let Ok((tcp, _)) = listener.accept().await {
            conns.spawn(async move {
                let svc = hyper::service::service_fn(move |_req: Request<_>| async move {
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(name))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    (addr, task)
}

/// What the load generator saw: when, and the status (0 for a transport error) and body.
type Log = Arc<Mutex<Vec<(Instant, u16, String)>>>;

/// The failures in `from..to` that `cause` picks out and that came more than 2 s after the
/// first of them, with that first one's time. A death shows only once a request reaches what
/// died: P2C may send nothing to an endpoint for seconds (its latency estimate is the highest
/// and the others' are fresh), and then its first request is the one that finds the app gone
/// and cannot be sent elsewhere (only requests to an endpoint already suspect keep a copy to
/// replay). From that first failure on, failures must stop within 2 s.
fn late_failures(
    log: &Log,
    from: Instant,
    to: Instant,
    cause: impl Fn(u16, &str) -> bool,
) -> (Option<Instant>, Vec<(Duration, u16, String)>) {
    let l = log.lock().expect("log");
    let failed = |t: &Instant, s: u16, b: &str| *t >= from && *t < to && s != 200 && cause(s, b);
    let first = l
        .iter()
        .filter(|(t, s, b)| failed(t, *s, b))
        .map(|(t, _, _)| *t)
        .min();
    let late = first.map_or_else(Vec::new, |first| {
        l.iter()
            .filter(|(t, s, b)| failed(t, *s, b) && *t >= first + Duration::from_secs(2))
            .map(|(t, s, b)| (t.duration_since(first), *s, b.clone()))
            .collect()
    });
    (first, late)
}

/// What a's inbound proxy answers once it cannot reach its app.
fn from_dead_app(_: u16, body: &str) -> bool {
    body.trim() == "app_unavailable"
}

/// Load: a keep-alive client, one GET every 10 ms (at most 3000), each outcome logged; a
/// transport error reconnects.
fn load(upstream: SocketAddr) -> (Log, JoinHandle<()>) {
    let log: Log = Arc::default();
    let task = {
        let log = log.clone();
        tokio::spawn(async move {
            let mut c = h1_client(upstream).await;
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            for _ in 0..3000 {
                tick.tick().await;
                let at = Instant::now();
                let (status, body) = match h1_send(&mut c, get_req("/")).await {
                    Ok(r) => (
                        r.status.as_u16(),
                        String::from_utf8_lossy(&r.body).into_owned(),
                    ),
                    Err(_) => {
                        c = h1_client(upstream).await;
                        (0, String::new())
                    }
                };
                log.lock().expect("log").push((at, status, body));
            }
        })
    };
    (log, task)
}

/// Three endpoints of one service: apps `a`, `b` and `c`, each behind its own proxy; `a`'s
/// app can be killed.
struct Three {
    pa: Proxy,
    pb: Proxy,
    pc: Proxy,
    kill_a: JoinHandle<()>,
    _apps: [JoinHandle<()>; 2],
}

async fn three(pki: &Pki) -> Three {
    let (app_a, kill_a) = killable_app("a").await;
    let (app_b, keep_b) = killable_app("b").await;
    let (app_c, keep_c) = killable_app("c").await;
    let start = |app| start_server_proxy(pki, app, "STRICT", "http", test_timeouts());
    Three {
        pa: start(app_a).await,
        pb: start(app_b).await,
        pc: start(app_c).await,
        kill_a,
        _apps: [keep_b, keep_c],
    }
}

/// Waits until `n` more requests have been logged.
async fn more_requests(log: &Log, n: usize) {
    let target = log.lock().expect("log").len() + n;
    within(async {
        while log.lock().expect("log").len() < target {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// Waits until each of the apps `a`, `b` and `c` has answered, before anything dies.
async fn all_answer(log: &Log) {
    let all_seen = || {
        let l = log.lock().expect("log");
        ["a", "b", "c"]
            .iter()
            .all(|n| l.iter().any(|(_, s, b)| *s == 200 && b == n))
    };
    within(async {
        while !all_seen() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_stop_within_two_seconds_of_an_app_death_and_a_proxy_death() {
    init();
    let pki = Pki::new();
    let Three {
        pa,
        pb,
        pc,
        kill_a,
        _apps,
    } = three(&pki).await;
    let client = client_over(
        &pki,
        &[pa.inbound_addr, pb.inbound_addr, pc.inbound_addr],
        "",
        Default::default(),
    )
    .await;
    let upstream = upstream_addr(&client, SERVICE);

    let (log, traffic) = load(upstream);
    all_answer(&log).await;

    // a's app dies.
    let t1 = Instant::now();
    kill_a.abort();
    tokio::time::sleep_until(t1 + Duration::from_secs(3)).await;
    // b's proxy dies (stops listening; its connections close).
    let t2 = Instant::now();
    let stopping = tokio::spawn(pb.shutdown());
    tokio::time::sleep_until(t2 + Duration::from_secs(3)).await;
    traffic.abort();
    let _ = stopping.await;

    // a's app: its inbound proxy's `app_unavailable`, from the first one on (whenever P2C
    // first sent a request there, before or after b's proxy died).
    let end = Instant::now();
    let (found_dead_app, late_after_app) = late_failures(&log, t1, end, from_dead_app);
    assert!(
        late_after_app.is_empty(),
        "failures more than 2 s after a's dead app was first reached: {late_after_app:?}"
    );
    // Everything else that failed after a's app died: requests in flight when it died
    // (before t2), then b's proxy going away (from t2).
    let others = |_: u16, b: &str| !from_dead_app(0, b);
    let (_, late_other_after_app) = late_failures(&log, t1, t2, others);
    assert!(
        late_other_after_app.is_empty(),
        "failures more than 2 s after a's app died: {late_other_after_app:?}"
    );
    let (_, late_after_proxy) = late_failures(&log, t2, end, others);
    assert!(
        late_after_proxy.is_empty(),
        "failures more than 2 s after b's proxy died: {late_after_proxy:?}"
    );
    // Traffic kept flowing, and in the end only c answered (apart from a's dead app being
    // found late, within the 2 s allowed above).
    let late_discovery = found_dead_app.filter(|t| *t > t2);
    let l = log.lock().expect("log");
    let tail: Vec<&str> = l
        .iter()
        .filter(|(t, _, _)| *t > t2 + Duration::from_secs(2))
        .filter(|(t, _, b)| {
            !(from_dead_app(0, b)
                && late_discovery.is_some_and(|d| *t < d + Duration::from_secs(2)))
        })
        .map(|(_, _, b)| b.as_str())
        .collect();
    assert!(
        tail.len() > 50,
        "too few requests in the last second: {}",
        tail.len()
    );
    assert!(tail.iter().all(|b| *b == "c"), "{tail:?}");
    assert!(
        metric(
            &client,
            "palisade_endpoint_ejections_total",
            &[("dst_identity", API)]
        ) >= 2.0,
        "{}",
        client.metrics().encode()
    );
    drop((pa, pc));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_endpoint_is_not_favoured_and_the_request_goes_elsewhere() {
    // Two endpoints, one of which refuses connections: every request must succeed (the
    // refused one is retried elsewhere) and the dead one must not attract traffic.
    init();
    let pki = Pki::new();
    let (app, _keep) = killable_app("ok").await;
    let live = start_server_proxy(&pki, app, "STRICT", "http", test_timeouts()).await;
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let yaml = format!(
        "mode: STRICT\nservices:\n- name: api.demo\n  port: 8080\n  protocol: http\n  endpoints:\n    - {{ address: \"{dead}\", identity: \"{API}\" }}\n    - {{ address: \"{}\", identity: \"{API}\" }}\n",
        live.inbound_addr
    );
    let cfg = proxy_config(&pki, "web", WEB, None, &[SERVICE], &yaml);
    let client = within(Proxy::start(cfg)).await.expect("client proxy");
    let mut c = h1_client(upstream_addr(&client, SERVICE)).await;
    for i in 0..200 {
        let r = h1_send(&mut c, get_req("/")).await.expect("response");
        assert_eq!(r.status, StatusCode::OK, "request {i}");
    }
    let text = client.metrics().encode();
    // The dead endpoint was tried once, ejected, and left alone for its backoff.
    assert_eq!(
        metric(
            &client,
            "palisade_endpoint_ejections_total",
            &[("dst_identity", API)]
        ),
        1.0,
        "{text}"
    );
}

/// An HTTP app that answers its name after `delay`.
async fn slow_app(name: &'static str, delay: Duration) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req: Request<_>| async move {
                    tokio::time::sleep(delay).await;
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(name))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}

/// A client proxy for `api.demo:8080` over `endpoints`, with `extra` service settings and
/// `balancer`.
async fn client_over(
    pki: &Pki,
    endpoints: &[SocketAddr],
    extra: &str,
    balancer: palisade_proxy::balance::Strategy,
) -> Proxy {
    let list: String = endpoints
        .iter()
        .map(|a| format!("    - {{ address: \"{a}\", identity: \"{API}\" }}\n"))
        .collect();
    let yaml = format!(
        "mode: STRICT\nservices:\n- name: api.demo\n  port: 8080\n  protocol: http\n{extra}  endpoints:\n{list}"
    );
    let mut cfg = proxy_config(pki, "web", WEB, None, &[SERVICE], &yaml);
    cfg.balancer = balancer;
    within(Proxy::start(cfg)).await.expect("client proxy")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_retries_no_request_fails_when_an_app_and_then_a_proxy_die() {
    init();
    let pki = Pki::new();
    let Three {
        pa,
        pb,
        pc,
        kill_a,
        _apps,
    } = three(&pki).await;
    let client = client_over(
        &pki,
        &[pa.inbound_addr, pb.inbound_addr, pc.inbound_addr],
        "  retry: { codes: [502, 503], attempts: 3, backoff: 5ms }\n",
        Default::default(),
    )
    .await;
    let upstream = upstream_addr(&client, SERVICE);
    let (log, traffic) = load(upstream);
    all_answer(&log).await;
    // a's app dies, then (150 requests later) b's proxy; 150 more requests after that.
    kill_a.abort();
    more_requests(&log, 150).await;
    let stopping = tokio::spawn(pb.shutdown());
    more_requests(&log, 150).await;
    traffic.abort();
    let _ = stopping.await;
    let (failures, total) = {
        let l = log.lock().expect("log");
        let failed: Vec<(u16, String)> = l
            .iter()
            .filter(|(_, s, _)| *s != 200)
            .map(|(_, s, b)| (*s, b.clone()))
            .collect();
        (failed, l.len())
    };
    println!(
        "{total} requests, {} failed; retries: {}",
        failures.len(),
        client
            .metrics()
            .encode()
            .lines()
            .filter(|l| l.starts_with("palisade_retries_total"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    assert!(failures.is_empty(), "{failures:?}");
    assert!(total > 200, "{total} requests");
    drop((pa, pc));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_endpoint_gets_less_traffic_under_peak_ewma_than_round_robin() {
    init();
    let pki = Pki::new();
    let slow = slow_app("slow", Duration::from_millis(20)).await;
    let fast = slow_app("fast", Duration::ZERO).await;
    let start = |app| start_server_proxy(&pki, app, "STRICT", "http", test_timeouts());
    let (ps, pf) = (start(slow).await, start(fast).await);
    let mut shares = Vec::new();
    for strategy in [
        palisade_proxy::balance::Strategy::RoundRobin,
        palisade_proxy::balance::Strategy::PeakEwma,
    ] {
        let client = client_over(&pki, &[ps.inbound_addr, pf.inbound_addr], "", strategy).await;
        let mut c = h1_client(upstream_addr(&client, SERVICE)).await;
        let mut to_slow = 0;
        for _ in 0..200 {
            let r = h1_send(&mut c, get_req("/")).await.expect("response");
            if r.body.as_ref() == b"slow" {
                to_slow += 1;
            }
        }
        println!("{strategy:?}: {to_slow} of 200 requests went to the 20 ms endpoint");
        shares.push(to_slow);
    }
    assert!(
        shares[1] * 3 < shares[0],
        "round robin {} vs peak-EWMA {}",
        shares[0],
        shares[1]
    );
}
