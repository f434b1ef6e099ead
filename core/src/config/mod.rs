//! The platform config compiler: custom resources and the Secrets they name →
//! [`PlatformConfig`] (safe to store in a ConfigMap) plus a [`SecretBundle`] (the values,
//! for the platform's Secret). The operator feeds it from the Kubernetes API, standalone
//! mode from a directory of the same YAML ([`load_dir`]). One code path, two sources.

mod files;
mod load;
mod secret;

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use vellum_crds::conditions::reasons;
use vellum_crds::retention_policy::{AgeBasis, DocumentSelector, ExpirationAction, NoncurrentVersions};
use vellum_crds::shard_set::{ReshardingPace, Routing};
use vellum_crds::storage_tier::{Compression, TierClass};
use vellum_crds::webhook::{DeactivationRule, EventFilter, EventType, HttpHeader, RateLimit, RetryPolicy};
use vellum_crds::{BlueGreenRelease, RetentionPolicy, ShardSet, StorageTier, Webhook};

pub use files::{CONFIG_FILE, SECRETS_FILE, compile_dir, compile_files, read_platform};
pub use load::{LoadError, load_dir, parse_documents};
pub use secret::{SecretBundle, SecretHandle, SecretProblem, SecretStore, SecretValue, lookup, secret_data};

/// Everything the gateway and the workers need to know about one platform.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PlatformConfig {
    /// Storage tiers, by name.
    pub tiers: BTreeMap<String, TierConfig>,
    /// The tier uploads land in.
    pub default_tier: String,
    /// Webhook endpoints, by name.
    pub webhooks: BTreeMap<String, WebhookConfig>,
    /// Retention policies, by name.
    pub retention_policies: BTreeMap<String, RetentionConfig>,
    /// The metadata shards, when the platform has a ShardSet: the routing in force.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shards: Option<ShardsConfig>,
    /// A live resharding under way: the routing documents move to (see
    /// [`crate::resharding`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard_move: Option<ShardMove>,
    /// The non-public networks webhook deliveries may reach.
    #[serde(default)]
    pub webhook_destinations: crate::webhooks::DestinationPolicy,
}

/// A storage tier, ready for `object_store`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TierConfig {
    pub class: TierClass,
    pub url: String,
    /// Non-secret `object_store` options (endpoint, region, and the backend's `options`).
    pub options: BTreeMap<String, String>,
    /// Secret `object_store` options, by option name.
    pub secret_options: BTreeMap<String, SecretHandle>,
    pub cost_per_gb_month: Option<f64>,
    pub compression: Compression,
}

/// A webhook endpoint with its signing key's handle.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WebhookConfig {
    pub url: String,
    pub signing_key: SecretHandle,
    pub event_types: Vec<EventType>,
    pub filter: Option<EventFilter>,
    pub retry: RetryPolicy,
    pub timeout_seconds: u32,
    pub rate_limit: Option<RateLimit>,
    pub max_concurrency: u32,
    pub headers: Vec<HttpHeader>,
    pub paused: bool,
    pub deactivation: DeactivationRule,
}

/// A retention policy whose tiers are known to exist.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RetentionConfig {
    pub selector: DocumentSelector,
    pub age_basis: AgeBasis,
    /// `(afterDays, tier)`, in increasing `afterDays`.
    pub transitions: Vec<(u32, String)>,
    pub expiration: Option<ExpirationConfig>,
    pub noncurrent_versions: Option<NoncurrentVersions>,
    pub schedule: String,
    pub dry_run: bool,
    pub suspend: bool,
}

/// When and how documents expire under a policy.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ExpirationConfig {
    pub after_days: u32,
    pub action: ExpirationAction,
    /// For ARCHIVE: the tier archived documents move to.
    pub archive_tier: Option<String>,
}

/// The metadata shards and their routing.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ShardsConfig {
    pub shard_set: String,
    /// The shards, in the ShardSet's order.
    pub shards: Vec<ShardConfig>,
    pub routing: Routing,
    /// How fast a move to this routing goes.
    #[serde(default)]
    pub resharding: ReshardingPace,
}

/// Documents moving from the routing in force to another.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ShardMove {
    /// The routing documents move to.
    pub to: ShardsConfig,
    /// Shards in neither routing that may still hold documents (the new shards of a move
    /// that was reverted before its flip): documents move off them too.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub draining: Vec<ShardConfig>,
}

/// One metadata shard.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ShardConfig {
    pub name: String,
    pub url: SecretHandle,
    pub weight: u32,
    pub range_start: Option<String>,
}

/// The custom resources and Secrets of one platform (one namespace, or one directory).
#[derive(Clone, Debug, Default)]
pub struct Sources {
    pub tiers: Vec<StorageTier>,
    pub webhooks: Vec<Webhook>,
    pub retention_policies: Vec<RetentionPolicy>,
    pub shard_sets: Vec<ShardSet>,
    pub releases: Vec<BlueGreenRelease>,
    pub secrets: SecretStore,
}

/// One thing wrong with the sources, attributed to the resource it is about, with the
/// reason a condition on that resource would carry.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{resource}: {message}")]
pub struct ConfigError {
    /// `Kind/name` of the resource at fault.
    pub resource: String,
    /// PascalCase reason, as in a condition.
    pub reason: &'static str,
    pub message: String,
}

fn err(kind: &str, name: &str, reason: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError { resource: format!("{kind}/{name}"), reason, message: message.into() }
}

fn name_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    meta.name.clone().unwrap_or_default()
}

/// Compilation state: the sources, the secret values taken so far and the problems found.
struct Compiler<'a> {
    sources: &'a Sources,
    bundle: SecretBundle,
    errors: Vec<ConfigError>,
}

impl<'a> Compiler<'a> {
    /// The data of a Secret, or records that it does not exist.
    fn secret(&mut self, (kind, name): (&str, &str), secret: &str) -> Option<&'a BTreeMap<String, Vec<u8>>> {
        let data = self.sources.secrets.get(secret);
        if data.is_none() {
            let (reason, message) = secret::secret_not_found(secret);
            self.errors.push(err(kind, name, reason, message));
        }
        data
    }

    /// Records a secret value in the bundle and returns its handle.
    fn keep(&mut self, secret: &str, key: &str, value: &[u8]) -> SecretHandle {
        let handle = SecretHandle::new(secret, key);
        self.bundle.0.insert(handle.clone(), SecretValue::new(value));
        handle
    }

    /// Looks up one secret value, records it in the bundle and returns its handle, or records
    /// why it cannot.
    fn take(&mut self, (kind, name): (&str, &str), secret: &str, key: &str) -> Option<SecretHandle> {
        let sources = self.sources;
        match lookup(&sources.secrets, secret, key) {
            Ok(value) => Some(self.keep(secret, key, value)),
            Err((reason, message)) => {
                self.errors.push(err(kind, name, reason, message));
                None
            }
        }
    }

    /// Records every value of a Secret in the bundle and returns their handles by key, or
    /// records that the Secret does not exist.
    fn take_all(&mut self, owner: (&str, &str), secret: &str) -> BTreeMap<String, SecretHandle> {
        let Some(data) = self.secret(owner, secret) else {
            return BTreeMap::new();
        };
        data.iter().map(|(key, value)| (key.clone(), self.keep(secret, key, value))).collect()
    }

    fn tiers(&mut self) -> (BTreeMap<String, TierConfig>, String) {
        let mut tiers = BTreeMap::new();
        for tier in &self.sources.tiers {
            let name = name_of(&tier.metadata);
            let spec = &tier.spec;
            let mut options = spec.backend.options.clone();
            if let Some(endpoint) = &spec.backend.endpoint {
                options.insert("endpoint".into(), endpoint.clone());
            }
            if let Some(region) = &spec.backend.region {
                options.insert("region".into(), region.clone());
            }
            let secret_options = match &spec.backend.secret_ref {
                Some(secret_ref) => self.take_all(("StorageTier", &name), &secret_ref.name),
                None => BTreeMap::new(),
            };
            let config = TierConfig {
                class: spec.class,
                url: spec.backend.url.clone(),
                options,
                secret_options,
                cost_per_gb_month: spec.cost_per_gb_month,
                compression: spec.compression.clone(),
            };
            if tiers.insert(name.clone(), config).is_some() {
                self.errors.push(err("StorageTier", &name, reasons::INVALID_SPEC, "defined twice"));
            }
        }
        let defaults: Vec<String> =
            self.sources.tiers.iter().filter(|t| t.spec.default).map(|t| name_of(&t.metadata)).collect();
        let default_tier = match defaults.as_slice() {
            [one] => one.clone(),
            [] => {
                self.errors.push(ConfigError {
                    resource: "StorageTier".into(),
                    reason: reasons::INVALID_SPEC,
                    message: "no StorageTier has `default: true`; uploads need one to land in".into(),
                });
                String::new()
            }
            many => {
                for name in many {
                    self.errors.push(err(
                        "StorageTier",
                        name,
                        reasons::INVALID_SPEC,
                        format!("more than one default tier: {}", many.join(", ")),
                    ));
                }
                String::new()
            }
        };
        (tiers, default_tier)
    }

    fn webhooks(&mut self) -> BTreeMap<String, WebhookConfig> {
        let mut webhooks = BTreeMap::new();
        for webhook in &self.sources.webhooks {
            let name = name_of(&webhook.metadata);
            let spec = &webhook.spec;
            let Some(signing_key) = self.take(("Webhook", &name), &spec.secret_ref.name, &spec.secret_ref.key) else {
                continue;
            };
            if let Some(Err(message)) =
                self.bundle.get(&signing_key).map(|v| crate::signing::parse_signing_key(v.expose()))
            {
                self.errors.push(err("Webhook", &name, reasons::INVALID_SPEC, message));
                continue;
            }
            let reserved = spec.headers.iter().find(|h| {
                let lower = h.name.to_ascii_lowercase();
                lower.starts_with("webhook-") || vellum_crds::webhook::RESERVED_HEADERS.contains(&lower.as_str())
            });
            if let Some(header) = reserved {
                let message = format!("header {} is set by Vellum and cannot be overridden", header.name);
                self.errors.push(err("Webhook", &name, reasons::INVALID_SPEC, message));
                continue;
            }
            let config = WebhookConfig {
                url: spec.url.clone(),
                signing_key,
                event_types: spec.event_types.clone(),
                filter: spec.filter.clone(),
                retry: spec.retry.clone(),
                timeout_seconds: spec.timeout_seconds,
                rate_limit: spec.rate_limit.clone(),
                max_concurrency: spec.max_concurrency,
                headers: spec.headers.clone(),
                paused: spec.paused,
                deactivation: spec.deactivation.clone(),
            };
            if webhooks.insert(name.clone(), config).is_some() {
                self.errors.push(err("Webhook", &name, reasons::INVALID_SPEC, "defined twice"));
            }
        }
        webhooks
    }

    fn retention_policies(&mut self, tiers: &BTreeMap<String, TierConfig>) -> BTreeMap<String, RetentionConfig> {
        let mut retention_policies = BTreeMap::new();
        let frozen: Option<String> = tiers.iter().find(|(_, t)| t.class == TierClass::Frozen).map(|(n, _)| n.clone());
        for policy in &self.sources.retention_policies {
            let name = name_of(&policy.metadata);
            let spec = &policy.spec;
            let errors_before = self.errors.len();
            let missing = |tier: &str| {
                (!tiers.contains_key(tier)).then(|| {
                    err("RetentionPolicy", &name, reasons::TIER_NOT_FOUND, format!("StorageTier {tier} does not exist"))
                })
            };
            for t in &spec.transitions {
                self.errors.extend(missing(&t.to_tier));
            }
            let expiration = match &spec.expiration {
                None => None,
                Some(e) => {
                    let archive_tier = match e.action {
                        ExpirationAction::Delete => None,
                        ExpirationAction::Archive => match (&e.archive_tier, &frozen) {
                            (Some(t), _) => {
                                self.errors.extend(missing(t));
                                Some(t.clone())
                            }
                            (None, Some(f)) => Some(f.clone()),
                            (None, None) => {
                                self.errors.push(err(
                                    "RetentionPolicy",
                                    &name,
                                    reasons::TIER_NOT_FOUND,
                                    "ARCHIVE needs an archiveTier or a StorageTier of class FROZEN",
                                ));
                                None
                            }
                        },
                    };
                    Some(ExpirationConfig { after_days: e.after_days, action: e.action, archive_tier })
                }
            };
            if self.errors.len() > errors_before {
                continue;
            }
            let config = RetentionConfig {
                selector: spec.selector.clone(),
                age_basis: spec.age_basis,
                transitions: spec.transitions.iter().map(|t| (t.after_days, t.to_tier.clone())).collect(),
                expiration,
                noncurrent_versions: spec.noncurrent_versions.clone(),
                schedule: spec.schedule.clone(),
                dry_run: spec.dry_run,
                suspend: spec.suspend,
            };
            if retention_policies.insert(name.clone(), config).is_some() {
                self.errors.push(err("RetentionPolicy", &name, reasons::INVALID_SPEC, "defined twice"));
            }
        }
        retention_policies
    }

    fn shards(&mut self) -> Option<ShardsConfig> {
        match self.sources.shard_sets.as_slice() {
            [] => None,
            [set] => {
                let set_name = name_of(&set.metadata);
                let mut seen = BTreeSet::new();
                let mut shards = Vec::new();
                for shard in &set.spec.shards {
                    if !seen.insert(shard.name.clone()) {
                        self.errors.push(err(
                            "ShardSet",
                            &set_name,
                            reasons::INVALID_SPEC,
                            format!("shard {} is listed twice", shard.name),
                        ));
                    }
                    if let Some(url) =
                        self.take(("ShardSet", &set_name), &shard.url_secret_ref.name, &shard.url_secret_ref.key)
                    {
                        shards.push(ShardConfig {
                            name: shard.name.clone(),
                            url,
                            weight: shard.weight,
                            range_start: shard.range_start.clone(),
                        });
                    }
                }
                let config = ShardsConfig {
                    shard_set: set_name.clone(),
                    shards,
                    routing: set.spec.routing.clone(),
                    resharding: set.spec.resharding.clone(),
                };
                if config.shards.len() == set.spec.shards.len()
                    && let Err(message) = crate::routing::RoutingTable::build(&config)
                {
                    self.errors.push(err("ShardSet", &set_name, reasons::INVALID_SPEC, message));
                }
                Some(config)
            }
            many => {
                for set in many {
                    self.errors.push(err(
                        "ShardSet",
                        &name_of(&set.metadata),
                        reasons::INVALID_SPEC,
                        "a platform has one ShardSet",
                    ));
                }
                None
            }
        }
    }

    fn webhook_destinations(&mut self) -> crate::webhooks::DestinationPolicy {
        let mut policy = crate::webhooks::DestinationPolicy::default();
        for release in &self.sources.releases {
            match crate::webhooks::DestinationPolicy::parse(
                release.spec.webhook_allowed_cidrs.iter().map(String::as_str),
            ) {
                Ok(more) => policy.allowed_cidrs.extend(more.allowed_cidrs),
                Err(message) => self.errors.push(err(
                    "BlueGreenRelease",
                    &name_of(&release.metadata),
                    reasons::INVALID_SPEC,
                    format!("webhookAllowedCidrs: {message}"),
                )),
            }
        }
        policy.allowed_cidrs.sort();
        policy.allowed_cidrs.dedup();
        policy
    }
}

/// Compiles the sources. Every problem is reported, not just the first, so a person fixes
/// them in one pass; the config is returned only when there are none.
pub fn compile(sources: &Sources) -> Result<(PlatformConfig, SecretBundle), Vec<ConfigError>> {
    let mut compiler = Compiler { sources, bundle: SecretBundle::default(), errors: Vec::new() };
    let (tiers, default_tier) = compiler.tiers();
    let webhooks = compiler.webhooks();
    let retention_policies = compiler.retention_policies(&tiers);
    let shards = compiler.shards();
    let webhook_destinations = compiler.webhook_destinations();
    if compiler.errors.is_empty() {
        let config = PlatformConfig {
            tiers,
            default_tier,
            webhooks,
            retention_policies,
            shards,
            shard_move: None,
            webhook_destinations,
        };
        Ok((config, compiler.bundle))
    } else {
        Err(compiler.errors)
    }
}

/// What [`compile_lenient`] returns: the config (or why there is none), and the resources
/// it left out with why.
pub type Lenient = (Result<(PlatformConfig, SecretBundle), Vec<ConfigError>>, Vec<ConfigError>);

/// Compiles what can be compiled: resources at fault (a Webhook whose Secret is missing, a
/// policy naming an unknown tier, a non-default tier) are left out, so that one bad
/// resource does not stop a platform; the operator gives them their own `Ready=False`.
/// Problems no resource can be left out for (no default tier, a bad release or ShardSet)
/// fail the whole config.
pub fn compile_lenient(mut sources: Sources) -> Lenient {
    let mut left_out = Vec::new();
    loop {
        let errors = match compile(&sources) {
            Ok(compiled) => return (Ok(compiled), left_out),
            Err(errors) => errors,
        };
        let mut removed = false;
        for e in &errors {
            let Some((kind, name)) = e.resource.split_once('/') else { continue };
            let before = sources.tiers.len() + sources.webhooks.len() + sources.retention_policies.len();
            match kind {
                "StorageTier" => sources.tiers.retain(|t| name_of(&t.metadata) != name || t.spec.default),
                "Webhook" => sources.webhooks.retain(|w| name_of(&w.metadata) != name),
                "RetentionPolicy" => sources.retention_policies.retain(|p| name_of(&p.metadata) != name),
                _ => {}
            }
            removed |= before != sources.tiers.len() + sources.webhooks.len() + sources.retention_policies.len();
        }
        if !removed {
            return (Err(errors), left_out);
        }
        left_out.extend(errors.into_iter().filter(|e| e.resource.contains('/')));
    }
}

/// Compiles Webhook resources alone (as the gateway does for those created through its API,
/// beside a config compiled elsewhere), with the same validation as [`compile`].
pub fn compile_webhooks(
    webhooks: Vec<Webhook>,
    secrets: SecretStore,
) -> Result<(BTreeMap<String, WebhookConfig>, SecretBundle), Vec<ConfigError>> {
    let sources = Sources { webhooks, secrets, ..Sources::default() };
    let mut compiler = Compiler { sources: &sources, bundle: SecretBundle::default(), errors: Vec::new() };
    let webhooks = compiler.webhooks();
    if compiler.errors.is_empty() { Ok((webhooks, compiler.bundle)) } else { Err(compiler.errors) }
}

impl PlatformConfig {
    /// A stable hash of the config, for the name of the ConfigMap that holds it.
    pub fn content_hash(&self) -> String {
        use sha2::{Digest, Sha256};
        // BTreeMaps and Vecs serialise in a fixed order, so equal configs hash equally.
        let json = serde_json::to_vec(self).unwrap_or_default();
        let digest = Sha256::digest(json);
        digest.iter().take(5).fold(String::new(), |mut out, b| {
            use std::fmt::Write;
            let _ = write!(out, "{b:02x}");
            out
        })
    }

    /// Every shard that may hold documents: those of the routing in force in its order,
    /// then, while a move runs, those only the routing it moves to has, then those it
    /// drains. The order of [`crate::documents::Library::shards`].
    pub fn all_shards(&self) -> Vec<&ShardConfig> {
        let mut all: Vec<&ShardConfig> = self.shards.iter().flat_map(|s| &s.shards).collect();
        if let Some(moving) = &self.shard_move {
            for shard in moving.to.shards.iter().chain(&moving.draining) {
                if all.iter().all(|s| s.name != shard.name) {
                    all.push(shard);
                }
            }
        }
        all
    }
}

#[cfg(test)]
mod tests;
