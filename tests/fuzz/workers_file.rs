//! The workers file (`DYN_EPP_WORKERS_FILE`) through `file::load`: YAML block-style seeds
//! mutated line by line (duplicates, deletions, indentation, anchors and aliases, tags, document
//! markers, raw bytes), and the same documents in JSON flow style (JSON is YAML) mutated as trees.

use std::time::Instant;

use dynamo_epp::{
    router::{RouteError, Router, RoutingRequest},
    workers::{file, Role},
};
use proptest::{prelude::*, test_runner::TestCaseError};
use serde_json::json;

use crate::{gen_json, run, Tally};

const YAML_SEEDS: &[&str] = &[
    "block_size: 16\nworkers:\n  - name: qwen-vllmdecodeworker-0\n    address: 127.0.0.1:18001\n  - name: qwen-vllmdecodeworker-1\n    address: 127.0.0.1:18002\n  - name: standalone-worker\n    address: 127.0.0.1:18003\n    id: 1001\n",
    "block_size: 16\nworkers:\n  - name: p-0\n    address: 10.0.0.1:8000\n    role: prefill\n    id: 1001\n    dp_size: 4\n    dp_start_rank: 2\n    total_kv_blocks: 4096\n    max_num_batched_tokens: 8192\n    kv_events: tcp://10.0.0.1:5557\n    kv_events_replay: tcp://10.0.0.1:6000\n  - name: d-0\n    address: '[::1]:8000'\n    role: decode\n",
    "workers: []\n",
];

/// Lines that YAML parsers have choked on: aliases (and alias bombs), merge keys, tags,
/// document markers, complex keys, tabs, flow collections, long and deep scalars.
const HOSTILE_LINES: &[&str] = &[
    "a: &a [x, x, x, x, x, x, x, x, x]",
    "b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]",
    "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]",
    "d: [*c, *c, *c, *c, *c, *c, *c, *c, *c]",
    "  - &w {name: x, address: 127.0.0.1:1}",
    "  - *w",
    "  - <<: *w",
    "    <<: {id: 5}",
    "    id: !!binary aGVsbG8=",
    "    id: !!str 7",
    "    id: !custom 7",
    "    id: 18446744073709551616",
    "    id: -1",
    "    id: 0x10",
    "    dp_size: 4294967295",
    "    dp_start_rank: 4294967295",
    "    dp_size: 0",
    "    address: 127.0.0.1:99999",
    "    address: localhost:80",
    "    kv_events: tcp://:1",
    "    kv_events: ipc:///tmp/x",
    "    role: leader",
    "    name: ~",
    "    name: [1, 2]",
    "    name: \"\\ud800\"",
    "---",
    "...",
    "%YAML 1.2",
    "? [complex, key]\n: v",
    "\tname: tab",
    "block_size: 0",
    "block_size: -16",
    "block_size: 1e9",
    "workers: {}",
    "workers: null",
    "unknown: 1",
    "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
    "    name: |\n      multi\n      line",
    "# comment",
    "",
];

#[derive(Clone, Debug)]
enum LineOp {
    Dup(usize),
    Delete(usize),
    Indent(usize, u8),
    Insert(usize, &'static str),
    /// The value after a line's colon replaced.
    Value(usize, &'static str),
    Deep(u32),
    Raw(usize, Vec<u8>),
}

fn line_op() -> impl Strategy<Value = LineOp> {
    let at = any::<usize>();
    prop_oneof![
        2 => at.prop_map(LineOp::Dup),
        2 => at.prop_map(LineOp::Delete),
        1 => (at, 0u8..9).prop_map(|(a, n)| LineOp::Indent(a, n)),
        4 => (at, prop::sample::select(HOSTILE_LINES)).prop_map(|(a, l)| LineOp::Insert(a, l)),
        4 => (at, prop::sample::select(&["", "~", "[]", "{}", "-1", "0", "1.5", "true", "\"\"", "*a", "&x 1", "!!null", "'x", "4294967296", "18446744073709551615", "x: y", "- z"][..])).prop_map(|(a, v)| LineOp::Value(a, v)),
        1 => prop_oneof![10u32..100, 5_000u32..20_000].prop_map(LineOp::Deep),
        1 => (at, prop::collection::vec(any::<u8>(), 1..5)).prop_map(|(a, b)| LineOp::Raw(a, b)),
    ]
}

fn apply_lines(seed: &str, ops: &[LineOp]) -> Vec<u8> {
    let mut lines: Vec<Vec<u8>> = seed.lines().map(|l| l.as_bytes().to_vec()).collect();
    for op in ops {
        let n = lines.len().max(1);
        match op {
            LineOp::Dup(i) if !lines.is_empty() => {
                let l = lines[i % n].clone();
                lines.insert(i % n, l);
            }
            LineOp::Delete(i) if !lines.is_empty() => {
                lines.remove(i % n);
            }
            LineOp::Indent(i, k) if !lines.is_empty() => {
                let l = &mut lines[i % n];
                let trimmed: Vec<u8> = l.iter().copied().skip_while(|b| *b == b' ').collect();
                *l = [vec![b' '; *k as usize], trimmed].concat();
            }
            LineOp::Insert(i, text) => lines.insert(i % (lines.len() + 1), text.as_bytes().to_vec()),
            LineOp::Value(i, v) if !lines.is_empty() => {
                let l = &mut lines[i % n];
                if let Some(c) = l.iter().position(|b| *b == b':') {
                    l.truncate(c + 1);
                    l.push(b' ');
                    l.extend_from_slice(v.as_bytes());
                }
            }
            LineOp::Deep(d) => {
                let d = *d as usize;
                lines.push([b"x: ".to_vec(), vec![b'['; d], vec![b']'; d]].concat());
            }
            LineOp::Raw(i, b) if !lines.is_empty() => {
                let l = &mut lines[i % n];
                let at = i % (l.len() + 1);
                l.splice(at..at, b.iter().copied());
            }
            _ => {}
        }
    }
    lines.join(&b'\n')
}

/// The JSON-flow versions of the seeds.
fn json_seeds() -> Vec<gen_json::J> {
    [
        json!({"block_size": 16, "workers": [{"name": "a", "address": "127.0.0.1:1"}, {"name": "b", "address": "127.0.0.1:2", "id": 5, "role": "prefill"}]}),
        json!({"workers": [{"name": "p", "address": "10.0.0.1:8000", "dp_size": 2, "dp_start_rank": 1, "total_kv_blocks": 10, "max_num_batched_tokens": 8, "kv_events": "tcp://h:5557", "kv_events_replay": "tcp://h:6000"}]}),
    ]
    .iter()
    .map(gen_json::J::from_value)
    .collect()
}

#[derive(Clone, Debug)]
enum Doc {
    Yaml(usize, Vec<LineOp>),
    Json(gen_json::Generated),
}

/// Loads one file's bytes (through a real file when they are not UTF-8, the one thing `load`
/// checks before `parse`); a fleet it accepts must be one the router can run.
fn check(bytes: &[u8], dir: &std::path::Path, tally: &mut Tally) -> Result<(), TestCaseError> {
    let started = Instant::now();
    let loaded = match std::str::from_utf8(bytes) {
        Ok(text) => file::parse(text).map_err(|e| e.to_string()),
        Err(_) => {
            let path = dir.join("workers.yaml");
            std::fs::write(&path, bytes).unwrap();
            file::load(&path).map_err(|e| e.to_string())
        }
    };
    let took = started.elapsed();
    match loaded {
        Err(msg) => {
            // One readable log line, whatever the file echoes back.
            prop_assert!(!msg.is_empty() && msg.len() < 1024, "error message of {} bytes", msg.len());
            tally.record("rejected", took)
        }
        Ok(fleet) => {
            let mut ids = std::collections::HashSet::new();
            for w in &fleet.workers {
                prop_assert!(ids.insert(w.id), "repeated id {}", w.id);
                prop_assert!(w.dp_size >= 1 && w.dp_start_rank.checked_add(w.dp_size).is_some());
            }
            prop_assert_ne!(fleet.block_size, Some(0));
            let empty = fleet.workers.is_empty();
            let prefill_only = !empty && fleet.workers.iter().all(|w| w.role == Role::Prefill);
            let mut r = Router::default();
            r.set_fleet(fleet);
            match r.route(&RoutingRequest { tokens: (0..40).collect(), ..Default::default() }, Instant::now(), &mut rand::rng()) {
                Ok(d) => r.on_end(d.booking, Instant::now()),
                Err(RouteError::NoWorkers) if empty => {}
                Err(RouteError::NoDecodeWorkers) if prefill_only => {}
                // Prefill-only or decode-only fleets may refuse; anything else is a bug.
                Err(RouteError::PrefillUnavailable) => {}
                Err(e) => return Err(TestCaseError::fail(format!("route on an accepted fleet: {e}"))),
            }
            prop_assert_eq!(r.active_requests(), 0);
            tally.record("accepted", took)
        }
    }
}

#[test]
fn generated_workers_files() {
    let js = json_seeds();
    let dir = tempfile::tempdir().unwrap();
    let strategy = prop_oneof![
        3 => (0..YAML_SEEDS.len(), prop::collection::vec(line_op(), 0..5)).prop_map(|(s, ops)| Doc::Yaml(s, ops)),
        1 => gen_json::generated(js.len()).prop_map(Doc::Json),
    ];
    run("workers file", file!(), strategy, |doc, tally| {
        let bytes = match &doc {
            Doc::Yaml(s, ops) => apply_lines(YAML_SEEDS[*s], ops),
            Doc::Json(g) => g.build(&js, 1 << 20),
        };
        check(&bytes, dir.path(), tally)
    });
}

/// Inputs that once failed, kept as explicit cases.
#[test]
fn regressions() {
    // A huge dp_size was accepted and the router allocated state for 4 billion ranks.
    let e = file::parse("workers:\n  - name: a\n    address: 127.0.0.1:1\n    dp_size: 4294967295\n").unwrap_err();
    assert!(e.contains("dp_size must be 1..=4096"), "{e}");
    let ok = file::parse("workers:\n  - name: a\n    address: 127.0.0.1:1\n    dp_size: 4096\n    dp_start_rank: 7\n").unwrap();
    assert_eq!(ok.workers[0].dp_size, 4096);
    // Errors echoed 32 KB values whole: a 65,566-byte message (long run, seed 20261207).
    let long = "{% for i in range(99999999) %}x{% endfor %}".repeat(758);
    let role = format!(r#"{{"workers": [{{"name": "b", "address": "127.0.0.1:2", "role": "{long}"}}]}}"#);
    let address = format!("workers:\n  - name: a\n    address: \"{long}\"\n");
    for (doc, head, tail) in [(role, "unknown variant", ""), (address, "workers[0].address", "is not an ip:port")] {
        let e = file::parse(&doc).unwrap_err();
        assert!(e.len() < 1024 && e.contains(head) && e.ends_with(tail), "{} bytes: {e}", e.len());
    }
    // Short ones are kept whole.
    let e = file::parse("workers:\n  - name: a\n    address: nowhere\n").unwrap_err();
    assert_eq!(e, r#"workers[0].address "nowhere" is not an ip:port"#);
}
