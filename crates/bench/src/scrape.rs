//! The proxy's own view, from its Prometheus exposition (parsed by
//! `score_test_support::prom`): its request-duration histogram, Redis bookings and round
//! trips, unused slots and shared flights. Series are chosen by `(label, value)` pairs.

use std::collections::BTreeMap;

use anyhow::{Context, Result, ensure};
use score_test_support::prom::Scrape;

/// A Prometheus scrape of the proxy at `base`.
pub(crate) async fn scrape(client: &reqwest::Client, base: &str) -> Result<Scrape> {
    let resp = client
        .get(format!("{base}/metrics?format=prometheus"))
        .send()
        .await?;
    ensure!(resp.status() == 200, "{base}/metrics: {}", resp.status());
    let text = resp.text().await?;
    Scrape::parse(&text).with_context(|| format!("parsing {base}/metrics"))
}

/// From the proxy's Prometheus histogram of request durations: how many `/proxy/score`
/// requests took at most `le` seconds (a bucket bound, as written in the exposition), and
/// how many there were in all.
pub(crate) fn handled_within(scrape: &Scrape, le: &str) -> (u64, u64) {
    let count = |le: &str| {
        scrape.sum(
            "score_proxy_http_request_duration_seconds_bucket",
            &[("route", "/proxy/score"), ("le", le)],
        ) as u64
    };
    (count(le), count("+Inf"))
}

/// The smallest bucket bound of histogram `name` (e.g. `..._bucket`) under which at least
/// `q` of the samples with `labels` fall, summed over every scrape in `scrapes`: an upper
/// bound of the q-quantile.
pub(crate) fn bucket_quantile(
    scrapes: &[Scrape],
    name: &str,
    labels: &[(&str, &str)],
    q: f64,
) -> f64 {
    let mut buckets: BTreeMap<u64, f64> = BTreeMap::new();
    let mut total = 0.0;
    for sample in scrapes.iter().flat_map(|s| s.samples(name, labels)) {
        let Some(le) = sample.label("le") else {
            continue;
        };
        if le == "+Inf" {
            total += sample.value;
        } else if let Ok(bound) = le.parse::<f64>() {
            *buckets.entry((bound * 1e9) as u64).or_default() += sample.value;
        }
    }
    buckets
        .iter()
        .find(|&(_, &count)| total > 0.0 && count >= q * total)
        .map_or(f64::NAN, |(&ns, _)| ns as f64 / 1e9)
}

/// Start slots booked in Redis (`score_proxy_redis_operations_total{op="book"}`, answered).
pub(crate) fn bookings(scrape: &Scrape) -> f64 {
    scrape.sum(
        "score_proxy_redis_operations_total",
        &[("op", "book"), ("outcome", "ok")],
    )
}

/// `score_proxy_pacing_unused_slots_total` by reason, from one scrape.
pub(crate) fn unused_slots(scrape: &Scrape) -> BTreeMap<String, f64> {
    scrape
        .samples("score_proxy_pacing_unused_slots_total", &[])
        .filter_map(|s| Some((s.label("reason")?.to_owned(), s.value)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
# TYPE score_proxy_http_request_duration_seconds histogram
score_proxy_http_request_duration_seconds_bucket{outcome=\"hit\",route=\"/proxy/score\",le=\"0.01\"} 3
score_proxy_http_request_duration_seconds_bucket{outcome=\"hit\",route=\"/proxy/score\",le=\"0.1\"} 4
score_proxy_http_request_duration_seconds_bucket{outcome=\"hit\",route=\"/proxy/score\",le=\"+Inf\"} 4
score_proxy_http_request_duration_seconds_bucket{outcome=\"queue_full\",route=\"/proxy/score\",le=\"0.01\"} 1
score_proxy_http_request_duration_seconds_bucket{outcome=\"queue_full\",route=\"/proxy/score\",le=\"0.1\"} 2
score_proxy_http_request_duration_seconds_bucket{outcome=\"queue_full\",route=\"/proxy/score\",le=\"+Inf\"} 2
score_proxy_http_request_duration_seconds_bucket{outcome=\"ok\",route=\"/health\",le=\"+Inf\"} 9
score_proxy_redis_operations_total{op=\"book\",outcome=\"ok\"} 5
score_proxy_redis_operations_total{op=\"book\",outcome=\"error\"} 1
score_proxy_redis_operations_total{op=\"unbook\",outcome=\"ok\"} 7
score_proxy_pacing_unused_slots_total{reason=\"late\"} 2
score_proxy_pacing_unused_slots_total{reason=\"no_lookup\"} 0
";

    #[test]
    fn reads_the_proxys_series() {
        let scrape = Scrape::parse(TEXT).unwrap();
        assert_eq!(handled_within(&scrape, "0.01"), (4, 6));
        assert_eq!(bookings(&scrape), 5.0);
        let unused = unused_slots(&scrape);
        assert_eq!(unused.get("late"), Some(&2.0));
        assert_eq!(unused.len(), 2);
        let refusals = [("outcome", "queue_full")];
        let bucket = "score_proxy_http_request_duration_seconds_bucket";
        let scrapes = [scrape];
        assert_eq!(bucket_quantile(&scrapes, bucket, &refusals, 0.5), 0.01);
        assert_eq!(bucket_quantile(&scrapes, bucket, &refusals, 0.99), 0.1);
        assert!(bucket_quantile(&scrapes, bucket, &[("outcome", "none")], 0.5).is_nan());
    }
}
