//! How calls to a service are made: its request timeout and retry policy, as users write them
//! (mesh file `services[].timeout` / `retry`, the proxy's static config, Kubernetes Service
//! annotations) and as they travel (`v1::Service.request_timeout_ms` / `retry`).
//!
//! One type per concept, validated once where it is read, so the proxy only converts.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::v1;

/// The most attempts a policy may ask for (the first included).
pub const MAX_ATTEMPTS: u32 = 10;
/// The longest backoff a policy may ask for.
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// The longest request timeout.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// `retry:` as written: `{codes: [502, 503], attempts: 3, backoff: 25ms}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySpec {
    /// HTTP statuses that are retried.
    #[serde(default)]
    pub codes: Vec<u16>,
    /// Attempts in all, the first included; default 2.
    #[serde(default)]
    pub attempts: Option<u32>,
    /// Wait before the first retry, doubled for each next one; default 25ms.
    #[serde(default)]
    pub backoff: Option<String>,
}

/// A validated retry policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// HTTP statuses that are retried, sorted. Failures to reach an endpoint (connection
    /// refused or reset) are retried whatever these are.
    pub codes: Vec<u16>,
    /// Attempts in all, 2..=[`MAX_ATTEMPTS`].
    pub attempts: u32,
    pub backoff: Duration,
}

/// Why a timeout or retry policy was refused; the caller names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    #[error("attempts must be 2–{MAX_ATTEMPTS} (the first attempt included), not {0}")]
    Attempts(u32),
    #[error("{0} is not an HTTP status to retry (100–599)")]
    Code(u16),
    #[error("{0}")]
    Duration(String),
    #[error("must be at most {max}, not {got}")]
    TooLong { max: String, got: String },
    #[error("must be more than zero")]
    Zero,
}

fn duration(s: &str, max: Duration) -> Result<Duration, CallError> {
    let d = palisade_certs::parse_duration(s).map_err(|e| CallError::Duration(e.to_string()))?;
    if d > max {
        return Err(CallError::TooLong {
            max: format!("{max:?}"),
            got: s.to_string(),
        });
    }
    Ok(d)
}

/// A request timeout as written (`2s`, `500ms`).
pub fn parse_timeout(s: &str) -> Result<Duration, CallError> {
    let d = duration(s, MAX_TIMEOUT)?;
    if d.is_zero() {
        return Err(CallError::Zero);
    }
    Ok(d)
}

impl RetrySpec {
    pub fn validate(&self) -> Result<RetryPolicy, CallError> {
        let attempts = self.attempts.unwrap_or(2);
        if !(2..=MAX_ATTEMPTS).contains(&attempts) {
            return Err(CallError::Attempts(attempts));
        }
        let mut codes = self.codes.clone();
        if let Some(bad) = codes.iter().find(|c| !(100..=599).contains(*c)) {
            return Err(CallError::Code(*bad));
        }
        codes.sort_unstable();
        codes.dedup();
        let backoff = match &self.backoff {
            Some(b) => duration(b, MAX_BACKOFF)?,
            None => Duration::from_millis(25),
        };
        Ok(RetryPolicy {
            codes,
            attempts,
            backoff,
        })
    }
}

impl RetryPolicy {
    pub fn to_proto(&self) -> v1::RetryPolicy {
        v1::RetryPolicy {
            codes: self.codes.iter().map(|c| u32::from(*c)).collect(),
            attempts: self.attempts,
            backoff_ms: u64::try_from(self.backoff.as_millis()).unwrap_or(u64::MAX),
        }
    }

    /// What a proxy received, checked as the control plane checked what it read.
    pub fn from_proto(p: &v1::RetryPolicy) -> Result<Self, CallError> {
        let mut codes = Vec::with_capacity(p.codes.len());
        for c in &p.codes {
            match u16::try_from(*c) {
                Ok(c) if (100..=599).contains(&c) => codes.push(c),
                _ => return Err(CallError::Code(u16::try_from(*c).unwrap_or(u16::MAX))),
            }
        }
        if !(2..=MAX_ATTEMPTS).contains(&p.attempts) {
            return Err(CallError::Attempts(p.attempts));
        }
        let backoff = Duration::from_millis(p.backoff_ms);
        if backoff > MAX_BACKOFF {
            return Err(CallError::TooLong {
                max: format!("{MAX_BACKOFF:?}"),
                got: format!("{backoff:?}"),
            });
        }
        codes.sort_unstable();
        codes.dedup();
        Ok(RetryPolicy {
            codes,
            attempts: p.attempts,
            backoff,
        })
    }

    /// Whether a response with `status` is retried.
    pub fn retries_status(&self, status: u16) -> bool {
        self.codes.binary_search(&status).is_ok()
    }
}

/// A request timeout on the wire (0: none), checked.
pub fn timeout_from_proto(ms: u64) -> Result<Option<Duration>, CallError> {
    if ms == 0 {
        return Ok(None);
    }
    let d = Duration::from_millis(ms);
    if d > MAX_TIMEOUT {
        return Err(CallError::TooLong {
            max: format!("{MAX_TIMEOUT:?}"),
            got: format!("{d:?}"),
        });
    }
    Ok(Some(d))
}

pub fn timeout_to_proto(d: Option<Duration>) -> u64 {
    d.map_or(0, |d| {
        u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_policy_is_validated_and_survives_the_wire() {
        let spec = RetrySpec {
            codes: vec![503, 502, 503],
            attempts: Some(3),
            backoff: Some("50ms".into()),
        };
        let p = spec.validate().unwrap();
        assert_eq!(p.codes, [502, 503]);
        assert_eq!(RetryPolicy::from_proto(&p.to_proto()).unwrap(), p);
        assert!(p.retries_status(503) && !p.retries_status(500));
        let bad = |s: RetrySpec| s.validate().unwrap_err().to_string();
        assert!(
            bad(RetrySpec {
                attempts: Some(1),
                ..spec.clone()
            })
            .contains("attempts")
        );
        assert!(
            bad(RetrySpec {
                attempts: Some(11),
                ..spec.clone()
            })
            .contains("attempts")
        );
        assert!(
            bad(RetrySpec {
                codes: vec![600],
                ..spec.clone()
            })
            .contains("600")
        );
        assert!(
            bad(RetrySpec {
                backoff: Some("1h".into()),
                ..spec.clone()
            })
            .contains("at most")
        );
        assert!(
            bad(RetrySpec {
                backoff: Some("soon".into()),
                ..spec
            })
            .contains("soon")
        );
        let wire = v1::RetryPolicy {
            codes: vec![70_000],
            attempts: 2,
            backoff_ms: 0,
        };
        assert!(RetryPolicy::from_proto(&wire).is_err());
    }

    #[test]
    fn timeouts_are_positive_and_bounded() {
        assert_eq!(parse_timeout("2s").unwrap(), Duration::from_secs(2));
        assert!(parse_timeout("0s").is_err());
        assert!(parse_timeout("2d").is_err());
        assert_eq!(timeout_from_proto(0).unwrap(), None);
        assert_eq!(
            timeout_from_proto(timeout_to_proto(Some(Duration::from_millis(1500)))).unwrap(),
            Some(Duration::from_millis(1500))
        );
        assert!(timeout_from_proto(u64::MAX).is_err());
    }
}
