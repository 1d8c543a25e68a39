//! `score-proxy batch`, the real binary, against a proxy in this test's process: a file of
//! CPFs becomes a job whose results land in the output as they come; Ctrl-C (SIGINT) stops
//! the client, not the job, and `--resume ID` picks it up again.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Setup, TestApp, cpf, spawn};

const BIN: &str = env!("CARGO_BIN_EXE_score-proxy");
const CLIENT: &str = "batch-test-client";

fn batch(app: &TestApp, args: &[&str]) -> Child {
    Command::new(BIN)
        .arg("batch")
        .args(["--proxy", &format!("http://{}", app.addr)])
        .args(["--client-id", CLIENT])
        .args(args)
        .env_remove("SCORE_PROXY_BATCH_CLIENT_ID")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary starts")
}

/// Waits for the child to exit; its exit code and what it wrote to stderr.
fn finish(mut child: Child) -> (Option<i32>, String) {
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let text: Vec<String> = BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect();
        let status = child.wait().unwrap();
        let _ = tx.send((status.code(), text.join("\n")));
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("batch exits within a minute")
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_becomes_a_job_whose_results_are_written_as_csv() {
    let app = spawn(Setup::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("cpfs.txt");
    let out = dir.path().join("scores.csv");
    let cpfs: Vec<String> = (0..8).map(cpf).chain(["bad".to_owned()]).collect();
    std::fs::write(&input, cpfs.join("\n")).unwrap();

    let child = batch(
        &app,
        &[input.to_str().unwrap(), "--out", out.to_str().unwrap()],
    );
    let (code, stderr) = tokio::task::spawn_blocking(move || finish(child))
        .await
        .unwrap();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("accepted: 9 CPFs"), "{stderr}");
    assert!(stderr.contains("done: 9 lines, 1 failed"), "{stderr}");
    let rows = lines(&out);
    assert_eq!(rows[0], "index,cpf,status,score,from_cache,error");
    assert_eq!(rows.len(), 10, "{rows:?}");
    for (i, cpf) in cpfs.iter().enumerate().take(8) {
        assert!(
            rows[i + 1].starts_with(&format!("{i},{cpf},200,")),
            "{}",
            rows[i + 1]
        );
    }
    assert!(
        rows[9].ends_with("400,,false,invalid_request"),
        "{}",
        rows[9]
    );
    app.assert_no_violations();
    app.shutdown().await.unwrap();
}

/// SIGINT mid-job: the client exits 130 saying how to resume, the job goes on, and
/// `--resume ID` writes every line (NDJSON) and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_leaves_the_job_running_and_resume_finishes_it() {
    let app = spawn(Setup::default().arg("--rate", "4")).await;
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("cpfs.txt");
    let out = dir.path().join("scores.ndjson");
    let cpfs: Vec<String> = (100..112).map(cpf).collect();
    std::fs::write(&input, cpfs.join("\n")).unwrap();

    let child = batch(
        &app,
        &[input.to_str().unwrap(), "--out", out.to_str().unwrap()],
    );
    // Interrupted once some calls were made (the job then still has most of its items).
    tokio::time::timeout(Duration::from_secs(30), async {
        while app.sim.calls() < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the job started");
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success()
    );
    let (code, stderr) = tokio::task::spawn_blocking(move || finish(child))
        .await
        .unwrap();
    assert_eq!(code, Some(130), "{stderr}");
    let resume = stderr
        .lines()
        .find_map(|l| l.trim().strip_prefix("score-proxy batch --resume "))
        .unwrap_or_else(|| panic!("no resume hint in: {stderr}"));
    let id = resume.split_whitespace().next().unwrap().to_owned();

    let child = batch(&app, &["--resume", &id, "--out", out.to_str().unwrap()]);
    let (code, stderr) = tokio::task::spawn_blocking(move || finish(child))
        .await
        .unwrap();
    assert_eq!(code, Some(0), "{stderr}");
    let rows = lines(&out);
    assert_eq!(rows.len(), cpfs.len(), "{rows:?}");
    for (i, row) in rows.iter().enumerate() {
        let line: serde_json::Value = serde_json::from_str(row).unwrap();
        assert_eq!(
            (line["index"].as_u64(), line["status"].as_u64()),
            (Some(i as u64), Some(200))
        );
    }
    assert_eq!(app.sim.calls(), cpfs.len() as u64, "each CPF called once");
    app.shutdown().await.unwrap();
}
