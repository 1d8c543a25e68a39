//! A parser for Prometheus's text exposition format, as much of it as the proxy writes:
//! `# HELP`/`# TYPE` lines are skipped, every other line is one sample
//! `name{label="value",...} value`. Label values are unescaped (`\\`, `\"`, `\n`).
//!
//! Tests assert exact series (`Scrape::value`), sums over label sets (`Scrape::sum`),
//! and histogram buckets (`Scrape::samples`).

use std::fmt;

/// One sample line.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    /// The value of label `name`, if the sample has it.
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Whether every `(label, value)` of `want` is on this sample.
    pub fn has(&self, want: &[(&str, &str)]) -> bool {
        want.iter().all(|(k, v)| self.label(k) == Some(*v))
    }
}

impl fmt::Display for Sample {
    /// The series as exposed, without the value: `name{a="1",b="2"}`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)?;
        if !self.labels.is_empty() {
            f.write_str("{")?;
            for (i, (k, v)) in self.labels.iter().enumerate() {
                if i > 0 {
                    f.write_str(",")?;
                }
                write!(f, "{k}=\"{}\"", escape(v))?;
            }
            f.write_str("}")?;
        }
        Ok(())
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A line that is not a sample.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseError {
    pub line: usize,
    pub text: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: not a sample: {:?}", self.line, self.text)
    }
}

impl std::error::Error for ParseError {}

/// Every sample of one scrape.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Scrape {
    pub samples: Vec<Sample>,
}

impl Scrape {
    /// Parses a whole scrape; fails on the first line that is neither a comment, blank, nor
    /// a sample.
    pub fn parse(text: &str) -> Result<Scrape, ParseError> {
        let mut samples = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            samples.push(parse_sample(line).ok_or_else(|| ParseError {
                line: i + 1,
                text: line.to_owned(),
            })?);
        }
        Ok(Scrape { samples })
    }

    /// The samples named `name` that carry every label of `labels`.
    pub fn samples<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples
            .iter()
            .filter(move |s| s.name == name && s.has(labels))
    }

    /// The sum over every sample named `name` that carries every label of `labels` (0 when
    /// there is none: a counter not yet incremented may not be exposed).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples(name, labels).map(|s| s.value).sum()
    }

    /// The value of one series, written as exposed (`name` or `name{a="1",b="2"}`, labels
    /// in any order), or `None` if the scrape does not have it.
    pub fn value(&self, series: &str) -> Option<f64> {
        let want = parse_series(series)?;
        self.samples
            .iter()
            .find(|s| {
                s.name == want.name
                    && s.labels.len() == want.labels.len()
                    && want.labels.iter().all(|(k, v)| s.label(k) == Some(v))
            })
            .map(|s| s.value)
    }
}

/// The value of one series in a scrape's text; panics with the scrape when the series is
/// missing or the text does not parse (for tests, whose failure should show the scrape).
pub fn value(text: &str, series: &str) -> f64 {
    let scrape = Scrape::parse(text).unwrap_or_else(|e| panic!("{e} in:\n{text}"));
    scrape
        .value(series)
        .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
}

/// `name{labels} value [timestamp]`.
fn parse_sample(line: &str) -> Option<Sample> {
    let (series, rest) = match line.find('{') {
        Some(open) if open < line.find(' ').unwrap_or(usize::MAX) => {
            let close = closing_brace(line, open)?;
            (&line[..=close], &line[close + 1..])
        }
        _ => {
            let space = line.find(' ')?;
            (&line[..space], &line[space..])
        }
    };
    let mut sample = parse_series(series)?;
    let value = rest.split_whitespace().next()?;
    sample.value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().ok()?,
    };
    Some(sample)
}

/// The index of the `}` closing the label set opened at `open`, skipping quoted values.
fn closing_brace(line: &str, open: usize) -> Option<usize> {
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in line[open..].char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '}' if !quoted => return Some(open + i),
            _ => {}
        }
    }
    None
}

/// `name` or `name{a="1",b="2"}` (no value).
fn parse_series(series: &str) -> Option<Sample> {
    let (name, labels) = match series.split_once('{') {
        None => (series, ""),
        Some((name, rest)) => (name, rest.strip_suffix('}')?),
    };
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    {
        return None;
    }
    let mut out = Vec::new();
    let mut rest = labels;
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                '"' => break i,
                c => value.push(c),
            }
        };
        out.push((key.trim().to_owned(), value));
        rest = after[end + 1..].trim_start_matches(',').trim_start();
    }
    Some(Sample {
        name: name.to_owned(),
        labels: out,
        value: 0.0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP x_total things\n# TYPE x_total counter\n\
        x_total{result=\"hit\",route=\"/a\"} 3\n\
        x_total{result=\"miss\",route=\"/a\"} 2\n\
        x_total{result=\"odd\\\"quote}\",route=\"/b\"} 1\n\
        up 1\n\
        h_bucket{le=\"+Inf\"} 7\n";

    #[test]
    fn parses_samples_labels_and_escapes() {
        let s = Scrape::parse(TEXT).unwrap();
        assert_eq!(s.samples.len(), 5);
        assert_eq!(s.samples[2].label("result"), Some("odd\"quote}"));
        assert_eq!(
            s.samples[2].to_string(),
            "x_total{result=\"odd\\\"quote}\",route=\"/b\"}"
        );
        assert_eq!(s.samples[4].value, 7.0);
    }

    #[test]
    fn values_sums_and_missing_series() {
        let s = Scrape::parse(TEXT).unwrap();
        assert_eq!(s.value("x_total{route=\"/a\",result=\"hit\"}"), Some(3.0));
        assert_eq!(s.value("up"), Some(1.0));
        assert_eq!(
            s.value("x_total{result=\"hit\"}"),
            None,
            "labels must match exactly"
        );
        assert_eq!(s.sum("x_total", &[("route", "/a")]), 5.0);
        assert_eq!(s.sum("x_total", &[]), 6.0);
        assert_eq!(s.sum("absent_total", &[]), 0.0);
    }

    #[test]
    fn refuses_what_is_not_a_sample() {
        assert!(Scrape::parse("x_total{a=\"1\" 3").is_err());
        assert!(Scrape::parse("x_total notanumber").is_err());
        assert!(Scrape::parse("{a=\"1\"} 3").is_err());
    }
}
