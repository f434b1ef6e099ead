//! The README's first command: `vellum-gateway standalone` on its embedded config, started
//! from any directory, serves, prints its URL and an admin token that works, and stops
//! cleanly on SIGTERM.

use std::process::{Command, Stdio};

#[path = "support/banner.rs"]
mod banner;

#[test]
fn help_lists_standalone_and_its_environment_twins() {
    let help = Command::new(env!("CARGO_BIN_EXE_vellum-gateway")).args(["standalone", "--help"]).output().unwrap();
    assert!(help.status.success());
    let text = String::from_utf8(help.stdout).unwrap();
    for flag in [
        "--listen",
        "VELLUM_LISTEN",
        "--data-dir",
        "VELLUM_DATA_DIR",
        "--config-dir",
        "VELLUM_CONFIG_DIR",
        "--jwt-secret",
        "VELLUM_JWT_SECRET",
        "--jwt-public-key",
        "--jwt-jwks",
    ] {
        assert!(text.contains(flag), "{flag} missing from:\n{text}");
    }
    let bare = Command::new(env!("CARGO_BIN_EXE_vellum-gateway")).output().unwrap();
    assert_eq!(bare.status.code(), Some(2), "a subcommand is required");
}

/// Starts the binary on its embedded config with `data`, from a directory that is not the
/// repository (as a newcomer who installed it would); returns it with its URL and token.
fn start(data: &std::path::Path) -> (std::process::Child, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vellum-gateway"))
        .args(["standalone", "--listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(data)
        .current_dir(data)
        .env_remove("VELLUM_JWT_SECRET")
        .env_remove("VELLUM_CONFIG_DIR")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let (url, token) = banner::read_banner(&mut child);
    (child, url, token)
}

fn sigterm(child: &std::process::Child) {
    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
}

#[tokio::test]
async fn standalone_with_the_shipped_config_serves_and_stops_on_sigterm() {
    let data = tempfile::tempdir().unwrap();
    let (mut child, url, token) = start(data.path());

    let client = reqwest::Client::new();
    let uploaded: serde_json::Value = client
        .post(format!("{url}/api/v1/documents?filename=notes.txt"))
        .bearer_auth(&token)
        .body("standalone works")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(uploaded["storageTier"], "hot");
    let body = client
        .get(format!("{url}/api/v1/documents/{}/content", uploaded["id"]))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(body, "standalone works");
    assert!(data.path().join("vellum.db").exists() && data.path().join("tiers/hot").is_dir());

    sigterm(&child);
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
}

/// SIGTERM in the middle of an upload: the gateway stops taking connections, the upload
/// finishes and is recorded, then the process exits cleanly; a restart serves the document.
#[tokio::test]
async fn an_upload_in_flight_finishes_after_sigterm() {
    let data = tempfile::tempdir().unwrap();
    let (mut child, url, token) = start(data.path());
    let client = reqwest::Client::new();
    let half = vec![b'v'; 256 * 1024];
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(4);
    let upload = tokio::spawn(
        client
            .post(format!("{url}/api/v1/documents?filename=inflight.bin"))
            .bearer_auth(&token)
            .body(reqwest::Body::wrap_stream(tokio_stream(rx)))
            .send(),
    );
    tx.send(Ok(half.clone())).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    sigterm(&child);
    // Shutting down: a new connection is refused, while the upload's goes on.
    let mut refused = false;
    for _ in 0..50 {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        if reqwest::Client::new().get(format!("{url}/healthz")).send().await.is_err() {
            refused = true;
            break;
        }
    }
    assert!(refused, "the gateway stopped accepting connections on SIGTERM");
    tx.send(Ok(half.clone())).await.unwrap();
    drop(tx);
    let response = upload.await.unwrap().unwrap();
    assert_eq!(response.status(), reqwest::StatusCode::CREATED);
    let doc: serde_json::Value = response.json().await.unwrap();
    assert_eq!(doc["size"], 512 * 1024);
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");

    let (mut child, url, _) = start(data.path());
    let body = client
        .get(format!("{url}/api/v1/documents/{}/content", doc["id"]))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(body.len(), 512 * 1024);
    assert!(body.iter().all(|&b| b == b'v'));
    sigterm(&child);
    assert!(child.wait().unwrap().success());
}

fn tokio_stream(
    mut rx: tokio::sync::mpsc::Receiver<Result<Vec<u8>, std::io::Error>>,
) -> impl futures::Stream<Item = Result<Vec<u8>, std::io::Error>> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[test]
fn serve_refuses_settings_replicas_cannot_share_with_the_reason() {
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_vellum-gateway"))
            .arg("serve")
            .args(args)
            .env_remove("VELLUM_DATABASE_URL")
            .env_remove("VELLUM_JWT_SECRET")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        String::from_utf8(out.stderr).unwrap()
    };
    let nats = ["--nats-url", "nats://127.0.0.1:1", "--link-key", "0123456789abcdef0123456789abcdef"];
    assert!(run(&nats).contains("serve needs --database-url postgres://"));
    let with_db = [&nats[..], &["--database-url", "postgres://nowhere/db"]].concat();
    assert!(run(&with_db).contains("serve needs --jwt-secret"));
    let short_key =
        ["--nats-url", "x", "--link-key", "k3y-too-small", "--database-url", "postgres://x/y", "--jwt-secret", "s"];
    let stderr = run(&short_key);
    assert!(stderr.contains("--link-key must have at least 32 bytes"), "{stderr}");
    assert!(!stderr.contains("k3y-too-small"), "the key is not echoed");
    let with_secret = [&with_db[..], &["--jwt-secret", "s"]].concat();
    let stderr = run(&with_secret);
    assert!(stderr.contains("serve needs --config-dir"), "{stderr}");
}

#[test]
fn a_config_dir_that_is_not_there_is_named() {
    let data = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_vellum-gateway"))
        .args(["standalone", "--listen", "127.0.0.1:0", "--config-dir", "no/such/dir"])
        .arg("--data-dir")
        .arg(data.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("no/such/dir"), "{stderr}");
}
