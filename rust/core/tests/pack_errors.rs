//! Bad input fails with a PackError that names the tensor and the offending value.
use exl2rs_core::pack::{
    pack_columns, unpack_columns, Exl2Packed, GptqPacked, GroupLayout, PackError,
};

fn msg<T: std::fmt::Debug>(r: Result<T, PackError>) -> String {
    r.unwrap_err().to_string()
}

#[test]
fn unsupported_widths() {
    let m = msg(pack_columns(&[0; 7], 7, 1, 7));
    assert!(m.contains("unsupported bit width 7"), "{m}");
    let m = msg(GptqPacked::pack(5, &[0; 32], 32, 1, &[1], &[1.0], &[0; 32]));
    assert!(m.contains("GPTQ v1") && m.contains("2, 3, 4, 8"), "{m}");
    let m = msg(GroupLayout::new([(7, 32)]));
    assert!(m.contains('7'), "{m}");
}

#[test]
fn out_of_range_code_is_located() {
    let mut codes = vec![3u8; 16 * 4];
    codes[5 * 4 + 2] = 4;
    let m = msg(pack_columns(&codes, 16, 4, 2));
    assert_eq!(
        m,
        "codes[5, 2] = 4 is out of range: expected a 2-bit code in 0..=3"
    );
    // In a mixed layout the row is reported in matrix coordinates.
    let layout = GroupLayout::new([(4, 8), (2, 16)]).unwrap();
    let mut codes = vec![1u8; 24];
    codes[9] = 9;
    let m = msg(Exl2Packed::pack(
        &layout,
        &codes,
        1,
        &[1, 1],
        &[1.0, 1.0],
        None,
    ));
    assert!(m.starts_with("codes[9, 0] = 9"), "{m}");
}

#[test]
fn wrong_shapes() {
    let m = msg(pack_columns(&[0; 10], 8, 1, 4));
    assert!(m.contains("codes") && m.contains("[8, 1]"), "{m}");
    let m = msg(pack_columns(&[0; 12], 12, 1, 4));
    assert!(m.contains("multiple of 8"), "{m}");
    let m = msg(unpack_columns(&[0; 4], 4, 1, 3));
    assert!(m.contains("multiple of 3"), "{m}");
    let layout = GroupLayout::new([(4, 8)]).unwrap();
    let m = msg(Exl2Packed::pack(&layout, &[0; 8], 1, &[1, 1], &[1.0], None));
    assert!(m.starts_with("q_scale: shape"), "{m}");
}

#[test]
fn group_rows_must_fit_words() {
    let m = msg(GroupLayout::new([(3, 16)]));
    assert!(
        m.contains("group 0 (3 bits) has 16 rows") && m.contains("multiple of 32"),
        "{m}"
    );
    let m = msg(GroupLayout::new([(2, 32), (4, 32)]));
    assert!(m.contains("non-increasing"), "{m}");
    let m = msg(GroupLayout::from_qparams(100, &[4], &[0.5], &[32]));
    assert!(m.contains("cover only 64 of 100 rows"), "{m}");
    let m = msg(GroupLayout::from_qparams(100, &[4], &[1.0], &[32]));
    assert!(m.contains("group 3 (4 bits) has 4 rows"), "{m}");
}

#[test]
fn bad_scales_and_permutations() {
    let layout = GroupLayout::new([(4, 8)]).unwrap();
    let m = msg(Exl2Packed::pack(&layout, &[0; 8], 1, &[17], &[1.0], None));
    assert!(
        m.contains("q_scale[0, 0] = 17") && m.contains("1..=16"),
        "{m}"
    );
    let m = msg(Exl2Packed::pack(
        &layout,
        &[0; 8],
        1,
        &[1],
        &[f32::NAN],
        None,
    ));
    assert!(m.contains("q_scale_max[0] = NaN"), "{m}");
    let perm = [0, 1, 2, 3, 4, 5, 6, 6];
    let m = msg(Exl2Packed::pack(
        &layout,
        &[0; 8],
        1,
        &[1],
        &[1.0],
        Some(&perm),
    ));
    assert!(
        m.contains("perm[7] = 6") && m.contains("also appears at index 6"),
        "{m}"
    );
}

#[test]
fn bad_stored_tensors() {
    let layout = GroupLayout::new([(4, 8), (2, 16)]).unwrap();
    let t = Exl2Packed::pack(&layout, &[0; 24], 1, &[1, 1], &[1.0, 1.0], None).unwrap();
    let mut v = t.view();
    let groups = [4i16, 0, 7, 1];
    v.q_groups = &groups;
    let m = msg(v.unpack(None));
    assert!(m.contains("q_groups[2] = 7"), "{m}");
    let groups = [4i16, 0, 2, 2];
    v.q_groups = &groups;
    assert!(msg(v.dequantize(None)).contains("q_groups[3] = 2"));
    let inv = [0i32; 24];
    let mut v = t.view();
    v.q_invperm = &inv;
    assert!(msg(v.unpack(None)).contains("q_invperm[1] = 0"));
    let v = t.view();
    let m = msg(v.unpack(Some(40)));
    assert!(m.contains("40 output columns"), "{m}");
}

#[test]
fn gptq_zero_points_and_g_idx() {
    let m = msg(GptqPacked::pack(
        4, &[0; 64], 8, 8, &[0; 8], &[1.0; 8], &[0; 8],
    ));
    assert!(
        m.contains("qzeros[0, 0] = 0") && m.contains("zero − 1"),
        "{m}"
    );
    let m = msg(GptqPacked::pack(
        4,
        &[0; 64],
        8,
        8,
        &[8; 8],
        &[1.0; 8],
        &[0, 0, 0, 1, 0, 0, 0, 0],
    ));
    assert!(m.contains("g_idx[3] = 1") && m.contains("0..1"), "{m}");
    let m = msg(GptqPacked::pack(
        3,
        &[0; 32 * 8],
        32,
        8,
        &[1; 8],
        &[1.0; 8],
        &[0; 32],
    ));
    assert!(m.contains("qzeros") && m.contains("multiple of 32"), "{m}");
}

#[test]
fn dequantize_into_checks_the_output() {
    let layout = GroupLayout::new([(4, 8)]).unwrap();
    let t = Exl2Packed::pack(&layout, &[0; 8], 1, &[1], &[1.0], None).unwrap();
    let mut out = vec![0f32; 8 * 32 - 1];
    let m = msg(t.view().dequantize_into(None, &mut out));
    assert!(m.starts_with("out: shape") && m.contains("[8, 32]"), "{m}");
    let g = GptqPacked::pack(4, &[0; 64], 8, 8, &[8; 8], &[1.0; 8], &[0; 8]).unwrap();
    let mut out = vec![0f32; 65];
    let m = msg(g.view().dequantize_into(&mut out));
    assert!(m.starts_with("out: shape") && m.contains("[8, 8]"), "{m}");
    let mut out = vec![0f32; 64];
    g.view().dequantize_into(&mut out).unwrap();
    assert_eq!(out, vec![-8.0; 64]);
}
