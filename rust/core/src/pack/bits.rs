//! LSB-first bitstream packing of small integer codes into 32-bit words.
//!
//! Both EXL2 (`pack_columns_kernel` in exllamav2) and GPTQ v1 (`QuantLinear.pack`) lay a column
//! of codes out the same way: value `i` of a run of rows occupies bits `[i·b, i·b + b)` of a
//! little-endian bitstream made of consecutive words, so 3-, 5- and 6-bit values straddle word
//! boundaries. A *block* is the smallest run of rows that fills whole words: `32/gcd(b, 32)`
//! rows in `b/gcd(b, 32)` words (2b: 16 rows → 1 word, 3b: 32 → 3, 4b: 8 → 1, 5b: 32 → 5,
//! 6b: 16 → 3, 8b: 4 → 1).
//!
//! The kernels live in [`super::kernels`]; this module validates shapes, splits the work
//! over Rayon and turns a failed fused range check into an error naming the first bad code.
use rayon::prelude::*;

use super::kernels::{self, or_out_of_range, Code, Isa};
use super::{check_len, PackError, Result};

/// Widths EXL2 supports.
pub const EXL2_BITS: [u32; 6] = [2, 3, 4, 5, 6, 8];
/// Widths GPTQ v1 supports.
pub const GPTQ_BITS: [u32; 4] = [2, 3, 4, 8];

/// Outputs from this size on are written with non-temporal stores under [`Stores::Auto`]: far
/// larger than the per-core L2, so the lines would be evicted before anyone reads them, and
/// streaming saves the read-for-ownership of every destination line. (Small outputs that
/// are still cached from a previous use get slower: a streaming store must first evict the
/// cached line; unpacking 512 KiB in L2 streamed ran ~10× slower than cached.)
pub const STREAM_MIN_BYTES: usize = 16 << 20;

/// How the packer and the unpacker write their output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stores {
    /// Streaming for outputs of at least [`STREAM_MIN_BYTES`], through the cache below: for
    /// a destination that is already mapped (a reused buffer). Memory that has never been
    /// touched is faster with [`Stores::Cached`]: the page-fault handler has just zeroed each
    /// page through the cache (unpacking 8192² 2-bit codes into fresh huge pages: 18 ms
    /// cached against 21 ms streamed; into a reused buffer 8.4 ms against 6.5 ms). Packing
    /// into fresh huge pages measured the same either way (its output is the smaller side),
    /// into 4 KiB pages 10–30% faster cached, into reused memory up to 2× faster streamed.
    Auto,
    /// Ordinary stores, through the cache.
    Cached,
    /// Non-temporal stores where the kernel can use them (AVX2 and rows a multiple of 64
    /// columns for unpacking, AVX2 with u8/i8 codes and a multiple of 16 for packing;
    /// ordinary stores otherwise).
    Streaming,
}

impl Stores {
    fn stream(self, out_bytes: usize) -> bool {
        match self {
            Stores::Auto => out_bytes >= STREAM_MIN_BYTES,
            Stores::Cached => false,
            Stores::Streaming => true,
        }
    }
}

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

/// The error for the first code of `codes` (`[.., cols]`, row `row0` onwards) that is
/// negative or `>= 2^bits`, or `None` when every code fits.
pub(crate) fn first_bad_code<T: Code>(
    tensor: &'static str,
    codes: &[T],
    cols: usize,
    bits: u32,
    row0: usize,
) -> Option<PackError> {
    let max = (1i128 << bits) - 1;
    let pos = codes.iter().position(|c| !(0..=max).contains(&c.value()))?;
    Some(PackError::OutOfRange {
        tensor,
        row: row0 + pos / cols.max(1),
        col: pos % cols.max(1),
        value: codes[pos].value(),
        expected: format!("a {bits}-bit code in 0..={max}"),
    })
}

/// Packs `codes` (`[rows, cols]`, row-major, every value in `0..2^bits`) along the rows into
/// `[rows·bits/32, cols]` words. `rows` must be a multiple of [`rows_per_block`]. Any integer
/// type is read as is (no conversion pass); the range check is fused into the packer.
pub fn pack_columns<T: Code>(codes: &[T], rows: usize, cols: usize, bits: u32) -> Result<Vec<i32>> {
    let mut out = vec![0i32; packed_rows(rows, bits)? * cols];
    // A fresh allocation: its pages are first touched here (see `Stores::Auto`).
    pack_columns_with(
        Isa::detect(),
        Stores::Cached,
        codes,
        rows,
        cols,
        bits,
        &mut out,
    )?;
    Ok(out)
}

/// [`pack_columns`] into a caller-provided `out` of `[rows·bits/32, cols]` words (lets the
/// caller reuse buffers or hand in memory it allocated, e.g. a NumPy array). On an
/// out-of-range code `out` holds unspecified words. Large outputs are written with streaming
/// stores (see [`Stores::Auto`]).
pub fn pack_columns_to<T: Code>(
    codes: &[T],
    rows: usize,
    cols: usize,
    bits: u32,
    out: &mut [i32],
) -> Result<()> {
    pack_columns_with(Isa::detect(), Stores::Auto, codes, rows, cols, bits, out)
}

/// [`pack_columns_to`] with an explicit instruction set and store kind (tests and benchmarks
/// compare them). Fails if `isa` is not available on this CPU.
pub fn pack_columns_with<T: Code>(
    isa: Isa,
    stores: Stores,
    codes: &[T],
    rows: usize,
    cols: usize,
    bits: u32,
    out: &mut [i32],
) -> Result<()> {
    let qrows = packed_rows(rows, bits)?;
    check_isa(isa)?;
    check_len("codes", codes.len(), &[rows, cols])?;
    check_len("out", out.len(), &[qrows, cols])?;
    pack_checked(isa, stores, "codes", codes, cols, bits, out, 0)
}

/// The word rows `rows` rows of `bits`-bit codes pack to (`rows·bits/32`), after checking the
/// width and that `rows` is a whole number of blocks: lets a caller size (or check) an output
/// buffer before packing into it.
pub fn packed_rows(rows: usize, bits: u32) -> Result<usize> {
    check_bits("pack_columns", bits, &EXL2_BITS)?;
    check_block_rows("codes", rows, bits)?;
    Ok(rows * bits as usize / 32)
}

fn check_isa(isa: Isa) -> Result<()> {
    if isa.available() {
        Ok(())
    } else {
        Err(PackError::InvalidValue {
            tensor: "isa",
            index: 0,
            value: format!("{isa:?}"),
            expected: "an instruction set this CPU supports".into(),
        })
    }
}

/// Packs validated shapes, checking the code range on the fly; the error names the first
/// bad code (row offset by `row0`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn pack_checked<T: Code>(
    isa: Isa,
    stores: Stores,
    tensor: &'static str,
    codes: &[T],
    cols: usize,
    bits: u32,
    out: &mut [i32],
    row0: usize,
) -> Result<()> {
    let ored = pack_par(isa, stores, codes, cols, bits, out);
    if or_out_of_range(ored, bits) {
        Err(first_bad_code(tensor, codes, cols, bits, row0).expect("the OR saw a bad code"))
    } else {
        Ok(())
    }
}

/// Unpacks `[qrows, cols]` words of `bits`-bit codes into `[qrows·32/bits, cols]` codes.
/// `qrows` must be a multiple of [`words_per_block`].
pub fn unpack_columns(packed: &[i32], qrows: usize, cols: usize, bits: u32) -> Result<Vec<u8>> {
    let mut out = vec![0u8; unpacked_rows(qrows, cols, bits)? * cols];
    // A fresh allocation: its pages are first touched here (see `Stores::Auto`).
    unpack_columns_with(
        Isa::detect(),
        Stores::Cached,
        packed,
        qrows,
        cols,
        bits,
        &mut out,
    )?;
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
    unpack_columns_with(Isa::detect(), Stores::Auto, packed, qrows, cols, bits, out)
}

/// The code rows `[qrows, cols]` words of `bits`-bit codes unpack to (`qrows·32/bits`), after
/// checking the width and that `qrows` is a whole number of blocks: lets a caller size (or
/// check) an output buffer before unpacking into it.
pub fn unpacked_rows(qrows: usize, cols: usize, bits: u32) -> Result<usize> {
    check_bits("unpack_columns", bits, &EXL2_BITS)?;
    let wpb = words_per_block(bits);
    if !qrows.is_multiple_of(wpb) {
        return Err(PackError::Shape {
            tensor: "packed",
            got: vec![qrows, cols],
            expected: format!("a row count that is a multiple of {wpb} for {bits}-bit codes"),
        });
    }
    Ok(qrows * 32 / bits as usize)
}

/// [`unpack_columns_to`] with an explicit instruction set and store kind (tests and
/// benchmarks compare them). Fails if `isa` is not available on this CPU.
pub fn unpack_columns_with(
    isa: Isa,
    stores: Stores,
    packed: &[i32],
    qrows: usize,
    cols: usize,
    bits: u32,
    out: &mut [u8],
) -> Result<()> {
    let rows = unpacked_rows(qrows, cols, bits)?;
    check_isa(isa)?;
    check_len("packed", packed.len(), &[qrows, cols])?;
    check_len("out", out.len(), &[rows, cols])?;
    unpack_par(isa, stores, packed, cols, bits, out);
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

/// Packs codes already known to be in range into `out` (`[rows·bits/32, cols]`). Callers
/// guarantee the shapes and `bits` ∈ [`EXL2_BITS`]; out-of-range codes corrupt neighbours.
/// Callers pack into fresh allocations, hence ordinary stores (see [`Stores::Auto`]).
pub fn pack_columns_into(codes: &[u8], cols: usize, bits: u32, out: &mut [i32]) {
    pack_par(Isa::detect(), Stores::Cached, codes, cols, bits, out);
}

/// Unpacks validated words into `out` (`[qrows·32/bits, cols]`), in parallel over blocks.
/// Callers unpack into fresh allocations, hence ordinary stores (see [`Stores::Auto`]).
pub fn unpack_columns_into(packed: &[i32], cols: usize, bits: u32, out: &mut [u8]) {
    unpack_par(Isa::detect(), Stores::Cached, packed, cols, bits, out);
}

/// Blocks per Rayon task for `cols` columns.
fn blocks_per_task(bits: u32, cols: usize) -> usize {
    (MIN_TASK_WORDS / (words_per_block(bits) * cols)).max(1)
}

/// Parallel packing over whole blocks; returns the OR of every code.
fn pack_par<T: Code>(
    isa: Isa,
    stores: Stores,
    codes: &[T],
    cols: usize,
    bits: u32,
    out: &mut [i32],
) -> T {
    if cols == 0 || codes.is_empty() {
        return T::ZERO;
    }
    // Decided once for the whole output: a large matrix split into small tasks still streams.
    let stream = stores.stream(std::mem::size_of_val(out));
    let n = blocks_per_task(bits, cols);
    let (rpb, wpb) = (rows_per_block(bits), words_per_block(bits));
    codes
        .par_chunks(rpb * cols * n)
        .zip(out.par_chunks_mut(wpb * cols * n))
        .map(|(src, dst)| kernels::pack_seq(isa, bits, src, cols, dst, stream))
        .reduce(|| T::ZERO, T::or)
}

fn unpack_par(isa: Isa, stores: Stores, packed: &[i32], cols: usize, bits: u32, out: &mut [u8]) {
    if cols == 0 || packed.is_empty() {
        return;
    }
    // Decided once for the whole output: a large matrix split into small tasks still streams.
    let stream = stores.stream(out.len());
    let n = blocks_per_task(bits, cols);
    let (rpb, wpb) = (rows_per_block(bits), words_per_block(bits));
    packed
        .par_chunks(wpb * cols * n)
        .zip(out.par_chunks_mut(rpb * cols * n))
        .for_each(|(src, dst)| kernels::unpack_seq(isa, bits, src, cols, dst, stream));
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
