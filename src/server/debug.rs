//! The debug gRPC API (`dynamo.epp.v1.Debug`, proto/dynamo/epp/v1/debug.proto): why the picker
//! would choose what it chooses (`Explain`), the fleet's live load (`Workers`), and the
//! effective configuration (`Config`). Read-only: nothing is booked. `Explain` tokenizes like a
//! request — same body limit, same deadline, in the same work pool — and at most
//! [`EXPLAIN_CONCURRENCY`] run at once, so debugging cannot starve routing; `DYN_EPP_DEBUG_API=false`
//! removes the service.

use std::sync::Arc;

use prost::Message;
use prost_types::{value::Kind, ListValue, Struct, Value};
use tokio::sync::Semaphore;
use tonic::{Request, Response, Status};

use super::{error::EppError, App};
use crate::{
    request::openai::Api,
    router::{RouteError, RoutingRequest, Scored},
    sched::{latency::RankModel, select::softmax_probabilities, RoutingPolicy},
    workers::{Role, Worker},
};

pub mod proto {
    tonic::include_proto!("dynamo.epp.v1");
}

use proto::{
    debug_server::Debug, Candidate, ConfigRequest, ConfigResponse, ExplainRequest, ExplainResponse, LatencyModel, WorkerStatus, WorkersRequest,
    WorkersResponse,
};

/// Descriptor set of the debug service (built by build.rs) for gRPC reflection.
pub const DEBUG_DESCRIPTOR: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/debug_descriptor.bin"));

/// `Explain` calls running at once; more are refused with RESOURCE_EXHAUSTED rather than queued.
pub const EXPLAIN_CONCURRENCY: usize = 2;

pub struct DebugService {
    app: Arc<App>,
    config: Struct,
    explain_slots: Semaphore,
}

impl DebugService {
    pub fn new(app: Arc<App>, config: &crate::config::Config) -> Self {
        let mut json = serde_json::to_value(config).expect("the configuration serializes");
        // What DYN_TOKENIZER resolved to for the loaded model, beside what was asked.
        if let Some(m) = &app.prep.model {
            let s = m.tokenizer.selection();
            json["tokenizer_backend"] = s.backend.name().into();
            json["tokenizer_backend_reason"] = s.reason.clone().into();
        }
        DebugService { app, config: as_struct(json), explain_slots: Semaphore::new(EXPLAIN_CONCURRENCY) }
    }
}

/// A request's error as the debug API answers it.
fn status(e: EppError) -> Status {
    let msg = e.to_string();
    match e {
        EppError::BodyTooLarge { .. } => Status::resource_exhausted(msg),
        EppError::TokenizerTimeout { .. } => Status::deadline_exceeded(msg),
        EppError::ModelNotFound(_) => Status::not_found(msg),
        EppError::Tokenizer(_) => Status::internal(msg),
        _ => Status::invalid_argument(msg),
    }
}

/// The scored candidates as the API shows them, with each one's chance of being picked.
fn candidates(scored: &[Scored], temperature: f64, workers: &[Worker]) -> Vec<Candidate> {
    let open: Vec<f64> = scored.iter().filter(|s| !s.busy).map(|s| s.terms.logit).collect();
    let probs = if temperature > 0.0 {
        softmax_probabilities(&open, temperature)
    } else {
        // Ties are broken uniformly at random.
        let min = open.iter().copied().fold(f64::INFINITY, f64::min);
        let n = open.iter().filter(|&&c| c == min).count() as f64;
        open.iter().map(|&c| if c == min { 1.0 / n } else { 0.0 }).collect()
    };
    let mut p = probs.into_iter();
    scored
        .iter()
        .map(|s| {
            let name = workers.iter().find(|w| w.id == s.target.worker.id).map(|w| w.name.clone()).unwrap_or_default();
            let (l, t) = (&s.load, &s.terms);
            Candidate {
                worker_id: s.target.worker.id.0,
                dp_rank: s.target.worker.dp_rank.0,
                name,
                endpoint: s.target.endpoint.to_string(),
                overlap_device_blocks: l.overlap.device,
                overlap_host_blocks: l.overlap.host,
                overlap_disk_blocks: l.overlap.disk,
                cached_tokens: t.cached_tokens,
                active_prefill_tokens: l.active_prefill_tokens,
                active_decode_blocks: l.active_decode_blocks,
                new_blocks: l.new_blocks,
                active_requests: l.active_requests,
                prefill_blocks: t.raw_prefill_blocks,
                credit_decay: t.decay,
                credit_blocks: t.credit_blocks,
                prefill_cost: t.prefill_cost,
                decode_blocks: t.decode_blocks,
                request_cost: t.request_cost,
                cost: t.logit,
                busy: s.busy,
                probability: if s.busy { 0.0 } else { p.next().unwrap_or(0.0) },
                predicted_ttft_ms: s.prediction.map_or(0.0, |p| p.ttft_ms),
                predicted_queue_ms: s.prediction.map_or(0.0, |p| p.queue_ms),
                predicted_prefill_ms: s.prediction.map_or(0.0, |p| p.prefill_ms),
                predicted_base_ms: s.prediction.map_or(0.0, |p| p.base_ms),
                predicted_tpot_ms: s.prediction.map_or(0.0, |p| p.tpot_ms),
                predicted_speed_factor: s.prediction.map_or(0.0, |p| p.speed),
                predicted_join_ms: s.prediction.map_or(0.0, |p| p.join_ms),
            }
        })
        .collect()
}

/// A rank's fitted latency models as the API shows them.
fn latency_model(worker_id: u64, dp_rank: u32, name: &str, m: RankModel, own: bool) -> LatencyModel {
    LatencyModel {
        worker_id,
        dp_rank,
        name: name.into(),
        ttft: m.ttft.coefficients().to_vec(),
        tpot: m.tpot.coefficients().to_vec(),
        ttft_samples: m.ttft.samples(),
        tpot_samples: m.tpot.samples(),
        ttft_relative_error: m.ttft.relative_error(),
        tpot_relative_error: m.tpot.relative_error(),
        own,
        speed_factor: m.speed,
        speed_samples: m.speed_samples,
    }
}

/// The cheapest open candidate (the most likely pick).
fn cheapest(c: &[Candidate]) -> Option<Candidate> {
    c.iter().filter(|c| !c.busy).min_by(|a, b| a.cost.total_cmp(&b.cost)).cloned()
}

#[tonic::async_trait]
impl Debug for DebugService {
    async fn explain(&self, request: Request<ExplainRequest>) -> Result<Response<ExplainResponse>, Status> {
        let _slot = self
            .explain_slots
            .try_acquire()
            .map_err(|_| Status::resource_exhausted(format!("{EXPLAIN_CONCURRENCY} Explain calls are already running; retry later")))?;
        let r = request.into_inner();
        let path = if r.path.is_empty() { "/v1/chat/completions" } else { r.path.as_str() };
        let api = Api::from_path(path).ok_or_else(|| Status::invalid_argument(format!("path {path:?} is not an OpenAI API the picker reads")))?;
        let body = r.body.unwrap_or_default();
        let (prep, limit) = (self.app.prep.clone(), self.app.max_body_bytes);
        let tenant = r.headers.get("x-tenant-id").cloned();
        // The JSON is made in the job too: for a large body it is work like the parse.
        let prepared = self
            .app
            .pool
            .run(body.encoded_len(), move || {
                let body = serde_json::to_vec(&as_json(body)).expect("JSON");
                if body.len() as u64 > limit {
                    return Err(EppError::BodyTooLarge { limit });
                }
                prep.prepare(api, tenant, body).map_err(EppError::from)
            })
            .await;
        let p = prepared.map_err(EppError::from).and_then(|p| p).map_err(status)?;
        let req = RoutingRequest { tokens: p.tokens, cache_salt: p.cache_salt, lora: p.lora, osl: p.hints.osl, subset: None };
        // One look at the router: the scores and the names they refer to.
        let (decode, prefill, block_size, sched, workers, models) = {
            let router = self.app.router.lock();
            let (d, p) = router.explain(&req);
            let ranks = d.iter().chain(&p).map(|s| s.target.worker);
            let mut models: Vec<LatencyModel> = ranks.map(|r| latency_model(r.id.0, r.dp_rank.0, "", router.latency_model(&r), router.has_latency_samples(&r))).collect();
            models.push(latency_model(0, 0, "fleet", router.fleet_latency_model(), true));
            (d, p, router.block_size(), *router.settings(), router.workers().to_vec(), models)
        };
        let models = models
            .into_iter()
            .map(|m| match workers.iter().find(|w| w.id.0 == m.worker_id && m.name.is_empty()) {
                Some(w) => LatencyModel { name: w.name.clone(), ..m },
                None => m,
            })
            .collect();
        let decode_candidates = candidates(&decode, sched.temperature, &workers);
        let prefill_candidates = candidates(&prefill, sched.temperature, &workers);
        let (best_decode, best_prefill) = (cheapest(&decode_candidates), cheapest(&prefill_candidates));
        let error = if decode_candidates.is_empty() {
            Some(if workers.is_empty() { RouteError::NoWorkers } else { RouteError::NoDecodeWorkers })
        } else if prefill.is_empty() && sched.enforce_disagg {
            Some(RouteError::PrefillUnavailable)
        } else if best_decode.is_none() || (!prefill.is_empty() && best_prefill.is_none()) {
            Some(RouteError::Overloaded)
        } else {
            None
        };
        let mode = match (&error, prefill.is_empty()) {
            (Some(_), _) => "",
            (None, true) => "aggregated",
            (None, false) => "disaggregated",
        };
        Ok(Response::new(ExplainResponse {
            routing_mode: mode.into(),
            decode: best_decode.filter(|_| error.is_none()),
            prefill: best_prefill.filter(|_| error.is_none()),
            candidates: decode_candidates,
            prefill_candidates,
            prompt_tokens: req.tokens.len() as u32,
            block_size,
            temperature: sched.temperature,
            error: error.map(|e| e.to_string()).unwrap_or_default(),
            policy: match sched.policy {
                RoutingPolicy::Cost => "cost",
                RoutingPolicy::PredictedTtft => "predicted-ttft",
            }
            .into(),
            models,
        }))
    }

    async fn workers(&self, _: Request<WorkersRequest>) -> Result<Response<WorkersResponse>, Status> {
        let router = self.app.router.lock();
        let workers = router
            .workers()
            .iter()
            .flat_map(|w| w.ranks().map(move |r| (w, r)))
            .map(|(w, r)| {
                let l = router.load(&r);
                WorkerStatus {
                    worker_id: w.id.0,
                    dp_rank: r.dp_rank.0,
                    name: w.name.clone(),
                    endpoint: w.endpoint.to_string(),
                    role: match w.role {
                        Role::Worker => "worker",
                        Role::Prefill => "prefill",
                        Role::Decode => "decode",
                    }
                    .into(),
                    active_requests: l.active_requests,
                    active_prefill_tokens: l.active_prefill_tokens,
                    active_decode_blocks: l.active_decode_blocks,
                }
            })
            .collect();
        Ok(Response::new(WorkersResponse { workers, block_size: router.block_size(), index_blocks: router.kv_blocks() as u64 }))
    }

    async fn config(&self, _: Request<ConfigRequest>) -> Result<Response<ConfigResponse>, Status> {
        Ok(Response::new(ConfigResponse { config: Some(self.config.clone()) }))
    }
}

/// A protobuf `Struct` as JSON; integral numbers become JSON integers (protobuf has only doubles,
/// and token ids or `max_tokens` must stay integers).
fn as_json(s: Struct) -> serde_json::Value {
    serde_json::Value::Object(s.fields.into_iter().map(|(k, v)| (k, value_json(v))).collect())
}

fn value_json(v: Value) -> serde_json::Value {
    use serde_json::Value as J;
    match v.kind {
        None | Some(Kind::NullValue(_)) => J::Null,
        Some(Kind::BoolValue(b)) => J::Bool(b),
        Some(Kind::NumberValue(n)) if n.fract() == 0.0 && n.abs() < 9.007_199_254_740_992e15 => J::from(n as i64),
        Some(Kind::NumberValue(n)) => serde_json::Number::from_f64(n).map_or(J::Null, J::Number),
        Some(Kind::StringValue(s)) => J::String(s),
        Some(Kind::ListValue(l)) => J::Array(l.values.into_iter().map(value_json).collect()),
        Some(Kind::StructValue(s)) => as_json(s),
    }
}

/// JSON as a protobuf `Struct` (an object; anything else is an empty one): how a client builds
/// an Explain body.
pub fn as_struct(v: serde_json::Value) -> Struct {
    match json_value(v).kind {
        Some(Kind::StructValue(s)) => s,
        _ => Struct::default(),
    }
}

fn json_value(v: serde_json::Value) -> Value {
    use serde_json::Value as J;
    let kind = match v {
        J::Null => Kind::NullValue(0),
        J::Bool(b) => Kind::BoolValue(b),
        J::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        J::String(s) => Kind::StringValue(s),
        J::Array(a) => Kind::ListValue(ListValue { values: a.into_iter().map(json_value).collect() }),
        J::Object(o) => Kind::StructValue(Struct { fields: o.into_iter().map(|(k, v)| (k, json_value(v))).collect() }),
    };
    Value { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_survives_the_struct_round_trip_with_integers_intact() {
        let j = serde_json::json!({"model": "m", "max_tokens": 5, "temperature": 0.5, "stop": null,
            "messages": [{"role": "user", "content": "hi"}], "nvext": {"token_data": [1, 151643], "flag": true}});
        assert_eq!(as_json(as_struct(j.clone())), j);
        assert_eq!(as_json(as_struct(j.clone()))["max_tokens"].as_u64(), Some(5));
    }
}
