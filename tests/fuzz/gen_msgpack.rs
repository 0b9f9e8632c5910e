//! Structure-aware msgpack mutation over `rmpv::Value` trees: nodes replaced by wrongly typed or
//! extreme values, map entries duplicated, dropped or added (known keys with wrong types),
//! arrays repeated; then byte damage (cuts, splices, a 10k-deep array prefix).

use proptest::prelude::*;
use rmpv::Value;

pub use crate::kv_examples::{enc, map, s};

/// Keys the decoders read (Dynamo's and the engines' field names), plus strangers.
pub const KEYS: &[&str] = &[
    "worker_id", "storage_tier", "residency_domain", "event", "event_id", "data", "stored", "removed", "cleared",
    "parent_hash", "start_position", "blocks", "block_hash", "tokens_hash", "mm_extra_info", "block_hashes", "dp_rank",
    "publisher_id", "sequence", "published_at", "topic", "payload", "type", "token_ids", "block_size", "lora_id",
    "lora_name", "medium", "extra_keys", "parent_block_hash", "events", "ts", "data_parallel_rank", "request_id",
    "worker", "router_id", "AddRequest", "Free", "MarkPrefillCompleted", "token_sequence", "track_prefill_tokens",
    "expected_output_tokens", "prefill_load_hint", "initial_effective_prefill_tokens", "BlockStored", "BlockRemoved",
    "AllBlocksCleared", "x",
];

#[derive(Clone, Debug)]
pub enum Hostile {
    Nil,
    Bool(bool),
    U(u64),
    I(i64),
    F(f64),
    Str(&'static str),
    Bin(Vec<u8>),
    Ext(i8, Vec<u8>),
    Arr(Vec<Hostile>),
    Map(Vec<(Hostile, Hostile)>),
    /// An array of `n` copies of a small value (a 10k-block store).
    Many(u16, Box<Hostile>),
}

impl Hostile {
    pub fn to_value(&self) -> Value {
        match self {
            Hostile::Nil => Value::Nil,
            Hostile::Bool(b) => Value::Boolean(*b),
            Hostile::U(u) => Value::from(*u),
            Hostile::I(i) => Value::from(*i),
            Hostile::F(f) => Value::F64(*f),
            Hostile::Str(x) => s(x),
            Hostile::Bin(b) => Value::Binary(b.clone()),
            Hostile::Ext(t, b) => Value::Ext(*t, b.clone()),
            Hostile::Arr(a) => Value::Array(a.iter().map(Hostile::to_value).collect()),
            Hostile::Map(m) => Value::Map(m.iter().map(|(k, v)| (k.to_value(), v.to_value())).collect()),
            Hostile::Many(n, v) => {
                // Large only around a leaf: nested repeats would multiply.
                let nested = matches!(**v, Hostile::Arr(_) | Hostile::Map(_) | Hostile::Many(..));
                let n = if nested { (*n).min(8) } else { *n };
                Value::Array(vec![v.to_value(); n as usize])
            }
        }
    }
}

pub fn hostile() -> impl Strategy<Value = Hostile> {
    let u = prop_oneof![
        Just(0u64),
        Just(1),
        Just(u32::MAX as u64),
        Just(u32::MAX as u64 + 1),
        Just(i64::MAX as u64),
        Just(u64::MAX),
        0u64..64,
        any::<u64>()
    ];
    let leaf = prop_oneof![
        2 => Just(Hostile::Nil),
        1 => any::<bool>().prop_map(Hostile::Bool),
        5 => u.prop_map(Hostile::U),
        2 => prop_oneof![Just(-1i64), Just(i64::MIN), Just(i32::MIN as i64), -64i64..0].prop_map(Hostile::I),
        1 => prop_oneof![Just(f64::NAN), Just(f64::INFINITY), Just(-1.5), Just(1e300), any::<f64>()].prop_map(Hostile::F),
        3 => prop::sample::select(KEYS).prop_map(Hostile::Str),
        1 => prop::sample::select(&["", "device", "host_pinned", "disk", "GPU", "CPU", "worker", "\u{0}", "dynamo-cache-salt:x"][..]).prop_map(Hostile::Str),
        2 => prop::collection::vec(any::<u8>(), 0..40).prop_map(Hostile::Bin),
        1 => (any::<i8>(), prop::collection::vec(any::<u8>(), 0..9)).prop_map(|(t, b)| Hostile::Ext(t, b)),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Hostile::Arr),
            prop::collection::vec((prop::sample::select(KEYS).prop_map(Hostile::Str), inner.clone()), 0..5).prop_map(Hostile::Map),
            (prop_oneof![20 => 0u16..70, 1 => 9_000u16..11_000], inner).prop_map(|(n, v)| Hostile::Many(n, Box::new(v))),
        ]
    })
}

#[derive(Clone, Debug)]
pub enum Mutation {
    Replace(usize, Hostile),
    DupEntry(usize, usize),
    DropEntry(usize, usize),
    AddEntry(usize, &'static str, Hostile),
    Repeat(usize, u16),
    Truncate(usize, usize),
}

pub fn mutation() -> impl Strategy<Value = Mutation> {
    let at = any::<usize>();
    prop_oneof![
        8 => (at, hostile()).prop_map(|(a, h)| Mutation::Replace(a, h)),
        2 => (at, any::<usize>()).prop_map(|(a, w)| Mutation::DupEntry(a, w)),
        3 => (at, any::<usize>()).prop_map(|(a, w)| Mutation::DropEntry(a, w)),
        3 => (at, prop::sample::select(KEYS), hostile()).prop_map(|(a, k, h)| Mutation::AddEntry(a, k, h)),
        1 => (at, prop_oneof![20 => 1u16..8, 1 => 9_990u16..10_010]).prop_map(|(a, n)| Mutation::Repeat(a, n)),
        2 => (at, any::<usize>()).prop_map(|(a, n)| Mutation::Truncate(a, n)),
    ]
}

/// Counts the bytes `rmpv` writes for a value, without writing them.
struct Counter(usize);

impl std::io::Write for Counter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0 += b.len();
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn encoded_len(v: &Value) -> usize {
    let mut c = Counter(0);
    rmpv::encode::write_value(&mut c, v).expect("counting cannot fail");
    c.0
}

/// Nodes are map values and array items (keys are replaced via entries), counted in pre-order.
fn count(v: &Value, want: fn(&Value) -> bool) -> usize {
    want(v) as usize
        + match v {
            Value::Array(a) => a.iter().map(|c| count(c, want)).sum(),
            Value::Map(m) => m.iter().map(|(_, c)| count(c, want)).sum(),
            _ => 0,
        }
}

fn nth<'a>(v: &'a mut Value, want: fn(&Value) -> bool, n: &mut usize) -> Option<&'a mut Value> {
    if want(v) {
        if *n == 0 {
            return Some(v);
        }
        *n -= 1;
    }
    match v {
        Value::Array(a) => a.iter_mut().find_map(|c| nth(c, want, n)),
        Value::Map(m) => m.iter_mut().find_map(|(_, c)| nth(c, want, n)),
        _ => None,
    }
}

/// The `i % n`-th of the `n` nodes `want` accepts (found without listing them: this generator,
/// not the decoders, was most of the KV surfaces' time).
fn pick(root: &mut Value, i: usize, want: fn(&Value) -> bool) -> Option<&mut Value> {
    match count(root, want) {
        0 => None,
        n => nth(root, want, &mut (i % n)),
    }
}

impl Mutation {
    pub fn apply(&self, root: &mut Value) {
        let is_map = |v: &Value| matches!(v, Value::Map(_));
        let is_arr = |v: &Value| matches!(v, Value::Array(_));
        let is_any = |_: &Value| true;
        match self {
            Mutation::Replace(i, h) => {
                if let Some(v) = pick(root, *i, is_any) {
                    *v = h.to_value();
                }
            }
            Mutation::DupEntry(i, w) => {
                if let Some(Value::Map(m)) = pick(root, *i, is_map) {
                    if !m.is_empty() {
                        let e = m[w % m.len()].clone();
                        m.push(e);
                    }
                }
            }
            Mutation::DropEntry(i, w) => {
                if let Some(v) = pick(root, *i, |v| matches!(v, Value::Map(m) if !m.is_empty()) || matches!(v, Value::Array(a) if !a.is_empty())) {
                    match v {
                        Value::Map(m) => {
                            let n = m.len();
                            m.remove(w % n);
                        }
                        Value::Array(a) => {
                            let n = a.len();
                            a.remove(w % n);
                        }
                        _ => {}
                    }
                }
            }
            Mutation::AddEntry(i, k, h) => {
                if let Some(Value::Map(m)) = pick(root, *i, is_map) {
                    m.push((s(k), h.to_value()));
                }
            }
            Mutation::Repeat(i, n) => {
                if let Some(Value::Array(a)) = pick(root, *i, is_arr) {
                    // Not past what `value` would keep anyway (the copies would cost GBs).
                    if let Some(first) = a.first().filter(|f| encoded_len(f).saturating_mul(*n as usize) <= 1 << 20).cloned() {
                        a.extend(std::iter::repeat_n(first, *n as usize));
                    }
                }
            }
            Mutation::Truncate(i, n) => {
                if let Some(Value::Array(a)) = pick(root, *i, is_arr) {
                    let keep = n % (a.len() + 1);
                    a.truncate(keep);
                }
            }
        }
    }
}

/// Damage to encoded bytes.
#[derive(Clone, Debug)]
pub enum ByteDamage {
    Truncate(usize),
    Splice(usize, Vec<u8>),
    Flip(usize, u8),
    /// `depth` one-element arrays around the whole value.
    Deep(u32),
}

pub fn byte_damage() -> impl Strategy<Value = ByteDamage> {
    prop_oneof![
        any::<usize>().prop_map(ByteDamage::Truncate),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..9)).prop_map(|(a, b)| ByteDamage::Splice(a, b)),
        (any::<usize>(), 1u8..=255).prop_map(|(a, x)| ByteDamage::Flip(a, x)),
        prop_oneof![1u32..100, 1_000u32..12_000].prop_map(ByteDamage::Deep),
    ]
}

impl ByteDamage {
    pub fn apply(&self, b: &mut Vec<u8>) {
        match self {
            ByteDamage::Truncate(at) => b.truncate(at % (b.len() + 1)),
            ByteDamage::Splice(at, bytes) => {
                let i = at % (b.len() + 1);
                b.splice(i..i, bytes.iter().copied());
            }
            ByteDamage::Flip(at, x) => {
                if !b.is_empty() {
                    let n = b.len();
                    b[at % n] ^= x;
                }
            }
            ByteDamage::Deep(d) => {
                b.splice(0..0, std::iter::repeat_n(0x91u8, *d as usize));
            }
        }
    }
}

pub type Generated = crate::Generated<Mutation, ByteDamage>;

pub fn generated(seeds: usize) -> impl Strategy<Value = Generated> {
    (0..seeds, prop::collection::vec(mutation(), 0..4), prop::option::weighted(0.15, byte_damage()))
        .prop_map(|(seed, mutations, damage)| Generated { seed, mutations, damage })
}

impl Generated {
    /// A mutation that would grow the encoding past 1 MiB (NATS' default payload limit) is skipped.
    pub fn value(&self, seeds: &[Value]) -> Value {
        let mut v = seeds[self.seed].clone();
        let mut kept = Vec::new();
        for (i, m) in self.mutations.iter().enumerate() {
            m.apply(&mut v);
            if encoded_len(&v) <= 1 << 20 {
                kept.push(i);
            } else {
                // Rare: rebuild without it rather than copy the tree before every mutation.
                v = seeds[self.seed].clone();
                kept.iter().for_each(|&k| self.mutations[k].apply(&mut v));
            }
        }
        v
    }

    pub fn build(&self, seeds: &[Value]) -> Vec<u8> {
        let mut b = enc(&self.value(seeds));
        if let Some(d) = &self.damage {
            d.apply(&mut b);
        }
        b
    }
}
