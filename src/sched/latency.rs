//! Predicted latency (`DYN_ROUTER_POLICY=predicted-ttft`): an online model of the time to first
//! token, fitted once for the whole fleet and scaled by each rank's speed, and per rank a model
//! of the time per output token — learned from what the router itself observes: dispatch to
//! first response chunk, the load booked at dispatch, the tokens the rank had to compute, and
//! the spacing of the streamed output.
//!
//! From first principles: an engine with chunked prefill runs the prompt tokens booked on a rank
//! and then this request's uncached ones in passes of at most `max_num_batched_tokens`; each
//! pass costs a fixed part, a part per token, a part growing with the square of its tokens
//! (attention), and the decode batch it carries (∝ the context being decoded). With work =
//! booked-not-prefilled + uncached tokens and passes = ⌈work ÷ batch⌉:
//! `TTFT ≈ θ₀ + θ₁·(passes − 1) + θ₂·work + θ₃·Σ(tokens per pass)² + θ₄·passes·decode context`.
//! Those coefficients belong to the engine and the model, the same on every rank serving them,
//! so one fit pools every rank's samples: a rank's own fit mistakes the load it happened to see
//! for its speed (docs/routing-policy.md, fifth session). What ranks do differ in is speed: a
//! factor per rank, learned only from isolated prefills (nothing else on the rank from dispatch
//! to first token, where no load can pass for slowness) as a clipped running mean of ln(actual
//! ÷ the prediction of a fit on isolated prefills alone, in relative error), taken relative to
//! the fleet's mean (to that fit while fewer than two ranks' speeds count), read as exactly 1
//! inside a dead band (identical ranks predict identically), and fading back to 1 while the
//! rank gets no isolated sample (a rank read slower is avoided and rarely idle: only time can
//! correct it). The fits learn TTFT ÷ factor.
//!
//! Nothing here knows an engine's constants: the coefficients start from a generic prior and
//! are fitted by recursive least squares with exponential forgetting (a change of speed is
//! followed within tens of samples), residuals clipped at a few typical errors (one stalled
//! request does not wreck the fit), and a covariance that never grows past its prior (no
//! wind-up while the samples show little variety). A rank's TPOT model starts from the fleet's.
//! Memory: the fleet's three models, and per live rank one TPOT model and its speed.

use std::time::Instant;

use rustc_hash::FxHashMap;

use crate::workers::WorkerRank;

/// TTFT features: intercept, passes beyond the first, work (prompt tokens to prefill up to and
/// including this request's), Σ over the passes of (tokens in the pass)², and passes × decode
/// context.
pub const TTFT_FEATURES: usize = 5;
/// TPOT features: intercept, decode context, prompt tokens to prefill.
pub const TPOT_FEATURES: usize = 3;
/// Feature units: prompt tokens in 4 k, decode context in 100 k tokens — a typical prompt
/// and a typical batch are then ~1, which keeps the fit well conditioned.
const PROMPT_UNIT: f64 = 4e3;
const DECODE_UNIT: f64 = 1e5;

/// The pass size when a worker declares no `max_num_batched_tokens` (workers file, pod
/// annotation or `DYN_EPP_MAX_NUM_BATCHED_TOKENS`): vLLM's default for its OpenAI server on
/// large (≥ 70 GB) GPUs. A wrong value shifts time between the per-pass and per-token
/// coefficients; the fit absorbs most of it.
pub const DEFAULT_BATCH_TOKENS: u64 = 8192;

/// Samples are weighted by `FORGET^age`: an effective memory of ~50 samples per rank.
const FORGET: f64 = 0.98;
/// Prior variance of each coefficient (ms² per unit²): weak, the first samples dominate.
const PRIOR_VAR: f64 = 1e4;
/// A residual counts at most this many typical residuals (Huber-style clipping).
const CLIP: f64 = 3.0;
/// Weight of a new residual in the running typical residual and in the relative error.
const ERR_GAIN: f64 = 0.05;

/// Generic prior (not any engine's figures): ~10 k prompt tokens/s of prefill, 25 ms per pass,
/// 20 ms per output token. Only the order of magnitude matters; samples replace it.
const TTFT_PRIOR: [f64; TTFT_FEATURES] = [25.0, 25.0, 400.0, 0.0, 0.0];
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

    /// The fit itself at `x`, without the floors [`usable`] puts under predictions: where the
    /// samples all lie along a few directions (one prompt length), the fit reaches them with
    /// a negative coefficient that the floors would undo, leaving the prediction far off every
    /// sample it was fitted to.
    fn fitted(&self, x: &[f64; N]) -> f64 {
        self.theta.iter().zip(x).map(|(t, x)| t * x).sum()
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
        let e = y - self.fitted(x);
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
        let raw = |i: usize, j: usize| (self.p[i][j] - k[i] * px[j]) / FORGET;
        let mut p: [[f64; N]; N] = std::array::from_fn(|i| std::array::from_fn(|j| 0.5 * (raw(i, j) + raw(j, i))));
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

/// The request-side inputs of a prediction on one rank.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Inputs {
    /// Prompt tokens booked on the rank and not yet prefilled (ahead of this request).
    pub queued_tokens: u64,
    /// This request's prompt tokens the rank does not hold.
    pub new_tokens: u64,
    /// Context tokens of the requests booked there (active blocks × block size).
    pub decode_tokens: f64,
    /// This request's own context (its prompt), added to the decode load for its TPOT.
    pub own_tokens: u64,
    /// Requests booked on the rank (their decoding waits while this prompt is prefilled).
    pub active_requests: u32,
    /// Requests booked on the rank whose prompt is still being prefilled.
    pub prefilling_requests: u32,
    /// The rank's pass size: its worker's `max_num_batched_tokens`.
    pub batch_tokens: u64,
}

impl Inputs {
    pub fn ttft_x(&self) -> [f64; TTFT_FEATURES] {
        self.ttft_x_for(self.queued_tokens + self.new_tokens)
    }

    /// The TTFT features of `work` prompt tokens prefilled FCFS in passes of `batch_tokens`
    /// (at least one pass: the first token comes from one).
    fn ttft_x_for(&self, work: u64) -> [f64; TTFT_FEATURES] {
        // One pass and no prompt work (a decision asks this of every candidate): no division.
        if work == 0 {
            return [1.0, 0.0, 0.0, 0.0, self.decode_tokens / DECODE_UNIT];
        }
        let batch = self.batch_tokens.max(1);
        // One integer division for the passes and the last one's size (a decision asks for
        // several of these per candidate).
        let (full, rest) = (work / batch, work % batch);
        let passes = full + u64::from(rest > 0);
        let rest = rest as f64 / PROMPT_UNIT;
        let squares = full as f64 * (batch as f64 / PROMPT_UNIT).powi(2) + rest * rest;
        [1.0, (passes - 1) as f64, work as f64 / PROMPT_UNIT, squares, passes as f64 * self.decode_tokens / DECODE_UNIT]
    }

    /// Nothing booked on the rank at dispatch (the router also checks that nothing came
    /// before the first token): its TTFT then shows the rank's speed alone.
    pub fn isolated(&self) -> bool {
        self.active_requests == 0
    }

    pub fn tpot_x(&self) -> [f64; TPOT_FEATURES] {
        [1.0, (self.decode_tokens + self.own_tokens as f64) / DECODE_UNIT, (self.queued_tokens + self.new_tokens) as f64 / PROMPT_UNIT]
    }
}

/// One candidate's predicted latency and its parts (ms).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Prediction {
    pub inputs: Inputs,
    /// Prefilling the prompt tokens booked ahead (their passes).
    pub queue_ms: f64,
    /// Prefilling this request's uncached tokens (the time it adds to the rank's passes).
    pub prefill_ms: f64,
    /// One pass's fixed part and the decode work batched into it.
    pub base_ms: f64,
    /// queue + prefill + base: the fleet's prediction × the rank's speed factor.
    pub ttft_ms: f64,
    /// The rank's speed factor the parts are scaled by (1: as fast as the fleet's mean).
    pub speed: f64,
    /// What this prompt's first chunk adds to the pass that ends the booked prompts' prefill
    /// (FCFS: it takes the room left in their last pass), × the prompts that pass ends — all
    /// those prefilling when the booked work is under one pass, else the last one: their
    /// delay, which their own predictions could not see. Not part of `ttft_ms`.
    pub join_ms: f64,
    /// Time per output token there, with this request added.
    pub tpot_ms: f64,
}

/// A rank's models as predictions use them (and the Explain RPC shows them): the fleet's TTFT
/// fit, the rank's speed factor, its TPOT fit (else the fleet's).
#[derive(Clone, Copy, Debug)]
pub struct RankModel<'a> {
    pub ttft: &'a Rls<TTFT_FEATURES>,
    pub speed: f64,
    /// Isolated prefills the speed was learned from.
    pub speed_samples: u64,
    pub tpot: &'a Rls<TPOT_FEATURES>,
}

/// A rank's speed relative to the fleet, learned from isolated prefills.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Speed {
    /// Running mean of ln(actual TTFT ÷ the isolated fit's prediction).
    log: f64,
    samples: u64,
    /// When the last isolated sample came: the speed fades toward the fleet's as it ages.
    last: Option<Instant>,
    /// What predictions multiply by: exp(`log` − the fleet's mean) × its freshness, 1 inside
    /// the dead band.
    factor: f64,
}

impl Default for Speed {
    fn default() -> Self {
        Speed { log: 0.0, samples: 0, last: None, factor: 1.0 }
    }
}

/// Weight of a new isolated sample in a rank's speed once it has 1 ÷ this many (before that,
/// the plain mean of its samples): a memory of ~20 isolated prefills.
const SPEED_GAIN: f64 = 0.05;
/// A rank's speed counts once it has this many isolated samples (one prompt the fit
/// mispredicts is not a speed); until then it reads 1. (The sixth and seventh sessions needed
/// 20: their reference erred by prompt length and their "isolated" samples shared passes with
/// later arrivals, so ranks holding hot prefixes read 1.8–2× slower from a few odd samples;
/// docs/routing-policy.md, eighth session.)
const SPEED_MIN_SAMPLES: u64 = 3;
/// A sample moves the speed by at most this far from it (ln 4): a stalled request is not a
/// slow rank, and a rank 4× slower still reads so within a few dozen samples.
const SPEED_CLIP: f64 = 1.386_294_361_119_890_6;
/// |ln factor| below this (ln 1.105) reads exactly 1: identical ranks, which differ only by
/// the prompts they happened to be sent, must not be told apart by noise. Narrower than the
/// sixth session's ln 1.3, which hid half of a 2× speed difference (±ln √2 about the mean):
/// the fade below keeps a wrong reading from lasting (docs/routing-policy.md, seventh session).
const SPEED_DEAD_BAND: f64 = 0.1;
/// A speed stays whole this long after its rank's last isolated sample, then fades toward
/// the fleet's with this time constant; the rank's next sample counts against its old samples
/// × that freshness, and their mean fades with them (else one sample would restore the old
/// reading whole). A rank read slower gets fewer requests and is rarely idle when it does (the
/// ranks holding hot prefixes): without the fade nothing corrects a wrong reading (the
/// feedback trap, sixth session). Real time, not samples: a rank avoided gets no samples.
const SPEED_GRACE_S: f64 = 30.0;
const SPEED_FADE_S: f64 = 60.0;

impl Speed {
    /// Whether the rank has enough isolated samples for its speed to count.
    fn counts(&self) -> bool {
        self.samples >= SPEED_MIN_SAMPLES
    }

    /// How much of the speed still holds at `now` (1 until the grace ends, then fading to 0).
    fn freshness(&self, now: Instant) -> f64 {
        self.last.map_or(1.0, |t| (-(now.saturating_duration_since(t).as_secs_f64() - SPEED_GRACE_S).max(0.0) / SPEED_FADE_S).exp())
    }

    fn learn(&mut self, ln_ratio: f64, now: Instant) {
        let fresh = self.freshness(now);
        let held = self.samples as f64 * fresh;
        self.log *= fresh;
        self.samples += 1;
        self.last = Some(now);
        let gain = (1.0 / (held + 1.0)).max(SPEED_GAIN);
        self.log += gain * (ln_ratio - self.log).clamp(-SPEED_CLIP, SPEED_CLIP);
    }
}

/// The fleet's models and every live rank's speed and TPOT fit.
#[derive(Clone, Debug)]
pub struct LatencyModels {
    /// One entry per rank: a decision reads each rank's factor and TPOT fit with one lookup.
    ranks: FxHashMap<WorkerRank, RankState>,
    /// The TTFT fit: every rank's samples, each divided by its rank's factor.
    ttft: Rls<TTFT_FEATURES>,
    /// The same fit on isolated prefills only, in relative error: what a rank's speed is
    /// measured against. The fleet's fit is a compromise over every load it saw; on lone
    /// prompts it errs by prompt length, and ranks sent different lengths would read different
    /// speeds. Fitted in ms, a 3 s prompt's residual outweighed a 30 ms one's 10⁴ times: on the
    /// simulator's synthetic trace actual ÷ this fit was 0.81 under 64 tokens, 1.19 at 1–4 k,
    /// 0.54 past 16 k (relative: 1.01, 0.95, 0.94; docs/routing-policy.md, eighth session).
    isolated: Rls<TTFT_FEATURES>,
    /// Every rank's TPOT samples: what a rank without its own predicts with and starts from.
    tpot: Rls<TPOT_FEATURES>,
    /// The latest time passed in (the factors' freshness is reckoned from it).
    clock: Option<Instant>,
    /// What a rank without a speed of its own predicts with: 1 (the fleet's mean) once two
    /// ranks count; before, the lone counting rank's factor if it reads faster (see
    /// [`Self::refresh`]). A lone rank read faster than the fit would otherwise beat every rank
    /// never tried, forever, and they could never show their speed (an interop run once sent
    /// all 40 requests to the slower of two mockers).
    untried: f64,
}

impl Default for LatencyModels {
    fn default() -> Self {
        LatencyModels { ranks: FxHashMap::default(), ttft: Rls::new(TTFT_PRIOR), isolated: Rls::new(TTFT_PRIOR), tpot: Rls::new(TPOT_PRIOR), clock: None, untried: 1.0 }
    }
}

#[derive(Clone, Debug, Default)]
struct RankState {
    speed: Speed,
    /// `None` until the rank's first TPOT sample (it predicts with the fleet's fit until then).
    tpot: Option<Rls<TPOT_FEATURES>>,
}

/// How much less certain a rank's fit starts than the fleet's it is seeded from.
const SEED_LOOSEN: f64 = 4.0;

/// Below this many samples the fleet's fit is no reference: a rank's first TPOT sample does
/// not start from it.
const FLEET_SEED_SAMPLES: u64 = 8;
/// Below this many isolated prefills the isolated fit is no reference: no rank's speed is
/// measured against it (against the prior, the first ranks sampled would read far off the
/// ones sampled later). Fewer than the fleet's 8: fitted in relative error it is close from
/// its first samples, and two workers must be told apart within a few dozen requests (8:
/// same keep-rule outcome, the slower of two real mockers served 5–8 of 40 instead of ≤ 8 with
/// margin; docs/routing-policy.md, eighth session).
const SPEED_REFERENCE_SAMPLES: u64 = 3;

impl LatencyModels {
    /// The models a rank's predictions use.
    pub fn model(&self, r: &WorkerRank) -> RankModel<'_> {
        let state = self.ranks.get(r);
        RankModel {
            ttft: &self.ttft,
            speed: self.speed(state),
            speed_samples: state.map_or(0, |s| s.speed.samples),
            tpot: state.and_then(|s| s.tpot.as_ref()).unwrap_or(&self.tpot),
        }
    }

    /// The fleet's models (a rank of factor 1 without a TPOT fit of its own).
    pub fn fleet(&self) -> RankModel<'_> {
        RankModel { ttft: &self.ttft, speed: 1.0, speed_samples: 0, tpot: &self.tpot }
    }

    /// The prediction on `r` for `inputs`.
    pub fn predict(&self, r: &WorkerRank, inputs: Inputs) -> Prediction {
        // (Before any sample the map is empty: skip hashing the rank.)
        let state = if self.ranks.is_empty() { None } else { self.ranks.get(r) };
        let speed = self.speed(state);
        let tpot = state.and_then(|s| s.tpot.as_ref()).unwrap_or(&self.tpot);
        let total = self.ttft.predict(&inputs.ttft_x());
        // The parts: one pass with no prompt work, then the booked work alone, then this
        // prompt's (every coefficient is non-negative, so none is negative).
        let base = self.ttft.predict(&inputs.ttft_x_for(0));
        let ahead = if inputs.queued_tokens == 0 { base } else { self.ttft.predict(&inputs.ttft_x_for(inputs.queued_tokens)) };
        let (queued, batch) = (inputs.queued_tokens, inputs.batch_tokens.max(1));
        // Booked work ending on a pass boundary (or none) leaves no room: the chunk starts a pass.
        let chunk = if queued == 0 { 0 } else { inputs.new_tokens.min((batch - queued % batch) % batch) };
        let join = if chunk == 0 {
            0.0
        } else {
            let ended = if queued < batch { inputs.prefilling_requests.max(1) } else { 1 };
            // The whole prompt fits in that pass: the joined work is the prompt's own TTFT's.
            let joined = if chunk == inputs.new_tokens { total } else { self.ttft.predict(&inputs.ttft_x_for(queued + chunk)) };
            ended as f64 * (joined - ahead)
        };
        Prediction {
            inputs,
            queue_ms: speed * (ahead - base),
            prefill_ms: speed * (total - ahead),
            base_ms: speed * base,
            ttft_ms: speed * total,
            speed,
            join_ms: speed * join,
            tpot_ms: tpot.predict(&inputs.tpot_x()),
        }
    }

    /// A first response chunk came `ttft_ms` after dispatch to `r`, with these inputs then;
    /// `isolated`: nothing else was on the rank from dispatch to this chunk (the caller knows
    /// what arrived meanwhile: a request booked there after this one shares its passes). An
    /// isolated prefill first teaches the rank's speed (against the isolated fit before this
    /// sample); the fits then learn the TTFT at the fleet's speed.
    pub fn observe_ttft(&mut self, r: WorkerRank, inputs: &Inputs, ttft_ms: f64, isolated: bool, now: Instant) {
        if !(ttft_ms.is_finite() && ttft_ms > 0.0) {
            return;
        }
        let x = inputs.ttft_x();
        if isolated {
            let reference = self.isolated.fitted(&x);
            if reference > 0.0 && self.isolated.samples() >= SPEED_REFERENCE_SAMPLES {
                self.ranks.entry(r).or_default().speed.learn((ttft_ms / reference).ln(), now);
                self.refresh(now);
            }
            // Each sample weighed by 1 ÷ the larger of its prediction and its time: residuals
            // relative, so a 30 ms prompt counts as much as a 3 s one (and a stall little).
            let y = ttft_ms / self.factor(&r);
            let w = 1.0 / reference.max(y).max(1.0);
            self.isolated.update(&x.map(|v| v * w), y * w);
        }
        self.ttft.update(&x, ttft_ms / self.factor(&r));
    }

    fn factor(&self, r: &WorkerRank) -> f64 {
        self.ranks.get(r).map_or(1.0, |s| s.speed.factor)
    }

    /// Every rank's factor at `now`, from its speed relative to the mean of the ranks with
    /// enough samples (the fits are the mean rank's: a bias every rank shares is the fit's,
    /// not a speed) — relative to the isolated fit itself while fewer than two count (a lone
    /// counting rank would be its own reference and read 1) — faded by its age. A rank with
    /// fewer samples reads 1. The router calls this at least once a second; a sample calls it
    /// too.
    pub fn refresh(&mut self, now: Instant) {
        let now = self.clock.map_or(now, |c| c.max(now));
        self.clock = Some(now);
        let known = |s: &RankState| s.speed.counts();
        let (sum, n) = self.ranks.values().filter(|s| known(s)).fold((0.0, 0u32), |(sum, n), s| (sum + s.speed.log, n + 1));
        let mean = if n < 2 { 0.0 } else { sum / n as f64 };
        for s in self.ranks.values_mut() {
            let rel = if known(s) { (s.speed.log - mean) * s.speed.freshness(now) } else { 0.0 };
            s.speed.factor = if rel.abs() < SPEED_DEAD_BAND { 1.0 } else { rel.exp() };
        }
        // A lone counting rank is read against the isolated fit, which is made of its own
        // samples: any reading is self-consistent there, and one below 1 would lock out every
        // rank never tried. From two on, speeds are relative to their mean: 1 is the fleet's.
        self.untried = if n < 2 { self.ranks.values().filter(|s| known(s)).map(|s| s.speed.factor).fold(1.0, f64::min) } else { 1.0 };
    }

    /// The factor a rank's predictions multiply by: its own once it has enough isolated
    /// samples, else [`Self::untried`]'s.
    fn speed(&self, state: Option<&RankState>) -> f64 {
        state.filter(|s| s.speed.counts()).map_or(self.untried, |s| s.speed.factor)
    }

    /// A response streamed `generated` tokens, `decode_ms` after its first one.
    pub fn observe_decode(&mut self, r: WorkerRank, inputs: &Inputs, generated: u64, decode_ms: f64) {
        if generated < 2 {
            return;
        }
        let tpot = decode_ms / (generated - 1) as f64;
        let own = self.ranks.entry(r).or_default().tpot.get_or_insert_with(|| Rls::new(TPOT_PRIOR));
        learn(own, &mut self.tpot, &inputs.tpot_x(), tpot);
    }

    /// Forgets ranks that left the fleet (the others' factors are then relative to those left).
    pub fn retain(&mut self, keep: impl Fn(&WorkerRank) -> bool) {
        let before = self.ranks.len();
        self.ranks.retain(|r, _| keep(r));
        if let (true, Some(now)) = (self.ranks.len() != before, self.clock) {
            self.refresh(now);
        }
    }

    /// Whether a rank has samples of its own (isolated prefills or output spacing).
    pub fn has(&self, r: &WorkerRank) -> bool {
        self.ranks.get(r).is_some_and(|s| s.speed.samples > 0 || s.tpot.is_some())
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
    use std::time::Duration;

    /// A made-up engine for the tests (not the simulator's): 40 ms a pass, 30 ms more per
    /// further pass, 50 ms per 1 k prompt tokens, 10 ms per (4 k tokens in a pass)², 20 ms per
    /// pass per 100 k decode tokens.
    fn truth(x: &[f64; TTFT_FEATURES]) -> f64 {
        40.0 + 30.0 * x[1] + 200.0 * x[2] + 10.0 * x[3] + 20.0 * x[4]
    }

    fn inputs(rng: &mut SmallRng) -> Inputs {
        // One sample in four isolated (nothing booked), as a lightly loaded fleet sees them.
        let busy = rng.random_range(0..4) != 0;
        Inputs {
            queued_tokens: if busy { rng.random_range(0..20_000) } else { 0 },
            new_tokens: rng.random_range(1..20_000),
            decode_tokens: if busy { rng.random_range(0.0..5e5) } else { 0.0 },
            active_requests: if busy { rng.random_range(1..30) } else { 0 },
            batch_tokens: 8192,
            ..Default::default()
        }
    }

    fn sample(rng: &mut SmallRng) -> [f64; TTFT_FEATURES] {
        inputs(rng).ttft_x()
    }

    #[test]
    fn the_features_follow_chunked_prefill_in_passes_of_the_batch() {
        let i = |queued, new| Inputs { queued_tokens: queued, new_tokens: new, decode_tokens: 50_000.0, batch_tokens: 8000, ..Default::default() };
        // One pass: 6 k tokens, (1.5)², decode 0.5 once.
        assert_eq!(i(2000, 4000).ttft_x(), [1.0, 0.0, 1.5, 2.25, 0.5]);
        // Exactly one batch, then one token more: a second pass of 1 token.
        assert_eq!(i(0, 8000).ttft_x(), [1.0, 0.0, 2.0, 4.0, 0.5]);
        assert_eq!(i(0, 8001).ttft_x(), [1.0, 1.0, 8001.0 / 4000.0, 4.0 + (1.0f64 / 4000.0).powi(2), 1.0]);
        // 20 k booked + new: passes of 8 k, 8 k, 4 k.
        assert_eq!(i(14_000, 6000).ttft_x(), [1.0, 2.0, 5.0, 4.0 + 4.0 + 1.0, 1.5]);
        // No work still takes the pass that yields the first token.
        assert_eq!(i(0, 0).ttft_x(), [1.0, 0.0, 0.0, 0.0, 0.5]);
    }

    #[test]
    fn the_parts_add_up_to_the_prediction_and_split_at_the_booked_work() {
        let mut ms = LatencyModels::default();
        let mut rng = SmallRng::seed_from_u64(2);
        let t0 = Instant::now();
        for n in 0..300 {
            let i = inputs(&mut rng);
            ms.observe_ttft(WorkerRank::rank0(1), &i, truth(&i.ttft_x()), i.isolated(), t0 + Duration::from_millis(10 * n));
        }
        let i = Inputs { queued_tokens: 12_000, new_tokens: 9000, decode_tokens: 2e5, batch_tokens: 8192, ..Default::default() };
        let p = ms.predict(&WorkerRank::rank0(1), i);
        let alone = ms.predict(&WorkerRank::rank0(1), Inputs { new_tokens: 0, ..i });
        assert!((p.queue_ms + p.prefill_ms + p.base_ms - p.ttft_ms).abs() < 1e-9);
        // The queue part is the booked work's own prediction without its base.
        assert!((p.queue_ms - (alone.ttft_ms - alone.base_ms)).abs() < 1e-9, "{p:?} {alone:?}");
        assert!(p.prefill_ms > 0.0 && p.queue_ms > 0.0 && p.base_ms > 0.0);
        assert!((p.ttft_ms / truth(&i.ttft_x()) - 1.0).abs() < 0.05, "{} vs {}", p.ttft_ms, truth(&i.ttft_x()));
    }

    #[test]
    fn a_first_chunk_joining_the_booked_prompts_last_pass_delays_each_prompt_that_pass_ends() {
        // The prior: 25 ms a pass, 25 ms per extra pass, 400 ms per 4 k tokens, no squares.
        let ms = LatencyModels::default();
        let r = WorkerRank::rank0(1);
        let i = |queued, new, prefilling| Inputs { queued_tokens: queued, new_tokens: new, prefilling_requests: prefilling, batch_tokens: 8192, ..Default::default() };
        let join = |i| ms.predict(&r, i).join_ms;
        // Two prompts (2,000 tokens) in one pass: 3,000 more tokens delay both by 300 ms.
        assert!((join(i(2000, 3000, 2)) - 600.0).abs() < 1e-9, "{}", join(i(2000, 3000, 2)));
        // Only the 6,192 tokens of room join: the rest runs in a pass of its own.
        assert!((join(i(2000, 9000, 1)) - 619.2).abs() < 1e-9, "{}", join(i(2000, 9000, 1)));
        // Over a pass booked: only the last prompt ends in the joined pass.
        assert!((join(i(10_000, 3000, 3)) - 300.0).abs() < 1e-9, "{}", join(i(10_000, 3000, 3)));
        // Nothing booked, or booked work ending on a pass boundary: no pass to join.
        assert_eq!((join(i(0, 3000, 0)), join(i(8192, 3000, 1))), (0.0, 0.0));
        // The delay is not part of the prompt's own TTFT (2,000 + 3,000 tokens, one pass).
        assert_eq!(ms.predict(&r, i(2000, 3000, 2)).ttft_ms, 25.0 + 500.0);
    }

    #[test]
    fn error_shrinks_as_samples_arrive() {
        let mut rng = SmallRng::seed_from_u64(7);
        let mut m = Rls::new(TTFT_PRIOR);
        let mean_err = |m: &Rls<TTFT_FEATURES>, rng: &mut SmallRng| {
            (0..200).map(|_| { let x = sample(rng); (m.predict(&x) - truth(&x)).abs() / truth(&x) }).sum::<f64>() / 200.0
        };
        let mut errs = vec![mean_err(&m, &mut rng)];
        // (Not before ~50 samples: with five features of very different spreads, the first
        // twenty can overshoot the prior's error before the fit settles — 4.6 against 0.56
        // here.)
        for n in [60, 120, 300] {
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
        let x = Inputs { new_tokens: 8000, decode_tokens: 2e5, batch_tokens: 8192, ..Default::default() }.ttft_x();
        assert!((m.predict(&x) / truth(&x) - 1.0).abs() < 0.25, "{} vs {}", m.predict(&x), truth(&x));
    }

    /// Feeds `n` requests 10 ms apart from `*now` on (advanced past them), each to a random
    /// rank of `ranks`, whose actual TTFT is the made-up engine's × `slowness(rank)` × ±10 %
    /// noise.
    fn feed(ms: &mut LatencyModels, rng: &mut SmallRng, now: &mut Instant, ranks: &[u64], n: usize, slowness: impl Fn(u64) -> f64) {
        for _ in 0..n {
            let r = ranks[rng.random_range(0..ranks.len())];
            let i = inputs(rng);
            *now += Duration::from_millis(10);
            ms.observe_ttft(WorkerRank::rank0(r), &i, truth(&i.ttft_x()) * slowness(r) * rng.random_range(0.9..1.1), i.isolated(), *now);
        }
    }

    #[test]
    fn identical_ranks_read_exactly_one_and_predict_identically() {
        let mut ms = LatencyModels::default();
        let mut rng = SmallRng::seed_from_u64(9);
        let mut now = Instant::now();
        feed(&mut ms, &mut rng, &mut now, &[1, 2, 3, 4, 5, 6, 7, 8], 4000, |_| 1.0);
        let i = Inputs { queued_tokens: 3000, new_tokens: 5000, decode_tokens: 1e5, batch_tokens: 8192, ..Default::default() };
        for r in 1..=8 {
            let rank = WorkerRank::rank0(r);
            assert!(ms.model(&rank).speed_samples > 50, "{r}");
            assert_eq!(ms.model(&rank).speed, 1.0, "{r}");
            assert_eq!(ms.predict(&rank, i), ms.predict(&WorkerRank::rank0(99), i));
        }
    }

    #[test]
    fn a_slower_rank_reads_its_speed_and_the_fleet_fit_stays_the_mean_ranks() {
        // Half the ranks 2× slower: each reads ≈ √2 slower or faster than the fleet's mean,
        // and the fleet's fit (TTFT ÷ factor) is the mean rank's, √2 × the fast engine.
        let mut ms = LatencyModels::default();
        let mut rng = SmallRng::seed_from_u64(4);
        let mut now = Instant::now();
        feed(&mut ms, &mut rng, &mut now, &[1, 2, 3, 4], 4000, |r| if r > 2 { 2.0 } else { 1.0 });
        for r in 1..=4 {
            let want = if r > 2 { 2f64.sqrt() } else { 0.5f64.sqrt() };
            assert!((ms.model(&WorkerRank::rank0(r)).speed / want - 1.0).abs() < 0.1, "{r}: {}", ms.model(&WorkerRank::rank0(r)).speed);
        }
        let i = Inputs { new_tokens: 6000, decode_tokens: 1e5, batch_tokens: 8192, ..Default::default() };
        let (fast, slow) = (ms.predict(&WorkerRank::rank0(1), i).ttft_ms, ms.predict(&WorkerRank::rank0(4), i).ttft_ms);
        assert!((fast / truth(&i.ttft_x()) - 1.0).abs() < 0.15 && (slow / (2.0 * truth(&i.ttft_x())) - 1.0).abs() < 0.15, "{fast} {slow}");
    }

    #[test]
    fn load_never_passes_for_slowness() {
        // Rank 1's loaded requests take 3× what the fleet's fit expects (say, something the
        // features miss): its speed learns only from isolated prefills, so it stays 1.
        let mut ms = LatencyModels::default();
        let mut rng = SmallRng::seed_from_u64(5);
        let t0 = Instant::now();
        for n in 0..4000 {
            let r = rng.random_range(1..=4);
            let i = inputs(&mut rng);
            let y = truth(&i.ttft_x()) * if r == 1 && !i.isolated() { 3.0 } else { 1.0 };
            ms.observe_ttft(WorkerRank::rank0(r), &i, y, i.isolated(), t0 + Duration::from_millis(10 * n));
        }
        assert!(ms.model(&WorkerRank::rank0(1)).speed_samples > 50);
        assert_eq!(ms.model(&WorkerRank::rank0(1)).speed, 1.0);
    }

    #[test]
    fn a_rank_that_turns_twice_slower_is_read_so_within_a_bounded_number_of_requests() {
        let mut ms = LatencyModels::default();
        let mut rng = SmallRng::seed_from_u64(6);
        let mut now = Instant::now();
        feed(&mut ms, &mut rng, &mut now, &[1, 2, 3, 4], 1000, |_| 1.0);
        assert_eq!(ms.model(&WorkerRank::rank0(1)).speed, 1.0);
        // Rank 1 turns 2× slower; a quarter of the requests go to it, a quarter of those are
        // isolated: past the dead band within ~15 of its isolated samples.
        let mut turned = None;
        for n in 1..=1000 {
            feed(&mut ms, &mut rng, &mut now, &[1, 2, 3, 4], 1, |r| if r == 1 { 2.0 } else { 1.0 });
            if ms.model(&WorkerRank::rank0(1)).speed > 1.3 {
                turned = Some(n);
                break;
            }
        }
        assert!(turned.is_some_and(|n| n < 500), "{turned:?}");
        // Meanwhile the others stay 1.
        assert!((2..=4).all(|r| ms.model(&WorkerRank::rank0(r)).speed == 1.0));
    }

    #[test]
    fn a_speed_and_its_mean_fade_while_its_rank_gets_no_isolated_sample() {
        // Rank 1 of 4 is 2× slower: ln 2 − ln 2/4 = 0.52 above the mean.
        let mut ms = LatencyModels::default();
        let mut rng = SmallRng::seed_from_u64(8);
        let mut now = Instant::now();
        feed(&mut ms, &mut rng, &mut now, &[1, 2, 3, 4], 2000, |r| if r == 1 { 2.0 } else { 1.0 });
        let rank1 = WorkerRank::rank0(1);
        let read = ms.model(&rank1).speed;
        assert!((read.ln() / 0.52 - 1.0).abs() < 0.15, "{read}");
        // Then it gets no request (the others do): whole through the grace, then fading.
        let last = ms.ranks[&rank1].speed.last.unwrap();
        let at = |s: f64| last + Duration::from_secs_f64(s);
        feed(&mut ms, &mut rng, &mut now, &[2, 3, 4], 2000, |_| 1.0);
        ms.refresh(at(SPEED_GRACE_S - 1.0));
        let whole = ms.model(&rank1).speed;
        assert!((whole / read - 1.0).abs() < 0.02, "{whole} {read}");
        ms.refresh(at(SPEED_GRACE_S + SPEED_FADE_S));
        let faded = ms.model(&rank1).speed;
        assert!((faded.ln() / (whole.ln() / std::f64::consts::E) - 1.0).abs() < 1e-9, "{faded} from {whole}");
        // Below the dead band: exactly 1 (identical to a rank never seen).
        ms.refresh(at(SPEED_GRACE_S + 3.0 * SPEED_FADE_S));
        assert_eq!(ms.model(&rank1).speed, 1.0);
        // Its next isolated sample counts against its old samples × their freshness: one at the
        // fleet's speed moves its mean further than before the fade (gain 1/(125 e⁻³ + 1) against
        // 0.05), and being fresh, the speed reads whole again.
        let i = Inputs { new_tokens: 6000, batch_tokens: 8192, ..Default::default() };
        let log = |m: &LatencyModels| m.ranks[&rank1].speed.log;
        let (mut whole_m, mut faded_m) = (ms.clone(), ms.clone());
        whole_m.observe_ttft(rank1, &i, truth(&i.ttft_x()), true, at(SPEED_GRACE_S - 1.0));
        faded_m.observe_ttft(rank1, &i, truth(&i.ttft_x()), true, at(SPEED_GRACE_S + 3.0 * SPEED_FADE_S));
        let (moved_whole, moved_faded) = (log(&ms) - log(&whole_m), log(&ms) - log(&faded_m));
        assert!(moved_whole > 0.0 && moved_faded > 2.0 * moved_whole, "{moved_whole} {moved_faded}");
        // Its old mean faded with the speed: one sample at the fleet's speed does not restore
        // the old reading (without, it reads ~1.6 again).
        assert!(faded_m.model(&rank1).speed < 1.2, "{}", faded_m.model(&rank1).speed);
    }

    #[test]
    fn ranks_sent_different_prompt_lengths_at_the_same_speed_read_exactly_one() {
        // Isolated prefills only; rank 1 gets short prompts (20–200 tokens), the others long
        // ones (2 k–40 k). The reference must be right at both ends, or rank 1 reads a speed
        // that is only its prompts' length.
        let mut ms = LatencyModels::default();
        let mut rng = SmallRng::seed_from_u64(10);
        let t0 = Instant::now();
        for n in 0..4000u64 {
            let r = rng.random_range(1..=4);
            let new_tokens = if r == 1 { rng.random_range(20..200) } else { rng.random_range(2000..40_000) };
            let i = Inputs { new_tokens, batch_tokens: 8192, ..Default::default() };
            ms.observe_ttft(WorkerRank::rank0(r), &i, truth(&i.ttft_x()), true, t0 + Duration::from_millis(100 * n));
        }
        for r in 1..=4 {
            assert_eq!(ms.model(&WorkerRank::rank0(r)).speed, 1.0, "{r}");
        }
    }

    #[test]
    fn two_ranks_with_one_prompt_length_read_apart_from_their_third_samples_even_the_first_to_count() {
        // The real-chain case (tests/interop_dynamo.rs): one prompt length, two workers 5× apart,
        // requests one at a time. Rank 2 (slow) counts first: against the isolated fit itself,
        // not against itself as the fleet's mean, so it reads slower; then rank 1 reads faster.
        let mut ms = LatencyModels::default();
        let (fast, slow) = (WorkerRank::rank0(1), WorkerRank::rank0(2));
        let i = Inputs { new_tokens: 1600, batch_tokens: 8192, ..Default::default() };
        let mut now = Instant::now();
        let mut sample = |ms: &mut LatencyModels, r: WorkerRank| {
            now += Duration::from_millis(200);
            ms.observe_ttft(r, &i, if r == fast { 25.0 } else { 130.0 }, true, now);
        };
        for n in 0..SPEED_REFERENCE_SAMPLES {
            sample(&mut ms, if n % 2 == 0 { fast } else { slow });
        }
        for _ in 0..SPEED_MIN_SAMPLES {
            assert_eq!(ms.model(&slow).speed, 1.0);
            sample(&mut ms, slow);
        }
        // (Its own samples pull the fit toward it, so not far; but past the dead band.)
        assert!(ms.model(&slow).speed > 1.0, "{}", ms.model(&slow).speed);
        for _ in 0..SPEED_MIN_SAMPLES {
            sample(&mut ms, fast);
        }
        let (f, s) = (ms.model(&fast).speed, ms.model(&slow).speed);
        assert!(s / f > 3.0 && f < 1.0, "{f} {s}");
    }

    #[test]
    fn a_rank_never_tried_is_not_locked_out_by_a_lone_rank_read_faster_than_the_fit() {
        // The real-chain case again, when every early request lands on the slow rank (ties go
        // either way) and its first ones are slower still (a cold start): against the isolated
        // fit of its own first samples it reads faster than 1 (0.65 here). Were the rank never
        // tried to read 1, it would lose every decision and never be sampled.
        let mut ms = LatencyModels::default();
        let (fast, slow) = (WorkerRank::rank0(1), WorkerRank::rank0(2));
        let i = Inputs { new_tokens: 1600, batch_tokens: 8192, ..Default::default() };
        let mut now = Instant::now();
        for n in 0..40 {
            now += Duration::from_millis(200);
            ms.observe_ttft(slow, &i, if n < 3 { 300.0 } else { 130.0 }, true, now);
            let (f, s) = (ms.predict(&fast, i).ttft_ms, ms.predict(&slow, i).ttft_ms);
            assert!(f <= s, "sample {n}: never tried {f} ms, sampled {s} ms (speed {})", ms.model(&slow).speed);
        }
        assert!(ms.model(&slow).speed < 0.9, "{}", ms.model(&slow).speed);
        // Tried, it shows its speed.
        for _ in 0..SPEED_MIN_SAMPLES {
            now += Duration::from_millis(200);
            ms.observe_ttft(fast, &i, 25.0, true, now);
        }
        let (f, s) = (ms.predict(&fast, i).ttft_ms, ms.predict(&slow, i).ttft_ms);
        assert!(s / f > 3.0, "{f} {s}");
    }

    #[test]
    fn a_rank_without_samples_predicts_with_the_fleet_fit_and_its_tpot_starts_from_it() {
        let mut ms = LatencyModels::default();
        let (a, b) = (WorkerRank::rank0(1), WorkerRank::rank0(2));
        let tpot = |i: &Inputs| 10.0 + 5.0 * i.tpot_x()[1];
        let mut rng = SmallRng::seed_from_u64(9);
        for _ in 0..50 {
            let i = Inputs { decode_tokens: rng.random_range(0.0..3e5), own_tokens: 1000, ..Default::default() };
            ms.observe_decode(a, &i, 101, 100.0 * tpot(&i));
        }
        let i = Inputs { decode_tokens: 1e5, new_tokens: 4000, own_tokens: 1000, batch_tokens: 8192, ..Default::default() };
        assert_eq!(ms.predict(&b, i), ms.predict(&WorkerRank::rank0(99), i));
        assert!((ms.predict(&b, i).tpot_ms / tpot(&i) - 1.0).abs() < 0.1);
        ms.observe_decode(b, &i, 101, 100.0 * tpot(&i));
        assert!((ms.predict(&b, i).tpot_ms / tpot(&i) - 1.0).abs() < 0.1);
        ms.retain(|r| *r == b);
        assert!(ms.has(&b) && !ms.has(&a));
    }
}
