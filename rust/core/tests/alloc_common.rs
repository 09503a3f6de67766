//! Shared helpers for the allocator tests: random instances and a brute-force reference.
#![allow(dead_code)]
use exl2rs_core::alloc::{Item, Objective, Opt, Problem};

/// splitmix64: a tiny deterministic generator for building instances from a proptest seed.
pub struct Gen(pub u64);
impl Gen {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }
}

/// A small random instance with groups, pins, exclusions and min/max bpw.
pub fn random_problem(seed: u64, max_items: u64, max_opts: u64) -> Problem {
    let mut g = Gen(seed);
    let n = 1 + g.below(max_items) as usize;
    let mut items = Vec::new();
    for i in 0..n {
        let numel = 8 + g.below(24);
        let k = 1 + g.below(max_opts) as usize;
        // Distinct configs drawn from a shared pool so fused members often share them.
        let mut pool: Vec<u32> = (0..10).collect();
        for j in (1..pool.len()).rev() {
            pool.swap(j, g.below(j as u64 + 1) as usize);
        }
        let options = (0..k)
            .map(|j| Opt {
                bits: 1 + g.below(8 * numel),
                // Some exact ties and zeros, to exercise tie-breaking.
                error: if g.chance(0.1) {
                    0.0
                } else {
                    (g.below(50) as f64) * 0.37 + g.unit() * 0.01
                },
                config: pool[j],
            })
            .collect::<Vec<_>>();
        let mut it = Item::new(format!("item{i}"), numel, options);
        it.weight = 0.25 + g.unit() * 2.0;
        if g.chance(0.1) {
            it.pinned = Some(g.below(k as u64) as usize);
        }
        if g.chance(0.15) {
            it.excluded.push(g.below(10) as u32);
        }
        if g.chance(0.15) {
            it.min_bpw = Some(g.unit() * 3.0);
        }
        if g.chance(0.15) {
            it.max_bpw = Some(3.0 + g.unit() * 5.0);
        }
        items.push(it);
    }
    let mut groups = Vec::new();
    let mut order: Vec<usize> = (0..n).collect();
    for j in (1..n).rev() {
        order.swap(j, g.below(j as u64 + 1) as usize);
    }
    let mut rest = &order[..];
    while rest.len() >= 2 && g.chance(0.5) {
        let size = 2 + g.below(2.min(rest.len() as u64 - 1)) as usize;
        groups.push(rest[..size].to_vec());
        rest = &rest[size..];
    }
    Problem { items, groups }
}

pub fn allowed(it: &Item, k: usize) -> bool {
    let o = &it.options[k];
    if it.pinned.is_some_and(|p| p != k) {
        return false;
    }
    let bpw = o.bits as f64 / it.numel as f64;
    !it.excluded.contains(&o.config)
        && it.min_bpw.is_none_or(|lo| bpw >= lo)
        && it.max_bpw.is_none_or(|hi| bpw <= hi)
}

/// Whether a full choice vector satisfies every constraint except the budget.
pub fn respects_constraints(p: &Problem, choice: &[usize]) -> bool {
    choice.len() == p.items.len()
        && p.items
            .iter()
            .zip(choice)
            .all(|(it, &k)| k < it.options.len() && allowed(it, k))
        && p.groups.iter().all(|g| {
            let c = p.items[g[0]].options[choice[g[0]]].config;
            g.iter().all(|&m| p.items[m].options[choice[m]].config == c)
        })
}

pub fn cost(p: &Problem, choice: &[usize]) -> u64 {
    p.items
        .iter()
        .zip(choice)
        .map(|(it, &k)| it.options[k].bits)
        .sum()
}

pub struct Brute {
    /// Some combination satisfies the constraints (ignoring the budget).
    pub any_valid: bool,
    pub min_cost: Option<u64>,
    /// Optimal objective within the budget.
    pub best: Option<f64>,
}

pub fn brute_force(p: &Problem, budget: u64, obj: Objective) -> Brute {
    let n = p.items.len();
    let mut choice = vec![0usize; n];
    let mut out = Brute {
        any_valid: false,
        min_cost: None,
        best: None,
    };
    loop {
        if respects_constraints(p, &choice) {
            out.any_valid = true;
            let c = cost(p, &choice);
            out.min_cost = Some(out.min_cost.map_or(c, |m: u64| m.min(c)));
            if c <= budget {
                let v = obj.evaluate(p, &choice);
                out.best = Some(out.best.map_or(v, |b: f64| b.min(v)));
            }
        }
        let mut i = 0;
        loop {
            if i == n {
                return out;
            }
            choice[i] += 1;
            if choice[i] < p.items[i].options.len() {
                break;
            }
            choice[i] = 0;
            i += 1;
        }
    }
}

pub fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * (1.0 + a.abs().max(b.abs()))
}
