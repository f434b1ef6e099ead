//! `vellum-workers`: the command-line entry point of the workers.

use clap::Parser;

/// Vellum's asynchronous workers: the outbox relay that publishes document events to NATS
/// JetStream, signed webhook delivery with retries, tier migration, retention runs and shard
/// rebalancing.
///
/// This build runs none of them yet; each arrives as a subcommand (`vellum-workers run`,
/// `vellum-workers retention --policy NAME`) with the feature it runs.
#[derive(Debug, Parser)]
#[command(name = "vellum-workers", version, about, long_about)]
struct Cli {}

fn main() {
    Cli::parse();
    eprintln!("vellum-workers: no worker is available in this build; see --help");
    std::process::exit(2);
}
