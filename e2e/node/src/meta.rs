//! Reading metadata of untyped objects, and the API server's time formats.

use serde_json::Value;

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

/// The time now as the API server writes timestamps (RFC 3339, whole seconds, UTC).
pub fn now() -> String {
    let at = time::OffsetDateTime::now_utc();
    let at = at.replace_nanosecond(0).unwrap_or(at);
    at.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

/// Now as a `MicroTime` (RFC 3339 with microseconds, UTC), as Leases and Events write it.
pub fn now_micro() -> String {
    let at = time::OffsetDateTime::now_utc();
    let micros = at.microsecond();
    let at = at.replace_nanosecond(0).unwrap_or(at);
    let whole = at.format(&time::format_description::well_known::Rfc3339).unwrap_or_default();
    format!("{}.{micros:06}Z", whole.trim_end_matches('Z'))
}

/// A timestamp the API wrote.
pub fn parse_time(text: &str) -> Option<time::OffsetDateTime> {
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_written_as_the_api_server_writes_them() {
        let now = now();
        assert!(now.ends_with('Z') && !now.contains('.'), "{now}");
        assert!(parse_time(&now).is_some());
        let micro = now_micro();
        let fraction = micro.rsplit('.').next().unwrap();
        assert_eq!(fraction.len(), 7, "six digits and Z: {micro}");
    }
}
