//! Per-policy results of a simulation: prefix reuse against the trace's ideal, TTFT, E2E, ITL,
//! throughput, rejections; JSON and a PNG chart (TTFT CDFs and reuse).

use std::{path::Path, time::Duration};

use serde::Serialize;

use super::{
    engine::EngineParams,
    trace::{reusable_tokens, reuse_share, shared_cache_hits, TraceRequest},
};

/// What happened to one request under one policy.
#[derive(Clone, Debug)]
pub struct RequestOutcome {
    pub arrival_us: u64,
    pub isl: u32,
    pub osl: u32,
    pub worker: usize,
    pub first_token_us: Option<u64>,
    pub finished_us: Option<u64>,
    pub reused_tokens: u32,
    pub rejected: bool,
    /// Time in the router queue before its engine got it (µs).
    pub queued_us: u64,
    /// Its uncached prompt tokens prefilled alone on an idle engine of its worker's speed (ms):
    /// the part of its TTFT no routing or queue order shortens once the worker is chosen.
    pub prefill_alone_ms: f64,
}

impl RequestOutcome {
    pub fn new(arrival_us: u64, isl: u32, osl: u32) -> Self {
        RequestOutcome { arrival_us, isl, osl, worker: 0, first_token_us: None, finished_us: None, reused_tokens: 0, rejected: false, queued_us: 0, prefill_alone_ms: 0.0 }
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Latency {
    pub mean: f64,
    pub p50: f64,
    pub p99: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct PolicyReport {
    pub policy: String,
    pub requests: usize,
    pub completed: usize,
    pub rejected: usize,
    /// Reused ÷ input tokens over admitted requests.
    pub prefix_reuse: f64,
    /// The same with one infinite shared cache.
    pub ideal_reuse: f64,
    pub reuse_vs_ideal: f64,
    pub ttft_ms: Latency,
    /// Where the TTFT goes (means over the requests with a first token).
    pub ttft_parts_ms: TtftParts,
    pub e2e_ms: Latency,
    /// Mean inter-token latency, weighted by tokens.
    pub itl_ms: f64,
    /// Output tokens per second of virtual time (first arrival to last completion).
    pub output_tokens_per_s: f64,
    pub requests_per_s: f64,
    /// Requests per worker, to see balance.
    pub per_worker: Vec<usize>,
    /// Wall-clock seconds the policy took to simulate.
    pub wall_seconds: f64,
    /// TTFT (ms) at every percent 0..=100, for the chart.
    pub ttft_cdf_ms: Vec<f64>,
    /// Oracle bounds only: the share of requests whose TTFT equals the oracle's look-ahead
    /// (the rest were changed by later arrivals on the same engine).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oracle_exact: Option<f64>,
}

/// A mean TTFT split three ways (ms): prefill alone + router queue + on the engine = TTFT.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TtftParts {
    /// The uncached prompt tokens prefilled alone on an idle engine of the worker's speed.
    pub prefill_alone: f64,
    /// Waiting in the router queue.
    pub router_queue: f64,
    /// The rest: on the engine behind other prompts' prefill, and its prefill passes made
    /// longer by the decodes batched into them.
    pub on_engine: f64,
}

/// The fleet's caches as one shared cache (no block held twice) and each request's TTFT as its
/// prefill alone on an idle engine (the base speed) with the prefix that cache holds: no
/// queueing, no slow worker. Infinite: a floor under any router. As large as the fleet's and
/// least recently used first: a floor under any router whose placement does not make
/// recency-evicting engines cache better than one LRU would (e.g. by keeping one-off prompts
/// away from reused ones).
#[derive(Clone, Debug, Serialize)]
pub struct CacheBound {
    /// Blocks the shared cache holds (least recently used evicted first); `None`: infinite.
    pub capacity_blocks: Option<usize>,
    pub reuse: f64,
    pub prefill_floor_ms: Latency,
}

impl CacheBound {
    pub fn new(trace: &[TraceRequest], engine: &EngineParams, capacity_blocks: Option<usize>) -> Self {
        let block = engine.block_tokens;
        let hits = shared_cache_hits(trace, block, capacity_blocks);
        let floor = trace.iter().zip(&hits).map(|(r, &h)| engine.prefill_alone_ms((r.input_length - reusable_tokens(r.input_length, h, block)) as u64));
        CacheBound { capacity_blocks, reuse: reuse_share(trace, block, &hits), prefill_floor_ms: latency(floor.collect()) }
    }
}

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

pub fn latency(mut v: Vec<f64>) -> Latency {
    if v.is_empty() {
        return Latency::default();
    }
    v.sort_by(f64::total_cmp);
    Latency { mean: v.iter().sum::<f64>() / v.len() as f64, p50: percentile(&v, 50.0), p99: percentile(&v, 99.0) }
}

impl PolicyReport {
    pub fn new(policy: &str, outcomes: &[RequestOutcome], ideal: f64, wall: Duration) -> Self {
        let admitted: Vec<&RequestOutcome> = outcomes.iter().filter(|o| !o.rejected).collect();
        let done: Vec<&RequestOutcome> = admitted.iter().copied().filter(|o| o.finished_us.is_some()).collect();
        let ms = |us: u64| us as f64 / 1000.0;
        let mut ttft: Vec<f64> = admitted.iter().filter_map(|o| o.first_token_us.map(|t| ms(t - o.arrival_us))).collect();
        let started: Vec<&RequestOutcome> = admitted.iter().copied().filter(|o| o.first_token_us.is_some()).collect();
        let mean = |f: &dyn Fn(&RequestOutcome) -> f64| started.iter().map(|o| f(o)).sum::<f64>() / started.len().max(1) as f64;
        let (prefill_alone, router_queue) = (mean(&|o| o.prefill_alone_ms), mean(&|o| ms(o.queued_us)));
        let ttft_parts_ms = TtftParts { prefill_alone, router_queue, on_engine: mean(&|o| ms(o.first_token_us.unwrap() - o.arrival_us)) - prefill_alone - router_queue };
        ttft.sort_by(f64::total_cmp);
        let e2e = done.iter().map(|o| ms(o.finished_us.unwrap() - o.arrival_us)).collect();
        let (decode_ms, decode_tokens) = done.iter().fold((0.0, 0u64), |(t, n), o| {
            (t + ms(o.finished_us.unwrap() - o.first_token_us.unwrap()), n + (o.osl.max(1) - 1) as u64)
        });
        let reused: u64 = admitted.iter().map(|o| o.reused_tokens as u64).sum();
        let input: u64 = admitted.iter().map(|o| o.isl as u64).sum();
        let start = outcomes.iter().map(|o| o.arrival_us).min().unwrap_or(0);
        let end = done.iter().filter_map(|o| o.finished_us).max().unwrap_or(start);
        let span_s = ((end - start) as f64 / 1e6).max(1e-9);
        let out_tokens: u64 = done.iter().map(|o| o.osl as u64).sum();
        let workers = outcomes.iter().map(|o| o.worker).max().map_or(0, |m| m + 1);
        let mut per_worker = vec![0; workers];
        for o in &admitted {
            per_worker[o.worker] += 1;
        }
        let prefix_reuse = reused as f64 / input.max(1) as f64;
        PolicyReport {
            policy: policy.into(),
            requests: outcomes.len(),
            completed: done.len(),
            rejected: outcomes.len() - admitted.len(),
            prefix_reuse,
            ideal_reuse: ideal,
            reuse_vs_ideal: if ideal > 0.0 { prefix_reuse / ideal } else { 0.0 },
            ttft_cdf_ms: (0..=100).map(|p| percentile(&ttft, p as f64)).collect(),
            ttft_ms: latency(ttft),
            ttft_parts_ms,
            e2e_ms: latency(e2e),
            itl_ms: if decode_tokens > 0 { decode_ms / decode_tokens as f64 } else { 0.0 },
            output_tokens_per_s: out_tokens as f64 / span_s,
            requests_per_s: done.len() as f64 / span_s,
            per_worker,
            wall_seconds: wall.as_secs_f64(),
            oracle_exact: None,
        }
    }
}

/// A Markdown table of the reports (the README's results table).
pub fn markdown(reports: &[PolicyReport]) -> String {
    let mut s = String::from(
        "| policy | prefix reuse | vs ideal | TTFT mean / p50 / p99 (ms) | E2E mean / p99 (ms) | ITL (ms) | output tok/s | rejected |\n|---|---|---|---|---|---|---|---|\n",
    );
    for r in reports {
        s.push_str(&format!(
            "| {} | {:.1} % | {:.2} | {:.0} / {:.0} / {:.0} | {:.0} / {:.0} | {:.1} | {:.0} | {} |\n",
            r.policy,
            100.0 * r.prefix_reuse,
            r.reuse_vs_ideal,
            r.ttft_ms.mean,
            r.ttft_ms.p50,
            r.ttft_ms.p99,
            r.e2e_ms.mean,
            r.e2e_ms.p99,
            r.itl_ms,
            r.output_tokens_per_s,
            r.rejected
        ));
    }
    s
}

/// A Markdown table of where each policy's mean TTFT goes.
pub fn ttft_parts_markdown(reports: &[PolicyReport]) -> String {
    let mut s = String::from(
        "| policy | TTFT mean (ms) | = prefill alone (its uncached tokens, idle engine) | + router queue | + on the engine (behind other prompts, passes shared with decodes) |\n|---|---:|---:|---:|---:|\n",
    );
    for r in reports {
        let p = &r.ttft_parts_ms;
        s.push_str(&format!("| {} | {:.1} | {:.1} | {:.1} | {:.1} |\n", r.policy, r.ttft_ms.mean, p.prefill_alone, p.router_queue, p.on_engine));
    }
    s
}

/// Where a TrueType font for chart labels is looked for (plotters draws text with it).
const FONTS: &[&str] = &["/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "/usr/share/fonts/TTF/DejaVuSans.ttf"];

#[derive(Debug, thiserror::Error)]
#[error("chart: {0}")]
pub struct ChartError(String);

/// Draws TTFT CDFs (log time axis) and prefix reuse per policy into a PNG. Labels need a
/// DejaVu font; without one the chart is drawn unlabelled.
pub fn chart(reports: &[PolicyReport], path: &Path) -> Result<bool, ChartError> {
    use plotters::prelude::*;
    let err = |e: &dyn std::fmt::Display| ChartError(e.to_string());
    let labelled = FONTS.iter().find_map(|f| std::fs::read(f).ok()).is_some_and(|bytes| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, Box::leak(bytes.into_boxed_slice())).is_ok()
    });
    let root = BitMapBackend::new(path, (1200, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (left, right) = root.split_horizontally(800);
    let max_ms = reports.iter().filter_map(|r| r.ttft_cdf_ms.last()).fold(1.0f64, |a, &b| a.max(b));
    let min_ms = reports.iter().filter_map(|r| r.ttft_cdf_ms.first()).fold(max_ms, |a, &b| a.min(b)).max(1.0);
    let mut cdf = ChartBuilder::on(&left);
    cdf.margin(15).x_label_area_size(40).y_label_area_size(50);
    if labelled {
        cdf.caption("TTFT CDF", ("sans-serif", 20));
    }
    let mut cdf = cdf.build_cartesian_2d((min_ms..max_ms * 1.05).log_scale(), 0.0..1.0).map_err(|e| err(&e))?;
    let mut mesh = cdf.configure_mesh();
    if labelled {
        mesh.x_desc("TTFT (ms, log)").y_desc("fraction of requests");
    } else {
        mesh.disable_x_mesh().disable_y_mesh().x_labels(0).y_labels(0);
    }
    mesh.draw().map_err(|e| err(&e))?;
    for (i, r) in reports.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let pts = r.ttft_cdf_ms.iter().enumerate().map(|(p, &v)| (v.max(min_ms), p as f64 / 100.0));
        let s = cdf.draw_series(LineSeries::new(pts, color.stroke_width(2))).map_err(|e| err(&e))?;
        if labelled {
            s.label(r.policy.clone()).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        }
    }
    if labelled {
        cdf.configure_series_labels().position(SeriesLabelPosition::LowerRight).background_style(WHITE.mix(0.8)).border_style(BLACK).draw().map_err(|e| err(&e))?;
    }
    let n = reports.len();
    let mut bars = ChartBuilder::on(&right);
    bars.margin(15).x_label_area_size(60).y_label_area_size(50);
    if labelled {
        bars.caption("prefix reuse (dashed: ideal)", ("sans-serif", 20));
    }
    let mut bars = bars.build_cartesian_2d(0.0..n as f64, 0.0..1.0).map_err(|e| err(&e))?;
    let names: Vec<String> = reports.iter().map(|r| r.policy.clone()).collect();
    let name_of = |x: &f64| names.get(*x as usize).cloned().unwrap_or_default();
    let mut mesh = bars.configure_mesh();
    mesh.disable_x_mesh();
    if labelled {
        mesh.x_labels(n).x_label_formatter(&name_of).y_desc("reused ÷ input tokens");
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw().map_err(|e| err(&e))?;
    bars.draw_series(reports.iter().enumerate().map(|(i, r)| {
        Rectangle::new([(i as f64 + 0.15, 0.0), (i as f64 + 0.85, r.prefix_reuse)], Palette99::pick(i).filled())
    }))
    .map_err(|e| err(&e))?;
    if let Some(ideal) = reports.first().map(|r| r.ideal_reuse) {
        bars.draw_series(DashedLineSeries::new(vec![(0.0, ideal), (n as f64, ideal)], 6, 4, BLACK.stroke_width(1))).map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(labelled)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!((percentile(&v, 50.0), percentile(&v, 99.0), percentile(&v, 100.0), percentile(&v, 0.0)), (50.0, 99.0, 100.0, 1.0));
        assert_eq!(percentile(&[3.0, 7.0], 50.0), 3.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
    }

    #[test]
    fn reports_weight_itl_by_tokens_and_skip_rejections() {
        let mut a = RequestOutcome::new(0, 100, 11);
        (a.first_token_us, a.finished_us, a.reused_tokens, a.prefill_alone_ms) = (Some(10_000), Some(110_000), 50, 4.0);
        let mut b = RequestOutcome::new(0, 100, 2);
        (b.first_token_us, b.finished_us, b.worker, b.prefill_alone_ms, b.queued_us) = (Some(30_000), Some(40_000), 1, 8.0, 12_000);
        let mut c = RequestOutcome::new(0, 500, 5);
        c.rejected = true;
        let r = PolicyReport::new("x", &[a, b, c], 0.5, Duration::ZERO);
        assert_eq!((r.requests, r.completed, r.rejected), (3, 2, 1));
        assert_eq!(r.prefix_reuse, 0.25);
        assert_eq!(r.reuse_vs_ideal, 0.5);
        // (100 ms over 10 tokens + 10 ms over 1 token) / 11 tokens.
        assert!((r.itl_ms - 110.0 / 11.0).abs() < 1e-9);
        assert_eq!((r.ttft_ms.p50, r.ttft_ms.p99), (10.0, 30.0));
        assert_eq!(r.per_worker, vec![1, 1]);
        // TTFT 10 and 30 ms: prefill alone (4 + 8) / 2, router queue (0 + 12) / 2, on the
        // engine the rest (6 + 10) / 2; the rejected request counts nowhere.
        let p = &r.ttft_parts_ms;
        assert_eq!((p.prefill_alone, p.router_queue, p.on_engine), (6.0, 6.0, 8.0));
    }
}
