//! Which metadata shard holds a document: the routing table a ShardSet describes, built the
//! same way by every gateway and worker from the published platform config, so that a
//! document id reaches its shard without a lookup.
//!
//! Every key is first hashed to 64 bits (the first eight bytes of the SHA-256 of its text;
//! a document id's text is its decimal form), so that shards share documents evenly however
//! the ids were chosen, and so that any implementation can reproduce the table.
//!
//! - **ConsistentHash**: each shard puts `virtualNodes × weight` points on a ring (the hash
//!   of `"<shard>#<n>"`); a key belongs to the first point at or after its hash, wrapping
//!   around. Adding a shard moves about `1/n` of the documents, all of them to the new one.
//! - **Range**: each shard holds the hashes from its `rangeStart` (up to eight hex digits,
//!   the leading digits of a 64-bit hash) up to the next shard's.

use sha2::{Digest, Sha256};
use vellum_crds::shard_set::RoutingStrategy;

use crate::config::ShardsConfig;

/// The 64-bit routing hash of a key.
pub fn routing_hash(key: &[u8]) -> u64 {
    let digest = Sha256::digest(key);
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// The routing hash of a document id.
pub fn id_hash(id: i64) -> u64 {
    routing_hash(id.to_string().as_bytes())
}

/// A routing table: from a key's hash to a shard, by index into the ShardSet's list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoutingTable {
    names: Vec<String>,
    /// Sorted by hash: ring points under ConsistentHash, range starts under Range. A key
    /// belongs to the first point at or after its hash (ring) or to the last start at or
    /// before it (ranges).
    points: Vec<(u64, usize)>,
    strategy: RoutingStrategy,
    version: String,
}

/// A range start as a hash: its hex digits are the hash's leading digits.
fn range_start(text: &str) -> Result<u64, String> {
    if text.len() > 8 || !text.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return Err(format!("rangeStart {text:?} is not up to eight lowercase hex digits"));
    }
    if text.is_empty() {
        return Ok(0);
    }
    let value = u64::from_str_radix(text, 16).map_err(|e| format!("rangeStart {text:?}: {e}"))?;
    Ok(value << (64 - 4 * text.len()))
}

impl RoutingTable {
    /// One shard holding everything: a platform without a ShardSet.
    pub fn single(name: &str) -> Self {
        Self {
            names: vec![name.to_owned()],
            points: vec![(0, 0)],
            strategy: RoutingStrategy::Range,
            version: "single".to_owned(),
        }
    }

    /// The table of a compiled ShardSet, or why it cannot route.
    pub fn build(config: &ShardsConfig) -> Result<Self, String> {
        if config.shards.is_empty() {
            return Err("a ShardSet needs at least one shard".into());
        }
        let names: Vec<String> = config.shards.iter().map(|s| s.name.clone()).collect();
        let mut points = Vec::new();
        match config.routing.strategy {
            RoutingStrategy::ConsistentHash => {
                for (index, shard) in config.shards.iter().enumerate() {
                    let count = u64::from(config.routing.virtual_nodes.max(1)) * u64::from(shard.weight.max(1));
                    for n in 0..count {
                        points.push((routing_hash(format!("{}#{n}", shard.name).as_bytes()), index));
                    }
                }
            }
            RoutingStrategy::Range => {
                for (index, shard) in config.shards.iter().enumerate() {
                    let Some(start) = &shard.range_start else {
                        return Err(format!("shard {} has no rangeStart, which Range routing needs", shard.name));
                    };
                    points.push((range_start(start)?, index));
                }
            }
        }
        points.sort_unstable();
        if config.routing.strategy == RoutingStrategy::Range {
            if points.first().is_none_or(|(start, _)| *start != 0) {
                return Err("under Range routing one shard must start at \"\"".into());
            }
            if let Some(pair) = points.windows(2).find(|pair| pair[0].0 == pair[1].0) {
                return Err(format!("shards {} and {} start at the same point", names[pair[0].1], names[pair[1].1]));
            }
        }
        let mut shape = Sha256::new();
        shape.update(format!("{:?}/{}", config.routing.strategy, config.routing.virtual_nodes));
        for shard in &config.shards {
            shape.update(format!("|{}/{}/{:?}", shard.name, shard.weight, shard.range_start));
        }
        let version = hex::encode(&shape.finalize()[..6]);
        Ok(Self { names, points, strategy: config.routing.strategy, version })
    }

    /// The shards' names, in the ShardSet's order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// A short hash of everything that decides where documents go: equal versions route
    /// every key alike.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The shard of a routing hash.
    pub fn shard_of_hash(&self, hash: u64) -> usize {
        match self.strategy {
            RoutingStrategy::ConsistentHash => {
                let at = self.points.partition_point(|(point, _)| *point < hash);
                self.points.get(at).unwrap_or(&self.points[0]).1
            }
            RoutingStrategy::Range => {
                let at = self.points.partition_point(|(start, _)| *start <= hash);
                self.points[at.saturating_sub(1)].1
            }
        }
    }

    /// The shard holding document `id`.
    pub fn shard_of_id(&self, id: i64) -> usize {
        if self.names.len() == 1 { 0 } else { self.shard_of_hash(id_hash(id)) }
    }

    /// The shard holding the record named `key` (an upload session, say).
    pub fn shard_of_key(&self, key: &str) -> usize {
        if self.names.len() == 1 { 0 } else { self.shard_of_hash(routing_hash(key.as_bytes())) }
    }
}

#[cfg(test)]
mod tests {
    use vellum_crds::shard_set::Routing;

    use super::*;
    use crate::config::{SecretHandle, ShardConfig};

    fn set(strategy: RoutingStrategy, shards: &[(&str, u32, Option<&str>)]) -> ShardsConfig {
        ShardsConfig {
            shard_set: "docs".into(),
            shards: shards
                .iter()
                .map(|(name, weight, start)| ShardConfig {
                    name: (*name).to_owned(),
                    url: SecretHandle::new("shards", name),
                    weight: *weight,
                    range_start: start.map(str::to_owned),
                })
                .collect(),
            routing: Routing { strategy, virtual_nodes: 128 },
            resharding: vellum_crds::shard_set::ReshardingPace::default(),
        }
    }

    fn ring(names: &[&str]) -> RoutingTable {
        let shards: Vec<_> = names.iter().map(|n| (*n, 1, None)).collect();
        RoutingTable::build(&set(RoutingStrategy::ConsistentHash, &shards)).unwrap()
    }

    fn counts(table: &RoutingTable, ids: impl Iterator<Item = i64>) -> Vec<usize> {
        let mut counts = vec![0; table.len()];
        for id in ids {
            counts[table.shard_of_id(id)] += 1;
        }
        counts
    }

    #[test]
    fn the_hash_is_the_sha256_prefix_of_the_decimal_id() {
        // Fixed values: another implementation must route the same ids the same way.
        assert_eq!(routing_hash(b""), 0xe3b0_c442_98fc_1c14);
        assert_eq!(id_hash(42), routing_hash(b"42"));
        assert_eq!(routing_hash(b"42"), 0x7347_5cb4_0a56_8e8d);
    }

    #[test]
    fn one_shard_holds_everything() {
        for table in [RoutingTable::single("main"), ring(&["only"])] {
            assert_eq!(counts(&table, 1..2000), vec![1999]);
            assert_eq!(table.shard_of_key("session"), 0);
        }
    }

    #[test]
    fn a_ring_shares_documents_evenly_and_by_weight() {
        let names: Vec<String> = (0..8).map(|i| format!("s{i}")).collect();
        let table = ring(&names.iter().map(String::as_str).collect::<Vec<_>>());
        let shares = counts(&table, 1..80_001);
        for share in &shares {
            // 128 virtual nodes keep every shard within ±25% of its fair 10,000.
            assert!((7_500..12_500).contains(share), "{shares:?}");
        }
        let weighted =
            RoutingTable::build(&set(RoutingStrategy::ConsistentHash, &[("a", 1, None), ("b", 3, None)])).unwrap();
        let shares = counts(&weighted, 1..40_001);
        let ratio = f64::from(u32::try_from(shares[1]).unwrap()) / f64::from(u32::try_from(shares[0]).unwrap());
        assert!((2.4..3.6).contains(&ratio), "{shares:?}");
    }

    #[test]
    fn adding_a_shard_to_a_ring_moves_only_what_the_new_shard_takes() {
        let before = ring(&["a", "b", "c"]);
        let after = ring(&["a", "b", "c", "d"]);
        let mut moved = 0;
        for id in 1..20_001 {
            let (from, to) = (before.shard_of_id(id), after.shard_of_id(id));
            if from != to {
                assert_eq!(after.names()[to], "d", "a document moved between two old shards");
                moved += 1;
            }
        }
        assert!((3_500..6_500).contains(&moved), "{moved} of 20,000 moved; about a quarter should");
        assert_ne!(before.version(), after.version());
        assert_eq!(before.version(), ring(&["a", "b", "c"]).version());
    }

    #[test]
    fn ranges_split_the_hash_space_at_their_starts() {
        let table = RoutingTable::build(&set(
            RoutingStrategy::Range,
            &[("low", 1, Some("")), ("high", 1, Some("8")), ("top", 1, Some("f0000001"))],
        ))
        .unwrap();
        assert_eq!(table.shard_of_hash(0), 0);
        assert_eq!(table.shard_of_hash(0x7fff_ffff_ffff_ffff), 0);
        assert_eq!(table.shard_of_hash(0x8000_0000_0000_0000), 1);
        assert_eq!(table.shard_of_hash(0xf000_0000_ffff_ffff), 1);
        assert_eq!(table.shard_of_hash(0xf000_0001_0000_0000), 2);
        assert_eq!(table.shard_of_hash(u64::MAX), 2);
        for id in 1..1000 {
            let h = id_hash(id);
            let expected = if h < 1 << 63 {
                0
            } else if h < 0xf000_0001 << 32 {
                1
            } else {
                2
            };
            assert_eq!(table.shard_of_id(id), expected);
        }
    }

    #[test]
    fn ranges_that_cannot_route_are_refused() {
        let no_start = set(RoutingStrategy::Range, &[("a", 1, Some("1")), ("b", 1, Some("8"))]);
        assert!(RoutingTable::build(&no_start).unwrap_err().contains("start at"));
        let same = set(RoutingStrategy::Range, &[("a", 1, Some("")), ("b", 1, Some("8")), ("c", 1, Some("80"))]);
        assert!(RoutingTable::build(&same).unwrap_err().contains("same point"));
        let missing = set(RoutingStrategy::Range, &[("a", 1, Some("")), ("b", 1, None)]);
        assert!(RoutingTable::build(&missing).unwrap_err().contains("no rangeStart"));
        let bad = set(RoutingStrategy::Range, &[("a", 1, Some("")), ("b", 1, Some("XYZ"))]);
        assert!(RoutingTable::build(&bad).unwrap_err().contains("hex"));
    }
}
