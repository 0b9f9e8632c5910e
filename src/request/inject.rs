//! `nvext.token_data` goes into the forwarded body by splicing bytes, not by re-serializing:
//! every other byte of the body stays as the client wrote it (numbers, escapes, spacing, key
//! order), and the cost is one validating scan instead of a parse-and-print of the whole tree.
//! Only the `nvext` member is rewritten (its other members are copied verbatim); nothing but
//! `token_data` is added to it, since the sidecar rejects unknown `nvext` keys.

use std::{borrow::Cow, fmt};

use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;

const NVEXT: &str = "nvext";
const TOKEN_DATA: &str = "token_data";

/// The body was not a JSON object (the caller has already checked, so this means a bug).
#[derive(Debug, thiserror::Error)]
#[error("cannot inject token_data: {0}")]
pub struct InjectError(String);

/// Returns `body` with `nvext.token_data = tokens` (created, merged into, or replaced).
/// `no_nvext`: the caller parsed `body` and found a non-empty object without a top-level
/// `nvext` member, so the body need not be scanned again to find one.
pub fn inject_token_data(body: &[u8], tokens: &[u32], no_nvext: bool) -> Result<Vec<u8>, InjectError> {
    let top = if no_nvext { Top { members: 1, nvext: None } } else { top_level_nvext(body)? };
    let mut out = Vec::with_capacity(body.len() + tokens.len() * 7 + 48);
    match top.nvext {
        Some(raw) if raw.get().trim_start().starts_with('{') => {
            let (start, end) = span(body, raw.get());
            out.extend_from_slice(&body[..start]);
            merged_nvext(&mut out, raw.get(), tokens)?;
            out.extend_from_slice(&body[end..]);
        }
        Some(raw) => {
            // `"nvext": null` (anything else was refused when the body was checked).
            let (start, end) = span(body, raw.get());
            out.extend_from_slice(&body[..start]);
            out.push(b'{');
            token_data(&mut out, tokens);
            out.push(b'}');
            out.extend_from_slice(&body[end..]);
        }
        None => {
            let close = body.iter().rposition(|&b| b == b'}').ok_or_else(|| InjectError("no closing brace".into()))?;
            out.extend_from_slice(&body[..close]);
            if top.members > 0 {
                out.push(b',');
            }
            out.extend_from_slice(format!("\"{NVEXT}\":{{").as_bytes());
            token_data(&mut out, tokens);
            out.push(b'}');
            out.extend_from_slice(&body[close..]);
        }
    }
    Ok(out)
}

/// The byte range of `inner` (a slice borrowed from `outer`).
fn span(outer: &[u8], inner: &str) -> (usize, usize) {
    let start = inner.as_ptr() as usize - outer.as_ptr() as usize;
    (start, start + inner.len())
}

/// `"token_data":[…]`, written straight into the output.
fn token_data(out: &mut Vec<u8>, ids: &[u32]) {
    out.extend_from_slice(format!("\"{TOKEN_DATA}\":[").as_bytes());
    let mut buf = [0u8; 10];
    for (i, &id) in ids.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let mut n = id;
        let mut at = buf.len();
        loop {
            at -= 1;
            buf[at] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        out.extend_from_slice(&buf[at..]);
    }
    out.push(b']');
}

/// `{...}` with every member but `token_data` copied verbatim, then ours.
fn merged_nvext(out: &mut Vec<u8>, raw: &str, ids: &[u32]) -> Result<(), InjectError> {
    out.push(b'{');
    for (k, v) in members(raw.as_bytes())?.iter().filter(|(k, _)| k != TOKEN_DATA) {
        out.extend_from_slice(serde_json::to_string(k).expect("string").as_bytes());
        out.push(b':');
        out.extend_from_slice(v.get().as_bytes());
        out.push(b',');
    }
    token_data(out, ids);
    out.push(b'}');
    Ok(())
}

struct Top<'a> {
    members: usize,
    nvext: Option<&'a RawValue>,
}

fn top_level_nvext(body: &[u8]) -> Result<Top<'_>, InjectError> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Top<'de>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Top<'de>, A::Error> {
            let mut top = Top { members: 0, nvext: None };
            while let Some(k) = map.next_key::<Cow<'de, str>>()? {
                top.members += 1;
                if k == NVEXT {
                    top.nvext = Some(map.next_value::<&'de RawValue>()?);
                } else {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            Ok(top)
        }
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let top = (&mut de).deserialize_map(V).map_err(|e| InjectError(e.to_string()))?;
    de.end().map_err(|e| InjectError(e.to_string()))?;
    Ok(top)
}

fn members(raw: &[u8]) -> Result<Vec<(String, &RawValue)>, InjectError> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Vec<(String, &'de RawValue)>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some((k, v)) = map.next_entry::<String, &'de RawValue>()? {
                out.push((k, v));
            }
            Ok(out)
        }
    }
    let mut de = serde_json::Deserializer::from_slice(raw);
    (&mut de).deserialize_map(V).map_err(|e| InjectError(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inj(body: &str) -> String {
        String::from_utf8(inject_token_data(body.as_bytes(), &[1, 23, 4294967295], false).unwrap()).unwrap()
    }

    #[test]
    fn creates_nvext_keeping_every_other_byte() {
        let body = "{ \"model\" :\"m\", \"seed\": 12345678901234567890123, \"t\":1.0e0 ,\"s\":\"\\u00e9\" }\n";
        assert_eq!(
            inj(body),
            "{ \"model\" :\"m\", \"seed\": 12345678901234567890123, \"t\":1.0e0 ,\"s\":\"\\u00e9\" ,\"nvext\":{\"token_data\":[1,23,4294967295]}}\n"
        );
        assert_eq!(inj("{}"), r#"{"nvext":{"token_data":[1,23,4294967295]}}"#);
        // Told there is no nvext: the same bytes without scanning for one.
        let told = inject_token_data(body.as_bytes(), &[1, 23, 4294967295], true).unwrap();
        assert_eq!(String::from_utf8(told).unwrap(), inj(body));
    }

    #[test]
    fn merges_into_an_existing_nvext_and_replaces_a_stale_token_data() {
        let body = r#"{"nvext": {"backend_instance_id": 18446744073709551615, "agent_hints": {"latency_sensitivity": 0.50}, "token_data": [9]}, "x": 1}"#;
        assert_eq!(
            inj(body),
            r#"{"nvext": {"backend_instance_id":18446744073709551615,"agent_hints":{"latency_sensitivity": 0.50},"token_data":[1,23,4294967295]}, "x": 1}"#
        );
        assert_eq!(inj(r#"{"nvext":{}}"#), r#"{"nvext":{"token_data":[1,23,4294967295]}}"#);
        assert_eq!(inj(r#"{"nvext":null,"a":[]}"#), r#"{"nvext":{"token_data":[1,23,4294967295]},"a":[]}"#);
    }

    #[test]
    fn the_result_is_json_with_only_token_data_added() {
        let body = r#"{"model":"m","messages":[{"role":"user","content":"}{\"nvext\""}],"nvext":{"cache_salt":"t"}}"#;
        let v: serde_json::Value = serde_json::from_str(&inj(body)).unwrap();
        let mut want: serde_json::Value = serde_json::from_str(body).unwrap();
        want["nvext"]["token_data"] = serde_json::json!([1, 23, 4294967295u32]);
        assert_eq!(v, want);
    }
}
