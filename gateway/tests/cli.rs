//! The command line says what the gateway is and does not pretend to serve.

use std::process::Command;

#[test]
fn help_describes_the_gateway_and_running_it_says_nothing_is_served_yet() {
    let help = Command::new(env!("CARGO_BIN_EXE_vellum-gateway")).arg("--help").output().unwrap();
    assert!(help.status.success());
    let text = String::from_utf8(help.stdout).unwrap();
    assert!(text.contains("gateway") && text.contains("serves nothing yet"), "{text}");

    let run = Command::new(env!("CARGO_BIN_EXE_vellum-gateway")).output().unwrap();
    assert_eq!(run.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&run.stderr).contains("no serving mode"));
}
