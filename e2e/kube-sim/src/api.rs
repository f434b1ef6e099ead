//! The HTTP surface: discovery, the resource paths of every served type and their verbs.

use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;

use crate::managed;
use crate::meta;
use crate::patch::{self, PatchType};
use crate::registry::ResourceType;
use crate::schema::{self, Admission};
use crate::select::{FieldSelector, LabelSelector};
use crate::status::{self, ApiError};
use crate::store::{Change, DeleteOptions, Event, Propagation, Store};
use crate::table;

/// What handlers share.
#[derive(Clone, Debug)]
pub struct Sim {
    pub store: Store,
    pub kubelet: crate::kubelet::Kubelet,
    pub requests: Requests,
}

/// Requests served, by client: the product of the `User-Agent` (`kubectl`, `vellum-operator`),
/// for scale runs that count what a controller asks of the API.
#[derive(Clone, Debug, Default)]
pub struct Requests(std::sync::Arc<std::sync::Mutex<std::collections::BTreeMap<String, u64>>>);

impl Requests {
    fn count(&self, agent: &str) {
        let product = agent.split(['/', ' ']).next().filter(|p| !p.is_empty()).unwrap_or("(none)");
        let mut counts = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        *counts.entry(product.to_owned()).or_default() += 1;
    }

    /// Requests so far, by client.
    pub fn snapshot(&self) -> std::collections::BTreeMap<String, u64> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }
}

type Params = HashMap<String, String>;

/// The router: every path goes through [`handle`], counted by client.
pub fn router(sim: Sim) -> axum::Router {
    let requests = sim.requests.clone();
    axum::Router::new().fallback(handle).with_state(sim).layer(axum::middleware::from_fn(
        move |request: axum::extract::Request, next: axum::middleware::Next| {
            let agent = request.headers().get(header::USER_AGENT).and_then(|v| v.to_str().ok()).unwrap_or_default();
            requests.count(agent);
            next.run(request)
        },
    ))
}

fn json_response(code: StatusCode, value: &Value) -> Response {
    (code, [(header::CONTENT_TYPE, "application/json")], value.to_string()).into_response()
}

fn ok(value: &Value) -> Response {
    json_response(StatusCode::OK, value)
}

/// Where a request points.
#[derive(Debug)]
struct Target {
    t: ResourceType,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

async fn handle(
    State(sim): State<Sim>,
    method: Method,
    uri: Uri,
    Query(params): Query<Params>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().trim_matches('/').to_owned();
    let segs: Vec<&str> = if path.is_empty() { vec![] } else { path.split('/').collect() };
    let result = match (&method, segs.as_slice()) {
        (&Method::GET, ["api", "v1", "namespaces", ns, "pods", name, "log"]) => {
            crate::kubelet::logs::serve(&sim.kubelet, ns, name, &params)
        }
        (_, ["api", "v1", "namespaces", ns, kind @ ("pods" | "services"), target, "proxy", rest @ ..]) => {
            crate::services::forward(
                &sim.store,
                ns,
                kind,
                target,
                &rest.join("/"),
                uri.query(),
                method.clone(),
                &headers,
                body,
            )
            .await
        }
        _ => route(&sim, &method, &segs, &params, &headers, &body),
    };
    let response = result.unwrap_or_else(IntoResponse::into_response);
    tracing::debug!(%method, %uri, status = %response.status(), "request");
    response
}

fn route(
    sim: &Sim,
    method: &Method,
    segs: &[&str],
    params: &Params,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Response, ApiError> {
    let registry = sim.store.registry();
    let (group, version, rest): (&str, &str, &[&str]) = match segs {
        ["version"] => return Ok(ok(&version_info())),
        ["healthz" | "readyz" | "livez"] => return Ok((StatusCode::OK, "ok").into_response()),
        ["api"] => {
            return Ok(ok(&json!({"kind": "APIVersions", "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]})));
        }
        ["apis"] => return Ok(ok(&registry.groups())),
        ["apis", group] => return registry.group(group).map(|g| ok(&g)).ok_or_else(ApiError::path_not_found),
        ["openapi", "v2"] => return Ok(ok(&crate::openapi::v2(&registry))),
        ["openapi", "v3"] => return Ok(ok(&crate::openapi::v3_index(&registry))),
        ["openapi", "v3", rest @ ..] => {
            return crate::openapi::v3_group_version(&registry, &rest.join("/"))
                .map(|d| ok(&d))
                .ok_or_else(ApiError::path_not_found);
        }
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return Err(ApiError::path_not_found()),
    };
    if rest.is_empty() {
        return registry.resource_list(group, version).map(|l| ok(&l)).ok_or_else(ApiError::path_not_found);
    }
    let find = |plural: &str| registry.find(group, version, plural).cloned();
    let target = match rest {
        ["namespaces", ns, plural, more @ ..] if find(plural).is_some_and(|t| t.namespaced) => {
            let t = find(plural).ok_or_else(ApiError::path_not_found)?;
            match more {
                [] => Target { t, namespace: Some((*ns).to_owned()), name: None, subresource: None },
                [name] => {
                    Target { t, namespace: Some((*ns).to_owned()), name: Some((*name).to_owned()), subresource: None }
                }
                [name, sub] => Target {
                    t,
                    namespace: Some((*ns).to_owned()),
                    name: Some((*name).to_owned()),
                    subresource: Some((*sub).to_owned()),
                },
                _ => return Err(ApiError::path_not_found()),
            }
        }
        [plural, more @ ..] => {
            let t = find(plural).ok_or_else(ApiError::path_not_found)?;
            match more {
                [] => Target { t, namespace: None, name: None, subresource: None },
                [name] if !t.namespaced => {
                    Target { t, namespace: None, name: Some((*name).to_owned()), subresource: None }
                }
                [name, sub] if !t.namespaced => {
                    Target { t, namespace: None, name: Some((*name).to_owned()), subresource: Some((*sub).to_owned()) }
                }
                _ => return Err(ApiError::path_not_found()),
            }
        }
        [] => return Err(ApiError::path_not_found()),
    };
    if let Some(sub) = &target.subresource {
        let known = (sub == "status" && target.t.status_subresource) || (sub == "log" && target.t.kind == "Pod");
        if !known {
            return Err(ApiError::path_not_found());
        }
    }
    if matches!(*method, Method::POST | Method::PUT) {
        check_content_type(headers)?;
    }
    match (method.clone(), target.name.is_some()) {
        (Method::GET, false) if flag(params, "watch") => watch(sim, &target, params),
        (Method::GET, false) => list(sim, &target, params, headers),
        (Method::POST, false) => create(sim, &target, params, headers, body),
        (Method::DELETE, false) => delete_collection(sim, &target, params, body),
        (Method::GET, true) => get(sim, &target, headers),
        (Method::PUT, true) => update(sim, &target, params, headers, body),
        (Method::PATCH, true) => patch(sim, &target, params, headers, body),
        (Method::DELETE, true) => delete(sim, &target, params, body),
        _ => Err(ApiError::method_not_allowed()),
    }
}

fn version_info() -> Value {
    json!({
        "major": "1",
        "minor": "33",
        "gitVersion": "v1.33.0-kube-sim",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2026-01-01T00:00:00Z",
        "goVersion": "go1.24.0",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

fn flag(params: &Params, name: &str) -> bool {
    params.get(name).is_some_and(|v| v == "true" || v == "1")
}

fn dry_run(params: &Params) -> Result<bool, ApiError> {
    match params.get("dryRun").map(String::as_str) {
        None | Some("") => Ok(false),
        Some("All") => Ok(true),
        Some(other) => {
            Err(ApiError::bad_request(format!("dryRun: Unsupported value: \"{other}\": supported values: \"All\"")))
        }
    }
}

fn namespace_of(target: &Target) -> &str {
    target.namespace.as_deref().unwrap_or_default()
}

/// Refuses bodies in encodings the simulator does not speak (protobuf, CBOR) with 415, on
/// which clients fall back to JSON.
fn check_content_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("application/json");
    if content_type.contains("protobuf") || content_type.contains("cbor") {
        return Err(ApiError::unsupported_media_type(content_type));
    }
    Ok(())
}

fn parse_body(body: &Bytes) -> Result<Value, ApiError> {
    if body.is_empty() {
        return Err(ApiError::bad_request("the request body is empty"));
    }
    serde_json::from_slice(body).or_else(|json_err| {
        serde_yaml::from_slice::<Value>(body)
            .map_err(|_| ApiError::bad_request(format!("the request body is not valid JSON: {json_err}")))
    })
}

fn selectors(params: &Params) -> Result<(LabelSelector, FieldSelector), ApiError> {
    let labels = LabelSelector::parse(params.get("labelSelector").map_or("", String::as_str))
        .map_err(|e| ApiError::bad_request(format!("unable to parse requirement: {e}")))?;
    let fields =
        FieldSelector::parse(params.get("fieldSelector").map_or("", String::as_str)).map_err(ApiError::bad_request)?;
    Ok((labels, fields))
}

fn wants_table(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.split(',').next().is_some_and(|first| first.contains("as=Table")))
}

fn get(sim: &Sim, target: &Target, headers: &HeaderMap) -> Result<Response, ApiError> {
    let name = target.name.as_deref().unwrap_or_default();
    let object = sim.store.get(&target.t, namespace_of(target), name)?;
    if wants_table(headers) {
        return Ok(ok(&table::table(&target.t, &[object], &sim.store.resource_version().to_string(), "Metadata")));
    }
    Ok(ok(&object))
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Continue {
    rv: u64,
    after: (String, String),
}

fn list(sim: &Sim, target: &Target, params: &Params, headers: &HeaderMap) -> Result<Response, ApiError> {
    let (labels, fields) = selectors(params)?;
    let (items, rv) = sim.store.list(&target.t, target.namespace.as_deref());
    let mut items: Vec<Value> =
        items.into_iter().filter(|o| labels.matches_object(o) && fields.matches_object(o)).collect();
    let mut list_rv = rv;
    if let Some(token) = params.get("continue").filter(|c| !c.is_empty()) {
        let decoded: Continue = URL_SAFE_NO_PAD
            .decode(token)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| ApiError::bad_request("continue key is not valid"))?;
        list_rv = decoded.rv;
        items.retain(|o| (meta::namespace(o).to_owned(), meta::name(o).to_owned()) > decoded.after);
    }
    let mut metadata = json!({"resourceVersion": list_rv.to_string()});
    if let Some(limit) = params.get("limit").and_then(|l| l.parse::<usize>().ok()).filter(|l| *l > 0)
        && items.len() > limit
    {
        let remaining = items.len() - limit;
        items.truncate(limit);
        let last = items.last().map(|o| (meta::namespace(o).to_owned(), meta::name(o).to_owned())).unwrap_or_default();
        let token = serde_json::to_vec(&Continue { rv: list_rv, after: last }).unwrap_or_default();
        metadata["continue"] = json!(URL_SAFE_NO_PAD.encode(token));
        metadata["remainingItemCount"] = json!(remaining);
    }
    if wants_table(headers) {
        let include = params.get("includeObject").map_or("Metadata", String::as_str);
        let mut t = table::table(&target.t, &items, &list_rv.to_string(), include);
        t["metadata"] = metadata;
        return Ok(ok(&t));
    }
    Ok(ok(&json!({
        "kind": format!("{}List", target.t.kind),
        "apiVersion": target.t.api_version(),
        "metadata": metadata,
        "items": items,
    })))
}

fn strict(params: &Params) -> bool {
    params.get("fieldValidation").is_some_and(|v| v == "Strict")
}

/// A custom resource's schema applied as the API server does before storing: defaults,
/// unknown fields pruned (refused when `strict`), then validation (422 with field paths).
fn admit(t: &ResourceType, object: &mut Value, strict: bool) -> Result<(), ApiError> {
    let Some(schema) = t.crd.as_ref().and_then(|c| c.schema.as_ref()) else { return Ok(()) };
    match schema::admit(schema, object, strict) {
        Ok(()) => Ok(()),
        Err(Admission::Unknown(fields)) => {
            let fields: Vec<String> = fields.iter().map(|f| format!("unknown field \"{f}\"")).collect();
            Err(ApiError::bad_request(format!(
                "{kind} in version \"{version}\" cannot be handled as a {kind}: strict decoding error: {}",
                fields.join(", "),
                kind = t.kind,
                version = t.version,
            )))
        }
        Err(Admission::Invalid(errors)) => Err(ApiError::invalid(t, meta::name(object), &errors)),
    }
}

fn create(
    sim: &Sim,
    target: &Target,
    params: &Params,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Response, ApiError> {
    if target.t.namespaced && target.namespace.is_none() {
        return Err(ApiError::method_not_allowed());
    }
    let mut object = parse_body(body)?;
    admit(&target.t, &mut object, strict(params))?;
    // The creator owns every field it set.
    if let Some(m) = meta::metadata_mut(&mut object) {
        m.remove("managedFields");
    }
    let fields = patch::field_set(&object, "");
    managed::record(&mut object, &update_manager(params, headers), "Update", &target.t.api_version(), &fields, &[]);
    let created = sim.store.create(&target.t, namespace_of(target), object, dry_run(params)?)?;
    Ok(json_response(StatusCode::CREATED, &created))
}

fn update(
    sim: &Sim,
    target: &Target,
    params: &Params,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Response, ApiError> {
    let mut object = parse_body(body)?;
    admit(&target.t, &mut object, strict(params))?;
    let name = target.name.as_deref().unwrap_or_default();
    let status = target.subresource.as_deref() == Some("status");
    let manager = update_manager(params, headers);
    let api_version = target.t.api_version();
    let updated = sim.store.modify(&target.t, namespace_of(target), name, status, dry_run(params)?, move |live| {
        // Without a resourceVersion an update is unconditional.
        track_update(&live, &mut object, &manager, &api_version);
        Ok(object)
    })?;
    Ok(ok(&updated))
}

fn patch(sim: &Sim, target: &Target, params: &Params, headers: &HeaderMap, body: &Bytes) -> Result<Response, ApiError> {
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
    let kind = PatchType::from_content_type(content_type)?;
    let patch_body = parse_body(body)?;
    let name = target.name.as_deref().unwrap_or_default();
    let status = target.subresource.as_deref() == Some("status");
    let dry = dry_run(params)?;
    let ns = namespace_of(target);
    if kind == PatchType::Apply {
        let manager = params.get("fieldManager").filter(|m| !m.is_empty()).ok_or_else(|| {
            ApiError::new(
                422,
                "Invalid",
                "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
            )
        })?;
        let body_name = meta::name(&patch_body);
        if !body_name.is_empty() && body_name != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        if sim.store.get(&target.t, ns, name).is_err() {
            let mut object = patch_body.clone();
            let fields = patch::field_set(&patch_body, "");
            managed::record(&mut object, manager, "Apply", &target.t.api_version(), &fields, &[]);
            if let Some(m) = meta::metadata_mut(&mut object) {
                m.insert("name".into(), json!(name));
            }
            admit(&target.t, &mut object, strict(params))?;
            let created = sim.store.create(&target.t, ns, object, dry)?;
            return Ok(json_response(StatusCode::CREATED, &created));
        }
        let t = target.t.clone();
        let manager = manager.clone();
        let (strict, force) = (strict(params), flag(params, "force"));
        let name_owned = name.to_owned();
        let updated = sim.store.modify(&target.t, ns, name, status, dry, move |live| {
            let previous = managed::applied_by(&live, &manager);
            let others = managed::owned_by_others(&live, &manager);
            let (mut next, fields) = patch::apply(&live, &patch_body, previous.as_ref(), &others)?;
            let found = managed::conflicts(&live, &patch_body, &fields, &manager);
            if !found.is_empty() && !force {
                return Err(apply_conflict(&t, &name_owned, &found));
            }
            let taken: Vec<managed::Path> = found.into_iter().map(|c| c.path).collect();
            managed::record(&mut next, &manager, "Apply", &t.api_version(), &fields, &taken);
            admit(&t, &mut next, strict)?;
            Ok(next)
        })?;
        return Ok(ok(&updated));
    }
    let (t, strict) = (target.t.clone(), strict(params));
    let manager = update_manager(params, headers);
    let updated = sim.store.modify(&target.t, ns, name, status, dry, move |live| {
        let mut next = match kind {
            PatchType::Json => patch::json_patch(&live, &patch_body)?,
            PatchType::Merge => patch::merge_patch(&live, &patch_body)?,
            PatchType::Strategic | PatchType::Apply => patch::strategic_merge(&live, &patch_body)?,
        };
        // A patch that leaves the resourceVersion as it was does not ask for a precondition.
        if meta::resource_version(&next) == meta::resource_version(&live)
            && let Some(m) = meta::metadata_mut(&mut next)
        {
            m.remove("resourceVersion");
        }
        track_update(&live, &mut next, &manager, &t.api_version());
        admit(&t, &mut next, strict)?;
        Ok(next)
    })?;
    Ok(ok(&updated))
}

/// The manager of a write that names none: the client's program, as the API server takes
/// it from the User-Agent.
fn update_manager(params: &Params, headers: &HeaderMap) -> String {
    params.get("fieldManager").filter(|m| !m.is_empty()).cloned().unwrap_or_else(|| {
        headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .and_then(|ua| ua.split('/').next())
            .filter(|m| !m.is_empty())
            .unwrap_or("unknown")
            .to_owned()
    })
}

/// Records that `manager` changed whatever differs between `live` and `next`.
fn track_update(live: &Value, next: &mut Value, manager: &str, api_version: &str) {
    // Ownership is the server's to keep: whatever the client sent back is ignored.
    if let Some(m) = meta::metadata_mut(next) {
        match live.pointer("/metadata/managedFields") {
            Some(v) => m.insert("managedFields".into(), v.clone()),
            None => m.remove("managedFields"),
        };
    }
    let taken = managed::changed(live, next);
    managed::record(next, manager, "Update", api_version, &taken, &managed::leaves(&taken));
}

fn apply_conflict(t: &ResourceType, name: &str, found: &[managed::Conflict]) -> ApiError {
    let lines: Vec<String> = found
        .iter()
        .map(|c| format!("conflict with \"{}\" using {}: {}", c.manager, c.api_version, managed::display(&c.path)))
        .collect();
    let noun = if found.len() == 1 { "conflict" } else { "conflicts" };
    let mut error =
        ApiError::new(409, "Conflict", format!("Apply failed with {} {noun}: {}", found.len(), lines.join("\n")));
    error.details = Some(json!({
        "name": name,
        "group": t.group,
        "kind": t.plural,
        "causes": found.iter().map(|c| json!({
            "reason": "FieldManagerConflict",
            "message": format!("conflict with \"{}\" using {}", c.manager, c.api_version),
            "field": managed::display(&c.path),
        })).collect::<Vec<_>>(),
    }));
    error
}

fn delete_options(params: &Params, body: &Bytes) -> Result<DeleteOptions, ApiError> {
    let body: Value = if body.is_empty() { json!({}) } else { parse_body(body)? };
    let policy = body
        .get("propagationPolicy")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .or_else(|| params.get("propagationPolicy").cloned());
    let propagation = match policy {
        Some(p) => Propagation::parse(&p)?,
        None if body.get("orphanDependents").and_then(Value::as_bool) == Some(true) => Propagation::Orphan,
        None => Propagation::Background,
    };
    let dry = dry_run(params)? || body.get("dryRun").and_then(Value::as_array).is_some_and(|d| !d.is_empty());
    Ok(DeleteOptions {
        propagation,
        uid: meta::str_at(&body, "/preconditions/uid").map(str::to_owned),
        resource_version: meta::str_at(&body, "/preconditions/resourceVersion").map(str::to_owned),
        dry_run: dry,
        grace_period: body
            .get("gracePeriodSeconds")
            .and_then(Value::as_i64)
            .or_else(|| params.get("gracePeriodSeconds").and_then(|g| g.parse().ok())),
    })
}

fn delete(sim: &Sim, target: &Target, params: &Params, body: &Bytes) -> Result<Response, ApiError> {
    let options = delete_options(params, body)?;
    let name = target.name.as_deref().unwrap_or_default();
    let (object, gone) = sim.store.delete(&target.t, namespace_of(target), name, &options)?;
    if gone && target.t.kind != "Namespace" && target.t.crd.is_none() && !target.t.has_spec {
        return Ok(ok(&status::success(&target.t, name, meta::uid(&object))));
    }
    let code = if gone { StatusCode::OK } else { StatusCode::ACCEPTED };
    Ok(json_response(code, &object))
}

fn delete_collection(sim: &Sim, target: &Target, params: &Params, body: &Bytes) -> Result<Response, ApiError> {
    let options = delete_options(params, body)?;
    let (labels, fields) = selectors(params)?;
    let (items, rv) = sim.store.list(&target.t, target.namespace.as_deref());
    let mut deleted = Vec::new();
    for item in items.into_iter().filter(|o| labels.matches_object(o) && fields.matches_object(o)) {
        match sim.store.delete(&target.t, meta::namespace(&item), meta::name(&item), &options) {
            Ok((object, _)) => deleted.push(object),
            Err(e) if e.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(ok(&json!({
        "kind": format!("{}List", target.t.kind),
        "apiVersion": target.t.api_version(),
        "metadata": {"resourceVersion": rv.to_string()},
        "items": deleted,
    })))
}

/// One line of a watch stream.
fn watch_line(kind: &str, object: &Value) -> Bytes {
    let mut line = json!({"type": kind, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

fn bookmark(t: &ResourceType, rv: u64, initial_end: bool) -> Bytes {
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if initial_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    watch_line("BOOKMARK", &json!({"kind": t.kind, "apiVersion": t.api_version(), "metadata": metadata}))
}

/// What a watch passes on of a change, given its filters: selector transitions turn a
/// modification into the addition or deletion the watcher sees.
struct Filter {
    key: String,
    namespace: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
}

impl Filter {
    fn matches(&self, object: &Value) -> bool {
        self.labels.matches_object(object) && self.fields.matches_object(object)
    }

    fn pass(&self, t: &ResourceType, event: &Event) -> Option<Bytes> {
        if event.key != self.key || self.namespace.as_ref().is_some_and(|n| *n != event.namespace) {
            return None;
        }
        let now = self.matches(&event.object);
        let before = event.old.as_ref().is_some_and(|o| self.matches(o));
        let kind = match (event.change, before, now) {
            (Change::Added, _, true) | (Change::Modified, false, true) => "ADDED",
            (Change::Modified, true, true) => "MODIFIED",
            (Change::Modified, true, false) | (Change::Deleted, true, _) => "DELETED",
            _ => return None,
        };
        Some(watch_line(kind, &crate::store::served(t, &event.object)))
    }
}

fn watch(sim: &Sim, target: &Target, params: &Params) -> Result<Response, ApiError> {
    let (labels, fields) = selectors(params)?;
    let filter = Filter { key: target.t.key(), namespace: target.namespace.clone(), labels, fields };
    let t = target.t.clone();
    let bookmarks = flag(params, "allowWatchBookmarks");
    let timeout = params.get("timeoutSeconds").and_then(|s| s.parse::<u64>().ok()).unwrap_or(1800);
    let requested = params.get("resourceVersion").cloned().unwrap_or_default();
    let send_initial = params.get("sendInitialEvents").map(|v| v == "true");
    let mut first: Vec<Bytes> = Vec::new();
    let subscription = if send_initial == Some(true)
        || (send_initial.is_none() && (requested.is_empty() || requested == "0"))
    {
        let (items, sub) = sim.store.list_and_subscribe(&t, target.namespace.as_deref());
        for item in items.iter().filter(|o| filter.matches(o)) {
            first.push(watch_line("ADDED", item));
        }
        if send_initial == Some(true) {
            first.push(bookmark(&t, sub.rv, true));
        }
        sub
    } else {
        let rv: u64 =
            requested.parse().map_err(|_| ApiError::bad_request(format!("invalid resource version: {requested:?}")))?;
        match sim.store.subscribe(Some(rv)) {
            Ok(sub) => sub,
            // A real API server answers a too-old version inside the watch, as an ERROR event.
            Err(gone) => {
                let line = watch_line("ERROR", &gone.status());
                return Ok(stream_response(futures::stream::iter([Ok::<_, Infallible>(line)]).boxed()));
            }
        }
    };
    let mut last_rv = subscription.rv;
    for event in &subscription.backlog {
        last_rv = last_rv.max(event.rv);
        if let Some(line) = filter.pass(&t, event) {
            first.push(line);
        }
    }
    let live = subscription.live;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
    let state = (live, filter, t, last_rv, deadline, bookmarks);
    let rest = futures::stream::unfold(Some(state), |state| async move {
        let (mut live, filter, t, mut last_rv, deadline, bookmarks) = state?;
        loop {
            let tick = tokio::time::sleep(Duration::from_secs(1));
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => return None,
                () = tick, if bookmarks => {
                    let b = bookmark(&t, last_rv, false);
                    return Some((Ok::<_, Infallible>(b), Some((live, filter, t, last_rv, deadline, bookmarks))));
                }
                received = live.recv() => match received {
                    Ok(event) => {
                        if event.rv <= last_rv {
                            continue;
                        }
                        last_rv = event.rv;
                        if let Some(line) = filter.pass(&t, &event) {
                            return Some((Ok(line), Some((live, filter, t, last_rv, deadline, bookmarks))));
                        }
                    }
                    // Fell behind or the store is gone: end the watch; the client resumes
                    // from the last version it saw.
                    Err(RecvError::Lagged(_) | RecvError::Closed) => return None,
                },
            }
        }
    });
    let stream = futures::stream::iter(first.into_iter().map(Ok::<_, Infallible>)).chain(rest);
    Ok(stream_response(stream.boxed()))
}

fn stream_response(stream: futures::stream::BoxStream<'static, Result<Bytes, Infallible>>) -> Response {
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CACHE_CONTROL, "no-cache, private")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}
