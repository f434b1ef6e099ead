//! Small helpers more than one controller uses.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use vellum_core::config::ShardsConfig;

/// A delete of something already gone succeeded.
pub fn not_found(e: kube::Error) -> std::result::Result<(), kube::Error> {
    match e {
        kube::Error::Api(s) if s.code == 404 => Ok(()),
        other => Err(other),
    }
}

/// A status time from milliseconds since the epoch.
pub fn time_of(ms: i64) -> Option<Time> {
    k8s_openapi::jiff::Timestamp::from_millisecond(ms).ok().map(Time)
}

/// Whether `next` routes every document where `published` did. Identical shard lists and
/// routing do; anything else moves documents (a live resharding).
pub fn routes_the_same(published: &ShardsConfig, next: &ShardsConfig) -> bool {
    let shape = |s: &ShardsConfig| {
        (
            s.routing.clone(),
            s.shards.iter().map(|x| (x.name.clone(), x.weight, x.range_start.clone())).collect::<Vec<_>>(),
        )
    };
    shape(published) == shape(next)
}
