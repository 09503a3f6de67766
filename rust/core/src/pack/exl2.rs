//! EXL2 tensors of one linear layer (`AdaptiveGPTQ.pack` in exllamav2):
//!
//! | tensor        | dtype | shape                  | content                                   |
//! |---------------|-------|------------------------|-------------------------------------------|
//! | `q_weight`    | int32 | `[Σ rows_g·b_g/32, Np]` | codes packed along K per group's width    |
//! | `q_scale`     | int32 | `[G, Np/8]`            | 4-bit scales stored as value − 1, LSB first |
//! | `q_scale_max` | fp16  | `[G]`                  | per-group max scale                       |
//! | `q_groups`    | int16 | `[2G]`                 | (bits, first `q_weight` row) per group    |
//! | `q_invperm`   | int32 | `[K]`                  | `argsort(perm)`                           |
//!
//! `Np` is N padded to a multiple of 32; padded weight columns hold the zero code `2^(b−1)`.
//! Rows are stored in act-order: packed row `i` is input row `perm[i]`.
//! `w[perm[i], n] = (q[i, n] − 2^(b−1)) · (qs[g, n] + 1)² · q_scale_max[g] / 256` with `qs` the
//! stored scale. This crate keeps `q_scale_max` as f32; the export casts it to fp16.
use rayon::prelude::*;

use super::bits::{pack_checked, pack_row, unpack_columns_into, unpack_row, Stores};
use super::kernels::Isa;
use super::layout::GroupLayout;
use super::{check_len, invert_permutation, PackError, Result};

/// Column padding of every EXL2 tensor.
pub const COL_ALIGN: usize = 32;

/// Owned EXL2 tensors, as produced by [`Exl2Packed::pack`].
#[derive(Clone, Debug, PartialEq)]
pub struct Exl2Packed {
    /// Input rows K.
    pub rows: usize,
    /// Output columns N before padding.
    pub cols: usize,
    /// N padded to a multiple of 32: the column count of `q_weight`.
    pub cols_padded: usize,
    pub q_weight: Vec<i32>,
    pub q_scale: Vec<i32>,
    pub q_scale_max: Vec<f32>,
    pub q_groups: Vec<i16>,
    pub q_invperm: Vec<i32>,
}

/// Borrowed EXL2 tensors, as read from a file.
#[derive(Clone, Copy, Debug)]
pub struct Exl2Tensors<'a> {
    /// `[qrows, cols_padded]`.
    pub q_weight: &'a [i32],
    pub qrows: usize,
    pub cols_padded: usize,
    /// `[num_groups, cols_padded/8]`.
    pub q_scale: &'a [i32],
    pub q_scale_max: &'a [f32],
    pub q_groups: &'a [i16],
    pub q_invperm: &'a [i32],
}

/// The quantities the tensors encode, in storage (act-) order.
#[derive(Clone, Debug, PartialEq)]
pub struct Exl2Unpacked {
    pub layout: GroupLayout,
    /// Columns kept (N).
    pub cols: usize,
    /// `[K, cols]` codes, packed-row order.
    pub codes: Vec<u8>,
    /// `[num_groups, cols]` scales in 1..=16 (the stored value + 1).
    pub scales: Vec<u8>,
    pub scale_max: Vec<f32>,
    /// Packed row `i` is input row `perm[i]`.
    pub perm: Vec<u32>,
}

fn padded(cols: usize) -> usize {
    cols.div_ceil(COL_ALIGN) * COL_ALIGN
}

impl Exl2Packed {
    /// Packs one matrix.
    ///
    /// - `codes`: `[K, N]` row-major, rows in act-order, each `< 2^bits` of its group;
    /// - `scales`: `[num_groups, N]`, values in 1..=16;
    /// - `scale_max`: `[num_groups]`, finite and ≥ 0;
    /// - `perm`: packed row `i` is input row `perm[i]`; `None` means the identity.
    pub fn pack(
        layout: &GroupLayout,
        codes: &[u8],
        cols: usize,
        scales: &[u8],
        scale_max: &[f32],
        perm: Option<&[i64]>,
    ) -> Result<Self> {
        let (rows, g) = (layout.rows(), layout.num_groups());
        if cols == 0 {
            return Err(PackError::Shape {
                tensor: "codes",
                got: vec![rows, 0],
                expected: "at least one output column".into(),
            });
        }
        check_len("codes", codes.len(), &[rows, cols])?;
        check_len("q_scale", scales.len(), &[g, cols])?;
        check_len("q_scale_max", scale_max.len(), &[g])?;
        if let Some(pos) = scales.iter().position(|&s| !(1..=16).contains(&s)) {
            return Err(PackError::OutOfRange {
                tensor: "q_scale",
                row: pos / cols,
                col: pos % cols,
                value: i128::from(scales[pos]),
                expected: "a 4-bit scale in 1..=16 (stored as value − 1)".into(),
            });
        }
        if let Some(pos) = scale_max.iter().position(|s| !s.is_finite() || *s < 0.0) {
            return Err(PackError::InvalidValue {
                tensor: "q_scale_max",
                index: pos,
                value: scale_max[pos].to_string(),
                expected: "a finite, non-negative group max scale".into(),
            });
        }
        let q_invperm: Vec<i32> = match perm {
            Some(p) => {
                check_len("perm", p.len(), &[rows])?;
                invert_permutation("perm", p)?
                    .into_iter()
                    .map(|x| x as i32)
                    .collect()
            }
            None => (0..rows as i32).collect(),
        };
        let starts = layout.starts();
        let np = padded(cols);
        let mut q_weight = vec![0i32; layout.qrows() * np];
        // Group slices of the output are disjoint: pack them in parallel. Each checks its own
        // code range while packing; the first failing group (in row order) is reported.
        let mut outs: Vec<&mut [i32]> = Vec::with_capacity(g);
        let mut rest = q_weight.as_mut_slice();
        for grp in layout.groups() {
            let (head, tail) = rest.split_at_mut(grp.qrows() * np);
            outs.push(head);
            rest = tail;
        }
        let isa = Isa::detect();
        let results: Vec<Result<()>> = outs
            .into_par_iter()
            .zip(layout.groups().par_iter().zip(&starts))
            .map(|(out, (grp, &(r0, _)))| {
                let part = &codes[r0 * cols..(r0 + grp.rows) * cols];
                let bits = u32::from(grp.bits);
                if np == cols {
                    pack_checked(isa, Stores::Cached, "codes", part, cols, bits, out, r0)
                } else {
                    // Padded columns hold the zero code; the column index of a bad code is
                    // unchanged by the padding at the end of each row.
                    let zero = 1u8 << (grp.bits - 1);
                    let mut buf = vec![zero; grp.rows * np];
                    for (dst, src) in buf.chunks_exact_mut(np).zip(part.chunks_exact(cols)) {
                        dst[..cols].copy_from_slice(src);
                    }
                    pack_checked(isa, Stores::Cached, "codes", &buf, np, bits, out, r0)
                }
            })
            .collect();
        results.into_iter().collect::<Result<()>>()?;

        let mut q_scale = vec![0i32; g * np / 8];
        let mut stored = vec![0u8; np]; // padded columns store 0 (scale 1): their codes are zero
        for (out, src) in q_scale
            .chunks_exact_mut(np / 8)
            .zip(scales.chunks_exact(cols))
        {
            for (d, &s) in stored.iter_mut().zip(src) {
                *d = s - 1;
            }
            pack_row(&stored, 4, out);
        }

        Ok(Self {
            rows,
            cols,
            cols_padded: np,
            q_weight,
            q_scale,
            q_scale_max: scale_max.to_vec(),
            q_groups: layout.q_groups(),
            q_invperm,
        })
    }

    pub fn view(&self) -> Exl2Tensors<'_> {
        Exl2Tensors {
            q_weight: &self.q_weight,
            qrows: self.q_weight.len() / self.cols_padded.max(1),
            cols_padded: self.cols_padded,
            q_scale: &self.q_scale,
            q_scale_max: &self.q_scale_max,
            q_groups: &self.q_groups,
            q_invperm: &self.q_invperm,
        }
    }
}

impl Exl2Tensors<'_> {
    /// Validates shapes and the group table; returns the layout and the row permutation.
    pub fn validate(&self) -> Result<(GroupLayout, Vec<u32>)> {
        let np = self.cols_padded;
        if np == 0 || !np.is_multiple_of(COL_ALIGN) {
            return Err(PackError::Shape {
                tensor: "q_weight",
                got: vec![self.qrows, np],
                expected: "a column count that is a positive multiple of 32".into(),
            });
        }
        check_len("q_weight", self.q_weight.len(), &[self.qrows, np])?;
        let layout = GroupLayout::from_q_groups(self.q_groups, self.qrows)?;
        let g = layout.num_groups();
        check_len("q_scale", self.q_scale.len(), &[g, np / 8])?;
        check_len("q_scale_max", self.q_scale_max.len(), &[g])?;
        check_len("q_invperm", self.q_invperm.len(), &[layout.rows()])?;
        let inv: Vec<i64> = self.q_invperm.iter().map(|&x| i64::from(x)).collect();
        let perm = invert_permutation("q_invperm", &inv)?;
        Ok((layout, perm))
    }

    fn keep_cols(&self, cols: Option<usize>) -> Result<usize> {
        let np = self.cols_padded;
        match cols {
            None => Ok(np),
            Some(c) if c <= np && c + COL_ALIGN > np && c > 0 => Ok(c),
            Some(c) => Err(PackError::Shape {
                tensor: "q_weight",
                got: vec![self.qrows, np],
                expected: format!("{c} output columns padded to {}", padded(c)),
            }),
        }
    }

    /// Unpacks every tensor; `cols` trims the column padding (default: keep it).
    pub fn unpack(&self, cols: Option<usize>) -> Result<Exl2Unpacked> {
        let (layout, perm) = self.validate()?;
        let keep = self.keep_cols(cols)?;
        let np = self.cols_padded;
        let mut full = vec![0u8; layout.rows() * np];
        self.unpack_codes_into(&layout, &mut full);
        let codes = if keep == np {
            full
        } else {
            full.chunks_exact(np)
                .flat_map(|r| &r[..keep])
                .copied()
                .collect()
        };
        let mut scales = vec![0u8; layout.num_groups() * keep];
        let mut row = vec![0u8; np];
        for (dst, src) in scales
            .chunks_exact_mut(keep)
            .zip(self.q_scale.chunks_exact(np / 8))
        {
            unpack_row(src, 4, &mut row);
            for (d, &s) in dst.iter_mut().zip(&row) {
                *d = s + 1;
            }
        }
        Ok(Exl2Unpacked {
            layout,
            cols: keep,
            codes,
            scales,
            scale_max: self.q_scale_max.to_vec(),
            perm,
        })
    }

    fn unpack_codes_into(&self, layout: &GroupLayout, out: &mut [u8]) {
        let np = self.cols_padded;
        for (grp, (r0, q0)) in layout.groups().iter().zip(layout.starts()) {
            let src = &self.q_weight[q0 * np..(q0 + grp.qrows()) * np];
            let dst = &mut out[r0 * np..(r0 + grp.rows) * np];
            unpack_columns_into(src, np, u32::from(grp.bits), dst);
        }
    }

    /// Rebuilds the float matrix `[K, cols]` in the original input-row order.
    pub fn dequantize(&self, cols: Option<usize>) -> Result<Vec<f32>> {
        let keep = self.keep_cols(cols)?;
        let mut w = vec![0f32; self.q_invperm.len() * keep];
        self.dequantize_into(cols, &mut w)?;
        Ok(w)
    }

    /// [`Self::dequantize`] into a caller-provided `out` of `[K, cols]` (e.g. a NumPy array).
    pub fn dequantize_into(&self, cols: Option<usize>, out: &mut [f32]) -> Result<()> {
        let (layout, _) = self.validate()?;
        let keep = self.keep_cols(cols)?;
        check_len("out", out.len(), &[layout.rows(), keep])?;
        let np = self.cols_padded;
        let starts = layout.starts();

        // Per group: the column scales (qs+1)² and max/256. (q − z)·(qs+1)² is an exact small
        // integer in f32, so the one rounding is the multiply by max/256: bit-identical to
        // evaluating the formula left to right.
        let mut sq = vec![0f32; layout.num_groups() * keep];
        let mut qs = vec![0u8; np];
        for (g, dst) in sq.chunks_exact_mut(keep).enumerate() {
            unpack_row(&self.q_scale[g * np / 8..(g + 1) * np / 8], 4, &mut qs);
            for (d, &s) in dst.iter_mut().zip(&qs) {
                *d = f32::from(u16::from(s + 1) * u16::from(s + 1));
            }
        }
        let mut group_of = vec![0u32; layout.rows()];
        for (g, (grp, &(r0, _))) in layout.groups().iter().zip(&starts).enumerate() {
            group_of[r0..r0 + grp.rows].fill(g as u32);
        }

        // One pass over the output: input row k is storage row q_invperm[k], whose codes are
        // pulled straight out of q_weight with one shift pair for the whole row.
        out.par_chunks_exact_mut(keep)
            .zip(self.q_invperm.par_iter())
            .for_each(|(dst, &i)| {
                let i = i as usize;
                let g = group_of[i] as usize;
                let grp = layout.groups()[g];
                let (r0, q0) = starts[g];
                let b = usize::from(grp.bits);
                let bit = (i - r0) * b;
                let (word, shift) = (q0 + bit / 32, (bit % 32) as u32);
                let mask = (1u32 << b) - 1;
                let z = f32::from(1u8 << (b - 1));
                let m = self.q_scale_max[g] / 256.0;
                let scale = &sq[g * keep..(g + 1) * keep];
                let lo = &self.q_weight[word * np..word * np + keep];
                if shift as usize + b <= 32 {
                    for ((d, &x), &s) in dst.iter_mut().zip(lo).zip(scale) {
                        let q = ((x as u32) >> shift) & mask;
                        *d = (q as f32 - z) * s * m;
                    }
                } else {
                    let hi = &self.q_weight[(word + 1) * np..(word + 1) * np + keep];
                    for (((d, &x), &y), &s) in dst.iter_mut().zip(lo).zip(hi).zip(scale) {
                        let q = (((x as u32) >> shift) | ((y as u32) << (32 - shift))) & mask;
                        *d = (q as f32 - z) * s * m;
                    }
                }
            });
        Ok(())
    }
}
