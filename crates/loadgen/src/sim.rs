//! The upstream simulator's control endpoint (`/__sim/config`, given by `--sim-url`): once
//! mode makes it fail on purpose for one step, continuous mode now and then for a few
//! seconds; both put back what they changed.

use anyhow::Context as _;
use std::time::Duration;
use url::Url;

use crate::generator::Generator;

impl Generator {
    fn sim_url(&self) -> anyhow::Result<Url> {
        let mut url = self
            .sim
            .clone()
            .context("this step needs --sim-url (the simulator's base URL)")?;
        url.set_path("/__sim/config");
        url.set_query(None);
        Ok(url)
    }

    pub(crate) async fn sim_config(&self) -> anyhow::Result<serde_json::Value> {
        let url = self.sim_url()?;
        let body = self
            .http
            .get(url)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .context("GET /__sim/config")?
            .error_for_status()
            .context("GET /__sim/config")?
            .bytes()
            .await
            .context("GET /__sim/config")?;
        serde_json::from_slice(&body).context("/__sim/config is not JSON")
    }

    pub(crate) async fn sim_set(&self, change: serde_json::Value) -> anyhow::Result<()> {
        let url = self.sim_url()?;
        self.http
            .put(url)
            .header("content-type", "application/json")
            .body(change.to_string())
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .context("PUT /__sim/config")?
            .error_for_status()
            .context("PUT /__sim/config")?;
        Ok(())
    }

    /// The knobs this generator turns, as they are now, to put back afterwards.
    pub(crate) async fn sim_saved(&self) -> anyhow::Result<serde_json::Value> {
        let config = self.sim_config().await?;
        Ok(serde_json::json!({
            "fault": config.get("fault").cloned().unwrap_or("none".into()),
            "min_interval_ms": config.get("min_interval_ms").cloned().unwrap_or(1000.into()),
        }))
    }

    pub(crate) async fn restore_sim(&self, saved: serde_json::Value) {
        match self.sim_set(saved).await {
            Ok(()) => tracing::info!("loadgen: simulator back to normal"),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "loadgen: cannot restore the simulator")
            }
        }
    }
}
