//! Egress: names no mesh service matches, resolved with DNS (a UDP name server this test runs
//! on 127.0.0.1, counting the queries it gets) and proxied without mTLS, under an
//! EgressPolicy. Local mode through egress upstream listeners; transparent mode through
//! `Proxy::serve_redirected` (the redirect itself needs iptables and root, tested elsewhere).

mod support;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use hickory_resolver::proto::op::{Message, ResponseCode};
use hickory_resolver::proto::rr::rdata::{A, SOA};
use hickory_resolver::proto::rr::{Name, RData, Record, RecordType};
use palisade_api::v1;
use palisade_proxy::{Proxy, Snapshot};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

/// TTL of every answer, and negative TTL of every SOA: far longer than a test.
const TTL: u32 = 60;
/// TTL of the answers for names that start with `short.`.
const SHORT_TTL: u32 = 1;

/// A name server for `example.test`: A records for the names it is given, NODATA for their
/// AAAA, NXDOMAIN for every other name (with the zone's SOA, so the answer may be cached).
struct DnsServer {
    addr: SocketAddr,
    /// Queries by name (lower case, no trailing dot), every record type together.
    queries: Arc<Mutex<HashMap<String, usize>>>,
}

impl DnsServer {
    async fn start(records: &[(&str, Ipv4Addr)]) -> DnsServer {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind DNS");
        let addr = socket.local_addr().expect("DNS addr");
        let records: HashMap<String, Ipv4Addr> =
            records.iter().map(|(n, ip)| (n.to_string(), *ip)).collect();
        let queries: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let counted = queries.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            while let Ok((n, from)) = socket.recv_from(&mut buf).await {
                let Ok(req) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let Some(rsp) = answer(&req, &records, &counted) else {
                    continue;
                };
                if let Ok(bytes) = rsp.to_vec() {
                    let _ = socket.send_to(&bytes, from).await;
                }
            }
        });
        DnsServer { addr, queries }
    }

    fn queries(&self, name: &str) -> usize {
        self.queries
            .lock()
            .expect("lock")
            .get(name)
            .copied()
            .unwrap_or(0)
    }
}

fn answer(
    req: &Message,
    records: &HashMap<String, Ipv4Addr>,
    counted: &Mutex<HashMap<String, usize>>,
) -> Option<Message> {
    let q = req.queries.first()?;
    let name = q
        .name
        .to_string()
        .trim_end_matches('.')
        .to_ascii_lowercase();
    *counted
        .lock()
        .expect("lock")
        .entry(name.clone())
        .or_default() += 1;
    let mut rsp = Message::response(req.metadata.id, req.metadata.op_code);
    rsp.metadata.authoritative = true;
    rsp.metadata.recursion_desired = req.metadata.recursion_desired;
    rsp.metadata.recursion_available = true;
    rsp.add_query(q.clone());
    let zone = Name::from_ascii("example.test.").ok()?;
    let soa = Record::from_rdata(
        zone.clone(),
        TTL,
        RData::SOA(SOA::new(
            Name::from_ascii("ns.example.test.").ok()?,
            Name::from_ascii("admin.example.test.").ok()?,
            1,
            3600,
            600,
            86400,
            TTL,
        )),
    );
    match (records.get(&name), q.query_type) {
        (Some(ip), RecordType::A) => {
            let ttl = if name.starts_with("short.") {
                SHORT_TTL
            } else {
                TTL
            };
            rsp.add_answer(Record::from_rdata(q.name.clone(), ttl, RData::A(A(*ip))));
        }
        (Some(_), _) => {
            rsp.add_authority(soa);
        }
        (None, _) => {
            rsp.metadata.response_code = ResponseCode::NXDomain;
            rsp.add_authority(soa);
        }
    }
    Some(rsp)
}

/// A proxy for `web` with the given upstream listeners, resolving through `dns`.
async fn egress_proxy(pki: &Pki, dns: SocketAddr, upstreams: &[&str]) -> Proxy {
    let mut cfg = proxy_config(
        pki,
        "web",
        WEB,
        None,
        upstreams,
        "mode: STRICT\nservices: []\n",
    );
    cfg.dns_server = Some(dns);
    within(Proxy::start(cfg)).await.expect("proxy")
}

/// The proxy's config with `policy` as its EgressPolicy (no services).
fn with_policy(version: u64, policy: Option<v1::EgressPolicy>) -> Snapshot {
    Snapshot::from_proto(&v1::ProxyConfig {
        version,
        inbound: Some(v1::Inbound {
            mode: v1::MtlsMode::Strict as i32,
            egress: policy,
            ..Default::default()
        }),
        ..Default::default()
    })
    .expect("config")
}

fn policy(default_allow: bool, rules: &[(bool, &str)]) -> v1::EgressPolicy {
    v1::EgressPolicy {
        name: "demo/egress".into(),
        default_allow,
        rules: rules
            .iter()
            .map(|(allow, host)| v1::EgressRule {
                allow: *allow,
                hosts: vec![host.to_string()],
            })
            .collect(),
    }
}

/// Sends `msg` through `addr` to the TCP echo app and expects it back, then a clean close.
async fn echoes(addr: SocketAddr, msg: &[u8]) {
    let mut c = within(TcpStream::connect(addr)).await.expect("connect");
    echoes_on(&mut c, msg).await;
}

async fn echoes_on(c: &mut TcpStream, msg: &[u8]) {
    within(c.write_all(msg)).await.expect("write");
    let mut got = vec![0u8; msg.len()];
    within(c.read_exact(&mut got)).await.expect("echo");
    assert_eq!(got, msg);
    within(c.shutdown()).await.expect("shutdown");
    let mut rest = Vec::new();
    within(c.read_to_end(&mut rest)).await.expect("EOF");
    assert!(rest.is_empty());
}

/// Expects the proxy to refuse the connection: reset (or closed) with no byte of an answer.
async fn refused(addr: SocketAddr, msg: &[u8]) {
    let mut c = within(TcpStream::connect(addr)).await.expect("connect");
    let _ = within(c.write_all(msg)).await;
    expect_closed(&mut c, &format!("{addr}")).await;
}

fn key(host: &str, port: u16) -> String {
    format!("{host}:{port}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_egress_upstream_resolves_its_name_once_per_ttl_and_reaches_the_app() {
    init();
    let pki = Pki::new();
    let dns = DnsServer::start(&[
        ("app.example.test", Ipv4Addr::LOCALHOST),
        ("web.example.test", Ipv4Addr::LOCALHOST),
    ])
    .await;
    let echo = tcp_echo_app().await;
    let http_app = echo_app().await;
    let (tcp_key, http_key, mesh_key) = (
        key("app.example.test", echo.port()),
        key("web.example.test", http_app.addr.port()),
        // `demo` is the workload's own namespace: a mesh name, never egress.
        key("gone.demo", echo.port()),
    );
    let p = egress_proxy(&pki, dns.addr, &[&tcp_key, &http_key, &mesh_key]).await;

    echoes(upstream_addr(&p, &tcp_key), b"hello, egress").await;
    let first = dns.queries("app.example.test");
    assert!(first >= 1, "the name was looked up");
    echoes(upstream_addr(&p, &tcp_key), b"again").await;
    assert_eq!(
        dns.queries("app.example.test"),
        first,
        "a second connection within the TTL is answered from the cache"
    );

    let rsp = within(get(upstream_addr(&p, &http_key), "/through"))
        .await
        .expect("HTTP through egress");
    assert_eq!(rsp.status, http::StatusCode::OK);
    assert_eq!(rsp.headers["x-echo-path"], "/through");

    assert_eq!(
        wait_metric(
            &p,
            "palisade_egress_connections_total",
            &[("decision", "allow"), ("protocol", "tcp")],
            2.0
        )
        .await,
        2.0
    );
    wait_metric(
        &p,
        "palisade_egress_connections_total",
        &[("decision", "allow"), ("protocol", "http")],
        1.0,
    )
    .await;
    assert_eq!(
        metric(&p, "palisade_dns_lookups_total", &[("result", "ok")]),
        3.0,
        "lookups the proxy asked for, cache hits included"
    );

    // A name of the mesh's own namespace that is no service stays in the mesh: refused there,
    // never looked up in DNS.
    refused(upstream_addr(&p, &mesh_key), b"hello").await;
    assert_eq!(dns.queries("gone.demo"), 0);
    assert_eq!(metric(&p, "palisade_egress_connections_total", &[]), 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_name_is_reset_counted_and_its_nxdomain_cached() {
    init();
    let pki = Pki::new();
    let dns = DnsServer::start(&[]).await;
    let echo = tcp_echo_app().await;
    let nx = key("nx.example.test", echo.port());
    let p = egress_proxy(&pki, dns.addr, &[&nx]).await;

    refused(upstream_addr(&p, &nx), b"hello").await;
    wait_metric(
        &p,
        "palisade_proxy_errors_total",
        &[("direction", "outbound"), ("reason", "dns_nxdomain")],
        1.0,
    )
    .await;
    let first = dns.queries("nx.example.test");
    assert!(first >= 1);
    assert_eq!(
        metric(&p, "palisade_dns_lookups_total", &[("result", "nxdomain")]),
        1.0
    );

    refused(upstream_addr(&p, &nx), b"hello").await;
    wait_metric(
        &p,
        "palisade_proxy_errors_total",
        &[("reason", "dns_nxdomain")],
        2.0,
    )
    .await;
    assert_eq!(
        dns.queries("nx.example.test"),
        first,
        "the negative answer is cached for the SOA's negative TTL"
    );
    assert_eq!(
        metric(&p, "palisade_dns_lookups_total", &[("result", "nxdomain")]),
        2.0
    );
    assert_eq!(
        metric(&p, "palisade_dns_lookups_total", &[("result", "ok")]),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_egress_policy_allows_and_denies_by_hostname() {
    init();
    let pki = Pki::new();
    let dns = DnsServer::start(&[
        ("ok.example.test", Ipv4Addr::LOCALHOST),
        ("bad.example.test", Ipv4Addr::LOCALHOST),
        ("app.example.test", Ipv4Addr::LOCALHOST),
    ])
    .await;
    let echo = tcp_echo_app().await;
    let (ok, bad, app) = (
        key("ok.example.test", echo.port()),
        key("bad.example.test", echo.port()),
        key("app.example.test", echo.port()),
    );
    let p = egress_proxy(&pki, dns.addr, &[&ok, &bad, &app]).await;

    // Deny *.example.test, except ok.example.test; anything else is allowed by default.
    p.apply(with_policy(
        2,
        Some(policy(
            true,
            &[(true, "ok.example.test"), (false, "*.example.test")],
        )),
    ));
    echoes(upstream_addr(&p, &ok), b"allowed").await;
    refused(upstream_addr(&p, &bad), b"denied").await;
    wait_metric(
        &p,
        "palisade_egress_connections_total",
        &[("decision", "deny")],
        1.0,
    )
    .await;
    assert_eq!(
        metric(
            &p,
            "palisade_egress_connections_total",
            &[("decision", "allow")]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &p,
            "palisade_proxy_errors_total",
            &[("reason", "egress_denied")]
        ),
        1.0
    );
    assert_eq!(
        dns.queries("bad.example.test"),
        0,
        "a denied name is not even looked up"
    );

    // Deny-all by default: only what a rule allows goes out.
    p.apply(with_policy(
        3,
        Some(policy(false, &[(true, "ok.example.test")])),
    ));
    refused(upstream_addr(&p, &app), b"denied").await;
    echoes(upstream_addr(&p, &ok), b"still allowed").await;
    wait_metric(
        &p,
        "palisade_egress_connections_total",
        &[("decision", "deny")],
        2.0,
    )
    .await;
    assert_eq!(
        metric(
            &p,
            "palisade_egress_connections_total",
            &[("decision", "allow")]
        ),
        2.0
    );
    assert_eq!(dns.queries("app.example.test"), 0);

    // No policy again: everything goes.
    p.apply(with_policy(4, None));
    echoes(upstream_addr(&p, &app), b"open").await;
}

/// A redirected connection to `dst`, served by the proxy as the transparent listener would.
async fn redirected(p: &Arc<Proxy>, dst: SocketAddr) -> TcpStream {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let client = within(TcpStream::connect(l.local_addr().expect("addr")))
        .await
        .expect("connect");
    let (server, _) = within(l.accept()).await.expect("accept");
    let p = p.clone();
    tokio::spawn(async move { p.serve_redirected(server, dst).await });
    client
}

/// A ClientHello for `sni` from a real rustls client.
fn client_hello(sni: &str) -> Vec<u8> {
    let cfg = rustls::ClientConfig::builder()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let name = rustls_pki_types::ServerName::try_from(sni.to_string()).expect("server name");
    let mut conn = rustls::ClientConnection::new(Arc::new(cfg), name).expect("client");
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).expect("ClientHello");
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirected_connection_is_judged_by_its_sni_or_host() {
    init();
    let pki = Pki::new();
    let dns = DnsServer::start(&[
        ("ok.example.test", Ipv4Addr::LOCALHOST),
        ("bad.example.test", Ipv4Addr::LOCALHOST),
        // Allowed by name, but not where the connections go: a forged SNI or Host.
        ("elsewhere.example.test", Ipv4Addr::new(127, 0, 0, 2)),
    ])
    .await;
    let echo = tcp_echo_app().await;
    let p = Arc::new(egress_proxy(&pki, dns.addr, &[]).await);

    // No policy: passed through untouched, not even read first.
    let mut c = redirected(&p, echo).await;
    echoes_on(&mut c, b"\x00plain tcp").await;

    p.apply(with_policy(
        2,
        Some(policy(
            false,
            &[(true, "ok.example.test"), (true, "elsewhere.example.test")],
        )),
    ));
    let mut c = redirected(&p, echo).await;
    echoes_on(&mut c, &client_hello("ok.example.test")).await;
    let mut c = redirected(&p, echo).await;
    echoes_on(
        &mut c,
        b"GET / HTTP/1.1\r\nHost: OK.example.test:80\r\n\r\n",
    )
    .await;
    wait_metric(
        &p,
        "palisade_egress_connections_total",
        &[("decision", "allow"), ("protocol", "tls")],
        1.0,
    )
    .await;
    wait_metric(
        &p,
        "palisade_egress_connections_total",
        &[("decision", "allow"), ("protocol", "http")],
        1.0,
    )
    .await;

    for (what, bytes) in [
        ("a name no rule allows", client_hello("bad.example.test")),
        ("no hostname under deny-all", b"\x00plain tcp".to_vec()),
        (
            "a Host naming another address",
            b"GET / HTTP/1.1\r\nHost: elsewhere.example.test\r\n\r\n".to_vec(),
        ),
        (
            "an SNI naming another address",
            client_hello("elsewhere.example.test"),
        ),
    ] {
        let mut c = redirected(&p, echo).await;
        let _ = within(c.write_all(&bytes)).await;
        expect_closed(&mut c, what).await;
    }
    wait_metric(
        &p,
        "palisade_egress_connections_total",
        &[("decision", "deny")],
        4.0,
    )
    .await;
    assert_eq!(
        metric(
            &p,
            "palisade_egress_connections_total",
            &[("decision", "deny"), ("protocol", "tls")]
        ),
        2.0
    );
    assert_eq!(
        metric(
            &p,
            "palisade_proxy_errors_total",
            &[("reason", "egress_address_mismatch")]
        ),
        2.0
    );
    assert_eq!(
        metric(
            &p,
            "palisade_proxy_errors_total",
            &[("reason", "egress_denied")]
        ),
        2.0
    );
    assert_eq!(dns.queries("bad.example.test"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_is_not_kept_past_its_ttl() {
    init();
    let pki = Pki::new();
    let dns = DnsServer::start(&[("short.example.test", Ipv4Addr::LOCALHOST)]).await;
    let echo = tcp_echo_app().await;
    let short = key("short.example.test", echo.port());
    let p = egress_proxy(&pki, dns.addr, &[&short]).await;
    echoes(upstream_addr(&p, &short), b"first").await;
    let first = dns.queries("short.example.test");
    assert!(first >= 1);
    // The answer lives one second: a connection after that asks the name server again.
    let deadline = tokio::time::Instant::now() + WAIT;
    while dns.queries("short.example.test") == first {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the name was never looked up again"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        echoes(upstream_addr(&p, &short), b"again").await;
    }
}
