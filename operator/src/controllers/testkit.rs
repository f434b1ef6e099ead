//! A mocked API server for controller tests (the `tower-test` pattern of kube-rs'
//! controller-rs): a reconcile runs against a [`Client`] whose every request is recorded
//! and answered as a real API server would for the objects the test gave it, so that a test
//! asserts the exact requests a reconcile makes, field managers included.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use http::{Method, Request, Response};
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::client::Body;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher;
use serde_json::{Value, json};
use vellum_crds::{BlueGreenRelease, RetentionPolicy, ShardSet, StorageTier, Webhook};

use crate::context::{Caches, Context};
use crate::metrics::Metrics;

/// One request the reconcile made: `"METHOD path?query"`, and its JSON body.
#[derive(Clone, Debug)]
pub struct Seen {
    pub line: String,
    pub body: Value,
}

/// What the mocked server holds and answers from, by request path without its query.
#[derive(Default)]
pub struct Server {
    /// Objects a GET finds (anything else is 404); a server-side apply stores its body here.
    pub objects: BTreeMap<String, Value>,
    /// Every request, in order.
    pub requests: Vec<Seen>,
}

/// A store holding `objects`, as a reflector would after listing them.
fn store<K>(objects: &[K]) -> Store<K>
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    let (reader, mut writer) = reflector::store();
    writer.apply_watcher_event(&watcher::Event::Init);
    for o in objects {
        writer.apply_watcher_event(&watcher::Event::InitApply(o.clone()));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
    reader
}

/// What the caches of a test context hold.
#[derive(Default)]
pub struct World {
    pub tiers: Vec<StorageTier>,
    pub webhooks: Vec<Webhook>,
    pub policies: Vec<RetentionPolicy>,
    pub shard_sets: Vec<ShardSet>,
    pub releases: Vec<BlueGreenRelease>,
    pub secrets: Vec<Secret>,
}

/// A context whose client talks to the mocked server, with caches holding `world`.
pub fn context(world: &World, server: Arc<Mutex<Server>>) -> Arc<Context> {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    tokio::spawn(answer(handle, server));
    let client = Client::new(service, "default");
    let caches = Caches {
        tiers: store(&world.tiers),
        webhooks: store(&world.webhooks),
        policies: store(&world.policies),
        shard_sets: store(&world.shard_sets),
        releases: store(&world.releases),
        secrets: store(&world.secrets),
    };
    let reporter = Reporter { controller: "vellum-operator".into(), instance: Some("test".into()) };
    Arc::new(Context::new(client.clone(), caches, Recorder::new(client, reporter), Arc::new(Metrics::new())))
}

fn not_found(path: &str) -> (u16, Value) {
    let message = format!("{path} not found");
    (
        404,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": message}),
    )
}

/// Answers like an API server: GET from `objects`, server-side apply stores and returns the
/// object (a status write returns the stored object with the new status), DELETE of a
/// missing object is 404, an Event POST is echoed.
async fn answer(mut handle: tower_test::mock::Handle<Request<Body>, Response<Body>>, server: Arc<Mutex<Server>>) {
    while let Some((request, send)) = handle.next_request().await {
        let method = request.method().clone();
        let uri = request.uri().clone();
        let merge =
            request.headers().get(http::header::CONTENT_TYPE).is_some_and(|v| v == "application/merge-patch+json");
        let bytes = request.into_body().collect_bytes().await.unwrap_or_default();
        let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        let path = uri.path().to_owned();
        let line = format!("{method} {}", uri.path_and_query().map(ToString::to_string).unwrap_or_default());
        let (code, reply) = {
            let mut server = server.lock().unwrap();
            server.requests.push(Seen { line, body: body.clone() });
            match method {
                Method::GET => server.objects.get(&path).cloned().map_or_else(|| not_found(&path), |o| (200, o)),
                Method::PATCH if path.ends_with("/status") => {
                    let object_path = path.trim_end_matches("/status").to_owned();
                    let mut object = server.objects.get(&object_path).cloned().unwrap_or(Value::Null);
                    object["status"] = body["status"].clone();
                    server.objects.insert(object_path, object.clone());
                    (200, object)
                }
                // A merge patch (a scale, a taken-back annotation) merges into the object.
                Method::PATCH if merge => match server.objects.get_mut(&path) {
                    Some(object) => {
                        merge_into(object, &body);
                        (200, object.clone())
                    }
                    None => not_found(&path),
                },
                // A JSON patch (the finalizer helper's) answers with the object as it stands.
                Method::PATCH if body.is_array() => {
                    server.objects.get(&path).cloned().map_or_else(|| not_found(&path), |o| (200, o))
                }
                Method::PATCH => {
                    let mut object = body.clone();
                    // What the test set beside (a Job's status) stays, as on a real server.
                    if let Some(status) = server.objects.get(&path).and_then(|o| o.get("status")).cloned() {
                        object["status"] = status;
                    }
                    server.objects.insert(path, object.clone());
                    (200, object)
                }
                Method::DELETE => match server.objects.remove(&path) {
                    Some(o) => (200, o),
                    None => not_found(&path),
                },
                Method::POST => (201, body),
                _ => (405, json!({"kind": "Status", "code": 405})),
            }
        };
        let response = Response::builder()
            .status(code)
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(&reply).unwrap_or_default()))
            .expect("a response");
        send.send_response(response);
    }
}

/// RFC 7386: `patch` merged into `target` (a null removes the key).
fn merge_into(target: &mut Value, patch: &Value) {
    let Value::Object(fields) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let Value::Object(object) = target else { return };
    for (key, value) in fields {
        if value.is_null() {
            object.remove(key);
        } else {
            merge_into(object.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

/// The request lines the server saw, in order.
pub fn lines(server: &Arc<Mutex<Server>>) -> Vec<String> {
    server.lock().unwrap().requests.iter().map(|r| r.line.clone()).collect()
}

/// The body of the first request whose line is `line`.
pub fn body_of(server: &Arc<Mutex<Server>>, line: &str) -> Value {
    let server = server.lock().unwrap();
    server.requests.iter().find(|r| r.line == line).map_or(Value::Null, |r| r.body.clone())
}

/// The API path of a namespaced object of `K`.
pub fn path_of<K: kube::Resource<DynamicType = ()>>(namespace: &str, name: &str) -> String {
    let url = K::url_path(&(), Some(namespace));
    format!("{url}/{name}")
}
