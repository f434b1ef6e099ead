//! The webhook façade, with the seed's paths and shapes: create, list, get, delete, stats,
//! delivery log, test, reactivate and replay. Admin only: a webhook receives every
//! document event of every user.
//!
//! One source of truth per mode: in standalone mode a created webhook lives in the local
//! store and is compiled together with the platform config's Webhook resources (the same
//! compiler, the same validation), then handed to the in-process delivery engine. In a
//! cluster, creation goes through the Kubernetes API as a Webhook resource and a Secret.

pub mod cluster;

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::{Json, response::Response};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::Mutex;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use vellum_core::clock::Clock;
use vellum_core::config::{PlatformConfig, SecretBundle, SecretValue, Sources, compile, compile_webhooks};
use vellum_core::crds::Webhook;
use vellum_core::crds::webhook::{EventFilter, EventType, HttpHeader, RetryPolicy, WebhookSpec};
use vellum_core::signing::parse_signing_key;
use vellum_core::webhooks::{self, ApiWebhook, DeliveryRecord, Replay, Stats};
use vellum_workers::Engine;

use self::cluster::KubeWebhooks;
use crate::AppState;
use crate::auth::Admin;
use crate::error::{ApiError, ErrorBody};
use crate::extract::{JsonBody, QueryParams};

const TAG: &str = "webhooks";

/// The webhooks of this gateway's platform and the engine delivering to them.
#[derive(Debug)]
pub struct WebhookService {
    engine: Engine,
    /// In a cluster: where webhooks made through the API go (Webhook resources and Secrets).
    kube: Option<KubeWebhooks>,
    /// The platform config's own webhooks; API webhooks are compiled beside them.
    base: std::sync::RwLock<WebhookBase>,
    clock: Clock,
    changes: Mutex<()>,
}

/// What webhooks created through the API are compiled beside.
#[derive(Clone, Debug)]
pub enum WebhookBase {
    /// The platform's resource YAML (standalone mode): compiled together, as one config.
    Sources(Sources),
    /// A config the operator compiled: API webhooks are compiled alone and added to it.
    Compiled(PlatformConfig, SecretBundle),
}

/// Secrets of API webhooks are named after them, as a Secret in a cluster would be.
fn secret_name(id: &str) -> String {
    format!("vellum-api-webhook-{id}")
}

impl WebhookService {
    /// Compiles the config with the stored API webhooks and starts delivering to them all.
    /// With `kube`, webhooks made through the API become Webhook resources and Secrets
    /// (delivered once the operator has compiled them and the config reloads); without, they
    /// live in the local store.
    pub async fn start(
        engine: Engine,
        base: WebhookBase,
        clock: Clock,
        kube: Option<KubeWebhooks>,
    ) -> Result<Self, crate::standalone::StartError> {
        let service = Self { engine, kube, base: std::sync::RwLock::new(base), clock, changes: Mutex::new(()) };
        let api = webhooks::api_webhooks(service.engine.meta()).await?;
        let (config, secrets) = service.compile_with(&api).map_err(crate::standalone::StartError::Invalid)?;
        service.engine.set_endpoints(vellum_workers::configured_endpoints(&config, &secrets)).await?;
        Ok(service)
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Replaces the platform's own webhooks (a reloaded config) and delivers to the result;
    /// when that fails, the previous ones stay.
    pub async fn rebase(&self, base: WebhookBase) -> Result<(), ApiError> {
        let _guard = self.changes.lock().await;
        let write = || self.base.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        let previous = std::mem::replace(&mut *write(), base);
        if let Err(e) = self.apply().await {
            *write() = previous;
            return Err(e);
        }
        Ok(())
    }

    fn compile_with(&self, api: &[ApiWebhook]) -> Result<(PlatformConfig, SecretBundle), String> {
        let joined = |errors: Vec<vellum_core::config::ConfigError>| {
            errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
        };
        let webhooks: Vec<Webhook> = api.iter().map(|w| Webhook::new(&w.id, w.spec.clone())).collect();
        let secrets = api.iter().map(|w| {
            let data = BTreeMap::from([(cluster::SECRET_KEY.to_owned(), w.secret.expose().to_vec())]);
            (secret_name(&w.id), data)
        });
        let base = self.base.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        match base {
            WebhookBase::Sources(mut sources) => {
                sources.webhooks.extend(webhooks);
                sources.secrets.extend(secrets);
                compile(&sources).map_err(joined)
            }
            WebhookBase::Compiled(mut config, mut bundle) => {
                let (more, values) = compile_webhooks(webhooks, secrets.collect()).map_err(joined)?;
                for (name, webhook) in more {
                    if config.webhooks.insert(name.clone(), webhook).is_some() {
                        return Err(format!("Webhook/{name}: defined twice"));
                    }
                }
                bundle.0.extend(values.0);
                Ok((config, bundle))
            }
        }
    }

    async fn apply(&self) -> Result<PlatformConfig, ApiError> {
        let api = webhooks::api_webhooks(self.engine.meta()).await.map_err(store_error)?;
        let (config, secrets) =
            self.compile_with(&api).map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e))?;
        self.engine
            .set_endpoints(vellum_workers::configured_endpoints(&config, &secrets))
            .await
            .map_err(store_error)?;
        Ok(config)
    }

    /// Whether `id` names an endpoint, and whether it came from the API.
    async fn find(&self, id: &str) -> Result<Option<bool>, ApiError> {
        if self.engine.endpoints().iter().any(|e| e.name == id) {
            let api = webhooks::api_webhooks(self.engine.meta()).await.map_err(store_error)?;
            return Ok(Some(api.iter().any(|w| w.id == id)));
        }
        Ok(None)
    }
}

fn store_error(e: impl std::fmt::Display) -> ApiError {
    ApiError::internal(StatusCode::SERVICE_UNAVAILABLE, &e)
}

fn unprocessable(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, message)
}

/// A webhook to create, as the seed's clients send it.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateWebhook {
    /// A name for people: 1 to 200 characters, not all white space.
    #[schema(
        max_length = 200,
        pattern = r"[^\t\n\x0B\x0C\r \u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]"
    )]
    pub name: String,
    /// Where events are POSTed (http or https); the platform's destination policy decides
    /// which addresses it may reach.
    #[schema(max_length = 2048, pattern = "^[Hh][Tt][Tt][Pp][Ss]?://")]
    pub url: String,
    /// The HMAC signing secret: a `whsec_` value (base64) or any other string, used as bytes.
    #[schema(min_length = 1, max_length = 4096)]
    pub secret: String,
    /// Event types to deliver; empty or absent means all.
    #[serde(default)]
    #[schema(value_type = Vec<String>, max_items = 16)]
    pub event_types: Vec<EventType>,
    /// Retries after the first attempt (default 3: at once, then 2, 4 and 8 seconds).
    #[schema(maximum = 20)]
    pub retry_count: Option<u32>,
    /// Seconds to wait for the endpoint (default 30).
    #[schema(minimum = 1, maximum = 300)]
    pub timeout_seconds: Option<u32>,
    /// Extra headers sent with every delivery.
    #[serde(default)]
    #[schema(value_type = Vec<Object>)]
    pub headers: Vec<HttpHeader>,
    /// Conditions on the document an event is about (`tags`, `fileTypes`, `owners`).
    #[schema(value_type = Option<Object>)]
    pub filter: Option<EventFilter>,
}

/// A webhook as listed.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookView {
    pub id: String,
    pub name: String,
    pub url: String,
    pub active: bool,
    pub paused: bool,
    #[schema(value_type = Vec<String>)]
    pub event_types: Vec<EventType>,
    pub retry_count: u32,
    pub timeout_seconds: u32,
    /// `api` for webhooks created here, `config` for the platform config's Webhook resources.
    pub source: String,
    /// RFC 3339.
    pub created_at: Option<String>,
    pub deactivation_reason: Option<String>,
}

async fn views(state: &AppState) -> Result<Vec<WebhookView>, ApiError> {
    let service = &state.webhooks;
    let meta = service.engine.meta();
    let api = webhooks::api_webhooks(meta).await.map_err(store_error)?;
    let mut made = match &service.kube {
        Some(kube) => kube.made().await?,
        None => BTreeMap::new(),
    };
    let created = webhooks::created_at(meta).await.map_err(store_error)?;
    let mut out = Vec::new();
    for endpoint in service.engine.endpoints().iter() {
        let activation = webhooks::activation(meta, &endpoint.name).await.map_err(store_error)?;
        let from_api = api.iter().find(|w| w.id == endpoint.name).map(|w| w.display_name.clone());
        let from_kube = made.remove(&endpoint.name);
        let display = from_api.clone().or_else(|| from_kube.as_ref().map(|m| m.display_name.clone()));
        out.push(WebhookView {
            id: endpoint.name.clone(),
            name: display.clone().unwrap_or_else(|| endpoint.name.clone()),
            url: endpoint.config.url.clone(),
            active: activation.active,
            paused: endpoint.config.paused,
            event_types: endpoint.config.event_types.clone(),
            retry_count: endpoint.config.retry.max_retries,
            timeout_seconds: endpoint.config.timeout_seconds,
            source: if display.is_some() { "api" } else { "config" }.to_owned(),
            created_at: created
                .get(&endpoint.name)
                .copied()
                .or_else(|| from_kube.and_then(|m| m.created_at))
                .and_then(webhooks::rfc3339),
            deactivation_reason: activation.deactivation_reason,
        });
    }
    // Made in the cluster but not compiled into this gateway's config yet: listed, so that
    // what was just created is there, and delivered to once the config reloads.
    for (id, m) in made {
        out.push(made_view(&id, &m));
    }
    Ok(out)
}

/// A webhook made in the cluster, before this gateway's config holds it.
fn made_view(id: &str, made: &cluster::Made) -> WebhookView {
    WebhookView {
        id: id.to_owned(),
        name: made.display_name.clone(),
        url: made.spec.url.clone(),
        active: true,
        paused: made.spec.paused,
        event_types: made.spec.event_types.clone(),
        retry_count: made.spec.retry.max_retries,
        timeout_seconds: made.spec.timeout_seconds,
        source: "api".to_owned(),
        created_at: made.created_at.and_then(webhooks::rfc3339),
        deactivation_reason: None,
    }
}

async fn view(state: &AppState, id: &str) -> Result<WebhookView, ApiError> {
    views(state).await?.into_iter().find(|v| v.id == id).ok_or_else(|| ApiError::not_found(format!("no webhook {id}")))
}

/// A DNS-1123 name from the given name, with a random suffix: what a Webhook resource
/// created for it in a cluster is called.
fn new_id(name: &str) -> String {
    let mut slug: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' })
        .collect::<String>()
        .split('-')
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("-");
    slug.truncate(40);
    let slug = slug.trim_end_matches('-');
    let suffix = hex::encode(rand::random::<[u8; 3]>());
    if slug.is_empty() { format!("webhook-{suffix}") } else { format!("{slug}-{suffix}") }
}

fn validate(request: &CreateWebhook, engine: &Engine) -> Result<(), ApiError> {
    let name = request.name.trim();
    if name.is_empty() || name.chars().count() > 200 {
        return Err(unprocessable("name must have 1 to 200 characters"));
    }
    if request.url.len() > 2048 {
        return Err(unprocessable("url is longer than 2048 characters"));
    }
    engine.sender().precheck(&request.url).map_err(|e| unprocessable(format!("url: {e}")))?;
    if request.secret.len() > 4096 {
        return Err(unprocessable("secret is longer than 4096 characters"));
    }
    parse_signing_key(request.secret.as_bytes()).map_err(|e| unprocessable(format!("secret: {e}")))?;
    if let Some(n) = request.retry_count
        && n > 20
    {
        return Err(unprocessable("retryCount must be between 0 and 20"));
    }
    if let Some(t) = request.timeout_seconds
        && !(1..=300).contains(&t)
    {
        return Err(unprocessable("timeoutSeconds must be between 1 and 300"));
    }
    if request.event_types.len() > 16 {
        return Err(unprocessable("at most 16 eventTypes"));
    }
    // Reserved headers are refused by the config compiler, which every webhook passes.
    Ok(())
}

#[utoipa::path(post, path = "/", tag = TAG, summary = "Create a webhook",
    description = "Deliveries are JSON POSTs signed with the secret twice: Standard Webhooks (`webhook-id`, \
        `webhook-timestamp`, `webhook-signature`) and `X-Webhook-Signature` (base64 HMAC-SHA256 of the body), \
        with `X-Event-Type` and `X-Timestamp`. Loopback, private and link-local destinations are refused unless \
        the platform's allow-list names them.",
    request_body = CreateWebhook,
    responses((status = 201, body = WebhookView), (status = 403, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn create(
    State(state): State<AppState>,
    Admin(actor): Admin,
    JsonBody(request): JsonBody<CreateWebhook>,
) -> Result<Response, ApiError> {
    let service = &state.webhooks;
    validate(&request, &service.engine)?;
    let spec = WebhookSpec {
        url: request.url.clone(),
        secret_ref: vellum_core::crds::common::SecretKeyRef { name: String::new(), key: cluster::SECRET_KEY.into() },
        event_types: request.event_types.clone(),
        filter: request.filter.clone(),
        retry: RetryPolicy { max_retries: request.retry_count.unwrap_or(3), ..RetryPolicy::default() },
        timeout_seconds: request.timeout_seconds.unwrap_or(30),
        rate_limit: None,
        max_concurrency: 4,
        headers: request.headers.clone(),
        paused: false,
        deactivation: vellum_core::crds::webhook::DeactivationRule::default(),
    };
    let guard = service.changes.lock().await;
    let id = new_id(&request.name);
    let mut spec = spec;
    spec.secret_ref.name = secret_name(&id);
    if let Some(kube) = &service.kube {
        drop(guard);
        return create_in_cluster(service, kube, &id, request, spec, &actor.user).await;
    }
    let webhook = ApiWebhook {
        id: id.clone(),
        display_name: request.name.trim().to_owned(),
        spec,
        secret: SecretValue::new(request.secret.into_bytes()),
        created_by: actor.user.clone(),
        created_at: service.clock.now_ms(),
    };
    // Compile first: the webhook is stored only if the platform config accepts it.
    let mut api = webhooks::api_webhooks(service.engine.meta()).await.map_err(store_error)?;
    api.push(webhook.clone());
    let (config, secrets) = service.compile_with(&api).map_err(unprocessable)?;
    if !webhooks::create_api(service.engine.meta(), &webhook).await.map_err(store_error)? {
        return Err(ApiError::new(StatusCode::CONFLICT, format!("webhook {id} exists")));
    }
    // What was compiled is what is stored now: the change lock keeps others out meanwhile.
    let endpoints = vellum_workers::configured_endpoints(&config, &secrets);
    service.engine.set_endpoints(endpoints).await.map_err(store_error)?;
    drop(guard);
    tracing::info!(webhook = %id, by = %actor.user, "webhook created");
    Ok((StatusCode::CREATED, Json(view(&state, &id).await?)).into_response())
}

/// In a cluster: checks the webhook compiles beside the platform's (destination policy,
/// headers, key), then creates its Webhook resource and Secret.
async fn create_in_cluster(
    service: &WebhookService,
    kube: &KubeWebhooks,
    id: &str,
    request: CreateWebhook,
    spec: WebhookSpec,
    actor: &str,
) -> Result<Response, ApiError> {
    let display_name = request.name.trim().to_owned();
    let secret = SecretValue::new(request.secret.into_bytes());
    let check = ApiWebhook {
        id: id.to_owned(),
        display_name: display_name.clone(),
        spec: spec.clone(),
        secret: secret.clone(),
        created_by: actor.to_owned(),
        created_at: service.clock.now_ms(),
    };
    service.compile_with(std::slice::from_ref(&check)).map_err(unprocessable)?;
    let created = kube.create(id, &display_name, actor, &spec, &secret).await?;
    tracing::info!(webhook = %id, by = %actor, "webhook created as a Webhook resource");
    Ok((StatusCode::CREATED, Json(made_view(id, &cluster::Made::of(&created)))).into_response())
}

#[utoipa::path(get, path = "/", tag = TAG, summary = "List webhooks",
    responses((status = 200, body = Vec<WebhookView>), (status = 403, body = ErrorBody)))]
async fn list(State(state): State<AppState>, Admin(_): Admin) -> Result<Json<Vec<WebhookView>>, ApiError> {
    Ok(Json(views(&state).await?))
}

#[utoipa::path(get, path = "/{id}", tag = TAG, summary = "A webhook", params(("id" = String, Path)),
    responses((status = 200, body = WebhookView), (status = 404, body = ErrorBody)))]
async fn get_one(
    State(state): State<AppState>,
    Admin(_): Admin,
    Path(id): Path<String>,
) -> Result<Json<WebhookView>, ApiError> {
    Ok(Json(view(&state, &id).await?))
}

#[utoipa::path(delete, path = "/{id}", tag = TAG, summary = "Delete a webhook created through the API",
    params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody),
        (status = 409, description = "Defined by the platform config", body = ErrorBody)))]
async fn delete(
    State(state): State<AppState>,
    Admin(_): Admin,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let service = &state.webhooks;
    if let Some(kube) = &service.kube {
        return match kube.get(&id).await? {
            Some(webhook) if cluster::is_made(&webhook) => {
                kube.delete(&webhook).await?;
                Ok(StatusCode::NO_CONTENT)
            }
            Some(_) => Err(ApiError::new(
                StatusCode::CONFLICT,
                format!("webhook {id} was applied as a Webhook resource; delete it with kubectl instead"),
            )),
            None => Err(ApiError::not_found(format!("no webhook {id}"))),
        };
    }
    let _guard = service.changes.lock().await;
    match service.find(&id).await? {
        None => Err(ApiError::not_found(format!("no webhook {id}"))),
        Some(false) => Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("webhook {id} is defined by the platform config; remove its Webhook resource instead"),
        )),
        Some(true) => {
            webhooks::delete_api(service.engine.meta(), &id).await.map_err(store_error)?;
            service.apply().await?;
            Ok(StatusCode::NO_CONTENT)
        }
    }
}

fn known(state: &AppState, id: &str) -> Result<(), ApiError> {
    if state.webhooks.engine.endpoints().iter().any(|e| e.name == id) {
        Ok(())
    } else {
        Err(ApiError::not_found(format!("no webhook {id}")))
    }
}

#[utoipa::path(get, path = "/{id}/stats", tag = TAG, summary = "Delivery statistics",
    params(("id" = String, Path)), responses((status = 200, body = Stats), (status = 404, body = ErrorBody)))]
async fn stats(
    State(state): State<AppState>,
    Admin(_): Admin,
    Path(id): Path<String>,
) -> Result<Json<Stats>, ApiError> {
    known(&state, &id)?;
    Ok(Json(webhooks::stats(state.webhooks.engine.meta(), &id).await.map_err(store_error)?))
}

/// Page parameters, as the seed's Spring clients send them.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageParams {
    /// From 0.
    #[param(minimum = 0)]
    pub page: Option<i64>,
    /// 1 to 100, default 20.
    #[param(minimum = 1, maximum = 100)]
    pub size: Option<i64>,
}

/// A page of the delivery log, in the seed's (Spring) page shape.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryPage {
    pub content: Vec<DeliveryRecord>,
    pub page: i64,
    pub size: i64,
    pub total_elements: i64,
    pub total_pages: i64,
}

#[utoipa::path(get, path = "/{id}/events", tag = TAG, summary = "The delivery log, newest first",
    params(("id" = String, Path), PageParams),
    responses((status = 200, body = DeliveryPage), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn events(
    State(state): State<AppState>,
    Admin(_): Admin,
    Path(id): Path<String>,
    QueryParams(params): QueryParams<PageParams>,
) -> Result<Json<DeliveryPage>, ApiError> {
    known(&state, &id)?;
    let page = params.page.unwrap_or(0);
    let size = params.size.unwrap_or(20);
    if page < 0 || !(1..=100).contains(&size) {
        return Err(ApiError::bad_request("page must be 0 or more and size between 1 and 100"));
    }
    let (content, total) =
        webhooks::deliveries(state.webhooks.engine.meta(), &id, page, size).await.map_err(store_error)?;
    Ok(Json(DeliveryPage { content, page, size, total_elements: total, total_pages: (total + size - 1) / size }))
}

/// What a test delivery found.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TestResult {
    pub success: bool,
    pub response_code: Option<u16>,
    pub response_body: Option<String>,
    pub duration_ms: i64,
    pub error: Option<String>,
}

#[utoipa::path(post, path = "/{id}/test", tag = TAG, summary = "Send a signed test event now",
    description = "A `WEBHOOK_TEST` event, signed like every delivery, sent once; not counted in the statistics.",
    params(("id" = String, Path)), responses((status = 200, body = TestResult), (status = 404, body = ErrorBody)))]
async fn test(
    State(state): State<AppState>,
    Admin(actor): Admin,
    Path(id): Path<String>,
) -> Result<Json<TestResult>, ApiError> {
    let service = &state.webhooks;
    let endpoints = service.engine.endpoints();
    let endpoint =
        endpoints.iter().find(|e| e.name == id).ok_or_else(|| ApiError::not_found(format!("no webhook {id}")))?;
    let now = service.clock.now_ms();
    let event_id = uuid::Uuid::new_v4().to_string();
    let body = json!({
        "eventId": event_id,
        "eventType": "WEBHOOK_TEST",
        "timestamp": now,
        "webhookId": id,
        "message": "A test delivery from Vellum",
        "requestedBy": actor.user,
    })
    .to_string();
    let sent = service.engine.sender().send(endpoint, &event_id, "WEBHOOK_TEST", now, &body, now).await;
    Ok(Json(TestResult {
        success: sent.attempt.success,
        response_code: sent.attempt.status_code,
        response_body: sent.attempt.response_body,
        duration_ms: sent.attempt.duration_ms,
        error: sent.attempt.error,
    }))
}

#[utoipa::path(post, path = "/{id}/reactivate", tag = TAG, summary = "Reactivate a deactivated webhook",
    description = "Its failure window starts afresh; deliveries still pending are sent.",
    params(("id" = String, Path)), responses((status = 200, body = WebhookView), (status = 404, body = ErrorBody)))]
async fn reactivate(
    State(state): State<AppState>,
    Admin(actor): Admin,
    Path(id): Path<String>,
) -> Result<Json<WebhookView>, ApiError> {
    known(&state, &id)?;
    let service = &state.webhooks;
    webhooks::reactivate(service.engine.meta(), &id, service.clock.now_ms()).await.map_err(store_error)?;
    service.engine.wake(std::slice::from_ref(&id));
    tracing::info!(webhook = %id, by = %actor.user, "webhook reactivated");
    Ok(Json(view(&state, &id).await?))
}

/// Which FAILED deliveries to send again: one by id, or all created since a time.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReplayRequest {
    /// One delivery's id (from the delivery log).
    pub delivery_id: Option<i64>,
    /// Every FAILED delivery created at or after this time (RFC 3339).
    pub since: Option<String>,
}

#[utoipa::path(post, path = "/{id}/replay", tag = TAG, summary = "Send FAILED deliveries again",
    description = "With the same `webhook-id` and body, and a fresh retry schedule.",
    params(("id" = String, Path)), request_body = ReplayRequest,
    responses((status = 200, description = "`{\"replayed\": n}`"), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn replay(
    State(state): State<AppState>,
    Admin(_): Admin,
    Path(id): Path<String>,
    JsonBody(request): JsonBody<ReplayRequest>,
) -> Result<Json<Value>, ApiError> {
    known(&state, &id)?;
    let which = match (request.delivery_id, request.since.as_deref()) {
        (Some(seq), None) => Replay::One(seq),
        (None, Some(since)) => {
            let at = time::OffsetDateTime::parse(since, &time::format_description::well_known::Rfc3339)
                .map_err(|_| ApiError::bad_request("since must be an RFC 3339 time, like 2026-01-31T12:00:00Z"))?;
            Replay::Since(i64::try_from(at.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX))
        }
        _ => return Err(ApiError::bad_request("give exactly one of deliveryId and since")),
    };
    let service = &state.webhooks;
    let n = webhooks::replay(service.engine.meta(), &id, which, service.clock.now_ms()).await.map_err(store_error)?;
    service.engine.wake(std::slice::from_ref(&id));
    Ok(Json(json!({ "replayed": n })))
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create, list))
        .routes(routes!(get_one, delete))
        .routes(routes!(stats))
        .routes(routes!(events))
        .routes(routes!(test))
        .routes(routes!(reactivate))
        .routes(routes!(replay))
}
