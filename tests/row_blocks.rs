//! `RowBlocks`: how framework views ([..., V] with any strides) become the ops' row shapes.

use rlhf_kernels::{Error, RowBlocks, RowShape};

/// Every row's first element by walking the dims and strides directly.
fn row_starts(dims: &[usize], strides: &[usize], offset: usize) -> Vec<usize> {
    let lead = &dims[..dims.len() - 1];
    let mut out = vec![offset];
    for (d, s) in lead.iter().zip(strides) {
        out = out.iter().flat_map(|&o| (0..*d).map(move |i| o + i * s)).collect();
    }
    out
}

fn starts_of(blocks: &RowBlocks) -> Vec<usize> {
    (0..blocks.offsets.len())
        .flat_map(|k| (0..blocks.shape.rows).map(move |i| blocks.offsets[k] + i * blocks.shape.row_stride))
        .collect()
}

#[test]
fn blocks_cover_every_row_in_order() {
    let cases: &[(&[usize], &[usize], usize, usize)] = &[
        // dims, strides, offset, expected blocks
        (&[6, 10], &[10, 1], 0, 1),              // contiguous
        (&[2, 3, 10], &[40, 10, 1], 5, 2),       // causal shift of [2, 4, 10]
        (&[2, 3, 10], &[30, 10, 1], 0, 1),       // contiguous 3-D
        (&[6, 10], &[16, 1], 3, 1),              // vocabulary-padded
        (&[2, 1, 3, 10], &[99, 7, 12, 1], 0, 2), // a size-1 dimension with any stride
        (&[3, 2, 2, 10], &[100, 40, 20, 1], 1, 3),
        (&[10], &[1], 0, 1), // one row
    ];
    for &(dims, strides, offset, n_blocks) in cases {
        let blocks = RowBlocks::new(dims, strides, offset, "x").unwrap();
        assert_eq!(blocks.offsets.len(), n_blocks, "{dims:?} {strides:?}");
        assert_eq!(blocks.shape.cols, dims[dims.len() - 1]);
        assert_eq!(starts_of(&blocks), row_starts(dims, strides, offset), "{dims:?} {strides:?}");
        assert_eq!(blocks.rows(), dims[..dims.len() - 1].iter().product::<usize>());
    }
}

#[test]
fn aligned_blocks_hold_the_same_rows() {
    // Blocks of 6 rows against blocks of 4: both cut into blocks of 2.
    let a = RowBlocks::new(&[12, 10], &[10, 1], 0, "a").unwrap();
    let b = RowBlocks::new(&[3, 4, 10], &[50, 10, 1], 0, "b").unwrap();
    let c = RowBlocks::new(&[2, 6, 10], &[70, 11, 1], 0, "c").unwrap();
    let (b2, c2) = RowBlocks::aligned(b.clone(), c.clone());
    assert_eq!((b2.shape.rows, c2.shape.rows), (2, 2));
    assert_eq!(starts_of(&b2), starts_of(&b));
    assert_eq!(starts_of(&c2), starts_of(&c));
    for k in 0..b2.offsets.len() {
        assert_eq!(b2.block_rows(k), c2.block_rows(k));
    }
    let (a2, _) = RowBlocks::aligned(a.clone(), a.clone());
    assert_eq!(a2, a);
}

#[test]
fn overlapping_or_empty_rows_are_errors() {
    assert!(matches!(RowBlocks::new(&[4, 10], &[0, 1], 0, "x"), Err(Error::RowStrideTooSmall { .. })));
    assert!(matches!(RowBlocks::new(&[0, 10], &[10, 1], 0, "x"), Err(Error::EmptyInput { .. })));
    assert!(matches!(RowBlocks::new(&[4, 0], &[0, 1], 0, "x"), Err(Error::EmptyInput { .. })));
    let blocks = RowBlocks::new(&[4, 10], &[12, 1], 0, "x").unwrap();
    assert_eq!(blocks.shape, RowShape::new(4, 10).with_row_stride(12));
    assert_eq!(blocks.packed_range(0), 0..48);
}
