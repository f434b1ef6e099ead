//! The exact requests a BlueGreenRelease reconcile makes, against a mocked API server.

use std::sync::{Arc, Mutex};

use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{Secret, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::RoleBinding;
use serde_json::{Value, json};
use vellum_crds::blue_green_release::{BlueGreenReleaseStatus, Phase};
use vellum_crds::common::Conditions;
use vellum_crds::conditions;
use vellum_crds::{ShardSet, StorageTier};

use super::*;
use crate::controllers::testkit::{Server, World, body_of, context, lines, path_of};

fn parse<K: serde::de::DeserializeOwned>(yaml: &str) -> K {
    serde_yaml::from_str(yaml).unwrap()
}

fn release() -> BlueGreenRelease {
    let mut r: BlueGreenRelease = parse(
        "apiVersion: vellum.dev/v1alpha1\nkind: BlueGreenRelease\nmetadata: {name: docs, namespace: ns, generation: 1}\nspec: {version: 1.0.0, gateway: {image: 'vellum/gateway:1.0.0'}, workers: {image: 'vellum/workers:1.0.0'}, shardSetRef: meta, nats: {url: 'nats://nats:4222'}, jwt: {secretRef: {name: jwt, key: hs256}}}\n",
    );
    r.metadata.uid = Some("r1".into());
    r
}

fn world(release: &BlueGreenRelease) -> World {
    World {
        tiers: vec![parse::<StorageTier>(
            "apiVersion: vellum.dev/v1alpha1\nkind: StorageTier\nmetadata: {name: hot, namespace: ns}\nspec: {class: HOT, default: true, backend: {url: 'memory://'}}\n",
        )],
        shard_sets: vec![parse::<ShardSet>(
            "apiVersion: vellum.dev/v1alpha1\nkind: ShardSet\nmetadata: {name: meta, namespace: ns}\nspec: {shards: [{name: a, urlSecretRef: {name: db, key: a}}]}\n",
        )],
        secrets: vec![
            parse::<Secret>("apiVersion: v1\nkind: Secret\nmetadata: {name: db, namespace: ns}\nstringData: {a: 'postgres://vellum:pw@db:5432/a'}\n"),
            parse::<Secret>(
                "apiVersion: v1\nkind: Secret\nmetadata: {name: jwt, namespace: ns}\nstringData: {hs256: 'a-signing-key-of-at-least-thirty-two-bytes'}\n",
            ),
        ]
        .into_iter()
        .map(|mut s| {
            // The API server turns stringData into data.
            s.data = s.string_data.take().map(|d| d.into_iter().map(|(k, v)| (k, k8s_openapi::ByteString(v.into_bytes()))).collect());
            s
        })
        .collect(),
        releases: vec![release.clone()],
        ..World::default()
    }
}

fn apply_line(path: &str) -> String {
    format!("PATCH {path}?&force=true&fieldManager=vellum.dev%2Fbluegreenrelease")
}

/// The link key of the platform Secret the tests' server holds.
const LINK_KEY: &[u8] = b"a-link-key-of-the-tests";

/// What names the migration Job of shard `a`.
fn inputs_of(release: &BlueGreenRelease) -> String {
    let template = template_hash(release, &ReleaseFacts::default());
    migration_inputs(&template, LINK_KEY, b"postgres://vellum:pw@db:5432/a")
}

fn migration_path(release: &BlueGreenRelease) -> String {
    path_of::<Job>("ns", &names::migration("docs", "a", &inputs_of(release)))
}

const STATUS: &str = "/apis/vellum.dev/v1alpha1/namespaces/ns/bluegreenreleases/docs/status";
const EVENT: &str = "POST /apis/events.k8s.io/v1/namespaces/ns/events?";

async fn reconciled(release: BlueGreenRelease, server: &Arc<Mutex<Server>>) -> Action {
    reconciled_in(release, server).await.0
}

/// A reconcile, and the metrics it recorded.
async fn reconciled_in(release: BlueGreenRelease, server: &Arc<Mutex<Server>>) -> (Action, String) {
    {
        let mut s = server.lock().unwrap();
        s.objects.insert(path_of::<BlueGreenRelease>("ns", "docs"), serde_json::to_value(&release).unwrap());
        let key = serde_json::to_value(k8s_openapi::ByteString(LINK_KEY.to_vec())).unwrap();
        s.objects.entry(path_of::<Secret>("ns", "docs-platform")).or_insert_with(|| json!({"data": {"link-key": key}}));
    }
    let ctx = context(&world(&release), Arc::clone(server));
    let action = Box::pin(reconcile(Arc::new(release), Arc::clone(&ctx))).await.unwrap();
    (action, ctx.metrics.encode())
}

fn status_of(server: &Arc<Mutex<Server>>) -> BlueGreenReleaseStatus {
    serde_json::from_value(body_of(server, &apply_line(STATUS))["status"].clone()).unwrap()
}

#[tokio::test]
async fn a_first_reconcile_publishes_the_config_and_starts_the_migrations_and_nothing_else() {
    let r = release();
    let server = Arc::new(Mutex::new(Server::default()));
    let action = Box::pin(reconciled(r.clone(), &server)).await;
    let config_map = path_of::<ConfigMap>("ns", "docs-platform");
    let secret = path_of::<Secret>("ns", "docs-platform");
    assert_eq!(
        lines(&server),
        [
            format!("GET {secret}"),
            format!("GET {config_map}"),
            apply_line(&config_map),
            apply_line(&secret),
            apply_line(&migration_path(&r)),
            apply_line(STATUS),
            EVENT.to_owned(),
        ]
    );
    let job = body_of(&server, &apply_line(&migration_path(&r)));
    assert_eq!(
        job,
        serde_json::to_value(build::build_migration_job(&r, "a", &inputs_of(&r))).unwrap(),
        "the built Job, whole"
    );
    let status = status_of(&server);
    assert_eq!(status.phase, Some(Phase::Migrating));
    assert_eq!(status.conditions.get(conditions::PROGRESSING).map(|c| c.status.as_str()), Some("True"));
    assert_eq!(body_of(&server, EVENT)["reason"], reasons::MIGRATING);
    assert_eq!(action, Action::requeue(std::time::Duration::from_secs(5)));
}

#[tokio::test]
async fn once_migrated_the_workloads_are_applied_in_order_and_a_ready_gateway_makes_it_stable() {
    let r = release();
    let server = Arc::new(Mutex::new(Server::default()));
    let gateway = path_of::<Deployment>("ns", "docs-gateway-blue");
    {
        let mut s = server.lock().unwrap();
        s.objects.insert(migration_path(&r), json!({"status": {"succeeded": 1}}));
        s.objects.insert(gateway.clone(), json!({"status": {"readyReplicas": 1, "updatedReplicas": 1}}));
    }
    let action = Box::pin(reconciled(r.clone(), &server)).await;
    let config_map = path_of::<ConfigMap>("ns", "docs-platform");
    let secret = path_of::<Secret>("ns", "docs-platform");
    let hpa = path_of::<HorizontalPodAutoscaler>("ns", "docs-gateway");
    let expected: Vec<String> = [
        format!("GET {secret}"),
        format!("GET {config_map}"),
        apply_line(&config_map),
        apply_line(&secret),
        apply_line(&migration_path(&r)),
        apply_line(&path_of::<ServiceAccount>("ns", "docs-gateway")),
        apply_line(&path_of::<RoleBinding>("ns", "docs-gateway")),
        apply_line(&gateway),
        apply_line(&path_of::<Deployment>("ns", "docs-workers-blue")),
        apply_line(&path_of::<Service>("ns", "docs")),
        apply_line(&path_of::<Service>("ns", "docs-preview")),
        apply_line(&path_of::<PodDisruptionBudget>("ns", "docs-gateway")),
        format!("DELETE {hpa}?"),
        apply_line(STATUS),
        EVENT.to_owned(),
    ]
    .into();
    assert_eq!(lines(&server), expected);
    let facts = ReleaseFacts::default();
    let built = serde_json::to_value(build::build_gateway_deployment(&r, Color::Blue, &facts)).unwrap();
    assert_eq!(body_of(&server, &apply_line(&gateway)), built, "the built Deployment, whole");
    let status = status_of(&server);
    assert_eq!(
        (status.phase, status.active_color, status.active_version.as_deref()),
        (Some(Phase::Stable), Some(Color::Blue), Some("1.0.0"))
    );
    let ready = status.conditions.get(conditions::READY).unwrap();
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("True", reasons::RECONCILED));
    assert_eq!(action, Action::requeue(std::time::Duration::from_secs(60)));
}

#[tokio::test]
async fn a_new_version_is_recorded_as_a_rollout_before_anything_acts_on_it() {
    let r = release();
    let server = Arc::new(Mutex::new(Server::default()));
    Box::pin(reconciled(r.clone(), &server)).await;
    let secret = path_of::<Secret>("ns", "docs-platform");
    let first_key = body_of(&server, &apply_line(&secret))["data"]["link-key"].clone();
    assert!(first_key.is_string());
    server.lock().unwrap().requests.clear();

    let mut next = r;
    next.spec.version = "1.1.0".into();
    next.status = Some(stable("1.0.0"));
    Box::pin(reconciled(next, &server)).await;
    let config_map = path_of::<ConfigMap>("ns", "docs-platform");
    assert_eq!(
        lines(&server),
        [
            format!("GET {secret}"),
            format!("GET {config_map}"),
            apply_line(&config_map),
            apply_line(&secret),
            apply_line(STATUS),
            EVENT.to_owned()
        ],
        "the rollout is in status before any workload is touched"
    );
    assert_eq!(body_of(&server, &apply_line(&secret))["data"]["link-key"], first_key, "links handed out keep working");
    let status = status_of(&server);
    assert_eq!(
        (status.phase, status.active_color, status.active_version.as_deref()),
        (Some(Phase::Deploying), Some(Color::Blue), Some("1.0.0"))
    );
    assert_eq!((status.preview_color, status.preview_version.as_deref()), (Some(Color::Green), Some("1.1.0")));
    let condition = |type_: &str| status.conditions.get(type_).map(|c| (c.status.clone(), c.reason.clone())).unwrap();
    assert_eq!(condition(conditions::READY), ("True".into(), reasons::RECONCILED.into()), "blue still serves");
    assert_eq!(condition(conditions::PROGRESSING), ("True".into(), reasons::DEPLOYING.into()));
    assert_eq!(condition(conditions::PROMOTED), ("False".into(), reasons::DEPLOYING.into()));
    assert_eq!(body_of(&server, EVENT)["reason"], reasons::DEPLOYING);
    assert_eq!(
        body_of(&server, EVENT)["action"],
        "Rollout 1.1.0",
        "the recorder folds Events of one action together: each rollout has its own"
    );
}

#[tokio::test]
async fn a_request_with_no_rollout_to_act_on_is_taken_back_and_not_kept_for_the_next() {
    let mut r = release();
    let mut status = stable("1.0.0");
    status.active_template = Some(template_hash(&r, &ReleaseFacts::default()));
    r.status = Some(status);
    r.metadata.annotations = Some([(vellum_crds::annotations::ABORT.to_owned(), "now".to_owned())].into());
    let server = Arc::new(Mutex::new(Server::default()));
    server.lock().unwrap().objects.insert(path_of::<Deployment>("ns", "docs-gateway-blue"), deployment_ready(2));
    Box::pin(reconciled(r, &server)).await;
    assert_eq!(status_of(&server).phase, Some(Phase::Stable));
    let release_path = path_of::<BlueGreenRelease>("ns", "docs");
    assert_eq!(
        body_of(&server, &format!("PATCH {release_path}?")),
        json!({"metadata": {"annotations": {"vellum.dev/abort": null}}})
    );
}

/// A release rolling out 1.1.0 as green beside 1.0.0 on blue, in `phase`.
fn rolling(phase: Phase) -> BlueGreenRelease {
    let mut r = release();
    r.spec.version = "1.1.0".into();
    let template = template_hash(&r, &ReleaseFacts::default());
    let mut status = stable("1.0.0");
    status.phase = Some(phase);
    status.preview_color = Some(Color::Green);
    status.preview_version = Some("1.1.0".into());
    status.preview_template = Some(template);
    status.phase_since =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()));
    status.rollout_since = status.phase_since.clone();
    r.status = Some(status);
    r
}

fn deployment_ready(replicas: i32) -> Value {
    json!({"metadata": {"generation": 1}, "status": {"observedGeneration": 1, "replicas": replicas, "updatedReplicas": replicas, "readyReplicas": replicas}})
}

#[tokio::test]
async fn deploying_applies_the_new_color_beside_the_old_and_points_only_the_preview_at_it() {
    let r = rolling(Phase::Deploying);
    let server = Arc::new(Mutex::new(Server::default()));
    {
        let mut s = server.lock().unwrap();
        s.objects.insert(path_of::<Deployment>("ns", "docs-gateway-green"), deployment_ready(2));
        s.objects.insert(path_of::<Deployment>("ns", "docs-workers-green"), deployment_ready(1));
    }
    Box::pin(reconciled(r.clone(), &server)).await;
    let seen = lines(&server);
    assert!(seen.contains(&apply_line(&path_of::<Deployment>("ns", "docs-gateway-green"))), "{seen:#?}");
    assert!(!seen.iter().any(|l| l.contains("-blue")), "the serving color is not touched: {seen:#?}");
    let active = body_of(&server, &apply_line(&path_of::<Service>("ns", "docs")));
    let preview = body_of(&server, &apply_line(&path_of::<Service>("ns", "docs-preview")));
    assert_eq!(active["spec"]["selector"][vellum_crds::labels::COLOR], "blue");
    assert_eq!(preview["spec"]["selector"][vellum_crds::labels::COLOR], "green");
    let status = status_of(&server);
    assert_eq!(status.phase, Some(Phase::Migrating), "both green Deployments are rolled out: next, the migrations");
}

#[tokio::test]
async fn an_autoscaled_preview_starts_at_the_autoscalers_floor_even_after_a_scale_to_zero() {
    let mut r = rolling(Phase::Deploying);
    r.spec.gateway.autoscaling = Some(serde_json::from_value(json!({"minReplicas": 3, "maxReplicas": 10})).unwrap());
    let server = Arc::new(Mutex::new(Server::default()));
    let green = path_of::<Deployment>("ns", "docs-gateway-green");
    server.lock().unwrap().objects.insert(green.clone(), json!({"spec": {"replicas": 0}}));
    Box::pin(reconciled(r, &server)).await;
    assert_eq!(body_of(&server, &apply_line(&green))["spec"]["replicas"], 3);
    let hpa = path_of::<HorizontalPodAutoscaler>("ns", "docs-gateway");
    assert!(!lines(&server).iter().any(|l| l.contains(&hpa)), "the autoscaler stays on blue until the promotion");
}

fn slice(addresses: &[&str]) -> Value {
    json!({"kind": "EndpointSliceList", "apiVersion": "discovery.k8s.io/v1", "metadata": {}, "items": [{
        "metadata": {"name": "docs-abc", "labels": {"kubernetes.io/service-name": "docs"}},
        "addressType": "IPv4",
        "endpoints": addresses.iter().map(|a| json!({"addresses": [a], "conditions": {"ready": true}})).collect::<Vec<_>>()
    }]})
}

fn pods(ips: &[&str]) -> Value {
    json!({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": ips.iter().enumerate().map(|(i, ip)| json!({
        "metadata": {"name": format!("docs-gateway-green-{i}")}, "status": {"podIP": ip}
    })).collect::<Vec<_>>()})
}

#[tokio::test]
async fn the_switch_is_done_only_when_the_active_endpoints_are_all_of_the_new_color() {
    let r = rolling(Phase::Switching);
    let server = Arc::new(Mutex::new(Server::default()));
    {
        let mut s = server.lock().unwrap();
        // Green's pods are .7 and .8; the Service still lists blue's .3 beside them.
        s.objects.insert("/api/v1/namespaces/ns/pods".into(), pods(&["10.88.0.7", "10.88.0.8"]));
        s.objects.insert(
            "/apis/discovery.k8s.io/v1/namespaces/ns/endpointslices".into(),
            slice(&["10.88.0.3", "10.88.0.7"]),
        );
    }
    Box::pin(reconciled(r.clone(), &server)).await;
    let active = body_of(&server, &apply_line(&path_of::<Service>("ns", "docs")));
    assert_eq!(active["spec"]["selector"][vellum_crds::labels::COLOR], "green", "the selector moved");
    let status = status_of(&server);
    assert_eq!(status.phase, Some(Phase::Switching), "one endpoint is still blue's");
    assert!(
        status
            .conditions
            .get(conditions::PROGRESSING)
            .unwrap()
            .message
            .contains("still lists 1 endpoints of the other color"),
        "{:?}",
        status.conditions
    );

    server
        .lock()
        .unwrap()
        .objects
        .insert("/apis/discovery.k8s.io/v1/namespaces/ns/endpointslices".into(), slice(&["10.88.0.7", "10.88.0.8"]));
    server.lock().unwrap().requests.clear();
    Box::pin(reconciled(r, &server)).await;
    let status = status_of(&server);
    assert_eq!(status.phase, Some(Phase::Analyzing));
    assert_eq!(status.active_color, Some(Color::Blue), "promoted only after the analysis");
    assert!(status.analysis_baseline.is_some());
}

#[tokio::test]
async fn a_passed_analysis_promotes_and_schedules_the_old_color_down() {
    let mut r = rolling(Phase::Analyzing);
    r.spec.analysis.window_seconds = 0;
    r.spec.promotion.scale_down_delay_seconds = 30;
    let server = Arc::new(Mutex::new(Server::default()));
    server.lock().unwrap().objects.insert("/api/v1/namespaces/ns/pods".into(), pods(&[]));
    let (_, metrics) = Box::pin(reconciled_in(r, &server)).await;
    assert!(metrics.contains("vellum_operator_rollout_duration_seconds_count{outcome=\"Promoted\"} 1"), "{metrics}");
    assert!(
        metrics.contains("vellum_operator_rollout_phase_duration_seconds_count{phase=\"Analyzing\"} 1"),
        "{metrics}"
    );
    let status = status_of(&server);
    assert_eq!(
        (status.phase, status.active_color, status.active_version.as_deref(), status.preview_color),
        (Some(Phase::Stable), Some(Color::Green), Some("1.1.0"), None)
    );
    assert_eq!(status.scale_down_color, Some(Color::Blue));
    assert!(status.scale_down_at.is_some());
    assert_eq!(status.history[0].outcome, vellum_crds::blue_green_release::ReleaseOutcome::Promoted);
    assert_eq!(status.conditions.get(conditions::PROMOTED).unwrap().status, "True");
    assert!(
        !lines(&server).iter().any(|l| l.starts_with("PATCH") && l.contains("docs-gateway-blue")),
        "blue keeps running for a fast rollback"
    );
}

#[tokio::test]
async fn a_newer_version_mid_rollout_replaces_the_preview_and_starts_again_with_traffic_on_the_old_color() {
    let mut r = rolling(Phase::Analyzing);
    r.spec.version = "1.2.0".into();
    let server = Arc::new(Mutex::new(Server::default()));
    Box::pin(reconciled(r.clone(), &server)).await;
    let status = status_of(&server);
    assert_eq!(
        (status.phase, status.preview_color, status.preview_version.as_deref()),
        (Some(Phase::Deploying), Some(Color::Green), Some("1.2.0"))
    );
    assert_eq!(status.preview_template, Some(template_hash(&r, &ReleaseFacts::default())));
    assert!(status.history.iter().all(|h| h.version != "1.1.0"), "replaced, not ended: {:?}", status.history);

    // Acting for Deploying puts the active Service back on blue before green is replaced.
    let mut next = r;
    next.status = Some(status);
    server.lock().unwrap().requests.clear();
    Box::pin(reconciled(next, &server)).await;
    let active = body_of(&server, &apply_line(&path_of::<Service>("ns", "docs")));
    assert_eq!(active["spec"]["selector"][vellum_crds::labels::COLOR], "blue");
}

#[tokio::test]
async fn a_phase_past_its_deadline_fails_the_rollout_and_leaves_the_old_color_serving() {
    let mut r = rolling(Phase::Migrating);
    r.spec.promotion.progress_deadline_seconds = 60;
    let long_ago = k8s_openapi::jiff::Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_secs(61);
    r.status.as_mut().unwrap().phase_since = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(long_ago));
    let server = Arc::new(Mutex::new(Server::default()));
    Box::pin(reconciled(r, &server)).await;
    let status = status_of(&server);
    assert_eq!(
        (status.phase, status.active_color, status.preview_color),
        (Some(Phase::Failed), Some(Color::Blue), None)
    );
    let last = &status.history[0];
    assert_eq!(
        (last.version.as_str(), last.outcome),
        ("1.1.0", vellum_crds::blue_green_release::ReleaseOutcome::Failed)
    );
    assert!(last.message.as_deref().unwrap_or_default().contains("progressDeadlineSeconds (60 s)"), "{last:?}");
    let ready = status.conditions.get(conditions::READY).unwrap();
    assert_eq!(ready.status, "True", "blue still serves");
    let degraded = status.conditions.get(conditions::DEGRADED).unwrap();
    assert_eq!((degraded.status.as_str(), degraded.reason.as_str()), ("True", reasons::PROGRESS_DEADLINE_EXCEEDED));
    assert_eq!(body_of(&server, EVENT)["type"], "Warning");
}

#[tokio::test]
async fn a_manual_release_waits_for_the_promote_annotation_then_records_the_switch_first() {
    let mut r = rolling(Phase::AwaitingPromotion);
    r.spec.promotion.mode = vellum_crds::blue_green_release::PromotionMode::Manual;
    let server = Arc::new(Mutex::new(Server::default()));
    Box::pin(reconciled(r.clone(), &server)).await;
    assert_eq!(status_of(&server).phase, Some(Phase::AwaitingPromotion), "nothing moves without the annotation");
    let active = body_of(&server, &apply_line(&path_of::<Service>("ns", "docs")));
    assert_eq!(active["spec"]["selector"][vellum_crds::labels::COLOR], "blue");

    r.metadata.annotations = Some([(vellum_crds::annotations::PROMOTE.to_owned(), "true".to_owned())].into());
    server.lock().unwrap().requests.clear();
    Box::pin(reconciled(r, &server)).await;
    let status = status_of(&server);
    assert_eq!(status.phase, Some(Phase::Switching));
    let active = body_of(&server, &apply_line(&path_of::<Service>("ns", "docs")));
    assert_eq!(
        active["spec"]["selector"][vellum_crds::labels::COLOR],
        "blue",
        "the switch is recorded in status before the next reconcile acts on it"
    );
    let release_path = path_of::<BlueGreenRelease>("ns", "docs");
    assert_eq!(
        body_of(&server, &format!("PATCH {release_path}?")),
        json!({"metadata": {"annotations": {"vellum.dev/promote": null}}})
    );
}

#[tokio::test]
async fn an_abort_before_the_switch_scales_the_new_color_down_and_records_it() {
    let mut r = rolling(Phase::SmokeTesting);
    r.metadata.annotations = Some([(vellum_crds::annotations::ABORT.to_owned(), "true".to_owned())].into());
    let server = Arc::new(Mutex::new(Server::default()));
    let green = path_of::<Deployment>("ns", "docs-gateway-green");
    server.lock().unwrap().objects.insert(green.clone(), deployment_ready(2));
    Box::pin(reconciled(r, &server)).await;
    let seen = lines(&server);
    assert!(seen.contains(&format!("PATCH {green}?&fieldManager=vellum.dev%2Fbluegreenrelease")), "{seen:#?}");
    assert_eq!(
        body_of(&server, &format!("PATCH {green}?&fieldManager=vellum.dev%2Fbluegreenrelease")),
        json!({"spec": {"replicas": 0}})
    );
    assert_eq!(
        server.lock().unwrap().objects[&green]["spec"]["replicas"],
        0,
        "scaled to zero, kept for the next rollout"
    );
    let status = status_of(&server);
    assert_eq!(
        (status.phase, status.active_color, status.preview_color),
        (Some(Phase::Aborted), Some(Color::Blue), None)
    );
    assert_eq!(status.history[0].outcome, vellum_crds::blue_green_release::ReleaseOutcome::Aborted);
    let release_path = path_of::<BlueGreenRelease>("ns", "docs");
    assert_eq!(
        body_of(&server, &format!("PATCH {release_path}?")),
        json!({"metadata": {"annotations": {"vellum.dev/abort": null}}}),
        "the request is taken back once recorded"
    );
}

#[tokio::test]
async fn an_abort_in_any_phase_ends_with_the_old_color_serving_and_the_new_one_scaled_down() {
    for phase in [
        Phase::Deploying,
        Phase::Migrating,
        Phase::SmokeTesting,
        Phase::AwaitingPromotion,
        Phase::Switching,
        Phase::Analyzing,
    ] {
        let mut r = rolling(phase);
        r.metadata.annotations = Some([(vellum_crds::annotations::ABORT.to_owned(), "true".to_owned())].into());
        let server = Arc::new(Mutex::new(Server::default()));
        let green = path_of::<Deployment>("ns", "docs-gateway-green");
        {
            let mut s = server.lock().unwrap();
            s.objects.insert(green.clone(), deployment_ready(2));
            // Blue's pod is the only endpoint once traffic is back.
            s.objects.insert("/api/v1/namespaces/ns/pods".into(), pods(&["10.88.0.3"]));
            s.objects.insert("/apis/discovery.k8s.io/v1/namespaces/ns/endpointslices".into(), slice(&["10.88.0.3"]));
        }
        let mut phases = Vec::new();
        for _ in 0..3 {
            server.lock().unwrap().requests.clear();
            Box::pin(reconciled(r.clone(), &server)).await;
            let status = status_of(&server);
            phases.push(status.phase.unwrap_or_default());
            r.status = Some(status);
            if phases.last() == Some(&Phase::Aborted) {
                break;
            }
        }
        let after_switch = matches!(phase, Phase::Switching | Phase::Analyzing);
        let expected: &[Phase] = if after_switch { &[Phase::RollingBack, Phase::Aborted] } else { &[Phase::Aborted] };
        assert_eq!(phases, expected, "aborted in {phase:?}: traffic goes back first once it may reach green");
        let status = r.status.clone().unwrap();
        assert_eq!(
            (status.active_color, status.active_version.as_deref(), status.preview_color),
            (Some(Color::Blue), Some("1.0.0"), None),
            "aborted in {phase:?}"
        );
        assert_eq!(status.history[0].outcome, vellum_crds::blue_green_release::ReleaseOutcome::Aborted);
        let active = body_of(&server, &apply_line(&path_of::<Service>("ns", "docs")));
        assert_eq!(active["spec"]["selector"][vellum_crds::labels::COLOR], "blue", "aborted in {phase:?}");
        assert_eq!(server.lock().unwrap().objects[&green]["spec"]["replicas"], 0, "aborted in {phase:?}");
    }
}

#[tokio::test]
async fn without_auto_rollback_a_failed_analysis_keeps_serving_until_a_person_decides() {
    // Green's one gateway, as its /metrics reads: half of its API answers since the switch
    // are 500. It listens on the gateway port of a loopback address of its own.
    let listener = tokio::net::TcpListener::bind(("127.0.0.79", 8080u16)).await.unwrap();
    let metrics = axum::Router::new().route(
        "/metrics",
        axum::routing::get(|| async {
            "vellum_gateway_http_requests_total{method=\"GET\",route=\"/api/v1/documents\",status=\"200\"} 10\n\
             vellum_gateway_http_requests_total{method=\"GET\",route=\"/api/v1/documents\",status=\"500\"} 10\n"
        }),
    );
    tokio::spawn(async move { axum::serve(listener, metrics).await });
    let mut r = rolling(Phase::Analyzing);
    r.spec.promotion.auto_rollback = false;
    r.spec.analysis.window_seconds = 0;
    r.status.as_mut().unwrap().analysis_baseline =
        Some(vellum_crds::blue_green_release::RequestCounts { requests: 0, errors: 0 });
    let server = Arc::new(Mutex::new(Server::default()));
    server.lock().unwrap().objects.insert("/api/v1/namespaces/ns/pods".into(), pods(&["127.0.0.79"]));

    Box::pin(reconciled(r.clone(), &server)).await;
    let status = status_of(&server);
    let progressing = status.conditions.get(conditions::PROGRESSING).unwrap().clone();
    assert_eq!(
        (status.phase, status.active_color, status.observed_error_rate_percent),
        (Some(Phase::Analyzing), Some(Color::Blue), Some(50.0)),
        "{progressing:?}"
    );
    assert_eq!(progressing.reason, reasons::ANALYSIS_FAILED);
    assert!(
        progressing.message.contains("vellum.dev/promote keeps it, vellum.dev/abort rolls back"),
        "{progressing:?}"
    );
    assert_eq!(body_of(&server, EVENT)["type"], "Warning");
    let active = body_of(&server, &apply_line(&path_of::<Service>("ns", "docs")));
    assert_eq!(active["spec"]["selector"][vellum_crds::labels::COLOR], "green", "green keeps the traffic");

    // The window is over and no error came since, yet a failed analysis never promotes by
    // itself.
    let mut status = status;
    status.analysis_baseline = Some(vellum_crds::blue_green_release::RequestCounts { requests: 20, errors: 10 });
    r.status = Some(status);
    server.lock().unwrap().requests.clear();
    Box::pin(reconciled(r.clone(), &server)).await;
    let status = status_of(&server);
    assert_eq!(
        (status.phase, status.active_color, status.observed_error_rate_percent),
        (Some(Phase::Analyzing), Some(Color::Blue), Some(0.0))
    );

    // A person keeps it.
    r.status = Some(status);
    r.metadata.annotations = Some([(vellum_crds::annotations::PROMOTE.to_owned(), "true".to_owned())].into());
    server.lock().unwrap().requests.clear();
    Box::pin(reconciled(r, &server)).await;
    let status = status_of(&server);
    assert_eq!(
        (status.phase, status.active_color, status.active_version.as_deref()),
        (Some(Phase::Stable), Some(Color::Green), Some("1.1.0"))
    );
    assert_eq!(status.history[0].outcome, vellum_crds::blue_green_release::ReleaseOutcome::Promoted);
    assert!(status.history[0].message.as_deref().unwrap_or_default().contains("by request despite its analysis"));
}

/// A reconcile of a migrated release whose gateway Deployment has no ready replica, with
/// `pods` listed under the gateway's selector.
async fn with_unready_gateway(pods: Value) -> (Arc<Mutex<Server>>, BlueGreenReleaseStatus) {
    let r = release();
    let server = Arc::new(Mutex::new(Server::default()));
    {
        let mut s = server.lock().unwrap();
        s.objects.insert(migration_path(&r), json!({"status": {"succeeded": 1}}));
        s.objects.insert(
            path_of::<Deployment>("ns", "docs-gateway-blue"),
            json!({"status": {"readyReplicas": 0, "updatedReplicas": 1}}),
        );
        s.objects.insert(
            "/api/v1/namespaces/ns/pods".into(),
            json!({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": pods}),
        );
    }
    Box::pin(reconciled(r, &server)).await;
    let status = status_of(&server);
    (server, status)
}

#[tokio::test]
async fn gateways_that_do_not_become_ready_are_explained_by_their_pods() {
    let crashing = json!([{
        "metadata": {"name": "docs-gateway-blue-1", "creationTimestamp": "2026-01-01T00:00:00Z"},
        "status": {"phase": "Running", "containerStatuses": [{
            "name": "gateway", "ready": false, "restartCount": 4, "image": "vellum/gateway:1.0.0", "imageID": "",
            "state": {"waiting": {"reason": "CrashLoopBackOff"}},
            "lastState": {"terminated": {"exitCode": 1, "message": "Error: the metadata store: password authentication failed"}}
        }]}
    }]);
    let (server, status) = with_unready_gateway(crashing).await;
    let selector =
        "app.kubernetes.io%2Fcomponent%3Dgateway%2Capp.kubernetes.io%2Finstance%3Ddocs%2Cvellum.dev%2Fcolor%3Dblue";
    assert!(
        lines(&server).contains(&format!("GET /api/v1/namespaces/ns/pods?&labelSelector={selector}")),
        "the gateway's own pods, by its selector: {:#?}",
        lines(&server)
    );
    assert_eq!(status.phase, Some(Phase::Deploying));
    let ready = status.conditions.get(conditions::READY).unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str(), ready.message.as_str()),
        (
            "False",
            reasons::GATEWAYS_NOT_READY,
            "waiting for gateways of version 1.0.0 (0/2 ready): pod docs-gateway-blue-1: container gateway is waiting: \
             CrashLoopBackOff; it last exited with code 1: Error: the metadata store: password authentication failed"
        )
    );
    let event = body_of(&server, EVENT);
    assert_eq!(
        (event["reason"].as_str(), event["type"].as_str()),
        (Some(reasons::GATEWAYS_NOT_READY), Some("Warning"))
    );
}

#[tokio::test]
async fn a_running_gateway_that_is_not_ready_is_explained_by_its_readiness_check() {
    // The gateway's /readyz, as a pod would serve it, on a port of this machine.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let readyz = axum::Router::new().route(
        "/readyz",
        axum::routing::get(|| async {
            let body = json!({"status": "not ready", "checks": {"database": {"status": "ok"},
                "defaultTier": {"status": "failing", "message": "storage tier hot: bucket docs does not exist"}}});
            (axum::http::StatusCode::SERVICE_UNAVAILABLE, axum::Json(body))
        }),
    );
    tokio::spawn(async move { axum::serve(listener, readyz).await });
    let running = json!([{
        "metadata": {"name": "docs-gateway-blue-2", "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"containers": [{"name": "gateway", "ports": [{"name": "http", "containerPort": port}],
            "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}}}]},
        "status": {"phase": "Running", "podIP": "127.0.0.1", "conditions": [{"type": "Ready", "status": "False"}],
            "containerStatuses": [{"name": "gateway", "ready": false, "restartCount": 0, "image": "g", "imageID": "",
                "state": {"running": {}}}]}
    }]);
    let (_, status) = with_unready_gateway(running).await;
    let ready = status.conditions.get(conditions::READY).unwrap();
    assert_eq!(ready.reason, reasons::GATEWAYS_NOT_READY);
    assert!(
        ready.message.ends_with(
            "pod docs-gateway-blue-2 is not ready: the default StorageTier failing: storage tier hot: bucket docs does \
             not exist"
        ),
        "{}",
        ready.message
    );
}

/// The status of a release serving `version` as blue.
fn stable(version: &str) -> BlueGreenReleaseStatus {
    let ready = crate::context::condition(
        &Conditions::default(),
        conditions::READY,
        true,
        reasons::RECONCILED,
        "serving",
        Some(1),
    );
    BlueGreenReleaseStatus {
        phase: Some(Phase::Stable),
        active_color: Some(Color::Blue),
        active_version: Some(version.to_owned()),
        conditions: Conditions(vec![ready]),
        observed_generation: Some(1),
        ..BlueGreenReleaseStatus::default()
    }
}
