//! The command line says what the workers do, and refuses to run without what they need.

use std::process::Command;

#[test]
fn help_describes_the_workers_and_run_names_what_is_missing() {
    let help = Command::new(env!("CARGO_BIN_EXE_vellum-workers")).arg("--help").output().unwrap();
    assert!(help.status.success());
    let text = String::from_utf8(help.stdout).unwrap();
    assert!(text.contains("webhook delivery") && text.contains("run"), "{text}");

    let run = Command::new(env!("CARGO_BIN_EXE_vellum-workers"))
        .arg("run")
        .env_remove("VELLUM_DATABASE_URL")
        .env_remove("VELLUM_CONFIG_DIR")
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("--database-url") && stderr.contains("--config-dir"), "{stderr}");
}
