//! Reading and writing object metadata on untyped objects, and the name rules.

use serde_json::{Map, Value, json};

pub fn str_at<'a>(object: &'a Value, pointer: &str) -> Option<&'a str> {
    object.pointer(pointer).and_then(Value::as_str)
}

pub fn name(object: &Value) -> &str {
    str_at(object, "/metadata/name").unwrap_or_default()
}

pub fn namespace(object: &Value) -> &str {
    str_at(object, "/metadata/namespace").unwrap_or_default()
}

pub fn uid(object: &Value) -> &str {
    str_at(object, "/metadata/uid").unwrap_or_default()
}

pub fn resource_version(object: &Value) -> &str {
    str_at(object, "/metadata/resourceVersion").unwrap_or_default()
}

pub fn deleting(object: &Value) -> bool {
    object.pointer("/metadata/deletionTimestamp").is_some_and(|v| !v.is_null())
}

/// `metadata`, created if missing (an object that is not a JSON object is left alone).
pub fn metadata_mut(object: &mut Value) -> Option<&mut Map<String, Value>> {
    let obj = object.as_object_mut()?;
    let meta = obj.entry("metadata").or_insert_with(|| json!({}));
    if !meta.is_object() {
        *meta = json!({});
    }
    meta.as_object_mut()
}

pub fn finalizers(object: &Value) -> Vec<String> {
    object
        .pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).map(str::to_owned).collect())
        .unwrap_or_default()
}

pub fn set_finalizers(object: &mut Value, finalizers: &[String]) {
    if let Some(meta) = metadata_mut(object) {
        if finalizers.is_empty() {
            meta.remove("finalizers");
        } else {
            meta.insert("finalizers".into(), json!(finalizers));
        }
    }
}

/// The uids of an object's owners.
pub fn owner_uids(object: &Value) -> Vec<String> {
    object
        .pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(|r| r.get("uid").and_then(Value::as_str)).map(str::to_owned).collect())
        .unwrap_or_default()
}

/// The number of the port named `name` in a container's `ports`.
pub fn container_port(container: &Value, name: &str) -> Option<u16> {
    container
        .get("ports")?
        .as_array()?
        .iter()
        .find(|p| str_at(p, "/name") == Some(name))?
        .get("containerPort")?
        .as_u64()
        .and_then(|p| u16::try_from(p).ok())
}

/// The number of the port named `name` in any container of a pod.
pub fn pod_port(pod: &Value, name: &str) -> Option<u16> {
    pod.pointer("/spec/containers")?.as_array()?.iter().find_map(|c| container_port(c, name))
}

/// The time now as the API server writes timestamps (RFC 3339, whole seconds, UTC).
pub fn now() -> String {
    format_time(time::OffsetDateTime::now_utc())
}

/// Now as a `MicroTime` (RFC 3339 with microseconds, UTC), as Leases and Events write it.
pub fn now_micro() -> String {
    let at = time::OffsetDateTime::now_utc();
    let micros = at.microsecond();
    let at = at.replace_nanosecond(0).unwrap_or(at);
    let whole = at.format(&time::format_description::well_known::Rfc3339).unwrap_or_default();
    format!("{}.{micros:06}Z", whole.trim_end_matches('Z'))
}

/// A timestamp as the API writes it: RFC 3339, whole seconds, UTC.
pub fn format_time(at: time::OffsetDateTime) -> String {
    let at = at.replace_nanosecond(0).unwrap_or(at);
    at.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

/// A timestamp the API wrote.
pub fn parse_time(text: &str) -> Option<time::OffsetDateTime> {
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()
}

/// Why a name is not a DNS-1123 subdomain (most objects) or label (namespaces), if it is not.
pub fn invalid_name(name: &str, label: bool) -> Option<String> {
    let max = if label { 63 } else { 253 };
    if name.is_empty() {
        return Some("name or generateName is required".into());
    }
    let ok_chars =
        name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || (!label && c == '.'));
    let ok_ends =
        name.starts_with(|c: char| c.is_ascii_alphanumeric()) && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    if name.len() > max || !ok_chars || !ok_ends {
        let what = if label { "RFC 1123 label" } else { "RFC 1123 subdomain" };
        return Some(format!(
            "Invalid value: \"{name}\": a lowercase {what} must consist of lower case alphanumeric characters, '-'{} and must start and end with an alphanumeric character (at most {max} characters)",
            if label { "" } else { " or '.'" }
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_dns_rules() {
        assert_eq!(invalid_name("web-1.example", false), None);
        assert!(invalid_name("web-1.example", true).is_some());
        assert!(invalid_name("Web", false).is_some());
        assert!(invalid_name("-web", false).is_some());
        assert!(invalid_name(&"a".repeat(64), true).is_some());
        assert!(invalid_name("", false).is_some());
    }

    #[test]
    fn timestamps_are_rfc3339_whole_seconds() {
        let t = now();
        assert!(t.ends_with('Z') && !t.contains('.'), "{t}");
    }
}
