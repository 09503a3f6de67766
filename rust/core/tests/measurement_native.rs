//! Native measurement format: load/save round trips, every validation error, hashing.
use exl2rs_core::measurement::hash::{candidates_hash, canonical_json, hash_bytes, hash_files};
use exl2rs_core::measurement::{MeasurementError, MeasurementKeys, NativeMeasurement};
use proptest::prelude::*;
use serde_json::{json, Value};
use std::path::PathBuf;

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

fn sample_text() -> String {
    std::fs::read_to_string(data("native_1layer.json")).unwrap()
}

fn sample_value() -> Value {
    serde_json::from_str(&sample_text()).unwrap()
}

/// Parses a mutated document and returns the error message (the test fails if it loads).
fn err_of(v: &Value) -> (MeasurementError, String) {
    let e = NativeMeasurement::from_json_str(&v.to_string()).expect_err("must be rejected");
    let msg = e.to_string();
    (e, msg)
}

fn assert_contains(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "message {msg:?} lacks {p:?}");
    }
}

#[test]
fn sample_loads_with_expected_content() {
    let m = NativeMeasurement::load(data("native_1layer.json")).unwrap();
    assert_eq!(m.model.num_layers, 1);
    assert_eq!(m.configs.len(), 3);
    assert_eq!(m.linears.len(), 7);
    assert_eq!(m.modules.len(), 2);
    let q = &m.linears[0];
    assert_eq!(q.name, "model.layers.0.self_attn.q_proj");
    assert_eq!(
        q.shared_input.as_deref(),
        Some("model.layers.0.self_attn.qkv")
    );
    assert_eq!(m.linears[3].shared_input, None);
    // 8-bit g128 on 64x64: 64*64*8 + 1 group * (16 + 32 + 64*4) + 64*32.
    assert_eq!(q.options[2].bits, 64 * 64 * 8 + 16 + 32 + 64 * 4 + 64 * 32);
}

#[test]
fn save_load_round_trip_is_exact_and_atomic() {
    let m = NativeMeasurement::load(data("native_1layer.json")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.json");
    std::fs::write(&path, "old content").unwrap();
    m.save(&path).unwrap();
    assert_eq!(NativeMeasurement::load(&path).unwrap(), m);
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, vec!["m.json"], "no temporary file may remain");
    let text = m.to_json_string().unwrap();
    assert_eq!(NativeMeasurement::from_json_str(&text).unwrap(), m);
}

#[test]
fn save_refuses_invalid_measurement_and_keeps_old_file() {
    let mut m = NativeMeasurement::load(data("native_1layer.json")).unwrap();
    m.linears[1].options[0].err = f64::NAN;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.json");
    std::fs::write(&path, "old").unwrap();
    let msg = m.save(&path).unwrap_err().to_string();
    assert_contains(
        &msg,
        &[
            "m.json",
            "model.layers.0.self_attn.k_proj",
            "options[0]",
            "err = NaN",
            "finite",
        ],
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "old");
}

#[test]
fn missing_file_names_the_path() {
    let e = NativeMeasurement::load("/nonexistent/dir/meas.json").unwrap_err();
    assert!(matches!(e, MeasurementError::Io { .. }));
    assert_contains(
        &e.to_string(),
        &["/nonexistent/dir/meas.json", "cannot read"],
    );
}

#[test]
fn empty_file_is_reported_as_empty() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty.json");
    std::fs::write(&path, "").unwrap();
    let e = NativeMeasurement::load(&path).unwrap_err();
    assert!(matches!(e, MeasurementError::Empty { .. }));
    assert_contains(
        &e.to_string(),
        &["empty.json", "empty", "exl2rs measurement"],
    );
    let e = NativeMeasurement::from_json_str("  \n\t").unwrap_err();
    assert!(matches!(e, MeasurementError::Empty { .. }));
}

#[test]
fn truncated_json_reports_line_and_column() {
    let text = sample_text();
    let cut = &text[..text.len() / 2];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cut.json");
    std::fs::write(&path, cut).unwrap();
    let e = NativeMeasurement::load(&path).unwrap_err();
    let MeasurementError::Syntax { line, column, .. } = &e else {
        panic!("expected a syntax error, got {e}")
    };
    assert_eq!(*line, cut.lines().count());
    assert!(*column > 0);
    assert_contains(
        &e.to_string(),
        &["cut.json", "invalid JSON at line", "truncated"],
    );
}

#[test]
fn garbage_json_reports_position() {
    let e = NativeMeasurement::from_json_str("{\"format\": \"exl2rs.measurement\",\n  oops}")
        .unwrap_err();
    let msg = e.to_string();
    assert_contains(&msg, &["<string>", "line 2, column 3"]);
}

#[test]
fn python_nan_literal_is_named() {
    let text = sample_text().replacen("\"err\": 9.0", "\"err\": NaN", 1);
    assert_ne!(text, sample_text());
    let msg = NativeMeasurement::from_json_str(&text)
        .unwrap_err()
        .to_string();
    assert_contains(&msg, &["non-finite number `NaN`", "line"]);
}

#[test]
fn wrong_format_tag() {
    let mut v = sample_value();
    v["format"] = json!("gguf.imatrix");
    let (e, msg) = err_of(&v);
    assert!(matches!(e, MeasurementError::WrongFormat { .. }));
    assert_contains(
        &msg,
        &[
            "\"gguf.imatrix\"",
            "expected \"format\": \"exl2rs.measurement\"",
        ],
    );
    let (_, msg) = err_of(&json!([1, 2]));
    assert_contains(&msg, &["the document is a list"]);
}

#[test]
fn exllamav2_file_given_to_native_reader_says_so() {
    let text = std::fs::read_to_string(data("exl2_measurement_2layers.json")).unwrap();
    let msg = NativeMeasurement::from_json_str(&text)
        .unwrap_err()
        .to_string();
    assert_contains(
        &msg,
        &["exllamav2 measurement.json", "Exl2Measurement::load"],
    );
}

#[test]
fn unsupported_version() {
    let mut v = sample_value();
    v["version"] = json!(2);
    let (e, msg) = err_of(&v);
    assert!(matches!(e, MeasurementError::UnsupportedVersion { .. }));
    assert_contains(
        &msg,
        &["unsupported measurement version 2", "reads version 1"],
    );
}

#[test]
fn missing_fields_name_the_json_path_and_the_linear() {
    let mut v = sample_value();
    v["linears"][2]
        .as_object_mut()
        .unwrap()
        .remove("ref_energy");
    let (e, msg) = err_of(&v);
    assert!(matches!(e, MeasurementError::Schema { .. }));
    assert_contains(
        &msg,
        &[
            "linears[2] \"model.layers.0.self_attn.v_proj\"",
            "missing field `ref_energy`",
        ],
    );

    let mut v = sample_value();
    v["model"].as_object_mut().unwrap().remove("hash");
    assert_contains(&err_of(&v).1, &["model", "missing field `hash`"]);

    let mut v = sample_value();
    v["linears"][4]["options"][1]["bits"] = json!("many");
    assert_contains(
        &err_of(&v).1,
        &[
            "linears[4] \"model.layers.0.mlp.gate_proj\".options[1].bits",
            "invalid type",
        ],
    );
}

#[test]
fn config_index_out_of_range() {
    let mut v = sample_value();
    v["linears"][0]["options"][1]["config"] = json!(7);
    let (e, msg) = err_of(&v);
    assert!(matches!(
        e,
        MeasurementError::ConfigIndex {
            index: 7,
            count: 3,
            ..
        }
    ));
    assert_contains(
        &msg,
        &[
            "model.layers.0.self_attn.q_proj",
            "options[1]",
            "config index 7",
            "expected 0..3",
        ],
    );
}

#[test]
fn bits_disagreeing_with_total_bits() {
    let mut v = sample_value();
    let good = v["linears"][6]["options"][0]["bits"].as_u64().unwrap();
    v["linears"][6]["options"][0]["bits"] = json!(good + 1);
    let (e, msg) = err_of(&v);
    assert!(matches!(e, MeasurementError::BitsMismatch { .. }));
    assert_contains(
        &msg,
        &[
            "model.layers.0.mlp.down_proj",
            &format!("bits = {}", good + 1),
            &format!("costs exactly {good} bits on a 128x64 matrix"),
            "0.05:3b_64g/0.95:2b_64g s4",
        ],
    );
}

#[test]
fn negative_or_non_finite_numbers() {
    let mut v = sample_value();
    v["linears"][3]["options"][2]["err"] = json!(-0.5);
    let (e, msg) = err_of(&v);
    assert!(matches!(
        e,
        MeasurementError::BadNumber { field: "err", .. }
    ));
    assert_contains(
        &msg,
        &[
            "model.layers.0.self_attn.o_proj",
            "err = -0.5",
            "finite number >= 0",
        ],
    );

    let mut v = sample_value();
    v["linears"][5]["ref_energy"] = json!(-3.0);
    assert_contains(
        &err_of(&v).1,
        &["model.layers.0.mlp.up_proj", "ref_energy = -3", ">= 0"],
    );

    let mut m = NativeMeasurement::from_json_str(&sample_text()).unwrap();
    m.linears[0].ref_energy = f64::INFINITY;
    let msg = m.validate("built.json").unwrap_err().to_string();
    assert_contains(&msg, &["built.json", "ref_energy = inf"]);

    let mut v = sample_value();
    v["modules"][1]["rows"][0]["accuracy"] = json!(1.5);
    assert_contains(
        &err_of(&v).1,
        &["model.layers.0.mlp", "rows[0]", "accuracy = 1.5", "<= 1"],
    );
}

#[test]
fn duplicate_linear_and_module_names() {
    let mut v = sample_value();
    v["linears"][1]["name"] = v["linears"][0]["name"].clone();
    let (e, msg) = err_of(&v);
    assert!(matches!(
        e,
        MeasurementError::Duplicate { what: "linear", .. }
    ));
    assert_contains(
        &msg,
        &[
            "duplicate linear name \"model.layers.0.self_attn.q_proj\"",
            "linears[0] and linears[1]",
        ],
    );

    let mut v = sample_value();
    v["modules"][1]["name"] = v["modules"][0]["name"].clone();
    assert_contains(
        &err_of(&v).1,
        &["duplicate module name", "modules[0] and modules[1]"],
    );
}

#[test]
fn module_rows_referencing_missing_configs_or_linears() {
    let mut v = sample_value();
    v["modules"][0]["rows"][2]["configs"]["v_proj"] = json!(9);
    let (e, msg) = err_of(&v);
    assert!(matches!(e, MeasurementError::ConfigIndex { index: 9, .. }));
    assert_contains(
        &msg,
        &[
            "model.layers.0.self_attn",
            "rows[2]",
            "configs.v_proj",
            "config index 9",
        ],
    );

    let mut v = sample_value();
    let cfg = v["modules"][1]["rows"][0]["configs"]
        .as_object_mut()
        .unwrap();
    let down = cfg.remove("down_proj").unwrap();
    cfg.insert("fc2".into(), down);
    for r in v["modules"][1]["rows"].as_array_mut().unwrap() {
        let c = r["configs"].as_object_mut().unwrap();
        let d = c.remove("down_proj").unwrap_or(json!(0));
        c.insert("fc2".into(), d);
    }
    assert_contains(
        &err_of(&v).1,
        &[
            "model.layers.0.mlp",
            "refers to linear \"model.layers.0.mlp.fc2\"",
            "not in linears",
        ],
    );

    let mut v = sample_value();
    let tb = v["modules"][0]["rows"][1]["total_bits"].as_u64().unwrap();
    v["modules"][0]["rows"][1]["total_bits"] = json!(tb - 32);
    assert_contains(
        &err_of(&v).1,
        &[
            "model.layers.0.self_attn",
            "rows[1]",
            &format!("total_bits = {}", tb - 32),
            &format!("cost exactly {tb} bits"),
        ],
    );

    let mut v = sample_value();
    v["modules"][0]["rows"][3]["configs"]
        .as_object_mut()
        .unwrap()
        .remove("o_proj");
    assert_contains(
        &err_of(&v).1,
        &["rows[3]", "expected the same linears in every row"],
    );
}

#[test]
fn other_structural_errors() {
    let mut v = sample_value();
    v["configs"][2] = v["configs"][1].clone();
    assert_contains(&err_of(&v).1, &["configs[2]", "duplicates configs[1]"]);

    let mut v = sample_value();
    v["configs"][0]["bits"] = json!([2, 3]);
    assert_contains(&err_of(&v).1, &["configs[0]", "strictly descending"]);

    let mut v = sample_value();
    v["linears"][0]["layer"] = json!(1);
    assert_contains(
        &err_of(&v).1,
        &[
            "self_attn.q_proj",
            "layer = 1",
            "less than model.num_layers",
        ],
    );

    let mut v = sample_value();
    v["linears"][0]["options"][1]["config"] = json!(0);
    v["linears"][0]["options"][1]["bits"] = v["linears"][0]["options"][0]["bits"].clone();
    assert_contains(&err_of(&v).1, &["q_proj", "measured twice"]);

    let mut v = sample_value();
    v["linears"][0]["options"] = json!([]);
    assert_contains(&err_of(&v).1, &["q_proj", "no options"]);
}

#[test]
fn key_check_names_the_differing_key() {
    let m = NativeMeasurement::from_json_str(&sample_text()).unwrap();
    let mut keys = m.keys();
    m.check_keys(&keys, "m.json").unwrap();
    keys.calibration_hash = "sha256:00".into();
    let e = m.check_keys(&keys, "m.json").unwrap_err();
    assert_contains(
        &e.to_string(),
        &["m.json", "calibration hash mismatch", "sha256:00"],
    );
    let _: MeasurementKeys = keys;
}

#[test]
fn hashes_are_stable() {
    // FIPS 180-2 test vector.
    assert_eq!(
        hash_bytes(b"abc"),
        "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    let a = json!({"b": [1, {"y": 2, "x": 1.5}], "a": "s"});
    let b: Value =
        serde_json::from_str("{ \"a\" : \"s\", \"b\": [1, {\"x\": 1.5, \"y\": 2}] }").unwrap();
    assert_eq!(canonical_json(&a), r#"{"a":"s","b":[1,{"x":1.5,"y":2}]}"#);
    assert_eq!(canonical_json(&a), canonical_json(&b));

    let m = NativeMeasurement::from_json_str(&sample_text()).unwrap();
    let h = candidates_hash(&m.configs);
    assert_eq!(h, candidates_hash(&m.configs.clone()));
    let mut rev = m.configs.clone();
    rev.reverse();
    assert_ne!(h, candidates_hash(&rev), "order is part of the key");
}

#[test]
fn file_hash_frames_each_file() {
    let d1 = tempfile::tempdir().unwrap();
    let d2 = tempfile::tempdir().unwrap();
    let w = |d: &tempfile::TempDir, n: &str, c: &str| {
        let p = d.path().join(n);
        std::fs::write(&p, c).unwrap();
        p
    };
    let x = [w(&d1, "a", "ab"), w(&d1, "b", "c")];
    let y = [w(&d2, "a", "a"), w(&d2, "b", "bc")];
    let z = [w(&d2, "a2", "ab"), w(&d2, "b2", "c")];
    assert_ne!(hash_files(&x).unwrap(), hash_files(&y).unwrap());
    let moved = [w(&d2, "a", "ab"), w(&d2, "b", "c")];
    assert_eq!(
        hash_files(&x).unwrap(),
        hash_files(&moved).unwrap(),
        "independent of directory"
    );
    assert_ne!(
        hash_files(&x).unwrap(),
        hash_files(&z).unwrap(),
        "names are part of the key"
    );
    let e = hash_files(&[d1.path().join("missing")]).unwrap_err();
    assert_contains(&e.to_string(), &["missing", "cannot open"]);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Any truncation of a valid file is an error (never a panic, never a partial load).
    #[test]
    fn truncation_never_loads(cut in 0usize..5000) {
        let text = sample_text();
        let end = text.trim_end().len();
        let cut = cut.min(end - 1);
        if text.is_char_boundary(cut) {
            let e = NativeMeasurement::from_json_str(&text[..cut]).unwrap_err();
            prop_assert!(matches!(e, MeasurementError::Syntax { .. } | MeasurementError::Empty { .. }), "{e}");
        }
    }

    /// Finite non-negative errors and energies of any magnitude survive a save/load round trip exactly.
    #[test]
    fn round_trip_preserves_values(
        errs in proptest::collection::vec(0.0f64..1e12, 21),
        energies in proptest::collection::vec(1e-300f64..1e300, 7),
        acc in -1.0f64..=1.0,
    ) {
        let mut m = NativeMeasurement::from_json_str(&sample_text()).unwrap();
        for (i, l) in m.linears.iter_mut().enumerate() {
            l.ref_energy = energies[i];
            for (k, o) in l.options.iter_mut().enumerate() {
                o.err = errs[i * 3 + k];
            }
        }
        m.modules[0].rows[0].accuracy = acc;
        let back = NativeMeasurement::from_json_str(&m.to_json_string().unwrap()).unwrap();
        prop_assert_eq!(back, m);
    }

    /// Random single-field corruption is rejected or loads; it never panics.
    #[test]
    fn corrupted_numbers_never_panic(li in 0usize..7, oi in 0usize..3, val in any::<i64>()) {
        let mut v = sample_value();
        v["linears"][li]["options"][oi]["config"] = json!(val);
        let _ = NativeMeasurement::from_json_str(&v.to_string());
        let mut v = sample_value();
        v["linears"][li]["in_features"] = json!(val);
        let _ = NativeMeasurement::from_json_str(&v.to_string());
    }
}
