//! Properties: unpack(pack(x)) == x for every width and mixed layouts (odd column counts,
//! short last groups, random act-order), packing equals a bit-by-bit reference, and the
//! dequantizers match straightforward float formulas.
use exl2rs_core::pack::{
    gptq_g_idx, pack_columns, rows_per_block, unpack_columns, Exl2Packed, GptqPacked, GroupLayout,
};
use proptest::prelude::*;

/// Reference packer: sets every bit individually from the stream definition
/// (bit j of code i of column n goes to bit (i·b + j) of the column's stream).
fn reference_pack(codes: &[u8], rows: usize, cols: usize, bits: usize) -> Vec<i32> {
    let mut out = vec![0u32; rows * bits / 32 * cols];
    for r in 0..rows {
        for n in 0..cols {
            for j in 0..bits {
                if (codes[r * cols + n] >> j) & 1 == 1 {
                    let bit = r * bits + j;
                    out[(bit / 32) * cols + n] |= 1 << (bit % 32);
                }
            }
        }
    }
    out.into_iter().map(|x| x as i32).collect()
}

fn width() -> impl Strategy<Value = u8> {
    prop::sample::select(vec![2u8, 3, 4, 5, 6, 8])
}

/// (bits, rows, cols, codes) with rows a random multiple of the width's block.
fn matrix() -> impl Strategy<Value = (u8, usize, usize, Vec<u8>)> {
    (width(), 1usize..5, 1usize..70).prop_flat_map(|(b, blocks, cols)| {
        let rows = blocks * rows_per_block(u32::from(b));
        let max = ((1u16 << b) - 1) as u8;
        let codes = prop::collection::vec(0u8..=max, rows * cols);
        (Just(b), Just(rows), Just(cols), codes)
    })
}

/// A descending-width layout of 1..=4 groups, the last possibly short (one block).
fn layout() -> impl Strategy<Value = GroupLayout> {
    prop::collection::vec((width(), 1usize..4), 1..=4).prop_map(|mut gs| {
        gs.sort_by_key(|g| std::cmp::Reverse(g.0));
        let groups = gs
            .into_iter()
            .map(|(b, blocks)| (b, blocks * rows_per_block(u32::from(b))));
        GroupLayout::new(groups).unwrap()
    })
}

#[derive(Debug, Clone)]
struct Exl2Case {
    layout: GroupLayout,
    cols: usize,
    codes: Vec<u8>,
    scales: Vec<u8>,
    scale_max: Vec<f32>,
    perm: Vec<i64>,
}

fn exl2_case() -> impl Strategy<Value = Exl2Case> {
    (layout(), 1usize..80).prop_flat_map(|(layout, cols)| {
        let rows = layout.rows();
        let g = layout.num_groups();
        let codes: Vec<BoxedStrategy<u8>> = layout
            .groups()
            .iter()
            .flat_map(|grp| {
                let max = ((1u32 << grp.bits) - 1) as u8;
                std::iter::repeat_with(move || (0..=max).boxed()).take(grp.rows * cols)
            })
            .collect();
        let perm = Just((0..rows as i64).collect::<Vec<_>>()).prop_shuffle();
        (
            Just(layout),
            Just(cols),
            codes,
            prop::collection::vec(1u8..=16, g * cols),
            prop::collection::vec(0.0f32..4.0, g),
            perm,
        )
            .prop_map(|(layout, cols, codes, scales, scale_max, perm)| Exl2Case {
                layout,
                cols,
                codes,
                scales,
                scale_max,
                perm,
            })
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn columns_roundtrip_and_match_reference((bits, rows, cols, codes) in matrix()) {
        let packed = pack_columns(&codes, rows, cols, u32::from(bits)).unwrap();
        prop_assert_eq!(&packed, &reference_pack(&codes, rows, cols, bits as usize));
        let qrows = rows * bits as usize / 32;
        prop_assert_eq!(unpack_columns(&packed, qrows, cols, u32::from(bits)).unwrap(), codes);
    }

    #[test]
    fn exl2_roundtrip_and_dequantize(c in exl2_case()) {
        let t = Exl2Packed::pack(&c.layout, &c.codes, c.cols, &c.scales, &c.scale_max, Some(&c.perm))
            .unwrap();
        prop_assert_eq!(t.cols_padded % 32, 0);
        let u = t.view().unpack(Some(c.cols)).unwrap();
        prop_assert_eq!(&u.layout, &c.layout);
        prop_assert_eq!(&u.codes, &c.codes);
        prop_assert_eq!(&u.scales, &c.scales);
        prop_assert_eq!(u.perm.iter().map(|&p| i64::from(p)).collect::<Vec<_>>(), c.perm.clone());
        // Re-packing the unpacked quantities gives the same tensors.
        let again = Exl2Packed::pack(&u.layout, &u.codes, c.cols, &u.scales, &u.scale_max,
            Some(&c.perm)).unwrap();
        prop_assert_eq!(&again, &t);

        // Float reference: walk the groups, put packed row i at input row perm[i].
        let dq = t.view().dequantize(Some(c.cols)).unwrap();
        let mut i = 0;
        for (g, grp) in c.layout.groups().iter().enumerate() {
            let zero = f32::from(1u8 << (grp.bits - 1));
            for _ in 0..grp.rows {
                let k = c.perm[i] as usize;
                for n in 0..c.cols {
                    let qs = f32::from(c.scales[g * c.cols + n]);
                    let q = f32::from(c.codes[i * c.cols + n]);
                    let want = (q - zero) * qs * qs * c.scale_max[g] / 256.0;
                    prop_assert_eq!(dq[k * c.cols + n], want, "row {} col {}", k, n);
                }
                i += 1;
            }
        }
    }

    #[test]
    fn exl2_layout_from_qparams_covers_rows(
        blocks in 1usize..40,
        p0 in 0.0f64..0.5,
        bits in prop::sample::subsequence(vec![8u8, 6, 5, 4, 3, 2], 2),
        gs in prop::sample::select(vec![32usize, 64, 128]),
    ) {
        let rows = blocks * 32;
        let l = GroupLayout::from_qparams(rows, &bits, &[p0, 1.0 - p0], &[gs, gs]).unwrap();
        prop_assert_eq!(l.rows(), rows);
        // Only the last group of the matrix may be short.
        let gr = l.groups();
        prop_assert!(gr[..gr.len() - 1].iter().all(|g| g.rows == gs));
        prop_assert!(gr.last().unwrap().rows <= gs);
        prop_assert_eq!(GroupLayout::from_q_groups(&l.q_groups(), l.qrows()).unwrap(), l);
    }

    #[test]
    fn gptq_roundtrip_and_dequantize(
        bits in prop::sample::select(vec![2u32, 3, 4, 8]),
        kb in 1usize..4,
        nb in 1usize..3,
        gs in prop::sample::select(vec![8usize, 32, 48]),
        act_order in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let rpb = rows_per_block(bits);
        let (rows, cols) = (kb * 32, nb * rpb);
        let groups = rows.div_ceil(gs);
        // A small LCG keeps the case generator simple; proptest still shrinks the seed.
        let mut s = seed | 1;
        let mut next = |m: u64| { s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407); (s >> 33) % m };
        let top = 1u64 << bits;
        let codes: Vec<u8> = (0..rows * cols).map(|_| next(top) as u8).collect();
        let zeros: Vec<u16> = (0..groups * cols).map(|_| (next(top) + 1) as u16).collect();
        let scales: Vec<f32> = (0..groups * cols).map(|_| next(1000) as f32 / 997.0 - 0.3).collect();
        let mut perm: Vec<i64> = (0..rows as i64).collect();
        if act_order {
            for i in (1..rows).rev() { perm.swap(i, next(i as u64 + 1) as usize); }
        }
        let g_idx = gptq_g_idx(rows, Some(gs), Some(&perm)).unwrap();
        let t = GptqPacked::pack(bits, &codes, rows, cols, &zeros, &scales, &g_idx).unwrap();
        prop_assert_eq!(&t.qweight, &reference_pack(&codes, rows, cols, bits as usize));
        let u = t.view().unpack().unwrap();
        prop_assert_eq!(&u.codes, &codes);
        prop_assert_eq!(&u.zeros, &zeros);
        let dq = t.view().dequantize().unwrap();
        for k in 0..rows {
            let g = g_idx[k] as usize;
            for n in 0..cols {
                let want = scales[g * cols + n]
                    * (f32::from(codes[k * cols + n]) - f32::from(zeros[g * cols + n]));
                prop_assert_eq!(dq[k * cols + n], want);
            }
        }
    }
}

/// Wide matrices cross the column tile and split into several parallel tasks.
#[test]
fn wide_matrices_match_reference() {
    for bits in [2usize, 3, 4, 5, 6, 8] {
        let (rows, cols) = (40 * rows_per_block(bits as u32), 2048 + 37);
        let codes: Vec<u8> = (0..rows * cols)
            .map(|i| ((i * 2654435761) >> 7) as u8 & ((1u16 << bits) - 1) as u8)
            .collect();
        let packed = pack_columns(&codes, rows, cols, bits as u32).unwrap();
        assert_eq!(
            packed,
            reference_pack(&codes, rows, cols, bits),
            "{bits}-bit"
        );
        let back = unpack_columns(&packed, rows * bits / 32, cols, bits as u32).unwrap();
        assert_eq!(back, codes, "{bits}-bit");
    }
}
