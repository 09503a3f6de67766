//! exllamav2's `measurement.json`: read it (so an exllamav2 user can re-solve their own
//! measurement with exl2rs), write it from a native measurement (so exllamav2's `convert.py -m`
//! accepts ours), and build the allocation problem from it.
//!
//! Schema (exllamav2 0.3.x, `conversion/measure.py`):
//! `{"measurement": {"<prefix>model.layers.N.<mode>": [row, ...] | null |
//!   {"attn": [row, ...], "mlp": [row, ...]}, ...}, "last_module_idx": int}` where a row is
//! `{"accuracy": float, "total_bits": int, "<linear>": <QParams dict>, ...}`. Modules without
//! measurement (final norm, head) are stored as `null`.
//!
//! The file carries no matrix shapes. The problem needs each module's weight count, and
//! guessing it from `total_bits` is ambiguous (one sum, several unknown shapes), so the
//! caller passes shapes ([`Exl2Shapes`]) and every row's `total_bits` is checked against
//! them exactly: a wrong shape is caught, never silently used as a bpw denominator.
use super::error::{MeasurementError, Result};
use super::io;
use super::io::kind_of;
use super::native::{NativeMeasurement, STRING_SOURCE};
use super::shapes::Exl2Shapes;
use super::strategy::check_required;
use crate::alloc::{Item, Opt, Problem};
use crate::qparams::QParams;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::path::Path;

const EXPECTED_DOC: &str =
    "an exllamav2 measurement.json ({\"measurement\": {...}, \"last_module_idx\": N})";

/// One measured joint choice of a module.
#[derive(Debug, Clone, PartialEq)]
pub struct Exl2Row {
    pub accuracy: f64,
    pub total_bits: u64,
    /// Linear kind (`q_proj`, `w1`, …) → its config.
    pub linears: BTreeMap<String, QParams>,
}

impl Exl2Row {
    fn to_value(&self) -> Value {
        let mut m = Map::new();
        m.insert("accuracy".into(), json!(self.accuracy));
        m.insert("total_bits".into(), json!(self.total_bits));
        for (k, q) in &self.linears {
            m.insert(k.clone(), q.to_exllamav2_json());
        }
        Value::Object(m)
    }
}

/// One optimizer slot of exllamav2: a module with its measured rows.
#[derive(Debug, Clone, PartialEq)]
pub struct Exl2Module {
    /// Key in the `measurement` dict, e.g. `model.layers.3.mlp`.
    pub key: String,
    /// For `parallel_decoder` modules: `attn` or `mlp` (the sub-list of the key's value).
    pub part: Option<String>,
    /// Decoder layer parsed from the key (`None` for keys outside `model.layers.N`).
    pub layer: Option<u32>,
    pub rows: Vec<Exl2Row>,
}

impl Exl2Module {
    /// Item name: the key, plus `.attn` / `.mlp` for a parallel-decoder part.
    pub fn name(&self) -> String {
        match &self.part {
            Some(p) => format!("{}.{p}", self.key),
            None => self.key.clone(),
        }
    }

    /// The mode after the layer (`self_attn`, `mlp`, `block_sparse_moe`, …); parallel-decoder
    /// parts report `self_attn` / `mlp`, the modes their linears have.
    pub fn mode(&self) -> &str {
        match self.part.as_deref() {
            Some("attn") => "self_attn",
            Some(_) => "mlp",
            None => self.key.rsplit('.').next().unwrap_or(""),
        }
    }

    /// Key of this module in exllamav2's `job["strategy"]` (what `quantize.py` looks up).
    pub fn strategy_key(&self) -> String {
        match &self.part {
            Some(_) => {
                let base = self
                    .key
                    .rsplit_once('.')
                    .map_or(self.key.as_str(), |(b, _)| b);
                format!("{base}.{}", self.mode())
            }
            None => self.key.clone(),
        }
    }

    pub(crate) fn kinds(&self) -> Vec<&String> {
        self.rows
            .first()
            .map(|r| r.linears.keys().collect())
            .unwrap_or_default()
    }
}

/// An exllamav2 measurement in memory; modules are ordered by layer, attention before MLP
/// (exllamav2's slot order).
#[derive(Debug, Clone, PartialEq)]
pub struct Exl2Measurement {
    pub modules: Vec<Exl2Module>,
    /// Keys stored as `null` (modules exllamav2 does not measure: final norm, head).
    pub null_keys: Vec<String>,
    /// Index of the last model module the measurement pass completed.
    pub last_module_idx: u64,
}

/// Splits `<prefix>model.layers.N.<mode>` into (`<prefix>model.layers.N`, N, mode).
pub(crate) fn split_key(key: &str) -> Option<(&str, u32, &str)> {
    let start = key.rfind("model.layers.")? + "model.layers.".len();
    let rest = &key[start..];
    let (num, mode) = rest.split_once('.')?;
    let layer = num.parse().ok()?;
    Some((&key[..start + num.len()], layer, mode))
}

pub(crate) fn mode_rank(mode: &str) -> u8 {
    match mode {
        "self_attn" | "linear_attn" | "parallel_decoder" => 0,
        _ => 1,
    }
}

impl Exl2Measurement {
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = io::read_text(path)?;
        Self::from_json_str_named(&text, &io::display(path))
    }

    pub fn from_json_str(text: &str) -> Result<Self> {
        Self::from_json_str_named(text, STRING_SOURCE)
    }

    pub fn from_json_str_named(text: &str, source: &str) -> Result<Self> {
        let tree = io::parse_json(text, source, EXPECTED_DOC)?;
        Self::from_value(&tree, source)
    }

    pub fn from_value(tree: &Value, source: &str) -> Result<Self> {
        let invalid = |at: String, message: String| MeasurementError::Invalid {
            file: source.into(),
            at,
            message,
        };
        let obj = tree
            .as_object()
            .ok_or_else(|| MeasurementError::WrongFormat {
                file: source.into(),
                found: format!("the document is {}", kind_of(tree)),
                expected: EXPECTED_DOC.into(),
            })?;
        let Some(meas) = obj.get("measurement") else {
            let found = if obj.contains_key("format") {
                "this is an exl2rs native measurement (it has \"format\"); read it with NativeMeasurement::load".to_string()
            } else {
                format!(
                    "there is no \"measurement\" key (keys: {:?})",
                    obj.keys().collect::<Vec<_>>()
                )
            };
            return Err(MeasurementError::WrongFormat {
                file: source.into(),
                found,
                expected: EXPECTED_DOC.into(),
            });
        };
        let meas = meas.as_object().ok_or_else(|| MeasurementError::Schema {
            file: source.into(),
            at: "measurement".into(),
            message: format!("is {}, expected an object of module keys", kind_of(meas)),
        })?;
        let last_module_idx = match obj.get("last_module_idx") {
            Some(v) => v.as_u64().ok_or_else(|| MeasurementError::Schema {
                file: source.into(),
                at: "last_module_idx".into(),
                message: format!("is {v}, expected a non-negative integer"),
            })?,
            None => {
                return Err(MeasurementError::Schema {
                    file: source.into(),
                    at: "(root)".into(),
                    message: "missing field `last_module_idx` (exllamav2's convert.py needs it to reuse the file)".into(),
                })
            }
        };

        let mut modules = Vec::new();
        let mut null_keys = Vec::new();
        for (key, v) in meas {
            let layer = split_key(key).map(|(_, l, _)| l);
            match v {
                Value::Null => null_keys.push(key.clone()),
                Value::Array(rows) => modules.push(Exl2Module {
                    key: key.clone(),
                    part: None,
                    layer,
                    rows: parse_rows(rows, source, key)?,
                }),
                Value::Object(parts) if parts.contains_key("attn") || parts.contains_key("mlp") => {
                    for (part, rows) in parts {
                        let at = format!("measurement.{key:?}.{part}");
                        let rows = rows.as_array().ok_or_else(|| {
                            invalid(at.clone(), format!("is {}, expected a list of rows", kind_of(rows)))
                        })?;
                        modules.push(Exl2Module {
                            key: key.clone(),
                            part: Some(part.clone()),
                            layer,
                            rows: parse_rows(rows, source, &format!("{key}.{part}"))?,
                        });
                    }
                }
                other => {
                    return Err(invalid(
                        format!("measurement.{key:?}"),
                        format!("is {}, expected a list of rows, null, or {{\"attn\": [...], \"mlp\": [...]}}", kind_of(other)),
                    ))
                }
            }
        }
        if modules.is_empty() {
            return Err(invalid(
                "measurement".into(),
                "has no measured modules; expected at least one list of rows".into(),
            ));
        }
        null_keys.sort();
        modules.sort_by(|a, b| {
            let ka = (a.layer.is_none(), a.layer, mode_rank(a.mode()), &a.key);
            let kb = (b.layer.is_none(), b.layer, mode_rank(b.mode()), &b.key);
            ka.cmp(&kb)
        });
        Ok(Exl2Measurement {
            modules,
            null_keys,
            last_module_idx,
        })
    }

    /// The document exllamav2 writes.
    pub fn to_value(&self) -> Value {
        let mut meas = Map::new();
        for m in &self.modules {
            let rows = Value::Array(m.rows.iter().map(Exl2Row::to_value).collect());
            match &m.part {
                None => {
                    meas.insert(m.key.clone(), rows);
                }
                Some(p) => {
                    let entry = meas
                        .entry(m.key.clone())
                        .or_insert_with(|| Value::Object(Map::new()));
                    if let Value::Object(parts) = entry {
                        parts.insert(p.clone(), rows);
                    }
                }
            }
        }
        for k in &self.null_keys {
            meas.insert(k.clone(), Value::Null);
        }
        json!({"measurement": meas, "last_module_idx": self.last_module_idx})
    }

    /// Writes the file atomically, indented like exllamav2's own.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        io::write_json_atomic(path.as_ref(), &self.to_value())
    }

    /// One item per module (exllamav2's slots, in its order), rows as options:
    /// `bits` = total_bits, `error` = 1 − accuracy, `config` = row index. `numel` comes from
    /// `shapes`, checked against every row's total_bits.
    pub fn to_problem(&self, shapes: &Exl2Shapes) -> Result<Problem> {
        let mut items = Vec::with_capacity(self.modules.len());
        for m in &self.modules {
            let shape = shapes.for_module(m)?;
            let name = m.name();
            for kind in m.kinds() {
                if !shape.linears.contains_key(kind) {
                    return Err(MeasurementError::Convert {
                        context: format!("module {name:?}"),
                        message: format!(
                            "its rows configure linear {kind:?}, but the shapes given for it only cover {:?}",
                            shape.linears.keys().collect::<Vec<_>>()
                        ),
                    });
                }
            }
            let mut options = Vec::with_capacity(m.rows.len());
            for (r, row) in m.rows.iter().enumerate() {
                let expected = shape.row_bits(row).map_err(|e| MeasurementError::Convert {
                    context: format!("module {name:?} row {r}"),
                    message: e,
                })?;
                if expected != row.total_bits {
                    return Err(MeasurementError::Convert {
                        context: format!("module {name:?} row {r}"),
                        message: format!(
                            "total_bits = {} in the file, but its configs cost {expected} bits on the given shapes {}; the shapes do not match the measured model",
                            row.total_bits,
                            shape.describe()
                        ),
                    });
                }
                options.push(Opt {
                    bits: row.total_bits,
                    error: 1.0 - row.accuracy,
                    config: r as u32,
                });
            }
            let numel = shape
                .linears
                .iter()
                .filter(|(k, _)| m.kinds().contains(k))
                .map(|(_, s)| s.numel())
                .sum::<u64>()
                + shape.extra_numel;
            items.push(Item {
                name,
                numel,
                options,
                weight: 1.0,
                min_bpw: None,
                max_bpw: None,
                pinned: None,
                excluded: Vec::new(),
            });
        }
        Ok(Problem {
            items,
            groups: Vec::new(),
        })
    }
}

fn parse_rows(rows: &[Value], source: &str, key: &str) -> Result<Vec<Exl2Row>> {
    let invalid = |at: String, message: String| MeasurementError::Invalid {
        file: source.into(),
        at,
        message,
    };
    if rows.is_empty() {
        return Err(invalid(
            format!("measurement.{key:?}"),
            "has no rows; expected at least one".into(),
        ));
    }
    let mut out: Vec<Exl2Row> = Vec::with_capacity(rows.len());
    for (r, row) in rows.iter().enumerate() {
        let at = format!("module {key:?} row {r}");
        let obj = row.as_object().ok_or_else(|| {
            invalid(
                at.clone(),
                format!("is {}, expected an object", kind_of(row)),
            )
        })?;
        let accuracy = match obj.get("accuracy") {
            Some(v) => v.as_f64().ok_or_else(|| {
                invalid(at.clone(), format!("accuracy is {v}, expected a number"))
            })?,
            None => return Err(invalid(at, "missing field `accuracy`".into())),
        };
        if !(accuracy.is_finite() && accuracy <= 1.0) {
            return Err(MeasurementError::BadNumber {
                file: source.into(),
                at,
                field: "accuracy",
                value: accuracy.to_string(),
                expected: "a finite number <= 1",
            });
        }
        let total_bits = match obj.get("total_bits") {
            Some(v) => v.as_u64().filter(|b| *b > 0).ok_or_else(|| {
                invalid(
                    at.clone(),
                    format!("total_bits is {v}, expected a positive integer"),
                )
            })?,
            None => return Err(invalid(at, "missing field `total_bits`".into())),
        };
        let mut linears = BTreeMap::new();
        for (k, v) in obj {
            if k == "accuracy" || k == "total_bits" {
                continue;
            }
            let q = QParams::from_exllamav2_json(v)
                .and_then(|q| q.validate().map(|()| q))
                .map_err(|e| invalid(format!("{at} linear {k:?}"), e.to_string()))?;
            linears.insert(k.clone(), q);
        }
        if linears.is_empty() {
            return Err(invalid(
                at,
                "configures no linears; expected one QParams dict per linear".into(),
            ));
        }
        if let Some(first) = out.first() {
            if first.linears.keys().ne(linears.keys()) {
                return Err(invalid(
                    at,
                    format!(
                        "configures linears {:?} but row 0 configures {:?}; expected the same linears in every row",
                        linears.keys().collect::<Vec<_>>(),
                        first.linears.keys().collect::<Vec<_>>()
                    ),
                ));
            }
        }
        out.push(Exl2Row {
            accuracy,
            total_bits,
            linears,
        });
    }
    Ok(out)
}

impl NativeMeasurement {
    /// The exllamav2 measurement.json of this measurement's module rows. Every decoder layer
    /// must have an attention and an MLP module (exllamav2's optimizer reads both). The final
    /// norm and head appear as `null`, and `last_module_idx` is the head's index (embedding,
    /// the modules, norm, head), as exllamav2 writes for a Llama-like model.
    pub fn to_exl2(&self) -> Result<Exl2Measurement> {
        let mut modules = Vec::with_capacity(self.modules.len());
        let mut prefix: Option<String> = None;
        for m in &self.modules {
            let (_, layer, mode) = split_key(&m.name).ok_or_else(|| MeasurementError::Convert {
                context: format!("module {:?}", m.name),
                message: "is not named <prefix>model.layers.N.<mode>, the key exllamav2 expects"
                    .into(),
            })?;
            let p = &m.name[..m.name.rfind("model.layers.").unwrap_or(0)];
            prefix.get_or_insert_with(|| p.to_string());
            let rows = m
                .rows
                .iter()
                .map(|r| Exl2Row {
                    accuracy: r.accuracy,
                    total_bits: r.total_bits,
                    linears: r
                        .configs
                        .iter()
                        .map(|(k, &c)| (k.clone(), self.configs[c as usize].clone()))
                        .collect(),
                })
                .collect();
            let module = Exl2Module {
                key: m.name.clone(),
                part: None,
                layer: Some(layer),
                rows,
            };
            check_required(&m.name, mode, &module.kinds())?;
            modules.push(module);
        }
        for layer in 0..self.model.num_layers {
            let has = |rank: u8| {
                modules
                    .iter()
                    .any(|m| m.layer == Some(layer) && mode_rank(m.mode()) == rank)
            };
            for (rank, what) in [(0, "attention"), (1, "MLP")] {
                if !has(rank) {
                    return Err(MeasurementError::Convert {
                        context: format!("layer {layer}"),
                        message: format!(
                            "has no measured {what} module rows; exllamav2's optimizer needs an attention and an MLP module for each of the model's {} layers",
                            self.model.num_layers
                        ),
                    });
                }
            }
        }
        modules.sort_by_key(|m| (m.layer, mode_rank(m.mode())));
        let prefix = prefix.unwrap_or_default();
        let n = modules.len() as u64;
        Ok(Exl2Measurement {
            modules,
            // Sorted, as after reading a file.
            null_keys: vec![
                format!("{prefix}lm_head.linear"),
                format!("{prefix}model.norm.norm"),
            ],
            last_module_idx: n + 2,
        })
    }
}
