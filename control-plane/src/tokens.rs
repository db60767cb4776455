//! Bootstrap tokens: each one certifies a single proxy start.
//!
//! A token that worked forever could be replayed, by anyone who ever read it, for as long as
//! the control plane runs. So a token is consumed by the first Certify that signs for it;
//! presenting it again is refused as `unauthenticated` and counted as
//! `palisade_identity_certificates_total{result="token_replayed"}`.
//!
//! Where tokens come from: [`crate::ControlPlaneConfig::tokens`] (given in memory) and the
//! tokens file, a JSON object of workload name to token that `palisade up` rewrites (temp file
//! and rename) with a fresh token right before it starts each proxy. The file is re-read on
//! every Certify that authenticates with a token (once per proxy start, so cheap), which is
//! how a running control plane learns the tokens `up` adds.
//!
//! Where consumption is recorded: `STATE_DIR/consumed-tokens`, one SHA-256 (hex) of a consumed
//! token per line, never the token itself. The line is appended and synced *before* the
//! certificate is returned, so a control plane that `up` restarts (it re-reads both files)
//! still refuses every token used before. `up` writes only the tokens file and the control
//! plane only the consumed list, so the two never race on one file. At start, lines for tokens
//! that no longer exist anywhere are dropped, which keeps the list as short as the tokens
//! file.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use palisade_certs::secure_fs;

/// The consumed-token list, under the state directory.
pub const CONSUMED_TOKENS_FILE: &str = "consumed-tokens";

/// Why the token store cannot start or record a use.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot read the tokens file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the tokens file {} is not a JSON object of workload name to token: {source}", path.display())]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("cannot record the token as used in {}: {source}", path.display())]
    Record {
        path: PathBuf,
        source: std::io::Error,
    },
}

type Digest = [u8; 32];

fn digest(token: &str) -> Digest {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

fn hex(d: &Digest) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex(s: &str) -> Option<Digest> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Compares two secrets in time that depends only on their lengths, so a caller cannot learn a
/// token byte by byte from response times.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn read_tokens_file(path: &Path) -> Result<HashMap<String, String>, TokenError> {
    let text = std::fs::read_to_string(path).map_err(|source| TokenError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| TokenError::Parse {
        path: path.to_path_buf(),
        source,
    })
}

struct Inner {
    /// Workload name -> token: the in-memory tokens, overlaid by the file's as last read.
    tokens: HashMap<String, String>,
    consumed: HashSet<Digest>,
    /// Tokens whose Certify is being signed right now: a second concurrent use is a replay.
    in_flight: HashSet<Digest>,
}

/// The bootstrap tokens and which of them are used up.
pub struct TokenStore {
    file: Option<PathBuf>,
    static_tokens: HashMap<String, String>,
    consumed_path: PathBuf,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for TokenStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the tokens themselves.
        f.debug_struct("TokenStore")
            .field("file", &self.file)
            .field("consumed_path", &self.consumed_path)
            .finish_non_exhaustive()
    }
}

/// What a presented token turned out to be.
#[derive(Debug)]
pub enum Claim {
    /// A live token of this workload, held for this call until committed or dropped.
    Owner(Reservation),
    /// Used before (or being used right now by another call).
    Replayed,
    /// Not a token of this mesh.
    Unknown,
}

/// A token held by one Certify call. [`Reservation::commit`] consumes it for good; dropping
/// it uncommitted (the call failed) releases it for another try.
#[derive(Debug)]
pub struct Reservation {
    store: Arc<TokenStore>,
    digest: Digest,
    workload: String,
}

impl Reservation {
    pub fn workload(&self) -> &str {
        &self.workload
    }

    /// Records the token as used, on disk first: if that fails the caller must not hand out
    /// the certificate, or a restart would let the token be used again.
    pub fn commit(self) -> Result<(), TokenError> {
        let mut line = hex(&self.digest);
        line.push('\n');
        secure_fs::append_private(&self.store.consumed_path, line.as_bytes()).map_err(
            |source| TokenError::Record {
                path: self.store.consumed_path.clone(),
                source,
            },
        )?;
        self.store.lock().consumed.insert(self.digest);
        Ok(())
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.store.lock().in_flight.remove(&self.digest);
    }
}

impl TokenStore {
    /// Reads the tokens file (if any; an unreadable or invalid one is an error here, as there
    /// is nothing older to fall back on) and the consumed list under `state_dir`.
    pub fn open(
        static_tokens: HashMap<String, String>,
        file: Option<&Path>,
        state_dir: &Path,
    ) -> Result<Arc<Self>, TokenError> {
        let mut tokens = static_tokens.clone();
        if let Some(f) = file {
            tokens.extend(read_tokens_file(f)?);
        }
        let consumed_path = state_dir.join(CONSUMED_TOKENS_FILE);
        let text = match std::fs::read_to_string(&consumed_path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(source) => {
                return Err(TokenError::Read {
                    path: consumed_path,
                    source,
                });
            }
        };
        let mut recorded = 0usize;
        let mut consumed = HashSet::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            recorded += 1;
            match from_hex(line.trim()) {
                Some(d) => {
                    consumed.insert(d);
                }
                // A torn last line from a crash mid-append: that token's certificate was
                // never returned, so forgetting it gives nothing away.
                None => {
                    tracing::warn!(path = %consumed_path.display(), "ignoring a malformed line of the consumed-token list")
                }
            }
        }
        let live: HashSet<Digest> = tokens.values().map(|t| digest(t)).collect();
        consumed.retain(|d| live.contains(d));
        if consumed.len() != recorded {
            let mut out = String::new();
            for d in &consumed {
                out.push_str(&hex(d));
                out.push('\n');
            }
            secure_fs::write_private_atomic(&consumed_path, out.as_bytes()).map_err(|source| {
                TokenError::Record {
                    path: consumed_path.clone(),
                    source,
                }
            })?;
        }
        Ok(Arc::new(Self {
            file: file.map(Path::to_path_buf),
            static_tokens,
            consumed_path,
            inner: Mutex::new(Inner {
                tokens,
                consumed,
                in_flight: HashSet::new(),
            }),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic elsewhere while holding the lock leaves the sets consistent (each update is
        // one insert or remove), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many tokens are known (for logs; never the tokens).
    pub fn len(&self) -> usize {
        self.lock().tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Looks `token` up. Every known token is compared, so the time taken does not say which
    /// workload (if any) came close.
    pub fn claim(self: &Arc<Self>, token: &str) -> Claim {
        let d = digest(token);
        let mut inner = self.lock();
        if inner.consumed.contains(&d) || inner.in_flight.contains(&d) {
            return Claim::Replayed;
        }
        if let Some(file) = &self.file {
            match read_tokens_file(file) {
                Ok(from_file) => {
                    let mut tokens = self.static_tokens.clone();
                    tokens.extend(from_file);
                    inner.tokens = tokens;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "keeping the bootstrap tokens read before");
                }
            }
        }
        let mut owner = None;
        for (name, t) in &inner.tokens {
            if !t.is_empty() && constant_time_eq(t.as_bytes(), token.as_bytes()) {
                owner = Some(name.clone());
            }
        }
        match owner {
            None => Claim::Unknown,
            Some(workload) => {
                inner.in_flight.insert(d);
                Claim::Owner(Reservation {
                    store: self.clone(),
                    digest: d,
                    workload,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ct_eq() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn hex_round_trip() {
        let d = digest("t");
        assert_eq!(from_hex(&hex(&d)), Some(d));
        assert_eq!(from_hex("zz"), None);
        assert_eq!(from_hex(&"é".repeat(32)), None);
    }

    #[test]
    fn a_token_is_consumed_once_and_released_if_the_call_fails() {
        let dir = tempfile::tempdir().unwrap();
        let tokens = HashMap::from([("web".to_string(), "tok-web".to_string())]);
        let store = TokenStore::open(tokens.clone(), None, dir.path()).unwrap();
        assert!(matches!(store.claim("nope"), Claim::Unknown));
        let Claim::Owner(r) = store.claim("tok-web") else {
            panic!("live token");
        };
        assert_eq!(r.workload(), "web");
        // Concurrent second use while the first is being signed.
        assert!(matches!(store.claim("tok-web"), Claim::Replayed));
        drop(r); // the first call failed: nothing consumed
        let Claim::Owner(r) = store.claim("tok-web") else {
            panic!("released");
        };
        r.commit().unwrap();
        assert!(matches!(store.claim("tok-web"), Claim::Replayed));
        // Survives a restart, and the list holds a digest, not the token.
        let again = TokenStore::open(tokens, None, dir.path()).unwrap();
        assert!(matches!(again.claim("tok-web"), Claim::Replayed));
        let list = std::fs::read_to_string(dir.path().join(CONSUMED_TOKENS_FILE)).unwrap();
        assert!(!list.contains("tok-web"));
        // Without the token anywhere, its line is dropped at the next start.
        let pruned = TokenStore::open(HashMap::new(), None, dir.path()).unwrap();
        assert!(matches!(pruned.claim("tok-web"), Claim::Unknown));
        let list = std::fs::read_to_string(dir.path().join(CONSUMED_TOKENS_FILE)).unwrap();
        assert!(list.trim().is_empty(), "{list:?}");
    }
}
