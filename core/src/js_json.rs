//! JSON text exactly as JavaScript's `JSON.stringify` writes the same value, so that a
//! receiver that parses a webhook body and serialises it again (the seed's Node.js check:
//! `JSON.stringify(req.body)`) gets the very bytes that were signed.
//!
//! Three things differ from `serde_json`'s text: a number is written as ECMAScript's
//! `Number::toString` writes it (`50.0` is `50`, `1e-7` stays, `0.000001` is not `1e-6`,
//! `1e21` is `1e+21`); object keys that are array indices (`"0"`, `"17"`) come first, in
//! numeric order, as JavaScript objects keep them; other keys keep their order. Strings
//! are escaped the same way by both.

use serde_json::{Number, Value};

/// `value` as `JSON.stringify(JSON.parse(text))` gives it back for any text of it.
pub fn to_js_string(value: &Value) -> String {
    let mut out = String::new();
    write(value, &mut out);
    out
}

fn write(value: &Value, out: &mut String) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&number(n)),
        Value::String(s) => out.push_str(&Value::String(s.clone()).to_string()),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut indices: Vec<(u32, &String, &Value)> =
                map.iter().filter_map(|(k, v)| array_index(k).map(|i| (i, k, v))).collect();
            indices.sort_by_key(|(i, _, _)| *i);
            let named = map.iter().filter(|(k, _)| array_index(k).is_none());
            out.push('{');
            for (n, (key, value)) in indices.into_iter().map(|(_, k, v)| (k, v)).chain(named).enumerate() {
                if n > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                write(value, out);
            }
            out.push('}');
        }
    }
}

/// The key as an array index (a canonical integer below 2³² − 1), which JavaScript orders
/// before the other keys of an object.
fn array_index(key: &str) -> Option<u32> {
    let canonical = key == "0" || (!key.starts_with('0') && !key.is_empty() && key.bytes().all(|b| b.is_ascii_digit()));
    key.parse::<u32>().ok().filter(|i| canonical && *i < u32::MAX)
}

fn number(n: &Number) -> String {
    if n.is_i64() || n.is_u64() {
        return n.to_string();
    }
    n.as_f64().map_or_else(|| n.to_string(), js_number)
}

/// ECMAScript's `Number::toString(x)` for a finite `x`: the shortest digits that read back
/// as `x` (Rust's formatting gives the same), placed as the specification places them.
fn js_number(x: f64) -> String {
    if x == 0.0 {
        return "0".to_owned();
    }
    let scientific = format!("{:e}", x.abs());
    let (mantissa, exponent) = scientific.split_once('e').unwrap_or((scientific.as_str(), "0"));
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    let k = i32::try_from(digits.len()).unwrap_or(i32::MAX);
    // x = 0.digits × 10^n
    let n = exponent.parse::<i32>().unwrap_or(0) + 1;
    let zeros = |count: i32| "0".repeat(usize::try_from(count).unwrap_or(0));
    let at = |i: i32| usize::try_from(i).unwrap_or(0);
    let body = if k <= n && n <= 21 {
        format!("{digits}{}", zeros(n - k))
    } else if 0 < n && n <= 21 {
        format!("{}.{}", &digits[..at(n)], &digits[at(n)..])
    } else if -6 < n && n <= 0 {
        format!("0.{}{digits}", zeros(-n))
    } else {
        let sign = if n > 0 { '+' } else { '-' };
        let mantissa = if k == 1 { digits.clone() } else { format!("{}.{}", &digits[..1], &digits[1..]) };
        format!("{mantissa}e{sign}{}", (n - 1).abs())
    };
    if x < 0.0 { format!("-{body}") } else { body }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn numbers_are_written_as_javascript_writes_them() {
        for (x, js) in [
            (50.0, "50"),
            (-0.0, "0"),
            (0.1, "0.1"),
            (33.333_333_333_333_336, "33.333333333333336"),
            (-2.5, "-2.5"),
            (1e21, "1e+21"),
            (1.5e21, "1.5e+21"),
            (1e20, "100000000000000000000"),
            (123_456_789_012_345_680_000.0, "123456789012345680000"),
            (0.000_001, "0.000001"),
            (0.000_001_5, "0.0000015"),
            (1e-7, "1e-7"),
            (-1.25e-7, "-1.25e-7"),
            (f64::MAX, "1.7976931348623157e+308"),
            (5e-324, "5e-324"),
        ] {
            assert_eq!(js_number(x), js, "{x:e}");
        }
        assert_eq!(to_js_string(&json!(9_007_199_254_740_991_i64)), "9007199254740991");
    }

    #[test]
    fn index_keys_come_first_in_numeric_order_and_strings_escape_alike() {
        let value: Value =
            serde_json::from_str(r#"{"-1":4,"10":2,"a":[1.0,{"01":0,"2":0,"1":0}],"9":3,"b":1,"s":"\"\\\n\u0001é"}"#)
                .unwrap();
        assert_eq!(
            to_js_string(&value),
            r#"{"9":3,"10":2,"-1":4,"a":[1,{"1":0,"2":0,"01":0}],"b":1,"s":"\"\\\n\u0001é"}"#
        );
    }
}
