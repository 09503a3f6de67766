//! LSB-first bitstream packing of small integer codes into 32-bit words.
//!
//! Both EXL2 (`pack_columns_kernel` in exllamav2) and GPTQ v1 (`QuantLinear.pack`) lay a column
//! of codes out the same way: value `i` of a run of rows occupies bits `[i·b, i·b + b)` of a
//! little-endian bitstream made of consecutive words, so 3-, 5- and 6-bit values straddle word
//! boundaries. A *block* is the smallest run of rows that fills whole words: `32/gcd(b, 32)`
//! rows in `b/gcd(b, 32)` words (2b: 16 rows → 1 word, 3b: 32 → 3, 4b: 8 → 1, 5b: 32 → 5,
//! 6b: 16 → 3, 8b: 4 → 1).
//!
//! The hot loops are monomorphised per width, so every shift is a constant: the packer
//! accumulates a block's words for a tile of columns in registers from contiguous code rows,
//! the unpacker writes one code row at a time as a branch-free `(lo >> s | hi << t) & mask`
//! over contiguous words; LLVM vectorises both across columns.
use rayon::prelude::*;

use super::{check_len, PackError, Result};

/// Widths EXL2 supports.
pub const EXL2_BITS: [u32; 6] = [2, 3, 4, 5, 6, 8];
/// Widths GPTQ v1 supports.
pub const GPTQ_BITS: [u32; 4] = [2, 3, 4, 8];

/// Minimum output words per Rayon task, so small matrices do not pay scheduling overhead.
const MIN_TASK_WORDS: usize = 1 << 16;

/// Rows in one block of `bits`-bit codes (the smallest run that fills whole words).
pub const fn rows_per_block(bits: u32) -> usize {
    (32 / gcd(bits, 32)) as usize
}

/// Words in one block of `bits`-bit codes.
pub const fn words_per_block(bits: u32) -> usize {
    (bits / gcd(bits, 32)) as usize
}

const fn gcd(mut a: u32, mut b: u32) -> u32 {
    while b != 0 {
        let t = a % b;
        a = b;
        b = t;
    }
    a
}

pub(crate) fn check_bits(format: &'static str, bits: u32, supported: &[u32]) -> Result<()> {
    if supported.contains(&bits) {
        Ok(())
    } else {
        Err(PackError::UnsupportedBits {
            format,
            bits,
            supported: if supported.len() == EXL2_BITS.len() {
                "2, 3, 4, 5, 6, 8"
            } else {
                "2, 3, 4, 8"
            },
        })
    }
}

/// Fails with the first code `>= 2^bits`; `row0` offsets the reported row.
pub(crate) fn check_codes(
    tensor: &'static str,
    codes: &[u8],
    cols: usize,
    bits: u32,
    row0: usize,
) -> Result<()> {
    let max = ((1u32 << bits) - 1) as u8;
    // Cheap vectorised reduction first; locate the culprit only on failure.
    let worst = codes
        .par_chunks(1 << 20)
        .map(|c| c.iter().copied().max().unwrap_or(0))
        .max();
    if worst.unwrap_or(0) <= max {
        return Ok(());
    }
    let pos = codes.iter().position(|&c| c > max).unwrap_or(0);
    Err(PackError::OutOfRange {
        tensor,
        row: row0 + pos / cols.max(1),
        col: pos % cols.max(1),
        value: i64::from(codes[pos]),
        expected: format!("a {bits}-bit code in 0..={max}"),
    })
}

/// Packs `codes` (`[rows, cols]`, row-major, every value `< 2^bits`) along the rows into
/// `[rows·bits/32, cols]` words. `rows` must be a multiple of [`rows_per_block`].
pub fn pack_columns(codes: &[u8], rows: usize, cols: usize, bits: u32) -> Result<Vec<i32>> {
    check_bits("pack_columns", bits, &EXL2_BITS)?;
    let mut out = vec![0i32; rows * bits as usize / 32 * cols];
    pack_columns_to(codes, rows, cols, bits, &mut out)?;
    Ok(out)
}

/// [`pack_columns`] into a caller-provided `out` of `[rows·bits/32, cols]` words (lets the
/// caller reuse buffers or hand in memory it allocated, e.g. a NumPy array).
pub fn pack_columns_to(
    codes: &[u8],
    rows: usize,
    cols: usize,
    bits: u32,
    out: &mut [i32],
) -> Result<()> {
    check_bits("pack_columns", bits, &EXL2_BITS)?;
    check_len("codes", codes.len(), &[rows, cols])?;
    check_block_rows("codes", rows, bits)?;
    check_len("out", out.len(), &[rows * bits as usize / 32, cols])?;
    check_codes("codes", codes, cols, bits, 0)?;
    pack_columns_into(codes, cols, bits, out);
    Ok(())
}

/// Unpacks `[qrows, cols]` words of `bits`-bit codes into `[qrows·32/bits, cols]` codes.
/// `qrows` must be a multiple of [`words_per_block`].
pub fn unpack_columns(packed: &[i32], qrows: usize, cols: usize, bits: u32) -> Result<Vec<u8>> {
    check_bits("unpack_columns", bits, &EXL2_BITS)?;
    let mut out = vec![0u8; qrows * 32 / bits as usize * cols];
    unpack_columns_to(packed, qrows, cols, bits, &mut out)?;
    Ok(out)
}

/// [`unpack_columns`] into a caller-provided `out` of `[qrows·32/bits, cols]` codes.
pub fn unpack_columns_to(
    packed: &[i32],
    qrows: usize,
    cols: usize,
    bits: u32,
    out: &mut [u8],
) -> Result<()> {
    check_bits("unpack_columns", bits, &EXL2_BITS)?;
    check_len("packed", packed.len(), &[qrows, cols])?;
    let wpb = words_per_block(bits);
    if !qrows.is_multiple_of(wpb) {
        return Err(PackError::Shape {
            tensor: "packed",
            got: vec![qrows, cols],
            expected: format!("a row count that is a multiple of {wpb} for {bits}-bit codes"),
        });
    }
    check_len("out", out.len(), &[qrows * 32 / bits as usize, cols])?;
    unpack_columns_into(packed, cols, bits, out);
    Ok(())
}

pub(crate) fn check_block_rows(tensor: &'static str, rows: usize, bits: u32) -> Result<()> {
    let rpb = rows_per_block(bits);
    if rows.is_multiple_of(rpb) {
        Ok(())
    } else {
        Err(PackError::Shape {
            tensor,
            got: vec![rows],
            expected: format!(
                "a row count that is a multiple of {rpb}: {bits}-bit codes pack {rpb} rows into {} \
                 words",
                words_per_block(bits)
            ),
        })
    }
}

/// Packs validated codes into `out` (`[rows·bits/32, cols]`), in parallel over whole blocks.
/// Callers guarantee the shapes, `bits` ∈ [`EXL2_BITS`] and the code range.
pub fn pack_columns_into(codes: &[u8], cols: usize, bits: u32, out: &mut [i32]) {
    if cols == 0 || codes.is_empty() {
        return;
    }
    let (rpb, wpb) = (rows_per_block(bits), words_per_block(bits));
    let blocks_per_task = (MIN_TASK_WORDS / (wpb * cols)).max(1);
    codes
        .par_chunks(rpb * cols * blocks_per_task)
        .zip(out.par_chunks_mut(wpb * cols * blocks_per_task))
        .for_each(|(src, dst)| match bits {
            2 => pack2_seq(src, cols, dst),
            3 => pack_seq::<3, 32, 3>(src, cols, dst),
            4 => pack4_seq(src, cols, dst),
            5 => pack_seq::<5, 32, 5>(src, cols, dst),
            6 => pack_seq::<6, 16, 3>(src, cols, dst),
            8 => pack8_seq(src, cols, dst),
            _ => unreachable!("bit width validated by the caller"),
        });
}

/// Unpacks validated words into `out` (`[qrows·32/bits, cols]`), in parallel over blocks.
pub fn unpack_columns_into(packed: &[i32], cols: usize, bits: u32, out: &mut [u8]) {
    if cols == 0 || packed.is_empty() {
        return;
    }
    let (rpb, wpb) = (rows_per_block(bits), words_per_block(bits));
    let blocks_per_task = (MIN_TASK_WORDS / (wpb * cols)).max(1);
    packed
        .par_chunks(wpb * cols * blocks_per_task)
        .zip(out.par_chunks_mut(rpb * cols * blocks_per_task))
        .for_each(|(src, dst)| match bits {
            2 => unpack_seq::<2>(src, cols, dst),
            3 => unpack_seq::<3>(src, cols, dst),
            4 => unpack_seq::<4>(src, cols, dst),
            5 => unpack_seq::<5>(src, cols, dst),
            6 => unpack_seq::<6>(src, cols, dst),
            8 => unpack_seq::<8>(src, cols, dst),
            _ => unreachable!("bit width validated by the caller"),
        });
}

/// Columns per register tile of the packer: `W × LANES` u32 accumulators stay in registers.
const LANES: usize = 16;

/// Sequential packing of whole blocks. `B` bits, `R` rows → `W` words per block, all const so
/// every shift folds: for each tile of `LANES` columns the block's words are accumulated in
/// registers from the `R` code rows (contiguous loads) and stored once.
/// 4-bit special case: eight rows make one word. Pairs of rows are first merged into bytes
/// (`lo | hi << 4`, sixteen lanes per SSE2 op), then four such bytes form the little-endian
/// word, which compiles to byte interleaves instead of widening every code to 32 bits.
fn pack4_seq(codes: &[u8], cols: usize, out: &mut [i32]) {
    for (blk_in, blk_out) in codes.chunks_exact(8 * cols).zip(out.chunks_exact_mut(cols)) {
        let r: Vec<&[u8]> = blk_in.chunks_exact(cols).collect();
        let (r0, r1, r2, r3, r4, r5, r6, r7) = (r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7]);
        for (c, o) in blk_out.iter_mut().enumerate() {
            let b0 = r0[c] | (r1[c] << 4);
            let b1 = r2[c] | (r3[c] << 4);
            let b2 = r4[c] | (r5[c] << 4);
            let b3 = r6[c] | (r7[c] << 4);
            *o = i32::from_le_bytes([b0, b1, b2, b3]);
        }
    }
}

/// 2-bit: sixteen rows make one word; four rows merge into each of its bytes first.
fn pack2_seq(codes: &[u8], cols: usize, out: &mut [i32]) {
    for (blk_in, blk_out) in codes
        .chunks_exact(16 * cols)
        .zip(out.chunks_exact_mut(cols))
    {
        // Slices of exactly `cols` bytes, so the loop below needs no bounds checks.
        let row = |k: usize| &blk_in[k * cols..(k + 1) * cols];
        let (a0, a1, a2, a3) = (row(0), row(1), row(2), row(3));
        let (b0, b1, b2, b3) = (row(4), row(5), row(6), row(7));
        let (c0, c1, c2, c3) = (row(8), row(9), row(10), row(11));
        let (d0, d1, d2, d3) = (row(12), row(13), row(14), row(15));
        let blk_out = &mut blk_out[..cols];
        for c in 0..cols {
            let a = a0[c] | (a1[c] << 2) | (a2[c] << 4) | (a3[c] << 6);
            let b = b0[c] | (b1[c] << 2) | (b2[c] << 4) | (b3[c] << 6);
            let cc = c0[c] | (c1[c] << 2) | (c2[c] << 4) | (c3[c] << 6);
            let d = d0[c] | (d1[c] << 2) | (d2[c] << 4) | (d3[c] << 6);
            blk_out[c] = i32::from_le_bytes([a, b, cc, d]);
        }
    }
}

/// 8-bit: four rows are the four bytes of one word.
fn pack8_seq(codes: &[u8], cols: usize, out: &mut [i32]) {
    for (blk_in, blk_out) in codes.chunks_exact(4 * cols).zip(out.chunks_exact_mut(cols)) {
        let (r0, rest) = blk_in.split_at(cols);
        let (r1, rest) = rest.split_at(cols);
        let (r2, r3) = rest.split_at(cols);
        for (c, o) in blk_out.iter_mut().enumerate() {
            *o = i32::from_le_bytes([r0[c], r1[c], r2[c], r3[c]]);
        }
    }
}

fn pack_seq<const B: usize, const R: usize, const W: usize>(
    codes: &[u8],
    cols: usize,
    out: &mut [i32],
) {
    for (blk_in, blk_out) in codes
        .chunks_exact(R * cols)
        .zip(out.chunks_exact_mut(W * cols))
    {
        let full = cols / LANES * LANES;
        for c0 in (0..full).step_by(LANES) {
            let mut acc = [[0u32; LANES]; W];
            for i in 0..R {
                let bit = i * B;
                let (word, shift) = (bit / 32, bit % 32);
                let src: &[u8; LANES] = blk_in[i * cols + c0..i * cols + c0 + LANES]
                    .try_into()
                    .expect("tile");
                for j in 0..LANES {
                    acc[word][j] |= u32::from(src[j]) << shift;
                    if shift + B > 32 {
                        // The value straddles into the next word: its high bits start that word.
                        acc[word + 1][j] |= u32::from(src[j]) >> (32 - shift);
                    }
                }
            }
            for (w, a) in acc.iter().enumerate() {
                let dst = &mut blk_out[w * cols + c0..w * cols + c0 + LANES];
                for (d, &x) in dst.iter_mut().zip(a) {
                    *d = x as i32;
                }
            }
        }
        for c in full..cols {
            let mut acc = [0u32; W];
            for i in 0..R {
                let bit = i * B;
                let (word, shift) = (bit / 32, bit % 32);
                let v = u32::from(blk_in[i * cols + c]);
                acc[word] |= v << shift;
                if shift + B > 32 {
                    acc[word + 1] |= v >> (32 - shift);
                }
            }
            for (w, &x) in acc.iter().enumerate() {
                blk_out[w * cols + c] = x as i32;
            }
        }
    }
}

fn unpack_seq<const B: usize>(packed: &[i32], cols: usize, out: &mut [u8]) {
    let rpb = rows_per_block(B as u32);
    let wpb = words_per_block(B as u32);
    let mask = (1u32 << B) - 1;
    for (blk_in, blk_out) in packed
        .chunks_exact(wpb * cols)
        .zip(out.chunks_exact_mut(rpb * cols))
    {
        for i in 0..rpb {
            let bit = i * B;
            let (word, shift) = (bit / 32, (bit % 32) as u32);
            let dst = &mut blk_out[i * cols..(i + 1) * cols];
            let lo = &blk_in[word * cols..(word + 1) * cols];
            if shift as usize + B <= 32 {
                for (d, &s) in dst.iter_mut().zip(lo) {
                    *d = (((s as u32) >> shift) & mask) as u8;
                }
            } else {
                let hi = &blk_in[(word + 1) * cols..(word + 2) * cols];
                for ((d, &s), &t) in dst.iter_mut().zip(lo).zip(hi) {
                    *d = ((((s as u32) >> shift) | ((t as u32) << (32 - shift))) & mask) as u8;
                }
            }
        }
    }
}

/// Packs a short row vector of codes along its own length (GPTQ `qzeros`, EXL2 `q_scale`):
/// `vals.len()` must be a multiple of the block. Not a hot path.
pub(crate) fn pack_row(vals: &[u8], bits: u32, out: &mut [i32]) {
    out.fill(0);
    for (i, &v) in vals.iter().enumerate() {
        let bit = i * bits as usize;
        let (word, shift) = (bit / 32, (bit % 32) as u32);
        out[word] |= ((v as u32) << shift) as i32;
        if shift + bits > 32 {
            out[word + 1] |= ((v as u32) >> (32 - shift)) as i32;
        }
    }
}

pub(crate) fn unpack_row(words: &[i32], bits: u32, out: &mut [u8]) {
    let mask = (1u64 << bits) - 1;
    for (i, o) in out.iter_mut().enumerate() {
        let bit = i * bits as usize;
        let (word, shift) = (bit / 32, bit % 32);
        let mut v = u64::from(words[word] as u32) >> shift;
        if shift + bits as usize > 32 {
            v |= u64::from(words[word + 1] as u32) << (32 - shift);
        }
        *o = (v & mask) as u8;
    }
}
