//! exl2rs's native measurement file: raw per-linear quantities (exact cost, Hessian-weighted
//! error, reference energy) for every candidate config, plus EXL2-style joint module rows.
//! Validated on load and before save.
use super::error::{MeasurementError, Result};
use super::io;
use super::io::kind_of;
use crate::qparams::QParams;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// The `format` tag of a native file.
pub const FORMAT_TAG: &str = "exl2rs.measurement";
/// The only version this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;
/// Label used in messages for input that did not come from a file.
pub const STRING_SOURCE: &str = "<string>";

/// Largest matrix dimension accepted; keeps every bit count far inside u64.
pub const MAX_DIM: u64 = 1 << 24;

const EXPECTED_DOC: &str = "an exl2rs measurement JSON document";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    pub name: String,
    pub architecture: String,
    pub hash: String,
    pub num_layers: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CalibrationInfo {
    pub hash: String,
    pub rows: u64,
    pub length: u64,
    pub source: String,
}

/// One measured candidate of a linear.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinearOption {
    /// Index into [`NativeMeasurement::configs`].
    pub config: u32,
    /// Exact total bits of this config on this matrix.
    pub bits: u64,
    /// Hessian-weighted error tr(ΔW H ΔWᵀ).
    pub err: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinearRecord {
    pub name: String,
    pub layer: u32,
    /// Module within the layer, e.g. `self_attn`, `mlp`.
    pub module: String,
    /// Linear kind within the module, e.g. `q_proj`.
    pub kind: String,
    pub in_features: u64,
    pub out_features: u64,
    /// Linears with the same value read the same input (one Hessian): q/k/v, gate/up.
    /// `null` or absent for a linear with its own input.
    #[serde(default)]
    pub shared_input: Option<String>,
    /// tr(W H Wᵀ): the error of replacing W by zero, the scale for relative errors.
    pub ref_energy: f64,
    /// Empirical Fisher of the linear's output: the mean over calibration tokens and output
    /// channels of (∂ cross-entropy / ∂ output)². ½ · sensitivity · tr(ΔW H ΔWᵀ) approximates
    /// the loss a quantization error adds, so errors of different layers become comparable.
    /// Absent in files written before it was measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sensitivity: Option<f64>,
    /// Calibration tokens accumulated in H.
    pub samples: u64,
    pub options: Vec<LinearOption>,
}

impl LinearRecord {
    pub fn numel(&self) -> u64 {
        self.in_features * self.out_features
    }
}

/// One joint choice for a whole module (EXL2's table row) and its measured output accuracy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModuleRow {
    /// 1 − mean relative Frobenius error of the module output (exllamav2's definition).
    pub accuracy: f64,
    pub total_bits: u64,
    /// Linear kind → index into [`NativeMeasurement::configs`].
    pub configs: BTreeMap<String, u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModuleRecord {
    /// Module key, e.g. `model.layers.0.self_attn` (the key exllamav2 uses).
    pub name: String,
    pub kind: String,
    pub rows: Vec<ModuleRow>,
}

impl ModuleRecord {
    /// Name of the linear `kind` inside this module.
    pub fn linear_name(&self, kind: &str) -> String {
        format!("{}.{kind}", self.name)
    }
}

/// A native measurement file in memory. Unknown fields are ignored on load (additions within
/// version 1 stay readable) and are not written back by [`NativeMeasurement::save`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NativeMeasurement {
    pub format: String,
    pub version: u32,
    pub model: ModelInfo,
    pub calibration: CalibrationInfo,
    pub candidates_hash: String,
    pub configs: Vec<QParams>,
    pub linears: Vec<LinearRecord>,
    pub modules: Vec<ModuleRecord>,
}

/// The three cache keys of a measurement; a resumed or reused measurement must match them all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeasurementKeys {
    pub model_hash: String,
    pub calibration_hash: String,
    pub candidates_hash: String,
}

impl NativeMeasurement {
    /// An empty measurement with the current format tag and version.
    pub fn new(
        model: ModelInfo,
        calibration: CalibrationInfo,
        candidates_hash: String,
        configs: Vec<QParams>,
    ) -> Self {
        NativeMeasurement {
            format: FORMAT_TAG.into(),
            version: FORMAT_VERSION,
            model,
            calibration,
            candidates_hash,
            configs,
            linears: Vec::new(),
            modules: Vec::new(),
        }
    }

    /// Reads and validates a file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = io::read_text(path)?;
        Self::from_json_str_named(&text, &io::display(path))
    }

    /// Parses and validates JSON text (messages name the source `<string>`).
    pub fn from_json_str(text: &str) -> Result<Self> {
        Self::from_json_str_named(text, STRING_SOURCE)
    }

    /// Parses and validates JSON text; `source` names it in messages.
    pub fn from_json_str_named(text: &str, source: &str) -> Result<Self> {
        let tree = io::parse_json(text, source, EXPECTED_DOC)?;
        Self::from_value(tree, source)
    }

    /// Validates a JSON tree: format tag and version first (so a file of another kind gets
    /// a message saying so, not a list of missing fields), then the schema, then the content.
    pub fn from_value(tree: Value, source: &str) -> Result<Self> {
        check_header(&tree, source)?;
        let m: NativeMeasurement = serde_path_to_error::deserialize(&tree).map_err(|e| {
            let at = describe_path(&tree, &e.path().to_string());
            MeasurementError::Schema {
                file: source.to_string(),
                at,
                message: e.into_inner().to_string(),
            }
        })?;
        m.validate(source)?;
        Ok(m)
    }

    /// Validates, then writes atomically (tmp file in the same directory, fsync, rename).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        self.validate(&io::display(path))?;
        io::write_json_atomic(path, self)
    }

    /// Compact JSON text of a validated measurement.
    pub fn to_json_string(&self) -> Result<String> {
        self.validate(STRING_SOURCE)?;
        serde_json::to_string(self).map_err(|e| MeasurementError::Invalid {
            file: STRING_SOURCE.into(),
            at: "(serialize)".into(),
            message: e.to_string(),
        })
    }

    pub fn keys(&self) -> MeasurementKeys {
        MeasurementKeys {
            model_hash: self.model.hash.clone(),
            calibration_hash: self.calibration.hash.clone(),
            candidates_hash: self.candidates_hash.clone(),
        }
    }

    /// Refuses to reuse a measurement made for another model, calibration set or candidate set.
    pub fn check_keys(&self, expected: &MeasurementKeys, source: &str) -> Result<()> {
        let pairs = [
            ("model hash", &self.model.hash, &expected.model_hash),
            (
                "calibration hash",
                &self.calibration.hash,
                &expected.calibration_hash,
            ),
            (
                "candidates hash",
                &self.candidates_hash,
                &expected.candidates_hash,
            ),
        ];
        for (what, found, want) in pairs {
            if found != want {
                return Err(MeasurementError::KeyMismatch {
                    file: source.into(),
                    what,
                    found: found.clone(),
                    expected: want.clone(),
                });
            }
        }
        Ok(())
    }

    /// Index of a linear by name.
    pub fn linear_index(&self, name: &str) -> Option<usize> {
        self.linears.iter().position(|l| l.name == name)
    }

    /// Checks every invariant the file promises; `source` names it in messages.
    pub fn validate(&self, source: &str) -> Result<()> {
        let file = || source.to_string();
        if self.format != FORMAT_TAG {
            return Err(wrong_tag(source, &Value::String(self.format.clone())));
        }
        if self.version != FORMAT_VERSION {
            return Err(MeasurementError::UnsupportedVersion {
                file: file(),
                found: self.version.to_string(),
                supported: FORMAT_VERSION,
            });
        }
        if self.model.num_layers == 0 {
            return Err(MeasurementError::BadNumber {
                file: file(),
                at: "model".into(),
                field: "num_layers",
                value: "0".into(),
                expected: "at least 1",
            });
        }
        self.validate_configs(source)?;
        let linear_at = self.validate_linears(source)?;
        self.validate_modules(source, &linear_at)
    }

    fn validate_configs(&self, source: &str) -> Result<()> {
        let mut seen: Vec<&QParams> = Vec::with_capacity(self.configs.len());
        for (i, c) in self.configs.iter().enumerate() {
            c.validate().map_err(|e| MeasurementError::Invalid {
                file: source.into(),
                at: format!("configs[{i}]"),
                message: e.to_string(),
            })?;
            if let Some(j) = seen.iter().position(|s| *s == c) {
                return Err(MeasurementError::Invalid {
                    file: source.into(),
                    at: format!("configs[{i}]"),
                    message: format!(
                        "{} duplicates configs[{j}]; expected each candidate config once",
                        c.desc()
                    ),
                });
            }
            seen.push(c);
        }
        Ok(())
    }

    /// Returns name → index of the linears.
    fn validate_linears(&self, source: &str) -> Result<HashMap<&str, usize>> {
        let mut index: HashMap<&str, usize> = HashMap::with_capacity(self.linears.len());
        for (i, l) in self.linears.iter().enumerate() {
            let at = format!("linears[{i}] {:?}", l.name);
            if let Some(&j) = index.get(l.name.as_str()) {
                return Err(MeasurementError::Duplicate {
                    file: source.into(),
                    what: "linear",
                    name: l.name.clone(),
                    first: format!("linears[{j}]"),
                    second: format!("linears[{i}]"),
                });
            }
            index.insert(&l.name, i);
            if l.layer >= self.model.num_layers {
                return Err(bad(
                    source,
                    &at,
                    "layer",
                    l.layer,
                    "less than model.num_layers",
                ));
            }
            let dim_ok = |d: u64| (1..=MAX_DIM).contains(&d);
            if !dim_ok(l.in_features) || !dim_ok(l.out_features) {
                return Err(MeasurementError::Invalid {
                    file: source.into(),
                    at,
                    message: format!(
                        "shape {}x{}; expected in_features and out_features in 1..={MAX_DIM}",
                        l.in_features, l.out_features
                    ),
                });
            }
            if !(l.ref_energy.is_finite() && l.ref_energy >= 0.0) {
                return Err(bad(
                    source,
                    &at,
                    "ref_energy",
                    l.ref_energy,
                    "a finite number >= 0",
                ));
            }
            if let Some(v) = l.sensitivity {
                if !(v.is_finite() && v >= 0.0) {
                    return Err(bad(source, &at, "sensitivity", v, "a finite number >= 0"));
                }
            }
            if l.options.is_empty() {
                return Err(MeasurementError::Invalid {
                    file: source.into(),
                    at,
                    message: "no options; expected at least one measured config".into(),
                });
            }
            let mut seen_configs: HashMap<u32, usize> = HashMap::new();
            for (k, o) in l.options.iter().enumerate() {
                let at = format!("{at} options[{k}]");
                let c = self.config(o.config, source, &at)?;
                if let Some(first) = seen_configs.insert(o.config, k) {
                    return Err(MeasurementError::Invalid {
                        file: source.into(),
                        at,
                        message: format!(
                            "config {} is measured twice (also at options[{first}]); expected each config once per linear",
                            o.config
                        ),
                    });
                }
                let expected = cost(c, o.config, l.in_features, l.out_features, source, &at)?;
                if o.bits != expected {
                    return Err(MeasurementError::BitsMismatch {
                        file: source.into(),
                        at,
                        config: o.config as usize,
                        desc: c.desc(),
                        found: o.bits,
                        expected,
                        in_features: l.in_features,
                        out_features: l.out_features,
                    });
                }
                if !(o.err.is_finite() && o.err >= 0.0) {
                    return Err(bad(source, &at, "err", o.err, "a finite number >= 0"));
                }
            }
        }
        Ok(index)
    }

    fn validate_modules(&self, source: &str, linear_at: &HashMap<&str, usize>) -> Result<()> {
        let mut names: HashMap<&str, usize> = HashMap::new();
        for (i, m) in self.modules.iter().enumerate() {
            let at = format!("modules[{i}] {:?}", m.name);
            if let Some(j) = names.insert(&m.name, i) {
                return Err(MeasurementError::Duplicate {
                    file: source.into(),
                    what: "module",
                    name: m.name.clone(),
                    first: format!("modules[{j}]"),
                    second: format!("modules[{i}]"),
                });
            }
            if m.rows.is_empty() {
                return Err(MeasurementError::Invalid {
                    file: source.into(),
                    at,
                    message: "no rows; expected at least one measured joint config".into(),
                });
            }
            let kinds: Vec<&String> = m.rows[0].configs.keys().collect();
            for (r, row) in m.rows.iter().enumerate() {
                let at = format!("{at} rows[{r}]");
                if row.configs.is_empty() {
                    return Err(MeasurementError::Invalid {
                        file: source.into(),
                        at,
                        message: "configs is empty; expected one config per linear".into(),
                    });
                }
                if row.configs.keys().collect::<Vec<_>>() != kinds {
                    return Err(MeasurementError::Invalid {
                        file: source.into(),
                        at,
                        message: format!(
                            "names linears {:?} but rows[0] names {:?}; expected the same linears in every row",
                            row.configs.keys().collect::<Vec<_>>(),
                            kinds
                        ),
                    });
                }
                if !(row.accuracy.is_finite() && row.accuracy <= 1.0) {
                    return Err(bad(
                        source,
                        &at,
                        "accuracy",
                        row.accuracy,
                        "a finite number <= 1",
                    ));
                }
                let mut expected_bits = 0u64;
                for (kind, &ci) in &row.configs {
                    let at = format!("{at} configs.{kind}");
                    let c = self.config(ci, source, &at)?;
                    let lname = m.linear_name(kind);
                    let Some(&li) = linear_at.get(lname.as_str()) else {
                        return Err(MeasurementError::Invalid {
                            file: source.into(),
                            at,
                            message: format!(
                                "refers to linear {lname:?}, which is not in linears; expected every module row to name measured linears"
                            ),
                        });
                    };
                    let l = &self.linears[li];
                    expected_bits += cost(c, ci, l.in_features, l.out_features, source, &at)?;
                }
                if row.total_bits != expected_bits {
                    return Err(MeasurementError::Invalid {
                        file: source.into(),
                        at,
                        message: format!(
                            "total_bits = {}, but its configs cost exactly {expected_bits} bits on the module's linears",
                            row.total_bits
                        ),
                    });
                }
            }
        }
        Ok(())
    }

    fn config(&self, index: u32, source: &str, at: &str) -> Result<&QParams> {
        self.configs
            .get(index as usize)
            .ok_or_else(|| MeasurementError::ConfigIndex {
                file: source.into(),
                at: at.into(),
                index: u64::from(index),
                count: self.configs.len(),
            })
    }
}

/// Exact bits of config `index` on an `in_features` × `out_features` matrix.
fn cost(c: &QParams, index: u32, rows: u64, cols: u64, source: &str, at: &str) -> Result<u64> {
    c.total_bits(rows as usize, cols as usize)
        .map_err(|e| MeasurementError::Invalid {
            file: source.into(),
            at: at.into(),
            message: format!("config {index} cannot be applied to a {rows}x{cols} matrix: {e}"),
        })
}

fn bad(
    source: &str,
    at: &str,
    field: &'static str,
    value: impl std::fmt::Display,
    expected: &'static str,
) -> MeasurementError {
    MeasurementError::BadNumber {
        file: source.into(),
        at: at.into(),
        field,
        value: value.to_string(),
        expected,
    }
}

fn wrong_tag(source: &str, found: &Value) -> MeasurementError {
    MeasurementError::WrongFormat {
        file: source.into(),
        found: format!("\"format\" is {found}"),
        expected: format!("\"format\": \"{FORMAT_TAG}\""),
    }
}

fn check_header(tree: &Value, source: &str) -> Result<()> {
    let Some(obj) = tree.as_object() else {
        return Err(MeasurementError::WrongFormat {
            file: source.into(),
            found: format!("the document is {}", kind_of(tree)),
            expected: format!("a JSON object with \"format\": \"{FORMAT_TAG}\""),
        });
    };
    match obj.get("format") {
        Some(Value::String(s)) if s == FORMAT_TAG => {}
        Some(other) => return Err(wrong_tag(source, other)),
        None if obj.contains_key("measurement") => {
            return Err(MeasurementError::WrongFormat {
                file: source.into(),
                found: "this is an exllamav2 measurement.json (it has \"measurement\" and no \"format\")".into(),
                expected: format!(
                    "an exl2rs file with \"format\": \"{FORMAT_TAG}\"; read exllamav2 files with Exl2Measurement::load"
                ),
            })
        }
        None => {
            return Err(MeasurementError::WrongFormat {
                file: source.into(),
                found: "the document has no \"format\" field".into(),
                expected: format!("\"format\": \"{FORMAT_TAG}\""),
            })
        }
    }
    match obj.get("version") {
        Some(v) if v.as_u64() == Some(u64::from(FORMAT_VERSION)) => Ok(()),
        Some(v) => Err(MeasurementError::UnsupportedVersion {
            file: source.into(),
            found: v.to_string(),
            supported: FORMAT_VERSION,
        }),
        None => Err(MeasurementError::Schema {
            file: source.into(),
            at: "(root)".into(),
            message: "missing field `version`".into(),
        }),
    }
}

/// Turns a serde path like `linears[3].options[0]` into one that also names the linear or
/// module, e.g. `linears[3] "model.layers.1.mlp.up_proj" .options[0]`.
fn describe_path(tree: &Value, path: &str) -> String {
    if path == "." || path.is_empty() {
        return "(root)".into();
    }
    for list in ["linears", "modules"] {
        let prefix = format!("{list}[");
        if let Some(rest) = path.strip_prefix(&prefix) {
            if let Some(end) = rest.find(']') {
                if let Ok(i) = rest[..end].parse::<usize>() {
                    if let Some(Value::String(name)) = tree
                        .get(list)
                        .and_then(|l| l.get(i))
                        .and_then(|e| e.get("name"))
                    {
                        return format!("{list}[{i}] {name:?}{}", &rest[end + 1..]);
                    }
                }
            }
        }
    }
    path.to_string()
}
