//! The command line says what the workers are and does not pretend to run any.

use std::process::Command;

#[test]
fn help_describes_the_workers_and_running_them_says_none_runs_yet() {
    let help = Command::new(env!("CARGO_BIN_EXE_vellum-workers")).arg("--help").output().unwrap();
    assert!(help.status.success());
    let text = String::from_utf8(help.stdout).unwrap();
    assert!(text.contains("webhook delivery") && text.contains("runs none of them yet"), "{text}");

    let run = Command::new(env!("CARGO_BIN_EXE_vellum-workers")).output().unwrap();
    assert_eq!(run.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&run.stderr).contains("no worker"));
}
