//! EXL2 and GPTQ-v1 bit packing, unpacking and dequantization.
//!
//! - [`bits`]: the LSB-first bitstream packing of integer codes along the input (K) dimension,
//!   shared by EXL2 `q_weight` and GPTQ `qweight`, plus packing along the output dimension.
//! - [`layout`]: [`GroupLayout`], the per-group bit widths and row counts of an EXL2 matrix.
//! - [`exl2`]: `q_weight`, `q_scale`, `q_scale_max`, `q_groups`, `q_invperm` and the dequantizer.
//! - [`gptq`]: GPTQ v1 `qweight`, `qzeros` (stored zero − 1), `scales`, `g_idx`.
//!
//! Matrices are row-major `[rows, cols]` with rows = input features (K) and cols = output
//! features (N), the orientation both formats store.
use thiserror::Error;

pub mod bits;
pub mod exl2;
pub mod gptq;
pub mod kernels;
pub mod layout;
#[cfg(target_arch = "x86_64")]
mod pack_avx2;
#[cfg(target_arch = "x86_64")]
mod unpack_avx2;

pub use bits::{
    pack_columns, pack_columns_into, pack_columns_to, pack_columns_with, packed_rows,
    rows_per_block, unpack_columns, unpack_columns_to, unpack_columns_with, unpacked_rows, Stores,
    EXL2_BITS, GPTQ_BITS, STREAM_MIN_BYTES,
};
pub use exl2::{Exl2Packed, Exl2Tensors, Exl2Unpacked};
pub use gptq::{g_idx as gptq_g_idx, GptqPacked, GptqTensors, GptqUnpacked};
pub use kernels::{Code, Isa};
pub use layout::{GroupLayout, LayoutGroup};

/// Everything that can be wrong with packing input. Messages name the tensor, the offending
/// value and what was expected.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum PackError {
    #[error("{format}: unsupported bit width {bits} (supported: {supported})")]
    UnsupportedBits {
        format: &'static str,
        bits: u32,
        supported: &'static str,
    },
    #[error("{tensor}: shape {got:?} does not match the expected {expected}")]
    Shape {
        tensor: &'static str,
        got: Vec<usize>,
        expected: String,
    },
    #[error("{tensor}[{row}, {col}] = {value} is out of range: expected {expected}")]
    OutOfRange {
        tensor: &'static str,
        row: usize,
        col: usize,
        value: i128,
        expected: String,
    },
    #[error("{tensor}[{index}] = {value} is invalid: expected {expected}")]
    InvalidValue {
        tensor: &'static str,
        index: usize,
        value: String,
        expected: String,
    },
    #[error("group layout: {0}")]
    Layout(String),
}

pub type Result<T, E = PackError> = std::result::Result<T, E>;

/// Checks that a flat buffer holds `shape` elements.
pub(crate) fn check_len(tensor: &'static str, len: usize, shape: &[usize]) -> Result<()> {
    let want: usize = shape.iter().product();
    if len == want {
        Ok(())
    } else {
        Err(PackError::Shape {
            tensor,
            got: vec![len],
            expected: format!("{shape:?} ({want} elements)"),
        })
    }
}

/// Checks that a permutation of `0..n` is one, returning its inverse.
pub(crate) fn invert_permutation(tensor: &'static str, perm: &[i64]) -> Result<Vec<u32>> {
    let n = perm.len();
    let mut inv = vec![u32::MAX; n];
    for (i, &p) in perm.iter().enumerate() {
        if p < 0 || p as u64 >= n as u64 {
            return Err(PackError::InvalidValue {
                tensor,
                index: i,
                value: p.to_string(),
                expected: format!("a row index in 0..{n}"),
            });
        }
        let slot = &mut inv[p as usize];
        if *slot != u32::MAX {
            return Err(PackError::InvalidValue {
                tensor,
                index: i,
                value: p.to_string(),
                expected: format!("a permutation of 0..{n}, but {p} also appears at index {slot}"),
            });
        }
        *slot = i as u32;
    }
    Ok(inv)
}
