//! Stand-in for `crate::qparams::QParams` until that module lands on main: same fields, same
//! serde form, same exact bit count. The measurement code only uses the items below, so the
//! switch is a change of import.
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

/// One EXL2 quantization config: bit widths (descending), the share of act-ordered input rows
/// each covers, one group size per width, and the bits of the per-column scales.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QParams {
    pub bits: Vec<u8>,
    pub bits_prop: Vec<f64>,
    pub group_size: Vec<u32>,
    pub scale_bits: u8,
}

impl QParams {
    /// Checks the invariants EXL2's quantizer and kernels rely on.
    pub fn validate(&self) -> Result<(), String> {
        let n = self.bits.len();
        if n == 0 {
            return Err("bits is empty; expected at least one bit width".into());
        }
        if self.bits_prop.len() != n || self.group_size.len() != n {
            return Err(format!(
                "bits has {n} entries but bits_prop has {} and group_size {}; expected one of each per bit width",
                self.bits_prop.len(),
                self.group_size.len()
            ));
        }
        if let Some(b) = self.bits.iter().find(|b| !(1..=8).contains(*b)) {
            return Err(format!("bit width {b} is outside 1..=8"));
        }
        if self.bits.windows(2).any(|w| w[0] <= w[1]) {
            return Err(format!(
                "bits {:?} are not strictly descending (EXL2 kernels require it)",
                self.bits
            ));
        }
        if let Some(p) = self
            .bits_prop
            .iter()
            .find(|p| !(p.is_finite() && **p > 0.0))
        {
            return Err(format!(
                "bits_prop entry {p} is not a positive finite share"
            ));
        }
        let sum: f64 = self.bits_prop.iter().sum();
        if (sum - 1.0).abs() > 1e-6 {
            return Err(format!(
                "bits_prop {:?} sums to {sum}; expected 1",
                self.bits_prop
            ));
        }
        if self.group_size.contains(&0) {
            return Err("group_size contains 0; expected positive group sizes".into());
        }
        if !(1..=8).contains(&self.scale_bits) {
            return Err(format!(
                "scale_bits {} is outside 1..=8 (EXL2 uses 4)",
                self.scale_bits
            ));
        }
        Ok(())
    }

    /// Exact storage cost in bits of a `rows`(in_features) × `cols`(out_features) matrix,
    /// counted as exllamav2's `QParams.total_bits` does (weights, fp16 scale_max per group,
    /// two int16 per group, `scale_bits` per group per column, int32 permutation per row).
    /// Mirrors its float arithmetic for the per-width group counts.
    pub fn total_bits(&self, rows: u64, cols: u64) -> u64 {
        let mut group_counts = Vec::with_capacity(self.bits.len());
        let mut remaining = rows as i128;
        let mut groups: i128 = 0;
        for (&p, &gs) in self.bits_prop.iter().zip(&self.group_size) {
            let share = (rows as f64 * p).min(remaining as f64);
            let g = (share / f64::from(gs)).ceil() as i128;
            groups = groups.saturating_add(g);
            remaining = remaining.saturating_sub(g.saturating_mul(i128::from(gs)));
            group_counts.push(g);
        }
        let cols = cols as i128;
        let mut total: i128 = 0;
        let mut rows_left = rows as i128;
        for ((&g, &gs), &b) in group_counts.iter().zip(&self.group_size).zip(&self.bits) {
            let r = i128::from(gs).saturating_mul(g).min(rows_left);
            rows_left -= r;
            total = total.saturating_add(r.saturating_mul(cols).saturating_mul(i128::from(b)));
        }
        total = total.saturating_add(groups.saturating_mul(16)); // q_scale_max
        total = total.saturating_add(groups.saturating_mul(32)); // q_groups
        let scales = groups
            .saturating_mul(cols)
            .saturating_mul(i128::from(self.scale_bits));
        total = total.saturating_add(scales); // q_scale
        total = total.saturating_add(rows as i128 * 32); // q_invperm
        total.clamp(0, i128::from(u64::MAX)) as u64
    }

    /// exllamav2's descriptor, e.g. `0.05:3b_64g/0.95:2b_64g s4`.
    pub fn desc(&self) -> String {
        let parts: Vec<String> = self
            .bits
            .iter()
            .zip(&self.bits_prop)
            .zip(&self.group_size)
            .map(|((b, p), g)| format!("{p}:{b}b_{g}g"))
            .collect();
        format!("{} s{}", parts.join("/"), self.scale_bits)
    }

    /// exllamav2's dict form: `{"group_size": {"4": 128}, "bits": [4], "bits_prop": [1], "scale_bits": 4}`.
    pub fn to_exl2_dict(&self) -> Value {
        let gs: Map<String, Value> = self
            .bits
            .iter()
            .zip(&self.group_size)
            .map(|(b, g)| (b.to_string(), json!(g)))
            .collect();
        json!({
            "group_size": gs,
            "bits": self.bits,
            "bits_prop": self.bits_prop,
            "scale_bits": self.scale_bits,
        })
    }

    /// Parses exllamav2's dict form; `group_size` may be a dict keyed by bit width, a list, or
    /// one int (all three are accepted by exllamav2's constructor).
    pub fn from_exl2_dict(v: &Value) -> Result<Self, String> {
        let obj = v
            .as_object()
            .ok_or_else(|| format!("expected a QParams object, found {}", kind_of(v)))?;
        let field = |k: &str| {
            obj.get(k)
                .ok_or_else(|| format!("QParams is missing field `{k}`"))
        };
        let bits: Vec<u8> = uint_list(field("bits")?, "bits")?
            .into_iter()
            .map(|b| u8::try_from(b).map_err(|_| format!("bit width {b} is out of range")))
            .collect::<Result<_, _>>()?;
        let bits_prop = field("bits_prop")?
            .as_array()
            .ok_or("`bits_prop` is not a list")?
            .iter()
            .map(|p| {
                p.as_f64()
                    .ok_or(format!("bits_prop entry {p} is not a number"))
            })
            .collect::<Result<Vec<f64>, _>>()?;
        let scale_bits = field("scale_bits")?
            .as_u64()
            .and_then(|s| u8::try_from(s).ok())
            .ok_or("`scale_bits` is not a small non-negative integer")?;
        let group_size = match field("group_size")? {
            Value::Object(m) => bits
                .iter()
                .map(|b| {
                    let g = m.get(&b.to_string()).ok_or_else(|| {
                        format!(
                            "group_size has no entry for bit width {b} (keys: {:?})",
                            m.keys().collect::<Vec<_>>()
                        )
                    })?;
                    as_u32(g, "group_size")
                })
                .collect::<Result<Vec<u32>, String>>()?,
            Value::Array(_) => uint_list(field("group_size")?, "group_size")?
                .into_iter()
                .map(|g| u32::try_from(g).map_err(|_| format!("group size {g} is out of range")))
                .collect::<Result<_, _>>()?,
            g @ Value::Number(_) => vec![as_u32(g, "group_size")?; bits.len()],
            other => {
                return Err(format!(
                    "`group_size` is {}, expected a dict",
                    kind_of(other)
                ))
            }
        };
        let qp = QParams {
            bits,
            bits_prop,
            group_size,
            scale_bits,
        };
        qp.validate()?;
        Ok(qp)
    }
}

fn as_u32(v: &Value, what: &str) -> Result<u32, String> {
    v.as_u64()
        .and_then(|x| u32::try_from(x).ok())
        .ok_or_else(|| format!("{what} value {v} is not a non-negative integer"))
}

fn uint_list(v: &Value, what: &str) -> Result<Vec<u64>, String> {
    v.as_array()
        .ok_or_else(|| format!("`{what}` is {}, expected a list", kind_of(v)))?
        .iter()
        .map(|x| {
            x.as_u64()
                .ok_or_else(|| format!("`{what}` entry {x} is not a non-negative integer"))
        })
        .collect()
}

/// The JSON type of a value, for messages.
pub(crate) fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}
