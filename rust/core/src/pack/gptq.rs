//! GPTQ v1 tensors (`checkpoint_format: "gptq"`, AutoGPTQ / GPTQModel v1):
//!
//! | tensor    | dtype | shape              | content                                        |
//! |-----------|-------|--------------------|------------------------------------------------|
//! | `qweight` | int32 | `[K·b/32, N]`      | codes packed along K, LSB first, 3-bit straddling |
//! | `qzeros`  | int32 | `[G, N·b/32]`      | zero points stored as zero − 1, packed along N |
//! | `scales`  | fp16  | `[G, N]`           | per group and column                            |
//! | `g_idx`   | int32 | `[K]`              | group of each input row (permuted by act-order) |
//!
//! Rows stay in their original order (act-order lives in `g_idx`), so
//! `W[k, n] = scales[g_idx[k], n] · (q[k, n] − (qzeros[g_idx[k], n] + 1))`.
//! The v1 "− 1" cannot hold a zero point of 0 (it would wrap and corrupt the neighbouring
//! fields in other tools' packers), so true zeros must lie in `1..=2^b`.
use rayon::prelude::*;

use super::bits::{
    check_bits, check_block_rows, pack_checked, pack_row, rows_per_block, unpack_columns_into,
    unpack_row, Stores, GPTQ_BITS,
};
use super::kernels::Isa;
use super::{check_len, invert_permutation, PackError, Result};

/// Owned GPTQ v1 tensors.
#[derive(Clone, Debug, PartialEq)]
pub struct GptqPacked {
    pub bits: u32,
    pub rows: usize,
    pub cols: usize,
    pub qweight: Vec<i32>,
    pub qzeros: Vec<i32>,
    pub scales: Vec<f32>,
    pub g_idx: Vec<i32>,
}

/// Borrowed GPTQ v1 tensors; K comes from `g_idx`, N and G from `scales`.
#[derive(Clone, Copy, Debug)]
pub struct GptqTensors<'a> {
    pub bits: u32,
    pub qweight: &'a [i32],
    pub qzeros: &'a [i32],
    /// `[groups, cols]`.
    pub scales: &'a [f32],
    pub groups: usize,
    pub cols: usize,
    pub g_idx: &'a [i32],
}

/// The quantities GPTQ tensors encode.
#[derive(Clone, Debug, PartialEq)]
pub struct GptqUnpacked {
    /// `[K, N]`, original row order.
    pub codes: Vec<u8>,
    /// `[G, N]` true zero points (stored + 1, so up to 256 at 8 bits).
    pub zeros: Vec<u16>,
    pub scales: Vec<f32>,
    pub g_idx: Vec<i32>,
}

/// `g_idx` for `rows` inputs: with act-order `perm` (quantization position `i` is input row
/// `perm[i]`) row `perm[i]` belongs to group `i / group_size`; `None` = one group.
pub fn g_idx(rows: usize, group_size: Option<usize>, perm: Option<&[i64]>) -> Result<Vec<i32>> {
    let gs = match group_size {
        Some(0) => {
            return Err(PackError::InvalidValue {
                tensor: "group_size",
                index: 0,
                value: "0".into(),
                expected: "a positive group size, or none for one group".into(),
            })
        }
        Some(g) => g,
        None => rows.max(1),
    };
    let mut out = vec![0i32; rows];
    match perm {
        None => out
            .iter_mut()
            .enumerate()
            .for_each(|(k, g)| *g = (k / gs) as i32),
        Some(p) => {
            check_len("perm", p.len(), &[rows])?;
            invert_permutation("perm", p)?;
            for (i, &k) in p.iter().enumerate() {
                out[k as usize] = (i / gs) as i32;
            }
        }
    }
    Ok(out)
}

fn check_shapes(bits: u32, rows: usize, cols: usize) -> Result<()> {
    check_bits("GPTQ v1", bits, &GPTQ_BITS)?;
    check_block_rows("qweight", rows, bits)?;
    let rpb = rows_per_block(bits);
    if cols == 0 || !cols.is_multiple_of(rpb) {
        return Err(PackError::Shape {
            tensor: "qzeros",
            got: vec![cols],
            expected: format!(
                "an output column count that is a positive multiple of {rpb}: {bits}-bit zero \
                 points pack {rpb} columns per block"
            ),
        });
    }
    Ok(())
}

fn check_g_idx(g_idx: &[i32], groups: usize) -> Result<()> {
    match g_idx.iter().position(|&g| g < 0 || g as usize >= groups) {
        None => Ok(()),
        Some(k) => Err(PackError::InvalidValue {
            tensor: "g_idx",
            index: k,
            value: g_idx[k].to_string(),
            expected: format!("a group index in 0..{groups}"),
        }),
    }
}

impl GptqPacked {
    /// Packs one matrix: `codes` `[K, N]` (`< 2^bits`), `zeros` `[G, N]` true zero points in
    /// `1..=2^bits`, `scales` `[G, N]` finite, `g_idx` `[K]` in `0..G`.
    pub fn pack(
        bits: u32,
        codes: &[u8],
        rows: usize,
        cols: usize,
        zeros: &[u16],
        scales: &[f32],
        g_idx: &[i32],
    ) -> Result<Self> {
        check_shapes(bits, rows, cols)?;
        check_len("codes", codes.len(), &[rows, cols])?;
        check_len("g_idx", g_idx.len(), &[rows])?;
        let groups = zeros.len() / cols;
        if groups == 0 {
            return Err(PackError::Shape {
                tensor: "qzeros",
                got: vec![zeros.len()],
                expected: format!("[groups ≥ 1, {cols}]"),
            });
        }
        check_len("qzeros", zeros.len(), &[groups, cols])?;
        check_len("scales", scales.len(), &[groups, cols])?;
        check_g_idx(g_idx, groups)?;
        let mut qweight = vec![0i32; rows * bits as usize / 32 * cols];
        pack_checked(
            Isa::detect(),
            Stores::Cached,
            "codes",
            codes,
            cols,
            bits,
            &mut qweight,
            0,
        )?;
        let top = 1u16 << bits;
        if let Some(p) = zeros.iter().position(|&z| z == 0 || z > top) {
            return Err(PackError::OutOfRange {
                tensor: "qzeros",
                row: p / cols,
                col: p % cols,
                value: i128::from(zeros[p]),
                expected: format!(
                    "a zero point in 1..={top}: GPTQ v1 stores zero − 1 in {bits} bits"
                ),
            });
        }
        if let Some(p) = scales.iter().position(|s| !s.is_finite()) {
            return Err(PackError::InvalidValue {
                tensor: "scales",
                index: p,
                value: scales[p].to_string(),
                expected: "a finite scale".into(),
            });
        }
        let zw = cols * bits as usize / 32;
        let mut qzeros = vec![0i32; groups * zw];
        let mut stored = vec![0u8; cols];
        for (out, src) in qzeros.chunks_exact_mut(zw).zip(zeros.chunks_exact(cols)) {
            for (d, &z) in stored.iter_mut().zip(src) {
                *d = (z - 1) as u8; // < 2^bits ≤ 256: checked above
            }
            pack_row(&stored, bits, out);
        }
        Ok(Self {
            bits,
            rows,
            cols,
            qweight,
            qzeros,
            scales: scales.to_vec(),
            g_idx: g_idx.to_vec(),
        })
    }

    pub fn view(&self) -> GptqTensors<'_> {
        GptqTensors {
            bits: self.bits,
            qweight: &self.qweight,
            qzeros: &self.qzeros,
            scales: &self.scales,
            groups: self.scales.len() / self.cols.max(1),
            cols: self.cols,
            g_idx: &self.g_idx,
        }
    }
}

impl GptqTensors<'_> {
    pub fn validate(&self) -> Result<()> {
        let rows = self.g_idx.len();
        check_shapes(self.bits, rows, self.cols)?;
        if self.groups == 0 {
            return Err(PackError::Shape {
                tensor: "scales",
                got: vec![0, self.cols],
                expected: "at least one group".into(),
            });
        }
        let b = self.bits as usize;
        check_len("qweight", self.qweight.len(), &[rows * b / 32, self.cols])?;
        check_len(
            "qzeros",
            self.qzeros.len(),
            &[self.groups, self.cols * b / 32],
        )?;
        check_len("scales", self.scales.len(), &[self.groups, self.cols])?;
        check_g_idx(self.g_idx, self.groups)
    }

    fn codes(&self) -> Vec<u8> {
        let mut codes = vec![0u8; self.g_idx.len() * self.cols];
        unpack_columns_into(self.qweight, self.cols, self.bits, &mut codes);
        codes
    }

    /// True zero points `[G, N]` (stored + 1).
    fn zeros(&self) -> Vec<u16> {
        let zw = self.cols * self.bits as usize / 32;
        let mut stored = vec![0u8; self.cols];
        let mut zeros = Vec::with_capacity(self.groups * self.cols);
        for src in self.qzeros.chunks_exact(zw) {
            unpack_row(src, self.bits, &mut stored);
            zeros.extend(stored.iter().map(|&z| u16::from(z) + 1));
        }
        zeros
    }

    pub fn unpack(&self) -> Result<GptqUnpacked> {
        self.validate()?;
        Ok(GptqUnpacked {
            codes: self.codes(),
            zeros: self.zeros(),
            scales: self.scales.to_vec(),
            g_idx: self.g_idx.to_vec(),
        })
    }

    /// `[K, N]` float weights in the original row order.
    pub fn dequantize(&self) -> Result<Vec<f32>> {
        let mut w = vec![0f32; self.g_idx.len() * self.cols];
        self.dequantize_into(&mut w)?;
        Ok(w)
    }

    /// [`Self::dequantize`] into a caller-provided `out` of `[K, N]` (e.g. a NumPy array).
    /// Each row's codes are shifted straight out of `qweight`: no unpacked code matrix.
    pub fn dequantize_into(&self, out: &mut [f32]) -> Result<()> {
        self.validate()?;
        let n = self.cols;
        check_len("out", out.len(), &[self.g_idx.len(), n])?;
        let zeros: Vec<f32> = self.zeros().into_iter().map(f32::from).collect();
        let b = self.bits as usize;
        let mask = (1u32 << b) - 1;
        out.par_chunks_exact_mut(n)
            .zip(self.g_idx.par_iter())
            .enumerate()
            .for_each(|(k, (dst, &g))| {
                let g = g as usize;
                let (z, s) = (&zeros[g * n..(g + 1) * n], &self.scales[g * n..(g + 1) * n]);
                let (word, shift) = ((k * b) / 32, ((k * b) % 32) as u32);
                let lo = &self.qweight[word * n..(word + 1) * n];
                if shift as usize + b <= 32 {
                    for (((d, &x), &z), &s) in dst.iter_mut().zip(lo).zip(z).zip(s) {
                        let q = ((x as u32) >> shift) & mask;
                        *d = s * (q as f32 - z);
                    }
                } else {
                    // A 3-bit code straddling two words.
                    let hi = &self.qweight[(word + 1) * n..(word + 2) * n];
                    for ((((d, &x), &y), &z), &s) in dst.iter_mut().zip(lo).zip(hi).zip(z).zip(s) {
                        let q = (((x as u32) >> shift) | ((y as u32) << (32 - shift))) & mask;
                        *d = s * (q as f32 - z);
                    }
                }
            });
        Ok(())
    }
}
