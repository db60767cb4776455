//! A bad network between the proxies: 100 ms of delay and 5% loss on every packet between
//! them, both ways (tc netem; where the kernel has no netem, 5% loss by iptables and no
//! delay, said in the output), while requests flow. The test runs in a network namespace of
//! its own, where the queueing discipline on loopback sends only the packets to and from the
//! server proxy's inbound port through netem: the app's hops stay fast, as in a pod, and the
//! machine's network is untouched.
//!
//! Two kinds of traffic at once: HTTP requests multiplexed over the pair's pooled HTTP/2
//! connection, and opaque TCP connections, each a new TCP and mTLS handshake across the lossy
//! link. TCP retransmits what is lost; the proxies must not turn the delay into failures
//! (timeouts tripping, endpoints ejected). `PALISADE_NETEM_SECS` sets how long (default 15 s,
//! as in CI).

mod support;

use std::time::{Duration, Instant};

use palisade_proxy::config::Timeouts;
use support::netns::{iptables, rerun_in_netns, tc};
use support::*;

const IN_NETNS: &str = "PALISADE_TEST_NETEM_NETNS";
const DELAY_MS: u64 = 100;
const LOSS: &str = "5%";

/// What was done to the link between the proxies.
enum Degraded {
    /// netem: every packet to or from the inbound port delayed and 5% dropped.
    DelayAndLoss,
    /// The kernel has no netem (this one's, a Firecracker guest's, lacks `sch_netem` and
    /// `sch_prio`): 5% of those packets dropped by iptables' `statistic` match, no delay.
    LossOnly { no_netem: String },
}

/// Sends the packets to or from `port` on loopback through netem, and every other packet
/// straight through: a `prio` root whose third band holds netem, and two u32 filters. Where
/// the kernel has no netem, drops 5% of them with iptables instead.
fn degrade(port: u16) -> Result<Degraded, String> {
    let port = port.to_string();
    let netem = || -> Result<(), String> {
        tc(&["qdisc", "add", "dev", "lo", "root", "handle", "1:", "prio"])?;
        tc(&[
            "qdisc",
            "add",
            "dev",
            "lo",
            "parent",
            "1:3",
            "handle",
            "30:",
            "netem",
            "delay",
            &format!("{DELAY_MS}ms"),
            "loss",
            LOSS,
        ])?;
        for field in ["dport", "sport"] {
            tc(&[
                "filter", "add", "dev", "lo", "parent", "1:0", "protocol", "ip", "prio", "1",
                "u32", "match", "ip", field, &port, "0xffff", "flowid", "1:3",
            ])?;
        }
        Ok(())
    };
    match netem() {
        Ok(()) => Ok(Degraded::DelayAndLoss),
        Err(no_netem) => {
            let _ = tc(&["qdisc", "del", "dev", "lo", "root"]);
            for field in ["--dport", "--sport"] {
                iptables(&[
                    "-A",
                    "INPUT",
                    "-i",
                    "lo",
                    "-p",
                    "tcp",
                    field,
                    &port,
                    "-m",
                    "statistic",
                    "--mode",
                    "random",
                    "--probability",
                    "0.05",
                    "-j",
                    "DROP",
                ])?;
            }
            Ok(Degraded::LossOnly { no_netem })
        }
    }
}

/// Packets the iptables rules of [`degrade`] dropped.
fn iptables_dropped() -> u64 {
    let out = std::process::Command::new("iptables")
        .args(["-L", "INPUT", "-v", "-x", "-n"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    out.lines()
        .filter(|l| l.contains("DROP"))
        .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_and_loss_between_the_proxies_fail_nothing() {
    if std::env::var(IN_NETNS).is_err() {
        let test = "delay_and_loss_between_the_proxies_fail_nothing";
        match tokio::task::spawn_blocking(move || rerun_in_netns(test, IN_NETNS, "1", &[]))
            .await
            .expect("netns runner")
        {
            Ok(status) => assert!(status.success(), "the test failed in its namespace"),
            Err(why) => eprintln!("skipped: {why}"),
        }
        return;
    }
    let secs: u64 = std::env::var("PALISADE_NETEM_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15);
    let app = echo_app().await;
    // The product's default timeouts (connect 3 s, handshake 5 s), not the tests' short ones.
    let m = mesh(
        app.addr,
        MeshOpts {
            timeouts: Timeouts::default(),
            ..MeshOpts::default()
        },
    )
    .await;
    assert_eq!(get(m.upstream, "/").await.expect("warm").status, 200);
    let degraded = match degrade(m.server.inbound_addr.port()) {
        Ok(d) => d,
        Err(why) => {
            eprintln!("skipped: cannot degrade the link here: {why}");
            return;
        }
    };
    let link = match &degraded {
        Degraded::DelayAndLoss => format!("netem delay {DELAY_MS}ms loss {LOSS}"),
        Degraded::LossOnly { no_netem } => {
            println!("no netem in this kernel ({no_netem}): loss only, by iptables");
            format!("iptables statistic loss {LOSS}, no delay")
        }
    };

    let started = Instant::now();
    let legit = Legit::start(m.upstream, 8);
    // Opaque TCP: a new connection each time, so each pays a TCP and an mTLS handshake over
    // the lossy link; 4 at a time.
    let raw = m.raw_upstream;
    let tunnels: Vec<_> = (0..4)
        .map(|_| {
            tokio::spawn(async move {
                let mut results = Vec::new();
                let begun = Instant::now();
                while begun.elapsed() < Duration::from_secs(secs) && results.len() < 1_000 {
                    let t = Instant::now();
                    let ok = tokio::time::timeout(Duration::from_secs(15), get(raw, "/"))
                        .await
                        .is_ok_and(|r| r.is_ok_and(|r| r.status == 200));
                    results.push(ok.then(|| t.elapsed()));
                }
                results
            })
        })
        .collect();
    while started.elapsed() < Duration::from_secs(secs) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (requests, ok) = legit.finish_latencies().await;
    let mut opened = Vec::new();
    for t in tunnels {
        opened.extend(
            within_for(Duration::from_secs(60), t)
                .await
                .expect("tunnels"),
        );
    }
    let tunnels_ok: Vec<Duration> = {
        let mut v: Vec<Duration> = opened.iter().flatten().copied().collect();
        v.sort();
        v
    };
    let ejected = metric(
        &m.client,
        "palisade_endpoint_ejections_total",
        &[("dst_identity", API)],
    );
    let dropped = iptables_dropped();
    println!(
        "{link} both ways between the proxies, {secs} s ({dropped} packets dropped by iptables): \
         HTTP over the pooled connection {}/{requests} ok, p50 {:.0?} p99 {:.0?} max {:.0?}; \
         opaque connections (new mTLS each) {}/{} ok, p50 {:.0?} p99 {:.0?} max {:.0?}; \
         endpoint ejections {ejected}",
        ok.len(),
        quantile(&ok, 0.5),
        quantile(&ok, 0.99),
        ok.last().copied().unwrap_or_default(),
        tunnels_ok.len(),
        opened.len(),
        quantile(&tunnels_ok, 0.5),
        quantile(&tunnels_ok, 0.99),
        tunnels_ok.last().copied().unwrap_or_default(),
    );
    // The link was degraded: with netem a request needs a delayed round trip between the
    // proxies; with iptables, packets were dropped.
    match degraded {
        Degraded::DelayAndLoss => assert!(
            quantile(&ok, 0.5) >= Duration::from_millis(2 * DELAY_MS),
            "netem did not delay the requests"
        ),
        Degraded::LossOnly { .. } => assert!(dropped > 0, "iptables dropped nothing"),
    }
    assert!(requests >= 50, "too little traffic to judge: {requests}");
    assert_eq!(
        ok.len(),
        requests,
        "HTTP requests failed over the lossy link"
    );
    assert!(opened.len() >= 8, "too few connections to judge");
    // A new connection pays its TCP and mTLS handshakes over the link: when a SYN (or its
    // answer) is lost twice in a row, the retransmissions (1 s, then 2 s more) outlast the
    // 3 s connect timeout, as they would for any TCP client (CI saw 3 of 321). Most must
    // still get through; requests on the established connection all must.
    assert!(
        tunnels_ok.len() * 100 >= opened.len() * 97,
        "opaque connections failed over the lossy link: {} of {}",
        opened.len() - tunnels_ok.len(),
        opened.len()
    );
}
