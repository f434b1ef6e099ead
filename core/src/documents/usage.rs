//! What the tiers hold and cost, and what compression, deduplication and tiering save.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use sqlx::Row;

use super::{DocError, Documents};
use crate::config::PlatformConfig;
use crate::store::StoreError;

/// What a tier holds and costs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TierUsage {
    pub tier: String,
    /// The tier's class, or none when the tier is no longer configured.
    pub class: Option<String>,
    pub objects: i64,
    /// Bytes as stored (after compression).
    pub bytes: i64,
    /// Bytes before compression.
    pub original_bytes: i64,
    pub cost_per_gb_month: Option<f64>,
    pub estimated_monthly_cost: f64,
}

/// What compression, deduplication and tiering save each month, against every version
/// stored separately and uncompressed in the default tier.
#[derive(Clone, Debug, Default, PartialEq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Savings {
    pub compression: f64,
    pub deduplication: f64,
    pub tiering: f64,
    pub total: f64,
}

/// Storage usage of the whole platform.
#[derive(Clone, Debug, Default, PartialEq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    pub tiers: Vec<TierUsage>,
    /// Bytes of every version, as if each were stored on its own and uncompressed.
    pub logical_bytes: i64,
    pub stored_bytes: i64,
    pub objects: i64,
    pub estimated_monthly_cost: f64,
    /// The cost without compression, deduplication and tiering.
    pub baseline_monthly_cost: f64,
    pub monthly_savings: Savings,
}

const GIB: f64 = 1_073_741_824.0;

/// The monthly cost of `bytes` at `cost_per_gb` a GiB-month.
#[allow(clippy::cast_precision_loss)]
pub fn monthly_cost(bytes: i64, cost_per_gb: f64) -> f64 {
    bytes as f64 / GIB * cost_per_gb
}

impl Documents {
    /// Bytes and objects per tier, their monthly cost, and what compression,
    /// deduplication and tiering save.
    pub async fn usage(&self, config: &PlatformConfig) -> Result<Usage, DocError> {
        Ok(self.usage_counts().await?.priced(config))
    }

    /// What this database's blobs and versions hold, before pricing: shards add theirs up.
    pub async fn usage_counts(&self) -> Result<UsageCounts, DocError> {
        Ok(usage_counts(&self.meta).await?)
    }
}

/// What the blobs and versions of one metadata database hold, before pricing.
pub async fn usage_counts(meta: &crate::store::Metadata) -> Result<UsageCounts, StoreError> {
    let rows = sqlx::query(
        "SELECT tier, COUNT(*) AS objects, CAST(COALESCE(SUM(stored_size), 0) AS BIGINT) AS stored, \
         CAST(COALESCE(SUM(size), 0) AS BIGINT) AS original FROM blobs GROUP BY tier ORDER BY tier",
    )
    .fetch_all(meta.pool())
    .await?;
    let logical: i64 = sqlx::query_scalar("SELECT CAST(COALESCE(SUM(size), 0) AS BIGINT) FROM versions")
        .fetch_one(meta.pool())
        .await?;
    let mut counts = UsageCounts { logical_bytes: logical, ..UsageCounts::default() };
    for row in &rows {
        let tier: String = row.try_get("tier")?;
        counts.tiers.insert(tier, (row.try_get("objects")?, row.try_get("stored")?, row.try_get("original")?));
    }
    Ok(counts)
}

/// Objects, stored bytes and original bytes per tier, and the bytes of every version.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UsageCounts {
    pub tiers: BTreeMap<String, (i64, i64, i64)>,
    pub logical_bytes: i64,
}

impl UsageCounts {
    /// Adds another shard's counts.
    pub fn add(&mut self, other: &UsageCounts) {
        self.logical_bytes += other.logical_bytes;
        for (tier, (objects, stored, original)) in &other.tiers {
            let sum = self.tiers.entry(tier.clone()).or_default();
            *sum = (sum.0 + objects, sum.1 + stored, sum.2 + original);
        }
    }

    /// What keeping the bytes of `tiers` there saves each month against keeping them in
    /// the default tier (what the policies moving documents there earn).
    pub fn tiering_savings<'a>(&self, config: &PlatformConfig, tiers: impl IntoIterator<Item = &'a str>) -> f64 {
        let cost_of = |tier: &str| config.tiers.get(tier).and_then(|t| t.cost_per_gb_month).unwrap_or(0.0);
        let default_cost = cost_of(&config.default_tier);
        let tiers: BTreeSet<&str> = tiers.into_iter().collect();
        tiers
            .into_iter()
            .filter_map(|tier| self.tiers.get(tier).map(|&(_, bytes, _)| (tier, bytes)))
            .map(|(tier, bytes)| monthly_cost(bytes, default_cost) - monthly_cost(bytes, cost_of(tier)))
            .sum()
    }

    /// The counts priced by the tiers of `config`.
    pub fn priced(&self, config: &PlatformConfig) -> Usage {
        let logical = self.logical_bytes;
        let default_cost = config.tiers.get(&config.default_tier).and_then(|t| t.cost_per_gb_month).unwrap_or(0.0);
        let mut usage = Usage { logical_bytes: logical, ..Usage::default() };
        let mut seen = BTreeSet::new();
        let (mut unique, mut compression, mut tiering) = (0i64, 0.0, 0.0);
        for (tier, &(objects, bytes, original)) in &self.tiers {
            let tier = tier.clone();
            let configured = config.tiers.get(&tier);
            let cost = configured.and_then(|t| t.cost_per_gb_month);
            let estimated = monthly_cost(bytes, cost.unwrap_or(0.0));
            compression += monthly_cost(original - bytes, default_cost);
            tiering += monthly_cost(bytes, default_cost) - estimated;
            unique += original;
            usage.objects += objects;
            usage.stored_bytes += bytes;
            usage.estimated_monthly_cost += estimated;
            seen.insert(tier.clone());
            usage.tiers.push(TierUsage {
                tier,
                class: configured.map(|t| format!("{:?}", t.class).to_uppercase()),
                objects,
                bytes,
                original_bytes: original,
                cost_per_gb_month: cost,
                estimated_monthly_cost: estimated,
            });
        }
        for (name, tier) in &config.tiers {
            if !seen.contains(name) {
                usage.tiers.push(TierUsage {
                    tier: name.clone(),
                    class: Some(format!("{:?}", tier.class).to_uppercase()),
                    cost_per_gb_month: tier.cost_per_gb_month,
                    ..TierUsage::default()
                });
            }
        }
        usage.tiers.sort_by(|a, b| a.tier.cmp(&b.tier));
        let deduplication = monthly_cost(logical - unique, default_cost);
        usage.baseline_monthly_cost = monthly_cost(logical, default_cost);
        usage.monthly_savings =
            Savings { compression, deduplication, tiering, total: compression + deduplication + tiering };
        usage
    }
}
