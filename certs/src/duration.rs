//! Durations that people write: the mesh file's `certificateLifetime` and every duration flag of
//! the CLI.
//!
//! These strings come from users (and, for the mesh file, arrive on a live reload), so parsing
//! must never panic: a value too large for a `Duration` is an error like any other typo. The
//! grammar is humantime's (`24h`, `90m`, `30s`, `1h30m`, `1h 30m`, `1.5h`, `500ms`, `1d`), with
//! two restrictions:
//!
//! - Months (`M`) and years (`y`) are refused: `1M` is a month where `1m` is a minute, a
//!   one-key slip that would turn a one-minute certificate into a thirty-day one, and no
//!   duration in Palisade is meant to be that long anyway.
//! - At most [`MAX_DIGITS`] digits per number and [`MAX_LEN`] bytes in all. humantime 2.4 still
//!   panics in `Duration::new` when the nanoseconds of several parts carry into a seconds
//!   count that is already `u64::MAX` (`18446744073709551615s 500ms 500ms`, humantime issue
//!   #66). With these bounds no input comes near that: each part is under
//!   10^12 weeks ≈ 6.1e17 s, at most four such parts fit in 64 bytes, and their sum stays
//!   below 3.1e18 s, far from `u64::MAX` ≈ 1.8e19 (and from `i64::MAX` ≈ 9.2e18, so adding
//!   the result to an `Instant` cannot overflow either).

use std::time::Duration;

/// The longest number (in digits) of one part of a duration.
pub const MAX_DIGITS: usize = 12;
/// The longest duration string, in bytes.
pub const MAX_LEN: usize = 64;

/// Units accepted: humantime's, without months and years.
const UNITS: &[&str] = &[
    "nanos", "nsec", "ns", "usec", "us", "µs", "millis", "msec", "ms", "seconds", "second", "secs",
    "sec", "s", "minutes", "minute", "min", "mins", "m", "hours", "hour", "hr", "hrs", "h", "days",
    "day", "d", "weeks", "week", "wk", "wks", "w",
];

const EXAMPLES: &str = "write e.g. 500ms, 30s, 90m, 24h or 1h30m";

/// Why a string is not a duration. The input is quoted (shortened if long) so that one log
/// line or one CLI error says what was wrong with what.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("an empty string is not a duration; {EXAMPLES}")]
    Empty,
    #[error("{input:?} is not a duration: {reason}; {EXAMPLES}")]
    Invalid { input: String, reason: String },
    #[error("{input:?} is too large a duration")]
    TooLarge { input: String },
}

/// The input as quoted in an error: a mesh file can hold any amount of garbage.
fn shown(s: &str) -> String {
    const SHOWN: usize = 40;
    match s.char_indices().nth(SHOWN) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// Parses a duration like `24h`, `90m`, `30s`, `1h30m`, `500ms`, `2s` or `1d`. A number
/// without a unit is refused: `10` could mean seconds or milliseconds.
pub fn parse_duration(s: &str) -> Result<Duration, DurationError> {
    let s = s.trim();
    if s.is_empty() {
        return Err(DurationError::Empty);
    }
    let invalid = |reason: String| DurationError::Invalid {
        input: shown(s),
        reason,
    };
    let too_large = || DurationError::TooLarge { input: shown(s) };
    if s.len() > MAX_LEN {
        return Err(too_large());
    }
    // Check every number and unit before humantime sees the string (see the module docs).
    let mut digits = 0usize;
    let mut unit = String::new();
    let check_unit = |unit: &mut String| -> Result<(), DurationError> {
        if !unit.is_empty() && !UNITS.contains(&unit.as_str()) {
            return Err(invalid(format!(
                "unknown unit {unit:?} (use ms, s, m, h or d)"
            )));
        }
        unit.clear();
        Ok(())
    };
    for c in s.chars() {
        if c.is_ascii_digit() {
            check_unit(&mut unit)?;
            digits += 1;
            if digits > MAX_DIGITS {
                return Err(too_large());
            }
        } else if c.is_alphabetic() {
            digits = 0;
            unit.push(c);
        } else {
            // Not a reset: humantime reads `1 2s` as 12 seconds, and `1.5` as one number.
            check_unit(&mut unit)?;
        }
    }
    check_unit(&mut unit)?;
    humantime::parse_duration(s).map_err(|e| match e {
        humantime::DurationError::NumberOverflow => too_large(),
        humantime::DurationError::Empty => DurationError::Empty,
        humantime::DurationError::UnknownUnit { unit, .. } if unit.is_empty() => {
            invalid("a number needs a unit".into())
        }
        other => invalid(other.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_was_accepted_before_still_is() {
        let ok = |s: &str| parse_duration(s).unwrap_or_else(|e| panic!("{s}: {e}"));
        assert_eq!(ok("24h"), Duration::from_secs(86400));
        assert_eq!(ok("90m"), Duration::from_secs(5400));
        assert_eq!(ok("30s"), Duration::from_secs(30));
        assert_eq!(ok("1h30m"), Duration::from_secs(5400));
        assert_eq!(ok("500ms"), Duration::from_millis(500));
        assert_eq!(ok("2s"), Duration::from_secs(2));
        assert_eq!(ok("1d"), Duration::from_secs(86400));
        assert_eq!(ok(" 8760h "), Duration::from_secs(8760 * 3600));
        assert_eq!(ok("0s"), Duration::ZERO);
    }

    #[test]
    fn bare_numbers_and_unknown_units_are_refused() {
        for s in [
            "10", "h", "5y", "1M", "3 years", "", "  ", "1x", "-1s", "1h-", "s1",
        ] {
            assert!(parse_duration(s).is_err(), "{s:?} was accepted");
        }
        let e = parse_duration("10").unwrap_err().to_string();
        assert!(e.contains("\"10\"") && e.contains("unit"), "{e}");
        let e = parse_duration("5y").unwrap_err().to_string();
        assert!(e.contains("unknown unit \"y\""), "{e}");
    }

    /// Each of these panicked (the first in the old parser, the others inside humantime 2.4)
    /// instead of returning an error.
    #[test]
    fn overflow_is_an_error_not_a_panic() {
        for s in [
            "18446744073709551615s1s",
            "18446744073709551615s 500ms 500ms",
            "18446744073709551615s500ms500ms",
            "18446744073709551615s 1000000000ns",
            "18446744073709551615s 999999999ns 1ns",
            "213503982334601d",
            "99999999999999999999999h",
            "1 8 4 4 6 7 4 4 0 7 3 7 0 9 5 5 1 6 1 5 s 500ms 500ms",
        ] {
            assert_eq!(
                parse_duration(s),
                Err(DurationError::TooLarge { input: shown(s) }),
                "{s}"
            );
        }
        // The largest parts the bounds let through still add up without overflowing.
        let big = "999999999999w999999999999w999999999999w999999999999w99999999999w";
        assert!(big.len() <= MAX_LEN);
        let d = parse_duration(big).expect("fits");
        assert!(d.as_secs() < i64::MAX as u64);
        let carry = "999999999999w 999999999999w 999999999999w 500ms 500ms";
        assert!(parse_duration(carry).is_ok());
    }

    #[test]
    fn long_input_is_shortened_in_the_error() {
        let s = "9".repeat(10_000) + "s";
        let e = parse_duration(&s).unwrap_err().to_string();
        assert!(e.len() < 120, "{e}");
    }
}
