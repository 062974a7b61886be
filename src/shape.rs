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

/// The rows of a framework's strided `[..., V]` tensor (its dims, element strides and element
/// offset, as candle's `Layout` or DLPack describe it) as blocks of evenly spaced rows: the
/// ops take one [`RowShape`] per block, so a view is read in place. The causal shift
/// `logits[:, :-1, :]` of a `[B, T, V]` tensor is `B` blocks of `T − 1` rows; a contiguous
/// tensor, or a vocabulary-padded `[N, V_pad]` narrowed to `V`, is one block.
///
/// Row `k·shape.rows + i` of the tensor (row-major over the leading dimensions) is row `i` of
/// block `k`, which starts at element `offsets[k]`.
///
/// ```
/// use rlhf_kernels::RowBlocks;
/// // logits[:, :-1, :] of a contiguous [2, 4, 10] tensor.
/// let blocks = RowBlocks::new(&[2, 3, 10], &[40, 10, 1], 0, "logits")?;
/// assert_eq!((blocks.shape.rows, blocks.shape.row_stride, blocks.offsets.clone()), (3, 10, vec![0, 40]));
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowBlocks {
    /// The shape of every block.
    pub shape: RowShape,
    /// Element offset of each block's first row.
    pub offsets: Vec<usize>,
}

impl RowBlocks {
    /// Splits a `[..., V]` layout into blocks. Errors: a scalar, a last dimension without
    /// unit stride ([`Error::Layout`]), no rows or columns, rows of one block that overlap
    /// (a row stride below V). Different blocks may share memory (an expanded dimension of
    /// stride 0): reading them is fine; writing through such a layout is for the caller to
    /// refuse.
    pub fn new(dims: &[usize], strides: &[usize], offset: usize, what: &'static str) -> Result<Self> {
        let Some((&cols, lead_dims)) = dims.split_last() else {
            return Err(Error::Layout { what, problem: "expected a tensor [..., V], got a scalar".into() });
        };
        if strides.len() != dims.len() {
            return Err(Error::Layout {
                what,
                problem: format!("{} strides for {} dimensions", strides.len(), dims.len()),
            });
        }
        if cols > 1 && strides[dims.len() - 1] != 1 {
            return Err(Error::Layout {
                what,
                problem: format!(
                    "the last dimension must have unit stride (it has {}); make the tensor contiguous first",
                    strides[dims.len() - 1]
                ),
            });
        }
        let rows: usize = lead_dims.iter().product();
        if rows == 0 || cols == 0 {
            return Err(Error::EmptyInput { what, rows, cols });
        }
        // Leading dimensions of size > 1 (a size-1 dimension's stride is meaningless).
        let lead: Vec<(usize, usize)> =
            lead_dims.iter().zip(strides).filter(|(d, _)| **d != 1).map(|(d, s)| (*d, *s)).collect();
        // The innermost run of dimensions that lays rows out evenly forms a block.
        let (mut block_rows, mut row_stride, mut outer) = (1, cols, lead.len());
        if let Some(&(d, s)) = lead.last() {
            (block_rows, row_stride, outer) = (d, s, lead.len() - 1);
            while outer > 0 && lead[outer - 1].1 == block_rows * row_stride {
                block_rows *= lead[outer - 1].0;
                outer -= 1;
            }
        }
        let shape = RowShape::new(block_rows, cols).with_row_stride(row_stride);
        shape.validate(what)?;
        let mut offsets = vec![offset];
        for &(d, s) in &lead[..outer] {
            offsets = offsets.iter().flat_map(|&o| (0..d).map(move |i| o + i * s)).collect();
        }
        Ok(RowBlocks { shape, offsets })
    }

    /// All rows of the tensor.
    pub fn rows(&self) -> usize {
        self.shape.rows * self.offsets.len()
    }

    /// The tensor rows of block `k`.
    pub fn block_rows(&self, k: usize) -> Range<usize> {
        k * self.shape.rows..(k + 1) * self.shape.rows
    }

    /// An error of an op run on block `k` alone, with its row index made the tensor's
    /// (`InvalidRow` and `TargetOutOfRange` name rows of the block they were given).
    pub fn block_error(&self, k: usize, e: Error) -> Error {
        let first = k * self.shape.rows;
        match e {
            Error::InvalidRow { op, row, problem } => Error::InvalidRow { op, row: row + first, problem },
            Error::TargetOutOfRange { row, target, vocab } => {
                Error::TargetOutOfRange { row: row + first, target, vocab }
            }
            other => other,
        }
    }

    /// The storage elements block `k` spans.
    pub fn block_range(&self, k: usize) -> Range<usize> {
        self.offsets[k]..self.offsets[k] + self.shape.min_len()
    }

    /// Where block `k` goes in a buffer that packs the blocks one after the other, each
    /// `shape.rows · shape.row_stride` elements: the layout of a gradient allocated with the
    /// input's row stride.
    pub fn packed_range(&self, k: usize) -> Range<usize> {
        let len = self.shape.rows * self.shape.row_stride;
        k * len..(k + 1) * len
    }

    /// Two tensors' rows (the same rows, laid out differently) cut into the same blocks, of
    /// the gcd of their block sizes, so that block `k` of each holds the same tensor rows.
    pub fn aligned(a: RowBlocks, b: RowBlocks) -> (RowBlocks, RowBlocks) {
        if a.shape.rows == b.shape.rows {
            return (a, b);
        }
        let (mut x, mut y) = (a.shape.rows, b.shape.rows);
        while y != 0 {
            (x, y) = (y, x % y);
        }
        (a.split(x), b.split(x))
    }

    /// The same rows as blocks of `rows` rows (`rows` divides `shape.rows`).
    fn split(&self, rows: usize) -> RowBlocks {
        let step = rows * self.shape.row_stride;
        let per = self.shape.rows / rows;
        RowBlocks {
            shape: RowShape::new(rows, self.shape.cols).with_row_stride(self.shape.row_stride),
            offsets: self.offsets.iter().flat_map(|&o| (0..per).map(move |i| o + i * step)).collect(),
        }
    }
}
