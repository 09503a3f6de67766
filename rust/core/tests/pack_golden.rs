//! Golden tests: packed words written out literally, derived by hand from the layout rules, so
//! any change of bit order, padding or table semantics fails here.
//!
//! The rule for both formats: down one column, code `i` of a block occupies bits
//! `[i·b, i·b + b)` of a little-endian bitstream over consecutive words (LSB first), so the
//! bytes of the stream are the bytes of the words in order. Each case picks codes whose bit
//! pattern repeats every few bytes, which keeps the hand derivation short.
use exl2rs_core::pack::{
    gptq_g_idx, pack_columns, unpack_columns, Exl2Packed, GptqPacked, GroupLayout, PackError,
};

fn w(x: u32) -> i32 {
    x as i32
}

/// 2-bit, 16 rows → 1 word. Codes 0,1,2,3 repeated: each byte is 0|1<<2|2<<4|3<<6 = 0xE4.
#[test]
fn exl2_2bit() {
    let codes: Vec<u8> = (0..16).map(|i| i % 4).collect();
    assert_eq!(
        pack_columns(&codes, 16, 1, 2).unwrap(),
        vec![w(0xE4E4_E4E4)]
    );
}

/// 3-bit, 32 rows → 3 words. Codes 0..7 repeated: eight codes fill 24 bits,
/// 0b111_110_101_100_011_010_001_000 = 0xFAC688, bytes 88 C6 FA. Four repeats give the byte
/// stream 88 C6 FA 88 | C6 FA 88 C6 | FA 88 C6 FA. Code 10 (= 2) straddles words 0 and 1:
/// its low bits 0b10 are bits 30..31 of word 0, its top bit is bit 0 of word 1.
#[test]
fn exl2_3bit_straddles_words() {
    let codes: Vec<u8> = (0..32).map(|i| i % 8).collect();
    let want = vec![w(0x88FA_C688), w(0xC688_FAC6), w(0xFAC6_88FA)];
    assert_eq!(pack_columns(&codes, 32, 1, 3).unwrap(), want);
}

/// 4-bit, 8 rows → 1 word: code i+1 in nibble i.
#[test]
fn exl2_4bit() {
    let codes: Vec<u8> = (1..=8).collect();
    assert_eq!(pack_columns(&codes, 8, 1, 4).unwrap(), vec![w(0x8765_4321)]);
}

/// 5-bit, 32 rows → 5 words. Codes 0..7 repeated: eight codes fill 40 bits,
/// Σ i<<5i = 0x39_8A41_8820, bytes 20 88 41 8A 39; four repeats give 20 bytes.
#[test]
fn exl2_5bit() {
    let codes: Vec<u8> = (0..32).map(|i| i % 8).collect();
    let want = vec![
        w(0x8A41_8820),
        w(0x4188_2039),
        w(0x8820_398A),
        w(0x2039_8A41),
        w(0x398A_4188),
    ];
    assert_eq!(pack_columns(&codes, 32, 1, 5).unwrap(), want);
}

/// 6-bit, 16 rows → 3 words. Codes 1,2,3,63 repeated: 1 | 2<<6 | 3<<12 | 63<<18 = 0xFC3081,
/// bytes 81 30 FC, four repeats.
#[test]
fn exl2_6bit() {
    let codes: Vec<u8> = (0..16).map(|i| [1, 2, 3, 63][i % 4]).collect();
    let want = vec![w(0x81FC_3081), w(0x3081_FC30), w(0xFC30_81FC)];
    assert_eq!(pack_columns(&codes, 16, 1, 6).unwrap(), want);
}

/// 8-bit, 4 rows → 1 word: one byte per row.
#[test]
fn exl2_8bit() {
    assert_eq!(
        pack_columns(&[0x11, 0x22, 0x33, 0xF4], 4, 1, 8).unwrap(),
        vec![w(0xF433_2211)]
    );
}

/// Columns are independent: word (r, n) only holds column n.
#[test]
fn columns_are_independent() {
    // Two columns of 4-bit codes: column 0 = 1..8, column 1 = 15 everywhere.
    let codes: Vec<u8> = (1..=8).flat_map(|i| [i, 15]).collect();
    let packed = pack_columns(&codes, 8, 2, 4).unwrap();
    assert_eq!(packed, vec![w(0x8765_4321), w(0xFFFF_FFFF)]);
    assert_eq!(unpack_columns(&packed, 1, 2, 4).unwrap(), codes);
}

/// A full EXL2 matrix: K = 24 rows as one 4-bit group of 8 rows then one 2-bit group of 16,
/// N = 3 columns padded to 32, rows reversed by act-order.
///
/// - q_weight row 0 (4-bit group): column 0 codes 1..8 → 0x87654321; column 1 codes 0 → 0;
///   column 2 codes 15 → 0xFFFFFFFF; padded columns hold the zero code 8 → 0x88888888.
/// - q_weight row 1 (2-bit group): column 0 codes 0,1,2,3,… → 0xE4E4E4E4; column 1 → 0;
///   column 2 codes 3 → 0xFFFFFFFF; padding holds the zero code 2 = 0b10 → 0xAAAAAAAA.
/// - q_scale: group 0 scales (16, 1, 9) are stored as (15, 0, 8) in nibbles 0..2 → 0x0000080F,
///   padded columns store 0; group 1 scales (2, 2, 2) → (1, 1, 1) → 0x00000111.
/// - q_groups: (4 bits, q_weight row 0), (2 bits, row 1): the start is a packed row, not an
///   input row (input row 8 starts group 1, packed row 1).
/// - q_invperm: perm = reversed rows, whose inverse is itself.
#[test]
fn exl2_full_matrix() {
    let layout = GroupLayout::new([(4, 8), (2, 16)]).unwrap();
    let mut codes = Vec::new();
    for i in 0..8u8 {
        codes.extend([i + 1, 0, 15]);
    }
    for i in 0..16u8 {
        codes.extend([i % 4, 0, 3]);
    }
    let scales = [16, 1, 9, 2, 2, 2];
    let perm: Vec<i64> = (0..24).rev().collect();
    let t = Exl2Packed::pack(&layout, &codes, 3, &scales, &[0.5, 2.0], Some(&perm)).unwrap();

    assert_eq!(t.cols_padded, 32);
    let mut row0 = vec![w(0x8765_4321), 0, w(0xFFFF_FFFF)];
    row0.extend([w(0x8888_8888); 29]);
    let mut row1 = vec![w(0xE4E4_E4E4), 0, w(0xFFFF_FFFF)];
    row1.extend([w(0xAAAA_AAAA); 29]);
    assert_eq!(t.q_weight, [row0, row1].concat());
    assert_eq!(t.q_scale, vec![0x0000_080F, 0, 0, 0, 0x0000_0111, 0, 0, 0]);
    assert_eq!(t.q_groups, vec![4, 0, 2, 1]);
    assert_eq!(t.q_invperm, (0..24).rev().collect::<Vec<i32>>());
    assert_eq!(t.q_scale_max, vec![0.5, 2.0]);

    // w[perm[i], n] = (q − 2^(b−1))·(qs+1)²·max/256. Packed row 0 is input row 23:
    // (1 − 8)·16²·0.5/256 = −3.5, (0 − 8)·1·0.5/256 = −1/64, (15 − 8)·81·0.5/256 = 567/512.
    let dq = t.view().dequantize(Some(3)).unwrap();
    assert_eq!(
        &dq[23 * 3..24 * 3],
        &[-3.5, -8.0 * 0.5 / 256.0, 567.0 / 512.0]
    );
    // Packed row 8 (the first 2-bit row: codes 0, 0, 3; zero 2; scale 2) is input row 15:
    // (0 − 2)·4·2/256 = −1/16, (0 − 2)·4·2/256, (3 − 2)·4·2/256 = 1/32.
    assert_eq!(&dq[15 * 3..16 * 3], &[-0.0625, -0.0625, 0.03125]);

    let u = t.view().unpack(Some(3)).unwrap();
    assert_eq!(u.codes, codes);
    assert_eq!(u.scales, scales);
    assert_eq!(u.perm, (0..24).rev().collect::<Vec<u32>>());
    assert_eq!(u.layout, layout);
}

/// exllamav2's QParams arithmetic: 0.1:4b/0.9:3b g128 over 576 rows gives
/// ceil(57.6/128) = 1 group of 4-bit, then ceil(min(518.4, 448)/128) = 4 groups of 3-bit, the
/// last cut short at 576: 128 + 128·3 + 64.
#[test]
fn layout_from_qparams() {
    let l = GroupLayout::from_qparams(576, &[4, 3], &[0.1, 0.9], &[128, 128]).unwrap();
    let rows: Vec<(u8, usize)> = l.groups().iter().map(|g| (g.bits, g.rows)).collect();
    assert_eq!(rows, vec![(4, 128), (3, 128), (3, 128), (3, 128), (3, 64)]);
    // Packed starts: 4-bit group 128·4/32 = 16 rows, each 3-bit group 128·3/32 = 12 rows.
    assert_eq!(l.q_groups(), vec![4, 0, 3, 16, 3, 28, 3, 40, 3, 52]);
    assert_eq!(l.qrows(), 16 + 12 * 3 + 6);
    // Mixed group sizes, 8-bit head: [32,128,128] 0.05:8b/0.1:4b/0.85:3b over 1536 rows:
    // 8b: ceil(76.8/32) = 3 groups (96 rows); 4b: ceil(153.6/128) = 2 (256); 3b: the rest, 1184
    // rows = 9 groups of 128 and one of 32.
    let l =
        GroupLayout::from_qparams(1536, &[8, 4, 3], &[0.05, 0.1, 0.85], &[32, 128, 128]).unwrap();
    let by_bits = |b: u8| {
        l.groups()
            .iter()
            .filter(|g| g.bits == b)
            .map(|g| g.rows)
            .sum::<usize>()
    };
    assert_eq!((by_bits(8), by_bits(4), by_bits(3)), (96, 256, 1184));
    assert_eq!(l.groups().last().unwrap().rows, 32);
    assert_eq!(l.num_groups(), 3 + 2 + 10);
}

/// GPTQ v1, 4-bit symmetric: qweight is the EXL2 column packing; qzeros packs zero − 1 along
/// N, so the symmetric zero 8 is stored as 7 in every nibble (0x77777777, as AutoGPTQ writes).
#[test]
fn gptq_4bit_sym() {
    let codes: Vec<u8> = (1..=8).flat_map(|i| [i; 8]).collect(); // 8 rows × 8 cols
    let g = gptq_g_idx(8, Some(8), None).unwrap();
    let t = GptqPacked::pack(4, &codes, 8, 8, &[8; 8], &[0.25; 8], &g).unwrap();
    assert_eq!(t.qweight, vec![w(0x8765_4321); 8]);
    assert_eq!(t.qzeros, vec![0x7777_7777]);
    // Row 0 (code 1): 0.25·(1 − 8) = −1.75.
    assert_eq!(t.view().dequantize().unwrap()[..8], [-1.75; 8]);
}

/// GPTQ v1 3-bit: qweight packs 32 rows into 3 words straddling boundaries, exactly as
/// AutoGPTQ's `<< 30`, `>> 2` sequence (codes 0..9 in bits 0..29 of word 0, code 10 split
/// 2 + 1 bits, codes 11..20 at bits 1..30 of word 1, code 21 split 1 + 2, codes 22..31 at
/// bits 2..31 of word 2) — the same bitstream as EXL2. qzeros does the same along 32 columns:
/// true zeros (n mod 8) + 1 are stored as n mod 8, the 0..7 pattern of `exl2_3bit`.
#[test]
fn gptq_3bit() {
    let codes: Vec<u8> = (0..32).flat_map(|i| [i % 8; 32]).collect();
    let zeros: Vec<u16> = (0..32).map(|n| n % 8 + 1).collect();
    let g = vec![0; 32];
    let t = GptqPacked::pack(3, &codes, 32, 32, &zeros, &[1.0; 32], &g).unwrap();
    let words = [w(0x88FA_C688), w(0xC688_FAC6), w(0xFAC6_88FA)];
    assert_eq!(
        t.qweight,
        words.iter().flat_map(|&x| [x; 32]).collect::<Vec<_>>()
    );
    assert_eq!(t.qzeros, words.to_vec());
    let u = t.view().unpack().unwrap();
    assert_eq!((u.codes, u.zeros), (codes, zeros));
}

/// GPTQ v1 2- and 8-bit qzeros: zero 3 (2-bit) → stored 2 = 0b10 → 0xAAAAAAAA over 16
/// columns; zero 128 (8-bit) → stored 127 → 0x7F7F7F7F over 4 columns.
#[test]
fn gptq_2bit_and_8bit_zeros() {
    let t = GptqPacked::pack(2, &[1; 16 * 16], 16, 16, &[3; 16], &[1.0; 16], &[0; 16]).unwrap();
    assert_eq!(t.qzeros, vec![w(0xAAAA_AAAA)]);
    assert_eq!(t.qweight, vec![0x5555_5555; 16]);
    let t = GptqPacked::pack(8, &[200; 16], 4, 4, &[128; 4], &[0.5; 4], &[0; 4]).unwrap();
    assert_eq!(t.qzeros, vec![0x7F7F_7F7F]);
    assert_eq!(t.qweight, vec![w(0xC8C8_C8C8); 4]);
    assert_eq!(t.view().dequantize().unwrap(), vec![36.0; 16]);
}

/// Act-order g_idx: quantization position i is input row perm[i], in group i / group_size.
#[test]
fn gptq_g_idx_act_order() {
    let g = gptq_g_idx(4, Some(2), Some(&[3, 1, 0, 2])).unwrap();
    assert_eq!(g, vec![1, 0, 1, 0]);
    assert_eq!(gptq_g_idx(5, None, None).unwrap(), vec![0; 5]);
    assert!(matches!(
        gptq_g_idx(3, Some(0), None),
        Err(PackError::InvalidValue { .. })
    ));
}
