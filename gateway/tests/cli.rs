//! The README's first command: `vellum-gateway standalone` with the shipped config serves,
//! prints its URL and an admin token that works, and stops cleanly on SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

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

#[tokio::test]
async fn standalone_with_the_shipped_config_serves_and_stops_on_sigterm() {
    let data = tempfile::tempdir().unwrap();
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/standalone");
    let mut child = Command::new(env!("CARGO_BIN_EXE_vellum-gateway"))
        .args(["standalone", "--listen", "127.0.0.1:0", "--config-dir", config])
        .arg("--data-dir")
        .arg(data.path())
        .env_remove("VELLUM_JWT_SECRET")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut url = None;
    let mut token = None;
    while let Some(Ok(line)) = lines.next() {
        if let Some(rest) = line.strip_prefix("Vellum standalone gateway serving at ") {
            url = Some(rest.trim().to_owned());
        }
        if let Some(rest) = line.trim().strip_prefix("export TOKEN=") {
            token = Some(rest.to_owned());
            break;
        }
    }
    let (url, token) = (url.expect("the URL is printed"), token.expect("a token is printed"));

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

    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
}
