//! What the document library's tests and benchmarks share.
#![allow(dead_code)]

use vellum_core::config::{SecretHandle, ShardConfig, ShardsConfig};
use vellum_core::crds::shard_set::{Routing, RoutingStrategy};
use vellum_core::routing::RoutingTable;

/// The routing table of a ShardSet `docs` of the shards `names`, of equal weight, on a
/// consistent-hash ring of 64 virtual nodes each.
pub fn ring(names: &[&str]) -> RoutingTable {
    RoutingTable::build(&ShardsConfig {
        shard_set: "docs".into(),
        shards: names
            .iter()
            .map(|name| ShardConfig {
                name: (*name).to_owned(),
                url: SecretHandle::new("shards", name),
                weight: 1,
                range_start: None,
            })
            .collect(),
        routing: Routing { strategy: RoutingStrategy::ConsistentHash, virtual_nodes: 64 },
        resharding: vellum_core::crds::shard_set::ReshardingPace::default(),
    })
    .expect("a ring of named shards routes")
}
