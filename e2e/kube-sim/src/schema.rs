//! A CRD version's structural schema applied to an object, in the API server's order:
//! defaults, then unknown fields (pruned, or refused under `fieldValidation=Strict`), then
//! validation, with errors naming the field as the API server does
//! (`spec.replicas: Invalid value: "x": spec.replicas in body must be of type integer: "x"`).

use serde_json::Value;

/// Applies `default`s to fields missing from objects that are present.
pub fn default(schema: &Value, value: &mut Value) {
    match value {
        Value::Object(map) => {
            if let Some(props) = schema.get("properties").and_then(Value::as_object) {
                for (name, sub) in props {
                    if !map.contains_key(name)
                        && let Some(d) = sub.get("default")
                    {
                        map.insert(name.clone(), d.clone());
                    }
                    if let Some(child) = map.get_mut(name) {
                        default(sub, child);
                    }
                }
            }
            if let Some(extra) = schema.get("additionalProperties").filter(|a| a.is_object()) {
                let known: Vec<String> = schema
                    .get("properties")
                    .and_then(Value::as_object)
                    .map(|p| p.keys().cloned().collect())
                    .unwrap_or_default();
                for (name, child) in map.iter_mut() {
                    if !known.contains(name) {
                        default(extra, child);
                    }
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for item in items {
                    default(item_schema, item);
                }
            }
        }
        _ => {}
    }
}

fn preserves(schema: &Value) -> bool {
    schema.get("x-kubernetes-preserve-unknown-fields").and_then(Value::as_bool) == Some(true)
}

/// Removes fields the schema does not know (and returns their paths), as the API server
/// prunes them; `root` keeps `apiVersion`, `kind` and `metadata`.
pub fn prune(schema: &Value, value: &mut Value, path: &str, root: bool) -> Vec<String> {
    let mut unknown = Vec::new();
    match value {
        Value::Object(map) => {
            let props = schema.get("properties").and_then(Value::as_object);
            let extra = schema.get("additionalProperties");
            let keep_all = preserves(schema) || extra.is_some_and(|a| a.is_object() || a == &Value::Bool(true));
            let names: Vec<String> = map.keys().cloned().collect();
            for name in names {
                let child_path = join(path, &name);
                if root && matches!(name.as_str(), "apiVersion" | "kind" | "metadata") {
                    continue;
                }
                let sub = props.and_then(|p| p.get(&name)).or_else(|| extra.filter(|a| a.is_object()));
                match sub {
                    Some(sub) => {
                        if let Some(child) = map.get_mut(&name) {
                            unknown.extend(prune(sub, child, &child_path, false));
                        }
                    }
                    None if keep_all => {}
                    None => {
                        map.remove(&name);
                        unknown.push(child_path);
                    }
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter_mut().enumerate() {
                    unknown.extend(prune(item_schema, item, &format!("{path}[{i}]"), false));
                }
            }
        }
        _ => {}
    }
    unknown
}

fn join(path: &str, name: &str) -> String {
    if path.is_empty() { name.to_owned() } else { format!("{path}.{name}") }
}

fn render(value: &Value) -> String {
    match value {
        Value::String(s) => format!("\"{s}\""),
        other => other.to_string(),
    }
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Every way `value` breaks `schema`, as (field path, message) pairs.
pub fn validate(schema: &Value, value: &Value, path: &str) -> Vec<(String, String)> {
    let mut errors = Vec::new();
    check(schema, value, path, &mut errors);
    errors
}

#[allow(clippy::too_many_lines)]
fn check(schema: &Value, value: &Value, path: &str, errors: &mut Vec<(String, String)>) {
    let field = if path.is_empty() { "<root>" } else { path };
    let invalid = |errors: &mut Vec<(String, String)>, why: String| {
        errors.push((field.to_owned(), format!("Invalid value: {}: {field} in body {why}", render(value))));
    };
    if value.is_null() {
        if schema.get("nullable").and_then(Value::as_bool) != Some(true) && schema.get("type").is_some() {
            let want = schema.get("type").and_then(Value::as_str).unwrap_or("object");
            invalid(errors, format!("must be of type {want}: \"null\""));
        }
        return;
    }
    let int_or_string = schema.get("x-kubernetes-int-or-string").and_then(Value::as_bool) == Some(true);
    if let Some(want) = schema.get("type").and_then(Value::as_str) {
        let got = type_name(value);
        let fits = got == want
            || (want == "number" && got == "integer")
            || (int_or_string && matches!(got, "integer" | "string"));
        if !fits {
            invalid(errors, format!("must be of type {want}: \"{got}\""));
            return;
        }
    } else if int_or_string && !matches!(type_name(value), "integer" | "string") {
        invalid(errors, format!("must be of type integer or string: \"{}\"", type_name(value)));
        return;
    }
    if let Some(options) = schema.get("enum").and_then(Value::as_array)
        && !options.contains(value)
    {
        let supported: Vec<String> = options.iter().map(render).collect();
        errors.push((
            field.to_owned(),
            format!("Unsupported value: {}: supported values: {}", render(value), supported.join(", ")),
        ));
    }
    match value {
        Value::Number(n) => {
            let x = n.as_f64().unwrap_or_default();
            let exclusive_min = schema.get("exclusiveMinimum").and_then(Value::as_bool) == Some(true);
            let exclusive_max = schema.get("exclusiveMaximum").and_then(Value::as_bool) == Some(true);
            if let Some(min) = schema.get("minimum").and_then(Value::as_f64) {
                if exclusive_min && x <= min {
                    invalid(errors, format!("should be greater than {}", schema["minimum"]));
                } else if x < min {
                    invalid(errors, format!("should be greater than or equal to {}", schema["minimum"]));
                }
            }
            if let Some(max) = schema.get("maximum").and_then(Value::as_f64) {
                if exclusive_max && x >= max {
                    invalid(errors, format!("should be less than {}", schema["maximum"]));
                } else if x > max {
                    invalid(errors, format!("should be less than or equal to {}", schema["maximum"]));
                }
            }
        }
        Value::String(s) => {
            let chars = s.chars().count() as u64;
            if let Some(min) = schema.get("minLength").and_then(Value::as_u64)
                && chars < min
            {
                invalid(errors, format!("should be at least {min} chars long"));
            }
            if let Some(max) = schema.get("maxLength").and_then(Value::as_u64)
                && chars > max
            {
                errors.push((field.to_owned(), format!("Too long: may not be more than {max} bytes")));
            }
            if let Some(pattern) = schema.get("pattern").and_then(Value::as_str) {
                match regex::Regex::new(pattern) {
                    Ok(re) if !re.is_match(s) => invalid(errors, format!("should match '{pattern}'")),
                    Ok(_) => {}
                    Err(_) => invalid(errors, format!("cannot be checked against the invalid pattern '{pattern}'")),
                }
            }
        }
        Value::Array(items) => {
            let n = items.len() as u64;
            if let Some(min) = schema.get("minItems").and_then(Value::as_u64)
                && n < min
            {
                invalid(errors, format!("should have at least {min} items"));
            }
            if let Some(max) = schema.get("maxItems").and_then(Value::as_u64)
                && n > max
            {
                errors.push((field.to_owned(), format!("Too many: {n}: must have at most {max} items")));
            }
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    check(item_schema, item, &format!("{path}[{i}]"), errors);
                }
            }
        }
        Value::Object(map) => {
            for name in schema.get("required").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str)
            {
                if !map.contains_key(name) {
                    errors.push((join(path, name), "Required value".to_owned()));
                }
            }
            let n = map.len() as u64;
            if let Some(min) = schema.get("minProperties").and_then(Value::as_u64)
                && n < min
            {
                invalid(errors, format!("should have at least {min} properties"));
            }
            if let Some(max) = schema.get("maxProperties").and_then(Value::as_u64)
                && n > max
            {
                invalid(errors, format!("should have at most {max} properties"));
            }
            let props = schema.get("properties").and_then(Value::as_object);
            let extra = schema.get("additionalProperties").filter(|a| a.is_object());
            for (name, child) in map {
                if path.is_empty() && matches!(name.as_str(), "apiVersion" | "kind" | "metadata") {
                    continue;
                }
                if let Some(sub) = props.and_then(|p| p.get(name)).or(extra) {
                    check(sub, child, &join(path, name), errors);
                }
            }
        }
        _ => {}
    }
    for (keyword, want) in [("allOf", None), ("anyOf", Some(1)), ("oneOf", Some(1))] {
        let Some(branches) = schema.get(keyword).and_then(Value::as_array) else { continue };
        let passing = branches.iter().filter(|b| validate(b, value, path).is_empty()).count();
        match (keyword, want) {
            ("allOf", _) => {
                for b in branches {
                    check(b, value, path, errors);
                }
            }
            ("anyOf", _) if passing == 0 => invalid(errors, "must validate at least one schema (anyOf)".into()),
            ("oneOf", _) if passing != 1 => invalid(errors, "must validate one and only one schema (oneOf)".into()),
            _ => {}
        }
    }
    if let Some(not) = schema.get("not")
        && validate(not, value, path).is_empty()
    {
        invalid(errors, "must not validate the schema (not)".into());
    }
}

/// Defaults, prunes (or, when `strict`, refuses unknown fields) and validates an object of
/// a custom resource. `Err` carries either the unknown fields (strict) or the violations.
pub fn admit(schema: &Value, object: &mut Value, strict: bool) -> Result<(), Admission> {
    default(schema, object);
    let unknown = prune(schema, object, "", true);
    if strict && !unknown.is_empty() {
        return Err(Admission::Unknown(unknown));
    }
    let errors = validate(schema, object, "");
    if errors.is_empty() { Ok(()) } else { Err(Admission::Invalid(errors)) }
}

/// Why an object was not admitted.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    Unknown(Vec<String>),
    Invalid(Vec<(String, String)>),
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Value {
        json!({"type": "object", "properties": {
            "spec": {"type": "object", "required": ["name"], "properties": {
                "name": {"type": "string", "pattern": "^[a-z]+$", "minLength": 2},
                "size": {"type": "integer", "minimum": 1, "maximum": 10, "default": 3},
                "color": {"type": "string", "enum": ["red", "blue"]},
                "port": {"x-kubernetes-int-or-string": true},
                "tags": {"type": "array", "maxItems": 2, "items": {"type": "string"}},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}
            }},
            "status": {"type": "object", "properties": {"ready": {"type": "boolean"}}}
        }})
    }

    #[test]
    fn defaults_then_prunes_then_validates_with_field_paths() {
        let mut ok = json!({"apiVersion": "x/v1", "kind": "W", "metadata": {"name": "w"},
            "spec": {"name": "abc", "port": "http", "labels": {"a": "b"}, "free": {"any": {"thing": 1}}, "junk": 1}});
        assert_eq!(admit(&schema(), &mut ok, false), Ok(()));
        assert_eq!(ok["spec"]["size"], 3, "defaulted");
        assert!(ok["spec"].get("junk").is_none(), "pruned");
        assert_eq!(ok["spec"]["free"]["any"]["thing"], 1, "preserved");

        let mut strict = json!({"spec": {"name": "abc", "junk": 1}});
        assert_eq!(admit(&schema(), &mut strict, true), Err(Admission::Unknown(vec!["spec.junk".into()])));

        let mut bad = json!({"spec": {"name": "A", "size": 11, "color": "green", "port": true,
                                      "tags": ["a", "b", "c"], "labels": {"a": 1}}, "status": {"ready": "yes"}});
        let Err(Admission::Invalid(errors)) = admit(&schema(), &mut bad, false) else { panic!("invalid") };
        let fields: Vec<&str> = errors.iter().map(|(f, _)| f.as_str()).collect();
        for want in ["spec.name", "spec.size", "spec.color", "spec.port", "spec.tags", "spec.labels.a", "status.ready"]
        {
            assert!(fields.contains(&want), "{want} in {errors:?}");
        }
        let size = errors.iter().find(|(f, _)| f == "spec.size").unwrap();
        assert_eq!(size.1, "Invalid value: 11: spec.size in body should be less than or equal to 10");
        let color = errors.iter().find(|(f, _)| f == "spec.color").unwrap();
        assert_eq!(color.1, r#"Unsupported value: "green": supported values: "red", "blue""#);

        let mut missing = json!({"spec": {}});
        let Err(Admission::Invalid(errors)) = admit(&schema(), &mut missing, false) else { panic!("invalid") };
        assert_eq!(errors, vec![("spec.name".to_owned(), "Required value".to_owned())]);
    }
}
