//! Engine-native KV events over ZMQ (vLLM, SGLang, TensorRT-LLM; contracts §5.4), converted
//! into [`RouterEvent`]s the way Dynamo's `zmq_wire` does, without Dynamo's silent drops.
//!
//! A message is 3 frames `[topic, seq u64 BE, payload]`; the payload is a msgpack batch
//! `[ts, [events…], dp_rank]` (or a map). Events come positional (`["BlockStored", …]`, before
//! vLLM PR #42892) or as maps with a `"type"` key (after): both are accepted at both levels,
//! unknown fields are ignored and missing trailing ones allowed.

use rmpv::Value;

use super::{
    DecodeError, MAX_MSGPACK_DEPTH, ExternalBlockHash, KvCacheEvent, KvCacheEventData, KvCacheRemoveData, KvCacheStoreData,
    KvCacheStoredBlockData, RouterEvent, StorageTier,
};
use crate::{
    kv::hash::{block_hash, block_hash_mm, hash_seed},
    workers::WorkerId,
};

/// One transport message, split.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frames<'a> {
    pub topic: &'a [u8],
    pub seq: u64,
    pub payload: &'a [u8],
}

/// Splits `[topic, seq u64 BE, payload]`; any other frame count is rejected (as Dynamo does).
pub fn split_frames<B: AsRef<[u8]>>(frames: &[B]) -> Result<Frames<'_>, DecodeError> {
    let [topic, seq, payload] = frames else {
        return Err(DecodeError::Shape(format!("expected 3 frames, got {}", frames.len())));
    };
    Ok(Frames { topic: topic.as_ref(), seq: seq_of(seq.as_ref())?, payload: payload.as_ref() })
}

fn seq_of(b: &[u8]) -> Result<u64, DecodeError> {
    let arr: [u8; 8] = b.try_into().map_err(|_| DecodeError::Shape(format!("sequence frame has {} bytes, not 8", b.len())))?;
    Ok(u64::from_be_bytes(arr))
}

/// One reply of an engine's replay (ROUTER) socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplayItem<'a> {
    Message { seq: u64, payload: &'a [u8] },
    /// The engine has sent everything it buffered.
    End,
}

/// Replies come as `[b"", seq, payload]` (vLLM) or `[b"", topic, seq, payload]` (Dynamo's
/// listener), possibly without the empty delimiter; an empty payload or seq −1 ends the replay.
pub fn split_replay<B: AsRef<[u8]>>(frames: &[B]) -> Result<ReplayItem<'_>, DecodeError> {
    let mut fs: Vec<&[u8]> = frames.iter().map(|f| f.as_ref()).collect();
    if fs.first().is_some_and(|f| f.is_empty()) && fs.len() > 2 {
        fs.remove(0);
    }
    let (seq, payload) = match fs[..] {
        [seq, payload] => (seq, payload),
        [_topic, seq, payload] => (seq, payload),
        _ => return Err(DecodeError::Shape(format!("replay reply has {} frames", frames.len()))),
    };
    let seq = seq_of(seq)?;
    if payload.is_empty() || seq == u64::MAX {
        return Ok(ReplayItem::End);
    }
    Ok(ReplayItem::Message { seq, payload })
}

/// What the sequence number of a new message says about the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeqCheck {
    /// First message seen, or the next one.
    InOrder,
    /// Messages `expected..got` were lost.
    Gap { expected: u64, got: u64 },
    /// Not newer than what was seen: the engine restarted (or a replay overlaps); applied anyway,
    /// since stores and removals are idempotent.
    Restarted,
}

/// Per-engine-socket decoding state: the batch sequence seen so far and the event ids handed
/// out (engines have no event ids; like Dynamo, the publisher side counts them).
#[derive(Clone, Debug)]
pub struct EngineStream {
    pub worker: WorkerId,
    next_event_id: u64,
    last_seq: Option<u64>,
}

/// One batch converted: the events to apply, and what was dropped and why.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Converted {
    pub events: Vec<RouterEvent>,
    pub rejected: Vec<DecodeError>,
    /// When the engine made the batch (Unix seconds), if it says.
    pub ts: Option<f64>,
}

impl EngineStream {
    pub fn new(worker: WorkerId) -> Self {
        EngineStream { worker, next_event_id: 1, last_seq: None }
    }

    /// The sequence number the next message should carry, if any was seen.
    pub fn expected_seq(&self) -> Option<u64> {
        self.last_seq.map(|s| s.wrapping_add(1))
    }

    pub fn check_seq(&mut self, seq: u64) -> SeqCheck {
        let check = match self.expected_seq() {
            None => SeqCheck::InOrder,
            Some(e) if seq == e => SeqCheck::InOrder,
            Some(e) if seq > e => SeqCheck::Gap { expected: e, got: seq },
            Some(_) => SeqCheck::Restarted,
        };
        self.last_seq = Some(seq);
        check
    }

    /// Decodes one batch payload. `block_size` is the router's: a store of another size is
    /// rejected (and reported), because its token hashes could never match a request's.
    pub fn convert(&mut self, payload: &[u8], block_size: u32) -> Converted {
        let mut out = Converted::default();
        let (events, dp_rank, ts) = match decode_batch(payload) {
            Ok(b) => b,
            Err(e) => {
                out.rejected.push(e);
                return out;
            }
        };
        out.ts = ts;
        for ev in &events {
            match convert_event(ev, block_size) {
                Ok(Some((tier, data))) => {
                    let event_id = self.next_event_id;
                    self.next_event_id += 1;
                    out.events.push(RouterEvent {
                        worker_id: self.worker,
                        storage_tier: tier,
                        residency_domain: None,
                        event: KvCacheEvent { event_id, data, dp_rank },
                    });
                }
                Ok(None) => {}
                Err(e) => out.rejected.push(e),
            }
        }
        out
    }
}

fn shape(msg: impl Into<String>) -> DecodeError {
    DecodeError::Shape(msg.into())
}

/// The events of a batch, its DP rank and its timestamp.
fn decode_batch(payload: &[u8]) -> Result<(Vec<Value>, u32, Option<f64>), DecodeError> {
    let v = rmpv::decode::read_value_with_max_depth(&mut &payload[..], MAX_MSGPACK_DEPTH).map_err(|e| DecodeError::Msgpack(e.to_string()))?;
    let (events, rank, ts) = match v {
        Value::Array(mut a) if a.len() >= 2 => {
            let rank = a.get(2).cloned().unwrap_or(Value::Nil);
            let ts = a[0].as_f64();
            (a.swap_remove(1), rank, ts)
        }
        Value::Map(m) => {
            let get = |k: &str| m.iter().find(|(key, _)| key.as_str() == Some(k)).map(|(_, v)| v.clone());
            let events = get("events").ok_or_else(|| shape("batch map without events"))?;
            let ts = get("ts").and_then(|t| t.as_f64());
            (events, get("data_parallel_rank").or_else(|| get("dp_rank")).unwrap_or(Value::Nil), ts)
        }
        _ => return Err(shape("batch is neither [ts, events, dp_rank] nor a map")),
    };
    let Value::Array(events) = events else { return Err(shape("batch events are not an array")) };
    // Absent or negative rank = rank 0 (no data parallelism).
    let rank = rank.as_u64().and_then(|r| u32::try_from(r).ok()).unwrap_or(0);
    Ok((events, rank, ts))
}

/// Field access over both event forms: positional index or map key.
enum Fields<'a> {
    Pos(&'a [Value]),
    Map(&'a [(Value, Value)]),
}

impl<'a> Fields<'a> {
    /// The field, `None` when absent or nil.
    fn get(&self, idx: usize, name: &str) -> Option<&'a Value> {
        let v = match self {
            Fields::Pos(a) => a.get(idx),
            Fields::Map(m) => m.iter().find(|(k, _)| k.as_str() == Some(name)).map(|(_, v)| v),
        };
        v.filter(|v| !v.is_nil())
    }

    fn str(&self, idx: usize, name: &str) -> Result<Option<&'a str>, DecodeError> {
        match self.get(idx, name) {
            None => Ok(None),
            Some(v) => v.as_str().map(Some).ok_or_else(|| shape(format!("{name} is not a string"))),
        }
    }

    /// `kv_cache_spec_kind`: positional tails differ by producer (vLLM: group_idx, kind,
    /// window; Dynamo: block_mm_infos first), so take the first string from `tail` on.
    fn spec_kind(&self, tail: usize) -> Option<&'a str> {
        match self {
            Fields::Pos(a) => a.iter().skip(tail).find_map(|v| v.as_str()),
            Fields::Map(_) => self.get(0, "kv_cache_spec_kind").and_then(|v| v.as_str()),
        }
    }
}

fn hash_of(v: &Value) -> Result<ExternalBlockHash, DecodeError> {
    match v {
        Value::Integer(i) => i
            .as_u64()
            .or_else(|| i.as_i64().map(|x| x as u64))
            .map(ExternalBlockHash)
            .ok_or_else(|| shape("block hash out of range")),
        Value::Binary(b) => Ok(ExternalBlockHash::from_bytes(b)),
        _ => Err(shape("block hash is not an integer or bytes")),
    }
}

fn hashes_of(v: Option<&Value>) -> Result<Vec<ExternalBlockHash>, DecodeError> {
    match v {
        Some(Value::Array(a)) => a.iter().map(hash_of).collect(),
        _ => Err(shape("block_hashes is not an array")),
    }
}

/// vLLM `medium` → storage tier; unknown media are rejected rather than guessed.
fn tier_of(medium: Option<&str>) -> Result<StorageTier, DecodeError> {
    let Some(m) = medium else { return Ok(StorageTier::Device) };
    let u = m.to_ascii_uppercase();
    Ok(match u.as_str() {
        "GPU" | "DEVICE" => StorageTier::Device,
        "DISK" | "NVME" | "STORAGE" | "CPU_TIER2" => StorageTier::Disk,
        _ if u.starts_with("CPU") => StorageTier::HostPinned,
        "EXTERNAL" | "NETWORK" | "REMOTE" | "SHARED" => StorageTier::External,
        _ => return Err(DecodeError::UnknownMedium(m.to_string())),
    })
}

/// Only full-attention groups describe prefix-cache blocks (Dynamo's `zmq_wire/filter.rs`).
fn keeps_group(kind: Option<&str>) -> bool {
    matches!(kind, None | Some("full_attention" | "mla_attention" | "sink_full_attention"))
}

/// Multimodal hashes (64-hex strings → first 16 hex digits) and a `dynamo-cache-salt:` entry,
/// found anywhere in one block's extra keys.
fn scan_extra_keys(v: &Value, mm: &mut Vec<u64>, salt: &mut Option<String>) {
    match v {
        Value::String(s) => {
            let Some(s) = s.as_str() else { return };
            if let Some(rest) = s.strip_prefix("dynamo-cache-salt:") {
                *salt = Some(rest.to_string());
            } else if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
                if let Ok(h) = u64::from_str_radix(&s[..16], 16) {
                    mm.push(h);
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| scan_extra_keys(x, mm, salt)),
        _ => {}
    }
}

/// One engine event → the tier and data of a `RouterEvent`; `Ok(None)` = deliberately ignored
/// (a sliding-window group, a remote block).
fn convert_event(v: &Value, block_size: u32) -> Result<Option<(StorageTier, KvCacheEventData)>, DecodeError> {
    let (tag, f) = match v {
        Value::Array(a) => (a.first().and_then(|t| t.as_str()), Fields::Pos(a)),
        Value::Map(m) => {
            let f = Fields::Map(m);
            (f.get(0, "type").and_then(|t| t.as_str()), f)
        }
        _ => return Err(shape("event is neither an array nor a map")),
    };
    match tag {
        Some("BlockStored") => {
            if !keeps_group(f.spec_kind(9)) {
                return Ok(None);
            }
            if matches!(v, Value::Map(_)) {
                if let Some(loc) = f.str(0, "locality")? {
                    if !loc.eq_ignore_ascii_case("local") {
                        return Ok(None);
                    }
                }
            }
            let tier = tier_of(f.str(6, "medium")?)?;
            let hashes = hashes_of(f.get(1, "block_hashes"))?;
            let parent = f.get(2, "parent_block_hash").map(hash_of).transpose()?;
            let got = f.get(4, "block_size").and_then(|b| b.as_u64()).ok_or_else(|| shape("block_size missing"))?;
            if got != block_size as u64 {
                return Err(DecodeError::BlockSizeMismatch { got: got.min(u32::MAX as u64) as u32, want: block_size });
            }
            let tokens: Vec<u32> = match f.get(3, "token_ids") {
                Some(Value::Array(a)) => a
                    .iter()
                    .map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok()).ok_or_else(|| shape("token id is not a u32")))
                    .collect::<Result<_, _>>()?,
                _ => return Err(shape("token_ids is not an array")),
            };
            let bs = block_size as usize;
            if tokens.len() != hashes.len() * bs {
                return Err(shape(format!("{} token ids for {} blocks of {bs}", tokens.len(), hashes.len())));
            }
            let lora = f.str(7, "lora_name")?;
            let extra: &[Value] = match f.get(8, "extra_keys") {
                Some(Value::Array(a)) => a,
                _ => &[],
            };
            // The cache namespace rides in the first block's extra keys; a top-level
            // `cache_salt` (map form only) wins.
            let mut mm_per_block = vec![Vec::new(); hashes.len()];
            let mut salt = None;
            for (i, e) in extra.iter().take(hashes.len()).enumerate() {
                let mut s = None;
                scan_extra_keys(e, &mut mm_per_block[i], &mut s);
                if i == 0 {
                    salt = s;
                }
            }
            if let Fields::Map(_) = f {
                if let Some(s) = f.str(0, "cache_salt")? {
                    salt = Some(s.to_string());
                }
            }
            let seed = hash_seed(lora, salt.as_deref());
            let blocks = hashes
                .iter()
                .zip(tokens.chunks_exact(bs))
                .zip(&mm_per_block)
                .map(|((&h, toks), mm)| KvCacheStoredBlockData {
                    block_hash: h,
                    tokens_hash: if mm.is_empty() { block_hash(toks, seed) } else { block_hash_mm(toks, mm, seed) },
                    mm_extra_info: None,
                })
                .collect::<Vec<_>>();
            Ok(Some((tier, KvCacheEventData::Stored(KvCacheStoreData { parent_hash: parent, start_position: None, blocks }))))
        }
        Some("BlockRemoved") => {
            if !keeps_group(f.spec_kind(3)) {
                return Ok(None);
            }
            let tier = tier_of(f.str(2, "medium")?)?;
            let block_hashes = hashes_of(f.get(1, "block_hashes"))?;
            Ok(Some((tier, KvCacheEventData::Removed(KvCacheRemoveData { block_hashes }))))
        }
        Some("AllBlocksCleared") => Ok(Some((StorageTier::Device, KvCacheEventData::Cleared))),
        Some(other) => Err(shape(format!("unknown event type {other:?}"))),
        None => Err(shape("event without a type tag")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::{events::examples::*, hash::LocalBlockHash};
    use proptest::prelude::*;
    use xxhash_rust::xxh3::xxh3_64_with_seed;

    /// Independent of our hash module: the reference definition, spelled out.
    fn want_hash(tokens: std::ops::Range<u32>, seed: u64) -> LocalBlockHash {
        let b: Vec<u8> = tokens.flat_map(|t| t.to_le_bytes()).collect();
        LocalBlockHash(xxh3_64_with_seed(&b, seed))
    }

    fn stored(ev: &RouterEvent) -> &KvCacheStoreData {
        match &ev.event.data {
            KvCacheEventData::Stored(s) => s,
            other => panic!("{other:?}"),
        }
    }

    // The vLLM 0.26.0 map example of contracts §5.4, with 2 blocks.
    #[test]
    fn map_form_batch_from_vllm() {
        let batch = vllm_batch(vec![vllm_block_stored(Value::Array(vec![Value::Nil, Value::Nil]))], 0);
        let mut st = EngineStream::new(WorkerId(5));
        let c = st.convert(&enc(&batch), 16);
        assert_eq!(c.rejected, vec![]);
        assert_eq!(c.events.len(), 1);
        let e = &c.events[0];
        assert_eq!((e.worker_id, e.event.event_id, e.event.dp_rank, e.storage_tier), (WorkerId(5), 1, 0, StorageTier::Device));
        let d = stored(e);
        assert_eq!(d.parent_hash, None);
        assert_eq!(d.blocks[0].block_hash, ExternalBlockHash(15760518052499183552));
        // Reference vectors (contracts §6.1) for tokens 0..16 and 16..32.
        assert_eq!(d.blocks[0].tokens_hash, LocalBlockHash(15310707395893867146));
        assert_eq!(d.blocks[1].tokens_hash, LocalBlockHash(15292316782987903195));
    }

    #[test]
    fn positional_form_with_i64_and_bytes_hashes_and_rank() {
        let mut bin = vec![0u8; 24];
        bin.extend(99u64.to_be_bytes());
        let store = Value::Array(vec![
            s("BlockStored"),
            Value::Array(vec![Value::from(-2i64), Value::Binary(bin)]),
            Value::from(-3i64),
            ints(16..48),
            Value::from(16),
            Value::Nil,
            s("cpu"),
            s("my-lora"),
            Value::Array(vec![Value::Array(vec![s("dynamo-cache-salt:tenant-a")]), Value::Nil]),
            Value::from(0),
            s("full_attention"),
        ]);
        let removed = Value::Array(vec![s("BlockRemoved"), ints([4]), s("DISK")]);
        let cleared = Value::Array(vec![s("AllBlocksCleared")]);
        let batch = Value::Array(vec![Value::F64(1.0), Value::Array(vec![store, removed, cleared]), Value::from(3)]);
        let c = EngineStream::new(WorkerId(1)).convert(&enc(&batch), 16);
        assert_eq!(c.rejected, vec![]);
        let ids: Vec<_> = c.events.iter().map(|e| (e.event.event_id, e.event.dp_rank)).collect();
        assert_eq!(ids, vec![(1, 3), (2, 3), (3, 3)]);
        let d = stored(&c.events[0]);
        assert_eq!(c.events[0].storage_tier, StorageTier::HostPinned);
        assert_eq!(d.parent_hash, Some(ExternalBlockHash(-3i64 as u64)));
        assert_eq!(d.blocks[0].block_hash, ExternalBlockHash(-2i64 as u64));
        assert_eq!(d.blocks[1].block_hash, ExternalBlockHash(99));
        // Seed = 1337 + xxh3("my-lora", 0) + xxh3("tenant-a", 1) (contracts §6).
        let seed = 12827409268353072861u64.wrapping_add(1948188790972764086).wrapping_sub(1337);
        assert_eq!(d.blocks[0].tokens_hash, want_hash(16..32, seed));
        assert_eq!(d.blocks[1].tokens_hash, want_hash(32..48, seed));
        assert_eq!(c.events[1].storage_tier, StorageTier::Disk);
        assert!(matches!(&c.events[1].event.data, KvCacheEventData::Removed(r) if r.block_hashes == [ExternalBlockHash(4)]));
        assert_eq!(c.events[2].event.data, KvCacheEventData::Cleared);
    }

    #[test]
    fn sglang_short_positional_store_and_map_batch() {
        // SGLang (older) ends BlockStored at lora_id; the batch may be a map.
        let ev = Value::Array(vec![s("BlockStored"), ints([1]), Value::Nil, ints(0..16), Value::from(16), Value::Nil]);
        let batch = Value::Map(vec![(s("ts"), Value::F64(0.0)), (s("events"), Value::Array(vec![ev])), (s("data_parallel_rank"), Value::from(2))]);
        let c = EngineStream::new(WorkerId(1)).convert(&enc(&batch), 16);
        assert_eq!(c.rejected, vec![]);
        assert_eq!(c.events[0].event.dp_rank, 2);
        assert_eq!(stored(&c.events[0]).blocks[0].tokens_hash, LocalBlockHash(15310707395893867146));
    }

    #[test]
    fn multimodal_extra_keys_reach_the_hash() {
        let mm = format!("{:016x}{}", 0xdead_beef_u64, "0".repeat(48));
        let ev = Value::Map(vec![
            (s("type"), s("BlockStored")),
            (s("block_hashes"), ints([1])),
            (s("token_ids"), ints(0..16)),
            (s("block_size"), Value::from(16)),
            (s("extra_keys"), Value::Array(vec![Value::Array(vec![Value::Array(vec![s(&mm), Value::from(0)])])])),
            (s("cache_salt"), s("tenant-a")),
        ]);
        let c = EngineStream::new(WorkerId(1)).convert(&enc(&Value::Array(vec![Value::F64(0.0), Value::Array(vec![ev])])), 16);
        let mut b: Vec<u8> = (0..16u32).flat_map(|t| t.to_le_bytes()).collect();
        b.extend(0xdead_beef_u64.to_le_bytes());
        assert_eq!(stored(&c.events[0]).blocks[0].tokens_hash, LocalBlockHash(xxh3_64_with_seed(&b, 1948188790972764086)));
    }

    #[test]
    fn mismatches_and_oddities_are_reported_not_dropped_silently() {
        let store = |bs: i64, medium: &str, kind: &str, ntok: u32| {
            Value::Map(vec![
                (s("type"), s("BlockStored")),
                (s("block_hashes"), ints([1])),
                (s("token_ids"), ints(0..ntok as u64)),
                (s("block_size"), Value::from(bs)),
                (s("medium"), s(medium)),
                (s("kv_cache_spec_kind"), s(kind)),
            ])
        };
        let batch = Value::Array(vec![
            Value::F64(0.0),
            Value::Array(vec![
                store(32, "GPU", "full_attention", 32),
                store(16, "TAPE", "full_attention", 16),
                store(16, "GPU", "sliding_window", 16),
                store(16, "GPU", "full_attention", 15),
                Value::Array(vec![s("Teleported")]),
                Value::from(3),
                store(16, "gpu", "mla_attention", 16),
            ]),
        ]);
        let c = EngineStream::new(WorkerId(1)).convert(&enc(&batch), 16);
        let reasons: Vec<_> = c.rejected.iter().map(|e| e.reason()).collect();
        assert_eq!(reasons, vec!["block_size_mismatch", "unknown_medium", "bad_shape", "bad_shape", "bad_shape"]);
        assert!(c.rejected[0].to_string().contains("32"), "{}", c.rejected[0]);
        assert_eq!(c.events.len(), 1, "the sliding-window group is ignored, the MLA one kept");
        let garbage = EngineStream::new(WorkerId(1)).convert(b"\x93\x01", 16); // truncated array
        assert_eq!(garbage.rejected.iter().map(|e| e.reason()).collect::<Vec<_>>(), vec!["invalid_msgpack"]);
        assert_eq!(c.events[0].event.event_id, 1);
    }

    #[test]
    fn frames_sequences_and_replay_replies() {
        let seq = 7u64.to_be_bytes();
        let frames = [&b""[..], &seq[..], b"x"];
        let f = split_frames(&frames).unwrap();
        assert_eq!((f.seq, f.payload), (7, &b"x"[..]));
        assert_eq!(split_frames(&[&b""[..], b"x"]).unwrap_err().reason(), "bad_shape");
        assert_eq!(split_frames(&[&b""[..], b"1234", b"x"]).unwrap_err().reason(), "bad_shape");

        let mut st = EngineStream::new(WorkerId(1));
        assert_eq!(st.check_seq(5), SeqCheck::InOrder);
        assert_eq!(st.check_seq(6), SeqCheck::InOrder);
        assert_eq!(st.check_seq(9), SeqCheck::Gap { expected: 7, got: 9 });
        assert_eq!(st.check_seq(0), SeqCheck::Restarted);
        assert_eq!(st.expected_seq(), Some(1));

        let p = 3u64.to_be_bytes();
        assert_eq!(split_replay(&[&b""[..], &p[..], b"pl"]).unwrap(), ReplayItem::Message { seq: 3, payload: b"pl" });
        assert_eq!(split_replay(&[&b""[..], b"topic", &p[..], b"pl"]).unwrap(), ReplayItem::Message { seq: 3, payload: b"pl" });
        assert_eq!(split_replay(&[&b""[..], &u64::MAX.to_be_bytes()[..], b""]).unwrap(), ReplayItem::End);
        assert_eq!(split_replay(&[&b""[..], b"t", &p[..], b""]).unwrap(), ReplayItem::End);
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_bytes(b in proptest::collection::vec(any::<u8>(), 0..512), bs in 1u32..64) {
            let _ = EngineStream::new(WorkerId(1)).convert(&b, bs);
            let _ = split_frames(&[&b[..], &b[..], &b[..]]);
            let _ = split_replay(&[&b[..], &b[..]]);
        }

        // Structured garbage gets deeper into the converter than random bytes do.
        #[test]
        fn never_panics_on_arbitrary_event_values(tag in prop_oneof![Just("BlockStored"), Just("BlockRemoved"), Just("AllBlocksCleared")],
                                                   fields in proptest::collection::vec(prop_oneof![
                                                       any::<i64>().prop_map(Value::from),
                                                       any::<u64>().prop_map(Value::from),
                                                       Just(Value::Nil),
                                                       "[a-zA-Z_]{0,8}".prop_map(|x| Value::from(x.as_str())),
                                                       proptest::collection::vec(any::<u32>(), 0..40).prop_map(|v| ints(v.into_iter().map(u64::from))),
                                                       proptest::collection::vec(any::<u8>(), 0..12).prop_map(Value::Binary),
                                                   ], 0..12)) {
            let mut ev = vec![s(tag)];
            ev.extend(fields);
            let batch = Value::Array(vec![Value::F64(0.0), Value::Array(vec![Value::Array(ev)]), Value::from(0)]);
            let _ = EngineStream::new(WorkerId(1)).convert(&enc(&batch), 4);
        }
    }
}
