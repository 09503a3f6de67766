//! Stable content hashes for the measurement keys (model, calibration, candidate set).
//! All are SHA-256, written `sha256:<64 hex digits>`. JSON values are hashed in a canonical
//! form (object keys sorted, compact, numbers as serde_json prints them), so the hash does
//! not depend on key order or whitespace, nor on serde_json's `preserve_order` feature.
use super::error::{MeasurementError, Result};
use super::io;
use crate::qparams::QParams;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::Read;
use std::path::Path;

pub const HASH_PREFIX: &str = "sha256:";

fn finish(h: Sha256) -> String {
    let digest = h.finalize();
    let mut s = String::with_capacity(HASH_PREFIX.len() + 64);
    s.push_str(HASH_PREFIX);
    for b in digest.iter() {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

pub fn hash_bytes(data: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(data);
    finish(h)
}

/// Canonical compact JSON: keys sorted at every level.
pub fn canonical_json(v: &Value) -> String {
    let mut out = String::new();
    write_canonical(v, &mut out);
    out
}

fn write_canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String((*k).clone()).to_string());
                out.push(':');
                write_canonical(&m[k.as_str()], out);
            }
            out.push('}');
        }
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(x, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

pub fn hash_json(v: &Value) -> String {
    hash_bytes(canonical_json(v).as_bytes())
}

/// The candidate-set key: the hash of the ordered config list (order matters, since
/// options refer to configs by index).
pub fn candidates_hash(configs: &[QParams]) -> String {
    let v = serde_json::to_value(configs).unwrap_or(Value::Null);
    hash_json(&v)
}

/// Hash of several files in the given order, each framed by its name and length so that
/// moving bytes between files changes the hash. Names are the last path component, so the
/// same model in another directory hashes the same. Streams; never loads a file whole.
pub fn hash_files<P: AsRef<Path>>(paths: &[P]) -> Result<String> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for p in paths {
        let p = p.as_ref();
        let file = io::display(p);
        let io_err = |action: &'static str| {
            let file = file.clone();
            move |source| MeasurementError::Io {
                file,
                action,
                source,
            }
        };
        let mut f = File::open(p).map_err(io_err("open the file for hashing"))?;
        let len = f.metadata().map_err(io_err("stat the file"))?.len();
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update(len.to_le_bytes());
        loop {
            let n = f
                .read(&mut buf)
                .map_err(io_err("read the file for hashing"))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
    }
    Ok(finish(h))
}
