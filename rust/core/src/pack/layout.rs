//! The row layout of an EXL2 matrix: consecutive groups of input rows (in act-order), each with
//! its own bit width, widths non-increasing (the kernel reads all 8-bit rows first, then 6-bit,
//! …, so `q_groups` must be sorted by descending width).
use super::bits::{check_bits, rows_per_block, EXL2_BITS};
use super::{PackError, Result};

/// One group: `rows` consecutive (permuted) input rows quantized at `bits` with one scale row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayoutGroup {
    pub bits: u8,
    pub rows: usize,
}

impl LayoutGroup {
    /// Packed `q_weight` rows this group occupies.
    pub fn qrows(&self) -> usize {
        self.rows * self.bits as usize / 32
    }
}

/// A validated list of groups; the input type of the EXL2 packer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupLayout {
    groups: Vec<LayoutGroup>,
}

impl GroupLayout {
    /// Builds a layout from `(bits, rows)` groups in storage order. Each width must be an EXL2
    /// width, non-increasing along the list, and each group must fill whole packed words.
    pub fn new(groups: impl IntoIterator<Item = (u8, usize)>) -> Result<Self> {
        let groups: Vec<LayoutGroup> = groups
            .into_iter()
            .map(|(bits, rows)| LayoutGroup { bits, rows })
            .collect();
        if groups.is_empty() {
            return Err(PackError::Layout(
                "no groups: a matrix needs at least one".into(),
            ));
        }
        let mut qrow = 0usize;
        for (g, grp) in groups.iter().enumerate() {
            check_bits("EXL2 group layout", u32::from(grp.bits), &EXL2_BITS)?;
            if g > 0 && grp.bits > groups[g - 1].bits {
                return Err(PackError::Layout(format!(
                    "group {g} has {} bits after a {}-bit group: widths must be non-increasing \
                     (the EXL2 kernel reads rows in descending width order)",
                    grp.bits,
                    groups[g - 1].bits
                )));
            }
            let rpb = rows_per_block(u32::from(grp.bits));
            if grp.rows == 0 || grp.rows % rpb != 0 {
                return Err(PackError::Layout(format!(
                    "group {g} ({} bits) has {} rows: expected a positive multiple of {rpb}, the \
                     rows that fill whole 32-bit words at that width",
                    grp.bits, grp.rows
                )));
            }
            if qrow > i16::MAX as usize {
                return Err(PackError::Layout(format!(
                    "group {g} starts at q_weight row {qrow}, which does not fit the int16 \
                     q_groups table (max {})",
                    i16::MAX
                )));
            }
            qrow += grp.qrows();
        }
        Ok(Self { groups })
    }

    /// The layout exllamav2 derives from a QParams (`qparams.py`, `total_bits`): width `b_i`
    /// gets `ceil(min(rows·p_i, remaining) / gs_i)` groups of `gs_i` rows, in list order, and
    /// the last group of the matrix is cut short at `rows`.
    pub fn from_qparams(
        rows: usize,
        bits: &[u8],
        bits_prop: &[f64],
        group_size: &[usize],
    ) -> Result<Self> {
        if bits.len() != bits_prop.len() || bits.len() != group_size.len() {
            return Err(PackError::Layout(format!(
                "bits ({}), bits_prop ({}) and group_size ({}) must have one entry per width",
                bits.len(),
                bits_prop.len(),
                group_size.len()
            )));
        }
        let mut groups = Vec::new();
        let mut remaining = rows;
        for ((&b, &p), &gs) in bits.iter().zip(bits_prop).zip(group_size) {
            if gs == 0 || !(0.0..=1.0).contains(&p) {
                return Err(PackError::Layout(format!(
                    "width {b}: group size {gs} and proportion {p} (expected a positive group \
                     size and a proportion in [0, 1])"
                )));
            }
            let want = (rows as f64 * p).min(remaining as f64);
            let n_groups = (want / gs as f64).ceil().max(0.0) as usize;
            for _ in 0..n_groups {
                if remaining == 0 {
                    break;
                }
                let r = gs.min(remaining);
                groups.push((b, r));
                remaining -= r;
            }
        }
        if remaining > 0 {
            return Err(PackError::Layout(format!(
                "proportions {bits_prop:?} cover only {} of {rows} rows",
                rows - remaining
            )));
        }
        Self::new(groups)
    }

    /// Rebuilds the layout from a `q_groups` table (pairs of bits and starting `q_weight` row)
    /// and the row count of `q_weight`.
    pub fn from_q_groups(q_groups: &[i16], qrows: usize) -> Result<Self> {
        if q_groups.is_empty() || !q_groups.len().is_multiple_of(2) {
            return Err(PackError::Shape {
                tensor: "q_groups",
                got: vec![q_groups.len()],
                expected: "[2·num_groups] (pairs of bits and start row), num_groups ≥ 1".into(),
            });
        }
        let n = q_groups.len() / 2;
        let mut groups = Vec::with_capacity(n);
        for g in 0..n {
            let bits = q_groups[2 * g];
            let start = q_groups[2 * g + 1];
            let end = if g + 1 < n {
                i64::from(q_groups[2 * g + 3])
            } else {
                qrows as i64
            };
            if g == 0 && start != 0 {
                return Err(PackError::InvalidValue {
                    tensor: "q_groups",
                    index: 1,
                    value: start.to_string(),
                    expected: "0: the first group starts at q_weight row 0".into(),
                });
            }
            if bits < 0 || !EXL2_BITS.contains(&(bits as u32)) {
                return Err(PackError::InvalidValue {
                    tensor: "q_groups",
                    index: 2 * g,
                    value: bits.to_string(),
                    expected: "a bit width in {2, 3, 4, 5, 6, 8}".into(),
                });
            }
            let span = end - i64::from(start);
            if span <= 0 || (span * 32) % i64::from(bits) != 0 {
                return Err(PackError::InvalidValue {
                    tensor: "q_groups",
                    index: 2 * g + 1,
                    value: start.to_string(),
                    expected: format!(
                        "a start row such that group {g} spans a positive number of {bits}-bit \
                         rows (next start / q_weight rows = {end})"
                    ),
                });
            }
            groups.push((bits as u8, (span * 32 / i64::from(bits)) as usize));
        }
        Self::new(groups)
    }

    pub fn groups(&self) -> &[LayoutGroup] {
        &self.groups
    }

    pub fn num_groups(&self) -> usize {
        self.groups.len()
    }

    /// Input rows (K).
    pub fn rows(&self) -> usize {
        self.groups.iter().map(|g| g.rows).sum()
    }

    /// Rows of the packed `q_weight`.
    pub fn qrows(&self) -> usize {
        self.groups.iter().map(LayoutGroup::qrows).sum()
    }

    /// The `q_groups` table: per group, its width and its first `q_weight` row.
    pub fn q_groups(&self) -> Vec<i16> {
        let mut out = Vec::with_capacity(2 * self.groups.len());
        let mut qrow = 0usize;
        for g in &self.groups {
            out.push(i16::from(g.bits));
            out.push(qrow as i16); // fits: checked in `new`
            qrow += g.qrows();
        }
        out
    }

    /// Per group: (first input row, first `q_weight` row).
    pub fn starts(&self) -> Vec<(usize, usize)> {
        let (mut row, mut qrow) = (0, 0);
        self.groups
            .iter()
            .map(|g| {
                let s = (row, qrow);
                row += g.rows;
                qrow += g.qrows();
                s
            })
            .collect()
    }
}
