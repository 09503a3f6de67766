//! The column packing and unpacking kernels, one per width, compiled twice: once for the
//! baseline x86-64 / portable target (SSE2 on x86-64) and once with AVX2 enabled, picked at
//! run time. The wheel targets generic x86-64, so `-C target-cpu` is never needed.
//!
//! Every width works on the same shape of problem: a *block* of `R` rows fills `W` words and
//! splits into four *groups* of `R/4` rows that fill `W` bytes each (2 bits: 4 rows → 1 byte,
//! 3: 8 → 3, 4: 2 → 1, 5: 8 → 5, 6: 4 → 3, 8: 1 → 1). The packer works on tiles of
//! [`LANES`] columns: it merges each group's code rows into byte rows with constant 8-bit
//! shifts (32 lanes per AVX2 op, 16 per SSE2 op), then interleaves four byte rows into each
//! little-endian word row. The unpacker splits word rows into byte rows and extracts each code
//! row as `(lo >> s | hi << (8 − s)) & mask`, again on bytes. Columns past the last full tile
//! take a scalar path.
//!
//! The packer also ORs every input code into a per-lane accumulator: a code is out of range
//! iff it has a bit outside `2^bits − 1` (negative values have their sign bit set), so the
//! range check costs one OR per vector instead of a separate pass over the input.

/// Columns per tile: a cache line of u8 codes, so each output (unpack) or input (pack) line
/// is touched once; rows sit a multiple of 4 KiB apart and would evict half-used lines.
pub const LANES: usize = 64;

/// Byte rows of the largest block (5 bits: 20 bytes = 5 words).
const MAX_BYTES: usize = 20;

/// An integer type that codes can be packed from without converting the array first.
pub trait Code: Copy + Send + Sync + std::fmt::Debug + 'static {
    const ZERO: Self;
    /// The low 8 bits (the code itself when it is in range).
    fn low_byte(self) -> u8;
    fn or(self, other: Self) -> Self;
    /// The value, exactly, for range checks and error messages.
    fn value(self) -> i128;
    /// Runs `f` on the codes' bytes when `Self` is one byte wide (u8, i8) and returns its
    /// OR of those bytes as `Self`, or `None` for wider types. The byte kernels only move bit
    /// patterns, so one written for u8 serves i8 too, and i8's OR keeps the sign bit that
    /// marks a negative code.
    fn with_bytes(codes: &[Self], f: impl FnOnce(&[u8]) -> u8) -> Option<Self> {
        let _ = (codes, f);
        None
    }
}

macro_rules! impl_code {
    ($($t:ty $({ $($extra:item)* })?),* $(,)?) => {$(
        impl Code for $t {
            const ZERO: Self = 0;
            #[inline(always)]
            fn low_byte(self) -> u8 {
                self as u8
            }
            #[inline(always)]
            fn or(self, other: Self) -> Self {
                self | other
            }
            #[inline(always)]
            fn value(self) -> i128 {
                self as i128
            }
            $($($extra)*)?
        }
    )*};
}
impl_code!(
    u8 {
        fn with_bytes(codes: &[u8], f: impl FnOnce(&[u8]) -> u8) -> Option<u8> {
            Some(f(codes))
        }
    },
    i8 {
        fn with_bytes(codes: &[i8], f: impl FnOnce(&[u8]) -> u8) -> Option<i8> {
            // SAFETY: i8 and u8 have the same size and alignment and every bit pattern is a
            // valid u8; the view borrows `codes` for no longer than `codes` itself.
            let bytes = unsafe { std::slice::from_raw_parts(codes.as_ptr().cast::<u8>(), codes.len()) };
            Some(f(bytes) as i8)
        }
    },
    u16,
    i16,
    u32,
    i32,
    u64,
    i64,
);

/// Whether an OR of codes (see [`Code`]) has a bit outside `bits` bits, i.e. some code was
/// negative or `>= 2^bits`.
#[inline]
pub(crate) fn or_out_of_range<T: Code>(acc: T, bits: u32) -> bool {
    let v = acc.value();
    v < 0 || v >> bits != 0
}

/// Instruction sets the kernels are compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// The baseline target (SSE2 on x86-64): the fallback and the reference.
    Portable,
    /// x86-64 with AVX2, detected at run time.
    Avx2,
}

impl Isa {
    /// The best instruction set this CPU supports.
    pub fn detect() -> Self {
        if Isa::Avx2.available() {
            Isa::Avx2
        } else {
            Isa::Portable
        }
    }

    pub fn available(self) -> bool {
        match self {
            Isa::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => std::arch::is_x86_feature_detected!("avx2"),
            #[cfg(not(target_arch = "x86_64"))]
            Isa::Avx2 => false,
        }
    }
}

/// Rows per group and words (= bytes per group) for a width.
pub(super) const fn shape(bits: usize) -> (usize, usize) {
    match bits {
        2 => (4, 1),
        3 => (8, 3),
        4 => (2, 1),
        5 => (8, 5),
        6 => (4, 3),
        8 => (1, 1),
        _ => (0, 0),
    }
}

type Bytes = [u8; LANES];

/// How far ahead along a row the kernels prefetch, in elements. A 32-row block reads (pack)
/// or writes (unpack) 32 rows a multiple of 4 KiB apart at once, more streams than the
/// hardware prefetchers follow; an explicit hint per row keeps them in flight (worth 10–30%
/// for 3/4/6/8 bits in a same-process A/B on CPU time).
const PREFETCH: usize = 4 * LANES;

#[inline(always)]
fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetching is a hint that never faults, whatever the address; SSE is part of
    // the x86-64 baseline.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast::<i8>());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Packs whole blocks of `B`-bit codes (`[k·R, cols]`) into `out` (`[k·W, cols]`); returns the
/// OR of every code read.
#[inline(always)]
fn pack_blocks<T: Code, const B: usize>(codes: &[T], cols: usize, out: &mut [i32]) -> T {
    let (g, w) = shape(B);
    let r = 4 * g;
    let full = cols / LANES * LANES;
    let mut lanes = [T::ZERO; LANES];
    let mut tail = T::ZERO;
    for (blk, dst) in codes
        .chunks_exact(r * cols)
        .zip(out.chunks_exact_mut(w * cols))
    {
        for c0 in (0..full).step_by(LANES) {
            let mut bytes = [[0u8; LANES]; MAX_BYTES];
            for grp in 0..4 {
                for i in 0..g {
                    let row = grp * g + i;
                    prefetch(blk.as_ptr().wrapping_add(row * cols + c0 + PREFETCH));
                    let src: &[T; LANES] = blk[row * cols + c0..row * cols + c0 + LANES]
                        .try_into()
                        .expect("tile");
                    let mut v: Bytes = [0; LANES];
                    for j in 0..LANES {
                        v[j] = src[j].low_byte();
                        lanes[j] = lanes[j].or(src[j]);
                    }
                    let bit = i * B;
                    let (k, s) = (grp * w + bit / 8, (bit % 8) as u32);
                    for j in 0..LANES {
                        bytes[k][j] |= v[j] << s;
                    }
                    if s as usize + B > 8 {
                        // The code straddles a byte boundary: its high bits start the next byte.
                        for j in 0..LANES {
                            bytes[k + 1][j] |= v[j] >> (8 - s);
                        }
                    }
                }
            }
            for wi in 0..w {
                let d: &mut [i32; LANES] = (&mut dst[wi * cols + c0..wi * cols + c0 + LANES])
                    .try_into()
                    .expect("tile");
                let (b0, b1, b2, b3) = (
                    &bytes[4 * wi],
                    &bytes[4 * wi + 1],
                    &bytes[4 * wi + 2],
                    &bytes[4 * wi + 3],
                );
                for j in 0..LANES {
                    d[j] = i32::from_le_bytes([b0[j], b1[j], b2[j], b3[j]]);
                }
            }
        }
        for c in full..cols {
            tail = tail.or(pack_column::<T, B>(blk, cols, c, dst));
        }
    }
    lanes.iter().fold(tail, |a, &b| a.or(b))
}

/// Packs column `c` of one block (`blk`: `[R, cols]` codes, `dst`: `[W, cols]` words), one
/// code at a time: the path for columns outside whole tiles. Returns the OR of its codes.
#[inline(always)]
pub(super) fn pack_column<T: Code, const B: usize>(
    blk: &[T],
    cols: usize,
    c: usize,
    dst: &mut [i32],
) -> T {
    let (g, w) = shape(B);
    let mut ored = T::ZERO;
    let mut words = [0u32; 5];
    for i in 0..4 * g {
        let x = blk[i * cols + c];
        ored = ored.or(x);
        let bit = i * B;
        let v = u64::from(x.low_byte()) << (bit % 32);
        words[bit / 32] |= v as u32;
        if bit % 32 + B > 32 {
            words[bit / 32 + 1] |= (v >> 32) as u32;
        }
    }
    for (wi, &x) in words[..w].iter().enumerate() {
        dst[wi * cols + c] = x as i32;
    }
    ored
}

/// Unpacks whole blocks of `B`-bit words (`[k·W, cols]`) into codes (`[k·R, cols]`).
#[inline(always)]
fn unpack_blocks<const B: usize>(packed: &[i32], cols: usize, out: &mut [u8]) {
    let (g, w) = shape(B);
    let r = 4 * g;
    let mask = ((1u16 << B) - 1) as u8;
    let full = cols / LANES * LANES;
    for (blk, dst) in packed
        .chunks_exact(w * cols)
        .zip(out.chunks_exact_mut(r * cols))
    {
        for c0 in (0..full).step_by(LANES) {
            let mut bytes = [[0u8; LANES]; MAX_BYTES];
            for wi in 0..w {
                let src: &[i32; LANES] = blk[wi * cols + c0..wi * cols + c0 + LANES]
                    .try_into()
                    .expect("tile");
                for j in 0..LANES {
                    let x = src[j].to_le_bytes();
                    bytes[4 * wi][j] = x[0];
                    bytes[4 * wi + 1][j] = x[1];
                    bytes[4 * wi + 2][j] = x[2];
                    bytes[4 * wi + 3][j] = x[3];
                }
            }
            for grp in 0..4 {
                for i in 0..g {
                    let row = grp * g + i;
                    let bit = i * B;
                    let (k, s) = (grp * w + bit / 8, (bit % 8) as u32);
                    prefetch(dst.as_ptr().wrapping_add(row * cols + c0 + PREFETCH));
                    let d: &mut Bytes = (&mut dst[row * cols + c0..row * cols + c0 + LANES])
                        .try_into()
                        .expect("tile");
                    if s as usize + B > 8 {
                        let (lo, hi) = (&bytes[k], &bytes[k + 1]);
                        for j in 0..LANES {
                            d[j] = ((lo[j] >> s) | (hi[j] << (8 - s))) & mask;
                        }
                    } else {
                        let lo = &bytes[k];
                        for j in 0..LANES {
                            d[j] = (lo[j] >> s) & mask;
                        }
                    }
                }
            }
        }
        for c in full..cols {
            unpack_column::<B>(blk, cols, c, dst);
        }
    }
}

/// Unpacks column `c` of one block (`blk`: `[W, cols]` words, `dst`: `[R, cols]` codes), one
/// code at a time: the path for columns outside whole tiles.
#[inline(always)]
pub(super) fn unpack_column<const B: usize>(blk: &[i32], cols: usize, c: usize, dst: &mut [u8]) {
    let (g, w) = shape(B);
    let mask = ((1u16 << B) - 1) as u8;
    let mut words = [0u32; 6]; // one spare word: the straddling read needs no branch
    for (wi, x) in words[..w].iter_mut().enumerate() {
        *x = blk[wi * cols + c] as u32;
    }
    for i in 0..4 * g {
        let (wd, s) = (i * B / 32, i * B % 32);
        let pair = u64::from(words[wd]) | u64::from(words[wd + 1]) << 32;
        dst[i * cols + c] = (pair >> s) as u8 & mask;
    }
}

macro_rules! dispatch {
    ($isa:expr, $bits:expr, $portable:ident, $avx2:ident, [$($t:ty),*], ($($arg:expr),*)) => {
        match ($isa, $bits) {
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx2, 2) => unsafe { $avx2::<$($t,)* 2>($($arg),*) },
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx2, 3) => unsafe { $avx2::<$($t,)* 3>($($arg),*) },
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx2, 4) => unsafe { $avx2::<$($t,)* 4>($($arg),*) },
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx2, 5) => unsafe { $avx2::<$($t,)* 5>($($arg),*) },
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx2, 6) => unsafe { $avx2::<$($t,)* 6>($($arg),*) },
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx2, 8) => unsafe { $avx2::<$($t,)* 8>($($arg),*) },
            (_, 2) => $portable::<$($t,)* 2>($($arg),*),
            (_, 3) => $portable::<$($t,)* 3>($($arg),*),
            (_, 4) => $portable::<$($t,)* 4>($($arg),*),
            (_, 5) => $portable::<$($t,)* 5>($($arg),*),
            (_, 6) => $portable::<$($t,)* 6>($($arg),*),
            (_, 8) => $portable::<$($t,)* 8>($($arg),*),
            _ => unreachable!("bit width validated by the caller"),
        }
    };
}

fn pack_portable<T: Code, const B: usize>(codes: &[T], cols: usize, out: &mut [i32]) -> T {
    pack_blocks::<T, B>(codes, cols, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn pack_avx2<T: Code, const B: usize>(codes: &[T], cols: usize, out: &mut [i32]) -> T {
    pack_blocks::<T, B>(codes, cols, out)
}

fn unpack_portable<const B: usize>(packed: &[i32], cols: usize, out: &mut [u8]) {
    unpack_blocks::<B>(packed, cols, out)
}

/// Packs whole blocks sequentially with `isa`, returning the OR of all codes.
/// `isa` must be [`Isa::available`]; `bits` an EXL2 width; shapes whole blocks. One-byte codes
/// on AVX2 take the hand-written kernel (`pack_avx2`), which honours `stream` (non-temporal
/// stores) where the layout allows; the generic kernels always store through the cache.
pub(crate) fn pack_seq<T: Code>(
    isa: Isa,
    bits: u32,
    codes: &[T],
    cols: usize,
    out: &mut [i32],
    stream: bool,
) -> T {
    assert!(isa.available(), "{isa:?} is not available on this CPU");
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx2 {
        use super::pack_avx2::pack;
        let bytes = T::with_bytes(codes, |c| {
            // SAFETY: AVX2 availability is asserted above.
            unsafe {
                match bits {
                    2 => pack::<2>(c, cols, out, stream),
                    3 => pack::<3>(c, cols, out, stream),
                    4 => pack::<4>(c, cols, out, stream),
                    5 => pack::<5>(c, cols, out, stream),
                    6 => pack::<6>(c, cols, out, stream),
                    8 => pack::<8>(c, cols, out, stream),
                    _ => unreachable!("bit width validated by the caller"),
                }
            }
        });
        if let Some(ored) = bytes {
            return ored;
        }
    }
    let _ = stream;
    // SAFETY (AVX2 arms): availability is asserted above.
    dispatch!(isa, bits, pack_portable, pack_avx2, [T], (codes, cols, out))
}

/// Unpacks whole blocks sequentially with `isa` (see [`pack_seq`]). `stream` asks for
/// non-temporal stores; the AVX2 kernel honours it where the layout allows (see
/// `unpack_avx2`), the portable one always stores through the cache.
pub(crate) fn unpack_seq(
    isa: Isa,
    bits: u32,
    packed: &[i32],
    cols: usize,
    out: &mut [u8],
    stream: bool,
) {
    assert!(isa.available(), "{isa:?} is not available on this CPU");
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx2 {
        use super::unpack_avx2::unpack;
        // SAFETY: AVX2 availability is asserted above.
        unsafe {
            match bits {
                2 => unpack::<2>(packed, cols, out, stream),
                3 => unpack::<3>(packed, cols, out, stream),
                4 => unpack::<4>(packed, cols, out, stream),
                5 => unpack::<5>(packed, cols, out, stream),
                6 => unpack::<6>(packed, cols, out, stream),
                8 => unpack::<8>(packed, cols, out, stream),
                _ => unreachable!("bit width validated by the caller"),
            }
        }
        return;
    }
    let _ = stream;
    match bits {
        2 => unpack_portable::<2>(packed, cols, out),
        3 => unpack_portable::<3>(packed, cols, out),
        4 => unpack_portable::<4>(packed, cols, out),
        5 => unpack_portable::<5>(packed, cols, out),
        6 => unpack_portable::<6>(packed, cols, out),
        8 => unpack_portable::<8>(packed, cols, out),
        _ => unreachable!("bit width validated by the caller"),
    }
}
