//! exllamav2 measurement.json: read a hand-written 2-layer sample, convert it, write it from a
//! native measurement, strategies, and job_new.json injection.
use exl2rs_core::measurement::{
    inject_strategy, Exl2Job, Exl2Measurement, Exl2Shapes, LlamaDims, MeasurementError,
    NativeMeasurement,
};
use exl2rs_core::qparams::QParams;
use serde_json::{json, Value};
use std::path::PathBuf;

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

fn sample() -> Exl2Measurement {
    Exl2Measurement::load(data("exl2_measurement_2layers.json")).unwrap()
}

fn sample_value() -> Value {
    serde_json::from_str(&std::fs::read_to_string(data("exl2_measurement_2layers.json")).unwrap())
        .unwrap()
}

fn native() -> NativeMeasurement {
    NativeMeasurement::load(data("native_1layer.json")).unwrap()
}

/// The sample's model: hidden 128, FFN 256, 4 heads and 2 KV heads of 32.
const DIMS: LlamaDims = LlamaDims {
    hidden_size: 128,
    intermediate_size: 256,
    num_attention_heads: 4,
    num_key_value_heads: 2,
    head_dim: 32,
};

fn err_of(v: &Value) -> String {
    Exl2Measurement::from_json_str(&v.to_string())
        .expect_err("must be rejected")
        .to_string()
}

fn assert_contains(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "message {msg:?} lacks {p:?}");
    }
}

#[test]
fn reads_two_layer_sample_in_slot_order() {
    let m = sample();
    let names: Vec<String> = m.modules.iter().map(|x| x.name()).collect();
    assert_eq!(
        names,
        [
            "model.layers.0.self_attn",
            "model.layers.0.mlp",
            "model.layers.1.self_attn",
            "model.layers.1.mlp"
        ]
    );
    assert_eq!(m.last_module_idx, 6);
    let mut nulls = m.null_keys.clone();
    nulls.sort();
    assert_eq!(nulls, ["lm_head.linear", "model.norm.norm"]);
    let attn = &m.modules[0];
    assert_eq!(attn.layer, Some(0));
    assert_eq!(attn.rows.len(), 3);
    assert_eq!(attn.rows[1].accuracy, 0.99402);
    assert_eq!(attn.rows[1].linears["v_proj"].bits, vec![4]);
    assert_eq!(attn.rows[1].linears["v_proj"].group_size, vec![128]);
    let down = &m.modules[1].rows[0].linears["down_proj"];
    assert_eq!(down.bits, vec![6, 3, 2]);
    assert_eq!(down.group_size, vec![32, 64, 64]);
    assert_eq!(down.bits_prop, vec![0.05, 0.2, 0.75]);
}

#[test]
fn converts_to_module_problem_with_verified_shapes() {
    let m = sample();
    let p = m.to_problem(&Exl2Shapes::llama(DIMS, false)).unwrap();
    assert_eq!(p.items.len(), 4);
    assert!(p.groups.is_empty());
    let attn_numel = 128 * 128 + 128 * 64 + 128 * 64 + 128 * 128;
    let mlp_numel = 3 * 128 * 256;
    assert_eq!(p.items[0].numel, attn_numel);
    assert_eq!(p.items[1].numel, mlp_numel);
    // 4-bit g128 on every attention matrix: weights + (16+32+4·N) per group + 32·K.
    let cost = |k: u64, n: u64| k * n * 4 + 48 + 4 * n + 32 * k;
    let row1 = cost(128, 128) * 2 + cost(128, 64) * 2;
    assert_eq!(p.items[0].options[1].bits, row1);
    assert!((p.items[0].options[1].error - (1.0 - 0.99402)).abs() < 1e-15);
    assert_eq!(p.items[3].options[2].config, 2);

    // exllamav2's budget denominators count the norm weight of each module too.
    let p = m.to_problem(&Exl2Shapes::llama(DIMS, true)).unwrap();
    assert_eq!(p.items[0].numel, attn_numel + 128);
    assert_eq!(p.items[1].numel, mlp_numel + 128);
}

#[test]
fn wrong_or_missing_shapes_are_refused() {
    let m = sample();
    let wrong = LlamaDims {
        intermediate_size: 512,
        ..DIMS
    };
    let msg = m
        .to_problem(&Exl2Shapes::llama(wrong, false))
        .unwrap_err()
        .to_string();
    assert_contains(
        &msg,
        &[
            "module \"model.layers.0.mlp\" row 0",
            "the shapes do not match",
            "gate_proj 128x512",
        ],
    );

    let mut shapes = Exl2Shapes::llama(DIMS, false);
    shapes.by_mode.remove("mlp");
    let msg = m.to_problem(&shapes).unwrap_err().to_string();
    assert_contains(&msg, &["model.layers.0.mlp", "no shapes given", "\"mlp\""]);

    let mut shapes = Exl2Shapes::llama(DIMS, false);
    shapes
        .by_mode
        .get_mut("self_attn")
        .unwrap()
        .linears
        .remove("o_proj");
    let msg = m.to_problem(&shapes).unwrap_err().to_string();
    assert_contains(&msg, &["model.layers.0.self_attn", "\"o_proj\""]);
}

#[test]
fn round_trips_through_exllamav2_schema() {
    let m = sample();
    let v = m.to_value();
    assert_eq!(v["last_module_idx"], 6);
    assert_eq!(v["measurement"]["model.norm.norm"], Value::Null);
    assert_eq!(
        v["measurement"]["model.layers.1.self_attn"][0]["q_proj"],
        sample_value()["measurement"]["model.layers.1.self_attn"][0]["q_proj"]
    );
    assert_eq!(Exl2Measurement::from_value(&v, "mem").unwrap(), m);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("measurement.json");
    m.save(&path).unwrap();
    assert_eq!(Exl2Measurement::load(&path).unwrap(), m);
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(
        text.contains("\n    \"measurement\""),
        "4-space indent like exllamav2"
    );
}

#[test]
fn parallel_decoder_parts_are_separate_slots() {
    let mut v = sample_value();
    let meas = v["measurement"].as_object_mut().unwrap();
    let attn = meas.remove("model.layers.1.self_attn").unwrap();
    let mlp = meas.remove("model.layers.1.mlp").unwrap();
    meas.insert(
        "model.layers.1.parallel_decoder".into(),
        json!({"attn": attn, "mlp": mlp}),
    );
    let m = Exl2Measurement::from_value(&v, "pd").unwrap();
    let names: Vec<String> = m.modules.iter().map(|x| x.name()).collect();
    assert_eq!(names[2], "model.layers.1.parallel_decoder.attn");
    assert_eq!(m.modules[2].strategy_key(), "model.layers.1.self_attn");
    assert_eq!(m.modules[3].strategy_key(), "model.layers.1.mlp");
    m.to_problem(&Exl2Shapes::llama(DIMS, false)).unwrap();
    assert_eq!(Exl2Measurement::from_value(&m.to_value(), "pd").unwrap(), m);
}

#[test]
fn strategy_is_the_chosen_measurement_entry() {
    let m = sample();
    let s = m.strategy(&[0, 1, 2, 1]).unwrap();
    let v = s.to_value();
    let src = sample_value();
    for (key, row) in [
        ("model.layers.0.self_attn", 0),
        ("model.layers.0.mlp", 1),
        ("model.layers.1.self_attn", 2),
        ("model.layers.1.mlp", 1),
    ] {
        // exllamav2's optimize stores the whole entry: accuracy, total_bits, per-linear dicts
        // (compared as configs: the file writes `bits_prop: [1]`, we write `[1.0]`).
        let (ours, theirs) = (
            v[key].as_object().unwrap(),
            src["measurement"][key][row].as_object().unwrap(),
        );
        assert_eq!(
            ours.keys().collect::<Vec<_>>(),
            theirs.keys().collect::<Vec<_>>(),
            "{key}"
        );
        for (k, x) in ours {
            if k == "accuracy" || k == "total_bits" {
                assert_eq!(x, &theirs[k], "{key}.{k}");
            } else {
                let parse = |v: &Value| QParams::from_exllamav2_json(v).unwrap();
                assert_eq!(parse(x), parse(&theirs[k]), "{key}.{k}");
            }
        }
    }
    let msg = m.strategy(&[0, 1]).unwrap_err().to_string();
    assert_contains(&msg, &["2 choices for 4 modules"]);
    let msg = m.strategy(&[0, 1, 3, 0]).unwrap_err().to_string();
    assert_contains(&msg, &["model.layers.1.self_attn", "row 3", "3 rows"]);
}

#[test]
fn reading_errors_name_file_module_and_row() {
    let msg = err_of(&json!({"measurements": {}, "last_module_idx": 1}));
    assert_contains(&msg, &["no \"measurement\" key", "\"measurements\""]);

    let native_text = std::fs::read_to_string(data("native_1layer.json")).unwrap();
    let msg = Exl2Measurement::from_json_str(&native_text)
        .unwrap_err()
        .to_string();
    assert_contains(
        &msg,
        &["exl2rs native measurement", "NativeMeasurement::load"],
    );

    let mut v = sample_value();
    v.as_object_mut().unwrap().remove("last_module_idx");
    assert_contains(&err_of(&v), &["missing field `last_module_idx`"]);

    let mut v = sample_value();
    v["measurement"]["model.layers.1.mlp"][2]
        .as_object_mut()
        .unwrap()
        .remove("accuracy");
    assert_contains(
        &err_of(&v),
        &[
            "module \"model.layers.1.mlp\" row 2",
            "missing field `accuracy`",
        ],
    );

    let mut v = sample_value();
    v["measurement"]["model.layers.0.self_attn"][1]["total_bits"] = json!(1.5e6);
    assert_contains(
        &err_of(&v),
        &["row 1", "total_bits is 1500000.0", "positive integer"],
    );

    let mut v = sample_value();
    v["measurement"]["model.layers.0.mlp"][0]["down_proj"]["group_size"]
        .as_object_mut()
        .unwrap()
        .remove("6");
    assert_contains(
        &err_of(&v),
        &["module \"model.layers.0.mlp\" row 0 linear \"down_proj\""],
    );

    let mut v = sample_value();
    v["measurement"]["model.layers.0.mlp"][1]
        .as_object_mut()
        .unwrap()
        .remove("gate_proj");
    assert_contains(
        &err_of(&v),
        &["row 1", "expected the same linears in every row"],
    );

    let mut v = sample_value();
    v["measurement"]["model.layers.0.self_attn"][0]["accuracy"] = json!(2.0);
    assert_contains(&err_of(&v), &["accuracy = 2", "<= 1"]);

    let v = json!({"measurement": {"model.norm.norm": null}, "last_module_idx": 3});
    assert_contains(&err_of(&v), &["no measured modules"]);

    let v = json!({"measurement": {"model.layers.0.mlp": []}, "last_module_idx": 3});
    assert_contains(&err_of(&v), &["\"model.layers.0.mlp\"", "no rows"]);

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("measurement.json");
    std::fs::write(&path, "").unwrap();
    let e = Exl2Measurement::load(&path).unwrap_err();
    assert!(matches!(e, MeasurementError::Empty { .. }));
    assert_contains(
        &e.to_string(),
        &["measurement.json", "empty", "exllamav2 measurement.json"],
    );
}

#[test]
fn native_modules_become_an_exllamav2_file() {
    let n = native();
    let m = n.to_exl2().unwrap();
    assert_eq!(m.modules.len(), 2);
    // embedding (0), attention (1), MLP (2), norm (3), head (4).
    assert_eq!(m.last_module_idx, 4);
    assert_eq!(m.null_keys, ["lm_head.linear", "model.norm.norm"]);
    let v = m.to_value();
    let row = &v["measurement"]["model.layers.0.self_attn"][1];
    assert_eq!(row["accuracy"], 0.9902);
    assert_eq!(row["total_bits"], n.modules[0].rows[1].total_bits);
    assert_eq!(
        row["v_proj"],
        json!({"group_size": {"4": 128}, "bits": [4], "bits_prop": [1.0], "scale_bits": 4})
    );
    assert_eq!(row["q_proj"]["group_size"], json!({"3": 64, "2": 64}));

    // Written and read back, then solved with shapes taken from the native file: the same
    // problem as the native module problem.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("measurement.json");
    m.save(&path).unwrap();
    let back = Exl2Measurement::load(&path).unwrap();
    assert_eq!(back, m);
    let p = back.to_problem(&Exl2Shapes::from_native(&n)).unwrap();
    assert_eq!(p, n.module_problem().unwrap());
}

#[test]
fn native_without_an_mlp_cannot_become_an_exllamav2_file() {
    let mut n = native();
    n.modules.remove(1);
    let msg = n.to_exl2().unwrap_err().to_string();
    assert_contains(&msg, &["layer 0", "no measured MLP module rows"]);

    let mut n = native();
    for r in &mut n.modules[0].rows {
        r.configs.remove("k_proj");
    }
    n.validate("x").unwrap_err(); // total_bits no longer matches…
    let fixed: Vec<u64> = n.modules[0]
        .rows
        .iter()
        .map(|r| {
            r.configs
                .iter()
                .map(|(k, &c)| {
                    let i = n
                        .linear_index(&format!("model.layers.0.self_attn.{k}"))
                        .unwrap();
                    let l = &n.linears[i];
                    let (rows, cols) = (l.in_features as usize, l.out_features as usize);
                    n.configs[c as usize].total_bits(rows, cols).unwrap()
                })
                .sum()
        })
        .collect();
    for (r, bits) in n.modules[0].rows.iter_mut().zip(fixed) {
        r.total_bits = bits;
    }
    n.validate("x").unwrap(); // …fixed, the file is valid, but exllamav2 needs k_proj.
    let msg = n.to_exl2().unwrap_err().to_string();
    assert_contains(&msg, &["model.layers.0.self_attn", "has no \"k_proj\""]);
}

#[test]
fn new_job_resumes_at_quantization_with_our_strategy() {
    let m = sample();
    let s = m.strategy(&[1, 1, 2, 0]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("work");
    let mut job = Exl2Job::new("/models/tiny", out.to_str().unwrap(), 4.25);
    job.head_bits = 8;
    let path = job.write(&m, &s, "measurement.json").unwrap();
    assert_eq!(path, out.join("job_new.json"));
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(v["progress"], "tokens_cal");
    assert_eq!(v["in_dir"], "/models/tiny");
    assert_eq!(v["bits"], 4.25);
    assert_eq!(v["head_bits"], 8);
    assert_eq!(v["shard_size"], 8192.0);
    assert_eq!(v["dataset_rows"], 100);
    assert_eq!(v["output_measurement"], Value::Null);
    assert_eq!(v["reuse_measurement"], "measurement.json");
    assert_eq!(v["last_module_idx"], 6);
    assert_eq!(v["measurement"], m.to_value()["measurement"]);
    assert_eq!(v["strategy"], s.to_value());
    assert!(v.get("invalid").is_none());

    job.head_bits = 7;
    let msg = job.write(&m, &s, "m").unwrap_err().to_string();
    assert_contains(&msg, &["head_bits = 7", "[2, 3, 4, 5, 6, 8]"]);

    job.head_bits = 6;
    let mut partial = s.clone();
    partial.entries.remove("model.layers.1.mlp");
    let msg = job.write(&m, &partial, "m").unwrap_err().to_string();
    assert_contains(
        &msg,
        &["no entry for module \"model.layers.1.mlp\"", "KeyError"],
    );
}

#[test]
fn strategy_is_injected_into_an_existing_job() {
    let m = sample();
    let s = m.strategy(&[2, 2, 2, 2]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job_new.json");
    let base = json!({"in_dir": "/m", "out_dir": "/o", "bits": 4.125, "head_bits": 6,
                      "progress": "begin", "custom": [1, 2]});
    std::fs::write(&path, base.to_string()).unwrap();
    inject_strategy(&path, &m, &s, "/o/measurement.json").unwrap();
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(v["progress"], "tokens_cal");
    assert_eq!(v["custom"], json!([1, 2]), "other keys are kept");
    assert_eq!(
        v["strategy"]["model.layers.0.mlp"]["down_proj"]["bits"],
        json!([8])
    );
    assert_eq!(v["reuse_measurement"], "/o/measurement.json");

    // Already past the optimizer but before quantizing: strategy replaced, stage kept.
    let mut at_emb = base.clone();
    at_emb["progress"] = json!("embeddings");
    std::fs::write(&path, at_emb.to_string()).unwrap();
    inject_strategy(&path, &m, &s, "x").unwrap();
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(v["progress"], "embeddings");

    let mut quant = base.clone();
    quant["progress"] = json!("quant");
    std::fs::write(&path, quant.to_string()).unwrap();
    let msg = inject_strategy(&path, &m, &s, "x").unwrap_err().to_string();
    assert_contains(
        &msg,
        &["job_new.json", "\"quant\"", "before quantization starts"],
    );

    let mut bad = base.clone();
    bad["invalid"] = json!(true);
    std::fs::write(&path, bad.to_string()).unwrap();
    let msg = inject_strategy(&path, &m, &s, "x").unwrap_err().to_string();
    assert_contains(&msg, &["job_new.json", "corrupted"]);

    std::fs::write(&path, "{\"progress\": \"begin\"").unwrap();
    let msg = inject_strategy(&path, &m, &s, "x").unwrap_err().to_string();
    assert_contains(
        &msg,
        &["job_new.json", "invalid JSON at line 1", "truncated"],
    );
}

/// exllamav2's own figure: Llama-3-8B attention row 6 (4-bit g128 everywhere) costs
/// 169,613,312 bits. A file carrying it must verify against Llama-3-8B's shapes.
#[test]
fn llama3_8b_attention_row_matches_exllamav2_figure() {
    let q4 = json!({"group_size": {"4": 128}, "bits": [4], "bits_prop": [1], "scale_bits": 4});
    let v = json!({"measurement": {"model.layers.0.self_attn": [{
        "accuracy": 0.99, "total_bits": 169_613_312u64,
        "q_proj": q4, "k_proj": q4, "v_proj": q4, "o_proj": q4}]}, "last_module_idx": 1});
    let m = Exl2Measurement::from_value(&v, "llama3.json").unwrap();
    let dims = LlamaDims {
        hidden_size: 4096,
        intermediate_size: 14336,
        num_attention_heads: 32,
        num_key_value_heads: 8,
        head_dim: 128,
    };
    let p = m.to_problem(&Exl2Shapes::llama(dims, false)).unwrap();
    assert_eq!(p.items[0].numel, 2 * 4096 * 4096 + 2 * 4096 * 1024);
    let bpw = p.items[0].options[0].bits as f64 / p.items[0].numel as f64;
    assert!((bpw - 4.044).abs() < 5e-4, "{bpw}");
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

    /// Any choice of rows gives a strategy whose bits are the chosen options' bits, which the
    /// measurement accepts for a job; an out-of-range row is an error, never a panic.
    #[test]
    fn any_choice_gives_a_consistent_strategy(choice in proptest::collection::vec(0usize..4, 4)) {
        let m = sample();
        let p = m.to_problem(&Exl2Shapes::llama(DIMS, false)).unwrap();
        match m.strategy(&choice) {
            Ok(s) => {
                proptest::prop_assert!(choice.iter().all(|&c| c < 3));
                m.check_strategy(&s).unwrap();
                let total: u64 = s.entries.values().map(|e| e.total_bits).sum();
                let want: u64 = p.items.iter().zip(&choice).map(|(it, &c)| it.options[c].bits).sum();
                proptest::prop_assert_eq!(total, want);
            }
            Err(e) => {
                proptest::prop_assert!(choice.contains(&3));
                proptest::prop_assert!(e.to_string().contains("row 3"));
            }
        }
    }
}
