//! W3C trace context through a proxy pair: the app receives the caller's trace with the
//! receiving proxy's span as parent, or a new trace when the caller sent none; B3 is accepted.

mod support;

use support::*;

const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn traceparent(r: &Reply) -> Vec<String> {
    r.header("x-echo-traceparent")
        .expect("the app got a traceparent")
        .split('-')
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_continues_the_callers_trace_with_a_span_of_each_proxy() {
    init();
    let m = mesh(echo_app().await.addr, MeshOpts::default()).await;
    let up = upstream_addr(&m.client, SERVICE);
    let mut c = h1_client(up).await;
    let send = |extra: &[(&'static str, &'static str)]| {
        let mut b = http::Request::get("/").header(http::header::HOST, "api.demo");
        for (k, v) in extra {
            b = b.header(*k, *v);
        }
        b.body(empty()).expect("request")
    };
    let r = h1_send(
        &mut c,
        send(&[("traceparent", TP), ("tracestate", "vendor=x")]),
    )
    .await
    .expect("response");
    let p = traceparent(&r);
    assert_eq!(
        p[1], "4bf92f3577b34da6a3ce929d0e0e4736",
        "the caller's trace"
    );
    assert_ne!(
        p[2], "00f067aa0ba902b7",
        "the receiving proxy's own span is the parent"
    );
    assert_eq!(p[3], "01");

    // No trace context: one starts at the caller's proxy, sampled.
    let a = traceparent(&h1_send(&mut c, send(&[])).await.expect("response"));
    let b = traceparent(&h1_send(&mut c, send(&[])).await.expect("response"));
    assert_eq!((a[1].len(), a[2].len(), a[3].as_str()), (32, 16, "01"));
    assert_ne!(a[1], b[1], "each request its own trace");

    // B3 from an older client continues its trace.
    let r = h1_send(
        &mut c,
        send(&[("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1")]),
    )
    .await
    .expect("response");
    assert_eq!(traceparent(&r)[1], "80f198ee56343ba864fe8b2a57d3eff7");
}
