//! `vellum-gateway`: the command-line entry point of the gateway.

use clap::Parser;

/// The Vellum gateway: the HTTP API application clients use to upload, version, tier and
/// download documents, with webhook management and WebSocket and SSE notifications.
///
/// This build serves nothing yet. `vellum-gateway standalone` (embedded SQLite, local-file
/// tiers, in-process events) and `vellum-gateway serve` (Postgres, S3, NATS) come with the
/// documents API.
#[derive(Debug, Parser)]
#[command(name = "vellum-gateway", version, about, long_about)]
struct Cli {}

fn main() {
    Cli::parse();
    eprintln!("vellum-gateway: no serving mode is available in this build; see --help");
    std::process::exit(2);
}
