//! A container's environment as a kubelet builds it: the Service variables of the pod's
//! namespace, `envFrom`, then `env` in order (values with `$(VAR)` references expanded,
//! `valueFrom` read from ConfigMaps, Secrets, the pod's own fields and the container's
//! resources).

use std::collections::BTreeMap;

use base64::Engine;
use serde_json::Value;

use super::api::NodeApi;
use crate::meta;

/// Why a container cannot start yet (`reason`, `message`), as its waiting state says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Waiting {
    pub reason: String,
    pub message: String,
}

impl Waiting {
    pub fn new(reason: &str, message: impl Into<String>) -> Self {
        Self { reason: reason.into(), message: message.into() }
    }
}

/// Expands `$(NAME)` from `vars`; `$$(NAME)` is a literal `$(NAME)`, and an unknown name is
/// left as written.
pub fn expand(text: &str, vars: &[(String, String)]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(escaped) = after.strip_prefix('$') {
            out.push('$');
            rest = escaped;
        } else if let Some(body) = after.strip_prefix('(')
            && let Some(end) = body.find(')')
        {
            let name = &body[..end];
            if let Some((_, v)) = vars.iter().rev().find(|(k, _)| k == name) {
                out.push_str(v);
            } else {
                out.push_str("$(");
                out.push_str(name);
                out.push(')');
            }
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

fn set(vars: &mut Vec<(String, String)>, name: &str, value: String) {
    vars.retain(|(k, _)| k != name);
    vars.push((name.to_owned(), value));
}

/// The data of a ConfigMap or Secret (Secret values decoded), or why it cannot be read.
pub fn source_data(
    api: &dyn NodeApi,
    namespace: &str,
    kind: &str,
    name: &str,
) -> Result<BTreeMap<String, Vec<u8>>, Waiting> {
    let object = api.object(kind, namespace, name).ok_or_else(|| {
        Waiting::new("CreateContainerConfigError", format!("{} \"{name}\" not found", kind.to_ascii_lowercase()))
    })?;
    Ok(object_data(&object, kind))
}

/// The data of a ConfigMap or Secret object, Secret values decoded.
pub fn object_data(object: &Value, kind: &str) -> BTreeMap<String, Vec<u8>> {
    // A Secret's `data` and a ConfigMap's `binaryData` are base64; the other field is text
    // (a Secret's `stringData` wins over its `data`).
    let (encoded, text) = if kind == "Secret" { ("data", "stringData") } else { ("binaryData", "data") };
    let entries = |field: &str| object.get(field).and_then(Value::as_object).cloned().unwrap_or_default();
    let mut data = BTreeMap::new();
    for (k, v) in entries(encoded) {
        let bytes =
            base64::engine::general_purpose::STANDARD.decode(v.as_str().unwrap_or_default()).unwrap_or_default();
        data.insert(k, bytes);
    }
    for (k, v) in entries(text) {
        data.insert(k, v.as_str().unwrap_or_default().as_bytes().to_vec());
    }
    data
}

/// `metadata.labels['app']` and the other paths a `fieldRef` may name.
pub fn field_ref(pod: &Value, path: &str) -> Result<String, Waiting> {
    let keyed = |prefix: &str| {
        path.strip_prefix(prefix)
            .and_then(|r| r.strip_prefix("['"))
            .and_then(|r| r.strip_suffix("']"))
            .map(str::to_owned)
    };
    let text = |pointer: &str| meta::str_at(pod, pointer).unwrap_or_default().to_owned();
    Ok(match path {
        "metadata.name" => text("/metadata/name"),
        "metadata.namespace" => text("/metadata/namespace"),
        "metadata.uid" => text("/metadata/uid"),
        "spec.nodeName" => text("/spec/nodeName"),
        "spec.serviceAccountName" => meta::str_at(pod, "/spec/serviceAccountName").unwrap_or("default").to_owned(),
        "status.hostIP" | "status.hostIPs" => text("/status/hostIP"),
        "status.podIP" | "status.podIPs" => text("/status/podIP"),
        _ => {
            if let Some(key) = keyed("metadata.labels") {
                pod.pointer("/metadata/labels")
                    .and_then(|l| l.get(&key))
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned()
            } else if let Some(key) = keyed("metadata.annotations") {
                pod.pointer("/metadata/annotations")
                    .and_then(|l| l.get(&key))
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned()
            } else {
                return Err(Waiting::new(
                    "CreateContainerConfigError",
                    format!("unsupported fieldRef path \"{path}\""),
                ));
            }
        }
    })
}

/// A `resourceFieldRef`: the container's request or limit, or the node's capacity for an
/// unset limit.
fn resource_ref(container: &Value, resource: &str) -> String {
    let (section, name) = resource.split_once('.').unwrap_or(("limits", resource));
    let given = container.pointer(&format!("/resources/{section}/{name}")).and_then(|v| match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    });
    given.unwrap_or_else(|| match name {
        "cpu" => std::thread::available_parallelism().map_or(1, std::num::NonZero::get).to_string(),
        "memory" => (16_u64 << 30).to_string(),
        _ => "0".into(),
    })
}

fn key_of(api: &dyn NodeApi, namespace: &str, kind: &str, selector: &Value) -> Result<Option<String>, Waiting> {
    let name = meta::str_at(selector, "/name").unwrap_or_default();
    let key = meta::str_at(selector, "/key").unwrap_or_default();
    let optional = selector.get("optional").and_then(Value::as_bool).unwrap_or(false);
    match source_data(api, namespace, kind, name) {
        Ok(data) => match data.get(key) {
            Some(bytes) => Ok(Some(String::from_utf8_lossy(bytes).into_owned())),
            None if optional => Ok(None),
            None => Err(Waiting::new(
                "CreateContainerConfigError",
                format!("couldn't find key {key} in {kind} {namespace}/{name}"),
            )),
        },
        Err(_) if optional => Ok(None),
        Err(e) => Err(e),
    }
}

/// The Service variables of a namespace: `NAME_SERVICE_HOST`, `NAME_SERVICE_PORT`, and the
/// Docker-link style `NAME_PORT_80_TCP…`.
pub fn service_vars(services: &[Value]) -> Vec<(String, String)> {
    let mut vars = Vec::new();
    for svc in services {
        let Some(ip) = meta::str_at(svc, "/spec/clusterIP").filter(|ip| *ip != "None" && !ip.is_empty()) else {
            continue;
        };
        let prefix = meta::name(svc).to_ascii_uppercase().replace('-', "_");
        let ports = svc.pointer("/spec/ports").and_then(Value::as_array).cloned().unwrap_or_default();
        let Some(first) = ports.first() else { continue };
        let port_of = |p: &Value| p.get("port").and_then(Value::as_i64).unwrap_or_default();
        vars.push((format!("{prefix}_SERVICE_HOST"), ip.to_owned()));
        vars.push((format!("{prefix}_SERVICE_PORT"), port_of(first).to_string()));
        let proto = |p: &Value| meta::str_at(p, "/protocol").unwrap_or("TCP").to_ascii_lowercase();
        vars.push((format!("{prefix}_PORT"), format!("{}://{ip}:{}", proto(first), port_of(first))));
        for p in &ports {
            if let Some(name) = meta::str_at(p, "/name") {
                vars.push((
                    format!("{prefix}_SERVICE_PORT_{}", name.to_ascii_uppercase().replace('-', "_")),
                    port_of(p).to_string(),
                ));
            }
            let (port, pr) = (port_of(p), proto(p));
            let base = format!("{prefix}_PORT_{port}_{}", pr.to_ascii_uppercase());
            vars.push((base.clone(), format!("{pr}://{ip}:{port}")));
            vars.push((format!("{base}_PROTO"), pr.clone()));
            vars.push((format!("{base}_PORT"), port.to_string()));
            vars.push((format!("{base}_ADDR"), ip.to_owned()));
        }
    }
    vars
}

/// The environment of `container` in `pod`, on top of `base` (PATH, HOSTNAME, the API
/// server's address and the Service variables).
pub fn environment(
    api: &dyn NodeApi,
    pod: &Value,
    container: &Value,
    base: Vec<(String, String)>,
) -> Result<Vec<(String, String)>, Waiting> {
    let namespace = meta::namespace(pod);
    let mut vars = base;
    for from in container.get("envFrom").and_then(Value::as_array).into_iter().flatten() {
        let prefix = meta::str_at(from, "/prefix").unwrap_or_default();
        let (kind, source) = match (from.get("configMapRef"), from.get("secretRef")) {
            (Some(r), _) => ("ConfigMap", r),
            (_, Some(r)) => ("Secret", r),
            _ => continue,
        };
        let optional = source.get("optional").and_then(Value::as_bool).unwrap_or(false);
        match source_data(api, namespace, kind, meta::str_at(source, "/name").unwrap_or_default()) {
            Ok(data) => {
                for (k, v) in data {
                    set(&mut vars, &format!("{prefix}{k}"), String::from_utf8_lossy(&v).into_owned());
                }
            }
            Err(_) if optional => {}
            Err(e) => return Err(e),
        }
    }
    for var in container.get("env").and_then(Value::as_array).into_iter().flatten() {
        let name = meta::str_at(var, "/name").unwrap_or_default();
        let value = if let Some(value) = var.get("value").and_then(Value::as_str) {
            Some(expand(value, &vars))
        } else if let Some(from) = var.get("valueFrom") {
            if let Some(r) = from.get("configMapKeyRef") {
                key_of(api, namespace, "ConfigMap", r)?
            } else if let Some(r) = from.get("secretKeyRef") {
                key_of(api, namespace, "Secret", r)?
            } else if let Some(r) = from.get("fieldRef") {
                Some(field_ref(pod, meta::str_at(r, "/fieldPath").unwrap_or_default())?)
            } else {
                from.get("resourceFieldRef")
                    .map(|r| resource_ref(container, meta::str_at(r, "/resource").unwrap_or_default()))
            }
        } else {
            Some(String::new())
        };
        if let Some(value) = value {
            set(&mut vars, name, value);
        }
    }
    Ok(vars)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kubelet::api::Memory;
    use serde_json::json;

    #[test]
    fn references_expand_from_earlier_variables_and_escapes_stay_literal() {
        let vars = vec![("A".to_owned(), "1".to_owned()), ("B".to_owned(), "two".to_owned())];
        assert_eq!(expand("x$(A)-$(B)", &vars), "x1-two");
        assert_eq!(expand("$$(A) $(C) $5 $", &vars), "$(A) $(C) $5 $");
    }

    #[test]
    fn the_environment_reads_config_maps_secrets_and_the_pods_own_fields() {
        let api = Memory::default();
        api.put("ConfigMap", "default", json!({"metadata": {"name": "cfg"}, "data": {"mode": "fast", "x": "y"}}));
        api.put("Secret", "default", json!({"metadata": {"name": "creds"}, "data": {"pw": "czNjcjN0"}}));
        let pod = json!({"metadata": {"name": "p", "namespace": "default", "labels": {"app": "web"}},
                         "status": {"podIP": "127.9.0.1"}});
        let container = json!({
        "envFrom": [{"configMapRef": {"name": "cfg"}, "prefix": "CFG_"}],
        "env": [
            {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "mode"}}},
            {"name": "PW", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "pw"}}},
            {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
            {"name": "LISTEN", "value": "$(IP):8080"},
            {"name": "GONE", "valueFrom": {"configMapKeyRef": {"name": "nope", "key": "k", "optional": true}}},
        ]});
        let env = environment(&api, &pod, &container, vec![]).unwrap();
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("CFG_mode"), Some("fast"));
        assert_eq!(get("MODE"), Some("fast"));
        assert_eq!(get("PW"), Some("s3cr3t"));
        assert_eq!(get("LISTEN"), Some("127.9.0.1:8080"));
        assert_eq!(get("APP"), Some("web"));
        assert_eq!(get("GONE"), None);
        let missing = json!({"env": [{"name": "K", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "nope"}}}]});
        let err = environment(&api, &pod, &missing, vec![]).unwrap_err();
        assert_eq!(err.reason, "CreateContainerConfigError");
        assert_eq!(err.message, "couldn't find key nope in Secret default/creds");
    }
}
