use super::*;
use crate::controllers::golden::assert_golden;
use vellum_crds::labels;

fn release(yaml: &str) -> BlueGreenRelease {
    let mut release: BlueGreenRelease = serde_yaml::from_str(yaml).unwrap();
    release.metadata.uid = Some("uid-1".into());
    release.metadata.namespace = Some("docs-ns".into());
    release
}

/// A release with what most platforms set: HS256 keys, three gateways, an issuer.
const RELEASE: &str = r"
apiVersion: vellum.dev/v1alpha1
kind: BlueGreenRelease
metadata: {name: docs}
spec:
  version: 1.0.0
  gateway: {image: 'vellum/gateway:1.0.0', replicas: 3}
  workers: {image: 'vellum/workers:1.0.0'}
  shardSetRef: meta
  nats: {url: 'nats://nats:4222'}
  jwt: {secretRef: {name: jwt, key: hs256}, issuer: https://auth}
";

/// A release with everything optional set: limits, CORS origins, an autoscaler, resources,
/// an RS256 key, an audience and NATS credentials.
const FULL: &str = r"
apiVersion: vellum.dev/v1alpha1
kind: BlueGreenRelease
metadata: {name: docs}
spec:
  version: 2.1.0
  gateway:
    image: 'vellum/gateway:2.1.0'
    replicas: 2
    resources: {requests: {cpu: 250m, memory: 256Mi}, limits: {memory: 1Gi}}
    autoscaling: {minReplicas: 2, maxReplicas: 8, targetCpuUtilizationPercent: 70}
    limits: {headerTimeoutSeconds: 10, maxConnections: 2000, maxUploadBytes: 1073741824}
    corsAllowedOrigins: ['https://app.example.com', 'http://localhost:3000']
  workers: {image: 'vellum/workers:2.1.0', replicas: 2, resources: {requests: {cpu: 100m}}}
  shardSetRef: meta
  nats: {url: 'nats://nats:4222', credentialsSecretRef: {name: nats, key: creds}}
  jwt: {algorithm: RS256, secretRef: {name: jwt, key: public}, issuer: https://auth, audience: vellum}
";

fn facts() -> ReleaseFacts {
    ReleaseFacts { jwt_is_jwks: true, nats_credentials: true }
}

#[test]
fn a_plain_release_builds_these_objects() {
    let r = release(RELEASE);
    let plain = ReleaseFacts::default();
    assert_golden("release-gateway", &build_gateway_deployment(&r, Color::Blue, &plain));
    assert_golden("release-workers", &build_workers_deployment(&r, Color::Blue, &plain));
    assert_golden("release-service-active", &build_gateway_service(&r, &names::active_service("docs"), Color::Blue));
    assert_golden("release-service-preview", &build_gateway_service(&r, &names::preview_service("docs"), Color::Green));
    assert_golden("release-disruption-budget", &build_gateway_disruption_budget(&r, Color::Blue));
    assert_golden("release-service-account", &build_gateway_service_account(&r));
    assert_golden("release-role-binding", &build_gateway_role_binding(&r));
    assert_golden("release-migration", &build_migration_job(&r, "shard-a", "0123abcd"));
    let data =
        BTreeMap::from([("database-url".to_owned(), b"postgres://a".to_vec()), ("jwt-key".to_owned(), b"k".to_vec())]);
    assert_golden("release-secret", &build_secret(&r, &data));
    assert!(build_gateway_autoscaler(&r, Color::Blue).is_none(), "no autoscaling asked, no autoscaler");
}

#[test]
fn a_release_with_every_option_builds_these_objects() {
    let r = release(FULL);
    assert_golden("release-full-gateway", &build_gateway_deployment(&r, Color::Green, &facts()));
    assert_golden("release-full-workers", &build_workers_deployment(&r, Color::Green, &facts()));
    assert_golden("release-full-autoscaler", &build_gateway_autoscaler(&r, Color::Green).unwrap());
}

#[test]
fn the_config_map_carries_the_compiled_config_and_its_hash_and_no_secret() {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../manifests/examples");
    let (config, secrets) = vellum_core::config::read_platform(&dir, None).unwrap();
    let cm = build_config_map(&release(RELEASE), &config);
    let text = &cm.data.as_ref().unwrap()[CONFIG_FILE];
    let back: PlatformConfig = serde_json::from_str(text).unwrap();
    assert_eq!(back, config);
    let mut expected = ConfigMap {
        metadata: release_meta(&release(RELEASE), "docs-platform", "config", None),
        data: Some(BTreeMap::from([(CONFIG_FILE.to_owned(), text.clone())])),
        ..ConfigMap::default()
    };
    expected.metadata.annotations =
        Some(BTreeMap::from([(annotations::CONFIG_HASH.to_owned(), config.content_hash())]));
    assert_eq!(cm, expected);
    for value in secrets.0.values() {
        let value = value.expose_str().unwrap();
        assert!(!text.contains(value), "a secret value is in the ConfigMap");
    }
}

#[test]
fn pods_match_their_selector_which_never_names_the_version() {
    let r = release(RELEASE);
    for d in [
        build_gateway_deployment(&r, Color::Green, &ReleaseFacts::default()),
        build_workers_deployment(&r, Color::Green, &ReleaseFacts::default()),
    ] {
        let spec = d.spec.unwrap();
        let selector = spec.selector.match_labels.unwrap();
        assert!(!selector.contains_key(labels::VERSION), "the selector must not change with the version");
        let pod_labels = spec.template.metadata.unwrap().labels.unwrap();
        assert!(selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v)), "the pods match their selector");
        // $(POD_IP) expands only when defined before it is used.
        let env = spec.template.spec.unwrap().containers[0].env.clone().unwrap();
        let first_use = env.iter().position(|e| e.value.as_deref().is_some_and(|v| v.contains("$(POD_IP)")));
        assert!(first_use.is_some_and(|u| env.iter().position(|e| e.name == "POD_IP").is_some_and(|d| d < u)));
    }
}

#[test]
fn migration_jobs_are_per_shard_and_version_and_their_names_fit_in_a_label() {
    use crate::controllers::release::{migration_inputs, template_hash};
    let r = release(RELEASE);
    let facts = ReleaseFacts::default();
    let t1 = template_hash(&r, &facts);
    let a = build_migration_job(&r, "shard-a", &t1);
    assert_ne!(build_migration_job(&r, "shard-b", &t1).metadata.name, a.metadata.name);
    let mut next = r.clone();
    next.spec.version = "1.1.0".into();
    let t2 = template_hash(&next, &facts);
    assert_ne!(t2, t1, "a new version is new pod templates");
    assert_ne!(
        build_migration_job(&next, "shard-a", &t2).metadata.name,
        a.metadata.name,
        "a new version migrates again"
    );
    let mut image = r.clone();
    image.spec.workers.image = "vellum/workers:1.0.1".into();
    assert_ne!(template_hash(&image, &facts), t1, "so is a new image under the same version");
    let mut scaled = r.clone();
    scaled.spec.gateway.replicas = 7;
    assert_eq!(template_hash(&scaled, &facts), t1, "the replica count is not the pod template: it changes in place");
    // A fixed database URL is a new Job (a failed one never stands in the way); the name
    // says nothing about the URL without the platform's key.
    let wrong = migration_inputs(&t1, b"key", b"postgres://vellum:wrong@db/a");
    let fixed = migration_inputs(&t1, b"key", b"postgres://vellum:right@db/a");
    assert_ne!(wrong, fixed);
    assert_eq!(wrong, migration_inputs(&t1, b"key", b"postgres://vellum:wrong@db/a"), "stable while nothing changes");
    assert_ne!(wrong, migration_inputs(&t1, b"another key", b"postgres://vellum:wrong@db/a"));
    let long = names::migration(&"x".repeat(60), &"s".repeat(60), "1");
    assert!(long.len() <= 63, "{long}");
}
