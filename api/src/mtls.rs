//! The mTLS mode of a workload's inbound side (Istio's PeerAuthentication modes): one type for
//! the policy resources, the wire config and the proxy, so a mode cannot mean one thing on one
//! side and another on the other.

use serde::{Deserialize, Serialize};

use crate::v1;

/// STRICT: mTLS only; PERMISSIVE: mTLS or plaintext; DISABLE: plaintext; UNSET: inherit
/// (the namespace's, then the mesh's, then STRICT).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "UPPERCASE")]
pub enum MtlsMode {
    /// Inherit from the level above (workload → namespace → mesh); nothing above: STRICT.
    #[default]
    Unset,
    Strict,
    Permissive,
    Disable,
}

impl MtlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            MtlsMode::Unset => "UNSET",
            MtlsMode::Strict => "STRICT",
            MtlsMode::Permissive => "PERMISSIVE",
            MtlsMode::Disable => "DISABLE",
        }
    }

    /// The mode a proxy enforces: UNSET means nothing said otherwise, and the mesh default is
    /// STRICT. A proxy never holds UNSET, so "not STRICT" can never mean "plaintext by
    /// accident".
    pub fn effective(self) -> Self {
        match self {
            MtlsMode::Unset => MtlsMode::Strict,
            m => m,
        }
    }

    pub fn to_proto(self) -> v1::MtlsMode {
        match self {
            MtlsMode::Unset => v1::MtlsMode::Unset,
            MtlsMode::Strict => v1::MtlsMode::Strict,
            MtlsMode::Permissive => v1::MtlsMode::Permissive,
            MtlsMode::Disable => v1::MtlsMode::Disable,
        }
    }

    /// None for a value this build does not know (a newer control plane): the caller decides
    /// how to fail, and the proxy fails to STRICT.
    pub fn from_proto(v: i32) -> Option<Self> {
        Some(match v1::MtlsMode::try_from(v).ok()? {
            v1::MtlsMode::Unset => MtlsMode::Unset,
            v1::MtlsMode::Strict => MtlsMode::Strict,
            v1::MtlsMode::Permissive => MtlsMode::Permissive,
            v1::MtlsMode::Disable => MtlsMode::Disable,
        })
    }
}

impl std::fmt::Display for MtlsMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::MtlsMode;

    #[test]
    fn proto_round_trip() {
        for m in [
            MtlsMode::Unset,
            MtlsMode::Strict,
            MtlsMode::Permissive,
            MtlsMode::Disable,
        ] {
            assert_eq!(MtlsMode::from_proto(m.to_proto() as i32), Some(m));
            assert_eq!(
                m.to_proto().as_str_name(),
                m.as_str().replace("UNSET", "MTLS_MODE_UNSET")
            );
        }
        assert_eq!(MtlsMode::from_proto(99), None);
        assert_eq!(MtlsMode::Unset.effective(), MtlsMode::Strict);
        assert_eq!(MtlsMode::Disable.effective(), MtlsMode::Disable);
    }
}
