//! Native measurement → allocation problem (per linear, fused groups, per module) and the
//! exllamav2 strategy built from a solution.
use exl2rs_core::measurement::{
    ErrorScale, LinearProblemOptions, MeasurementError, NativeMeasurement,
};
use exl2rs_core::qparams::QParams;
use std::path::PathBuf;

fn sample() -> NativeMeasurement {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/native_1layer.json");
    NativeMeasurement::load(p).unwrap()
}

#[test]
fn linear_items_carry_exact_bits_raw_errors_and_config_ids() {
    let m = sample();
    let p = m.linear_problem(LinearProblemOptions::default()).unwrap();
    assert_eq!(p.items.len(), 7);
    assert!(p.groups.is_empty(), "no fusing unless asked");
    for (item, l) in p.items.iter().zip(&m.linears) {
        assert_eq!(item.name, l.name);
        assert_eq!(item.numel, l.in_features * l.out_features);
        assert_eq!(item.weight, 1.0);
        assert!(item.pinned.is_none() && item.excluded.is_empty());
        assert!(item.min_bpw.is_none() && item.max_bpw.is_none());
        assert_eq!(item.options.len(), l.options.len());
        for (o, lo) in item.options.iter().zip(&l.options) {
            assert_eq!(o.bits, lo.bits);
            assert_eq!(o.error, lo.err);
            assert_eq!(o.config, lo.config);
        }
    }
    // gate_proj: 64 -> 128; 4-bit g128 (config 1) costs 64*128*4 + 1*(16+32) + 128*4 + 64*32.
    let gate = &p.items[4];
    assert_eq!(gate.numel, 64 * 128);
    assert_eq!(gate.options[1].bits, 64 * 128 * 4 + 48 + 128 * 4 + 64 * 32);
}

#[test]
fn relative_errors_divide_by_reference_energy() {
    let m = sample();
    let opts = LinearProblemOptions {
        scale: ErrorScale::Relative,
        fuse_shared_inputs: false,
    };
    let p = m.linear_problem(opts).unwrap();
    for (item, l) in p.items.iter().zip(&m.linears) {
        for (o, lo) in item.options.iter().zip(&l.options) {
            assert!((o.error - lo.err / l.ref_energy).abs() <= 1e-15 * o.error.abs().max(1.0));
        }
    }
    // The sample stores err = ref_energy * {0.09, 0.012, 0.0002}.
    assert!((p.items[6].options[1].error - 0.012).abs() < 1e-12);
}

fn scaled(m: &NativeMeasurement, scale: ErrorScale) -> Result<Vec<Vec<f64>>, MeasurementError> {
    let opts = LinearProblemOptions {
        scale,
        fuse_shared_inputs: false,
    };
    Ok(m.linear_problem(opts)?
        .items
        .iter()
        .map(|i| i.options.iter().map(|o| o.error).collect())
        .collect())
}

#[test]
fn fisher_errors_multiply_by_sensitivity_and_auto_prefers_them() {
    let mut m = sample();
    // The sample predates sensitivities: Fisher is refused naming the linear, Auto = Relative.
    assert!(!m.has_sensitivities());
    let msg = scaled(&m, ErrorScale::Fisher).unwrap_err().to_string();
    assert!(msg.contains("model.layers.0.self_attn.q_proj"), "{msg}");
    assert!(msg.contains("no sensitivity"), "{msg}");
    assert_eq!(
        scaled(&m, ErrorScale::Auto).unwrap(),
        scaled(&m, ErrorScale::Relative).unwrap()
    );
    // One linear without a sensitivity still makes Auto fall back to relative errors.
    for (i, l) in m.linears.iter_mut().enumerate() {
        l.sensitivity = Some(0.5 + i as f64);
    }
    m.linears[3].sensitivity = None;
    assert_eq!(m.resolve_scale(ErrorScale::Auto), ErrorScale::Relative);
    m.linears[3].sensitivity = Some(3.5);
    assert_eq!(m.resolve_scale(ErrorScale::Auto), ErrorScale::Fisher);
    let fisher = scaled(&m, ErrorScale::Fisher).unwrap();
    assert_eq!(scaled(&m, ErrorScale::Auto).unwrap(), fisher);
    for (row, l) in fisher.iter().zip(&m.linears) {
        for (e, o) in row.iter().zip(&l.options) {
            assert_eq!(*e, l.sensitivity.unwrap() * o.err);
        }
    }
    // The field survives a save/load round trip; a bad value is refused on load.
    let back = NativeMeasurement::from_json_str(&m.to_json_string().unwrap()).unwrap();
    assert_eq!(back, m);
    m.linears[2].sensitivity = Some(f64::NAN);
    let msg = m.validate("s.json").unwrap_err().to_string();
    assert!(
        msg.contains("s.json") && msg.contains("sensitivity = NaN"),
        "{msg}"
    );
}

#[test]
fn relative_error_with_zero_energy_names_the_linear() {
    let mut m = sample();
    m.linears[5].ref_energy = 0.0;
    for o in &mut m.linears[5].options {
        o.err = 0.0;
    }
    let opts = LinearProblemOptions {
        scale: ErrorScale::Relative,
        fuse_shared_inputs: false,
    };
    let msg = m.linear_problem(opts).unwrap_err().to_string();
    assert!(msg.contains("model.layers.0.mlp.up_proj"), "{msg}");
    assert!(msg.contains("ref_energy is 0"), "{msg}");
    // The raw scale still works.
    m.linear_problem(LinearProblemOptions::default()).unwrap();
}

#[test]
fn fused_groups_tie_shared_inputs() {
    let m = sample();
    let opts = LinearProblemOptions {
        scale: ErrorScale::Raw,
        fuse_shared_inputs: true,
    };
    let p = m.linear_problem(opts).unwrap();
    assert_eq!(p.groups, vec![vec![0, 1, 2], vec![4, 5]]);
    for g in &p.groups {
        let configs: Vec<Vec<u32>> = g
            .iter()
            .map(|&i| p.items[i].options.iter().map(|o| o.config).collect())
            .collect();
        assert!(configs.windows(2).all(|w| w[0] == w[1]));
    }
}

#[test]
fn fused_members_with_different_configs_are_refused() {
    let mut m = sample();
    m.linears[1].options.remove(2); // k_proj loses the 8-bit config q_proj and v_proj have
    let opts = LinearProblemOptions {
        scale: ErrorScale::Raw,
        fuse_shared_inputs: true,
    };
    let e = m.linear_problem(opts).unwrap_err();
    assert!(matches!(
        e,
        MeasurementError::FusedMismatch { config: 2, .. }
    ));
    let msg = e.to_string();
    for part in [
        "fused group \"model.layers.0.self_attn.qkv\"",
        "\"model.layers.0.self_attn.k_proj\" lacks config 2",
        "\"model.layers.0.self_attn.q_proj\" has",
    ] {
        assert!(msg.contains(part), "{msg:?} lacks {part:?}");
    }
    // Without fusing the same measurement converts.
    let p = m.linear_problem(LinearProblemOptions::default()).unwrap();
    assert_eq!(p.items[1].options.len(), 2);

    // A member with an extra config is refused too, naming that config.
    let mut m = sample();
    let extra = m.configs.len() as u32;
    m.configs.push(QParams::with_group(32, &[6], &[1.0]));
    let (k, n) = (m.linears[5].in_features, m.linears[5].out_features);
    let bits = m.configs[extra as usize]
        .total_bits(k as usize, n as usize)
        .unwrap();
    m.linears[5]
        .options
        .push(exl2rs_core::measurement::LinearOption {
            config: extra,
            bits,
            err: 0.5,
        });
    m.validate("mutated").unwrap();
    let msg = m.fused_groups().unwrap_err().to_string();
    assert!(
        msg.contains("\"model.layers.0.mlp.gate_proj\" lacks config 3"),
        "{msg}"
    );
}

#[test]
fn module_items_use_joint_rows() {
    let m = sample();
    let p = m.module_problem().unwrap();
    assert_eq!(p.items.len(), 2);
    assert!(p.groups.is_empty());
    let attn = &p.items[0];
    assert_eq!(attn.name, "model.layers.0.self_attn");
    assert_eq!(attn.numel, 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64);
    assert_eq!(p.items[1].numel, 3 * 64 * 128);
    for (item, module) in p.items.iter().zip(&m.modules) {
        assert_eq!(item.options.len(), module.rows.len());
        for (r, (o, row)) in item.options.iter().zip(&module.rows).enumerate() {
            assert_eq!(o.bits, row.total_bits);
            assert!((o.error - (1.0 - row.accuracy)).abs() < 1e-15);
            assert_eq!(o.config as usize, r);
        }
    }
    // A module's bits equal the sum of its linears' bits in the same configs.
    let row = &m.modules[0].rows[1];
    let sum: u64 = row
        .configs
        .iter()
        .map(|(kind, &c)| {
            let l = &m.linears[m
                .linear_index(&format!("model.layers.0.self_attn.{kind}"))
                .unwrap()];
            l.options.iter().find(|o| o.config == c).unwrap().bits
        })
        .sum();
    assert_eq!(row.total_bits, sum);
}

#[test]
fn strategies_from_solutions() {
    let m = sample();
    // Per-linear: q,k,v at config 1; o at 2; gate/up at 0; down at 2.
    let choice = [1, 1, 1, 2, 0, 0, 2];
    let s = m.linear_strategy(&choice).unwrap();
    assert_eq!(s.entries.len(), 2);
    let attn = &s.entries["model.layers.0.self_attn"];
    assert_eq!(
        attn.accuracy, None,
        "a per-linear combination has no measured accuracy"
    );
    assert_eq!(attn.linears["q_proj"], m.configs[1]);
    assert_eq!(attn.linears["o_proj"], m.configs[2]);
    let want: u64 = (0..4).map(|i| m.linears[i].options[choice[i]].bits).sum();
    assert_eq!(attn.total_bits, want);
    let v = s.to_value();
    assert_eq!(v["model.layers.0.mlp"]["down_proj"]["group_size"]["8"], 128);
    assert!(v["model.layers.0.mlp"].get("accuracy").is_none());

    // Per-module: row 3 of attention, row 1 of the MLP.
    let s = m.module_strategy(&[3, 1]).unwrap();
    let v = s.to_value();
    assert_eq!(v["model.layers.0.self_attn"]["accuracy"], 0.99987);
    assert_eq!(
        v["model.layers.0.self_attn"]["total_bits"],
        m.modules[0].rows[3].total_bits
    );
    assert_eq!(
        v["model.layers.0.mlp"]["up_proj"]["bits"],
        serde_json::json!([4])
    );

    let msg = m.linear_strategy(&[0; 3]).unwrap_err().to_string();
    assert!(msg.contains("3 choices for 7 linears"), "{msg}");
    let msg = m.module_strategy(&[0, 9]).unwrap_err().to_string();
    assert!(
        msg.contains("model.layers.0.mlp") && msg.contains("row 9"),
        "{msg}"
    );
    let msg = m
        .linear_strategy(&[0, 0, 0, 0, 0, 0, 5])
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("down_proj") && msg.contains("option 5"),
        "{msg}"
    );
}
