//! The AVX2 column unpacker, written with explicit intrinsics: auto-vectorising the generic
//! tile kernel (`kernels.rs`) leaves the word → byte-plane split as long chains of byte
//! extracts and inserts, which made unpacking 2–3× slower than packing at 2/3/5/6 bits.
//!
//! A tile is 64 columns of one block (a cache line of codes per output row). Each word row of
//! the tile is split into four byte planes (plane `k` = byte `k` of every word, in column
//! order) with one `vpshufb` + `vpermd` per 8 words and a 4 × 4 qword transpose; plane `k` of
//! word `w` is byte `4w + k` of the block's bitstream. Code row `i` (bits `[i·b, i·b + b)`) is
//! then `(plane[i·b/8] >> s) & mask`, or for a code straddling two bytes
//! `(plane[k] >> s) & lo | (plane[k+1] << (8 − s)) & hi`, with 16-bit shifts whose bits leaked
//! across bytes are removed by the masks. Each output row receives its whole cache line in two
//! consecutive stores.
//!
//! With `stream`, the body of every row goes out through non-temporal stores, which skip the
//! read-for-ownership of a destination that is not in cache (a large output written once).
//! They need 32-byte aligned addresses, and whole lines to combine well, so the streamed part
//! starts where row 0's output reaches a 64-byte boundary; that is the same column for every
//! row only when `cols % 64 == 0`, which is checked here (otherwise ordinary stores). The first
//! and last 64 columns are covered by unaligned tiles with ordinary stores, overlapping the
//! streamed part (writing the same bytes twice), so no column falls to a scalar path. The
//! streamed part is cut into strips of 1–4 K columns whose code rows are written one at a
//! time ([`strip`]): streaming 16–32 rows 8 KiB apart at once, as the tiles do, measured
//! 12–15 GB/s against 20 GB/s for one sequential stream; with the next strip's words
//! prefetched, strips beat streamed tiles by 15–25% at 2/3 bits and tie at 4/5/6/8.
//! Matrices under 64 columns are unpacked one column at a time.
use std::arch::x86_64::{
    __m256i, _mm256_and_si256, _mm256_loadu_si256, _mm256_or_si256, _mm256_permute2x128_si256,
    _mm256_permutevar8x32_epi32, _mm256_set1_epi8, _mm256_setr_epi32, _mm256_setr_epi8,
    _mm256_setzero_si256, _mm256_shuffle_epi8, _mm256_slli_epi16, _mm256_srli_epi16,
    _mm256_storeu_si256, _mm256_stream_si256, _mm256_unpackhi_epi64, _mm256_unpacklo_epi64,
    _mm_prefetch, _mm_sfence, _MM_HINT_T0,
};

use super::kernels::{shape, unpack_column};

/// Columns per tile: one cache line of u8 codes per output row.
const TILE: usize = 64;

/// How far ahead along each output row the cached path prefetches: a block writes 4–32 rows
/// a multiple of 4 KiB apart at once, more streams than the hardware prefetchers follow.
const PREFETCH: usize = 4 * TILE;

#[inline(always)]
pub(super) fn prefetch_row(p: *const u8) {
    // SAFETY: a prefetch is a hint that never faults, whatever the address; SSE is part of
    // the x86-64 baseline.
    unsafe { _mm_prefetch::<_MM_HINT_T0>(p.cast::<i8>()) }
}

/// Columns per strip: the planes (`4·W` rows of that many bytes, 4–20 KiB) stay in L1. 2-bit
/// codes measured best with 4096 columns, 3/5 bits with 1024 (4096 was 10–25% slower at 5/6
/// bits, whose planes then spill to L2).
const fn strip_width(bits: usize) -> usize {
    if bits == 2 {
        4096
    } else {
        1024
    }
}

/// Bytes of the strip scratch: the largest `4·W · strip_width` (5 bits: 20 × 1024).
const SCRATCH: usize = 20 << 10;

/// Byte planes of the largest block per 32-column half (5 bits: 5 words → 20 planes).
const MAX_PLANES: usize = 20;

/// Splits 32 columns of one word row (`src[0..32]`, little-endian words) into four byte
/// planes: plane `k` holds byte `k` of each word, in column order.
///
/// # Safety
/// `src` must point to 32 readable `i32`s; AVX2 must be available.
#[inline(always)]
unsafe fn byte_planes(src: *const i32) -> [__m256i; 4] {
    // Within each 128-bit lane: bytes k of the lane's four words → dword k.
    let gather = _mm256_setr_epi8(
        0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15, 0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10,
        14, 3, 7, 11, 15,
    );
    // Dword k of both lanes side by side: qword k = byte k of the eight words, in order.
    let pair = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    let mut q = [_mm256_setzero_si256(); 4];
    for (j, qj) in q.iter_mut().enumerate() {
        // SAFETY: the caller guarantees 32 readable words; unaligned loads are allowed.
        let v = unsafe { _mm256_loadu_si256(src.add(8 * j).cast()) };
        *qj = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(v, gather), pair);
    }
    // 4 × 4 transpose of qwords: plane k = qword k of q[0], q[1], q[2], q[3].
    let lo01 = _mm256_unpacklo_epi64(q[0], q[1]); // [q0.0 q1.0 | q0.2 q1.2]
    let hi01 = _mm256_unpackhi_epi64(q[0], q[1]); // [q0.1 q1.1 | q0.3 q1.3]
    let lo23 = _mm256_unpacklo_epi64(q[2], q[3]);
    let hi23 = _mm256_unpackhi_epi64(q[2], q[3]);
    [
        _mm256_permute2x128_si256::<0x20>(lo01, lo23),
        _mm256_permute2x128_si256::<0x20>(hi01, hi23),
        _mm256_permute2x128_si256::<0x31>(lo01, lo23),
        _mm256_permute2x128_si256::<0x31>(hi01, hi23),
    ]
}

/// `x >> s` / `x << s` on 16-bit lanes with an immediate picked from a run-time `s` (constant
/// after unrolling, so the match folds away).
macro_rules! shift16 {
    ($op:ident, $x:expr, $s:expr) => {
        match $s {
            1 => $op::<1>($x),
            2 => $op::<2>($x),
            3 => $op::<3>($x),
            4 => $op::<4>($x),
            5 => $op::<5>($x),
            6 => $op::<6>($x),
            7 => $op::<7>($x),
            _ => $x,
        }
    };
}
pub(super) use shift16;

/// Code row `i` of a block (bits `[i·B, i·B + B)` of each column's stream) from its planes.
///
/// # Safety
/// AVX2 must be available. (This and the helpers above are plain `#[inline(always)]`
/// functions rather than `#[target_feature]` ones so that they inline into [`unpack`], whose
/// attribute enables AVX2 for all of them, and `i` becomes a constant.)
#[inline(always)]
unsafe fn code_row<const B: usize>(plane: impl Fn(usize) -> __m256i, i: usize) -> __m256i {
    let bit = i * B;
    let (k, s) = (bit / 8, bit % 8);
    if B == 8 {
        return plane(k);
    }
    let mask = ((1u16 << B) - 1) as u8;
    let lo = shift16!(_mm256_srli_epi16, plane(k), s);
    if s + B <= 8 {
        // Bits shifted in from the neighbouring byte land above the mask.
        return _mm256_and_si256(lo, _mm256_set1_epi8(mask as i8));
    }
    let keep_lo = 0xFFu8 >> s; // the code's low 8 − s bits, from plane k
    let hi = shift16!(_mm256_slli_epi16, plane(k + 1), 8 - s);
    _mm256_or_si256(
        _mm256_and_si256(lo, _mm256_set1_epi8(keep_lo as i8)),
        _mm256_and_si256(hi, _mm256_set1_epi8((mask & !keep_lo) as i8)),
    )
}

/// Unpacks the 64 columns from `c0` of one block (`blk`: `[W, cols]` words, `dst`: `[R, cols]`
/// codes) with ordinary stores.
///
/// # Safety
/// `c0 + 64 <= cols`; `blk` and `dst` hold one whole block; AVX2 must be available.
#[inline(always)]
unsafe fn tile<const B: usize>(blk: &[i32], dst: &mut [u8], cols: usize, c0: usize) {
    let (g, w) = shape(B);
    let mut planes = [[_mm256_setzero_si256(); MAX_PLANES]; 2];
    for (half, p) in planes.iter_mut().enumerate() {
        for wi in 0..w {
            let at = wi * cols + c0 + 32 * half;
            debug_assert!(at + 32 <= blk.len());
            // SAFETY: `c0 + 64 <= cols`, so the 32 words from `at` lie in word row `wi`.
            let four = unsafe { byte_planes(blk.as_ptr().add(at)) };
            p[4 * wi..4 * wi + 4].copy_from_slice(&four);
        }
    }
    let rows = 4 * g;
    // Spelled out row by row (a `for` loop over 16–32 rows is not unrolled, which would leave
    // a jump table per row to pick the shift immediates).
    macro_rules! rows {
        ($($i:literal)*) => {$(
            if $i < rows {
                prefetch_row(dst.as_ptr().wrapping_add($i * cols + c0 + PREFETCH));
                for (half, p) in planes.iter().enumerate() {
                    // SAFETY: AVX2 is available (caller).
                    let v = unsafe { code_row::<B>(|k| p[k], $i) };
                    let at = $i * cols + c0 + 32 * half;
                    debug_assert!(at + 32 <= dst.len());
                    // SAFETY: the 32 bytes from `at` lie in code row `i` of this block.
                    unsafe { _mm256_storeu_si256(dst.as_mut_ptr().add(at).cast(), v) };
                }
            }
        )*};
    }
    rows!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31);
}

/// Byte planes of one block over a strip of columns, plane-major: vector `k·chunks + j` is
/// plane `k` of the strip's 32-column chunk `j`.
type StripPlanes = [__m256i; SCRATCH / 32];

/// Unpacks the `width` columns from `c0` of one block with streaming stores, one output row
/// at a time: the strip's byte planes go to an L1-resident scratch first, then each code row
/// is written as one sequential run of whole cache lines.
///
/// # Safety
/// `c0 + width <= cols`, `width` a multiple of 64 and at most [`strip_width`]; `blk` and `dst`
/// hold one whole block; every `dst[i·cols + c0]` is 64-byte aligned; AVX2 must be available.
#[inline(always)]
unsafe fn strip<const B: usize>(
    blk: &[i32],
    dst: &mut [u8],
    cols: usize,
    c0: usize,
    width: usize,
    planes: &mut StripPlanes,
) {
    let (g, w) = shape(B);
    let chunks = width / 32;
    debug_assert!(4 * w * chunks <= planes.len() && width.is_multiple_of(TILE));
    for wi in 0..w {
        for j in 0..chunks {
            let at = wi * cols + c0 + 32 * j;
            debug_assert!(at + 32 <= blk.len());
            // SAFETY: `c0 + width <= cols`: the 32 words from `at` lie in word row `wi`.
            let four = unsafe { byte_planes(blk.as_ptr().add(at)) };
            for (k, &v) in four.iter().enumerate() {
                planes[(4 * wi + k) * chunks + j] = v;
            }
        }
    }
    let rows = 4 * g;
    // While the rows go out, prefetch the next strip's words (a strip's run of a word row is
    // 1–4 pages, where the hardware prefetcher stops): its lines spread over the rows.
    let lines = width * 4 / 64; // per word row
    let per_row = (w * lines).div_ceil(rows);
    let next = blk.as_ptr().wrapping_add(c0 + width);
    macro_rules! rows {
        ($($i:literal)*) => {$(
            if $i < rows {
                for l in $i * per_row..($i + 1) * per_row {
                    let (wi, line) = (l / lines, l % lines);
                    prefetch_row(next.wrapping_add(wi * cols + 16 * line).cast());
                }
                let row = $i * cols + c0;
                debug_assert!(row + width <= dst.len());
                for j in 0..chunks {
                    // SAFETY: AVX2 is available (caller).
                    let v = unsafe { code_row::<B>(|k| planes[k * chunks + j], $i) };
                    // SAFETY: the 32 bytes from `row + 32·j` lie in code row `i`, 32-byte
                    // aligned as streaming stores need (caller).
                    unsafe { _mm256_stream_si256(dst.as_mut_ptr().add(row + 32 * j).cast(), v) };
                }
            }
        )*};
    }
    rows!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31);
}

/// Unpacks whole blocks of `B`-bit words (`[k·W, cols]`) into codes (`[k·R, cols]`); with
/// `stream` (honoured only when `cols % 64 == 0`) the body of each row goes out through
/// non-temporal stores.
#[target_feature(enable = "avx2")]
pub(super) fn unpack<const B: usize>(packed: &[i32], cols: usize, out: &mut [u8], stream: bool) {
    let (g, w) = shape(B);
    let r = 4 * g;
    if cols < TILE {
        for (blk, dst) in packed
            .chunks_exact(w * cols)
            .zip(out.chunks_exact_mut(r * cols))
        {
            for c in 0..cols {
                unpack_column::<B>(blk, cols, c, dst);
            }
        }
        return;
    }
    let last = cols - TILE;
    // Rows share row 0's alignment, so one column offset aligns them all.
    let misalign = out.as_ptr() as usize % TILE;
    let head = (TILE - misalign) % TILE;
    let stream = stream && cols.is_multiple_of(TILE) && head <= last;
    let blocks = packed
        .chunks_exact(w * cols)
        .zip(out.chunks_exact_mut(r * cols));
    if stream {
        // The streamed body: whole 64-column tiles from `head`, where every row is aligned.
        let body = (cols - head) / TILE * TILE;
        let mut scratch: StripPlanes = [_mm256_setzero_si256(); SCRATCH / 32];
        for (blk, dst) in blocks {
            // SAFETY: the edge tiles start at 0 and `last = cols − 64`; the strips cover
            // `[head, head + body)`, `body` a multiple of 64, where every row of the block is
            // 64-byte aligned (`cols % 64 == 0`), each at most `strip_width(B)` wide.
            unsafe {
                if head > 0 {
                    tile::<B>(blk, dst, cols, 0);
                }
                let mut c0 = head;
                while c0 < head + body {
                    let width = strip_width(B).min(head + body - c0);
                    strip::<B>(blk, dst, cols, c0, width, &mut scratch);
                    c0 += width;
                }
                if c0 < cols {
                    tile::<B>(blk, dst, cols, last);
                }
            }
        }
        // Non-temporal stores are weakly ordered: make them visible before the caller (or the
        // Rayon join) reads the output.
        _mm_sfence();
    } else {
        for (blk, dst) in blocks {
            // SAFETY: every tile starts at most at `last = cols − 64`.
            unsafe {
                let mut c0 = 0;
                while c0 <= last {
                    tile::<B>(blk, dst, cols, c0);
                    c0 += TILE;
                }
                if c0 - TILE < last {
                    tile::<B>(blk, dst, cols, last);
                }
            }
        }
    }
}
