//! A minimal HTTP/1.1 client for talking to admin ports (readiness, status, shutdown).

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

pub async fn request(
    method: Method,
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> anyhow::Result<(StatusCode, String)> {
    request_with(method, addr, path, timeout, &[]).await
}

pub async fn request_with(
    method: Method,
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
    headers: &[(&str, &str)],
) -> anyhow::Result<(StatusCode, String)> {
    let fut = async {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, addr.to_string());
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Empty::<Bytes>::new())?;
        let rsp = send.send_request(req).await?;
        let status = rsp.status();
        let body = rsp.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| anyhow::anyhow!("{addr}{path} did not answer within {timeout:?}"))?
}

pub async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<(StatusCode, String)> {
    request(Method::GET, addr, path, Duration::from_secs(2)).await
}
