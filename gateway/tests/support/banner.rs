//! Reading the banner `vellum-gateway standalone` prints, for the tests and benchmarks that
//! run the binary.

use std::io::{BufRead, BufReader};
use std::process::Child;

/// The URL and admin token from a started gateway's stdout (piped); stdout is drained
/// afterwards so the process never blocks on a full pipe.
pub fn read_banner(child: &mut Child) -> (String, String) {
    let mut lines = BufReader::new(child.stdout.take().expect("stdout is piped")).lines();
    let (mut url, mut token) = (None, None);
    while let Some(Ok(line)) = lines.next() {
        if let Some(rest) = line.strip_prefix("Vellum standalone gateway serving at ") {
            url = Some(rest.trim().to_owned());
        }
        if let Some(rest) = line.trim().strip_prefix("export TOKEN=") {
            token = Some(rest.to_owned());
            break;
        }
    }
    std::thread::spawn(move || lines.for_each(drop));
    (url.expect("the gateway prints its URL"), token.expect("the gateway prints a token"))
}
