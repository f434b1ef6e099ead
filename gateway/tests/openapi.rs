//! The OpenAPI document says what the server does: schemathesis (the published tool, from the
//! suite's Python environment) generates requests from `/openapi.json` — schema examples,
//! boundary values of every bound, and fuzzed data, valid and invalid — against a standalone
//! gateway, and runs all its checks on every answer: no 5xx, every status, content type and
//! body documented, invalid data refused and valid data accepted. The few rules OpenAPI cannot
//! state are listed, each with its reason, in `tests/schemathesis/schemathesis.toml`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use vellum_gateway::standalone;

mod support;

/// The schemathesis command beside the suite's Python interpreter.
fn schemathesis() -> PathBuf {
    let python = std::env::var("VELLUM_TEST_PYTHON")
        .expect("VELLUM_TEST_PYTHON names the Python that has schemathesis (scripts/test sets it)");
    Path::new(&python).with_file_name("schemathesis")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_the_server_as_its_openapi_document_describes_it() {
    let dir = tempfile::tempdir().unwrap();
    let tiers = format!(
        "{}---\napiVersion: vellum.dev/v1alpha1\nkind: StorageTier\nmetadata: {{name: cold}}\nspec: {{class: COLD, backend: {{url: 'memory://'}}}}\n",
        support::MEMORY_TIER
    );
    let mut options = support::options(dir.path(), &tiers, b"schemathesis");
    // Unlimited: the generated requests come from one user as fast as they go.
    options.auth.rate_per_second = 0;
    options.max_upload_bytes = 5 << 30;
    let gw = standalone::start(options).await.unwrap();
    let token = gw.state.auth.mint("admin", &["admin", "user"], Duration::from_secs(3600)).unwrap();
    let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/schemathesis");
    let out = tokio::process::Command::new(schemathesis())
        .current_dir(&here)
        .args(["--no-color", "--config-file", "schemathesis.toml", "run"])
        .arg(format!("{}/openapi.json", gw.url))
        .args(["--header", &format!("Authorization: Bearer {token}")])
        // Bounded: ten examples an operation, one worker, a fixed seed.
        .args(["--max-examples", "10", "--phases", "examples,coverage,fuzzing", "--workers", "1"])
        .args(["--request-timeout", "10", "--seed", "1"])
        .output()
        .await
        .expect("schemathesis runs (scripts/test installs it beside the tus client)");
    let report = String::from_utf8_lossy(&out.stdout);
    println!("{report}");
    assert!(out.status.success(), "schemathesis found failures:\n{report}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(report.contains(" passed"), "schemathesis ran no test case:\n{report}");
    gw.shutdown().await.unwrap();
}
