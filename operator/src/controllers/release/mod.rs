//! BlueGreenRelease: the compiled platform config and the aggregated Secret, a
//! schema-migration Job per shard that must succeed before any pod starts, the gateway and
//! workers Deployments of the serving color, the active and preview Services, an HPA and a
//! PDB. Any change of what the pods run (version, image, resources, derived environment)
//! is a blue-green rollout ([`rollout`]); every other change (config, replicas) is applied
//! in place.
//!
//! A reconcile reads what the platform is compiled from (`dereference`), checks it
//! (`validate`), builds every object ([`build()`], pure), applies the config and acts for
//! the rollout's phase ([`rollout::step`]), and writes what it reached as status
//! ([`status`]).

pub mod build;
pub mod diagnose;
pub mod reshard;
pub mod rollout;
pub mod smoke;
pub mod status;

#[cfg(test)]
mod reconcile_tests;

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action;
use vellum_core::config::{CONFIG_FILE, PlatformConfig, SECRETS_FILE, SecretBundle, Sources, compile_lenient, lookup};
use vellum_crds::blue_green_release::{Color, JwtAlgorithm};
use vellum_crds::conditions::reasons;
use vellum_crds::{BlueGreenRelease, field_managers};

use crate::context::{Context, Refused, Result, StepError, apply};
use crate::controllers::platform::{ReleaseFacts, names, secret_keys, short_hash};
use status::Progress;

const MANAGER: &str = field_managers::BLUE_GREEN_RELEASE;

pub async fn reconcile(release: Arc<BlueGreenRelease>, ctx: Arc<Context>) -> Result<Action> {
    // The built objects make a large future: it lives on the heap.
    let reached = match Box::pin(progress(&release, &ctx)).await {
        Ok(progress) => Ok(progress),
        Err(StepError::Refused(refused)) => Err(refused),
        Err(StepError::Failed(e)) => return Err(e),
    };
    status::write(&release, &ctx, reached).await
}

/// The pipeline: each step either hands the next what it needs or says why it stops.
async fn progress(release: &BlueGreenRelease, ctx: &Context) -> Result<Progress, StepError> {
    let inputs = dereference(release, ctx).await?;
    let valid = validate(inputs)?;
    let objects = build(release, valid)?;
    apply(&ctx.client, MANAGER, &objects.config_map).await?;
    apply(&ctx.client, MANAGER, &objects.secret).await?;
    let moving = reshard::step(release, ctx, &objects, &objects.config).await?;
    if objects.flipped {
        let set = &release.spec.shard_set_ref;
        if let Some(shard_set) = ctx.caches.shard_set(&release.namespace().unwrap_or_default(), set) {
            ctx.event(&shard_set, false, "Flipped", format!("the new routing of ShardSet {set} is in force")).await;
        }
    }
    let mut progress = Box::pin(rollout::step(release, ctx, &objects)).await?;
    if let Some(moving) = moving {
        report_move(release, ctx, &moving.status).await;
        progress.requeue = Some(progress.requeue.map_or(moving.requeue, |r| r.min(moving.requeue)));
    }
    Ok(progress)
}

/// Writes a move's progress into the ShardSet's `status.rebalance`, with an Event when its
/// phase changes.
async fn report_move(release: &BlueGreenRelease, ctx: &Context, status: &vellum_crds::shard_set::RebalanceStatus) {
    let namespace = release.namespace().unwrap_or_default();
    let Some(set) = ctx.caches.shard_set(&namespace, &release.spec.shard_set_ref) else { return };
    let before = set.status.as_ref().and_then(|s| s.rebalance.as_ref()).and_then(|r| r.phase.clone());
    let status = serde_json::json!({"rebalance": status});
    if let Err(e) = crate::context::apply_status(&ctx.client, reshard::STATUS_MANAGER, &set, &status).await {
        tracing::warn!(error = %e, "writing the ShardSet's rebalance status");
        return;
    }
    let phase = status["rebalance"]["phase"].as_str().map(str::to_owned);
    if phase != before
        && let Some(phase) = phase
    {
        let note =
            status["rebalance"]["message"].as_str().map_or_else(|| format!("resharding: {phase}"), str::to_owned);
        ctx.event(&set, false, &format!("Resharding{phase}"), note).await;
    }
}

/// What the platform is compiled from, and what is published now.
#[derive(Debug)]
pub struct Inputs {
    pub sources: Sources,
    /// The config the pods run with now: its routing stays unless nothing would move.
    pub published: Option<PlatformConfig>,
    /// The link-signing key published now: it stays, so that links handed out keep working.
    pub link_key: Option<Vec<u8>>,
    /// The key of the published move whose resharding Job has succeeded, if one has.
    pub moved: Option<String>,
}

/// Reads the namespace's resources from the caches and the published config and Secret
/// from the API server.
async fn dereference(release: &BlueGreenRelease, ctx: &Context) -> Result<Inputs, StepError> {
    let namespace = release.namespace().unwrap_or_default();
    if ctx.caches.shard_set(&namespace, &release.spec.shard_set_ref).is_none() {
        return Err(Refused::new(
            reasons::SHARD_SET_NOT_FOUND,
            format!("ShardSet {} does not exist in namespace {namespace}", release.spec.shard_set_ref),
        )
        .into());
    }
    let platform = names::platform(&release.name_any());
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let config_maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &namespace);
    let link_key = secrets.get_opt(&platform).await?.and_then(|s| s.data?.remove(secret_keys::LINK_KEY)).map(|v| v.0);
    let published = config_maps
        .get_opt(&platform)
        .await?
        .and_then(|cm| cm.data?.remove(CONFIG_FILE))
        .and_then(|text| serde_json::from_str(&text).ok());
    let moved = reshard::succeeded(ctx, release, published.as_ref()).await?;
    Ok(Inputs { sources: ctx.caches.sources(&namespace), published, link_key, moved })
}

/// What validation let through.
#[derive(Debug)]
pub struct Valid {
    pub sources: Sources,
    pub config: PlatformConfig,
    pub bundle: SecretBundle,
    pub link_key: Vec<u8>,
    /// Resources left out of the config, and changes held back, each said in a sentence.
    pub degraded: Vec<String>,
    /// A move's Job has succeeded and the routing it reached is put in force now.
    pub flipped: bool,
}

/// Compiles what can be compiled: resources at fault (a Webhook whose Secret is missing, a
/// policy naming an unknown tier) are left out, so that one bad resource does not stop the
/// platform; they carry their own `Ready=False`. Problems no resource can be left out for
/// (no default tier, a bad release or ShardSet) refuse the whole config. A routing change
/// that would move documents is published as a move (see [`reshard`]).
pub fn validate(inputs: Inputs) -> Result<Valid, Refused> {
    let (compiled, left_out) = compile_lenient(inputs.sources.clone());
    let (mut config, mut bundle) = compiled.map_err(|errors| {
        let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
        Refused::new(reasons::INVALID_CONFIG, lines.join("; "))
    })?;
    let degraded: Vec<String> =
        left_out.iter().map(|e| format!("{} is left out of the config: {}", e.resource, e.message)).collect();
    // A routing that would move documents is moved to live (see `reshard`): the published
    // routing stays in force beside the move until the move's Job has run.
    let mut flipped = false;
    if let Some(desired) = config.shards.take() {
        let plan = reshard::plan(inputs.published.as_ref(), desired, inputs.moved.as_deref());
        config.shards = Some(plan.shards);
        config.shard_move = plan.shard_move;
        flipped = plan.flipped;
    }
    // The URLs of shards the ShardSet no longer lists but the routing still names.
    for shard in config.all_shards() {
        if bundle.get(&shard.url).is_none()
            && let Some((secret, key)) = shard.url.0.split_once('/')
            && let Ok(value) = lookup(&inputs.sources.secrets, secret, key)
        {
            bundle.0.insert(shard.url.clone(), vellum_core::config::SecretValue::new(value.to_vec()));
        }
    }
    let link_key = inputs.link_key.unwrap_or_else(|| hex::encode(rand::random::<[u8; 32]>()).into_bytes());
    Ok(Valid { sources: inputs.sources, config, bundle, link_key, degraded, flipped })
}

/// What a release produces whatever its colors: built, not yet applied. The objects of a
/// color (Deployments, Services, PDB, HPA) are built by the rollout for the color it acts on.
#[derive(Debug)]
pub struct Objects {
    pub config_map: ConfigMap,
    pub secret: Secret,
    /// One migration Job per shard, by shard name.
    pub migrations: Vec<(String, Job)>,
    /// What the pods need to know about the Secret's values.
    pub facts: ReleaseFacts,
    /// Hash of the gateway and workers pod templates the spec asks for: a change is a
    /// rollout.
    pub template: String,
    pub degraded: Vec<String>,
    /// The config published.
    pub config: PlatformConfig,
    /// The routing a move reached is put in force by this config.
    pub flipped: bool,
}

/// Builds what validation let through.
pub fn build(release: &BlueGreenRelease, valid: Valid) -> Result<Objects, Refused> {
    let (data, facts) = secret_data(release, &valid)?;
    let template = template_hash(release, &facts);
    let shards: Vec<vellum_core::config::ShardConfig> = valid.config.all_shards().into_iter().cloned().collect();
    // A shard's migration runs again when what it runs or where it runs changes: a Job that
    // failed on a wrong database URL is replaced once the URL is fixed. The URL enters the
    // name only through a hash keyed with the platform's own secret key.
    let inputs = |shard: &vellum_core::config::ShardConfig| {
        let url = valid.bundle.get(&shard.url).map(|v| v.expose().to_vec()).unwrap_or_default();
        migration_inputs(&template, &valid.link_key, &url)
    };
    Ok(Objects {
        config_map: build::build_config_map(release, &valid.config),
        secret: build::build_secret(release, &data),
        migrations: shards
            .iter()
            .map(|s| (s.name.clone(), build::build_migration_job(release, &s.name, &inputs(s))))
            .collect(),
        facts,
        template,
        degraded: valid.degraded,
        config: valid.config.clone(),
        flipped: valid.flipped,
    })
}

/// What names a shard's migration Job: the pod templates' hash, and the shard's URL hashed
/// with the platform's secret `key` (so that the name says nothing about the URL).
pub fn migration_inputs(template: &str, key: &[u8], url: &[u8]) -> String {
    let keyed = short_hash(&[&hex::encode(key), &String::from_utf8_lossy(url)]);
    short_hash(&[template, &keyed])
}

/// Hash of the gateway and workers pod templates of the spec (the same for either color).
pub fn template_hash(release: &BlueGreenRelease, facts: &ReleaseFacts) -> String {
    let template = |d: Deployment| serde_json::to_string(&d.spec.map(|s| s.template)).unwrap_or_default();
    let gateway = template(build::build_gateway_deployment(release, Color::Blue, facts));
    let workers = template(build::build_workers_deployment(release, Color::Blue, facts));
    short_hash(&[&gateway, &workers])
}

/// The values of the platform Secret, and what the pods need to know about them.
pub fn secret_data(
    release: &BlueGreenRelease,
    valid: &Valid,
) -> Result<(BTreeMap<String, Vec<u8>>, ReleaseFacts), Refused> {
    let spec = &release.spec;
    let value = |name: &str, key: &str| -> Result<Vec<u8>, Refused> {
        lookup(&valid.sources.secrets, name, key).map(<[u8]>::to_vec).map_err(Refused::from)
    };
    let mut data = BTreeMap::new();
    data.insert(SECRETS_FILE.to_owned(), valid.bundle.to_json().into_bytes());
    let jwt = value(&spec.jwt.secret_ref.name, &spec.jwt.secret_ref.key)?;
    let jwt_is_jwks = spec.jwt.algorithm != JwtAlgorithm::HS256 && jwt.trim_ascii_start().starts_with(b"{");
    data.insert(secret_keys::JWT_KEY.to_owned(), jwt);
    data.insert(secret_keys::LINK_KEY.to_owned(), valid.link_key.clone());
    if valid.config.shards.is_none() {
        return Err(Refused::new(
            reasons::SHARD_SET_NOT_FOUND,
            format!("ShardSet {} does not exist", spec.shard_set_ref),
        ));
    }
    for (i, shard) in valid.config.all_shards().into_iter().enumerate() {
        let url = valid.bundle.get(&shard.url).map(|v| v.expose().to_vec()).unwrap_or_default();
        if std::str::from_utf8(&url).ok().is_none_or(str::is_empty) {
            return Err(Refused::new(
                reasons::INVALID_SPEC,
                format!("the URL of shard {} is empty or not UTF-8", shard.name),
            ));
        }
        if i == 0 {
            data.insert(secret_keys::DATABASE_URL.to_owned(), url.clone());
        }
        data.insert(secret_keys::shard(&shard.name), url);
    }
    let nats_credentials = match &spec.nats.credentials_secret_ref {
        Some(r) => {
            data.insert(secret_keys::NATS_CREDENTIALS.to_owned(), value(&r.name, &r.key)?);
            true
        }
        None => false,
    };
    Ok((data, ReleaseFacts { jwt_is_jwks, nats_credentials }))
}
