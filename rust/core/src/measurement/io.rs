//! File plumbing shared by both formats: reading with file-naming errors, JSON parsing with
//! line/column, and atomic writes (tmp file in the same directory, fsync, rename, fsync dir).
use super::error::{MeasurementError, Result};
use serde::Serialize;
use serde_json::Value;
use std::fs::{self, File};
use std::io::Write;
use std::path::Path;

pub(crate) fn display(path: &Path) -> String {
    path.display().to_string()
}

pub(crate) fn read_text(path: &Path) -> Result<String> {
    let bytes = fs::read(path).map_err(|source| MeasurementError::Io {
        file: display(path),
        action: "read the file",
        source,
    })?;
    String::from_utf8(bytes).map_err(|e| MeasurementError::Invalid {
        file: display(path),
        at: format!("byte {}", e.utf8_error().valid_up_to()),
        message: "the file is not valid UTF-8; expected a JSON text file".into(),
    })
}

/// Parses JSON text into a tree, mapping empty input and syntax errors to clear messages.
pub(crate) fn parse_json(text: &str, file: &str, expected: &'static str) -> Result<Value> {
    if text.trim().is_empty() {
        return Err(MeasurementError::Empty {
            file: file.to_string(),
            expected,
        });
    }
    serde_json::from_str(text).map_err(|e| {
        let (line, column) = (e.line(), e.column());
        let mut message = e.to_string();
        // serde_json appends " at line L column C"; we print the position ourselves.
        if let Some(cut) = message.rfind(" at line ") {
            message.truncate(cut);
        }
        if e.is_eof() {
            message.push_str(" (the file is truncated: was it written by an interrupted run?)");
        } else if let Some(lit) = non_finite_literal_at(text, line, column) {
            message = format!(
                "non-finite number `{lit}` (Python's json writes it for NaN/inf floats); \
                 expected a finite number: the measurement that produced it is broken"
            );
        }
        MeasurementError::Syntax {
            file: file.to_string(),
            line,
            column,
            message,
        }
    })
}

/// Python's `json.dumps` writes `NaN`, `Infinity`, `-Infinity`; serde_json stops on them.
fn non_finite_literal_at(text: &str, line: usize, column: usize) -> Option<&'static str> {
    let l = text.lines().nth(line.checked_sub(1)?)?;
    let start = column.saturating_sub(2).min(l.len());
    let tail = l
        .get(start..)?
        .trim_start_matches([':', ' ', ',', '[', '-']);
    ["NaN", "Infinity"]
        .into_iter()
        .find(|lit| tail.starts_with(lit))
}

/// Serializes `value` as JSON with 4-space indentation (as exllamav2 writes its files) and
/// replaces `path` atomically: a reader never sees a half-written file, and a crash leaves
/// either the old file or the new one.
pub(crate) fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let file = display(path);
    let mut buf = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut ser = serde_json::Serializer::with_formatter(&mut buf, fmt);
    value
        .serialize(&mut ser)
        .map_err(|e| MeasurementError::Invalid {
            file: file.clone(),
            at: "(serialize)".into(),
            message: e.to_string(),
        })?;
    buf.push(b'\n');

    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => Path::new(".").to_path_buf(),
    };
    let name = path
        .file_name()
        .ok_or_else(|| MeasurementError::Invalid {
            file: file.clone(),
            at: "path".into(),
            message: "the path has no file name".into(),
        })?
        .to_string_lossy()
        .into_owned();
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let io_err = |action: &'static str| {
        let file = file.clone();
        move |source| MeasurementError::Io {
            file,
            action,
            source,
        }
    };
    let result = (|| {
        let mut f = File::create(&tmp).map_err(io_err("create a temporary file beside it"))?;
        f.write_all(&buf)
            .map_err(io_err("write the temporary file"))?;
        f.sync_all().map_err(io_err("fsync the temporary file"))?;
        drop(f);
        fs::rename(&tmp, path).map_err(io_err("rename the temporary file over it"))?;
        // Make the rename itself durable. Directories cannot be opened on every platform.
        if let Ok(d) = File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
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
