//! Predicted latency (`DYN_ROUTER_POLICY=predicted-ttft`): per worker rank, an online linear
//! model of the time to first token and of the time per output token, learned from what the
//! router itself observes — dispatch to first response chunk, the load booked at dispatch, the
//! tokens the rank had to compute, and the spacing of the streamed output.
//!
//! From first principles: a request's first token comes after the prompt tokens booked ahead of
//! it on that rank and its own uncached tokens are prefilled (time ∝ tokens at the rank's
//! prefill throughput), plus a fixed part per pass that grows with the decode work batched
//! into every pass (∝ the context being decoded). So
//! `TTFT ≈ θ₀ + θ₁·(queued + new prompt k-tokens) + θ₂·(decode context k-tokens)`, and each
//! output token costs `TPOT ≈ φ₀ + φ₁·(decode context) + φ₂·(queued prefill)`. Nothing here
//! knows an engine's constants: the coefficients start from a generic prior and are fitted by
//! recursive least squares with exponential forgetting (a rank that changes speed is followed
//! within tens of samples), residuals clipped at a few typical errors (one stalled request
//! does not wreck the fit), and a covariance that never grows past its prior (no wind-up while
//! a rank sees little variety). A rank with no samples of its own uses the fleet's fit, and
//! starts its own from it. Memory: two fixed-size models per live rank plus the fleet's.

use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;

use crate::workers::WorkerRank;

/// TTFT features: intercept, the wait for the prefill booked ahead (seconds, from the rank's
/// backlog estimate), this request's uncached prompt tokens, decode context, and the product
/// of the last two (more prompt work takes more passes, each slowed by the decode batched
/// into it).
pub const TTFT_FEATURES: usize = 5;
/// TPOT features: intercept, decode context, prompt tokens to prefill.
pub const TPOT_FEATURES: usize = 3;
/// Feature units: prompt tokens in 4 k, decode context in 100 k tokens — a typical prompt
/// and a typical batch are then ~1, which keeps the fit well conditioned.
const PROMPT_UNIT: f64 = 4e3;
const DECODE_UNIT: f64 = 1e5;

/// Samples are weighted by `FORGET^age`: an effective memory of ~50 samples per rank.
const FORGET: f64 = 0.98;
/// Prior variance of each coefficient (ms² per unit²): weak, the first samples dominate.
const PRIOR_VAR: f64 = 1e4;
/// A residual counts at most this many typical residuals (Huber-style clipping).
const CLIP: f64 = 3.0;
/// Weight of a new residual in the running typical residual and in the relative error.
const ERR_GAIN: f64 = 0.05;

/// Generic prior (not any engine's figures): ~10 k prompt tokens/s of prefill, a 25 ms pass,
/// 20 ms per output token. Only the order of magnitude matters; samples replace it.
const TTFT_PRIOR: [f64; TTFT_FEATURES] = [25.0, 1000.0, 400.0, 0.0, 0.0];
const TPOT_PRIOR: [f64; TPOT_FEATURES] = [20.0, 0.0, 0.0];

/// A coefficient's slope is never taken below this share of its prior (or, for a zero prior,
/// below zero): more work never predicts less time.
const MIN_SLOPE_SHARE: f64 = 0.01;

/// Recursive least squares with forgetting, clipped residuals and a bounded covariance.
#[derive(Clone, Debug, PartialEq)]
pub struct Rls<const N: usize> {
    theta: [f64; N],
    /// `theta` as predictions use it (see [`usable`]), kept with every update: a decision
    /// predicts on every rank, a sample updates one.
    coef: [f64; N],
    p: [[f64; N]; N],
    prior: [f64; N],
    /// Running typical absolute residual (ms); residuals are clipped at `CLIP` times it.
    scale: f64,
    /// Running mean of |error| ÷ actual, from predictions made before each update.
    rel_err: f64,
    samples: u64,
}

impl<const N: usize> Rls<N> {
    pub fn new(prior: [f64; N]) -> Self {
        Rls { theta: prior, coef: usable(&prior, &prior), p: prior_covariance(), prior, scale: prior[0].max(1.0), rel_err: 1.0, samples: 0 }
    }

    /// Starts from another model's fit (a rank's first sample, from the fleet's): its
    /// coefficients, and its certainty loosened a few times — the rank may differ, but a
    /// handful of its own samples must not throw a good fit away.
    fn seeded(from: &Rls<N>) -> Self {
        Rls { theta: from.theta, coef: from.coef, p: from.p.map(|row| row.map(|v| v * SEED_LOOSEN)), scale: from.scale, ..Rls::new(from.prior) }
    }

    /// The coefficients used for prediction (see [`usable`]).
    pub fn coefficients(&self) -> &[f64; N] {
        &self.coef
    }

    pub fn predict(&self, x: &[f64; N]) -> f64 {
        self.coef.iter().zip(x).map(|(c, x)| c * x).sum()
    }

    pub fn samples(&self) -> u64 {
        self.samples
    }

    /// Running mean relative error of the predictions this model made before each sample.
    pub fn relative_error(&self) -> f64 {
        self.rel_err
    }

    pub fn update(&mut self, x: &[f64; N], y: f64) {
        if !y.is_finite() || y < 0.0 || x.iter().any(|v| !v.is_finite()) {
            return;
        }
        let before = self.predict(x);
        self.rel_err += ERR_GAIN * ((before - y).abs() / y.max(1e-3) - self.rel_err);
        let e = y - self.theta.iter().zip(x).map(|(t, x)| t * x).sum::<f64>();
        let limit = CLIP * self.scale;
        let clipped = e.clamp(-limit, limit);
        // The typical residual follows big errors (a rank turned slower) a step at a time.
        self.scale += ERR_GAIN * (e.abs().min(2.0 * limit) - self.scale);
        self.scale = self.scale.max(1e-3);
        let px: [f64; N] = std::array::from_fn(|i| (0..N).map(|j| self.p[i][j] * x[j]).sum());
        let denom = FORGET + x.iter().zip(&px).map(|(a, b)| a * b).sum::<f64>();
        let k: [f64; N] = std::array::from_fn(|i| px[i] / denom);
        let theta: [f64; N] = std::array::from_fn(|i| self.theta[i] + k[i] * clipped);
        // P ← (P − k·xᵀP) / λ, kept symmetric; its trace never exceeds the prior's (no
        // wind-up in directions the samples do not excite).
        let mut p = [[0.0; N]; N];
        for i in 0..N {
            for j in 0..N {
                p[i][j] = (self.p[i][j] - k[i] * px[j]) / FORGET;
            }
        }
        for i in 0..N {
            for j in 0..i {
                let m = 0.5 * (p[i][j] + p[j][i]);
                (p[i][j], p[j][i]) = (m, m);
            }
        }
        let trace: f64 = (0..N).map(|i| p[i][i]).sum();
        let sane = theta.iter().chain(p.iter().flatten()).all(|v| v.is_finite()) && (0..N).all(|i| p[i][i] > 0.0);
        if !sane {
            // Numerically lost: keep the last good coefficients, restart the uncertainty.
            self.p = prior_covariance();
            return;
        }
        let cap = N as f64 * PRIOR_VAR;
        if trace > cap {
            p.iter_mut().flatten().for_each(|v| *v *= cap / trace);
        }
        (self.theta, self.coef, self.p) = (theta, usable(&theta, &self.prior), p);
        self.samples += 1;
    }
}

/// Fitted coefficients as predictions use them: slopes kept non-negative (and off zero where
/// the prior is not), the intercept non-negative.
fn usable<const N: usize>(theta: &[f64; N], prior: &[f64; N]) -> [f64; N] {
    std::array::from_fn(|i| theta[i].max(if i == 0 { 0.0 } else { MIN_SLOPE_SHARE * prior[i] }))
}

fn prior_covariance<const N: usize>() -> [[f64; N]; N] {
    std::array::from_fn(|i| std::array::from_fn(|j| if i == j { PRIOR_VAR } else { 0.0 }))
}

/// The request-side inputs of a prediction on one rank, in the models' units (k-tokens).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Inputs {
    /// Prompt tokens booked on the rank and not yet prefilled (ahead of this request).
    pub queued_tokens: u64,
    /// The rank's prefill backlog: how long until the work booked ahead is done (ms).
    pub wait_ms: f64,
    /// This request's prompt tokens the rank does not hold.
    pub new_tokens: u64,
    /// Context tokens of the requests decoding there (active blocks × block size).
    pub decode_tokens: f64,
    /// This request's own context (its prompt), added to the decode load for its TPOT.
    pub own_tokens: u64,
    /// Requests booked on the rank (their decoding waits while this prompt is prefilled).
    pub active_requests: u32,
}

impl Inputs {
    pub fn ttft_x(&self) -> [f64; TTFT_FEATURES] {
        let (prompt, decode) = (self.new_tokens as f64 / PROMPT_UNIT, self.decode_tokens / DECODE_UNIT);
        [1.0, self.wait_ms / 1e3, prompt, decode, prompt * decode]
    }

    pub fn tpot_x(&self) -> [f64; TPOT_FEATURES] {
        [1.0, (self.decode_tokens + self.own_tokens as f64) / DECODE_UNIT, (self.queued_tokens + self.new_tokens) as f64 / PROMPT_UNIT]
    }
}

/// One candidate's predicted latency and its parts (ms).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Prediction {
    pub inputs: Inputs,
    /// Waiting for the prompt tokens booked ahead.
    pub queue_ms: f64,
    /// Prefilling this request's uncached tokens.
    pub prefill_ms: f64,
    /// The fixed part and the decode work batched into the passes.
    pub base_ms: f64,
    pub ttft_ms: f64,
    /// Time per output token there, with this request added.
    pub tpot_ms: f64,
}

/// A rank's fitted models, as the Explain RPC shows them.
#[derive(Clone, Debug, PartialEq)]
pub struct RankModel {
    pub ttft: Rls<TTFT_FEATURES>,
    pub tpot: Rls<TPOT_FEATURES>,
}

impl Default for RankModel {
    fn default() -> Self {
        RankModel { ttft: Rls::new(TTFT_PRIOR), tpot: Rls::new(TPOT_PRIOR) }
    }
}

/// Every live rank's models and prefill backlog, and the fleet-wide models.
#[derive(Clone, Debug, Default)]
pub struct LatencyModels {
    /// One entry per rank: a decision reads each rank's model and backlog with one lookup.
    ranks: FxHashMap<WorkerRank, RankState>,
    fleet: RankModel,
}

#[derive(Clone, Debug, Default)]
struct RankState {
    /// `None` until the rank's first sample (it predicts with the fleet's fit until then).
    model: Option<RankModel>,
    /// When the prefill booked on the rank is expected to be done.
    backlog: Option<Instant>,
}

/// How much less certain a rank's fit starts than the fleet's it is seeded from.
const SEED_LOOSEN: f64 = 4.0;

/// Below this many samples a rank's first sample does not start from the fleet's fit.
const FLEET_SEED_SAMPLES: u64 = 8;

impl LatencyModels {
    /// The model a rank's predictions use: its own once it has samples, else the fleet's.
    pub fn model(&self, r: &WorkerRank) -> &RankModel {
        self.ranks.get(r).and_then(|s| s.model.as_ref()).unwrap_or(&self.fleet)
    }

    pub fn fleet(&self) -> &RankModel {
        &self.fleet
    }

    /// The prediction on `r` for `inputs`, the wait taken from the rank's backlog at `now`
    /// (none without a clock).
    pub fn predict(&self, r: &WorkerRank, mut inputs: Inputs, now: Option<Instant>) -> Prediction {
        // (Before any booking or sample the map is empty: skip hashing the rank.)
        let state = if self.ranks.is_empty() { None } else { self.ranks.get(r) };
        let m = state.and_then(|s| s.model.as_ref()).unwrap_or(&self.fleet);
        inputs.wait_ms = match (state.and_then(|s| s.backlog), now) {
            (Some(end), Some(now)) => end.saturating_duration_since(now).as_secs_f64() * 1e3,
            _ => 0.0,
        };
        let c = m.ttft.coefficients();
        let x = inputs.ttft_x();
        let queue_ms = c[1] * x[1];
        let prefill_ms = (c[2] + c[4] * x[3]) * x[2];
        let base_ms = c[0] + c[3] * x[3];
        Prediction { inputs, queue_ms, prefill_ms, base_ms, ttft_ms: queue_ms + prefill_ms + base_ms, tpot_ms: m.tpot.predict(&inputs.tpot_x()) }
    }

    /// A request with prediction `p` was booked on `r`: its prefill joins the backlog. Returns
    /// when its prefill is expected to be done.
    pub fn book(&mut self, r: WorkerRank, p: &Prediction, now: Instant) -> Instant {
        let end = self.ranks.entry(r).or_default().backlog.get_or_insert(now);
        *end = (*end).max(now) + Duration::from_secs_f64(p.prefill_ms.max(0.0) / 1e3);
        *end
    }

    /// A request booked with prediction `p` ended before its first chunk: its prefill will not
    /// run, so the backlog behind it is that much shorter.
    pub fn unbook(&mut self, r: WorkerRank, p: &Prediction, now: Instant) {
        if let Some(end) = self.ranks.get_mut(&r).and_then(|s| s.backlog.as_mut()) {
            *end = end.checked_sub(Duration::from_secs_f64(p.prefill_ms.max(0.0) / 1e3)).unwrap_or(now).max(now);
        }
    }

    /// A first response chunk came `ttft_ms` after dispatch to `r`, with these inputs then;
    /// its prefill was expected done at `done`, `base_ms` before the chunk. The backlog behind
    /// it moves by the difference (FCFS: whatever was behind it is that much early or late).
    pub fn observe_ttft(&mut self, r: WorkerRank, inputs: &Inputs, ttft_ms: f64, done: Instant, base_ms: f64, now: Instant) {
        let state = self.ranks.entry(r).or_default();
        if let Some(end) = state.backlog.as_mut() {
            let actual_done = now.checked_sub(Duration::from_secs_f64(base_ms.max(0.0) / 1e3)).unwrap_or(now);
            *end = if actual_done >= done { *end + (actual_done - done) } else { end.checked_sub(done - actual_done).unwrap_or(now) }.max(now);
        }
        let m = state.model.get_or_insert_with(RankModel::default);
        learn(&mut m.ttft, &mut self.fleet.ttft, &inputs.ttft_x(), ttft_ms);
    }

    /// A response streamed `generated` tokens, `decode_ms` after its first one.
    pub fn observe_decode(&mut self, r: WorkerRank, inputs: &Inputs, generated: u64, decode_ms: f64) {
        if generated < 2 {
            return;
        }
        let tpot = decode_ms / (generated - 1) as f64;
        let m = self.ranks.entry(r).or_default().model.get_or_insert_with(RankModel::default);
        learn(&mut m.tpot, &mut self.fleet.tpot, &inputs.tpot_x(), tpot);
    }

    /// Forgets ranks that left the fleet.
    pub fn retain(&mut self, keep: impl Fn(&WorkerRank) -> bool) {
        self.ranks.retain(|r, _| keep(r));
    }

    /// Whether a rank has samples of its own.
    pub fn has(&self, r: &WorkerRank) -> bool {
        self.ranks.get(r).is_some_and(|s| s.model.is_some())
    }
}

/// One sample for a rank's model and the fleet's: a rank without samples of its own starts from
/// the fleet's fit once that has enough.
fn learn<const N: usize>(own: &mut Rls<N>, fleet: &mut Rls<N>, x: &[f64; N], y: f64) {
    if own.samples() == 0 && fleet.samples() >= FLEET_SEED_SAMPLES {
        *own = Rls::seeded(fleet);
    }
    own.update(x, y);
    fleet.update(x, y);
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::SmallRng, Rng, SeedableRng};

    /// A made-up engine for the tests (not the simulator's): 40 ms + 0.05 ms per prompt token
    /// + 0.002 ms per decode token, with ±10 % noise.
    fn truth(x: &[f64; TTFT_FEATURES]) -> f64 {
        40.0 + 900.0 * x[1] + 200.0 * x[2] + 20.0 * x[3] + 10.0 * x[4]
    }

    fn sample(rng: &mut SmallRng) -> [f64; TTFT_FEATURES] {
        Inputs { wait_ms: rng.random_range(0.0..3000.0), new_tokens: rng.random_range(0..20_000), decode_tokens: rng.random_range(0.0..5e5), ..Default::default() }.ttft_x()
    }

    #[test]
    fn error_shrinks_as_samples_arrive() {
        let mut rng = SmallRng::seed_from_u64(7);
        let mut m = Rls::new(TTFT_PRIOR);
        let mean_err = |m: &Rls<TTFT_FEATURES>, rng: &mut SmallRng| {
            (0..200).map(|_| { let x = sample(rng); (m.predict(&x) - truth(&x)).abs() / truth(&x) }).sum::<f64>() / 200.0
        };
        let mut errs = vec![mean_err(&m, &mut rng)];
        for n in [20, 60, 200] {
            while m.samples() < n {
                let x = sample(&mut rng);
                m.update(&x, truth(&x) * rng.random_range(0.9..1.1));
            }
            errs.push(mean_err(&m, &mut rng));
        }
        // Falls while the fit is being found; then stays at the noise (forgetting keeps ~50
        // samples' worth, so it plateaus rather than shrinking further).
        assert!(errs[1] < errs[0] && errs[2] < errs[1], "{errs:?}");
        assert!(errs[3] < 0.05, "{errs:?}");
        assert!(m.relative_error() < 0.1, "{}", m.relative_error());
    }

    #[test]
    fn outliers_barely_move_the_fit() {
        let mut rng = SmallRng::seed_from_u64(3);
        let mut m = Rls::new(TTFT_PRIOR);
        for i in 0..400 {
            let x = sample(&mut rng);
            // One request in 20 stalls for 30 s.
            let y = if i % 20 == 19 { 30_000.0 } else { truth(&x) };
            m.update(&x, y);
        }
        let x = Inputs { new_tokens: 8000, decode_tokens: 2e5, ..Default::default() }.ttft_x();
        assert!((m.predict(&x) / truth(&x) - 1.0).abs() < 0.25, "{} vs {}", m.predict(&x), truth(&x));
    }

    #[test]
    fn a_rank_that_turns_twice_slower_is_followed_within_two_hundred_samples() {
        let mut rng = SmallRng::seed_from_u64(5);
        let mut m = Rls::new(TTFT_PRIOR);
        for _ in 0..300 {
            let x = sample(&mut rng);
            m.update(&x, truth(&x));
        }
        for _ in 0..200 {
            let x = sample(&mut rng);
            m.update(&x, 2.0 * truth(&x));
        }
        let x = Inputs { new_tokens: 8000, decode_tokens: 2e5, ..Default::default() }.ttft_x();
        assert!((m.predict(&x) / (2.0 * truth(&x)) - 1.0).abs() < 0.2, "{} vs {}", m.predict(&x), 2.0 * truth(&x));
    }

    #[test]
    fn a_rank_without_samples_predicts_with_the_fleet_fit_and_starts_from_it() {
        let mut ms = LatencyModels::default();
        let (a, b) = (WorkerRank::rank0(1), WorkerRank::rank0(2));
        let mut rng = SmallRng::seed_from_u64(9);
        let now = Instant::now();
        for _ in 0..50 {
            let inputs = Inputs { wait_ms: rng.random_range(0.0..500.0), new_tokens: rng.random_range(0..8000), decode_tokens: rng.random_range(0.0..3e5), ..Default::default() };
            ms.observe_ttft(a, &inputs, truth(&inputs.ttft_x()), now, 0.0, now);
        }
        let i = Inputs { new_tokens: 4000, ..Default::default() };
        assert_eq!(ms.predict(&b, i, None), ms.predict(&WorkerRank::rank0(99), i, None));
        assert!((ms.predict(&b, i, None).ttft_ms / truth(&i.ttft_x()) - 1.0).abs() < 0.1);
        ms.observe_ttft(b, &i, truth(&i.ttft_x()), now, 0.0, now);
        assert!((ms.predict(&b, i, None).ttft_ms / truth(&i.ttft_x()) - 1.0).abs() < 0.1);
        ms.retain(|r| *r == b);
        assert!(ms.has(&b) && !ms.has(&a));
    }
}
