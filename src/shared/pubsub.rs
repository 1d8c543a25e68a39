//! The one subscription each replica keeps: the leaders' words on `<prefix>:done:*` go to the
//! flights waiting on them (`flights.rs`), and the pauses published on `<prefix>:penalty` are
//! noted (`pause.rs`), and the jobs ended on `<prefix>:jobs:news` wake the job leases
//! (`jobs.rs`). It has its own connection (a subscribed connection can do nothing
//! else) and reconnects whenever the subscription drops; a word lost meanwhile costs a
//! follower at most the second after which it looks again on its own.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::time::Instant;

use super::Shared;
use super::pause::Pause;

impl Shared {
    /// Routes `<prefix>:done:<tag>` messages to the flights waiting on them, and notes the
    /// penalties and holds published on `<prefix>:penalty`; reconnects whenever the
    /// subscription drops.
    pub(super) async fn listen_loop(self: Arc<Self>) {
        let prefix = self.done_prefix();
        let pattern = format!("{prefix}*");
        let penalty_channel = self.penalty_channel();
        let job_news = self.job_news_channel();
        loop {
            let subscribed = tokio::time::timeout(self.config.timeout * 3, async {
                let mut pubsub = self.client.get_async_pubsub().await?;
                pubsub.psubscribe(&pattern).await?;
                pubsub.subscribe(&penalty_channel).await?;
                pubsub.subscribe(&job_news).await?;
                Ok::<_, redis::RedisError>(pubsub)
            })
            .await;
            if let Ok(Ok(pubsub)) = subscribed {
                let mut messages = pubsub.into_on_message();
                while let Some(msg) = messages.next().await {
                    let channel = msg.get_channel_name();
                    let payload: String = msg.get_payload().unwrap_or_default();
                    if channel == penalty_channel {
                        // What is left of it from Redis's now; counted from its arrival
                        // here, it errs long by the message's trip.
                        if let Some((pause, left)) = Pause::parse(&payload) {
                            self.note_pause(pause, Instant::now() + left);
                        }
                    } else if channel == job_news {
                        self.job_news.notify_one();
                    } else if let Some(tag) = channel.strip_prefix(&prefix) {
                        self.deliver(tag, &payload);
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}
