//! Statistics over samples (percentiles, medians, answers by status) and the number formats
//! of the report and the progress lines.

use std::collections::BTreeMap;

use crate::client::{Outcome, Sample};

/// The p-th percentile (nearest rank) of unsorted values.
pub(crate) fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

pub(crate) fn ms(s: f64) -> String {
    if s.is_nan() {
        "n/a".into()
    } else if s < 0.01 {
        format!("{:.2} ms", s * 1e3)
    } else {
        format!("{:.1} ms", s * 1e3)
    }
}

pub(crate) fn secs(s: f64) -> String {
    if s.is_nan() {
        "n/a".into()
    } else {
        format!("{s:.3} s")
    }
}

pub(crate) fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
}

pub(crate) fn ratio(a: f64, b: f64) -> String {
    if b == 0.0 || a.is_nan() || b.is_nan() {
        "n/a".into()
    } else {
        format!("{:.2}x", a / b)
    }
}

pub(crate) fn statuses(samples: &[Sample]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for s in samples {
        let k = match &s.outcome {
            Outcome::Status(c) => c.to_string(),
            Outcome::Timeout => "timeout".into(),
            Outcome::Error(_) => "error".into(),
        };
        *m.entry(k).or_default() += 1;
    }
    m
}

/// Prints one example of each kind of transport error, so a failing run says why.
pub(crate) fn show_errors(label: &str, samples: &[Sample]) {
    let mut seen = Vec::new();
    for s in samples {
        if let Outcome::Error(e) = &s.outcome
            && !seen.contains(e)
        {
            println!("    {label}: client error: {e}");
            seen.push(e.clone());
        }
    }
}

pub(crate) fn fmt_statuses(m: &BTreeMap<String, usize>) -> String {
    m.iter()
        .map(|(k, v)| format!("{v}x{k}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The median of the rounds (the middle one of three): one disturbed round on a shared
/// machine does not move it.
pub(crate) fn median(v: &[f64]) -> f64 {
    percentile(v, 50.0)
}
