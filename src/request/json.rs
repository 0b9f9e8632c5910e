//! JSON in and out the way Python sees it: bodies parse into template values with object key
//! order kept (as `json.loads` keeps it), and `tojson` writes what `json.dumps` writes, so tool
//! schemas render byte-for-byte like Hugging Face's `apply_chat_template`.

use std::fmt::{self, Write};

use minijinja::value::{Value, ValueKind};
use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

/// Parses a JSON document into a template value, keeping object key order.
pub fn parse(body: &[u8]) -> Result<Value, serde_json::Error> {
    serde_json::from_slice::<Ordered>(body).map(|o| o.0)
}

struct Ordered(Value);

impl<'de> Deserialize<'de> for Ordered {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(OrderedVisitor).map(Ordered)
    }
}

struct OrderedVisitor;

impl<'de> Visitor<'de> for OrderedVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::from(()))
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::from(()))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(Ordered(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(Value::from(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut pairs: Vec<(Value, Value)> = Vec::with_capacity(map.size_hint().unwrap_or(0).min(4096));
        while let Some((k, Ordered(v))) = map.next_entry::<String, Ordered>()? {
            pairs.push((Value::from(k), v));
        }
        // A repeated key keeps its first position and its last value, as a Python dict does.
        Ok(Value::from_pairs(pairs))
    }
}

/// `json.dumps` options the HF `tojson` filter exposes.
#[derive(Clone, Debug, Default)]
pub struct DumpOptions {
    pub ensure_ascii: bool,
    pub indent: Option<String>,
    pub separators: Option<(String, String)>,
    pub sort_keys: bool,
}

/// Writes `v` exactly as Python's `json.dumps(v, **opts)` would.
pub fn dumps(v: &Value, opts: &DumpOptions) -> Result<String, String> {
    let (item_sep, key_sep) = match (&opts.separators, &opts.indent) {
        (Some((a, b)), _) => (a.as_str(), b.as_str()),
        (None, None) => (", ", ": "),
        (None, Some(_)) => (",", ": "),
    };
    let mut out = String::new();
    let w = Writer { opts, item_sep, key_sep };
    w.value(&mut out, v, 0)?;
    Ok(out)
}

struct Writer<'a> {
    opts: &'a DumpOptions,
    item_sep: &'a str,
    key_sep: &'a str,
}

impl Writer<'_> {
    fn newline(&self, out: &mut String, depth: usize) {
        if let Some(ind) = &self.opts.indent {
            out.push('\n');
            for _ in 0..depth {
                out.push_str(ind);
            }
        }
    }

    fn value(&self, out: &mut String, v: &Value, depth: usize) -> Result<(), String> {
        match v.kind() {
            ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number => number(out, v),
            ValueKind::String => string(out, v.as_str().unwrap_or_default(), self.opts.ensure_ascii),
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = v.try_iter().map_err(|e| e.to_string())?.collect();
                if items.is_empty() {
                    out.push_str("[]");
                    return Ok(());
                }
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(self.item_sep);
                    }
                    self.newline(out, depth + 1);
                    self.value(out, item, depth + 1)?;
                }
                self.newline(out, depth);
                out.push(']');
            }
            ValueKind::Map => {
                let mut keys: Vec<Value> = v.try_iter().map_err(|e| e.to_string())?.collect();
                if keys.is_empty() {
                    out.push_str("{}");
                    return Ok(());
                }
                if self.opts.sort_keys {
                    keys.sort_by(|a, b| key_text(a).cmp(&key_text(b)));
                }
                out.push('{');
                for (i, k) in keys.iter().enumerate() {
                    if i > 0 {
                        out.push_str(self.item_sep);
                    }
                    self.newline(out, depth + 1);
                    string(out, &key_text(k), self.opts.ensure_ascii);
                    out.push_str(self.key_sep);
                    let item = v.get_item(k).map_err(|e| e.to_string())?;
                    self.value(out, &item, depth + 1)?;
                }
                self.newline(out, depth);
                out.push('}');
            }
            ValueKind::Undefined => return Err("Object of type Undefined is not JSON serializable".into()),
            other => return Err(format!("Object of type {other} is not JSON serializable")),
        }
        Ok(())
    }
}

/// Python turns non-string keys into their JSON text (`1` → `"1"`, `True` → `"true"`).
fn key_text(k: &Value) -> String {
    match k.kind() {
        ValueKind::String => k.as_str().unwrap_or_default().to_string(),
        ValueKind::None => "null".into(),
        ValueKind::Bool => (if k.is_true() { "true" } else { "false" }).into(),
        _ => {
            let mut s = String::new();
            number(&mut s, k);
            s
        }
    }
}

fn number(out: &mut String, v: &Value) {
    if v.is_integer() {
        let _ = write!(out, "{v}");
        return;
    }
    match f64::try_from(v.clone()) {
        Ok(f) => out.push_str(&py_float_repr(f)),
        Err(_) => {
            let _ = write!(out, "{v}");
        }
    }
}

/// Python's `repr(float)`: shortest round-trip digits, positional for exponents in [-4, 16),
/// else scientific with a signed, at least two-digit exponent; `NaN`/`Infinity` as `json` writes.
pub fn py_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity".into() } else { "-Infinity".into() };
    }
    if f == 0.0 {
        return if f.is_sign_negative() { "-0.0".into() } else { "0.0".into() };
    }
    // Rust's `{:e}` gives the shortest round-trip digits: "-1.2345e-7".
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').expect("{:e} has an exponent");
    let exp: i32 = exp.parse().expect("integer exponent");
    let (sign, mantissa) = mantissa.strip_prefix('-').map_or(("", mantissa), |m| ("-", m));
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exp) {
        let point = exp + 1; // digits before the decimal point
        let s = if point <= 0 {
            format!("0.{}{}", "0".repeat((-point) as usize), digits)
        } else if point as usize >= digits.len() {
            format!("{}{}.0", digits, "0".repeat(point as usize - digits.len()))
        } else {
            format!("{}.{}", &digits[..point as usize], &digits[point as usize..])
        };
        format!("{sign}{s}")
    } else {
        let m = if digits.len() > 1 { format!("{}.{}", &digits[..1], &digits[1..]) } else { digits };
        let es = if exp < 0 { '-' } else { '+' };
        format!("{sign}{m}e{es}{:02}", exp.abs())
    }
}

fn string(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c if ensure_ascii && !c.is_ascii() => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn py(json: &str) -> String {
        dumps(&parse(json.as_bytes()).unwrap(), &DumpOptions::default()).unwrap()
    }

    #[test]
    fn dumps_like_python_json_dumps() {
        // Expected strings are what CPython 3.11 `json.dumps(json.loads(x))` prints.
        assert_eq!(py(r#"{"b":1,"a":[1,2.5,{"x":null}],"c":true}"#), r#"{"b": 1, "a": [1, 2.5, {"x": null}], "c": true}"#);
        assert_eq!(py(r#"{"s":"é<>&'\"\\\n\u0001"}"#), "{\"s\": \"é<>&'\\\"\\\\\\n\\u0001\"}");
        assert_eq!(py("[[],{}]"), "[[], {}]");
        assert_eq!(py(r#"{"a":1,"a":2}"#), r#"{"a": 2}"#);
        let ascii = DumpOptions { ensure_ascii: true, ..Default::default() };
        assert_eq!(dumps(&Value::from("é😀"), &ascii).unwrap(), r#""\u00e9\ud83d\ude00""#);
        let indented = DumpOptions { indent: Some("  ".into()), ..Default::default() };
        assert_eq!(dumps(&parse(br#"{"a":[1],"b":{}}"#).unwrap(), &indented).unwrap(), "{\n  \"a\": [\n    1\n  ],\n  \"b\": {}\n}");
        let sorted = DumpOptions { sort_keys: true, ..Default::default() };
        assert_eq!(dumps(&parse(br#"{"b":1,"a":2}"#).unwrap(), &sorted).unwrap(), r#"{"a": 2, "b": 1}"#);
    }

    #[test]
    fn floats_print_as_python_repr() {
        // From CPython: repr(x) for each x.
        for (x, want) in [
            (1.0, "1.0"),
            (0.1, "0.1"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (123456789.125, "123456789.125"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (-2.5e-7, "-2.5e-07"),
            (1.5e300, "1.5e+300"),
            (-0.0, "-0.0"),
        ] {
            assert_eq!(py_float_repr(x), want, "{x}");
        }
    }
}
