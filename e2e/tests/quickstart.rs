//! The README's quickstart, run as written: the two shell blocks under "Try the operator on a
//! local cluster", in one bash, on a cluster of this test's own. Two lines are left to the
//! suite: `scripts/test --services-only` (it is running the suite) and `cargo build --bins`
//! (cargo built the binaries before the tests).

use std::path::{Path, PathBuf};

use vellum_e2e::binary;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The shell blocks of the README section `heading`, in order.
fn blocks(readme: &str, heading: &str) -> Vec<String> {
    let section = readme.split(heading).nth(1).expect("the quickstart section");
    let section = section.split("\n## ").next().unwrap_or_default();
    section.split("```sh\n").skip(1).map(|b| b.split("```").next().unwrap_or_default().to_owned()).collect()
}

/// Stops the test's cluster, whatever happened.
struct Down(String);

impl Drop for Down {
    fn drop(&mut self) {
        let _ = std::process::Command::new(root().join("scripts/cluster")).args(["down", &self.0]).output();
    }
}

#[test]
fn the_readme_quickstart_works_as_written() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let blocks = blocks(&readme, "## Try the operator on a local cluster");
    assert_eq!(blocks.len(), 2, "the quickstart's two blocks: {blocks:?}");
    let script: Vec<&str> = blocks
        .iter()
        .flat_map(|b| b.lines())
        .filter(|l| !l.starts_with("scripts/test --services-only") && !l.starts_with("cargo build"))
        .collect();
    assert!(script.iter().any(|l| l.starts_with("scripts/cluster up")), "{script:?}");

    let name = format!("qs{}", std::process::id());
    let _down = Down(name.clone());
    // The database the quickstart creates: left from an earlier run, it goes first.
    let url = std::env::var("VELLUM_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432/postgres".into());
    let password = url.split("://").nth(1).and_then(|r| r.split('@').next()).and_then(|u| u.split(':').nth(1));
    let dropped = std::process::Command::new("dropdb")
        .args(["--if-exists", "-h", "127.0.0.1", "-U", "postgres", "docs"])
        .env("PGPASSWORD", password.unwrap_or("postgres"))
        .output()
        .unwrap();
    assert!(dropped.status.success(), "{}", String::from_utf8_lossy(&dropped.stderr));

    let images = ["operator", "gateway", "workers"]
        .map(|image| format!("vellum/{image}={}", binary(&format!("vellum-{image}")).display()))
        .join(" ");
    let out = std::process::Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script.join("\n")])
        .current_dir(root())
        .env("VELLUM_CLUSTER", &name)
        .env("VELLUM_NODE_BIN", binary("vellum-node"))
        .env("VELLUM_NODE_IMAGES", images)
        .env("PATH", {
            // `kubectl` as the suite runs it.
            let kubectl = std::env::var("VELLUM_TEST_KUBECTL").map(PathBuf::from).ok();
            let dir = kubectl.as_ref().and_then(|k| k.parent()).map(Path::to_path_buf);
            let path = std::env::var("PATH").unwrap_or_default();
            dir.map_or(path.clone(), |d| format!("{}:{path}", d.display()))
        })
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the quickstart failed:\n{stdout}\n{stderr}");
    // What a newcomer should see: the platform Ready, an upload, then the listing with it.
    assert!(stdout.contains("bluegreenrelease.vellum.dev/docs condition met"), "{stdout}");
    let uploaded = stdout.lines().find(|l| l.contains("\"filename\":\"README.md\"")).expect("the upload's answer");
    let id = serde_json::from_str::<serde_json::Value>(uploaded).unwrap()["id"].clone();
    assert!(stdout.contains(&format!("\"items\":[{{\"id\":{id}")), "the listing shows the upload: {stdout}");
    assert!(stdout.contains("gateway serving"), "the gateway's log: {stdout}");
    assert!(stdout.contains("Events:"), "kubectl describe shows Events: {stdout}");
}
