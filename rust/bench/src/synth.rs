//! Seeded synthetic allocation problems with EXL2's real candidate costs for Llama-3 shapes.
//!
//! One item per decoder linear; options are EXL2's per-matrix candidates with exact bit costs
//! from `qparams`. Config ids intern the config itself, so fused members tie to the same config.
//! Errors: s_layer · s_kind · √(numel/2²⁴) · 2^(−bpw) · lognormal noise — roughly halving per
//! bit, with per-layer sensitivity (log-normal, heavier at the first and last layers) and
//! per-option noise.
use exl2rs_core::alloc::{Item, Opt, Problem};
use exl2rs_core::qparams::{candidates, LinearKind, QParams};

#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub name: &'static str,
    pub layers: usize,
    pub hidden: usize,
    pub inter: usize,
    pub kv_dim: usize,
}

pub const LLAMA3_8B: Shape = Shape {
    name: "llama3-8b",
    layers: 32,
    hidden: 4096,
    inter: 14336,
    kv_dim: 8 * 128,
};
pub const LLAMA3_70B: Shape = Shape {
    name: "llama3-70b",
    layers: 80,
    hidden: 8192,
    inter: 28672,
    kv_dim: 8 * 128,
};

pub fn shape_by_name(name: &str) -> Option<Shape> {
    match name {
        "8b" | "llama3-8b" => Some(LLAMA3_8B),
        "70b" | "llama3-70b" => Some(LLAMA3_70B),
        _ => None,
    }
}

struct Rng(u64);
impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        let (u, v) = (self.unit(), self.unit());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
}

/// (in_features, out_features) of a linear.
fn dims(s: &Shape, k: LinearKind) -> (usize, usize) {
    match k {
        LinearKind::Q | LinearKind::O => (s.hidden, s.hidden),
        LinearKind::K | LinearKind::V => (s.hidden, s.kv_dim),
        LinearKind::Gate | LinearKind::Up => (s.hidden, s.inter),
        LinearKind::Down => (s.inter, s.hidden),
    }
}

fn kind_sensitivity(k: LinearKind) -> f64 {
    match k {
        LinearKind::Q | LinearKind::K => 0.8,
        LinearKind::V => 1.6,
        LinearKind::O => 1.2,
        LinearKind::Gate | LinearKind::Up => 1.0,
        LinearKind::Down => 1.8,
    }
}

/// The candidate list of a linear: its own EXL2 candidates, or, when fused, the union over the
/// kinds of its fused group (so the group has a useful common set).
fn candidate_set(k: LinearKind, fused: bool) -> Vec<QParams> {
    let kinds: &[LinearKind] = match (fused, k) {
        (true, LinearKind::Q | LinearKind::K | LinearKind::V) => {
            &[LinearKind::Q, LinearKind::K, LinearKind::V]
        }
        (true, LinearKind::Gate | LinearKind::Up) => &[LinearKind::Gate, LinearKind::Up],
        _ => std::slice::from_ref(match k {
            LinearKind::Q => &LinearKind::Q,
            LinearKind::K => &LinearKind::K,
            LinearKind::V => &LinearKind::V,
            LinearKind::O => &LinearKind::O,
            LinearKind::Gate => &LinearKind::Gate,
            LinearKind::Up => &LinearKind::Up,
            LinearKind::Down => &LinearKind::Down,
        }),
    };
    let mut out: Vec<QParams> = Vec::new();
    for &kk in kinds {
        for q in candidates(kk) {
            if !out.contains(&q) {
                out.push(q);
            }
        }
    }
    out
}

pub fn synthetic(shape: &Shape, fused: bool, seed: u64) -> Problem {
    let mut rng = Rng(seed ^ 0x5EED_0000);
    let mut interned: Vec<QParams> = Vec::new();
    let mut id_of = |q: &QParams| -> u32 {
        match interned.iter().position(|x| x == q) {
            Some(i) => i as u32,
            None => {
                interned.push(q.clone());
                (interned.len() - 1) as u32
            }
        }
    };
    let mut items = Vec::new();
    let mut groups = Vec::new();
    for layer in 0..shape.layers {
        let edge = if layer < 2 || layer + 2 >= shape.layers {
            2.5
        } else {
            1.0
        };
        let s_layer = edge * (0.5 * rng.normal()).exp();
        let base = items.len();
        for k in LinearKind::ALL {
            let (rows, cols) = dims(shape, k);
            let numel = (rows * cols) as u64;
            let size = (numel as f64 / (1u64 << 24) as f64).sqrt();
            let options = candidate_set(k, fused)
                .iter()
                .map(|q| {
                    let bits = q
                        .total_bits(rows, cols)
                        .expect("EXL2 table configs are valid");
                    let bpw = bits as f64 / numel as f64;
                    let noise = (0.12 * rng.normal()).exp();
                    let error =
                        0.01 * s_layer * kind_sensitivity(k) * size * 0.5f64.powf(bpw) * noise;
                    Opt {
                        bits,
                        error,
                        config: id_of(q),
                    }
                })
                .collect();
            items.push(Item::new(
                format!("model.layers.{layer}.{}", k.name()),
                numel,
                options,
            ));
        }
        if fused {
            groups.push(vec![base, base + 1, base + 2]);
            groups.push(vec![base + 4, base + 5]);
        }
    }
    Problem { items, groups }
}
