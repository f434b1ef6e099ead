//! `vellum-operator crds` prints the five CRDs, ready for `kubectl apply -f -`.

use std::process::Command;

#[test]
fn crds_subcommand_prints_every_crd_as_yaml() {
    let out = Command::new(env!("CARGO_BIN_EXE_vellum-operator")).arg("crds").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let docs: Vec<serde_json::Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|v: &serde_json::Value| !v.is_null())
        .collect();
    let names: Vec<&str> = docs.iter().map(|d| d["metadata"]["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "storagetiers.vellum.dev",
            "retentionpolicies.vellum.dev",
            "webhooks.vellum.dev",
            "shardsets.vellum.dev",
            "bluegreenreleases.vellum.dev"
        ]
    );
}

#[test]
fn unknown_subcommands_fail_with_usage() {
    let out = Command::new(env!("CARGO_BIN_EXE_vellum-operator")).arg("frobnicate").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Usage"));
}
