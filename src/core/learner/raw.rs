//! Disjoint mutable access to the slots of a slab from several threads at once.
//!
//! A slab keeps slot `b` in column block `b` (or row `b`) of one matrix, so that all slots can be
//! multiplied by one wide GEMM. Rayon tasks each own a different slot; ndarray cannot express
//! "these strided column blocks are disjoint", so this small wrapper does. The invariant, every
//! slot index handed to at most one task at a time, holds because the only callers are the
//! learners' crate-private step functions, reached through `StreamSet`, which refuses any batch
//! whose slots are not strictly increasing.

use ndarray::{ArrayViewMut2, ShapeBuilder};

/// Pointer to a `rows × (slots·width)` row-major matrix whose column blocks are slots.
#[derive(Debug, Clone, Copy)]
pub struct SlotBlocks<T> {
    ptr: *mut T,
    rows: usize,
    row_stride: usize,
    width: usize,
    slots: usize,
}

// SAFETY: the pointer is only dereferenced through `block`, whose contract makes every access
// exclusive to one slot; the element type itself is Send + Sync (floats).
unsafe impl<T: Send> Send for SlotBlocks<T> {}
// SAFETY: as above; `&self` hands out `&mut T`, so sharing needs `T: Send` as well.
unsafe impl<T: Send + Sync> Sync for SlotBlocks<T> {}

impl<T> SlotBlocks<T> {
    /// Wraps a standard-layout `rows × (slots·width)` matrix.
    pub fn new(m: &mut ndarray::Array2<T>, width: usize) -> Self {
        let (rows, cols) = m.dim();
        assert!(m.is_standard_layout());
        assert_eq!(cols % width.max(1), 0);
        Self { ptr: m.as_mut_ptr(), rows, row_stride: cols, width, slots: cols / width.max(1) }
    }

    /// The `rows × width` block of slot `b`.
    ///
    /// # Safety
    /// No other live view may overlap block `b` while the returned view is alive, and the matrix
    /// must outlive it and not be moved or reallocated.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn block(&self, b: usize) -> ArrayViewMut2<'_, T> {
        assert!(b < self.slots, "slot {b} out of range");
        // SAFETY: `b·width + (rows−1)·row_stride + width − 1` is inside the matrix, and the caller
        // guarantees exclusivity.
        unsafe {
            ArrayViewMut2::from_shape_ptr(
                (self.rows, self.width).strides((self.row_stride, 1)),
                self.ptr.add(b * self.width),
            )
        }
    }
}

impl<T> SlotBlocks<T> {
    /// The `rows × (count·width)` block of slots `b0..b0 + count`.
    ///
    /// # Safety
    /// As [`SlotBlocks::block`], for every slot of the range.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn blocks(&self, b0: usize, count: usize) -> ArrayViewMut2<'_, T> {
        assert!(b0 + count <= self.slots, "slots {b0}..{} out of range", b0 + count);
        // SAFETY: in bounds; exclusivity guaranteed by the caller.
        unsafe {
            ArrayViewMut2::from_shape_ptr(
                (self.rows, count * self.width).strides((self.row_stride, 1)),
                self.ptr.add(b0 * self.width),
            )
        }
    }
}

/// Pointer to a row-major matrix whose rows are slots.
#[derive(Debug, Clone, Copy)]
pub struct SlotRows<T> {
    ptr: *mut T,
    len: usize,
    slots: usize,
}

// SAFETY: see `SlotBlocks`.
unsafe impl<T: Send> Send for SlotRows<T> {}
// SAFETY: see `SlotBlocks`.
unsafe impl<T: Send + Sync> Sync for SlotRows<T> {}

impl<T> SlotRows<T> {
    /// Wraps a standard-layout matrix, one row per slot (any number of trailing axes flattened).
    pub fn new<D: ndarray::Dimension>(m: &mut ndarray::Array<T, D>) -> Self {
        assert!(m.is_standard_layout());
        let slots = m.shape()[0];
        let len = m.len().checked_div(slots).unwrap_or(0);
        Self { ptr: m.as_mut_ptr(), len, slots }
    }

    /// Wraps a vector, one element per slot.
    pub fn new_vec(v: &mut [T]) -> Self {
        Self { ptr: v.as_mut_ptr(), len: 1, slots: v.len() }
    }

    /// Row `b` as a slice.
    ///
    /// # Safety
    /// No other live reference may overlap row `b`, and the matrix must outlive the slice.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn row(&self, b: usize) -> &mut [T] {
        assert!(b < self.slots, "slot {b} out of range");
        // SAFETY: in bounds, exclusivity guaranteed by the caller.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(b * self.len), self.len) }
    }
}

/// Copies row `src` of a slot matrix over row `dst` (no copy through a temporary).
pub fn copy_row<T: Copy>(m: &mut ndarray::Array2<T>, src: usize, dst: usize) {
    if src != dst {
        let (from, mut to) = m.multi_slice_mut((ndarray::s![src, ..], ndarray::s![dst, ..]));
        to.assign(&from);
    }
}

/// Copies the column block `src` of a slab over the disjoint block `dst` of the same width.
pub fn copy_cols<T: Copy>(
    m: &mut ndarray::Array2<T>,
    src: std::ops::Range<usize>,
    dst: std::ops::Range<usize>,
) {
    if src != dst {
        let (from, mut to) = m.multi_slice_mut((ndarray::s![.., src], ndarray::s![.., dst]));
        to.assign(&from);
    }
}
