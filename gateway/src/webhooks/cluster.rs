//! Webhooks made through the gateway's API in a cluster: a Webhook resource and the Secret
//! holding its signing key, created through the Kubernetes API under the gateway's own
//! ServiceAccount (bound to the `vellum-gateway` ClusterRole in its namespace only). The
//! operator compiles them into the platform config like any Webhook a person applied, and
//! the gateways and workers deliver to them once the config reloads: the Kubernetes API is
//! the one source of truth.

use std::collections::BTreeMap;

use axum::http::StatusCode;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::{Client, Resource, ResourceExt};
use vellum_core::config::SecretValue;
use vellum_core::crds::webhook::WebhookSpec;
use vellum_core::crds::{Webhook, annotations, field_managers, labels};

use crate::error::ApiError;

/// The key of a made webhook's Secret that holds its signing key.
pub const SECRET_KEY: &str = "secret";

/// The Webhooks of one namespace, through the Kubernetes API.
#[derive(Clone)]
pub struct KubeWebhooks {
    client: Client,
    namespace: String,
}

impl std::fmt::Debug for KubeWebhooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeWebhooks").field("namespace", &self.namespace).finish_non_exhaustive()
    }
}

/// A Webhook the API made, as the API shows it.
#[derive(Clone, Debug)]
pub struct Made {
    pub display_name: String,
    /// Milliseconds since the epoch.
    pub created_at: Option<i64>,
    pub spec: WebhookSpec,
}

impl Made {
    pub fn of(webhook: &Webhook) -> Self {
        Self {
            display_name: webhook.annotations().get(annotations::DISPLAY_NAME).cloned().unwrap_or_default(),
            created_at: webhook.metadata.creation_timestamp.as_ref().map(|t| t.0.as_millisecond()),
            spec: webhook.spec.clone(),
        }
    }
}

fn made_labels() -> BTreeMap<String, String> {
    BTreeMap::from([
        (labels::MANAGED_BY.to_owned(), labels::MANAGED_BY_GATEWAY.to_owned()),
        (labels::PART_OF.to_owned(), labels::PART_OF_VALUE.to_owned()),
    ])
}

/// Whether the API made this Webhook (only those may be deleted through it).
pub fn is_made(webhook: &Webhook) -> bool {
    webhook.labels().get(labels::MANAGED_BY).is_some_and(|v| v == labels::MANAGED_BY_GATEWAY)
}

/// A Kubernetes API failure as an answer: conflicts and invalid objects are the caller's,
/// anything else (no permission, no API server) is ours and says what to look at. The API
/// server's messages name objects and verbs, never Secret data.
fn api_error(what: &str, e: kube::Error) -> ApiError {
    match e {
        kube::Error::Api(status) if status.code == 409 => {
            ApiError::new(StatusCode::CONFLICT, format!("{what}: it exists already"))
        }
        kube::Error::Api(status) if status.code == 422 || status.code == 400 => {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, format!("{what}: {}", status.message))
        }
        kube::Error::Api(status) if status.code == 403 => {
            tracing::error!(error = %status.message, "the gateway's ServiceAccount lacks a permission");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "{what}: the Kubernetes API refused the gateway's ServiceAccount ({}); its RoleBinding to the \
                     vellum-gateway ClusterRole is missing or changed",
                    status.message
                ),
            )
        }
        other => ApiError::internal(StatusCode::SERVICE_UNAVAILABLE, &format!("{what}: {other}")),
    }
}

fn not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(status) if status.code == 404)
}

impl KubeWebhooks {
    /// A client of the Kubernetes API the gateway runs in (its ServiceAccount in a pod,
    /// `KUBECONFIG` elsewhere).
    pub async fn connect(namespace: String) -> Result<Self, kube::Error> {
        let client = Client::try_default().await?;
        Ok(Self { client, namespace })
    }

    /// [`connect`](Self::connect) when a namespace is given.
    pub async fn connect_to(namespace: Option<String>) -> Result<Option<Self>, kube::Error> {
        match namespace {
            Some(namespace) => Self::connect(namespace).await.map(Some),
            None => Ok(None),
        }
    }

    fn webhooks(&self) -> Api<Webhook> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// Creates the Webhook `id` and its Secret (named by `spec.secretRef`), owned by the
    /// Webhook so that deleting it deletes the key. Nothing is left half made: when the
    /// Secret cannot be created, the Webhook is deleted again.
    pub async fn create(
        &self,
        id: &str,
        display_name: &str,
        created_by: &str,
        spec: &WebhookSpec,
        secret: &SecretValue,
    ) -> Result<Webhook, ApiError> {
        let post = PostParams { field_manager: Some(field_managers::GATEWAY.to_owned()), ..PostParams::default() };
        let mut webhook = Webhook::new(id, spec.clone());
        webhook.metadata.namespace = Some(self.namespace.clone());
        webhook.metadata.labels = Some(made_labels());
        webhook.metadata.annotations = Some(BTreeMap::from([
            (annotations::DISPLAY_NAME.to_owned(), display_name.to_owned()),
            (annotations::CREATED_BY.to_owned(), created_by.to_owned()),
        ]));
        let created =
            self.webhooks().create(&post, &webhook).await.map_err(|e| api_error("creating the Webhook", e))?;
        let owner = created.controller_owner_ref(&()).map(|mut o| {
            o.controller = None;
            o.block_owner_deletion = None;
            o
        });
        let key = Secret {
            metadata: ObjectMeta {
                name: Some(spec.secret_ref.name.clone()),
                namespace: Some(self.namespace.clone()),
                labels: Some(made_labels()),
                owner_references: owner.map(|o| vec![o]),
                ..ObjectMeta::default()
            },
            data: Some(BTreeMap::from([(spec.secret_ref.key.clone(), ByteString(secret.expose().to_vec()))])),
            type_: Some("Opaque".to_owned()),
            ..Secret::default()
        };
        if let Err(e) = self.secrets().create(&post, &key).await {
            if let Err(undo) = self.webhooks().delete(id, &DeleteParams::default()).await {
                tracing::error!(webhook = %id, error = %undo, "deleting a Webhook whose Secret could not be created");
            }
            return Err(api_error("creating the Webhook's Secret", e));
        }
        tracing::info!(webhook = %id, namespace = %self.namespace, "Webhook and Secret created");
        Ok(created)
    }

    /// The Webhooks the API made, by name.
    pub async fn made(&self) -> Result<BTreeMap<String, Made>, ApiError> {
        let selector = format!("{}={}", labels::MANAGED_BY, labels::MANAGED_BY_GATEWAY);
        let list = self
            .webhooks()
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(|e| api_error("listing Webhooks", e))?;
        Ok(list.items.iter().map(|w| (w.name_any(), Made::of(w))).collect())
    }

    /// The Webhook `id`, if there is one.
    pub async fn get(&self, id: &str) -> Result<Option<Webhook>, ApiError> {
        match self.webhooks().get(id).await {
            Ok(w) => Ok(Some(w)),
            Err(e) if not_found(&e) => Ok(None),
            Err(e) => Err(api_error("reading the Webhook", e)),
        }
    }

    /// Deletes a Webhook the API made, and its Secret (which its owner reference would
    /// also take, a moment later).
    pub async fn delete(&self, webhook: &Webhook) -> Result<(), ApiError> {
        let name = webhook.name_any();
        match self.webhooks().delete(&name, &DeleteParams::background()).await {
            Ok(_) => {}
            Err(e) if not_found(&e) => {}
            Err(e) => return Err(api_error("deleting the Webhook", e)),
        }
        match self.secrets().delete(&webhook.spec.secret_ref.name, &DeleteParams::background()).await {
            Ok(_) => {}
            Err(e) if not_found(&e) => {}
            Err(e) => return Err(api_error("deleting the Webhook's Secret", e)),
        }
        tracing::info!(webhook = %name, namespace = %self.namespace, "Webhook and Secret deleted");
        Ok(())
    }
}
