//! What an app or a service speaks (the Kubernetes `appProtocol` / Istio port-name convention),
//! shared by the mesh file, the wire config and the proxy so the three cannot drift apart.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1, HTTP/2 or opaque TCP, decided per connection by peeking.
    #[default]
    Detect,
    Http,
    Http2,
    Grpc,
    /// TCP with no detection delay (server-speaks-first protocols).
    Opaque,
}

impl Protocol {
    /// The wire name used in the proto (`ProxyConfig`).
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Detect => "detect",
            Protocol::Http => "http",
            Protocol::Http2 => "http2",
            Protocol::Grpc => "grpc",
            Protocol::Opaque => "opaque",
        }
    }

    /// Spoken over HTTP only: such an app or service is never reached through a tunnel.
    pub fn is_http(self) -> bool {
        matches!(self, Protocol::Http | Protocol::Http2 | Protocol::Grpc)
    }

    /// Parses a wire name. An empty string (an unset proto field) is `detect`, and `tcp` is
    /// accepted for `opaque`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "" | "detect" => Ok(Protocol::Detect),
            "http" => Ok(Protocol::Http),
            "http2" => Ok(Protocol::Http2),
            "grpc" => Ok(Protocol::Grpc),
            "opaque" | "tcp" => Ok(Protocol::Opaque),
            other => Err(format!(
                "unknown protocol {other:?} (expected detect, http, http2, grpc or opaque)"
            )),
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::Protocol;

    #[test]
    fn wire_names_round_trip() {
        for p in [
            Protocol::Detect,
            Protocol::Http,
            Protocol::Http2,
            Protocol::Grpc,
            Protocol::Opaque,
        ] {
            assert_eq!(Protocol::parse(p.as_str()), Ok(p));
        }
        assert_eq!(Protocol::parse(""), Ok(Protocol::Detect));
        assert_eq!(Protocol::parse("tcp"), Ok(Protocol::Opaque));
        assert!(Protocol::parse("udp").is_err());
    }
}
