//! The static fleet from `DYN_EPP_WORKERS_FILE` (YAML), polled for changes.

use std::{
    collections::HashSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use super::{hash_pod_name, Fleet, KvEventSource, Role, Worker, WorkerId};

/// Why a workers file could not become a fleet.
#[derive(Debug, thiserror::Error)]
pub enum FleetFileError {
    #[error("cannot read workers file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("invalid workers file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    block_size: Option<u32>,
    #[serde(default)]
    workers: Vec<FileWorker>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileWorker {
    name: String,
    address: String,
    #[serde(default)]
    role: Role,
    id: Option<WorkerId>,
    #[serde(default = "one")]
    dp_size: u32,
    #[serde(default)]
    dp_start_rank: u32,
    total_kv_blocks: Option<u64>,
    max_num_batched_tokens: Option<u64>,
    kv_events: Option<String>,
    kv_events_replay: Option<String>,
}

fn one() -> u32 {
    1
}

/// Data-parallel ranks one worker may declare. The router keeps state per rank, so without a
/// bound a `dp_size: 4294967295` (found by tests/fuzz) allocated until memory ran out.
pub const MAX_DP_SIZE: u32 = 4096;

/// Longest error message kept. Messages echo values from the file (serde's "unknown variant
/// `…`", a bad address): a 32 KB role made a 64 KB log line (found by tests/fuzz).
pub const MAX_MESSAGE_BYTES: usize = 512;

/// Parses a workers file's text into a fleet, checking what the router relies on.
pub fn parse(text: &str) -> Result<Fleet, String> {
    check(text).map_err(shorten)
}

/// Keeps the head (which field) and the tail (why, where) of a long message.
fn shorten(m: String) -> String {
    if m.len() <= MAX_MESSAGE_BYTES {
        return m;
    }
    let half = MAX_MESSAGE_BYTES / 2;
    let head = (0..=half).rev().find(|&i| m.is_char_boundary(i)).unwrap_or(0);
    let tail = (m.len() - half..=m.len()).find(|&i| m.is_char_boundary(i)).unwrap_or(m.len());
    format!("{} … ({} bytes cut) … {}", &m[..head], tail - head, &m[tail..])
}

fn check(text: &str) -> Result<Fleet, String> {
    let doc: FileDoc = serde_saphyr::from_str(text).map_err(|e| e.to_string())?;
    if doc.block_size == Some(0) {
        return Err("block_size must be at least 1".into());
    }
    let mut seen = HashSet::new();
    let mut workers = Vec::with_capacity(doc.workers.len());
    for (i, w) in doc.workers.into_iter().enumerate() {
        let endpoint: SocketAddr = w.address.parse().map_err(|_| {
            format!("workers[{i}].address {:?} is not an ip:port", w.address)
        })?;
        if w.dp_size == 0 || w.dp_size > MAX_DP_SIZE {
            return Err(format!("workers[{i}].dp_size must be 1..={MAX_DP_SIZE}"));
        }
        if w.dp_start_rank.checked_add(w.dp_size).is_none() {
            return Err(format!("workers[{i}]: dp_start_rank + dp_size overflows u32"));
        }
        let kv_events = match (w.kv_events, w.kv_events_replay) {
            (None, None) => None,
            (None, Some(_)) => return Err(format!("workers[{i}].kv_events_replay needs kv_events")),
            (Some(endpoint), replay) => {
                for (field, ep) in [("kv_events", Some(&endpoint)), ("kv_events_replay", replay.as_ref())] {
                    if let Some(ep) = ep {
                        if !is_tcp_endpoint(ep) {
                            return Err(format!("workers[{i}].{field} {ep:?} is not tcp://host:port"));
                        }
                    }
                }
                Some(KvEventSource { endpoint, replay })
            }
        };
        let id = w.id.unwrap_or_else(|| hash_pod_name(&w.name));
        if !seen.insert(id) {
            return Err(format!("workers[{i}] ({}) repeats instance id {id}", w.name));
        }
        workers.push(Worker {
            id,
            name: w.name,
            endpoint,
            role: w.role,
            dp_start_rank: w.dp_start_rank,
            dp_size: w.dp_size,
            total_kv_blocks: w.total_kv_blocks,
            max_num_batched_tokens: w.max_num_batched_tokens,
            kv_events,
        });
    }
    Ok(Fleet { block_size: doc.block_size, workers })
}

/// `tcp://host:port` with a numeric port (the only transport the ZMQ subscriber speaks).
fn is_tcp_endpoint(ep: &str) -> bool {
    ep.strip_prefix("tcp://")
        .and_then(|hp| hp.rsplit_once(':'))
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
}

/// Reads and parses the file once.
pub fn load(path: &Path) -> Result<Fleet, FleetFileError> {
    parse_read(path, read(path))
}

fn read(path: &Path) -> Result<String, FleetFileError> {
    std::fs::read_to_string(path).map_err(|source| FleetFileError::Read { path: path.into(), source })
}

fn parse_read(path: &Path, text: Result<String, FleetFileError>) -> Result<Fleet, FleetFileError> {
    parse(&text?).map_err(|message| FleetFileError::Invalid { path: path.into(), message })
}

/// How long a polled file must read the same before it is applied.
const SETTLE: Duration = Duration::from_millis(50);

/// [`load`] of a file that reads the same twice [`SETTLE`] apart, else `None` (try at the next
/// poll): a writer that truncates and then writes (not an atomic rename, as ConfigMaps do) can
/// be caught mid-write, and a cut-off port is still a valid address (tests/faults.rs
/// `workers_file_flapping` found it).
fn load_settled(path: &Path) -> Option<Result<Fleet, FleetFileError>> {
    let first = read(path);
    std::thread::sleep(SETTLE);
    match (first, read(path)) {
        (Ok(a), Ok(b)) if a != b => None,
        (_, second) => Some(parse_read(path, second)),
    }
}

/// Polls the file and hands every new valid version to `apply`; `last` is what was applied
/// already (`None`: nothing yet, e.g. the file did not exist at start). Polling (not inotify)
/// because Kubernetes ConfigMap updates swap symlinks, which inotify watchers often miss.
pub async fn watch(path: PathBuf, every: Duration, mut last: Option<Fleet>, apply: impl Fn(Fleet)) {
    let mut last_error = None;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let p = path.clone();
        let loaded = match tokio::task::spawn_blocking(move || load_settled(&p)).await {
            Ok(Some(r)) => r,
            Ok(None) | Err(_) => continue,
        };
        match loaded {
            Ok(fleet) if last.as_ref() != Some(&fleet) => {
                last_error = None;
                tracing::info!(workers = fleet.workers.len(), path = %path.display(), "workers file loaded");
                last = Some(fleet.clone());
                apply(fleet);
            }
            Ok(_) => last_error = None,
            Err(e) => {
                // Said once per distinct problem, not every poll.
                let msg = e.to_string();
                if last_error.as_ref() != Some(&msg) {
                    tracing::warn!(error = %msg, "workers file rejected; keeping the previous fleet");
                    last_error = Some(msg);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workers::DpRank;

    #[test]
    fn parses_the_documented_example() {
        let f = parse(
            r#"
block_size: 16
workers:
  - name: qwen-vllmdecodeworker-0
    address: 127.0.0.1:18001
    role: worker
    dp_size: 2
    dp_start_rank: 4
    total_kv_blocks: 4096
    max_num_batched_tokens: 8192
    kv_events: tcp://10.0.0.1:5557
    kv_events_replay: tcp://10.0.0.1:5558
  - name: other
    address: 10.0.0.2:8000
    role: prefill
    id: 1001
"#,
        )
        .unwrap();
        assert_eq!(f.block_size, Some(16));
        let w = &f.workers[0];
        assert_eq!(w.id, WorkerId(2152695600563388));
        assert_eq!(w.ranks().map(|r| r.dp_rank).collect::<Vec<_>>(), vec![DpRank(4), DpRank(5)]);
        assert_eq!(w.total_kv_blocks, Some(4096));
        assert_eq!(
            w.kv_events,
            Some(KvEventSource { endpoint: "tcp://10.0.0.1:5557".into(), replay: Some("tcp://10.0.0.1:5558".into()) })
        );
        assert_eq!(f.workers[1].kv_events, None);
        assert_eq!(f.workers[1].id, WorkerId(1001));
        assert_eq!(f.workers[1].role, Role::Prefill);
        assert_eq!(f.workers[1].dp_size, 1);
    }

    #[test]
    fn rejects_bad_files_with_the_reason() {
        for (text, needle) in [
            ("workers:\n  - name: a\n    address: nohost\n", "not an ip:port"),
            ("workers:\n  - name: a\n    address: 1.2.3.4:1\n    dp_size: 0\n", "dp_size"),
            ("workers:\n  - {name: a, address: '1.2.3.4:1', id: 5}\n  - {name: b, address: '1.2.3.4:2', id: 5}\n", "repeats"),
            ("workers:\n  - {name: a, address: '1.2.3.4:1', role: boss}\n", "boss"),
            ("workers:\n  - {name: a, address: '1.2.3.4:1', colour: red}\n", "colour"),
            ("block_size: 0\n", "block_size"),
            ("workers:\n  - {name: a, address: '1.2.3.4:1', kv_events: 'ipc:///x'}\n", "kv_events"),
            ("workers:\n  - {name: a, address: '1.2.3.4:1', kv_events: 'tcp://h:1', kv_events_replay: 'tcp://h'}\n", "kv_events_replay"),
            ("workers:\n  - {name: a, address: '1.2.3.4:1', kv_events_replay: 'tcp://h:2'}\n", "needs kv_events"),
        ] {
            let err = parse(text).unwrap_err();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }
}
