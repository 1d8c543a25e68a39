//! The routes, as metrics and spans name them: a leaf module, so that telemetry can name a
//! route without depending on the handlers.

/// The routes, as the `route` label spells them (axum's matched path, or `unmatched`).
/// The discriminants index the metrics' per-route tables, in `ALL`'s order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Route {
    Score = 0,
    Health,
    Ready,
    Status,
    Metrics,
    OpenApi,
    Unmatched,
}

impl Route {
    pub const ALL: [Route; 7] = [
        Route::Score,
        Route::Health,
        Route::Ready,
        Route::Status,
        Route::Metrics,
        Route::OpenApi,
        Route::Unmatched,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Route::Score => "/proxy/score",
            Route::Health => "/health",
            Route::Ready => "/ready",
            Route::Status => "/status",
            Route::Metrics => "/metrics",
            Route::OpenApi => "/openapi.json",
            Route::Unmatched => "unmatched",
        }
    }

    pub fn from_path(path: &str) -> Route {
        Route::ALL
            .into_iter()
            .find(|r| r.as_str() == path)
            .unwrap_or(Route::Unmatched)
    }
}
