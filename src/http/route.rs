//! The routes, as metrics and spans name them: a leaf module, so that telemetry can name a
//! route without depending on the handlers.

/// The routes, as the `route` label spells them (axum's matched path, or `unmatched`).
/// The discriminants index the metrics' per-route tables, in `VARIANTS`' order.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    strum::IntoStaticStr,
    strum::VariantArray,
    strum::EnumString,
)]
#[strum(serialize_all = "snake_case")]
pub(crate) enum Route {
    #[strum(serialize = "/proxy/score")]
    Score = 0,
    #[strum(serialize = "/")]
    Index,
    #[strum(serialize = "/health")]
    Health,
    #[strum(serialize = "/ready")]
    Ready,
    #[strum(serialize = "/status")]
    Status,
    #[strum(serialize = "/status/feed")]
    StatusFeed,
    #[strum(serialize = "/metrics")]
    Metrics,
    #[strum(serialize = "/openapi.json")]
    OpenApi,
    #[strum(serialize = "/jobs")]
    Jobs,
    #[strum(serialize = "/jobs/{id}")]
    Job,
    #[strum(serialize = "/jobs/{id}/results")]
    JobResults,
    Unmatched,
}

impl Route {
    pub(crate) fn as_str(self) -> &'static str {
        self.into()
    }

    pub(crate) fn from_path(path: &str) -> Route {
        path.parse().unwrap_or(Route::Unmatched)
    }
}
