//! Shared cases for the token log-prob tests: the same inputs, checks and tolerances for
//! every backend, each held to the f64 reference.

use rlhf_kernels::testing::{Rng, Tolerance, assert_close};
use rlhf_kernels::{DType, Element, Result, RowShape, TokenGrads, TokenLogprobsOptions, Tokens, reference};

/// Vocabulary sizes of the sweep: tiny, odd, around the vector width, around the chunk sizes
/// (4096 f32 / 8192 half logits), real vocabularies.
pub const VOCABS: &[usize] = &[1, 2, 3, 31, 127, 128, 129, 1000, 4097, 8193, 32000, 151936, 256000];
pub const ROWS: &[usize] = &[1, 7, 64];
pub const TEMPERATURES: [f32; 3] = [0.7, 1.0, 1.3];

/// Forward outputs as plain vectors.
#[derive(Debug, Clone, PartialEq)]
pub struct Fwd {
    pub logp: Vec<f32>,
    pub entropy: Vec<f32>,
    pub lse: Vec<f32>,
}

/// What each backend's test file implements.
pub trait TokenBackend {
    /// All three outputs (`with_entropy = false` requests logp and lse only, entropy left 0).
    fn forward<T: Element>(&self, case: &Case<T>, with_entropy: bool) -> Result<Fwd>;
    /// The gradient buffer (`rows * row_stride`, padding as it was), out of place or in place.
    fn backward<T: Element>(&self, case: &Case<T>, grads: &TokenGrads<'_>, in_place: bool) -> Result<Vec<T>>;
}

/// One batch: logits laid out as `shape`, i64 targets, an optional mask.
#[derive(Debug, Clone)]
pub struct Case<T> {
    pub logits: Vec<T>,
    pub shape: RowShape,
    pub targets: Vec<i64>,
    pub mask: Option<Vec<u8>>,
    pub opts: TokenLogprobsOptions,
}

impl<T: Element> Case<T> {
    pub fn tokens(&self) -> Tokens<'_, i64> {
        let t = Tokens::new(&self.targets);
        match &self.mask {
            Some(m) => t.with_mask(m),
            None => t,
        }
    }

    /// Random logits (σ = 4) with about 10 % banned (`-inf`) tokens on alternate rows, one
    /// row in 5 masked, one in 7 with the ignore index, and now and then a banned target.
    pub fn random(shape: RowShape, tau: f32, seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let mut logits: Vec<T> = rng.logits(shape, 4.0);
        let mut targets = Vec::with_capacity(shape.rows);
        let mut mask = vec![1u8; shape.rows];
        for (r, m) in mask.iter_mut().enumerate() {
            let row = shape.row_range(r);
            if r % 2 == 1 && shape.cols > 2 {
                for v in row.clone() {
                    if rng.uniform() < 0.1 {
                        logits[v] = T::from_f32(f32::NEG_INFINITY);
                    }
                }
                logits[row.start] = T::from_f32(0.5); // keep one token allowed
            }
            let mut y = rng.below(shape.cols) as i64;
            if logits[row.start + y as usize].to_f32() == f32::NEG_INFINITY && rng.uniform() < 0.5 {
                y = 0; // mostly avoid banned targets, keep some
            }
            targets.push(if r % 7 == 3 { -100 } else { y });
            if r % 5 == 2 {
                *m = 0;
                logits[row].fill(T::from_f32(f32::NAN)); // padding is never read
            }
        }
        let opts = TokenLogprobsOptions::default().temperature(tau);
        Case { logits, shape, targets, mask: Some(mask), opts }
    }

    /// Random logits without padding rows, ignore indices or banned targets.
    pub fn dense_random(shape: RowShape, tau: f32, seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let logits = rng.logits(shape, 4.0);
        let targets = (0..shape.rows).map(|_| rng.below(shape.cols) as i64).collect();
        Case { logits, shape, targets, mask: None, opts: TokenLogprobsOptions::default().temperature(tau) }
    }

    /// Largest |logit / τ| of the valid rows: the scale of the absolute tolerance.
    pub fn scale(&self) -> f64 {
        let tokens = self.tokens();
        (0..self.shape.rows)
            .filter(|&r| tokens.mask.is_none_or(|m| m[r] != 0))
            .flat_map(|r| self.logits[self.shape.row_range(r)].iter())
            .map(|x| x.to_f64().abs() / self.opts.temperature as f64)
            .filter(|x| x.is_finite())
            .fold(1.0, f64::max)
    }
}

/// Forward (both variants) and backward (out of place and in place) of one case against the
/// reference; in place must equal out of place bit for bit.
pub fn check_case<T: Element>(b: &impl TokenBackend, case: &Case<T>, seed: u64) {
    let what = format!("{} {:?} tau={}", T::DTYPE, case.shape, case.opts.temperature);
    let tokens = case.tokens();
    let expected = reference::token_logprobs(&case.logits, case.shape, &tokens, &case.opts).unwrap();
    let tol = Tolerance::for_dtype(DType::F32).scaled(case.scale());
    let fwd = b.forward(case, true).unwrap();
    assert_close(&fwd.logp, &expected.logp, tol, &format!("logp {what}"));
    assert_close(&fwd.entropy, &expected.entropy, tol, &format!("entropy {what}"));
    assert_close(&fwd.lse, &expected.lse, tol, &format!("lse {what}"));
    let plain = b.forward(case, false).unwrap();
    assert!(bits_equal(&plain.logp, &fwd.logp), "logp alone differs from logp with entropy: {what}");

    let mut rng = Rng::new(seed ^ 0xabcdef);
    let g_logp = rng.normals(case.shape.rows, 1.0);
    let g_entropy = rng.normals(case.shape.rows, 0.5);
    let grads = TokenGrads::new(&fwd.lse).grad_logp(&g_logp).grad_entropy(&g_entropy, &fwd.entropy);
    let expected = reference::token_logprobs_backward(
        &case.logits,
        case.shape,
        &tokens,
        Some(&g_logp),
        Some(&g_entropy),
        &case.opts,
    )
    .unwrap();
    let out_of_place = b.backward(case, &grads, false).unwrap();
    let dense: Vec<T> =
        (0..case.shape.rows).flat_map(|r| out_of_place[case.shape.row_range(r)].iter().copied()).collect();
    let scale = expected.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    let tol = Tolerance::for_dtype(T::DTYPE).scaled(scale);
    assert_close(&dense, &expected, tol, &format!("grad {what}"));
    let in_place = b.backward(case, &grads, true).unwrap();
    let same = (0..case.shape.rows).all(|r| {
        let range = case.shape.row_range(r);
        in_place[range.clone()]
            .iter()
            .zip(&out_of_place[range])
            .all(|(a, b)| a.to_f64().to_bits() == b.to_f64().to_bits())
    });
    assert!(same, "in-place backward differs from out-of-place: {what}");
}

pub fn bits_equal(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// The V × N sweep, dense and with a padded stride, temperatures rotating over {0.7, 1, 1.3}.
pub fn sweep<T: Element>(b: &impl TokenBackend) {
    let (vocabs, rows): (&[usize], &[usize]) =
        if super::small() { (&[1, 3, 129, 4097, 32000], &[1, 7]) } else { (VOCABS, ROWS) };
    let mut i = 0u64;
    for &v in vocabs {
        for &n in rows {
            for pad in [0, 3] {
                let shape = RowShape::new(n, v).with_row_stride(v + pad);
                let tau = TEMPERATURES[i as usize % 3];
                check_case(b, &Case::<T>::random(shape, tau, 77 + i), i);
                i += 1;
            }
        }
    }
}

/// Row `r` of `case` alone and inside batches of 1, 7 and 4096 rows (rows of other data
/// around it) gives the same bits.
pub fn batch_invariance<T: Element>(b: &impl TokenBackend, vocab: usize, big_batch: usize) {
    let mut probe = Case::<T>::dense_random(RowShape::new(1, vocab), 1.3, 5);
    probe.targets[0] = (vocab / 3) as i64;
    let alone = b.forward(&probe, true).unwrap();
    for (n, at) in [(1usize, 0usize), (7, 5), (big_batch, big_batch / 2 + 1)] {
        let mut batch = Case::<T>::dense_random(RowShape::new(n, vocab), 1.3, 1000 + n as u64);
        batch.logits[batch.shape.row_range(at)].copy_from_slice(&probe.logits);
        batch.targets[at] = probe.targets[0];
        let out = b.forward(&batch, true).unwrap();
        for (name, a, whole) in [
            ("logp", &alone.logp, &out.logp),
            ("entropy", &alone.entropy, &out.entropy),
            ("lse", &alone.lse, &out.lse),
        ] {
            assert_eq!(
                a[0].to_bits(),
                whole[at].to_bits(),
                "{name} of a row alone differs inside a batch of {n} (V={vocab})"
            );
        }
        let again = b.forward(&batch, true).unwrap();
        assert!(
            bits_equal(&out.logp, &again.logp) && bits_equal(&out.entropy, &again.entropy),
            "two runs differ"
        );
    }
}
