//! `score-proxy batch`: the client side of bulk jobs. It submits a file of CPFs to a running
//! proxy (`POST /jobs`), writes the results as they come (`GET /jobs/{id}/results`, CSV or
//! NDJSON) and shows a progress bar with the proxy's estimate of the time left. Ctrl-C
//! stops the client, not the job: it says how to pick the job up again (`--resume ID`), which
//! rewrites the results from the first line.

use std::io::Write;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use crate::config::BatchArgs;

/// How often the progress bar asks for the job's status.
const POLL: Duration = Duration::from_millis(500);

/// Exit status after Ctrl-C (128 + SIGINT, as shells report it).
pub const EXIT_INTERRUPTED: u8 = 130;

/// How a batch run ended.
pub enum Ended {
    /// Every line written.
    Done,
    /// The job was cancelled on the proxy; the lines done were written.
    Cancelled,
    /// Ctrl-C: the job goes on.
    Interrupted,
}

/// Runs a batch; errors are for the user to read (the proxy's own message included).
pub async fn run(args: &BatchArgs) -> anyhow::Result<Ended> {
    let base = args.proxy.trim_end_matches('/').to_owned();
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .build()?;
    let query = format!(
        "client_id={}",
        percent_encoding::utf8_percent_encode(&args.client_id, percent_encoding::NON_ALPHANUMERIC)
    );
    let id = match &args.resume {
        Some(id) => id.clone(),
        None => {
            let file = args
                .file
                .as_ref()
                .expect("clap requires a file without --resume");
            let body = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin())?
            } else {
                std::fs::read_to_string(file)
                    .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?
            };
            let reply = client
                .post(format!("{base}/jobs?{query}"))
                .header("content-type", "text/plain")
                .body(body)
                .send()
                .await?;
            let status = reply.status();
            let job: serde_json::Value = serde_json::from_str(&reply.text().await?)?;
            if status != reqwest::StatusCode::ACCEPTED {
                anyhow::bail!("the proxy refused the job ({status}): {}", job["message"]);
            }
            let id = job["id"].as_str().unwrap_or_default().to_owned();
            eprintln!("job {id} accepted: {} CPFs", job["total"]);
            id
        }
    };
    let csv = match args.format.as_deref() {
        Some(format) => format == "csv",
        None => args
            .out
            .as_ref()
            .is_some_and(|p| p.extension().is_some_and(|e| e == "csv")),
    };
    let mut out: Box<dyn Write + Send> = match &args.out {
        Some(path) => Box::new(std::io::BufWriter::new(std::fs::File::create(path)?)),
        None => Box::new(std::io::stdout()),
    };

    let format = if csv { "csv" } else { "ndjson" };
    let mut results = client
        .get(format!("{base}/jobs/{id}/results?{query}&format={format}"))
        .send()
        .await?;
    if !results.status().is_success() {
        let status = results.status();
        anyhow::bail!(
            "the proxy has no such job for this client id ({status}): {}",
            results.text().await.unwrap_or_default()
        );
    }
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} lines  {msg}")
            .expect("a valid template"),
    );
    let resume_hint = || {
        let out = args
            .out
            .as_ref()
            .map(|p| format!(" --out {}", p.display()))
            .unwrap_or_default();
        format!(
            "score-proxy batch --resume {id} --proxy {base} --client-id {}{out}",
            args.client_id
        )
    };
    let status_url = format!("{base}/jobs/{id}?{query}");
    let mut poll = tokio::time::interval(POLL);
    let interrupt = tokio::signal::ctrl_c();
    tokio::pin!(interrupt);
    loop {
        tokio::select! {
            chunk = results.chunk() => match chunk? {
                Some(bytes) => out.write_all(&bytes)?,
                None => break,
            },
            _ = poll.tick() => {
                if let Ok(job) = status(&client, &status_url).await {
                    bar.set_length(job["total"].as_u64().unwrap_or(0));
                    bar.set_position(job["done"].as_u64().unwrap_or(0));
                    bar.set_message(match job["eta_seconds"].as_f64() {
                        Some(eta) => format!("about {} left", humantime::format_duration(Duration::from_secs(eta.ceil() as u64))),
                        None => String::new(),
                    });
                }
            }
            _ = &mut interrupt => {
                out.flush()?;
                bar.abandon();
                eprintln!("stopped; the job goes on on the proxy. Pick it up again with:\n  {}", resume_hint());
                return Ok(Ended::Interrupted);
            }
        }
    }
    out.flush()?;
    let job = status(&client, &status_url).await?;
    bar.set_length(job["total"].as_u64().unwrap_or(0));
    bar.set_position(job["done"].as_u64().unwrap_or(0));
    bar.finish_with_message(String::new());
    eprintln!(
        "job {id} {}: {} lines, {} failed, {} from the cache",
        job["state"].as_str().unwrap_or("?"),
        job["done"],
        job["failed"],
        job["from_cache"]
    );
    Ok(if job["state"] == "cancelled" {
        Ended::Cancelled
    } else {
        Ended::Done
    })
}

async fn status(client: &reqwest::Client, url: &str) -> anyhow::Result<serde_json::Value> {
    let reply = client.get(url).send().await?;
    Ok(serde_json::from_str(&reply.text().await?)?)
}
