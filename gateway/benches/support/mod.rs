//! What the benchmarks share: knobs from the environment, percentiles, a process's memory,
//! and the release `vellum-gateway standalone` binary run in a process of its own.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::time::Duration;

#[path = "../../tests/support/banner.rs"]
mod banner;

/// A number from the environment variable `name`, or `default`.
pub fn knob<T: FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

pub fn mib(bytes: u64) -> f64 {
    #[allow(clippy::cast_precision_loss)]
    let v = bytes as f64 / f64::from(1 << 20);
    v
}

/// A process's resident memory, from `/proc/<pid>/status` (`VmRSS` now, `VmHWM` peak), in bytes.
pub fn memory(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_precision_loss)]
    let index = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[index]
}

/// The gateway binary, stopped with SIGTERM when dropped.
pub struct Gateway {
    pub child: Child,
    pub url: String,
    pub token: String,
}

impl Gateway {
    /// Starts `vellum-gateway standalone` on a free port with the config in `work/config`,
    /// the data in `work/data`, the metadata in `database_url`, no per-user rate limit, and
    /// `extra` arguments.
    pub fn start(work: &Path, database_url: &str, extra: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_vellum-gateway"))
            .args(["standalone", "--listen", "127.0.0.1:0", "--rate-limit", "0"])
            .args(extra)
            .arg("--config-dir")
            .arg(work.join("config"))
            .arg("--data-dir")
            .arg(work.join("data"))
            .args(["--database-url", database_url])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let (url, token) = banner::read_banner(&mut child);
        Self { child, url, token }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
    }
}
