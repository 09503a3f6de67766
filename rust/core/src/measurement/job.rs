//! Hand an exl2rs allocation to exllamav2's converter through its job file.
//!
//! Facts (exllamav2 0.3.x `convert_exl2.py`): the job lives in `<out_dir>/job_new.json`;
//! when it exists, `convert.py -o <out_dir>` resumes it and the saved job overrides the CLI
//! options (except `out_dir`). `-m file` copies the file's `measurement` and
//! `last_module_idx` into the job with `reuse_measurement` = the path and jumps to
//! `optimize`; `optimize` sets `job["strategy"]` (module key → chosen measurement entry)
//! and moves to `tokens_cal`. A job that carries our strategy at `tokens_cal` therefore
//! skips exllamav2's annealer and quantizes exactly our allocation.
use super::error::{MeasurementError, Result};
use super::exl2::Exl2Measurement;
use super::io;
use super::strategy::Strategy;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// exllamav2's `-hb` choices (`qparams_headoptions`).
pub const HEAD_BITS_OPTIONS: [u8; 6] = [2, 3, 4, 5, 6, 8];

/// Stages before quantization starts, where a new strategy may be injected. From the first
/// four the job jumps to `tokens_cal`; the last two keep their place (strategy is read later).
const RESET_STAGES: [&str; 4] = ["begin", "initial_embeddings", "measure_quant", "optimize"];
const KEEP_STAGES: [&str; 2] = ["tokens_cal", "embeddings"];

/// The options of a new exllamav2 conversion job, defaults as in `convert.py`.
#[derive(Debug, Clone, PartialEq)]
pub struct Exl2Job {
    pub in_dir: String,
    pub out_dir: String,
    pub cal_dataset: Option<String>,
    /// Target bpw recorded in `quantization_config.bits` of the output.
    pub bits: f64,
    pub dataset_rows: u64,
    pub measurement_rows: u64,
    pub length: u64,
    pub measurement_length: u64,
    pub head_bits: u8,
    /// Shard size in MB.
    pub shard_size: f64,
    pub compile_full: Option<String>,
    pub rope_scale: Option<f64>,
    pub rope_alpha: Option<f64>,
}

impl Exl2Job {
    pub fn new(in_dir: impl Into<String>, out_dir: impl Into<String>, bits: f64) -> Self {
        Exl2Job {
            in_dir: in_dir.into(),
            out_dir: out_dir.into(),
            cal_dataset: None,
            bits,
            dataset_rows: 100,
            measurement_rows: 16,
            length: 2048,
            measurement_length: 2048,
            head_bits: 6,
            shard_size: 8192.0,
            compile_full: None,
            rope_scale: None,
            rope_alpha: None,
        }
    }

    fn validate(&self) -> Result<()> {
        let bad = |message: String| MeasurementError::Convert {
            context: "exllamav2 job".into(),
            message,
        };
        if self.in_dir.is_empty() || self.out_dir.is_empty() {
            return Err(bad("in_dir and out_dir must be set".into()));
        }
        if !HEAD_BITS_OPTIONS.contains(&self.head_bits) {
            return Err(bad(format!(
                "head_bits = {}; expected one of {HEAD_BITS_OPTIONS:?} (exllamav2's -hb choices)",
                self.head_bits
            )));
        }
        if !(self.bits.is_finite() && self.bits > 0.0) {
            return Err(bad(format!(
                "bits = {}; expected a positive bpw",
                self.bits
            )));
        }
        if !(self.shard_size.is_finite() && self.shard_size >= 0.0) {
            return Err(bad(format!(
                "shard_size = {}; expected MB >= 0",
                self.shard_size
            )));
        }
        Ok(())
    }

    /// The job document, at stage `tokens_cal` with `strategy` in place.
    /// `reuse_measurement` is recorded as the measurement's path (informational).
    pub fn to_value(
        &self,
        measurement: &Exl2Measurement,
        strategy: &Strategy,
        reuse_measurement: &str,
    ) -> Result<Value> {
        self.validate()?;
        measurement.check_strategy(strategy)?;
        let shard_size = if self.shard_size > 0.0 {
            self.shard_size
        } else {
            1024f64.powi(3) // convert.py's "unlimited"
        };
        let mut job = json!({
            "in_dir": self.in_dir,
            "out_dir": self.out_dir,
            "cal_dataset": self.cal_dataset,
            "bits": self.bits,
            "dataset_rows": self.dataset_rows,
            "measurement_rows": self.measurement_rows,
            "length": self.length,
            "measurement_length": self.measurement_length,
            "head_bits": self.head_bits,
            "shard_size": shard_size,
            "compile_full": self.compile_full,
            "rope_scale": self.rope_scale,
            "rope_alpha": self.rope_alpha,
            "output_measurement": null,
            "progress": "tokens_cal",
            "status_output": false,
        });
        set_measurement(&mut job, measurement, strategy, reuse_measurement);
        Ok(job)
    }

    /// Writes `<out_dir>/job_new.json` atomically and returns its path. Run
    /// `python convert.py -o <out_dir>` afterwards: it resumes at quantization.
    pub fn write(
        &self,
        measurement: &Exl2Measurement,
        strategy: &Strategy,
        reuse_measurement: &str,
    ) -> Result<PathBuf> {
        let job = self.to_value(measurement, strategy, reuse_measurement)?;
        let dir = Path::new(&self.out_dir);
        std::fs::create_dir_all(dir).map_err(|source| MeasurementError::Io {
            file: self.out_dir.clone(),
            action: "create the output directory",
            source,
        })?;
        let path = dir.join("job_new.json");
        io::write_json_atomic(&path, &job)?;
        Ok(path)
    }
}

fn set_measurement(job: &mut Value, m: &Exl2Measurement, s: &Strategy, reuse: &str) {
    let doc = m.to_value();
    job["measurement"] = doc["measurement"].clone();
    job["last_module_idx"] = doc["last_module_idx"].clone();
    job["reuse_measurement"] = json!(reuse);
    job["strategy"] = s.to_value();
}

/// Puts `strategy` (and `measurement`) into an existing `job_new.json` that has not started
/// quantizing, and moves it to `tokens_cal` so exllamav2 quantizes our allocation. Refuses a
/// corrupted job (`"invalid"` set) or one already quantizing / compiled / finished.
pub fn inject_strategy(
    job_path: impl AsRef<Path>,
    measurement: &Exl2Measurement,
    strategy: &Strategy,
    reuse_measurement: &str,
) -> Result<()> {
    let path = job_path.as_ref();
    let file = io::display(path);
    measurement.check_strategy(strategy)?;
    let text = io::read_text(path)?;
    let mut job = io::parse_json(&text, &file, "an exllamav2 job_new.json")?;
    let Some(obj) = job.as_object() else {
        return Err(MeasurementError::WrongFormat {
            file,
            found: "the document is not an object".into(),
            expected: "an exllamav2 job_new.json object".into(),
        });
    };
    if obj.contains_key("invalid") {
        return Err(MeasurementError::Invalid {
            file,
            at: "invalid".into(),
            message: "the job is marked corrupted (a checkpoint write was interrupted); exllamav2 refuses to resume it, so start a new job".into(),
        });
    }
    let progress = match obj.get("progress") {
        Some(Value::String(p)) => p.clone(),
        other => {
            return Err(MeasurementError::Schema {
                file,
                at: "progress".into(),
                message: format!(
                    "is {}, expected a stage name string",
                    other.map_or("missing".to_string(), |v| v.to_string())
                ),
            })
        }
    };
    let next = if RESET_STAGES.contains(&progress.as_str()) {
        "tokens_cal".to_string()
    } else if KEEP_STAGES.contains(&progress.as_str()) {
        progress
    } else {
        return Err(MeasurementError::Invalid {
            file,
            at: "progress".into(),
            message: format!(
                "is {progress:?}; a strategy can only be injected before quantization starts (stages {:?}); start a new job with convert.py -nr",
                [&RESET_STAGES[..], &KEEP_STAGES[..]].concat()
            ),
        });
    };
    set_measurement(&mut job, measurement, strategy, reuse_measurement);
    job["progress"] = json!(next);
    io::write_json_atomic(path, &job)
}
