//! What an app or a service speaks (the Kubernetes `appProtocol` / Istio port-name convention),
//! shared by the mesh file, the wire config (as the proto enum) and the proxy so the three
//! cannot drift apart.

use serde::{Deserialize, Serialize};

use crate::v1;

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
    /// The name in the mesh file and the proxy's static file.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Detect => "detect",
            Protocol::Http => "http",
            Protocol::Http2 => "http2",
            Protocol::Grpc => "grpc",
            Protocol::Opaque => "opaque",
        }
    }

    pub fn to_proto(self) -> v1::Protocol {
        match self {
            Protocol::Detect => v1::Protocol::Detect,
            Protocol::Http => v1::Protocol::Http,
            Protocol::Http2 => v1::Protocol::Http2,
            Protocol::Grpc => v1::Protocol::Grpc,
            Protocol::Opaque => v1::Protocol::Opaque,
        }
    }

    /// None for a value this build does not know (a newer control plane): refused by the
    /// caller, since guessing would change what reaches the app.
    pub fn from_proto(v: i32) -> Option<Self> {
        Some(match v1::Protocol::try_from(v).ok()? {
            v1::Protocol::Detect => Protocol::Detect,
            v1::Protocol::Http => Protocol::Http,
            v1::Protocol::Http2 => Protocol::Http2,
            v1::Protocol::Grpc => Protocol::Grpc,
            v1::Protocol::Opaque => Protocol::Opaque,
        })
    }

    /// Spoken over HTTP only: such an app or service is never reached through a tunnel.
    pub fn is_http(self) -> bool {
        matches!(self, Protocol::Http | Protocol::Http2 | Protocol::Grpc)
    }

    /// Parses a name as the proxy's static file writes it. An empty string is `detect`, and
    /// `tcp` is accepted for `opaque`.
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
            assert_eq!(Protocol::from_proto(p.to_proto() as i32), Some(p));
        }
        assert_eq!(Protocol::parse(""), Ok(Protocol::Detect));
        assert_eq!(Protocol::parse("tcp"), Ok(Protocol::Opaque));
        assert!(Protocol::parse("udp").is_err());
        assert_eq!(Protocol::from_proto(99), None);
    }
}
