//! Prints Dynamo 1.6.1's own msgpack encoding (rmp_serde::to_vec_named, as its event plane
//! does) of ActiveSequenceEvent values, as hex lines `name hex`.
use dynamo_kv_router::protocols::{ActiveSequenceEvent, ActiveSequenceEventData, PrefillLoadHint, WorkerWithDpRank};
use std::time::Duration;

fn main() {
    let w = WorkerWithDpRank { worker_id: 7, dp_rank: 1 };
    let cases = vec![
        ("add_full", ActiveSequenceEvent {
            request_id: "r-1".into(),
            worker: w,
            data: ActiveSequenceEventData::AddRequest {
                token_sequence: Some(vec![1, 2, u64::MAX]),
                track_prefill_tokens: true,
                expected_output_tokens: Some(128),
                prefill_load_hint: Some(PrefillLoadHint { initial_effective_prefill_tokens: 300, expected_prefill_duration: Some(Duration::from_millis(1500)) }),
            },
            router_id: 0x1234,
            lora_name: Some("sql-lora".into()),
        }),
        ("add_untracked", ActiveSequenceEvent {
            request_id: "r-2".into(),
            worker: WorkerWithDpRank { worker_id: 9_007_199_254_740_993, dp_rank: 0 },
            data: ActiveSequenceEventData::AddRequest {
                token_sequence: None,
                track_prefill_tokens: false,
                expected_output_tokens: None,
                prefill_load_hint: Some(PrefillLoadHint { initial_effective_prefill_tokens: 50, expected_prefill_duration: None }),
            },
            router_id: 1,
            lora_name: None,
        }),
        ("free", ActiveSequenceEvent { request_id: "r-1".into(), worker: w, data: ActiveSequenceEventData::Free, router_id: 0x1234, lora_name: None }),
        ("prefill_completed", ActiveSequenceEvent { request_id: "r-1".into(), worker: w, data: ActiveSequenceEventData::MarkPrefillCompleted, router_id: 0x1234, lora_name: None }),
    ];
    for (name, ev) in cases {
        let b = rmp_serde::to_vec_named(&ev).unwrap();
        let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
        println!("{name} {hex}");
    }
}
