//! The AVX2 column packer for one-byte codes (u8, and i8 through the same bit patterns),
//! written with explicit intrinsics: the auto-vectorised generic kernel (`kernels.rs`) spends
//! its time widening and narrowing lanes and in byte-by-byte word assembly, which left
//! fresh 5/6-bit packing at 6–10× NumPy. Wider code types keep the generic kernel.
//!
//! A tile is 32 (or 64) columns of one block: one (or two) `__m256i` per code row. Row `i`
//! (bits `[i·B, i·B + B)` of each column's stream) is shifted into byte plane `k = i·B/8` (plane `k`
//! = byte `k` of the block's bitstream, in column order) as `v << s`, and when it straddles a
//! byte also into plane `k + 1` as `v >> (8 − s)`, with 16-bit shifts whose bits leaked across
//! bytes are removed by masks (an in-range code that does not straddle leaks nothing). Every
//! row is also OR-ed into an accumulator for the caller's range check. Each group of four
//! planes is then interleaved into its word row with two rounds of in-lane unpacks and one
//! cross-lane permute per 8 words, the inverse of `unpack_avx2::byte_planes`.
//!
//! With `stream`, the body of every word row goes out through non-temporal stores, which skip
//! the read-for-ownership of a destination that is not in cache. They need 32-byte aligned
//! addresses, and whole lines to combine well: the streamed part starts where word row 0
//! reaches a 64-byte boundary, the same column for every row only when `cols % 16 == 0`
//! (checked here; otherwise ordinary stores). The columns before and after it are covered by
//! unaligned tiles with ordinary stores, overlapping the streamed part (writing the same words
//! twice). Without `stream`, the last `cols % 32` columns take the scalar path.
use std::arch::x86_64::{
    __m256i, _mm256_and_si256, _mm256_loadu_si256, _mm256_or_si256, _mm256_permute2x128_si256,
    _mm256_set1_epi8, _mm256_setzero_si256, _mm256_slli_epi16, _mm256_srli_epi16,
    _mm256_storeu_si256, _mm256_stream_si256, _mm256_unpackhi_epi16, _mm256_unpackhi_epi8,
    _mm256_unpacklo_epi16, _mm256_unpacklo_epi8, _mm_sfence,
};

use super::kernels::{pack_column, shape};
use super::unpack_avx2::{prefetch_row, shift16};

/// Columns per tile: one `__m256i` of u8 codes per row.
const TILE: usize = 32;

/// How far ahead along each code row the tiles prefetch: a block reads 4–32 rows a multiple
/// of 4 KiB apart at once, more streams than the hardware prefetchers follow.
const PREFETCH: usize = 256;

/// Byte planes of the largest block (5 bits: 5 words → 20 planes).
const MAX_PLANES: usize = 20;

/// Interleaves four byte planes (plane `k` = byte `k` of 32 little-endian words, in column
/// order) into those words: four vectors of 8 consecutive words.
///
/// # Safety
/// AVX2 must be available.
#[inline(always)]
unsafe fn words(p: &[__m256i]) -> [__m256i; 4] {
    // In-lane unpacks: lane 0 holds columns 0–15 of each plane, lane 1 columns 16–31.
    let lo01 = _mm256_unpacklo_epi8(p[0], p[1]); // bytes 0–1 of columns 0–7 | 16–23
    let hi01 = _mm256_unpackhi_epi8(p[0], p[1]); // columns 8–15 | 24–31
    let lo23 = _mm256_unpacklo_epi8(p[2], p[3]);
    let hi23 = _mm256_unpackhi_epi8(p[2], p[3]);
    let a = _mm256_unpacklo_epi16(lo01, lo23); // words of columns 0–3 | 16–19
    let b = _mm256_unpackhi_epi16(lo01, lo23); // 4–7 | 20–23
    let c = _mm256_unpacklo_epi16(hi01, hi23); // 8–11 | 24–27
    let d = _mm256_unpackhi_epi16(hi01, hi23); // 12–15 | 28–31
    [
        _mm256_permute2x128_si256::<0x20>(a, b),
        _mm256_permute2x128_si256::<0x20>(c, d),
        _mm256_permute2x128_si256::<0x31>(a, b),
        _mm256_permute2x128_si256::<0x31>(c, d),
    ]
}

/// Packs the `32·V` columns from `c0` of one block (`blk`: `[R, cols]` codes, `dst`: `[W, cols]`
/// words), OR-ing every code into `acc`; `STREAM` writes with non-temporal stores.
///
/// With `V = 2` each code row is read as one whole 64-byte line: a block's 16–32 rows lie
/// `cols` bytes apart, and for `cols` a multiple of 4 KiB they all fall in one 8-way L1 set,
/// so a line read half by one tile is evicted before the next tile reads its other half
/// (measured at 8192 columns, one thread: 3/5/6-bit packing ran at 2.2/3.1/5.4 GB/s with
/// 32-column tiles, 3.6/6.4/7.6 GB/s with 64). Copying strips of the rows to a scratch buffer
/// with a non-aliasing pitch first was slower still (measured 1.7/2.6/3.4 GB/s).
///
/// # Safety
/// `c0 + 32·V <= cols`; `blk` and `dst` hold one whole block; with `STREAM`, every
/// `dst[wi·cols + c0]` is 32-byte aligned; AVX2 must be available.
#[inline(always)]
unsafe fn tile<const B: usize, const V: usize, const STREAM: bool>(
    blk: &[u8],
    dst: &mut [i32],
    cols: usize,
    c0: usize,
    acc: &mut __m256i,
) {
    let (g, w) = shape(B);
    let mask = ((1u16 << B) - 1) as u8;
    let mut planes = [[_mm256_setzero_si256(); MAX_PLANES]; V];
    let rows = 4 * g;
    // Spelled out row by row (a `for` loop over 16–32 rows is not unrolled, which would leave
    // a jump table per row to pick the shift immediates).
    macro_rules! rows {
        ($($i:literal)*) => {$(
            if $i < rows {
                let at = $i * cols + c0;
                // One prefetch per 64-byte line of each row: every tile with `V = 2`, every
                // other one with `V = 1`.
                if V == 2 || c0 / TILE % 2 == 0 {
                    prefetch_row(blk.as_ptr().wrapping_add(at + PREFETCH));
                }
                for h in 0..V {
                    let at = at + h * TILE;
                    debug_assert!(at + TILE <= blk.len());
                    // SAFETY: `c0 + 32·V <= cols`, so the 32 bytes from `at` lie in code
                    // row `i`.
                    let v = unsafe { _mm256_loadu_si256(blk.as_ptr().add(at).cast()) };
                    *acc = _mm256_or_si256(*acc, v);
                    let bit = ($i / g) * w * 8 + ($i % g) * B;
                    let (k, s) = (bit / 8, bit % 8);
                    let planes = &mut planes[h];
                    if s + B <= 8 {
                        // In range, `v << s` stays inside each byte.
                        planes[k] = _mm256_or_si256(planes[k], shift16!(_mm256_slli_epi16, v, s));
                    } else {
                        let keep = 0xFFu8 << s; // the code's low 8 − s bits, at the top of byte k
                        let lo = shift16!(_mm256_slli_epi16, v, s);
                        let hi = shift16!(_mm256_srli_epi16, v, 8 - s);
                        planes[k] = _mm256_or_si256(
                            planes[k],
                            _mm256_and_si256(lo, _mm256_set1_epi8(keep as i8)),
                        );
                        // The first bits of byte k + 1: set, not OR-ed (no earlier row reaches
                        // it).
                        planes[k + 1] =
                            _mm256_and_si256(hi, _mm256_set1_epi8((mask >> (8 - s)) as i8));
                    }
                }
            }
        )*};
    }
    rows!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31);
    for (h, planes) in planes.iter().enumerate() {
        for wi in 0..w {
            // SAFETY: AVX2 is available (caller).
            let out = unsafe { words(&planes[4 * wi..4 * wi + 4]) };
            for (j, &v) in out.iter().enumerate() {
                let at = wi * cols + c0 + h * TILE + 8 * j;
                debug_assert!(at + 8 <= dst.len());
                let p = dst.as_mut_ptr().wrapping_add(at).cast::<__m256i>();
                // SAFETY: the 8 words from `at` lie in word row `wi` (`c0 + 32·V <= cols`),
                // aligned for streaming stores when `STREAM` (caller).
                unsafe {
                    if STREAM {
                        _mm256_stream_si256(p, v);
                    } else {
                        _mm256_storeu_si256(p, v);
                    }
                }
            }
        }
    }
}

/// The OR of the 32 bytes of `v`.
#[inline(always)]
fn or_bytes(v: __m256i) -> u8 {
    // SAFETY: `__m256i` and `[u8; 32]` have the same size, and every bit pattern is valid.
    let b: [u8; 32] = unsafe { std::mem::transmute(v) };
    b.iter().fold(0, |a, &x| a | x)
}

/// Packs whole blocks of `B`-bit codes (`[k·R, cols]`) into `out` (`[k·W, cols]`); returns the
/// OR of every code read. With `stream` (honoured only when `cols % 16 == 0`) the body of each
/// word row goes out through non-temporal stores.
#[target_feature(enable = "avx2")]
pub(super) fn pack<const B: usize>(codes: &[u8], cols: usize, out: &mut [i32], stream: bool) -> u8 {
    let (g, w) = shape(B);
    let r = 4 * g;
    // Word rows share row 0's alignment when `cols % 16 == 0`: one column offset aligns them.
    let misalign = out.as_ptr() as usize % 64 / 4;
    let head = (16 - misalign) % 16;
    let stream = stream && cols.is_multiple_of(16) && head + TILE <= cols;
    let blocks = codes
        .chunks_exact(r * cols)
        .zip(out.chunks_exact_mut(w * cols));
    let mut acc = _mm256_setzero_si256();
    let mut tail = 0u8;
    if stream {
        for (blk, dst) in blocks {
            // SAFETY: AVX2 is available; `head + 32 <= cols` (above).
            unsafe {
                if head > 0 {
                    tile::<B, 1, false>(blk, dst, cols, 0, &mut acc);
                }
                pack_block::<B, true>(blk, dst, cols, head, &mut acc);
            }
        }
        // Non-temporal stores are weakly ordered: make them visible before the caller (or the
        // Rayon join) reads the output.
        _mm_sfence();
    } else {
        for (blk, dst) in blocks {
            // SAFETY: AVX2 is available.
            let done = unsafe { pack_block::<B, false>(blk, dst, cols, 0, &mut acc) };
            for c in done..cols {
                tail |= pack_column::<u8, B>(blk, cols, c, dst);
            }
        }
    }
    or_bytes(acc) | tail
}

/// Packs columns `from..` of one block in tiles of 64 then 32 columns. Streaming: `from` is
/// where word row 0 is 64-byte aligned, and the last `cols % 32` columns are covered by an
/// overlapping tile with ordinary stores; returns `cols`. Otherwise returns where the whole
/// tiles end (the caller packs the rest column by column).
///
/// # Safety
/// AVX2 must be available; with `STREAM`, `cols % 16 == 0`, `from + 32 <= cols` and `from`
/// aligns word row 0.
#[inline(always)]
unsafe fn pack_block<const B: usize, const STREAM: bool>(
    blk: &[u8],
    dst: &mut [i32],
    cols: usize,
    from: usize,
    acc: &mut __m256i,
) -> usize {
    let mut c0 = from;
    // SAFETY (every tile): it ends at most at `cols`; streamed tiles start at `from` plus a
    // multiple of 32 columns, where every word row is aligned.
    unsafe {
        while c0 + 2 * TILE <= cols {
            tile::<B, 2, STREAM>(blk, dst, cols, c0, acc);
            c0 += 2 * TILE;
        }
        if c0 + TILE <= cols {
            tile::<B, 1, STREAM>(blk, dst, cols, c0, acc);
            c0 += TILE;
        }
        if STREAM && c0 < cols {
            // Overlaps the streamed part: the same words written again.
            tile::<B, 1, false>(blk, dst, cols, cols - TILE, acc);
            c0 = cols;
        }
    }
    c0
}

#[cfg(test)]
mod tests {
    //! The AVX2 packer against the portable generic kernel (itself checked against a bit-by-bit
    //! reference in `tests/pack_kernels.rs`), including the fused OR.
    use super::*;
    use crate::pack::kernels::{pack_seq, Isa};
    use proptest::prelude::*;

    fn avx2() -> bool {
        std::arch::is_x86_feature_detected!("avx2")
    }

    fn run(bits: u32, codes: &[u8], cols: usize, out: &mut [i32], stream: bool) -> u8 {
        assert!(avx2());
        // SAFETY: AVX2 availability is asserted above.
        unsafe {
            match bits {
                2 => pack::<2>(codes, cols, out, stream),
                3 => pack::<3>(codes, cols, out, stream),
                4 => pack::<4>(codes, cols, out, stream),
                5 => pack::<5>(codes, cols, out, stream),
                6 => pack::<6>(codes, cols, out, stream),
                8 => pack::<8>(codes, cols, out, stream),
                _ => unreachable!(),
            }
        }
    }

    /// Packs `codes` with the portable kernel and with AVX2 (cached and streamed, into an
    /// output `offset` words into a guarded buffer); words and ORs must agree.
    fn check(bits: u32, blocks: usize, cols: usize, codes: &[u8], offset: usize) {
        let (g, w) = shape(bits as usize);
        assert_eq!(codes.len(), blocks * 4 * g * cols);
        let n = blocks * w * cols;
        let mut want = vec![0i32; n];
        let want_or = pack_seq(Isa::Portable, bits, codes, cols, &mut want, false);
        for stream in [false, true] {
            let mut buf = vec![0x5A5A_5A5Ai32; n + offset + 16];
            let got_or = run(bits, codes, cols, &mut buf[offset..offset + n], stream);
            assert_eq!(
                got_or, want_or,
                "{bits}-bit OR, {cols} cols, stream {stream}"
            );
            // Out-of-range codes leave the words unspecified (the caller reports an error).
            if u32::from(want_or) >> bits == 0 {
                assert!(
                    buf[offset..offset + n] == want[..],
                    "{bits}-bit x {blocks} blocks x {cols} cols at +{offset}, stream {stream}"
                );
            }
            assert!(
                buf[..offset].iter().all(|&x| x == 0x5A5A_5A5A),
                "guard before"
            );
            assert!(
                buf[offset + n..].iter().all(|&x| x == 0x5A5A_5A5A),
                "guard after"
            );
        }
    }

    fn lcg_codes(n: usize, bits: u32, seed: u64) -> Vec<u8> {
        let mut s = seed | 1;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as u32 & ((1 << bits) - 1)) as u8
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]

        /// Random widths, block counts, column counts (below, at and across the 32-column tile,
        /// multiples of 16 where streaming applies) and output alignments.
        #[test]
        fn matches_portable(
            bits in prop::sample::select(vec![2u32, 3, 4, 5, 6, 8]),
            blocks in 1usize..4,
            cols in prop_oneof![1usize..8, 30usize..35, 60usize..70, 90usize..200,
                                (1usize..12).prop_map(|m| 16 * m),
                                (0usize..600).prop_map(|m| 4096 + m)],
            offset in 0usize..16,
            seed in any::<u64>(),
        ) {
            prop_assume!(avx2());
            let (g, _) = shape(bits as usize);
            let codes = lcg_codes(blocks * 4 * g * cols, bits, seed);
            check(bits, blocks, cols, &codes, offset);
        }

        /// One out-of-range byte anywhere (tile body, scalar tail, streamed or edge tile): the
        /// OR must have a bit above the width, exactly like the portable kernel's.
        #[test]
        fn or_flags_out_of_range(
            bits in prop::sample::select(vec![2u32, 3, 4, 5, 6]),
            blocks in 1usize..3,
            cols in prop_oneof![1usize..8, 30usize..70, (1usize..8).prop_map(|m| 16 * m)],
            pos_frac in 0.0f64..1.0,
            bad_bit in 0u32..8,
            seed in any::<u64>(),
        ) {
            prop_assume!(avx2());
            let bad_bit = bad_bit.max(bits); // a bit outside the width; bit 7 = an i8's sign
            let (g, _) = shape(bits as usize);
            let mut codes = lcg_codes(blocks * 4 * g * cols, bits, seed);
            let pos = (codes.len() as f64 * pos_frac) as usize % codes.len();
            codes[pos] |= 1 << bad_bit;
            let mut out = vec![0i32; codes.len() * bits as usize / 32];
            let or = run(bits, &codes, cols, &mut out, false);
            prop_assert!(u32::from(or) >> bits != 0);
            check(bits, blocks, cols, &codes, 0);
        }
    }

    /// Every width over many tiles and blocks, wide enough that the tail and edge tiles are a
    /// small part: the common shape.
    #[test]
    fn wide_matrices() {
        if !avx2() {
            return;
        }
        for bits in [2u32, 3, 4, 5, 6, 8] {
            let (g, _) = shape(bits as usize);
            // 4096 + …: rows a multiple of 4 KiB apart (all on one L1 set), with a partial
            // tile and a scalar tail.
            for cols in [
                1024,
                1024 + 16,
                1024 + 7,
                4096,
                4096 + 16,
                4096 + 7,
                4096 + 560,
            ] {
                let codes = lcg_codes(3 * 4 * g * cols, bits, u64::from(bits));
                for offset in [0, 1, 8] {
                    check(bits, 3, cols, &codes, offset);
                }
            }
        }
    }
}
