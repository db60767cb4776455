//! How far request paths are normalized before authorization (Istio's mesh-wide
//! `pathNormalization`), shared by the mesh file, the wire config and the proxy.

use serde::{Deserialize, Serialize};

use crate::v1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PathNormalization {
    /// RFC 3986 normalization: unreserved escapes decoded, `\` to `/`, dot segments resolved.
    #[default]
    Base,
    /// `Base`, then runs of `/` merged into one.
    MergeSlashes,
    /// `%2F` and `%5C` decoded as `/` as well, then `MergeSlashes`.
    DecodeAndMergeSlashes,
}

impl PathNormalization {
    pub fn as_str(self) -> &'static str {
        match self {
            PathNormalization::Base => "BASE",
            PathNormalization::MergeSlashes => "MERGE_SLASHES",
            PathNormalization::DecodeAndMergeSlashes => "DECODE_AND_MERGE_SLASHES",
        }
    }

    pub fn to_proto(self) -> v1::PathNormalization {
        match self {
            PathNormalization::Base => v1::PathNormalization::Base,
            PathNormalization::MergeSlashes => v1::PathNormalization::MergeSlashes,
            PathNormalization::DecodeAndMergeSlashes => {
                v1::PathNormalization::DecodeAndMergeSlashes
            }
        }
    }

    /// An unknown wire value (a newer control plane) is refused by the caller rather than
    /// guessed: guessing a weaker level would reopen bypasses.
    pub fn from_proto(v: i32) -> Option<Self> {
        match v1::PathNormalization::try_from(v).ok()? {
            v1::PathNormalization::Base => Some(PathNormalization::Base),
            v1::PathNormalization::MergeSlashes => Some(PathNormalization::MergeSlashes),
            v1::PathNormalization::DecodeAndMergeSlashes => {
                Some(PathNormalization::DecodeAndMergeSlashes)
            }
        }
    }
}

impl std::fmt::Display for PathNormalization {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::PathNormalization;

    #[test]
    fn proto_round_trip() {
        for p in [
            PathNormalization::Base,
            PathNormalization::MergeSlashes,
            PathNormalization::DecodeAndMergeSlashes,
        ] {
            assert_eq!(PathNormalization::from_proto(p.to_proto() as i32), Some(p));
        }
        assert_eq!(PathNormalization::from_proto(99), None);
    }
}
