//! exllamav2's `job["strategy"]` built from an allocation: module key → the chosen entry,
//! from exllamav2 module rows, native module rows, or a per-linear native solution.
use super::error::{MeasurementError, Result};
use super::exl2::Exl2Measurement;
use super::native::NativeMeasurement;
use crate::qparams::QParams;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;

/// exllamav2's `job["strategy"]`: module key → the chosen entry, which `quantize.py` reads
/// per linear (`strategy[key]["q_proj"]` → QParams dict).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Strategy {
    pub entries: BTreeMap<String, StrategyEntry>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StrategyEntry {
    /// The measured accuracy of a joint row; `None` for per-linear allocations, whose
    /// combination was never measured as a whole (exllamav2's quantizer does not read it).
    pub accuracy: Option<f64>,
    pub total_bits: u64,
    pub linears: BTreeMap<String, QParams>,
}

impl Strategy {
    pub fn to_value(&self) -> Value {
        let mut out = Map::new();
        for (k, e) in &self.entries {
            let mut m = Map::new();
            if let Some(a) = e.accuracy {
                m.insert("accuracy".into(), json!(a));
            }
            m.insert("total_bits".into(), json!(e.total_bits));
            for (kind, q) in &e.linears {
                m.insert(kind.clone(), q.to_exllamav2_json());
            }
            out.insert(k.clone(), Value::Object(m));
        }
        Value::Object(out)
    }
}

/// Linears exllamav2's quantizer requires per mode (`quantize.py`: `strat["q_proj"]` …).
fn required_linears(mode: &str) -> &'static [&'static str] {
    match mode {
        "self_attn" => &["q_proj", "k_proj", "v_proj", "o_proj"],
        "mlp" => &["up_proj", "down_proj"],
        "block_sparse_moe" => &["w1", "w2", "w3"],
        _ => &[],
    }
}

pub(crate) fn check_required(key: &str, mode: &str, kinds: &[&String]) -> Result<()> {
    for need in required_linears(mode) {
        if !kinds.iter().any(|k| k.as_str() == *need) {
            return Err(MeasurementError::Convert {
                context: format!("module {key:?}"),
                message: format!(
                    "has no {need:?}; exllamav2 needs {:?} for a {mode} module (found {kinds:?})",
                    required_linears(mode)
                ),
            });
        }
    }
    Ok(())
}

impl Exl2Measurement {
    /// exllamav2's `job["strategy"]` for a solution: `choice[i]` is the row chosen for
    /// `modules[i]` (the option index of item i of [`Self::to_problem`]).
    pub fn strategy(&self, choice: &[usize]) -> Result<Strategy> {
        if choice.len() != self.modules.len() {
            return Err(MeasurementError::Convert {
                context: "strategy".into(),
                message: format!(
                    "{} choices for {} modules; expected one row index per module",
                    choice.len(),
                    self.modules.len()
                ),
            });
        }
        let mut s = Strategy::default();
        for (m, &c) in self.modules.iter().zip(choice) {
            let row = m.rows.get(c).ok_or_else(|| MeasurementError::Convert {
                context: format!("module {:?}", m.name()),
                message: format!(
                    "row {c} chosen, but it has {} rows (0..{})",
                    m.rows.len(),
                    m.rows.len()
                ),
            })?;
            s.entries.insert(
                m.strategy_key(),
                StrategyEntry {
                    accuracy: Some(row.accuracy),
                    total_bits: row.total_bits,
                    linears: row.linears.clone(),
                },
            );
        }
        Ok(s)
    }

    /// Checks that `strategy` configures every measured module and the same linears.
    pub fn check_strategy(&self, strategy: &Strategy) -> Result<()> {
        for m in &self.modules {
            let key = m.strategy_key();
            let entry = strategy.entries.get(&key).ok_or_else(|| MeasurementError::Convert {
                context: "strategy".into(),
                message: format!("has no entry for module {key:?}; exllamav2 would fail with KeyError when quantizing it"),
            })?;
            let kinds: Vec<&String> = entry.linears.keys().collect();
            if kinds != m.kinds() {
                return Err(MeasurementError::Convert {
                    context: format!("strategy entry {key:?}"),
                    message: format!(
                        "configures linears {kinds:?}; expected {:?} as in the measurement",
                        m.kinds()
                    ),
                });
            }
        }
        Ok(())
    }
}

impl NativeMeasurement {
    /// exllamav2 strategy from a solution of [`Self::module_problem`]: `choice[i]` is the row
    /// chosen for `modules[i]`.
    pub fn module_strategy(&self, choice: &[usize]) -> Result<Strategy> {
        self.check_choice(choice, self.modules.len(), "modules")?;
        let mut s = Strategy::default();
        for (m, &c) in self.modules.iter().zip(choice) {
            let row = m.rows.get(c).ok_or_else(|| MeasurementError::Convert {
                context: format!("module {:?}", m.name),
                message: format!("row {c} chosen, but it has {} rows", m.rows.len()),
            })?;
            s.entries.insert(
                m.name.clone(),
                StrategyEntry {
                    accuracy: Some(row.accuracy),
                    total_bits: row.total_bits,
                    linears: row
                        .configs
                        .iter()
                        .map(|(k, &ci)| (k.clone(), self.configs[ci as usize].clone()))
                        .collect(),
                },
            );
        }
        Ok(s)
    }

    /// exllamav2 strategy from a solution of [`Self::linear_problem`]: `choice[i]` is the option
    /// chosen for `linears[i]`. Linears are grouped into modules by name
    /// (`<module>.<kind>`); `accuracy` is omitted, since that combination was not measured.
    pub fn linear_strategy(&self, choice: &[usize]) -> Result<Strategy> {
        self.check_choice(choice, self.linears.len(), "linears")?;
        let mut s = Strategy::default();
        for (l, &c) in self.linears.iter().zip(choice) {
            let opt = l.options.get(c).ok_or_else(|| MeasurementError::Convert {
                context: format!("linear {:?}", l.name),
                message: format!("option {c} chosen, but it has {} options", l.options.len()),
            })?;
            let module = l.name.strip_suffix(&format!(".{}", l.kind)).ok_or_else(|| {
                MeasurementError::Convert {
                    context: format!("linear {:?}", l.name),
                    message: format!(
                        "its name does not end in its kind {:?}, so its exllamav2 module key is unknown",
                        l.kind
                    ),
                }
            })?;
            let e = s
                .entries
                .entry(module.to_string())
                .or_insert_with(|| StrategyEntry {
                    accuracy: None,
                    total_bits: 0,
                    linears: BTreeMap::new(),
                });
            e.total_bits += opt.bits;
            e.linears
                .insert(l.kind.clone(), self.configs[opt.config as usize].clone());
        }
        for (key, e) in &s.entries {
            let mode = key.rsplit('.').next().unwrap_or("");
            check_required(key, mode, &e.linears.keys().collect::<Vec<_>>())?;
        }
        Ok(s)
    }

    fn check_choice(&self, choice: &[usize], n: usize, what: &str) -> Result<()> {
        if choice.len() != n {
            return Err(MeasurementError::Convert {
                context: "strategy".into(),
                message: format!(
                    "{} choices for {n} {what}; expected one per entry of {what}",
                    choice.len()
                ),
            });
        }
        Ok(())
    }
}
