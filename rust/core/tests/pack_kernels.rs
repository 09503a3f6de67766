//! The per-width kernels against a bit-by-bit reference, on every instruction set this CPU
//! has (the portable fallback always, AVX2 where detected), for every code integer type,
//! with column counts off the tile width and several parallel tasks; and the fused range
//! check, which must name the first bad code wherever it sits (tile body or scalar tail).
//! The unpackers run with cached and streaming stores into outputs at every alignment, the
//! packers with every store kind.
use exl2rs_core::pack::{
    pack_columns_with, rows_per_block, unpack_columns_with, Code, Isa, PackError, Stores, EXL2_BITS,
};
use proptest::prelude::*;

/// Bit j of code i of column n goes to bit (i·b + j) of the column's stream.
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

fn isas() -> Vec<Isa> {
    [Isa::Portable, Isa::Avx2]
        .into_iter()
        .filter(|i| i.available())
        .collect()
}

fn pack_as<T: Code>(
    isa: Isa,
    codes: &[T],
    rows: usize,
    cols: usize,
    bits: u32,
) -> Result<Vec<i32>, PackError> {
    let mut out = vec![0i32; rows * bits as usize / 32 * cols];
    pack_columns_with(isa, Stores::Cached, codes, rows, cols, bits, &mut out)?;
    Ok(out)
}

/// Packs `codes` converted to each integer type on every ISA; all must equal `want`.
fn check_all(codes: &[u8], rows: usize, cols: usize, bits: u32, want: &[i32]) {
    for isa in isas() {
        let as_i16: Vec<i16> = codes.iter().map(|&c| i16::from(c)).collect();
        let as_i32: Vec<i32> = codes.iter().map(|&c| i32::from(c)).collect();
        let as_i64: Vec<i64> = codes.iter().map(|&c| i64::from(c)).collect();
        let as_i8: Vec<i8> = codes.iter().map(|&c| c as i8).collect();
        assert_eq!(
            pack_as(isa, codes, rows, cols, bits).unwrap(),
            want,
            "{isa:?} u8"
        );
        assert_eq!(
            pack_as(isa, &as_i16, rows, cols, bits).unwrap(),
            want,
            "{isa:?} i16"
        );
        assert_eq!(
            pack_as(isa, &as_i32, rows, cols, bits).unwrap(),
            want,
            "{isa:?} i32"
        );
        assert_eq!(
            pack_as(isa, &as_i64, rows, cols, bits).unwrap(),
            want,
            "{isa:?} i64"
        );
        if bits < 8 {
            // 8-bit codes above 127 do not fit int8 (they would be negative, hence rejected).
            assert_eq!(
                pack_as(isa, &as_i8, rows, cols, bits).unwrap(),
                want,
                "{isa:?} i8"
            );
        }
        // The byte kernel streams where it can (AVX2, cols % 16 == 0); wider types ignore it.
        for stores in [Stores::Streaming, Stores::Auto] {
            let mut out = vec![0x5A5A_5A5A; want.len()];
            pack_columns_with(isa, stores, codes, rows, cols, bits, &mut out).unwrap();
            assert_eq!(out, want, "{isa:?} {stores:?} u8");
        }
        for stores in [Stores::Cached, Stores::Streaming, Stores::Auto] {
            let mut back = vec![0xAAu8; codes.len()];
            unpack_columns_with(isa, stores, want, want.len() / cols, cols, bits, &mut back)
                .unwrap();
            assert_eq!(back, codes, "{isa:?} {stores:?} unpack");
        }
    }
}

/// Bit j of code i of column n is bit (i·b + j) of the column's stream.
fn reference_unpack(words: &[i32], qrows: usize, cols: usize, bits: usize) -> Vec<u8> {
    let rows = qrows * 32 / bits;
    let mut out = vec![0u8; rows * cols];
    for r in 0..rows {
        for n in 0..cols {
            for j in 0..bits {
                let bit = r * bits + j;
                if (words[(bit / 32) * cols + n] as u32 >> (bit % 32)) & 1 == 1 {
                    out[r * cols + n] |= 1 << j;
                }
            }
        }
    }
    out
}

/// Unpacks arbitrary words (every bit pattern is a valid packed matrix) into an output that
/// starts `offset` bytes into a buffer, so row starts take every alignment, with guard bytes
/// on both sides that must survive.
fn check_unpack(words: &[i32], qrows: usize, cols: usize, bits: u32, offset: usize) {
    let want = reference_unpack(words, qrows, cols, bits as usize);
    for isa in isas() {
        for stores in [Stores::Cached, Stores::Streaming, Stores::Auto] {
            let mut buf = vec![0x5Au8; want.len() + offset + 64];
            let out = &mut buf[offset..offset + want.len()];
            unpack_columns_with(isa, stores, words, qrows, cols, bits, out).unwrap();
            assert!(
                out == want.as_slice(),
                "{isa:?} {stores:?} {bits}-bit {qrows}x{cols} at +{offset}"
            );
            assert!(buf[..offset].iter().all(|&b| b == 0x5A), "guard before");
            assert!(
                buf[offset + want.len()..].iter().all(|&b| b == 0x5A),
                "guard after"
            );
        }
    }
}

/// A deterministic 64-bit LCG stream (Knuth's MMIX constants), for reproducible test data.
fn lcg(n: usize, seed: u64) -> impl Iterator<Item = u64> {
    let mut s = seed | 1;
    (0..n).map(move |_| {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        s
    })
}

fn lcg_words(n: usize, seed: u64) -> Vec<i32> {
    lcg(n, seed).map(|s| (s >> 32) as u32 as i32).collect()
}

fn lcg_codes(n: usize, bits: u32, seed: u64) -> Vec<u8> {
    lcg(n, seed)
        .map(|s| ((s >> 33) as u32 & ((1 << bits) - 1)) as u8)
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Random widths, block counts and column counts (below, at and across the 32- and
    /// 64-column tiles, mostly not a multiple of 8 on purpose, and multiples of 16, where the
    /// AVX2 byte packer streams).
    #[test]
    fn kernels_match_reference(
        bits in prop::sample::select(EXL2_BITS.to_vec()),
        blocks in 1usize..6,
        cols in prop_oneof![1usize..8, 60usize..70, 120usize..200,
                            (1usize..10).prop_map(|m| 16 * m)],
        seed in any::<u64>(),
    ) {
        let rows = blocks * rows_per_block(bits);
        let codes = lcg_codes(rows * cols, bits, seed);
        let want = reference_pack(&codes, rows, cols, bits as usize);
        check_all(&codes, rows, cols, bits, &want);
    }

    /// Unpacking random words on every ISA and store kind: short matrices (one block), column
    /// counts below, at and across the 64-column tile and multiples of 64 (where streaming
    /// applies), output starts at every alignment.
    #[test]
    fn unpack_kernels_match_reference(
        bits in prop::sample::select(EXL2_BITS.to_vec()),
        blocks in 1usize..5,
        cols in prop_oneof![1usize..8, 31usize..34, 60usize..70, 100usize..200,
                            (1usize..5).prop_map(|m| 64 * m)],
        offset in 0usize..64,
        seed in any::<u64>(),
    ) {
        let qrows = blocks * exl2rs_core::pack::bits::words_per_block(bits);
        check_unpack(&lcg_words(qrows * cols, seed), qrows, cols, bits, offset);
    }

    /// One bad code anywhere: every ISA reports that code (the first one in row-major order).
    #[test]
    fn fused_range_check_names_first_bad_code(
        bits in prop::sample::select(EXL2_BITS.to_vec()),
        blocks in 1usize..4,
        cols in prop_oneof![1usize..8, 60usize..140],
        pos_frac in 0.0f64..1.0,
        negative in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let rows = blocks * rows_per_block(bits);
        let mut codes: Vec<i32> =
            lcg_codes(rows * cols, bits, seed).into_iter().map(i32::from).collect();
        let pos = ((rows * cols) as f64 * pos_frac) as usize % (rows * cols);
        let bad = if negative { -3 } else { 1 << bits };
        codes[pos] = bad;
        for isa in isas() {
            let err = pack_as(isa, &codes, rows, cols, bits).unwrap_err();
            let want = format!(
                "codes[{}, {}] = {bad} is out of range: expected a {bits}-bit code in 0..={}",
                pos / cols,
                pos % cols,
                (1 << bits) - 1
            );
            prop_assert_eq!(err.to_string(), want);
        }
    }
}

/// Wide matrices split into several Rayon tasks, the last one short, with a scalar tail.
#[test]
fn wide_matrices_on_every_isa() {
    for bits in EXL2_BITS {
        let (rows, cols) = (41 * rows_per_block(bits), 2048 + 37);
        let codes = lcg_codes(rows * cols, bits, u64::from(bits));
        let want = reference_pack(&codes, rows, cols, bits as usize);
        check_all(&codes, rows, cols, bits, &want);
    }
}

/// Out-of-range values of wide types are not truncated into range: 256 + c and −256 + c
/// have valid low bytes but must still be rejected.
#[test]
fn wide_values_are_not_truncated() {
    for isa in isas() {
        for bad in [256i64 + 1, -256 + 1, i64::MIN, 1 << 40] {
            let mut codes = vec![1i64; 16 * 70];
            codes[15 * 70 + 69] = bad; // the last code, in the scalar tail
            let err = pack_as(isa, &codes, 16, 70, 4).unwrap_err().to_string();
            assert!(err.starts_with(&format!("codes[15, 69] = {bad} ")), "{err}");
        }
        let codes = vec![u64::MAX; 8];
        let err = pack_as(isa, &codes, 8, 1, 4).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("codes[0, 0] = {} ", u64::MAX)),
            "{err}"
        );
    }
}

/// Large streaming outputs split over several Rayon tasks, aligned and not, with a column
/// count that streams (a multiple of 64) and one that does not.
#[test]
fn wide_unpack_streams_on_every_isa() {
    for bits in EXL2_BITS {
        let wpb = exl2rs_core::pack::bits::words_per_block(bits);
        for (qrows, cols) in [(70 * wpb, 1024), (3 * wpb, 5120), (7 * wpb, 2048 + 37)] {
            let words = lcg_words(qrows * cols, u64::from(bits));
            for offset in [0, 16, 33] {
                check_unpack(&words, qrows, cols, bits, offset);
            }
        }
    }
}

#[test]
fn isa_detection_is_consistent() {
    assert!(Isa::Portable.available());
    assert!(Isa::detect().available());
    if Isa::Avx2.available() {
        assert_eq!(Isa::detect(), Isa::Avx2);
    } else {
        let mut out = vec![0i32; 1];
        let err =
            pack_columns_with(Isa::Avx2, Stores::Cached, &[0u8; 8], 8, 1, 4, &mut out).unwrap_err();
        assert!(err.to_string().contains("isa"), "{err}");
    }
}
