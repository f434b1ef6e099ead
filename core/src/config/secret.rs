//! Secret values and the handles that stand for them in the compiled config.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Names one secret value: `<secret name>/<key>`. The compiled [`PlatformConfig`] holds
/// handles only, so it can live in a ConfigMap and in logs; the values travel separately in
/// a [`SecretBundle`].
///
/// [`PlatformConfig`]: super::PlatformConfig
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(transparent)]
pub struct SecretHandle(pub String);

impl SecretHandle {
    pub fn new(secret: &str, key: &str) -> Self {
        Self(format!("{secret}/{key}"))
    }
}

impl fmt::Display for SecretHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A secret value. Its `Debug` and `Display` never show the bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretValue(Vec<u8>);

impl SecretValue {
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Self(bytes.into())
    }

    /// The bytes, for the one place that uses them (signing, connecting).
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// The value as UTF-8 text, if it is.
    pub fn expose_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.0).ok()
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretValue(<{} bytes redacted>)", self.0.len())
    }
}

/// The secret values a compiled config refers to, by handle: what the operator writes into
/// the platform's aggregated Secret and what standalone mode keeps in memory.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SecretBundle(pub BTreeMap<SecretHandle, SecretValue>);

impl SecretBundle {
    pub fn get(&self, handle: &SecretHandle) -> Option<&SecretValue> {
        self.0.get(handle)
    }
}

/// Secrets as they come from Kubernetes or from YAML files: name → key → bytes.
pub type SecretStore = BTreeMap<String, BTreeMap<String, Vec<u8>>>;

/// The data of a Kubernetes Secret as the compiler takes it: `data`, with `stringData`
/// winning for the same key, as on a real API server.
pub fn secret_data(secret: &k8s_openapi::api::core::v1::Secret) -> BTreeMap<String, Vec<u8>> {
    let mut data: BTreeMap<String, Vec<u8>> =
        secret.data.iter().flatten().map(|(k, v)| (k.clone(), v.0.clone())).collect();
    for (k, v) in secret.string_data.iter().flatten() {
        data.insert(k.clone(), v.clone().into_bytes());
    }
    data
}

/// Why a Secret named by a resource cannot be used: the reason and message of a condition.
pub type SecretProblem = (&'static str, String);

pub(super) fn secret_not_found(name: &str) -> SecretProblem {
    (vellum_crds::conditions::reasons::SECRET_NOT_FOUND, format!("Secret {name} does not exist"))
}

/// One value of `store`, or why there is none (`SecretNotFound`, `SecretKeyMissing`).
pub fn lookup<'a>(store: &'a SecretStore, name: &str, key: &str) -> Result<&'a [u8], SecretProblem> {
    let data = store.get(name).ok_or_else(|| secret_not_found(name))?;
    data.get(key).map(Vec::as_slice).ok_or_else(|| {
        (vellum_crds::conditions::reasons::SECRET_KEY_MISSING, format!("Secret {name} has no key {key}"))
    })
}
