//! The shape of a batch of rows in memory.

use std::ops::Range;

use crate::{Error, Result};

/// `rows` rows of `cols` elements, row `r` starting at element `r * row_stride`.
///
/// `row_stride >= cols`; a stride larger than `cols` describes a padded vocabulary or a view
/// into a wider tensor. The elements between `cols` and `row_stride` are never read or written.
/// A buffer holding this shape has between `(rows - 1) * row_stride + cols` and
/// `rows * row_stride` elements.
///
/// ```
/// use rlhf_kernels::RowShape;
/// let shape = RowShape::new(4, 1000).with_row_stride(1024);
/// assert_eq!(shape.min_len(), 3 * 1024 + 1000);
/// assert!(shape.check_buffer("logits", 4 * 1024).is_ok());
/// assert!(shape.check_buffer("logits", 3000).is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RowShape {
    /// Number of rows (token positions), N.
    pub rows: usize,
    /// Elements per row (vocabulary size), V.
    pub cols: usize,
    /// Distance in elements between the starts of consecutive rows.
    pub row_stride: usize,
}

/// Largest `rows` or `cols` the kernels index with 32-bit integers.
pub const MAX_DIM: usize = i32::MAX as usize;

impl RowShape {
    /// A dense shape: `row_stride == cols`.
    pub const fn new(rows: usize, cols: usize) -> Self {
        RowShape { rows, cols, row_stride: cols }
    }

    /// The same rows with another stride.
    pub const fn with_row_stride(self, row_stride: usize) -> Self {
        RowShape { row_stride, ..self }
    }

    /// The dense shape with the same rows and cols.
    pub const fn dense(self) -> Self {
        RowShape::new(self.rows, self.cols)
    }

    /// Number of logical elements, `rows * cols`.
    pub const fn len(self) -> usize {
        self.rows * self.cols
    }

    /// True if there is no element.
    pub const fn is_empty(self) -> bool {
        self.rows == 0 || self.cols == 0
    }

    /// Fewest elements a buffer needs: `(rows - 1) * row_stride + cols`.
    pub const fn min_len(self) -> usize {
        if self.is_empty() { 0 } else { (self.rows - 1) * self.row_stride + self.cols }
    }

    /// Index of the first element of row `r`.
    pub const fn row_start(self, r: usize) -> usize {
        r * self.row_stride
    }

    /// Element range of row `r`.
    pub const fn row_range(self, r: usize) -> Range<usize> {
        let start = r * self.row_stride;
        start..start + self.cols
    }

    /// Checks the shape alone: non-empty, `row_stride >= cols`, dimensions within the
    /// kernels' 32-bit limits and no overflow of `rows * row_stride`.
    pub fn validate(self, what: &'static str) -> Result<()> {
        if self.is_empty() {
            return Err(Error::EmptyInput { what, rows: self.rows, cols: self.cols });
        }
        if self.row_stride < self.cols {
            return Err(Error::RowStrideTooSmall { what, row_stride: self.row_stride, cols: self.cols });
        }
        for (name, value) in [("rows", self.rows), ("cols", self.cols)] {
            if value > MAX_DIM {
                return Err(Error::TooLarge { what: name, value, max: MAX_DIM });
            }
        }
        if self.rows.checked_mul(self.row_stride).is_none_or(|n| n > isize::MAX as usize) {
            return Err(Error::TooLarge {
                what: "rows * row_stride",
                value: usize::MAX,
                max: isize::MAX as usize,
            });
        }
        Ok(())
    }

    /// [`validate`](Self::validate)s the shape and checks that a buffer of `len` elements
    /// holds it: `min_len() <= len <= rows * row_stride`.
    pub fn check_buffer(self, what: &'static str, len: usize) -> Result<()> {
        self.validate(what)?;
        let (min, max) = (self.min_len(), self.rows * self.row_stride);
        if len < min || len > max {
            return Err(Error::ShapeMismatch { what, min, max, actual: len });
        }
        Ok(())
    }
}
