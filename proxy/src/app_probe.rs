//! Runs the app's kubelet probes that the injector pointed at the admin port
//! ([`palisade_api::app_probe`]): the same check the kubelet would make, from inside the pod on
//! loopback, so the app's ports stay behind the proxy under STRICT mTLS.
//!
//! The answer carries the app's status code (an HTTP probe) or 200 (a TCP connection made);
//! a connection refused, a timeout or a broken response is 503 with the reason, which
//! `kubectl describe pod` shows in the probe's failure event.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;
use palisade_api::app_probe::{AppProbe, HttpGet};
use tokio::net::TcpStream;

use crate::admin::text;

/// The kubelet's User-Agent, so an app that logs or special-cases probes sees the same.
const USER_AGENT: &str = "kube-probe/palisade";

/// Runs `probe` against the app and answers as the app (or the connection) did.
pub async fn run(probe: &AppProbe) -> Response<Full<Bytes>> {
    let limit = Duration::from_secs(u64::from(probe.timeout_seconds.max(1)));
    let outcome = tokio::time::timeout(limit, async {
        match (&probe.http_get, &probe.tcp_socket) {
            (Some(get), _) => http_get(get).await,
            (None, Some(tcp)) => TcpStream::connect(("127.0.0.1", tcp.port))
                .await
                .map(|_| StatusCode::OK)
                .map_err(|e| format!("connect to 127.0.0.1:{}: {e}", tcp.port)),
            (None, None) => Err("no probe".to_string()),
        }
    })
    .await;
    match outcome {
        Ok(Ok(status)) => text(status, Bytes::new()),
        Ok(Err(why)) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("probe failed: {why}\n"),
        ),
        Err(_) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("probe failed: no answer within {limit:?}\n"),
        ),
    }
}

async fn http_get(get: &HttpGet) -> Result<StatusCode, String> {
    let addr = format!("127.0.0.1:{}", get.port);
    let tcp = TcpStream::connect(&addr)
        .await
        .map_err(|e| format!("connect to {addr}: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| format!("HTTP to {addr}: {e}"))?;
    let conn = tokio::spawn(conn);
    let mut req = Request::get(get.path.as_str())
        .header(http::header::HOST, addr.as_str())
        .header(http::header::USER_AGENT, USER_AGENT)
        .header(http::header::ACCEPT, "*/*");
    for h in &get.http_headers {
        req = req.header(h.name.as_str(), h.value.as_str());
    }
    let req = req
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("the probe's request: {e}"))?;
    let rsp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("HTTP to {addr}: {e}"))?;
    let status = rsp.status();
    // The kubelet reads at most 10 KiB of the body; the status is what counts.
    let _ = http_body_util::Limited::new(rsp.into_body(), 10 << 10)
        .collect()
        .await;
    conn.abort();
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_api::app_probe::{Header, TcpSocket};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A one-request HTTP server answering `status`; returns its port and what it received.
    async fn app(status: u16) -> (u16, tokio::task::JoinHandle<String>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let mut got = Vec::new();
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            let rsp = format!("HTTP/1.1 {status} X\r\ncontent-length: 2\r\n\r\nok");
            s.write_all(rsp.as_bytes()).await.unwrap();
            String::from_utf8_lossy(&got).into_owned()
        });
        (port, task)
    }

    fn get(port: u16) -> AppProbe {
        AppProbe {
            http_get: Some(HttpGet {
                port,
                path: "/healthz?deep=1".into(),
                http_headers: vec![Header {
                    name: "X-Probe".into(),
                    value: "yes".into(),
                }],
            }),
            tcp_socket: None,
            timeout_seconds: 5,
        }
    }

    #[tokio::test]
    async fn an_http_probe_answers_with_the_apps_status() {
        for status in [200, 302, 500] {
            let (port, seen) = app(status).await;
            let rsp = run(&get(port)).await;
            assert_eq!(rsp.status().as_u16(), status);
            let req = seen.await.unwrap();
            assert!(req.starts_with("GET /healthz?deep=1 HTTP/1.1\r\n"), "{req}");
            assert!(req.to_lowercase().contains("x-probe: yes"), "{req}");
            assert!(req.contains(USER_AGENT), "{req}");
        }
    }

    #[tokio::test]
    async fn a_closed_port_fails_the_probe() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        assert_eq!(
            run(&get(port)).await.status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        let tcp = AppProbe {
            http_get: None,
            tcp_socket: Some(TcpSocket { port }),
            timeout_seconds: 1,
        };
        assert_eq!(run(&tcp).await.status(), StatusCode::SERVICE_UNAVAILABLE);
    }

    /// Accepts and never answers: the timeout decides (paused time: no real second passes).
    #[tokio::test(start_paused = true)]
    async fn a_silent_app_fails_the_probe_at_its_timeout() {
        let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut probe = get(silent.local_addr().unwrap().port());
        probe.timeout_seconds = 1;
        let rsp = run(&probe).await;
        assert_eq!(rsp.status(), StatusCode::SERVICE_UNAVAILABLE);
        let body = rsp.into_body().collect().await.unwrap().to_bytes();
        assert!(String::from_utf8_lossy(&body).contains("no answer within"));
    }

    #[tokio::test]
    async fn a_tcp_probe_succeeds_when_the_port_accepts() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let probe = AppProbe {
            http_get: None,
            tcp_socket: Some(TcpSocket {
                port: l.local_addr().unwrap().port(),
            }),
            timeout_seconds: 1,
        };
        assert_eq!(run(&probe).await.status(), StatusCode::OK);
    }
}
