//! Bindings of `exl2rs_core::pack`: NumPy in, NumPy out. Integer code arrays of any integer
//! dtype are accepted (range-checked while narrowing to u8); word tensors are int32, float
//! tensors float32. Non-contiguous arrays are copied. The GIL is released around the packing
//! work, which runs on Rayon.
use std::borrow::Cow;

use exl2rs_core::pack::{
    self as core, Exl2Packed, Exl2Tensors, GptqPacked, GptqTensors, GroupLayout, Isa, Stores,
};
use numpy::ndarray::{Array1, Array2, Dimension};
use numpy::{
    BorrowError, Element, IntoPyArray, PyArray1, PyArray2, PyArrayDescrMethods, PyArrayMethods,
    PyReadonlyArray, PyReadonlyArray1, PyReadonlyArray2, PyReadwriteArray2, PyUntypedArray,
    PyUntypedArrayMethods,
};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::buffers::fresh_array2;
use crate::errors::{to_py, PackError};

/// The elements in C order, borrowed when the array is C-contiguous. (`as_slice` also accepts
/// Fortran-ordered arrays, whose memory order is not the logical order.)
fn elems<'a, T: Element + Copy, D: Dimension>(a: &'a PyReadonlyArray<'_, T, D>) -> Cow<'a, [T]> {
    match a.as_slice() {
        Ok(s) if a.is_c_contiguous() => Cow::Borrowed(s),
        _ => Cow::Owned(a.as_array().iter().copied().collect()),
    }
}

/// Formats an out-of-range element of `tensor` with its (row, column) position.
fn range_error(tensor: &str, shape: &[usize], (i, value): (usize, i128), expected: &str) -> PyErr {
    let at = match shape {
        [_, cols] if *cols > 0 => format!("{}, {}", i / cols, i % cols),
        _ => i.to_string(),
    };
    PackError::new_err(format!(
        "{tensor}[{at}] = {value} is out of range: expected {expected}"
    ))
}

/// An integer array of any common integer dtype, per dimensionality (the derive cannot be
/// generic over the dimension).
macro_rules! int_array {
    ($name:ident, $dim:ty) => {
        #[derive(FromPyObject)]
        pub enum $name<'py> {
            U8(PyReadonlyArray<'py, u8, $dim>),
            I8(PyReadonlyArray<'py, i8, $dim>),
            I16(PyReadonlyArray<'py, i16, $dim>),
            U16(PyReadonlyArray<'py, u16, $dim>),
            I32(PyReadonlyArray<'py, i32, $dim>),
            U32(PyReadonlyArray<'py, u32, $dim>),
            I64(PyReadonlyArray<'py, i64, $dim>),
            U64(PyReadonlyArray<'py, u64, $dim>),
        }

        impl $name<'_> {
            fn shape(&self) -> Vec<usize> {
                match self {
                    Self::U8(a) => a.shape().to_vec(),
                    Self::I8(a) => a.shape().to_vec(),
                    Self::I16(a) => a.shape().to_vec(),
                    Self::U16(a) => a.shape().to_vec(),
                    Self::I32(a) => a.shape().to_vec(),
                    Self::U32(a) => a.shape().to_vec(),
                    Self::I64(a) => a.shape().to_vec(),
                    Self::U64(a) => a.shape().to_vec(),
                }
            }

            /// Narrows to `T`, failing on the first value outside `lo..=hi` with its position.
            fn narrow<T: TryFrom<i128>>(
                &self,
                tensor: &'static str,
                lo: i128,
                hi: i128,
                expected: &str,
            ) -> PyResult<Vec<T>> {
                let res = match self {
                    Self::U8(a) => narrow_slice(&elems(a), lo, hi),
                    Self::I8(a) => narrow_slice(&elems(a), lo, hi),
                    Self::I16(a) => narrow_slice(&elems(a), lo, hi),
                    Self::U16(a) => narrow_slice(&elems(a), lo, hi),
                    Self::I32(a) => narrow_slice(&elems(a), lo, hi),
                    Self::U32(a) => narrow_slice(&elems(a), lo, hi),
                    Self::I64(a) => narrow_slice(&elems(a), lo, hi),
                    Self::U64(a) => narrow_slice(&elems(a), lo, hi),
                };
                res.map_err(|e| range_error(tensor, &self.shape(), e, expected))
            }
        }
    };
}

int_array!(IntArray1, numpy::Ix1);
int_array!(IntArray2, numpy::Ix2);

/// Converts every element, or returns the first (index, value) outside `lo..=hi`.
fn narrow_slice<S: Copy + Into<i128>, T: TryFrom<i128>>(
    v: &[S],
    lo: i128,
    hi: i128,
) -> Result<Vec<T>, (usize, i128)> {
    v.iter()
        .enumerate()
        .map(|(i, &x)| {
            let x: i128 = x.into();
            if (lo..=hi).contains(&x) {
                T::try_from(x).map_err(|_| (i, x))
            } else {
                Err((i, x))
            }
        })
        .collect()
}

/// Fast path for the common case: a contiguous uint8 code array is borrowed as is; the core
/// checks the per-width range.
fn codes_u8<'a>(a: &'a IntArray2<'_>, tensor: &'static str) -> PyResult<Cow<'a, [u8]>> {
    match a {
        IntArray2::U8(x) => Ok(elems(x)),
        other => Ok(Cow::Owned(other.narrow(
            tensor,
            0,
            255,
            "an integer code in 0..=255",
        )?)),
    }
}

fn dims2(a: &IntArray2<'_>) -> (usize, usize) {
    let s = a.shape();
    (s[0], s[1])
}

fn array2<T: Element>(
    py: Python<'_>,
    v: Vec<T>,
    rows: usize,
    cols: usize,
) -> Bound<'_, PyArray2<T>> {
    Array2::from_shape_vec((rows, cols), v)
        .expect("shape checked by the core")
        .into_pyarray(py)
}

fn array1<T: Element>(py: Python<'_>, v: Vec<T>) -> Bound<'_, PyArray1<T>> {
    Array1::from_vec(v).into_pyarray(py)
}

/// Packs `[rows, cols]` codes along the rows into `[rows·bits/32, cols]` int32 words, into
/// `out` when given (checked, filled in place and returned) or a fresh NumPy array. Codes of
/// any integer dtype are read in place (no conversion pass; non-contiguous arrays are copied
/// once) and range-checked inside the packer. A large fresh output lives in a recycled buffer
/// (`crate::buffers`: no first-touch page faults when a result of the same size was dropped
/// before) and is written directly by the kernel with the GIL released. Large outputs, fresh
/// or `out`, get streaming stores (see `exl2rs_core::pack::Stores::Auto`).
#[pyfunction]
#[pyo3(signature = (codes, bits, out=None))]
fn pack_columns<'py>(
    py: Python<'py>,
    codes: IntArray2<'py>,
    bits: u32,
    out: Option<Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyArray2<i32>>> {
    let (rows, cols) = dims2(&codes);
    // The width and the row count are checked before `out`, so the message names the cause.
    let qrows = core::packed_rows(rows, bits).map_err(to_py)?;
    let out = match out {
        Some(o) => out_array::<i32>(&o, [qrows, cols])?,
        None => fresh_array2::<i32>(py, [qrows, cols])?.0,
    };
    {
        let mut rw = borrow_out(&out, "codes")?;
        let dst = rw
            .as_slice_mut()
            .expect("a C-contiguous array is one slice");
        // Unlike unpacking, packing streams into fresh arrays too (`pack_columns_to` has the
        // default stores). Measured on 8192² codes, one thread: NumPy's 16–32 MiB arrays (2/3
        // bits) reuse heap memory, where streaming took half the time of cached stores; larger
        // ones are fresh huge pages, where both took the same.
        macro_rules! pack {
            ($a:expr) => {{
                let c = elems($a);
                py.detach(|| core::pack_columns_to(&c, rows, cols, bits, dst))
            }};
        }
        let res = match &codes {
            IntArray2::U8(a) => pack!(a),
            IntArray2::I8(a) => pack!(a),
            IntArray2::I16(a) => pack!(a),
            IntArray2::U16(a) => pack!(a),
            IntArray2::I32(a) => pack!(a),
            IntArray2::U32(a) => pack!(a),
            IntArray2::I64(a) => pack!(a),
            IntArray2::U64(a) => pack!(a),
        };
        res.map_err(to_py)?;
    }
    Ok(out)
}

/// Checks a caller's `out=` array: exactly `[rows, cols]` of `T`'s dtype, C-contiguous.
/// (Writeable and not overlapping an input is checked when it is borrowed for writing.)
fn out_array<'py, T: Element>(
    out: &Bound<'py, PyAny>,
    shape: [usize; 2],
) -> PyResult<Bound<'py, PyArray2<T>>> {
    let dtype = numpy::dtype::<T>(out.py());
    let want = format!(
        "a C-contiguous, writeable {dtype} array of shape [{}, {}]",
        shape[0], shape[1]
    );
    let Ok(arr) = out.cast::<PyUntypedArray>() else {
        return Err(PackError::new_err(format!(
            "out: expected {want}, got {}",
            out.get_type().name()?
        )));
    };
    if !arr.dtype().is_equiv_to(&dtype) {
        return Err(PackError::new_err(format!(
            "out: dtype {} does not match: expected {want}",
            arr.dtype()
        )));
    }
    if arr.shape() != shape {
        return Err(PackError::new_err(format!(
            "out: shape {:?} does not match the expected [{}, {}]",
            arr.shape(),
            shape[0],
            shape[1]
        )));
    }
    if !arr.is_c_contiguous() {
        return Err(PackError::new_err(format!(
            "out: the array of shape {:?} is not C-contiguous (strides {:?}): expected {want}",
            arr.shape(),
            arr.strides()
        )));
    }
    Ok(arr.cast::<PyArray2<T>>()?.clone())
}

/// Borrows a checked output for writing: fails if it is read-only or overlaps the `input`
/// array (NumPy's borrow tracking sees the input's read-only borrow).
fn borrow_out<'py, T: Element>(
    out: &Bound<'py, PyArray2<T>>,
    input: &str,
) -> PyResult<PyReadwriteArray2<'py, T>> {
    out.try_readwrite().map_err(|e| {
        PackError::new_err(match e {
            BorrowError::NotWriteable => {
                format!("out: the array of shape {:?} is read-only", out.shape())
            }
            _ => format!("out: the array shares memory with `{input}` (or is borrowed elsewhere)"),
        })
    })
}

/// Unpacks `[qrows, cols]` int32 words into `[qrows·32/bits, cols]` uint8 codes, into `out`
/// when given (checked, filled in place and returned) or a fresh NumPy array. Large `out`
/// buffers are written with streaming stores (see `exl2rs_core::pack::Stores::Auto`).
#[pyfunction]
#[pyo3(signature = (packed, bits, out=None))]
fn unpack_columns<'py>(
    py: Python<'py>,
    packed: PyReadonlyArray2<'py, i32>,
    bits: u32,
    out: Option<Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyArray2<u8>>> {
    let (qrows, cols) = (packed.shape()[0], packed.shape()[1]);
    let rows = core::unpacked_rows(qrows, cols, bits).map_err(to_py)?;
    let (out, faulting) = match out {
        Some(o) => (out_array::<u8>(&o, [rows, cols])?, false),
        None => {
            let (a, recycled) = fresh_array2::<u8>(py, [rows, cols])?;
            (a, !recycled)
        }
    };
    let p = elems(&packed);
    {
        let mut rw = borrow_out(&out, "packed")?;
        let dst = rw
            .as_slice_mut()
            .expect("a C-contiguous array is one slice");
        // Pages first touched by the unpacker (a new mapping) take ordinary stores, which are
        // faster there; resident memory (a caller's or a recycled buffer) gets the default,
        // streaming when large.
        let stores = if faulting {
            Stores::Cached
        } else {
            Stores::Auto
        };
        py.detach(|| core::unpack_columns_with(Isa::detect(), stores, &p, qrows, cols, bits, dst))
            .map_err(to_py)?;
    }
    Ok(out)
}

/// exllamav2's group layout for a QParams: `[(bits, rows), ...]` in storage order.
#[pyfunction]
fn exl2_layout(
    rows: usize,
    bits: Vec<u8>,
    bits_prop: Vec<f64>,
    group_size: Vec<usize>,
) -> PyResult<Vec<(u8, usize)>> {
    let l = GroupLayout::from_qparams(rows, &bits, &bits_prop, &group_size).map_err(to_py)?;
    Ok(l.groups().iter().map(|g| (g.bits, g.rows)).collect())
}

fn perm_vec(perm: Option<&IntArray1<'_>>, tensor: &'static str) -> PyResult<Option<Vec<i64>>> {
    perm.map(|p| {
        p.narrow::<i64>(
            tensor,
            i128::from(i64::MIN),
            i128::from(i64::MAX),
            "an int64 row index",
        )
    })
    .transpose()
}

/// Packs one EXL2 matrix. Returns the dict of `q_weight`, `q_scale`, `q_scale_max` (float32),
/// `q_groups` (int16) and `q_invperm`.
#[pyfunction]
#[pyo3(signature = (codes, groups, scales, scale_max, perm=None))]
fn exl2_pack<'py>(
    py: Python<'py>,
    codes: IntArray2<'py>,
    groups: Vec<(u8, usize)>,
    scales: IntArray2<'py>,
    scale_max: PyReadonlyArray1<'py, f32>,
    perm: Option<IntArray1<'py>>,
) -> PyResult<Bound<'py, PyDict>> {
    let layout = GroupLayout::new(groups).map_err(to_py)?;
    let (rows, cols) = dims2(&codes);
    if rows != layout.rows() {
        return Err(PackError::new_err(format!(
            "codes: shape [{rows}, {cols}] does not match the layout, which covers {} rows",
            layout.rows()
        )));
    }
    let (sg, sc) = dims2(&scales);
    if (sg, sc) != (layout.num_groups(), cols) {
        return Err(PackError::new_err(format!(
            "q_scale: shape [{sg}, {sc}] does not match the expected [{}, {cols}] (groups, columns)",
            layout.num_groups()
        )));
    }
    let c = codes_u8(&codes, "codes")?;
    let s: Vec<u8> = scales.narrow(
        "q_scale",
        1,
        16,
        "a 4-bit scale in 1..=16 (stored as value − 1)",
    )?;
    let m = elems(&scale_max);
    let p = perm_vec(perm.as_ref(), "perm")?;
    let t = py
        .detach(|| Exl2Packed::pack(&layout, &c, cols, &s, &m, p.as_deref()))
        .map_err(to_py)?;
    let d = PyDict::new(py);
    let (qrows, np, g) = (layout.qrows(), t.cols_padded, layout.num_groups());
    d.set_item("q_weight", array2(py, t.q_weight, qrows, np))?;
    d.set_item("q_scale", array2(py, t.q_scale, g, np / 8))?;
    d.set_item("q_scale_max", array1(py, t.q_scale_max))?;
    d.set_item("q_groups", array1(py, t.q_groups))?;
    d.set_item("q_invperm", array1(py, t.q_invperm))?;
    Ok(d)
}

struct Exl2Owned<'a> {
    q_weight: Cow<'a, [i32]>,
    qrows: usize,
    cols_padded: usize,
    q_scale: Cow<'a, [i32]>,
    q_scale_max: Cow<'a, [f32]>,
    q_groups: Vec<i16>,
    q_invperm: Vec<i32>,
}

impl Exl2Owned<'_> {
    fn view(&self) -> Exl2Tensors<'_> {
        Exl2Tensors {
            q_weight: &self.q_weight,
            qrows: self.qrows,
            cols_padded: self.cols_padded,
            q_scale: &self.q_scale,
            q_scale_max: &self.q_scale_max,
            q_groups: &self.q_groups,
            q_invperm: &self.q_invperm,
        }
    }
}

fn exl2_inputs<'a>(
    q_weight: &'a PyReadonlyArray2<'_, i32>,
    q_scale: &'a PyReadonlyArray2<'_, i32>,
    q_scale_max: &'a PyReadonlyArray1<'_, f32>,
    q_groups: &IntArray1<'_>,
    q_invperm: &IntArray1<'_>,
) -> PyResult<Exl2Owned<'a>> {
    let (qrows, np) = (q_weight.shape()[0], q_weight.shape()[1]);
    if q_scale.shape()[1] * 8 != np {
        return Err(PackError::new_err(format!(
            "q_scale: shape {:?} does not match the expected [groups, {}] (q_weight columns / 8)",
            q_scale.shape(),
            np / 8
        )));
    }
    Ok(Exl2Owned {
        q_weight: elems(q_weight),
        qrows,
        cols_padded: np,
        q_scale: elems(q_scale),
        q_scale_max: elems(q_scale_max),
        q_groups: q_groups.narrow(
            "q_groups",
            i128::from(i16::MIN),
            i128::from(i16::MAX),
            "an int16",
        )?,
        q_invperm: q_invperm.narrow(
            "q_invperm",
            i128::from(i32::MIN),
            i128::from(i32::MAX),
            "an int32 row index",
        )?,
    })
}

/// Unpacks EXL2 tensors: dict of `codes` `[K, cols]` (storage order), `scales` `[G, cols]`
/// (1..=16), `scale_max`, `perm` and `groups` (`[(bits, rows), ...]`). `cols` trims padding.
#[pyfunction]
#[pyo3(signature = (q_weight, q_scale, q_scale_max, q_groups, q_invperm, cols=None))]
fn exl2_unpack<'py>(
    py: Python<'py>,
    q_weight: PyReadonlyArray2<'py, i32>,
    q_scale: PyReadonlyArray2<'py, i32>,
    q_scale_max: PyReadonlyArray1<'py, f32>,
    q_groups: IntArray1<'py>,
    q_invperm: IntArray1<'py>,
    cols: Option<usize>,
) -> PyResult<Bound<'py, PyDict>> {
    let t = exl2_inputs(&q_weight, &q_scale, &q_scale_max, &q_groups, &q_invperm)?;
    let u = py.detach(|| t.view().unpack(cols)).map_err(to_py)?;
    let (k, g) = (u.layout.rows(), u.layout.num_groups());
    let d = PyDict::new(py);
    let groups: Vec<(u8, usize)> = u.layout.groups().iter().map(|g| (g.bits, g.rows)).collect();
    d.set_item("codes", array2(py, u.codes, k, u.cols))?;
    d.set_item("scales", array2(py, u.scales, g, u.cols))?;
    d.set_item("scale_max", array1(py, u.scale_max))?;
    d.set_item(
        "perm",
        array1(py, u.perm.into_iter().map(i64::from).collect()),
    )?;
    d.set_item("groups", groups)?;
    Ok(d)
}

/// Dequantizes EXL2 tensors to float32 `[K, cols]` in the original input-row order.
#[pyfunction]
#[pyo3(signature = (q_weight, q_scale, q_scale_max, q_groups, q_invperm, cols=None))]
fn exl2_dequantize<'py>(
    py: Python<'py>,
    q_weight: PyReadonlyArray2<'py, i32>,
    q_scale: PyReadonlyArray2<'py, i32>,
    q_scale_max: PyReadonlyArray1<'py, f32>,
    q_groups: IntArray1<'py>,
    q_invperm: IntArray1<'py>,
    cols: Option<usize>,
) -> PyResult<Bound<'py, PyArray2<f32>>> {
    let t = exl2_inputs(&q_weight, &q_scale, &q_scale_max, &q_groups, &q_invperm)?;
    // A fresh (recycled when large) output filled in place; a `cols` above the padded width
    // is rejected by the core, so it never sizes the allocation.
    let (k, n) = (
        t.q_invperm.len(),
        cols.unwrap_or(t.cols_padded).min(t.cols_padded),
    );
    let out = fresh_array2::<f32>(py, [k, n])?.0;
    {
        let mut rw = out.readwrite();
        let dst = rw
            .as_slice_mut()
            .expect("a fresh C-ordered array is contiguous");
        py.detach(|| t.view().dequantize_into(cols, dst))
            .map_err(to_py)?;
    }
    Ok(out)
}

/// `g_idx` for `rows` inputs, group size (None = one group) and optional act-order `perm`.
#[pyfunction]
#[pyo3(signature = (rows, group_size=None, perm=None))]
fn gptq_g_idx<'py>(
    py: Python<'py>,
    rows: usize,
    group_size: Option<usize>,
    perm: Option<IntArray1<'py>>,
) -> PyResult<Bound<'py, PyArray1<i32>>> {
    let p = perm_vec(perm.as_ref(), "perm")?;
    Ok(array1(
        py,
        core::gptq_g_idx(rows, group_size, p.as_deref()).map_err(to_py)?,
    ))
}

/// Packs one GPTQ v1 matrix: dict of `qweight`, `qzeros`, `scales` (float32), `g_idx`.
/// `zeros` are the true zero points (1..=2^bits); v1 stores zero − 1.
#[pyfunction]
fn gptq_pack<'py>(
    py: Python<'py>,
    codes: IntArray2<'py>,
    zeros: IntArray2<'py>,
    scales: PyReadonlyArray2<'py, f32>,
    g_idx: IntArray1<'py>,
    bits: u32,
) -> PyResult<Bound<'py, PyDict>> {
    let (rows, cols) = dims2(&codes);
    let (zg, zc) = dims2(&zeros);
    if zc != cols || scales.shape() != [zg, cols] {
        return Err(PackError::new_err(format!(
            "qzeros {:?} and scales {:?} must both be [groups, {cols}]",
            [zg, zc],
            scales.shape()
        )));
    }
    let c = codes_u8(&codes, "codes")?;
    let z: Vec<u16> = zeros.narrow("qzeros", 1, 256, "a zero point in 1..=2^bits")?;
    let s = elems(&scales);
    let g: Vec<i32> = g_idx.narrow(
        "g_idx",
        i128::from(i32::MIN),
        i128::from(i32::MAX),
        "an int32 group index",
    )?;
    let t = py
        .detach(|| GptqPacked::pack(bits, &c, rows, cols, &z, &s, &g))
        .map_err(to_py)?;
    let d = PyDict::new(py);
    let b = bits as usize;
    d.set_item("qweight", array2(py, t.qweight, rows * b / 32, cols))?;
    d.set_item("qzeros", array2(py, t.qzeros, zg, cols * b / 32))?;
    d.set_item("scales", array2(py, t.scales, zg, cols))?;
    d.set_item("g_idx", array1(py, t.g_idx))?;
    Ok(d)
}

fn gptq_view<'a>(
    bits: u32,
    qweight: &'a [i32],
    qzeros: &'a [i32],
    scales: &'a PyReadonlyArray2<'_, f32>,
    s: &'a [f32],
    g: &'a [i32],
) -> GptqTensors<'a> {
    GptqTensors {
        bits,
        qweight,
        qzeros,
        scales: s,
        groups: scales.shape()[0],
        cols: scales.shape()[1],
        g_idx: g,
    }
}

/// Unpacks GPTQ v1 tensors: dict of `codes` `[K, N]`, `zeros` (true zero points, uint16),
/// `scales`, `g_idx`.
#[pyfunction]
fn gptq_unpack<'py>(
    py: Python<'py>,
    qweight: PyReadonlyArray2<'py, i32>,
    qzeros: PyReadonlyArray2<'py, i32>,
    scales: PyReadonlyArray2<'py, f32>,
    g_idx: IntArray1<'py>,
    bits: u32,
) -> PyResult<Bound<'py, PyDict>> {
    let (qw, qz, s) = (elems(&qweight), elems(&qzeros), elems(&scales));
    let g: Vec<i32> = g_idx.narrow(
        "g_idx",
        i128::from(i32::MIN),
        i128::from(i32::MAX),
        "an int32 group index",
    )?;
    let v = gptq_view(bits, &qw, &qz, &scales, &s, &g);
    let u = py.detach(|| v.unpack()).map_err(to_py)?;
    let (k, n, groups) = (g.len(), v.cols, v.groups);
    let d = PyDict::new(py);
    d.set_item("codes", array2(py, u.codes, k, n))?;
    d.set_item("zeros", array2(py, u.zeros, groups, n))?;
    d.set_item("scales", array2(py, u.scales, groups, n))?;
    d.set_item("g_idx", array1(py, u.g_idx))?;
    Ok(d)
}

/// Dequantizes GPTQ v1 tensors to float32 `[K, N]`.
#[pyfunction]
fn gptq_dequantize<'py>(
    py: Python<'py>,
    qweight: PyReadonlyArray2<'py, i32>,
    qzeros: PyReadonlyArray2<'py, i32>,
    scales: PyReadonlyArray2<'py, f32>,
    g_idx: IntArray1<'py>,
    bits: u32,
) -> PyResult<Bound<'py, PyArray2<f32>>> {
    let (qw, qz, s) = (elems(&qweight), elems(&qzeros), elems(&scales));
    let g: Vec<i32> = g_idx.narrow(
        "g_idx",
        i128::from(i32::MIN),
        i128::from(i32::MAX),
        "an int32 group index",
    )?;
    let v = gptq_view(bits, &qw, &qz, &scales, &s, &g);
    let out = fresh_array2::<f32>(py, [g.len(), v.cols])?.0;
    {
        let mut rw = out.readwrite();
        let dst = rw
            .as_slice_mut()
            .expect("a fresh C-ordered array is contiguous");
        py.detach(|| v.dequantize_into(dst)).map_err(to_py)?;
    }
    Ok(out)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(pack_columns, m)?)?;
    m.add_function(wrap_pyfunction!(unpack_columns, m)?)?;
    m.add_function(wrap_pyfunction!(exl2_layout, m)?)?;
    m.add_function(wrap_pyfunction!(exl2_pack, m)?)?;
    m.add_function(wrap_pyfunction!(exl2_unpack, m)?)?;
    m.add_function(wrap_pyfunction!(exl2_dequantize, m)?)?;
    m.add_function(wrap_pyfunction!(gptq_g_idx, m)?)?;
    m.add_function(wrap_pyfunction!(gptq_pack, m)?)?;
    m.add_function(wrap_pyfunction!(gptq_unpack, m)?)?;
    m.add_function(wrap_pyfunction!(gptq_dequantize, m)?)?;
    Ok(())
}
