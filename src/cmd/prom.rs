//! The one reader of Prometheus / OpenMetrics text in the CLI: what a proxy's admin `/metrics`
//! (prometheus-client's OpenMetrics encoder) and the control plane's `/metrics` print.
//!
//! A sample line is `name{label="value",...} value [timestamp] [# {exemplar labels} v [ts]]`:
//! label values are quoted with `\\`, `\"` and `\n` escapes (a `}` or `,` inside quotes is
//! text, not syntax), the label set may be absent or empty, whitespace around labels and a
//! trailing comma are allowed, and the exemplar after the value is ignored. The quoted-name
//! form of newer Prometheus versions (`{"name", label="value"} 1`) is read too. Comment lines
//! (`# HELP`, `# TYPE`, `# UNIT`, `# EOF`) and blank lines are skipped; a line that is not a
//! sample is skipped by [`parse`], so one odd line never hides the others.

use std::collections::BTreeMap;

/// One sample: metric name (with its `_total`, `_bucket`... suffix as printed), labels, value.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    /// A label's value, or the empty string when the sample does not have it (as PromQL
    /// treats an absent label).
    pub fn label(&self, name: &str) -> &str {
        self.labels.get(name).map(String::as_str).unwrap_or("")
    }
}

/// Every sample of `text`; lines that are not samples are skipped.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter_map(|l| parse_line(l).ok().flatten())
        .collect()
}

/// Sum of the samples named `name` for which `keep` holds.
pub fn sum(samples: &[Sample], name: &str, keep: impl Fn(&Sample) -> bool) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name && keep(s))
        .map(|s| s.value)
        .sum()
}

/// The value of the first sample named `name` (a gauge or counter without labels).
pub fn value(samples: &[Sample], name: &str) -> Option<f64> {
    samples.iter().find(|s| s.name == name).map(|s| s.value)
}

/// One line: `Ok(None)` for a comment or a blank line, `Err` with what is wrong for a line
/// that is neither a comment nor a sample.
pub fn parse_line(line: &str) -> Result<Option<Sample>, String> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return Ok(None);
    }
    let mut name_end = 0;
    for (i, c) in line.char_indices() {
        let ok = c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit());
        if !ok {
            break;
        }
        name_end = i + c.len_utf8();
    }
    let mut name = line[..name_end].to_string();
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(after) = rest.strip_prefix('{') {
        rest = parse_labels(after, &mut labels, &mut name)?;
    } else if name.is_empty() {
        return Err(format!("not a sample line: {line:?}"));
    }
    if name.is_empty() {
        return Err(format!("a sample without a metric name: {line:?}"));
    }
    if !rest.starts_with([' ', '\t']) {
        return Err(format!("no value after {name}: {line:?}"));
    }
    let token = rest
        .split_whitespace()
        .next()
        .ok_or_else(|| format!("no value after {name}: {line:?}"))?;
    let value = parse_value(token).ok_or_else(|| format!("{token:?} is not a number: {line:?}"))?;
    Ok(Some(Sample {
        name,
        labels,
        value,
    }))
}

/// A sample value: a decimal or exponent float, `+Inf`/`-Inf`/`Inf`, `NaN`.
fn parse_value(token: &str) -> Option<f64> {
    match token {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        t => t.parse().ok(),
    }
}

/// Reads `k="v", ...}` (the text after the opening brace) into `labels`; a bare quoted string
/// is the metric name (the quoted-name form). Returns the text after the closing brace.
fn parse_labels<'a>(
    mut s: &'a str,
    labels: &mut BTreeMap<String, String>,
    name: &mut String,
) -> Result<&'a str, String> {
    loop {
        s = s.trim_start();
        if let Some(rest) = s.strip_prefix('}') {
            return Ok(rest);
        }
        let (key, rest) = if s.starts_with('"') {
            let (quoted, rest) = quoted(s)?;
            let rest = rest.trim_start();
            if rest.starts_with([',', '}']) {
                // `{"metric.name", ...}`: the name itself.
                if !name.is_empty() {
                    return Err(format!("two metric names ({name:?} and {quoted:?})"));
                }
                *name = quoted;
                s = rest.strip_prefix(',').unwrap_or(rest);
                continue;
            }
            (quoted, rest)
        } else {
            let end = s
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .ok_or("a label set without a closing brace")?;
            if end == 0 {
                return Err(format!("expected a label name at {s:?}"));
            }
            (s[..end].to_string(), s[end..].trim_start())
        };
        let rest = rest
            .strip_prefix('=')
            .ok_or_else(|| format!("expected = after label {key:?}"))?
            .trim_start();
        let (value, rest) = quoted(rest)?;
        labels.insert(key, value);
        let rest = rest.trim_start();
        s = match rest.strip_prefix(',') {
            Some(r) => r,
            None if rest.starts_with('}') => rest,
            None => return Err(format!("expected , or }} at {rest:?}")),
        };
    }
}

/// A double-quoted string at the start of `s`, unescaped; and the text after it.
fn quoted(s: &str) -> Result<(String, &str), String> {
    let body = s
        .strip_prefix('"')
        .ok_or_else(|| format!("expected a quoted value at {s:?}"))?;
    let mut out = String::new();
    let mut chars = body.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Ok((out, &body[i + 1..])),
            '\\' => match chars.next() {
                Some((_, 'n')) => out.push('\n'),
                Some((_, '"')) => out.push('"'),
                Some((_, '\\')) => out.push('\\'),
                // Not an escape the format defines: kept as written.
                Some((_, other)) => {
                    out.push('\\');
                    out.push(other);
                }
                None => break,
            },
            c => out.push(c),
        }
    }
    Err("an unterminated quoted string".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(line: &str) -> Sample {
        parse_line(line)
            .unwrap_or_else(|e| panic!("{line}: {e}"))
            .unwrap_or_else(|| panic!("{line}: not a sample"))
    }

    #[test]
    fn samples_with_and_without_labels() {
        let s = one("palisade_config_version 7");
        assert_eq!((s.name.as_str(), s.value), ("palisade_config_version", 7.0));
        assert!(s.labels.is_empty());
        let s = one(r#"palisade_requests_total{direction="inbound",status_code="200"} 12"#);
        assert_eq!(s.name, "palisade_requests_total");
        assert_eq!(s.label("direction"), "inbound");
        assert_eq!(s.label("status_code"), "200");
        assert_eq!(s.label("absent"), "");
        assert_eq!(s.value, 12.0);
        let s = one("x{} 1.5e-3");
        assert!(s.labels.is_empty());
        assert_eq!(s.value, 0.0015);
    }

    #[test]
    fn quoted_values_keep_commas_braces_spaces_and_escapes() {
        let s = one(r#"m_total{route="demo/a,b/r}1",path="say \"hi\"\\n x",nl="a\nb"} 3"#);
        assert_eq!(s.label("route"), "demo/a,b/r}1");
        assert_eq!(s.label("path"), "say \"hi\"\\n x");
        assert_eq!(s.label("nl"), "a\nb");
        let s = one(r#"m{route=""} 1"#);
        assert_eq!(s.labels.get("route").map(String::as_str), Some(""));
    }

    #[test]
    fn whitespace_trailing_comma_timestamps_and_exemplars() {
        let s = one(r#"m_total{ a = "1" , b="2", } 4 1700000000"#);
        assert_eq!((s.label("a"), s.label("b"), s.value), ("1", "2", 4.0));
        let s = one(r#"m_total{a="1"} 5 # {trace_id="abc"} 1.0 1700000000.5"#);
        assert_eq!(s.value, 5.0);
        let s = one(r#"m_bucket{le="0.5"} 2 # {trace_id="x y"} 0.3"#);
        assert_eq!((s.label("le"), s.value), ("0.5", 2.0));
    }

    #[test]
    fn special_values() {
        assert_eq!(one("m +Inf").value, f64::INFINITY);
        assert_eq!(one("m -Inf").value, f64::NEG_INFINITY);
        assert!(one("m NaN").value.is_nan());
        assert_eq!(one("m 0.123456").value, 0.123456);
    }

    #[test]
    fn quoted_metric_names() {
        let s = one(r#"{"my.metric", le="1"} 9"#);
        assert_eq!(
            (s.name.as_str(), s.label("le"), s.value),
            ("my.metric", "1", 9.0)
        );
    }

    #[test]
    fn comments_blank_lines_and_eof_are_not_samples() {
        for l in [
            "# HELP m Help text.",
            "# TYPE m counter",
            "# EOF",
            "",
            "   ",
        ] {
            assert_eq!(parse_line(l), Ok(None), "{l:?}");
        }
    }

    #[test]
    fn broken_lines_are_errors_and_parse_skips_them() {
        for l in [
            "m",
            r#"m{a="1" 2"#,
            r#"m{a=1} 2"#,
            r#"m{a="1"}"#,
            "m one",
            r#"m{a="unterminated} 1"#,
            "{} 1",
            "-5 1",
        ] {
            assert!(parse_line(l).is_err(), "{l:?} parsed");
        }
        let text = "# TYPE a counter\na_total 1\nbroken{\nb_total{x=\"y\"} 2\n# EOF\n";
        let samples = parse(text);
        assert_eq!(samples.len(), 2);
        assert_eq!(sum(&samples, "b_total", |s| s.label("x") == "y"), 2.0);
        assert_eq!(value(&samples, "a_total"), Some(1.0));
        assert_eq!(value(&samples, "c"), None);
    }

    /// What prometheus-client's OpenMetrics encoder prints for a counter family with float
    /// values, a gauge and a histogram.
    #[test]
    fn a_whole_openmetrics_exposition() {
        let text = r#"# HELP palisade_cost_cpu_seconds CPU time apportioned to requests.
# TYPE palisade_cost_cpu_seconds counter
palisade_cost_cpu_seconds_total{src_identity="spiffe://cluster.local/ns/demo/sa/web",dst_identity="spiffe://cluster.local/ns/demo/sa/api",route=""} 0.0125
palisade_cost_cpu_seconds_total{src_identity="unknown",dst_identity="spiffe://cluster.local/ns/demo/sa/api",route="demo/r/0"} 0.5
# HELP palisade_proxy_start_time_seconds When the proxy started.
# TYPE palisade_proxy_start_time_seconds gauge
palisade_proxy_start_time_seconds 1764000000.25
# TYPE palisade_request_duration_seconds histogram
palisade_request_duration_seconds_sum{direction="inbound"} 0.5
palisade_request_duration_seconds_count{direction="inbound"} 3
palisade_request_duration_seconds_bucket{le="0.001",direction="inbound"} 1
palisade_request_duration_seconds_bucket{le="+Inf",direction="inbound"} 3
# EOF
"#;
        let s = parse(text);
        assert_eq!(s.len(), 7);
        assert_eq!(sum(&s, "palisade_cost_cpu_seconds_total", |_| true), 0.5125);
        assert_eq!(
            value(&s, "palisade_proxy_start_time_seconds"),
            Some(1764000000.25)
        );
        assert_eq!(
            sum(&s, "palisade_request_duration_seconds_bucket", |s| s
                .label("le")
                == "+Inf"),
            3.0
        );
    }
}
