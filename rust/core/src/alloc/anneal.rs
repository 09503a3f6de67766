//! EXL2's optimiser for parity: simulated annealing of Σ err^norm under the budget, driven in
//! three stages of 80 runs (norm sweep 1.5–3.5, refine ±0.075 around the norm with the smallest
//! max error, then 80 runs at that norm keeping the smallest Σ err^norm), then EXL2 0.3.2's
//! top-up. Unlike EXL2 every run is seeded (deterministic) and the runs of a stage execute in
//! parallel; results do not depend on the thread count.
//!
//! One proposal takes two draws from the run's generator (wyrand): a slot and an option
//! (uniformly, not a neighbour), then U. An infeasible move is rejected, an improving one
//! accepted, otherwise the move is accepted when U < exp(−Δe/T). [`anneal_reference`] runs this
//! protocol in the straightforward way (nested vectors, `powf` ×2 and `exp` per proposal,
//! sequential runs) and is the bench baseline; the optimised runs return identical results.
//!
//! The optimised run (`run_fast`) exploits that drawing U every time keeps the generator
//! independent of the data: per batch of proposals it draws everything first, computes the
//! thresholds T·(−ln U) vectorised (U < e^{−Δe/T} ⇔ Δe < T·(−ln U)), then walks with loads, a
//! subtraction and compares only (err^norm precomputed per run, no branch on the data, the
//! loop-carried chain is the remaining budget). A Δe within 1e-7 (relative) of its threshold
//! goes to the exact `exp` test, so every decision equals the reference's.

use std::sync::atomic::{AtomicBool, Ordering};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::prepared::Prepared;
use super::AllocError;

/// EXL2's optimiser constants (`optimize.py`), plus the seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnnealParams {
    pub norm_interval: (f64, f64),
    pub norm_2ndstage: f64,
    pub temp_max: f64,
    pub temp_min: f64,
    pub cooling_factor: f64,
    /// Proposals per temperature step.
    pub iterations: u32,
    /// Runs per stage (3 stages).
    pub samples: u32,
    pub seed: u64,
}

impl Default for AnnealParams {
    fn default() -> Self {
        AnnealParams {
            norm_interval: (1.5, 3.5),
            norm_2ndstage: 0.15,
            temp_max: 2.0,
            temp_min: 0.0001,
            cooling_factor: 0.995,
            iterations: 1000,
            samples: 80,
            seed: 0,
        }
    }
}

impl AnnealParams {
    fn validate(&self) -> Result<(), AllocError> {
        let ok = self.samples >= 2
            && self.iterations >= 1
            && self.temp_max > 0.0
            && self.temp_min > 0.0
            && self.temp_min < self.temp_max
            && self.cooling_factor > 0.0
            && self.cooling_factor < 1.0
            && self.norm_interval.0 > 0.0
            && self.norm_interval.0 <= self.norm_interval.1
            && self.norm_2ndstage >= 0.0;
        if ok {
            Ok(())
        } else {
            Err(AllocError::InvalidProblem(format!(
                "invalid anneal parameters {self:?}: need samples ≥ 2, iterations ≥ 1, \
                 0 < temp_min < temp_max, 0 < cooling_factor < 1, 0 < norm_interval.0 ≤ .1"
            )))
        }
    }

    /// Temperature steps per run: ⌊ln(T_min/T_max) / ln(cooling)⌋ (1975 by default).
    pub fn outer_steps(&self) -> u64 {
        ((self.temp_min / self.temp_max).ln() / self.cooling_factor.ln()) as u64
    }
}

/// Outcome of the 240-run driver on slots.
#[derive(Debug, Clone, PartialEq)]
pub struct AnnealResult {
    /// Option index per slot.
    pub choice: Vec<u32>,
    /// The norm selected by stages 1–2.
    pub norm: f64,
    /// Σ err^norm of the kept stage-3 run (before top-up).
    pub energy: f64,
    pub max_err: f64,
    pub cost: u64,
    pub proposals: u64,
}

/// wyrand (Wang Yi's generator, as in `wyhash`/`fastrand`) with its state seeded by splitmix64
/// from (seed, run): a Weyl sequence (a one-add dependency chain per draw) mixed by a 64×64→128
/// multiply. Small, fast, and identical on every platform; each run draws ~4M of its 2^64 values.
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64, stream: u64) -> Self {
        let mut z =
            (seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15)).wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Rng(z ^ (z >> 31))
    }
    #[inline(always)]
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0xA076_1D64_78BD_642F);
        let t = (self.0 as u128).wrapping_mul((self.0 ^ 0xE703_7ED1_A0B4_28DB) as u128);
        ((t >> 64) as u64) ^ (t as u64)
    }
    /// One 64-bit draw split into two 32-bit halves, each mapped to 0..n by multiply-shift:
    /// the high half picks the slot, the low half the option.
    #[inline(always)]
    fn halves(&mut self) -> (u64, u64) {
        let x = self.next();
        (x >> 32, x & 0xFFFF_FFFF)
    }
    #[inline(always)]
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

#[inline(always)]
fn scale(half: u64, n: u32) -> usize {
    ((half * n as u64) >> 32) as usize
}

/// Slots in flat form for the hot loop: options of all slots back to back.
struct Flat {
    /// (offset of the slot's first option, option count) per slot.
    slot: Vec<(u32, u32)>,
    cost: Vec<u64>,
    err: Vec<f64>,
}

impl Flat {
    fn new(slots: &[Vec<(u64, f64)>]) -> Self {
        let mut f = Flat {
            slot: vec![],
            cost: vec![],
            err: vec![],
        };
        for s in slots {
            f.slot.push((f.cost.len() as u32, s.len() as u32));
            for &(c, e) in s {
                f.cost.push(c);
                f.err.push(e);
            }
        }
        f
    }
}

/// Per-option record of the hot loop: cost and err^norm side by side (16 bytes).
#[derive(Clone, Copy)]
struct Rec {
    cost: u64,
    pw: f64,
}

struct RunOut {
    choice: Vec<u32>,
    energy: f64,
    max_err: f64,
}

fn score(slots: &[Vec<(u64, f64)>], choice: &[u32], norm: f64) -> (f64, f64) {
    let mut energy = 0.0;
    let mut max_err = 0.0f64;
    for (s, &k) in slots.iter().zip(choice) {
        let e = s[k as usize].1;
        energy += e.powf(norm);
        max_err = max_err.max(e);
    }
    (energy, max_err)
}

/// −ln u for u ∈ (0, 1] to ≈ 1e-10 relative (+∞ for u = 0), branch-free and in integer and
/// float operations that vectorise: u = m·2^e with m ∈ [√½, √2), ln m = 2·atanh(s) with
/// s = (m − 1)/(m + 1), |s| ≤ 0.172, by its series to s¹¹ (truncation ≤ 2·0.172¹³/13 ≈ 2e-11
/// relative).
#[inline(always)]
fn neg_ln_approx(u: f64) -> f64 {
    const SQRT_HALF_BITS: u64 = 0x3FE6_A09E_667F_3BCD;
    const E_BIAS: u64 = 1024;
    // 2^52: an integer k < 2^52 in the mantissa bits of 2^52 reads as 2^52 + k.
    const TWO52: f64 = 4_503_599_627_370_496.0;
    let bits = u.to_bits();
    // k = e + 1024 ∈ [1, 1025] for u ∈ [0, 1] (logical shifts only).
    let k = bits.wrapping_sub(SQRT_HALF_BITS).wrapping_add(E_BIAS << 52) >> 52;
    let m = f64::from_bits(bits.wrapping_add(E_BIAS << 52).wrapping_sub(k << 52));
    let e = f64::from_bits(TWO52.to_bits() | k) - (TWO52 + E_BIAS as f64);
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let s4 = s2 * s2;
    let p = (1.0 + s2 * (1.0 / 3.0))
        + s4 * ((1.0 / 5.0 + s2 * (1.0 / 7.0)) + s4 * (1.0 / 9.0 + s2 * (1.0 / 11.0)));
    let l = -(e * std::f64::consts::LN_2 + 2.0 * s * p);
    if u == 0.0 {
        f64::INFINITY
    } else {
        l
    }
}

/// For a batch: thr[k] = T·(−ln u[k]) and the half-width hw[k] of the band around it in which
/// the exact test decides.
#[inline(always)]
fn thresholds_generic(u: &[f64], thr: &mut [f64], hw: &mut [f64], temp: f64) {
    let abs_tol = LN_ABS_TOL * temp;
    for ((t, h), &u) in thr.iter_mut().zip(hw.iter_mut()).zip(u) {
        *t = temp * neg_ln_approx(u);
        *h = *t * LN_REL_TOL + abs_tol;
    }
}

/// [`thresholds_generic`] compiled for AVX2 (4 lanes); the decisions do not depend on which
/// version ran, since both stay far inside the margins.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn thresholds_avx2(u: &[f64], thr: &mut [f64], hw: &mut [f64], temp: f64) {
    thresholds_generic(u, thr, hw, temp)
}

#[inline(always)]
fn thresholds(u: &[f64], thr: &mut [f64], hw: &mut [f64], temp: f64, avx2: bool) {
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: the caller detected AVX2 at run time.
        return unsafe { thresholds_avx2(u, thr, hw, temp) };
    }
    let _ = avx2;
    thresholds_generic(u, thr, hw, temp)
}

fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Margins around T·(−ln U) inside which the exact test decides: relative (far above the error
/// of [`neg_ln_approx`] and of the roundings) and absolute, in units of T (covers U ≈ 1).
const LN_REL_TOL: f64 = 1e-7;
const LN_ABS_TOL: f64 = 1e-12;

/// Proposals per batch (bounds the buffer when `iterations` is large); 24 KiB of buffer.
const BATCH: usize = 1024;

/// The acceptance test of [`run_reference`], for the proposals the threshold cannot decide.
/// Out of line so that the compiler cannot fold its conditions into the hot loop's branch (that
/// would bring back an unpredictable branch on the sign of Δe).
#[cold]
#[inline(never)]
fn exact_accept(feasible: bool, de: f64, u: f64, temp: f64) -> bool {
    feasible && (de < 0.0 || u < (-de / temp).exp())
}

/// One optimised SA run. Returns None when cancelled.
///
/// The generator does not depend on the state, so each batch of proposals is drawn first
/// (slot, option, U, and the threshold T·(−ln U)): `U < e^{−Δe/T}` ⇔ `Δe < T·(−ln U)`. The
/// sequential pass then only loads, subtracts and compares, branch-free; a Δe within
/// [`LN_REL_TOL`] of the threshold (or U = 0) goes to [`exact_accept`], so every decision
/// equals [`run_reference`]'s (in practice that branch is never taken).
fn run_fast(
    flat: &Flat,
    slots: &[Vec<(u64, f64)>],
    budget: u64,
    p: &AnnealParams,
    norm: f64,
    stream: u64,
    cancel: &AtomicBool,
) -> Option<RunOut> {
    // err^norm once per run (the norm is fixed per run): no powf in the hot loop.
    let recs: Vec<Rec> = flat
        .cost
        .iter()
        .zip(&flat.err)
        .map(|(&cost, e)| Rec {
            cost,
            pw: e.powf(norm),
        })
        .collect();
    let meta = &flat.slot;
    let n = meta.len() as u32;
    debug_assert!(meta
        .iter()
        .all(|&(o, l)| l >= 1 && (o + l) as usize <= recs.len()));
    let mut rng = Rng::new(p.seed, stream);
    // Flat index of the current option per slot; every slot starts at its first option.
    let mut cur: Vec<u32> = meta.iter().map(|&(o, _)| o).collect();
    let cost: u64 = cur.iter().map(|&j| recs[j as usize].cost).sum();
    // The batch, structure of arrays: (slot, flat index of the proposed option), U, T·(−ln U).
    let cap = BATCH.min(p.iterations as usize);
    let mut ix = vec![[0u32; 2]; cap];
    let (mut us, mut thr, mut hw) = (vec![0.0f64; cap], vec![0.0f64; cap], vec![0.0f64; cap]);
    let avx2 = has_avx2();
    // budget − cost: the walk keeps it ≥ 0, and a move of cost change δ is feasible iff
    // δ ≤ slack (the same test as cost − old + new ≤ budget).
    if budget >= 1 << 60 || recs.iter().any(|r| r.cost >= 1 << 60) {
        // Outside the range of the slack arithmetic below (never for real models: 2^60 bits).
        return Some(run_reference(slots, budget, p, norm, stream));
    }
    let mut slack = (budget - cost) as i64;
    let mut temp = p.temp_max;
    for _ in 0..p.outer_steps() {
        if cancel.load(Ordering::Relaxed) {
            return None;
        }
        let mut left = p.iterations as usize;
        while left > 0 {
            let m = left.min(cap);
            left -= m;
            let (ix, us) = (&mut ix[..m], &mut us[..m]);
            let (thr, hw) = (&mut thr[..m], &mut hw[..m]);
            // Pass 1: the draws, in the generator order of run_reference.
            for (x, u) in ix.iter_mut().zip(us.iter_mut()) {
                let (hi, lo) = rng.halves();
                let i = scale(hi, n);
                debug_assert!(i < meta.len());
                // SAFETY: scale(hi, n) < n = meta.len() since hi < 2^32.
                let (offset, len) = unsafe { *meta.get_unchecked(i) };
                *x = [i as u32, offset + scale(lo, len) as u32];
                *u = rng.unit();
            }
            // Pass 2: the thresholds (vectorised).
            thresholds(us, thr, hw, temp, avx2);
            // Pass 3: the Metropolis walk. The loop-carried chain is slack → compare → select.
            let draws = ix.iter().zip(us.iter()).zip(thr.iter().zip(hw.iter()));
            for ((&[slot, opt], &u), (&t, &half)) in draws {
                debug_assert!((slot as usize) < cur.len() && (opt as usize) < recs.len());
                // SAFETY: slot < meta.len() = cur.len() and opt < offset + len ≤ recs.len() by
                // construction in pass 1; every cur is some such opt.
                let (c, old, new) = unsafe {
                    let c = *cur.get_unchecked(slot as usize);
                    (
                        c,
                        *recs.get_unchecked(c as usize),
                        *recs.get_unchecked(opt as usize),
                    )
                };
                let delta = new.cost.wrapping_sub(old.cost) as i64;
                let de = new.pw - old.pw;
                let d = de - t;
                // Sure by the threshold: then feasibility alone decides; otherwise eff > slack
                // (|δ|, slack < 2^60). d + half < 0 ⇔ d < −half exactly (rounding keeps the
                // sign of a sum). Arithmetic rather than a select so that no branch appears.
                let eff = delta + (((d + half < 0.0) as i64 ^ 1) << 61);
                let mut accept = eff <= slack;
                // The band (never in practice), and NaN Δe or U = 0: the exact test decides.
                if d.abs() <= half || d.is_nan() {
                    accept = exact_accept(delta <= slack, de, u, temp);
                }
                let mask = (accept as u32).wrapping_neg();
                // SAFETY: as above.
                unsafe { *cur.get_unchecked_mut(slot as usize) = c ^ ((c ^ opt) & mask) };
                slack = if accept { slack - delta } else { slack };
            }
        }
        temp *= p.cooling_factor;
    }
    let choice: Vec<u32> = cur.iter().zip(meta).map(|(&j, &(o, _))| j - o).collect();
    let (energy, max_err) = score(slots, &choice, norm);
    Some(RunOut {
        choice,
        energy,
        max_err,
    })
}

/// The straightforward implementation of one run (the bench baseline).
fn run_reference(
    slots: &[Vec<(u64, f64)>],
    budget: u64,
    p: &AnnealParams,
    norm: f64,
    stream: u64,
) -> RunOut {
    let mut rng = Rng::new(p.seed, stream);
    let mut choice = vec![0u32; slots.len()];
    let mut cost: u64 = slots.iter().map(|s| s[0].0).sum();
    let steps = ((p.temp_min / p.temp_max).ln() / p.cooling_factor.ln()) as u64;
    let mut temp = p.temp_max;
    for _ in 0..steps {
        for _ in 0..p.iterations {
            let (hi, lo) = rng.halves();
            let i = scale(hi, slots.len() as u32);
            let k = scale(lo, slots[i].len() as u32);
            let old = slots[i][choice[i] as usize];
            let new = slots[i][k];
            let u = rng.unit();
            let de = new.1.powf(norm) - old.1.powf(norm);
            let new_cost = cost - old.0 + new.0;
            if new_cost <= budget && (de < 0.0 || u < (-de / temp).exp()) {
                choice[i] = k as u32;
                cost = new_cost;
            }
        }
        temp *= p.cooling_factor;
    }
    let (energy, max_err) = score(slots, &choice, norm);
    RunOut {
        choice,
        energy,
        max_err,
    }
}

fn stage_norm(p: &AnnealParams, i: u32, best: f64) -> f64 {
    let s = p.samples;
    if i < s {
        let t = i as f64 / (s - 1) as f64;
        (1.0 - t) * p.norm_interval.0 + t * p.norm_interval.1
    } else if i < 2 * s {
        // EXL2's t = i/(samples−1) − 1 (slightly overshoots 1 at the end of the stage).
        let (a, b) = (best - p.norm_2ndstage / 2.0, best + p.norm_2ndstage / 2.0);
        let t = i as f64 / (s - 1) as f64 - 1.0;
        (1.0 - t) * a + t * b
    } else {
        best
    }
}

/// EXL2 0.3.2's top-up: bump each slot to its next option while the budget allows, until stable.
fn top_up(slots: &[Vec<(u64, f64)>], budget: u64, choice: &mut [u32]) -> u64 {
    let mut cost: u64 = slots
        .iter()
        .zip(choice.iter())
        .map(|(s, &k)| s[k as usize].0)
        .sum();
    loop {
        let mut changed = false;
        for (s, k) in slots.iter().zip(choice.iter_mut()) {
            let next = *k as usize + 1;
            if next < s.len() && cost - s[*k as usize].0 + s[next].0 <= budget {
                cost = cost - s[*k as usize].0 + s[next].0;
                *k += 1;
                changed = true;
            }
        }
        if !changed {
            return cost;
        }
    }
}

/// The three-stage driver over `run(norm, run_index)`; `parallel` runs each stage with Rayon.
fn drive(
    slots: &[Vec<(u64, f64)>],
    budget: u64,
    p: &AnnealParams,
    run: &(dyn Fn(f64, u32) -> Option<RunOut> + Sync),
    parallel: bool,
) -> Result<AnnealResult, AllocError> {
    p.validate()?;
    let min_cost: u64 = slots.iter().map(|s| s[0].0).sum();
    if min_cost > budget {
        return Err(AllocError::InvalidProblem(format!(
            "anneal starts from every slot's first option ({min_cost} bits), which exceeds the budget of {budget} bits"
        )));
    }
    let s = p.samples;
    let stage =
        |range: std::ops::Range<u32>, best: f64| -> Result<Vec<(f64, RunOut)>, AllocError> {
            let one = |i: u32| {
                let norm = stage_norm(p, i, best);
                run(norm, i).map(|r| (norm, r))
            };
            let out: Vec<Option<(f64, RunOut)>> = if parallel {
                range.into_par_iter().map(one).collect()
            } else {
                range.map(one).collect()
            };
            out.into_iter()
                .map(|r| r.ok_or(AllocError::Cancelled))
                .collect()
        };
    let mut best_max = f64::INFINITY;
    let mut best_norm = p.norm_interval.0;
    for (lo, hi) in [(0, s), (s, 2 * s)] {
        for (norm, r) in stage(lo..hi, best_norm)? {
            if r.max_err < best_max {
                best_max = r.max_err;
                best_norm = norm;
            }
        }
    }
    let mut kept: Option<RunOut> = None;
    for (_, r) in stage(2 * s..3 * s, best_norm)? {
        if kept.as_ref().is_none_or(|k| r.energy < k.energy) {
            kept = Some(r);
        }
    }
    let kept = kept.expect("at least one run");
    let mut choice = kept.choice;
    let cost = top_up(slots, budget, &mut choice);
    let steps = p.outer_steps() * p.iterations as u64;
    Ok(AnnealResult {
        choice,
        norm: best_norm,
        energy: kept.energy,
        max_err: kept.max_err,
        cost,
        proposals: steps * 3 * s as u64,
    })
}

fn check_slots(slots: &[Vec<(u64, f64)>]) -> Result<(), AllocError> {
    if slots.is_empty() || slots.iter().any(|s| s.is_empty()) {
        return Err(AllocError::InvalidProblem(
            "anneal needs ≥ 1 slot, each with ≥ 1 option".into(),
        ));
    }
    Ok(())
}

/// The optimised, parallel driver on raw slots (options in cost order; option 0 the start).
pub fn anneal_slots(
    slots: &[Vec<(u64, f64)>],
    budget: u64,
    p: &AnnealParams,
    cancel: &AtomicBool,
) -> Result<AnnealResult, AllocError> {
    check_slots(slots)?;
    let flat = Flat::new(slots);
    drive(
        slots,
        budget,
        p,
        &|norm, i| run_fast(&flat, slots, budget, p, norm, i as u64, cancel),
        true,
    )
}

/// The straightforward single-threaded implementation of the same driver and protocol; gives the
/// same result as [`anneal_slots`]. Kept as the benchmark baseline.
#[doc(hidden)]
pub fn anneal_reference(
    slots: &[Vec<(u64, f64)>],
    budget: u64,
    p: &AnnealParams,
) -> Result<AnnealResult, AllocError> {
    check_slots(slots)?;
    drive(
        slots,
        budget,
        p,
        &|norm, i| Some(run_reference(slots, budget, p, norm, i as u64)),
        false,
    )
}

/// EXL2's slots of a prepared problem: every allowed option of each class (no pruning, as in
/// EXL2), in cost order, with the class's Σ raw member error.
pub(crate) fn slots_of(p: &Prepared) -> Vec<Vec<(u64, f64)>> {
    p.classes
        .iter()
        .map(|c| c.opts.iter().map(|o| (o.cost, o.err_sum)).collect())
        .collect()
}

pub(crate) fn anneal(
    prep: &Prepared,
    budget: u64,
    params: &AnnealParams,
    cancel: &AtomicBool,
) -> Result<AnnealResult, AllocError> {
    anneal_slots(&slots_of(prep), budget, params, cancel)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neg_ln_approx_within_tolerance() {
        let mut rng = Rng::new(7, 0);
        for i in 0..2_000_000u64 {
            // U as drawn, and U over many decades down to 2^-53.
            let u = if i % 2 == 0 {
                rng.unit()
            } else {
                2f64.powf(-53.0 * rng.unit())
            };
            if u == 0.0 {
                continue;
            }
            let exact = -u.ln();
            let approx = neg_ln_approx(u);
            assert!(
                (approx - exact).abs() <= 1e-9 * exact + 1e-15,
                "case {i}: u={u} approx={approx} exact={exact}"
            );
        }
        assert_eq!(neg_ln_approx(1.0), 0.0);
        assert_eq!(neg_ln_approx(0.0), f64::INFINITY);
        let tiny = 2f64.powi(-53);
        assert!((neg_ln_approx(tiny) + tiny.ln()).abs() < 1e-12);
    }
}
