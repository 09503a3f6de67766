//! EXL2 quantization configs (exllamav2's `QParams`): their exact bit cost, their row-group
//! layout, and the default candidate tables. This is the one place bits are counted; the
//! measurement, the allocator, the packer and the reports all call it.
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use thiserror::Error;

#[derive(Debug, Error, PartialEq)]
pub enum QParamsError {
    #[error("invalid QParams {desc}: {reason}")]
    Invalid { desc: String, reason: String },
    #[error("QParams {desc} does not fit a matrix with {rows} input rows: {reason}")]
    Shape {
        desc: String,
        rows: usize,
        reason: String,
    },
    #[error("malformed exllamav2 QParams dict {json}: {reason}")]
    Json { json: String, reason: String },
}

/// Bit widths the EXL2 kernels implement.
pub const SUPPORTED_BITS: [u8; 6] = [2, 3, 4, 5, 6, 8];

/// One EXL2 config: widths in descending order, the proportion of act-ordered input rows each
/// width covers, a group size per width, and the bits of the per-column group scales.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QParams {
    pub bits: Vec<u8>,
    pub bits_prop: Vec<f64>,
    pub group_size: Vec<u32>,
    #[serde(default = "default_scale_bits")]
    pub scale_bits: u8,
}

fn default_scale_bits() -> u8 {
    4
}

/// One quantization group: `rows` consecutive act-ordered input rows at `bits` bits,
/// starting at input row `row_start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    pub bits: u8,
    pub row_start: u32,
    pub rows: u32,
}

impl QParams {
    /// Builds and validates a config.
    pub fn new(
        bits: Vec<u8>,
        bits_prop: Vec<f64>,
        group_size: Vec<u32>,
        scale_bits: u8,
    ) -> Result<Self, QParamsError> {
        let q = QParams {
            bits,
            bits_prop,
            group_size,
            scale_bits,
        };
        q.validate()?;
        Ok(q)
    }

    /// A config with one group size for every width (the common case in EXL2's tables).
    pub fn with_group(group_size: u32, bits: &[u8], bits_prop: &[f64]) -> Self {
        QParams {
            bits: bits.to_vec(),
            bits_prop: bits_prop.to_vec(),
            group_size: vec![group_size; bits.len()],
            scale_bits: 4,
        }
    }

    fn invalid(&self, reason: impl Into<String>) -> QParamsError {
        QParamsError::Invalid {
            desc: self.desc(),
            reason: reason.into(),
        }
    }

    /// Checks what the EXL2 kernels require: widths in {2,3,4,5,6,8} strictly descending,
    /// proportions positive and summing to 1, group sizes divisible by 32 (16 for 2-bit).
    pub fn validate(&self) -> Result<(), QParamsError> {
        let n = self.bits.len();
        if n == 0 {
            return Err(self.invalid("no bit widths"));
        }
        if self.bits_prop.len() != n || self.group_size.len() != n {
            return Err(self.invalid(format!(
                "bits, bits_prop and group_size must have the same length (got {}, {}, {})",
                n,
                self.bits_prop.len(),
                self.group_size.len()
            )));
        }
        for (i, &b) in self.bits.iter().enumerate() {
            if !SUPPORTED_BITS.contains(&b) {
                return Err(self.invalid(format!("width {b} is not one of {SUPPORTED_BITS:?}")));
            }
            if i > 0 && b >= self.bits[i - 1] {
                return Err(self.invalid("bit widths must be strictly descending"));
            }
        }
        for &p in &self.bits_prop {
            if !(p.is_finite() && p > 0.0 && p <= 1.0) {
                return Err(self.invalid(format!("proportion {p} is not in (0, 1]")));
            }
        }
        let sum: f64 = self.bits_prop.iter().sum();
        if (sum - 1.0).abs() > 1e-6 {
            return Err(self.invalid(format!("proportions sum to {sum}, expected 1")));
        }
        for (&b, &g) in self.bits.iter().zip(&self.group_size) {
            let unit = if b == 2 { 16 } else { 32 };
            if g == 0 || g % unit != 0 {
                return Err(self.invalid(format!(
                    "group size {g} for {b}-bit is not a positive multiple of {unit}"
                )));
            }
        }
        if self.scale_bits != 4 {
            return Err(self.invalid(format!(
                "scale_bits {} unsupported (EXL2 stores 4-bit scales)",
                self.scale_bits
            )));
        }
        Ok(())
    }

    /// exllamav2's descriptor, e.g. `0.05:3b_64g/0.95:2b_64g s4`.
    pub fn desc(&self) -> String {
        let parts: Vec<String> = self
            .bits
            .iter()
            .zip(&self.bits_prop)
            .zip(self.group_size.iter().chain(std::iter::repeat(&0)))
            .map(|((b, p), g)| format!("{p}:{b}b_{g}g"))
            .collect();
        format!("{} s{}", parts.join("/"), self.scale_bits)
    }

    /// Number of groups each width gets on a matrix with `rows` input rows. Same rule as
    /// exllamav2 (`ceil(min(rows·p, remaining) / group_size)`), except that a width left with no
    /// rows gets zero groups instead of a negative count.
    fn groups_per_width(&self, rows: usize) -> Result<Vec<u64>, QParamsError> {
        self.validate()?;
        if rows == 0 {
            return Err(QParamsError::Shape {
                desc: self.desc(),
                rows,
                reason: "matrix has no input rows".into(),
            });
        }
        let mut remaining = rows as f64;
        let mut out = Vec::with_capacity(self.bits.len());
        for (&p, &gs) in self.bits_prop.iter().zip(&self.group_size) {
            let want = (rows as f64 * p).min(remaining);
            let g = if want > 0.0 {
                (want / gs as f64).ceil() as u64
            } else {
                0
            };
            remaining -= (g * gs as u64) as f64;
            out.push(g);
        }
        if remaining > 0.0 {
            return Err(QParamsError::Shape {
                desc: self.desc(),
                rows,
                reason: format!("{remaining} rows left uncovered"),
            });
        }
        Ok(out)
    }

    /// The quantization groups in act-order row order. Each width covers whole groups; only the
    /// group where the rows run out is short.
    pub fn groups(&self, rows: usize) -> Result<Vec<Group>, QParamsError> {
        let per_width = self.groups_per_width(rows)?;
        let mut out = Vec::new();
        let mut start = 0usize;
        for ((&b, &gs), &g) in self.bits.iter().zip(&self.group_size).zip(&per_width) {
            for _ in 0..g {
                if start >= rows {
                    break;
                }
                let r = (gs as usize).min(rows - start);
                out.push(Group {
                    bits: b,
                    row_start: start as u32,
                    rows: r as u32,
                });
                start += r;
            }
        }
        Ok(out)
    }

    /// Exact stored size in bits of a `rows`(in) × `cols`(out) matrix in this config:
    /// q_weight + fp16 q_scale_max per group + two int16 per group (q_groups) +
    /// 4-bit q_scale per group and column + int32 q_invperm per input row. No bias term
    /// (exllamav2's bias accounting multiplies by the wrong dimension).
    pub fn total_bits(&self, rows: usize, cols: usize) -> Result<u64, QParamsError> {
        let groups = self.groups(rows)?;
        let (rows, cols) = (rows as u64, cols as u64);
        let weights: u64 = groups
            .iter()
            .map(|g| g.rows as u64 * cols * g.bits as u64)
            .sum();
        let ng = groups.len() as u64;
        Ok(weights + ng * 16 + ng * 32 + ng * cols * self.scale_bits as u64 + rows * 32)
    }

    /// Bits per weight of a `rows` × `cols` matrix in this config.
    pub fn bpw(&self, rows: usize, cols: usize) -> Result<f64, QParamsError> {
        Ok(self.total_bits(rows, cols)? as f64 / (rows as f64 * cols as f64))
    }

    /// exllamav2's `get_dict()` form: `{"group_size": {"4": 128}, "bits": [4], "bits_prop": [1],
    /// "scale_bits": 4}`.
    pub fn to_exllamav2_json(&self) -> Value {
        let mut gs = Map::new();
        for (b, g) in self.bits.iter().zip(&self.group_size) {
            gs.insert(b.to_string(), json!(g));
        }
        json!({
            "group_size": Value::Object(gs),
            "bits": self.bits,
            "bits_prop": self.bits_prop,
            "scale_bits": self.scale_bits,
        })
    }

    /// Parses exllamav2's dict form (group_size as a dict keyed by width, a list, or one int).
    pub fn from_exllamav2_json(v: &Value) -> Result<Self, QParamsError> {
        let err = |reason: &str| QParamsError::Json {
            json: truncate(&v.to_string(), 200),
            reason: reason.to_string(),
        };
        let obj = v.as_object().ok_or_else(|| err("expected an object"))?;
        let bits: Vec<u8> = obj
            .get("bits")
            .and_then(Value::as_array)
            .ok_or_else(|| err("missing list 'bits'"))?
            .iter()
            .map(|b| b.as_u64().filter(|&b| b <= 16).map(|b| b as u8))
            .collect::<Option<_>>()
            .ok_or_else(|| err("'bits' must hold small integers"))?;
        let bits_prop: Vec<f64> = obj
            .get("bits_prop")
            .and_then(Value::as_array)
            .ok_or_else(|| err("missing list 'bits_prop'"))?
            .iter()
            .map(Value::as_f64)
            .collect::<Option<_>>()
            .ok_or_else(|| err("'bits_prop' must hold numbers"))?;
        let group_size: Vec<u32> = match obj.get("group_size") {
            Some(Value::Object(m)) => bits
                .iter()
                .map(|b| {
                    m.get(&b.to_string())
                        .and_then(Value::as_u64)
                        .map(|g| g as u32)
                })
                .collect::<Option<_>>()
                .ok_or_else(|| err("'group_size' lacks an entry for some width"))?,
            Some(Value::Array(a)) => a
                .iter()
                .map(|g| g.as_u64().map(|g| g as u32))
                .collect::<Option<_>>()
                .ok_or_else(|| err("'group_size' must hold integers"))?,
            Some(Value::Number(n)) => {
                vec![
                    n.as_u64()
                        .ok_or_else(|| err("'group_size' must be an integer"))?
                        as u32;
                    bits.len()
                ]
            }
            _ => return Err(err("missing 'group_size'")),
        };
        let scale_bits = match obj.get("scale_bits") {
            None => 4,
            Some(s) => {
                s.as_u64()
                    .ok_or_else(|| err("'scale_bits' must be an integer"))? as u8
            }
        };
        QParams::new(bits, bits_prop, group_size, scale_bits)
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.len() <= n {
        s.to_string()
    } else {
        let mut end = n;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &s[..end])
    }
}

/// The decoder linears EXL2's tables cover.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LinearKind {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl LinearKind {
    pub const ALL: [LinearKind; 7] = [
        LinearKind::Q,
        LinearKind::K,
        LinearKind::V,
        LinearKind::O,
        LinearKind::Gate,
        LinearKind::Up,
        LinearKind::Down,
    ];

    /// The HF module name: `q_proj`, …, `down_proj`.
    pub fn name(self) -> &'static str {
        match self {
            LinearKind::Q => "q_proj",
            LinearKind::K => "k_proj",
            LinearKind::V => "v_proj",
            LinearKind::O => "o_proj",
            LinearKind::Gate => "gate_proj",
            LinearKind::Up => "up_proj",
            LinearKind::Down => "down_proj",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        LinearKind::ALL.into_iter().find(|k| k.name() == name)
    }

    /// Position in its module's table row (q,k,v,o or gate,up,down) and whether it is attention.
    fn table_slot(self) -> (bool, usize) {
        match self {
            LinearKind::Q => (true, 0),
            LinearKind::K => (true, 1),
            LinearKind::V => (true, 2),
            LinearKind::O => (true, 3),
            LinearKind::Gate => (false, 0),
            LinearKind::Up => (false, 1),
            LinearKind::Down => (false, 2),
        }
    }
}

fn qp(gs: u32, bits: &[u8], prop: &[f64]) -> QParams {
    QParams::with_group(gs, bits, prop)
}

fn qpg(gs: &[u32], bits: &[u8], prop: &[f64]) -> QParams {
    QParams {
        bits: bits.to_vec(),
        bits_prop: prop.to_vec(),
        group_size: gs.to_vec(),
        scale_bits: 4,
    }
}

/// EXL2's 19 joint attention rows `[q, k, v, o]`, in exllamav2's table order.
pub fn attn_table() -> Vec<[QParams; 4]> {
    let a = |gs, b: &[u8], p: &[f64]| qp(gs, b, p);
    let s32 = [0.05, 0.95];
    let t19 = [0.1, 0.9];
    let one = [1.0];
    vec![
        [
            a(64, &[3, 2], &s32),
            a(64, &[3, 2], &s32),
            a(64, &[3, 2], &s32),
            a(64, &[3, 2], &s32),
        ],
        [
            a(64, &[3, 2], &t19),
            a(64, &[3, 2], &t19),
            a(64, &[3, 2], &[0.25, 0.75]),
            a(64, &[3, 2], &t19),
        ],
        [
            a(64, &[3, 2], &t19),
            a(64, &[3, 2], &t19),
            a(128, &[4, 3], &t19),
            a(64, &[3, 2], &t19),
        ],
        [
            a(64, &[3, 2], &t19),
            a(64, &[3, 2], &t19),
            a(128, &[4, 3], &t19),
            a(128, &[4, 3], &t19),
        ],
        [
            a(128, &[4, 3], &t19),
            a(128, &[4, 3], &t19),
            a(128, &[4, 3], &t19),
            a(128, &[4, 3], &t19),
        ],
        [
            a(128, &[4, 3], &t19),
            a(128, &[4, 3], &t19),
            a(64, &[4, 3], &t19),
            a(128, &[4, 3], &t19),
        ],
        [
            a(128, &[4], &one),
            a(128, &[4], &one),
            a(128, &[4], &one),
            a(128, &[4], &one),
        ],
        [
            a(128, &[4], &one),
            a(128, &[4], &one),
            a(64, &[4], &one),
            a(128, &[4], &one),
        ],
        [
            a(64, &[4], &one),
            a(64, &[4], &one),
            a(32, &[4], &one),
            a(64, &[4], &one),
        ],
        [
            a(32, &[4], &one),
            a(32, &[4], &one),
            a(32, &[4], &one),
            a(32, &[4], &one),
        ],
        [
            a(128, &[5, 4], &t19),
            a(128, &[5, 4], &t19),
            a(64, &[5, 4], &t19),
            a(128, &[5, 4], &t19),
        ],
        [
            a(64, &[5, 4], &t19),
            a(64, &[5, 4], &t19),
            a(32, &[5, 4], &t19),
            a(64, &[5, 4], &t19),
        ],
        [
            a(64, &[5, 4], &t19),
            a(64, &[5, 4], &t19),
            a(64, &[5], &one),
            a(64, &[5, 4], &t19),
        ],
        [
            a(32, &[5, 4], &t19),
            a(32, &[5, 4], &t19),
            a(32, &[5], &one),
            a(32, &[5, 4], &t19),
        ],
        [
            a(128, &[6, 5], &t19),
            a(128, &[6, 5], &t19),
            a(128, &[6], &one),
            a(128, &[6, 5], &t19),
        ],
        [
            a(32, &[6, 5], &t19),
            a(32, &[6, 5], &t19),
            a(32, &[6], &one),
            a(32, &[6, 5], &t19),
        ],
        [
            a(128, &[6], &one),
            a(128, &[6], &one),
            a(128, &[6], &one),
            a(128, &[6], &one),
        ],
        [
            a(32, &[6], &one),
            a(32, &[6], &one),
            a(32, &[8], &one),
            a(32, &[6], &one),
        ],
        [
            a(128, &[8], &one),
            a(128, &[8], &one),
            a(128, &[8], &one),
            a(128, &[8], &one),
        ],
    ]
}

/// EXL2's 17 joint MLP rows `[gate, up, down]`, in exllamav2's table order.
pub fn mlp_table() -> Vec<[QParams; 3]> {
    let t19 = [0.1, 0.9];
    let q14 = [0.25, 0.75];
    let one = [1.0];
    let d3 = [0.05, 0.1, 0.85];
    let d2 = [0.05, 0.95];
    vec![
        [
            qp(64, &[3, 2], &[0.05, 0.95]),
            qp(64, &[3, 2], &[0.05, 0.95]),
            qpg(&[32, 64, 64], &[6, 3, 2], &[0.05, 0.2, 0.75]),
        ],
        [
            qp(64, &[3, 2], &t19),
            qp(64, &[3, 2], &q14),
            qpg(&[32, 64, 64], &[6, 3, 2], &[0.05, 0.2, 0.75]),
        ],
        [
            qp(64, &[3, 2], &t19),
            qp(64, &[3, 2], &[0.3, 0.7]),
            qp(32, &[5, 3], &d2),
        ],
        [
            qp(64, &[3, 2], &t19),
            qp(64, &[3, 2], &[0.3, 0.7]),
            qp(32, &[5, 4], &d2),
        ],
        [
            qp(128, &[4, 3], &t19),
            qp(128, &[4, 3], &q14),
            qpg(&[32, 128, 128], &[8, 4, 3], &d3),
        ],
        [
            qp(32, &[4, 3], &t19),
            qp(32, &[4, 3], &q14),
            qpg(&[32, 32, 32], &[8, 4, 3], &d3),
        ],
        [
            qp(32, &[4, 3], &t19),
            qp(32, &[4, 3], &q14),
            qpg(&[32, 128], &[8, 4], &d2),
        ],
        [
            qp(128, &[4], &one),
            qp(32, &[4], &one),
            qpg(&[32, 128], &[8, 4], &d2),
        ],
        [
            qp(32, &[4], &one),
            qp(32, &[4], &one),
            qpg(&[32, 32], &[8, 4], &d2),
        ],
        [
            qp(128, &[5, 4], &t19),
            qp(128, &[5, 4], &q14),
            qpg(&[32, 128, 128], &[8, 5, 4], &d3),
        ],
        [
            qp(32, &[5, 4], &t19),
            qp(32, &[5, 4], &q14),
            qpg(&[32, 32, 32], &[8, 5, 4], &d3),
        ],
        [
            qp(128, &[6, 5], &t19),
            qp(128, &[6, 5], &q14),
            qpg(&[32, 128, 128], &[8, 6, 5], &d3),
        ],
        [
            qp(32, &[6, 5], &t19),
            qp(32, &[6, 5], &q14),
            qpg(&[32, 32, 32], &[8, 6, 5], &d3),
        ],
        [
            qp(128, &[6], &one),
            qp(128, &[6], &one),
            qpg(&[32, 128], &[8, 6], &d2),
        ],
        [
            qp(128, &[8, 6], &t19),
            qp(128, &[8, 6], &t19),
            qp(128, &[8, 6], &[0.15, 0.85]),
        ],
        [
            qp(128, &[8, 6], &t19),
            qp(128, &[8, 6], &t19),
            qp(128, &[8], &one),
        ],
        [
            qp(128, &[8], &one),
            qp(128, &[8], &one),
            qp(128, &[8], &one),
        ],
    ]
}

/// EXL2's head options (`-hb`): the head width → its config.
pub fn head_options() -> Vec<(u8, QParams)> {
    vec![
        (2, qp(32, &[4, 2], &[0.3, 0.7])),
        (3, qp(32, &[4, 3], &[0.15, 0.85])),
        (4, qp(32, &[6, 4], &[0.15, 0.85])),
        (5, qp(128, &[6, 5], &[0.15, 0.85])),
        (6, qp(128, &[8, 6], &[0.15, 0.85])),
        (8, qp(128, &[8], &[1.0])),
    ]
}

/// The head config for `-hb bits`, or an error listing the valid choices.
pub fn head_config(bits: u8) -> Result<QParams, QParamsError> {
    head_options()
        .into_iter()
        .find(|(b, _)| *b == bits)
        .map(|(_, q)| q)
        .ok_or_else(|| QParamsError::Invalid {
            desc: format!("head bits {bits}"),
            reason: format!(
                "expected one of {:?}",
                head_options().iter().map(|(b, _)| *b).collect::<Vec<_>>()
            ),
        })
}

/// The unique per-matrix configs of EXL2's tables for one linear kind, in first-seen table
/// order (exllamav2's `get_qparams_reduced`).
pub fn candidates(kind: LinearKind) -> Vec<QParams> {
    let (attn, slot) = kind.table_slot();
    let column: Vec<QParams> = if attn {
        attn_table().into_iter().map(|r| r[slot].clone()).collect()
    } else {
        mlp_table().into_iter().map(|r| r[slot].clone()).collect()
    };
    let mut out: Vec<QParams> = Vec::new();
    for q in column {
        if !out.contains(&q) {
            out.push(q);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_are_valid_and_have_exllamav2_sizes() {
        assert_eq!(attn_table().len(), 19);
        assert_eq!(mlp_table().len(), 17);
        for row in attn_table() {
            row.iter().for_each(|q| q.validate().unwrap());
        }
        for row in mlp_table() {
            row.iter().for_each(|q| q.validate().unwrap());
        }
        let counts: Vec<usize> = LinearKind::ALL
            .iter()
            .map(|&k| candidates(k).len())
            .collect();
        // exl2_anchor §2.1: 14/14/15/14 attention and 13/13/14 MLP unique configs.
        assert_eq!(counts, vec![14, 14, 15, 14, 13, 13, 14]);
    }

    #[test]
    fn total_bits_matches_published_llama3_8b_values() {
        // exl2_anchor §2.2: attention row 6 (all 4b g128) on Llama-3-8B = 169,613,312 bits.
        let row = &attn_table()[6];
        let shapes = [(4096, 4096), (4096, 1024), (4096, 1024), (4096, 4096)];
        let total: u64 = row
            .iter()
            .zip(shapes)
            .map(|(q, (r, c))| q.total_bits(r, c).unwrap())
            .sum();
        assert_eq!(total, 169_613_312);
        // MLP row 7 = 728,741,472 bits (gate/up 4096→14336, down 14336→4096).
        let row = &mlp_table()[7];
        let shapes = [(4096, 14336), (4096, 14336), (14336, 4096)];
        let total: u64 = row
            .iter()
            .zip(shapes)
            .map(|(q, (r, c))| q.total_bits(r, c).unwrap())
            .sum();
        assert_eq!(total, 728_741_472);
        let bpw = qp(128, &[4], &[1.0]).bpw(4096, 4096).unwrap();
        assert!((bpw - 4.039).abs() < 1e-3, "{bpw}");
    }

    #[test]
    fn head_option_6_costs_about_6_344_bpw() {
        let bpw = head_config(6).unwrap().bpw(4096, 128_256).unwrap();
        assert!((bpw - 6.344).abs() < 2e-3, "{bpw}");
        assert!(head_config(7).is_err());
    }

    #[test]
    fn groups_cover_every_row_once_with_descending_widths() {
        let q = qpg(&[32, 64, 64], &[6, 3, 2], &[0.05, 0.2, 0.75]);
        let g = q.groups(576).unwrap();
        assert_eq!(
            g.first().unwrap(),
            &Group {
                bits: 6,
                row_start: 0,
                rows: 32
            }
        );
        let mut next = 0;
        for grp in &g {
            assert_eq!(grp.row_start, next);
            next += grp.rows;
        }
        assert_eq!(next, 576);
        // 6b: ceil(28.8/32)=1 group, 3b: ceil(115.2/64)=2, 2b: ceil(416/64)=7 with a short last.
        assert_eq!(g.len(), 10);
        assert_eq!(g.last().unwrap().rows, 32);
    }

    #[test]
    fn invalid_configs_are_refused_with_reasons() {
        let e = QParams::new(vec![2, 3], vec![0.5, 0.5], vec![64, 64], 4).unwrap_err();
        assert!(e.to_string().contains("descending"), "{e}");
        let e = QParams::new(vec![7], vec![1.0], vec![64], 4).unwrap_err();
        assert!(e.to_string().contains("width 7"), "{e}");
        let e = QParams::new(vec![4], vec![0.9], vec![64], 4).unwrap_err();
        assert!(e.to_string().contains("sum to"), "{e}");
        let e = QParams::new(vec![4], vec![1.0], vec![48], 4).unwrap_err();
        assert!(e.to_string().contains("multiple of 32"), "{e}");
        assert!(QParams::new(vec![2], vec![1.0], vec![48], 4).is_ok());
    }

    #[test]
    fn exllamav2_json_round_trip() {
        for row in mlp_table() {
            for q in row {
                let back = QParams::from_exllamav2_json(&q.to_exllamav2_json()).unwrap();
                assert_eq!(back, q);
            }
        }
        let v: Value = serde_json::from_str(
            r#"{"group_size": {"8": 32, "4": 128}, "bits": [8, 4], "bits_prop": [0.05, 0.95], "scale_bits": 4}"#,
        )
        .unwrap();
        let q = QParams::from_exllamav2_json(&v).unwrap();
        assert_eq!(q.group_size, vec![32, 128]);
        assert_eq!(q.desc(), "0.05:8b_32g/0.95:4b_128g s4");
        let bad: Value = serde_json::from_str(r#"{"bits": [4]}"#).unwrap();
        assert!(QParams::from_exllamav2_json(&bad)
            .unwrap_err()
            .to_string()
            .contains("bits_prop"));
    }
}
