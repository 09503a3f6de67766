//! Matrix shapes for exllamav2 measurement files, which carry none. Shapes give each
//! module's weight count (the bpw denominator) and are checked against every row's exact
//! `total_bits`, so wrong shapes are refused rather than silently used.
use super::error::{MeasurementError, Result};
use super::exl2::{Exl2Module, Exl2Row};
use super::native::NativeMeasurement;
use crate::qparams::QParams;
use std::collections::BTreeMap;

/// Shape of one linear as exllamav2 counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinearShape {
    pub in_features: u64,
    pub out_features: u64,
    /// exllamav2 adds 16 bits per output for a bias.
    pub bias: bool,
    /// Copies sharing one config (MoE experts); 1 otherwise.
    pub count: u64,
}

impl LinearShape {
    pub fn new(in_features: u64, out_features: u64) -> Self {
        LinearShape {
            in_features,
            out_features,
            bias: false,
            count: 1,
        }
    }

    pub fn numel(&self) -> u64 {
        self.in_features
            .saturating_mul(self.out_features)
            .saturating_mul(self.count)
    }

    /// Bits as exllamav2 counts them: the config's exact cost, plus 16 per output for a bias,
    /// times `count`.
    pub fn bits(&self, q: &QParams) -> Result<u64, String> {
        let max = super::native::MAX_DIM;
        if self.in_features > max || self.out_features > max {
            return Err(format!(
                "shape {}x{} exceeds {max} per dimension",
                self.in_features, self.out_features
            ));
        }
        let bias = if self.bias { self.out_features * 16 } else { 0 };
        let one = q
            .total_bits(self.in_features as usize, self.out_features as usize)
            .map_err(|e| e.to_string())?;
        Ok((one + bias).saturating_mul(self.count))
    }
}

/// The linears of one module and any extra weights its budget denominator counts.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ModuleShape {
    pub linears: BTreeMap<String, LinearShape>,
    /// Weights outside the linears that exllamav2's `module.numel()` includes (its norm
    /// weights). 0 gives the DESIGN's bpw (decoder linear weights only).
    pub extra_numel: u64,
}

impl ModuleShape {
    pub(crate) fn row_bits(&self, row: &Exl2Row) -> Result<u64, String> {
        let mut total = 0u64;
        for (k, q) in &row.linears {
            if let Some(s) = self.linears.get(k) {
                let b = s.bits(q).map_err(|e| format!("linear {k:?}: {e}"))?;
                total = total.saturating_add(b);
            }
        }
        Ok(total)
    }

    pub(crate) fn describe(&self) -> String {
        let parts: Vec<String> = self
            .linears
            .iter()
            .map(|(k, s)| {
                let mult = if s.count > 1 {
                    format!(" x{}", s.count)
                } else {
                    String::new()
                };
                format!("{k} {}x{}{mult}", s.in_features, s.out_features)
            })
            .collect();
        format!("[{}]", parts.join(", "))
    }
}

/// Matrix shapes for a measurement.json, which has none: per mode (`self_attn`, `mlp`, …),
/// with optional per-key overrides for models whose layers differ.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Exl2Shapes {
    pub by_mode: BTreeMap<String, ModuleShape>,
    pub by_key: BTreeMap<String, ModuleShape>,
}

/// Dimensions of a Llama-like decoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LlamaDims {
    pub hidden_size: u64,
    pub intermediate_size: u64,
    pub num_attention_heads: u64,
    pub num_key_value_heads: u64,
    pub head_dim: u64,
}

impl Exl2Shapes {
    /// Shapes of a Llama-like layer (q/k/v/o, gate/up/down). With `count_norms`, each module's
    /// denominator includes its RMSNorm weight (hidden_size), as exllamav2's budget does.
    pub fn llama(d: LlamaDims, count_norms: bool) -> Self {
        let q_out = d.num_attention_heads * d.head_dim;
        let kv_out = d.num_key_value_heads * d.head_dim;
        let norm = if count_norms { d.hidden_size } else { 0 };
        let attn = ModuleShape {
            linears: [
                ("q_proj", LinearShape::new(d.hidden_size, q_out)),
                ("k_proj", LinearShape::new(d.hidden_size, kv_out)),
                ("v_proj", LinearShape::new(d.hidden_size, kv_out)),
                ("o_proj", LinearShape::new(q_out, d.hidden_size)),
            ]
            .into_iter()
            .map(|(k, s)| (k.to_string(), s))
            .collect(),
            extra_numel: norm,
        };
        let mlp = ModuleShape {
            linears: [
                (
                    "gate_proj",
                    LinearShape::new(d.hidden_size, d.intermediate_size),
                ),
                (
                    "up_proj",
                    LinearShape::new(d.hidden_size, d.intermediate_size),
                ),
                (
                    "down_proj",
                    LinearShape::new(d.intermediate_size, d.hidden_size),
                ),
            ]
            .into_iter()
            .map(|(k, s)| (k.to_string(), s))
            .collect(),
            extra_numel: norm,
        };
        Exl2Shapes {
            by_mode: [("self_attn".to_string(), attn), ("mlp".to_string(), mlp)].into(),
            by_key: BTreeMap::new(),
        }
    }

    /// Exact per-module shapes from a native measurement of the same model.
    pub fn from_native(m: &NativeMeasurement) -> Self {
        let mut by_key: BTreeMap<String, ModuleShape> = BTreeMap::new();
        for l in &m.linears {
            let module = l
                .name
                .strip_suffix(&format!(".{}", l.kind))
                .unwrap_or(&l.name)
                .to_string();
            by_key.entry(module).or_default().linears.insert(
                l.kind.clone(),
                LinearShape::new(l.in_features, l.out_features),
            );
        }
        Exl2Shapes {
            by_mode: BTreeMap::new(),
            by_key,
        }
    }

    pub(crate) fn for_module(&self, m: &Exl2Module) -> Result<&ModuleShape> {
        self.by_key
            .get(&m.name())
            .or_else(|| self.by_key.get(&m.strategy_key()))
            .or_else(|| self.by_mode.get(m.mode()))
            .ok_or_else(|| MeasurementError::Convert {
                context: format!("module {:?}", m.name()),
                message: format!(
                    "no shapes given for it (mode {:?}); the measurement.json has no shapes, so pass them per mode or per key",
                    m.mode()
                ),
            })
    }
}
