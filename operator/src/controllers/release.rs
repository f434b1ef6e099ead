//! BlueGreenRelease, first version: the compiled platform config and the aggregated Secret,
//! a schema-migration Job per shard that must succeed before any pod starts, then the
//! gateway and workers Deployments of the first color, the active and preview Services, an
//! HPA and a PDB. A changed version is refused with a condition until blue-green rollouts
//! exist; every other change (config, replicas, resources) is applied in place.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams};
use kube::runtime::controller::Action;
use vellum_core::config::{
    CONFIG_FILE, ConfigError, PlatformConfig, SECRETS_FILE, SecretBundle, Sources, compile, lookup,
};
use vellum_crds::blue_green_release::{BlueGreenReleaseStatus, Color, JwtAlgorithm, Phase};
use vellum_crds::common::Conditions;
use vellum_crds::conditions::{self, reasons};
use vellum_crds::{BlueGreenRelease, field_managers};

use crate::builders::{self, ReleaseFacts, names, secret_keys};
use crate::context::{Context, Result, apply, apply_status, condition};
use crate::controllers::retention::not_found;
use crate::controllers::shards::routes_the_same;

const MANAGER: &str = field_managers::BLUE_GREEN_RELEASE;

/// Compiles what can be compiled: resources at fault (a Webhook whose Secret is missing, a
/// policy naming an unknown tier) are left out, so that one bad resource does not stop the
/// platform; they carry their own `Ready=False`. Problems no resource can be left out for
/// (no default tier, a bad release or ShardSet) fail the whole config.
/// What [`compile_lenient`] returns: the config (or why none), and what it left out.
pub type Lenient = (std::result::Result<(PlatformConfig, SecretBundle), Vec<ConfigError>>, Vec<ConfigError>);

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
                "StorageTier" => sources.tiers.retain(|t| t.name_any() != name || t.spec.default),
                "Webhook" => sources.webhooks.retain(|w| w.name_any() != name),
                "RetentionPolicy" => sources.retention_policies.retain(|p| p.name_any() != name),
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

/// A condition-worthy reason the release cannot progress.
struct Blocked {
    reason: &'static str,
    message: String,
}

fn blocked(reason: &'static str, message: impl Into<String>) -> Blocked {
    Blocked { reason, message: message.into() }
}

/// What the release reached this time.
struct Progress {
    phase: Phase,
    ready: bool,
    reason: &'static str,
    message: String,
    ready_replicas: Option<i32>,
    degraded: Vec<String>,
    active_version: Option<String>,
}

/// The values of the platform Secret.
fn secret_data(
    release: &BlueGreenRelease,
    config: &PlatformConfig,
    bundle: &SecretBundle,
    sources: &Sources,
    link_key: Vec<u8>,
) -> std::result::Result<(BTreeMap<String, Vec<u8>>, ReleaseFacts), Blocked> {
    let spec = &release.spec;
    let value = |name: &str, key: &str| -> std::result::Result<Vec<u8>, Blocked> {
        lookup(&sources.secrets, name, key).map(<[u8]>::to_vec).map_err(|(reason, message)| blocked(reason, message))
    };
    let mut data = BTreeMap::new();
    data.insert(SECRETS_FILE.to_owned(), bundle.to_json().into_bytes());
    let jwt = value(&spec.jwt.secret_ref.name, &spec.jwt.secret_ref.key)?;
    let jwt_is_jwks = spec.jwt.algorithm != JwtAlgorithm::HS256 && jwt.trim_ascii_start().starts_with(b"{");
    data.insert(secret_keys::JWT_KEY.to_owned(), jwt);
    data.insert(secret_keys::LINK_KEY.to_owned(), link_key);
    let shards = config.shards.as_ref().ok_or_else(|| {
        blocked(reasons::SHARD_SET_NOT_FOUND, format!("ShardSet {} does not exist", spec.shard_set_ref))
    })?;
    for (i, shard) in shards.shards.iter().enumerate() {
        let url = bundle.get(&shard.url).map(|v| v.expose().to_vec()).unwrap_or_default();
        if std::str::from_utf8(&url).ok().is_none_or(str::is_empty) {
            return Err(blocked(
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

#[allow(clippy::too_many_lines)] // the steps of a first deployment, in order
async fn progress(
    release: &BlueGreenRelease,
    ctx: &Context,
    color: Color,
) -> Result<std::result::Result<Progress, Blocked>> {
    let namespace = release.namespace().unwrap_or_default();
    let name = release.name_any();
    let previous = release.status.clone().unwrap_or_default();
    let sources = ctx.caches.sources(&namespace);
    if ctx.caches.shard_set(&namespace, &release.spec.shard_set_ref).is_none() {
        return Ok(Err(blocked(
            reasons::SHARD_SET_NOT_FOUND,
            format!("ShardSet {} does not exist in namespace {namespace}", release.spec.shard_set_ref),
        )));
    }
    let (compiled, left_out) = compile_lenient(sources.clone());
    let (mut config, bundle) = match compiled {
        Ok(compiled) => compiled,
        Err(errors) => {
            let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
            return Ok(Err(blocked(reasons::INVALID_CONFIG, lines.join("; "))));
        }
    };
    let mut degraded: Vec<String> =
        left_out.iter().map(|e| format!("{} is left out of the config: {}", e.resource, e.message)).collect();

    // What is published now: its link key stays, and its routing unless nothing moves.
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let config_maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &namespace);
    let platform = names::platform(&name);
    let link_key = secrets
        .get_opt(&platform)
        .await?
        .and_then(|s| s.data?.get(secret_keys::LINK_KEY).map(|v| v.0.clone()))
        .unwrap_or_else(|| hex::encode(rand::random::<[u8; 32]>()).into_bytes());
    let published: Option<PlatformConfig> = config_maps
        .get_opt(&platform)
        .await?
        .and_then(|cm| cm.data?.get(CONFIG_FILE).cloned())
        .and_then(|text| serde_json::from_str(&text).ok());
    if let (Some(old), Some(new)) = (published.as_ref().and_then(|p| p.shards.as_ref()), config.shards.as_ref())
        && !routes_the_same(old, new)
    {
        degraded.push(format!(
            "ShardSet {} changed in a way that would move documents between shards; the published routing stays until rebalancing is supported",
            release.spec.shard_set_ref
        ));
        config.shards = Some(old.clone());
    }

    let (data, facts) = match secret_data(release, &config, &bundle, &sources, link_key) {
        Ok(found) => found,
        Err(b) => return Ok(Err(b)),
    };
    apply(&ctx.client, MANAGER, &builders::platform_config_map(release, &config)).await?;
    apply(&ctx.client, MANAGER, &builders::platform_secret(release, &data)).await?;

    let active_version = previous.active_version.clone();
    if let Some(active) = &active_version
        && *active != release.spec.version
    {
        // The config above still follows the resources; the pods stay as they are.
        return Ok(Err(blocked(
            reasons::NEW_VERSION_REFUSED,
            format!(
                "version {} is running; deploying {} beside it as the other color is not supported by this operator yet. Set spec.version back to {active}",
                active, release.spec.version
            ),
        )));
    }

    // Schema migrations, one Job per shard, before any pod of this version starts.
    let shards = config.shards.as_ref().map(|s| s.shards.clone()).unwrap_or_default();
    let mut pending = Vec::new();
    for shard in &shards {
        let job = apply(&ctx.client, MANAGER, &builders::migration_job(release, &shard.name)).await?;
        let status = job.status.unwrap_or_default();
        let failed = status.conditions.unwrap_or_default().iter().any(|c| c.type_ == "Failed" && c.status == "True");
        if failed {
            return Ok(Err(blocked(
                reasons::MIGRATION_FAILED,
                format!(
                    "the schema migration of shard {} failed: see `kubectl logs job/{}`",
                    shard.name,
                    job.metadata.name.unwrap_or_default()
                ),
            )));
        }
        if status.succeeded.unwrap_or(0) < 1 {
            pending.push(shard.name.clone());
        }
    }
    if !pending.is_empty() && active_version.is_none() {
        return Ok(Ok(Progress {
            phase: Phase::Migrating,
            ready: false,
            reason: reasons::MIGRATING,
            message: format!("migrating the schema of {}", pending.join(", ")),
            ready_replicas: None,
            degraded,
            active_version,
        }));
    }

    apply(&ctx.client, MANAGER, &builders::gateway_service_account(release)).await?;
    apply(&ctx.client, MANAGER, &builders::gateway_role_binding(release)).await?;
    let gateway = apply(&ctx.client, MANAGER, &builders::gateway_deployment(release, color, &facts)).await?;
    apply(&ctx.client, MANAGER, &builders::workers_deployment(release, color, &facts)).await?;
    apply(&ctx.client, MANAGER, &builders::gateway_service(release, &names::active_service(&name), color)).await?;
    apply(&ctx.client, MANAGER, &builders::gateway_service(release, &names::preview_service(&name), color.other()))
        .await?;
    apply(&ctx.client, MANAGER, &builders::gateway_disruption_budget(release, color)).await?;
    if let Some(hpa) = builders::gateway_autoscaler(release, color) {
        apply(&ctx.client, MANAGER, &hpa).await?;
    } else {
        let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(ctx.client.clone(), &namespace);
        hpas.delete(&names::gateway_policy(&name), &DeleteParams::background()).await.map(|_| ()).or_else(not_found)?;
    }

    let status = gateway.status.unwrap_or_default();
    let ready_replicas = status.ready_replicas.unwrap_or(0);
    let wanted = gateway.spec.and_then(|s| s.replicas).unwrap_or(1).max(1);
    let serving = ready_replicas >= 1 && status.updated_replicas.unwrap_or(0) >= wanted.min(1);
    Ok(Ok(if serving {
        Progress {
            phase: Phase::Stable,
            ready: true,
            reason: reasons::RECONCILED,
            message: format!(
                "version {} serves as {} with {ready_replicas}/{wanted} gateways ready",
                release.spec.version,
                color.as_str()
            ),
            ready_replicas: Some(ready_replicas),
            degraded,
            active_version: Some(release.spec.version.clone()),
        }
    } else {
        Progress {
            phase: Phase::Deploying,
            ready: false,
            reason: reasons::DEPLOYING,
            message: format!(
                "waiting for gateways of version {} ({ready_replicas}/{wanted} ready)",
                release.spec.version
            ),
            ready_replicas: Some(ready_replicas),
            degraded,
            active_version,
        }
    }))
}

pub async fn reconcile(release: Arc<BlueGreenRelease>, ctx: Arc<Context>) -> Result<Action> {
    let previous = release.status.clone().unwrap_or_default();
    let generation = release.metadata.generation;
    let color = previous.active_color.unwrap_or(Color::Blue);
    let outcome = progress(&release, &ctx, color).await?;
    let mut status = BlueGreenReleaseStatus { observed_generation: generation, ..previous.clone() };
    let (ready, reason, message, requeue, degraded) = match outcome {
        Ok(p) => {
            status.phase = Some(p.phase);
            status.ready_replicas = p.ready_replicas;
            if p.active_version.is_some() {
                status.active_color = Some(color);
                status.active_version = p.active_version;
            }
            let requeue = if p.ready { ctx.resync } else { std::time::Duration::from_secs(5) };
            (p.ready, p.reason, p.message, requeue, p.degraded)
        }
        Err(b) => {
            // A refused new version leaves the running one serving: Ready reflects it.
            let serving = b.reason == reasons::NEW_VERSION_REFUSED && previous.conditions.is_true(conditions::READY);
            if !serving {
                status.phase = Some(if previous.active_version.is_some() { Phase::Stable } else { Phase::Failed });
            }
            (serving, b.reason, b.message, ctx.resync, Vec::new())
        }
    };
    if status.phase == Some(Phase::Stable) && !ready && reason != reasons::NEW_VERSION_REFUSED {
        status.phase = Some(Phase::Failed);
    }
    let progressing = matches!(status.phase, Some(Phase::Migrating | Phase::Deploying));
    let mut list = vec![
        condition(&previous.conditions, conditions::READY, ready, reason, message.clone(), generation),
        condition(
            &previous.conditions,
            conditions::PROGRESSING,
            progressing,
            if progressing { reason } else { reasons::RECONCILED },
            if progressing { message.clone() } else { "no rollout under way".to_owned() },
            generation,
        ),
    ];
    let degraded_now = !degraded.is_empty() || reason == reasons::NEW_VERSION_REFUSED;
    list.push(condition(
        &previous.conditions,
        conditions::DEGRADED,
        degraded_now,
        if reason == reasons::NEW_VERSION_REFUSED {
            reason
        } else if degraded_now {
            reasons::INVALID_CONFIG
        } else {
            reasons::RECONCILED
        },
        if reason == reasons::NEW_VERSION_REFUSED {
            message.clone()
        } else if degraded_now {
            degraded.join("; ")
        } else {
            "nothing left out".to_owned()
        },
        generation,
    ));
    let was = previous.conditions.get(conditions::READY).map(|c| (c.status.clone(), c.reason.clone()));
    let now = list.first().map(|c| (c.status.clone(), c.reason.clone()));
    status.conditions = Conditions(list);
    apply_status(&ctx.client, MANAGER, release.as_ref(), &status).await?;
    if was != now || previous.phase != status.phase {
        let phase = status.phase.map(|p| format!("{p:?}")).unwrap_or_default();
        ctx.event(release.as_ref(), !ready && !progressing, &phase, format!("{reason}: {message}")).await;
    }
    Ok(Action::requeue(requeue))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sources(yaml: &str) -> Sources {
        let mut sources = Sources::default();
        vellum_core::config::parse_documents(yaml, "test.yaml", &mut sources).unwrap();
        sources
    }

    const GOOD: &str = "
apiVersion: vellum.dev/v1alpha1
kind: StorageTier
metadata: {name: hot}
spec: {class: HOT, default: true, backend: {url: 'memory://'}}
---
apiVersion: v1
kind: Secret
metadata: {name: keys}
stringData: {a: whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw}
---
apiVersion: vellum.dev/v1alpha1
kind: Webhook
metadata: {name: good}
spec: {url: 'https://example.com/a', secretRef: {name: keys, key: a}}
";

    #[test]
    fn bad_resources_are_left_out_and_named() {
        let bad = "
---
apiVersion: vellum.dev/v1alpha1
kind: Webhook
metadata: {name: orphan}
spec: {url: 'https://example.com/b', secretRef: {name: missing, key: a}}
---
apiVersion: vellum.dev/v1alpha1
kind: RetentionPolicy
metadata: {name: lost}
spec: {schedule: '@daily', transitions: [{afterDays: 1, toTier: nowhere}]}
";
        let (compiled, left_out) = compile_lenient(sources(&format!("{GOOD}{bad}")));
        let (config, _) = compiled.unwrap();
        assert_eq!(config.webhooks.keys().collect::<Vec<_>>(), ["good"]);
        assert!(config.retention_policies.is_empty());
        let named: Vec<&str> = left_out.iter().map(|e| e.resource.as_str()).collect();
        assert_eq!(named, ["Webhook/orphan", "RetentionPolicy/lost"]);
        assert_eq!(left_out[0].reason, reasons::SECRET_NOT_FOUND);
    }

    #[test]
    fn a_platform_without_a_default_tier_fails_whole() {
        let yaml = GOOD.replace("default: true", "default: false");
        let (compiled, _) = compile_lenient(sources(&yaml));
        let errors = compiled.unwrap_err();
        assert!(errors.iter().any(|e| e.message.contains("default")), "{errors:?}");
    }
}
