//! Choosing among candidates by cost (contracts §8.2): temperature 0 → the minimum, ties
//! uniformly at random; temperature > 0 → a softmax over min–max-normalised costs.

use rand::Rng;

/// Index of the chosen cost, or `None` for no candidates.
pub fn select(costs: &[f64], temperature: f64, rng: &mut impl Rng) -> Option<usize> {
    if costs.is_empty() {
        return None;
    }
    if temperature <= 0.0 {
        return Some(argmin_random_tie(costs, rng));
    }
    let p = softmax_probabilities(costs, temperature);
    let u: f64 = rng.random();
    let mut acc = 0.0;
    for (i, pi) in p.iter().enumerate() {
        acc += pi;
        if acc >= u {
            return Some(i);
        }
    }
    Some(p.len() - 1)
}

/// The minimum; among equal minima each is equally likely (reservoir sampling, one pass).
fn argmin_random_tie(costs: &[f64], rng: &mut impl Rng) -> usize {
    let mut best = 0;
    let mut ties = 1u32;
    for (i, &c) in costs.iter().enumerate().skip(1) {
        if c < costs[best] {
            best = i;
            ties = 1;
        } else if c == costs[best] {
            ties += 1;
            if rng.random_range(0..ties) == 0 {
                best = i;
            }
        }
    }
    best
}

/// `p_i ∝ exp(−(c_i − c_min) / ((c_max − c_min) · T))`; uniform when all costs are equal.
pub fn softmax_probabilities(costs: &[f64], temperature: f64) -> Vec<f64> {
    let min = costs.iter().copied().fold(f64::INFINITY, f64::min);
    let max = costs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let range = max - min;
    if costs.is_empty() || range == 0.0 || !range.is_finite() {
        let n = costs.len().max(1) as f64;
        return vec![1.0 / n; costs.len()];
    }
    let e: Vec<f64> = costs.iter().map(|c| (-(c - min) / (range * temperature)).exp()).collect();
    let sum: f64 = e.iter().sum();
    e.into_iter().map(|x| x / sum).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::SmallRng, SeedableRng};

    #[test]
    fn zero_temperature_takes_the_minimum_with_uniform_ties() {
        let mut rng = SmallRng::seed_from_u64(3);
        assert_eq!(select(&[3.0, 1.0, 2.0], 0.0, &mut rng), Some(1));
        assert_eq!(select(&[], 0.0, &mut rng), None);
        let mut hits = [0u32; 4];
        for _ in 0..8000 {
            hits[select(&[1.0, 5.0, 1.0, 1.0], 0.0, &mut rng).unwrap()] += 1;
        }
        assert_eq!(hits[1], 0);
        for i in [0, 2, 3] {
            assert!((2400..2933).contains(&hits[i]), "{hits:?}");
        }
    }

    // Hand-computed from the formula: costs [0, 5, 10], T = 1 → weights e^0, e^-0.5, e^-1.
    #[test]
    fn softmax_matches_the_formula() {
        let p = softmax_probabilities(&[0.0, 5.0, 10.0], 1.0);
        let w = [1.0f64, (-0.5f64).exp(), (-1.0f64).exp()];
        let s: f64 = w.iter().sum();
        for i in 0..3 {
            assert!((p[i] - w[i] / s).abs() < 1e-12, "{p:?}");
        }
        assert!((p[0] - 0.506_480_391_055).abs() < 1e-9);
        assert_eq!(softmax_probabilities(&[2.0, 2.0], 0.5), vec![0.5, 0.5]);
        // Lower temperature sharpens towards the minimum.
        assert!(softmax_probabilities(&[0.0, 5.0, 10.0], 0.1)[0] > 0.99);
    }

    #[test]
    fn sampling_follows_the_probabilities() {
        let mut rng = SmallRng::seed_from_u64(11);
        let costs = [0.0, 5.0, 10.0];
        let p = softmax_probabilities(&costs, 1.0);
        let mut hits = [0f64; 3];
        let n = 30_000;
        for _ in 0..n {
            hits[select(&costs, 1.0, &mut rng).unwrap()] += 1.0;
        }
        for i in 0..3 {
            assert!((hits[i] / n as f64 - p[i]).abs() < 0.015, "{hits:?} vs {p:?}");
        }
    }
}
