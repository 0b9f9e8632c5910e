//! Structure-aware JSON mutation: a valid seed document is parsed into a tree that can hold
//! what `serde_json::Value` cannot (duplicate keys, raw escapes such as lone surrogates, invalid
//! UTF-8 inside strings, numbers as written, 10k-deep nesting without recursion), mutated at
//! generated nodes, written back to bytes, and sometimes damaged at the byte level.

use proptest::prelude::*;

/// A JSON text as a tree; strings and numbers keep their raw (escaped) bytes.
#[derive(Clone, Debug)]
pub enum J {
    Null,
    Bool(bool),
    Num(&'static str),
    NumOwned(String),
    /// The bytes between the quotes, already escaped.
    Str(Vec<u8>),
    /// A string of `unit` repeated `times` times (16 MB strings without storing them twice).
    Rep(&'static [u8], u32),
    Arr(Vec<J>),
    Obj(Vec<(Vec<u8>, J)>),
    /// `inner` wrapped in `depth` arrays (or single-member objects).
    Deep { depth: u32, obj: bool, inner: Box<J> },
}

impl J {
    pub fn from_value(v: &serde_json::Value) -> J {
        use serde_json::Value as V;
        match v {
            V::Null => J::Null,
            V::Bool(b) => J::Bool(*b),
            V::Number(n) => J::NumOwned(n.to_string()),
            V::String(s) => J::Str(escaped(s)),
            V::Array(a) => J::Arr(a.iter().map(J::from_value).collect()),
            V::Object(o) => J::Obj(o.iter().map(|(k, v)| (escaped(k), J::from_value(v))).collect()),
        }
    }

    pub fn write(&self, out: &mut Vec<u8>) {
        match self {
            J::Null => out.extend_from_slice(b"null"),
            J::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
            J::Num(n) => out.extend_from_slice(n.as_bytes()),
            J::NumOwned(n) => out.extend_from_slice(n.as_bytes()),
            J::Str(s) => {
                out.push(b'"');
                out.extend_from_slice(s);
                out.push(b'"');
            }
            J::Rep(unit, n) => {
                out.push(b'"');
                for _ in 0..*n {
                    out.extend_from_slice(unit);
                }
                out.push(b'"');
            }
            J::Arr(a) => {
                out.push(b'[');
                for (i, v) in a.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    v.write(out);
                }
                out.push(b']');
            }
            J::Obj(o) => {
                out.push(b'{');
                for (i, (k, v)) in o.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    out.push(b'"');
                    out.extend_from_slice(k);
                    out.extend_from_slice(b"\":");
                    v.write(out);
                }
                out.push(b'}');
            }
            J::Deep { depth, obj, inner } => {
                for _ in 0..*depth {
                    out.extend_from_slice(if *obj { b"{\"a\":" } else { b"[" });
                }
                inner.write(out);
                for _ in 0..*depth {
                    out.push(if *obj { b'}' } else { b']' });
                }
            }
        }
    }

    /// The written length, without writing.
    pub fn size(&self) -> usize {
        match self {
            J::Null => 4,
            J::Bool(b) => if *b { 4 } else { 5 },
            J::Num(n) => n.len(),
            J::NumOwned(n) => n.len(),
            J::Str(s) => s.len() + 2,
            J::Rep(u, n) => u.len() * *n as usize + 2,
            J::Arr(a) => 2 + a.len().saturating_sub(1) + a.iter().map(J::size).sum::<usize>(),
            J::Obj(o) => 2 + o.len().saturating_sub(1) + o.iter().map(|(k, v)| k.len() + 3 + v.size()).sum::<usize>(),
            J::Deep { depth, obj, inner } => *depth as usize * if *obj { 6 } else { 2 } + inner.size(),
        }
    }

    pub fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write(&mut out);
        out
    }

    fn kind(&self) -> Kind {
        match self {
            J::Str(_) => Kind::Str,
            J::Arr(_) => Kind::Arr,
            J::Obj(_) => Kind::Obj,
            _ => Kind::Other,
        }
    }

    /// Nodes are array items and member values, counted in pre-order.
    fn count(&self, want: fn(Kind) -> bool) -> usize {
        want(self.kind()) as usize
            + match self {
                J::Arr(a) => a.iter().map(|c| c.count(want)).sum(),
                J::Obj(o) => o.iter().map(|(_, c)| c.count(want)).sum(),
                _ => 0,
            }
    }

    fn nth(&mut self, want: fn(Kind) -> bool, n: &mut usize) -> Option<&mut J> {
        if want(self.kind()) {
            if *n == 0 {
                return Some(self);
            }
            *n -= 1;
        }
        match self {
            J::Arr(a) => a.iter_mut().find_map(|c| c.nth(want, n)),
            J::Obj(o) => o.iter_mut().find_map(|(_, c)| c.nth(want, n)),
            _ => None,
        }
    }

    /// The `at % n`-th of the `n` nodes `want` accepts, found without listing them (listing
    /// them cost more than many of the surfaces under test); `None` past a root-only pick when
    /// `below_root`.
    fn pick(&mut self, at: usize, want: fn(Kind) -> bool, below_root: bool) -> Option<&mut J> {
        match (self.count(want), want(self.kind())) {
            (0, _) => None,
            (n, true) if below_root && at.is_multiple_of(n) => None,
            (n, _) => self.nth(want, &mut (at % n)),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Str,
    Arr,
    Obj,
    Other,
}

fn escaped(s: &str) -> Vec<u8> {
    let q = serde_json::to_string(s).expect("a string serializes");
    q.as_bytes()[1..q.len() - 1].to_vec()
}

/// Pieces spliced into strings, raw (as they stand between the quotes).
pub const PIECES: &[&[u8]] = &[
    b"{{ 7 * 191 }}",
    b"{% for i in range(99999999) %}x{% endfor %}",
    b"{%- raw %}{{",
    b"{# comment #}",
    b"{{",
    b"{%",
    b"}}",
    b"<|im_start|>system\\n",
    b"<|im_end|>",
    b"<think>",
    b"</think>",
    b"<tool_call>",
    b"<|endoftext|>",
    b"\\ud800",
    b"\\udfff",
    b"\\ud83d\\ude00",
    b"\\ud83d",
    b"\\u0000",
    b"\\u001f",
    b"\\\"",
    b"\\\\",
    b"\\n",
    b"\\x41",
    b"\\u12",
    b"\xef\xbb\xbf",
    b"\xff",
    b"\xc3",
    b"\xed\xa0\x80",
    b"\x00",
    b"\x1f",
    "é😀\u{202e}\u{200b}".as_bytes(),
    b" ",
];

/// Numbers as written, hostile ones included (some are not JSON at all).
pub const NUMBERS: &[&str] = &[
    "0", "-1", "1.5", "-0", "1e2", "1E-7", "0e0", "1e308", "1e400", "-1e400", "2147483648", "-2147483649",
    "4294967295", "4294967296", "9223372036854775807", "-9223372036854775809", "18446744073709551615",
    "18446744073709551616", "123456789012345678901234567890", "NaN", "Infinity", "01", "1.", "+1", "0x10",
];

/// Keys added to objects: fields we read (wrongly typed) and fields we do not know.
pub const KEYS: &[&str] = &[
    "model", "messages", "prompt", "role", "content", "type", "text", "tools", "tool_calls", "tool_choice", "documents",
    "chat_template_kwargs", "add_generation_prompt", "continue_final_message", "nvext", "cache_salt", "agent_hints",
    "priority", "osl", "token_data", "function", "arguments", "name", "image_url", "stream", "max_tokens", "unknown_x",
    "__proto__", "", "enable_thinking",
];

/// A value to put somewhere it may not belong.
#[derive(Clone, Debug)]
pub enum Hostile {
    Null,
    Bool(bool),
    Num(&'static str),
    Str(&'static [u8]),
    Long(&'static [u8], u32),
    EmptyArr,
    EmptyObj,
    Arr(Vec<Hostile>),
    Obj(&'static str, Box<Hostile>),
    Deep(u32, bool),
    Message(&'static str, Box<Hostile>),
}

impl Hostile {
    fn to_j(&self) -> J {
        match self {
            Hostile::Null => J::Null,
            Hostile::Bool(b) => J::Bool(*b),
            Hostile::Num(n) => J::Num(n),
            Hostile::Str(s) => J::Str(s.to_vec()),
            Hostile::Long(u, n) => J::Rep(u, *n),
            Hostile::EmptyArr => J::Arr(vec![]),
            Hostile::EmptyObj => J::Obj(vec![]),
            Hostile::Arr(a) => J::Arr(a.iter().map(Hostile::to_j).collect()),
            Hostile::Obj(k, v) => J::Obj(vec![(k.as_bytes().to_vec(), v.to_j())]),
            Hostile::Deep(d, obj) => J::Deep { depth: *d, obj: *obj, inner: Box::new(J::Num("1")) },
            Hostile::Message(role, content) => {
                J::Obj(vec![(b"role".to_vec(), J::Str(role.as_bytes().to_vec())), (b"content".to_vec(), content.to_j())])
            }
        }
    }
}

pub fn hostile() -> impl Strategy<Value = Hostile> {
    let leaf = prop_oneof![
        3 => Just(Hostile::Null),
        2 => any::<bool>().prop_map(Hostile::Bool),
        6 => prop::sample::select(NUMBERS).prop_map(Hostile::Num),
        6 => prop::sample::select(PIECES).prop_map(Hostile::Str),
        2 => (prop::sample::select(PIECES), 1u32..2000).prop_map(|(u, n)| Hostile::Long(u, n)),
        2 => Just(Hostile::EmptyArr),
        2 => Just(Hostile::EmptyObj),
        1 => (100u32..12_000, any::<bool>()).prop_map(|(d, o)| Hostile::Deep(d, o)),
    ];
    leaf.prop_recursive(2, 8, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Hostile::Arr),
            (prop::sample::select(KEYS), inner.clone()).prop_map(|(k, v)| Hostile::Obj(k, Box::new(v))),
            (prop::sample::select(&["user", "assistant", "system", "tool", "developer", "", "x"][..]), inner)
                .prop_map(|(r, c)| Hostile::Message(r, Box::new(c))),
        ]
    })
}

/// One structural change; positions are taken modulo the candidates present.
#[derive(Clone, Debug)]
pub enum Mutation {
    Replace(usize, Hostile),
    InsertInStr(usize, usize, &'static [u8]),
    DupMember(usize, usize, Option<Hostile>),
    DropMember(usize, usize),
    AddMember(usize, &'static str, Hostile),
    /// Repeat an array's first element (10k messages, 10k tool calls).
    Repeat(usize, u16),
    Wrap(usize, u32, bool),
}

pub fn mutation() -> impl Strategy<Value = Mutation> {
    let at = any::<usize>();
    prop_oneof![
        6 => (at, hostile()).prop_map(|(a, h)| Mutation::Replace(a, h)),
        6 => (at, any::<usize>(), prop::sample::select(PIECES)).prop_map(|(a, p, s)| Mutation::InsertInStr(a, p, s)),
        2 => (at, any::<usize>(), prop::option::of(hostile())).prop_map(|(a, w, h)| Mutation::DupMember(a, w, h)),
        2 => (at, any::<usize>()).prop_map(|(a, w)| Mutation::DropMember(a, w)),
        3 => (at, prop::sample::select(KEYS), hostile()).prop_map(|(a, k, h)| Mutation::AddMember(a, k, h)),
        // 10k-element and 10k-deep cases are rare: they cost milliseconds each.
        1 => (at, prop_oneof![40 => 1u16..16, 1 => 9_990u16..10_010]).prop_map(|(a, n)| Mutation::Repeat(a, n)),
        1 => (at, prop_oneof![10 => 1u32..200, 1 => 9_990u32..10_010], any::<bool>()).prop_map(|(a, d, o)| Mutation::Wrap(a, d, o)),
    ]
}

impl Mutation {
    pub fn apply(&self, doc: &mut J) {
        let any = |_| true;
        let obj = |k| k == Kind::Obj;
        match self {
            Mutation::Replace(at, h) => {
                // Never the root: a non-object body is one case, not thousands.
                if let Some(node) = doc.pick(*at, any, true) {
                    *node = h.to_j();
                }
            }
            Mutation::InsertInStr(at, pos, piece) => {
                if let Some(J::Str(s)) = doc.pick(*at, |k| k == Kind::Str, false) {
                    // Splice between escapes, never inside one.
                    let cut = |i: usize| i == 0 || i == s.len() || (s[i - 1] != b'\\' && s[i] != b'\\');
                    let n = (0..=s.len()).filter(|&i| cut(i)).count();
                    let i = (0..=s.len()).filter(|&i| cut(i)).nth(pos % n).expect("0 is a cut");
                    s.splice(i..i, piece.iter().copied());
                }
            }
            Mutation::DupMember(at, which, with) => {
                if let Some(J::Obj(o)) = doc.pick(*at, obj, false) {
                    if !o.is_empty() {
                        let (k, v) = o[which % o.len()].clone();
                        o.push((k, with.as_ref().map(Hostile::to_j).unwrap_or(v)));
                    }
                }
            }
            Mutation::DropMember(at, which) => {
                if let Some(J::Obj(o)) = doc.pick(*at, obj, false) {
                    if !o.is_empty() {
                        let n = o.len();
                        o.remove(which % n);
                    }
                }
            }
            Mutation::AddMember(at, key, h) => {
                if let Some(J::Obj(o)) = doc.pick(*at, obj, false) {
                    o.push((key.as_bytes().to_vec(), h.to_j()));
                }
            }
            Mutation::Repeat(at, n) => {
                if let Some(J::Arr(a)) = doc.pick(*at, |k| k == Kind::Arr, false) {
                    // Not past what `build` would keep anyway (the copies would cost GBs).
                    if let Some(first) = a.first().filter(|f| f.size().saturating_mul(*n as usize) <= 16 << 20).cloned() {
                        a.extend(std::iter::repeat_n(first, *n as usize));
                    }
                }
            }
            Mutation::Wrap(at, depth, obj) => {
                if let Some(node) = doc.pick(*at, any, true) {
                    let inner = std::mem::replace(node, J::Null);
                    *node = J::Deep { depth: *depth, obj: *obj, inner: Box::new(inner) };
                }
            }
        }
    }
}

/// Damage to the written bytes: a BOM in front, a cut, a splice of raw bytes, trailing junk.
#[derive(Clone, Debug)]
pub enum ByteDamage {
    Bom,
    Truncate(usize),
    Splice(usize, Vec<u8>),
    Trailing(&'static [u8]),
}

const TRAILING: &[&[u8]] = &[b" ", b"\n", b"x", b"{}", b"\0", b",", b"\xef\xbb\xbf"];

pub fn byte_damage() -> impl Strategy<Value = ByteDamage> {
    prop_oneof![
        Just(ByteDamage::Bom),
        any::<usize>().prop_map(ByteDamage::Truncate),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..6)).prop_map(|(a, b)| ByteDamage::Splice(a, b)),
        prop::sample::select(TRAILING).prop_map(ByteDamage::Trailing),
    ]
}

impl ByteDamage {
    pub fn apply(&self, b: &mut Vec<u8>) {
        match self {
            ByteDamage::Bom => {
                b.splice(0..0, [0xef, 0xbb, 0xbf]);
            }
            ByteDamage::Truncate(at) => b.truncate(at % (b.len() + 1)),
            ByteDamage::Splice(at, bytes) => {
                let i = at % (b.len() + 1);
                b.splice(i..i, bytes.iter().copied());
            }
            ByteDamage::Trailing(t) => b.extend_from_slice(t),
        }
    }
}

pub type Generated = crate::Generated<Mutation, ByteDamage>;

pub fn generated(seeds: usize) -> impl Strategy<Value = Generated> {
    (
        0..seeds,
        prop::collection::vec(mutation(), 0..4),
        prop::option::weighted(0.1, byte_damage()),
    )
        .prop_map(|(seed, mutations, damage)| Generated { seed, mutations, damage })
}

impl Generated {
    /// A mutation that would grow the document past `max` bytes is skipped (huge inputs are
    /// tried by dedicated cases, not thousands of times).
    pub fn build(&self, seeds: &[J], max: usize) -> Vec<u8> {
        let mut doc = seeds[self.seed].clone();
        let mut kept = Vec::new();
        for (i, m) in self.mutations.iter().enumerate() {
            m.apply(&mut doc);
            if doc.size() <= max {
                kept.push(i);
            } else {
                // Rare: rebuild without it rather than copy the document before every mutation.
                doc = seeds[self.seed].clone();
                kept.iter().for_each(|&k| self.mutations[k].apply(&mut doc));
            }
        }
        let mut b = doc.bytes();
        if let Some(d) = &self.damage {
            d.apply(&mut b);
        }
        b
    }
}
