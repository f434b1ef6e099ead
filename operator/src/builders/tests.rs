use super::*;
use vellum_crds::blue_green_release::Color;

fn release(yaml: &str) -> BlueGreenRelease {
    let mut release: BlueGreenRelease = serde_yaml::from_str(yaml).unwrap();
    release.metadata.uid = Some("uid-1".into());
    release.metadata.namespace = Some("docs-ns".into());
    release
}

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

fn env_of(deployment: &Deployment) -> Vec<(String, String)> {
    let container = &deployment.spec.as_ref().unwrap().template.spec.as_ref().unwrap().containers[0];
    container
        .env
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|e| {
            let from = e.value_from.and_then(|f| f.secret_key_ref).map(|r| format!("secret:{}/{}", r.name, r.key));
            (e.name, e.value.or(from).unwrap_or_default())
        })
        .collect()
}

#[test]
fn the_gateway_deployment_runs_serve_with_the_platform_mounted_and_owned_by_the_release() {
    let r = release(RELEASE);
    let d = gateway_deployment(&r, Color::Blue, &ReleaseFacts::default());
    assert_eq!(d.metadata.name.as_deref(), Some("docs-gateway-blue"));
    assert_eq!(d.metadata.namespace.as_deref(), Some("docs-ns"));
    let owner = &d.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!((owner.kind.as_str(), owner.uid.as_str(), owner.controller), ("BlueGreenRelease", "uid-1", Some(true)));
    let spec = d.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(3));
    let selector = spec.selector.match_labels.as_ref().unwrap();
    assert_eq!(selector[labels::COLOR], "blue");
    assert!(!selector.contains_key(labels::VERSION), "the selector must not change with the version");
    let pod_labels = spec.template.metadata.as_ref().unwrap().labels.as_ref().unwrap();
    assert!(selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v)), "the pods match their selector");
    assert_eq!(pod_labels[labels::VERSION], "1.0.0");
    let env = env_of(&d);
    let get = |name: &str| env.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone());
    assert_eq!(get("VELLUM_JWT_SECRET_FILE").as_deref(), Some("/etc/vellum/secrets/jwt-key"));
    assert_eq!(get("VELLUM_JWT_SECRET"), None, "an environment variable would need a restart to change");
    assert_eq!(get("VELLUM_DATABASE_URL").as_deref(), Some("secret:docs-platform/database-url"));
    assert_eq!(get("VELLUM_CONFIG_DIR").as_deref(), Some(CONFIG_MOUNT));
    assert_eq!(get("VELLUM_JWT_ISSUER").as_deref(), Some("https://auth"));
    assert_eq!(get("VELLUM_LISTEN").as_deref(), Some("$(POD_IP):8080"));
    let pod_ip = env.iter().position(|(n, _)| n == "POD_IP").unwrap();
    let listen = env.iter().position(|(n, _)| n == "VELLUM_LISTEN").unwrap();
    assert!(pod_ip < listen, "$(POD_IP) expands only when defined before");
    let container = &spec.template.spec.as_ref().unwrap().containers[0];
    assert_eq!(container.args.as_deref(), Some(&["serve".to_owned()][..]));
    assert!(container.resources.is_none());
}

#[test]
fn the_gateway_limits_reach_the_container_as_its_settings_and_unset_ones_keep_the_defaults() {
    let yaml = RELEASE.replace(
        "replicas: 3}",
        "replicas: 3, limits: {headerTimeoutSeconds: 10, maxConnections: 2000, maxUploadBytes: 1073741824}}",
    );
    let d = gateway_deployment(&release(&yaml), Color::Blue, &ReleaseFacts::default());
    let limits: Vec<(String, String)> = env_of(&d)
        .into_iter()
        .filter(|(n, _)| ["TIMEOUT", "MAX_", "AUTH_FAILURES"].iter().any(|part| n.contains(part)))
        .collect();
    let expected = [
        ("VELLUM_HEADER_TIMEOUT_SECONDS", "10"),
        ("VELLUM_MAX_CONNECTIONS", "2000"),
        ("VELLUM_MAX_UPLOAD_BYTES", "1073741824"),
    ];
    assert_eq!(limits, expected.map(|(n, v)| (n.to_owned(), v.to_owned())).to_vec());
    let plain = gateway_deployment(&release(RELEASE), Color::Blue, &ReleaseFacts::default());
    assert!(!env_of(&plain).iter().any(|(n, _)| n.contains("TIMEOUT") || n.contains("MAX_")));
}

#[test]
fn autoscaling_leaves_the_replica_count_to_the_autoscaler() {
    let yaml = RELEASE.replace("replicas: 3}", "replicas: 3, autoscaling: {minReplicas: 2, maxReplicas: 5}}");
    let r = release(&yaml);
    let d = gateway_deployment(&r, Color::Green, &ReleaseFacts::default());
    assert_eq!(d.spec.as_ref().unwrap().replicas, None);
    let hpa = gateway_autoscaler(&r, Color::Green).unwrap();
    let spec = hpa.spec.unwrap();
    assert_eq!(spec.scale_target_ref.name, "docs-gateway-green");
    assert_eq!((spec.min_replicas, spec.max_replicas), (Some(2), 5));
    assert!(gateway_autoscaler(&release(RELEASE), Color::Blue).is_none());
}

#[test]
fn public_keys_and_jwks_are_read_from_the_mounted_secret() {
    let yaml = RELEASE.replace("jwt: {", "jwt: {algorithm: RS256, ");
    let r = release(&yaml);
    let pem = env_of(&gateway_deployment(&r, Color::Blue, &ReleaseFacts::default()));
    assert!(pem.contains(&("VELLUM_JWT_PUBLIC_KEY".into(), format!("{SECRETS_MOUNT}/jwt-key"))));
    let facts = ReleaseFacts { jwt_is_jwks: true, ..ReleaseFacts::default() };
    let jwks = env_of(&gateway_deployment(&r, Color::Blue, &facts));
    assert!(jwks.contains(&("VELLUM_JWT_JWKS".into(), format!("{SECRETS_MOUNT}/jwt-key"))));
    assert!(!jwks.iter().any(|(n, _)| n == "VELLUM_JWT_SECRET"));
}

#[test]
fn services_select_one_color_each() {
    let r = release(RELEASE);
    let active = gateway_service(&r, &names::active_service("docs"), Color::Blue);
    let preview = gateway_service(&r, &names::preview_service("docs"), Color::Green);
    assert_eq!(active.metadata.name.as_deref(), Some("docs"));
    assert_eq!(preview.metadata.name.as_deref(), Some("docs-preview"));
    assert_eq!(active.spec.as_ref().unwrap().selector.as_ref().unwrap()[labels::COLOR], "blue");
    assert_eq!(preview.spec.as_ref().unwrap().selector.as_ref().unwrap()[labels::COLOR], "green");
}

#[test]
fn migration_jobs_are_per_shard_and_version_and_fit_in_a_label() {
    let r = release(RELEASE);
    let a = migration_job(&r, "shard-a");
    let b = migration_job(&r, "shard-b");
    assert_ne!(a.metadata.name, b.metadata.name);
    let mut next = r.clone();
    next.spec.version = "1.1.0".into();
    assert_ne!(migration_job(&next, "shard-a").metadata.name, a.metadata.name, "a new version migrates again");
    let long = names::migration(&"x".repeat(60), &"s".repeat(60), "1");
    assert!(long.len() <= 63, "{long}");
    let container = &a.spec.unwrap().template.spec.unwrap().containers[0];
    assert_eq!(container.args.as_deref(), Some(&["migrate".to_owned()][..]));
    let env = container.env.as_ref().unwrap();
    assert_eq!(env[0].value_from.as_ref().unwrap().secret_key_ref.as_ref().unwrap().key, "shard-shard-a");
}

#[test]
fn the_config_map_carries_the_compiled_config_and_its_hash() {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../manifests/examples");
    let (config, secrets) = vellum_core::config::read_platform(&dir, None).unwrap();
    let cm = platform_config_map(&release(RELEASE), &config);
    let text = &cm.data.as_ref().unwrap()[CONFIG_FILE];
    let back: PlatformConfig = serde_json::from_str(text).unwrap();
    assert_eq!(back, config);
    assert_eq!(cm.metadata.annotations.unwrap()[annotations::CONFIG_HASH], config.content_hash());
    for value in secrets.0.values() {
        let value = value.expose_str().unwrap();
        assert!(!text.contains(value), "a secret value is in the ConfigMap");
    }
}

#[test]
fn retention_cron_jobs_run_the_policy_with_the_release_workers() {
    let policy: RetentionPolicy = serde_yaml::from_str(
        "apiVersion: vellum.dev/v1alpha1\nkind: RetentionPolicy\nmetadata: {name: tmp, namespace: docs-ns, uid: p1}\nspec: {schedule: '@daily', suspend: true, expiration: {afterDays: 3, action: DELETE}}\n",
    )
    .unwrap();
    let job = retention_cron_job(&policy, &release(RELEASE), &ReleaseFacts::default());
    assert_eq!(job.metadata.name.as_deref(), Some("tmp-retention"));
    assert_eq!(job.metadata.owner_references.as_ref().unwrap()[0].uid, "p1");
    let spec = job.spec.unwrap();
    assert_eq!((spec.schedule.as_str(), spec.suspend), ("@daily", Some(true)));
    let pod = spec.job_template.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.containers[0].image.as_deref(), Some("vellum/workers:1.0.0"));
    assert_eq!(pod.containers[0].args.as_deref().unwrap(), ["retention", "--policy", "tmp"]);
}

#[test]
fn the_gateway_runs_under_its_own_account_bound_to_the_gateway_role_in_its_namespace() {
    let r = release(RELEASE);
    let account = gateway_service_account(&r);
    assert_eq!(account.metadata.name.as_deref(), Some("docs-gateway"));
    assert_eq!(account.metadata.namespace.as_deref(), Some("docs-ns"));
    let binding = gateway_role_binding(&r);
    assert_eq!(binding.metadata.namespace.as_deref(), Some("docs-ns"), "a RoleBinding: this namespace only");
    assert_eq!((binding.role_ref.kind.as_str(), binding.role_ref.name.as_str()), ("ClusterRole", "vellum-gateway"));
    let subject = &binding.subjects.as_ref().unwrap()[0];
    assert_eq!(
        (subject.kind.as_str(), subject.name.as_str(), subject.namespace.as_deref()),
        ("ServiceAccount", "docs-gateway", Some("docs-ns"))
    );
    assert!(binding.metadata.owner_references.as_ref().is_some_and(|o| o[0].uid == "uid-1"));

    let gateway = gateway_deployment(&r, Color::Blue, &ReleaseFacts::default());
    let pod = gateway.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.service_account_name.as_deref(), Some("docs-gateway"));
    let env = pod.containers[0].env.clone().unwrap();
    let ns = env.iter().find(|e| e.name == "VELLUM_KUBE_NAMESPACE").unwrap();
    assert_eq!(ns.value_from.as_ref().unwrap().field_ref.as_ref().unwrap().field_path, "metadata.namespace");
    let workers = workers_deployment(&r, Color::Blue, &ReleaseFacts::default()).spec.unwrap().template.spec.unwrap();
    assert_eq!(workers.automount_service_account_token, Some(false), "the workers hold no API credentials");
    // Probed on the address they report metrics at.
    let container = &workers.containers[0];
    let env: Vec<(String, Option<String>)> =
        container.env.clone().unwrap_or_default().into_iter().map(|e| (e.name, e.value)).collect();
    let listen = env.iter().position(|(n, _)| n == "VELLUM_METRICS_LISTEN").expect("VELLUM_METRICS_LISTEN");
    assert_eq!(env[listen].1.as_deref(), Some("$(POD_IP):9090"));
    assert!(env.iter().position(|(n, _)| n == "POD_IP").is_some_and(|p| p < listen), "$(POD_IP) defined first");
    let ports = container.ports.clone().unwrap_or_default();
    assert_eq!((ports[0].name.as_deref(), ports[0].container_port), (Some("metrics"), 9090));
    let probe = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        p.as_ref()
            .and_then(|p| p.http_get.as_ref())
            .map(|h| (h.path.clone().unwrap_or_default(), format!("{:?}", h.port)))
    };
    assert_eq!(probe(&container.readiness_probe).map(|p| p.0), Some("/readyz".to_owned()));
    assert_eq!(probe(&container.liveness_probe).map(|p| p.0), Some("/healthz".to_owned()));
}
