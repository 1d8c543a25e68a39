//! The proxies' own counters, read from their `/metrics` (Prometheus text, parsed by
//! `score_test_support::prom`): once mode's evidence for outcomes no answer shows (an
//! abandoned lookup, an unused slot, a penalty).

use std::time::Duration;

use score_test_support::prom::Scrape;
use tokio::time::Instant;

use crate::generator::Generator;

impl Generator {
    /// The sum of every series of a counter on every target's `/metrics`, or `None` when
    /// any target does not serve them there (`--public-metrics false`): a partial sum could
    /// seem to rise when a target that failed once answers again.
    pub(crate) async fn metric(&self, name: &str) -> Option<f64> {
        let mut sum = 0.0;
        for target in 0..self.targets.len() {
            sum += self.metric_on(target, name).await?;
        }
        Some(sum)
    }

    async fn metric_on(&self, target: usize, name: &str) -> Option<f64> {
        let mut url = self.url(target, "/metrics");
        url.set_query(Some("format=prometheus"));
        let response = self
            .http
            .get(url)
            .header("accept", "text/plain")
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .ok()?;
        if !response.status().is_success() {
            return None;
        }
        let text = response.text().await.ok()?;
        sum_metric(&text, name)
    }

    /// Whether the counter rose above `before` (polled briefly: the proxy records after it
    /// answers); `None` when the proxy's metrics cannot be read.
    pub(crate) async fn poll_metric_increase(
        &self,
        name: &str,
        before: Option<f64>,
    ) -> Option<bool> {
        let before = before?;
        let end = Instant::now() + Duration::from_secs(2);
        loop {
            let now = self.metric(name).await?;
            if now > before {
                return Some(true);
            }
            if Instant::now() >= end {
                return Some(false);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The sum of every sample of `name` (any labels) in Prometheus text, or `None` when there
/// is none (or the text is not Prometheus's format).
fn sum_metric(text: &str, name: &str) -> Option<f64> {
    let scrape = Scrape::parse(text).ok()?;
    let mut samples = scrape.samples(name, &[]).peekable();
    samples.peek()?;
    Some(samples.map(|s| s.value).sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_every_series_of_a_metric() {
        let text =
            "# TYPE a counter\na_total{x=\"1\"} 2\na_total{x=\"2\"} 3\na_total_other 7\nb 1\n";
        assert_eq!(sum_metric(text, "a_total"), Some(5.0));
        assert_eq!(sum_metric(text, "b"), Some(1.0));
        assert_eq!(sum_metric(text, "c"), None);
    }
}
