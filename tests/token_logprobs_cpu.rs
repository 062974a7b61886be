//! The CPU token log-probs, entropy and lse held to the f64 reference: the V × N sweep, all
//! dtypes and temperatures, masks, banned tokens, strides; gradients (against the reference
//! and against finite differences), in place, batch invariance, shards, every error path.

mod common;

use common::cpu::Cpu;
use common::tokens::{self, Case, Fwd, TokenBackend, bits_equal};
use proptest::prelude::*;
use rlhf_kernels::testing::{Rng, Tolerance, assert_close};
use rlhf_kernels::{
    DType, Error, RowProblem, RowShape, TokenGrads, TokenLogprobsOptions, TokenOutputs, Tokens, VocabPartial,
    bf16, cpu, f16, reference,
};

#[test]
fn sweep_f32() {
    tokens::sweep::<f32>(&Cpu);
}

#[test]
fn sweep_f16() {
    tokens::sweep::<f16>(&Cpu);
}

#[test]
fn sweep_bf16() {
    tokens::sweep::<bf16>(&Cpu);
}

#[test]
fn a_million_rows() {
    for (v, tau) in [(2usize, 1.3f32), (3, 0.7)] {
        tokens::check_case(&Cpu, &Case::<bf16>::random(RowShape::new(1_000_000, v), tau, 3), 3);
    }
}

#[test]
fn batch_invariance() {
    tokens::batch_invariance::<bf16>(&Cpu, 32000, 4096);
    tokens::batch_invariance::<f32>(&Cpu, 151936, 64);
}

#[test]
fn banned_target_gives_minus_infinity_and_a_finite_gradient() {
    let ninf = f32::NEG_INFINITY;
    let case = Case {
        logits: vec![1.0f32, ninf, 0.5, ninf],
        shape: RowShape::new(1, 4),
        targets: vec![1],
        mask: None,
        opts: TokenLogprobsOptions::default().temperature(0.5),
    };
    let f = Cpu.forward(&case, true).unwrap();
    assert_eq!(f.logp[0], f32::NEG_INFINITY);
    assert!(f.entropy[0].is_finite() && f.lse[0].is_finite());
    let grads = TokenGrads::new(&f.lse).grad_logp(&[1.0]).grad_entropy(&[1.0], &f.entropy);
    let g = Cpu.backward(&case, &grads, false).unwrap();
    assert_eq!(g[1], 2.0, "p = 0 at the banned target: gradient g_logp / τ exactly");
    assert_eq!(g[3], 0.0, "a banned non-target token gets no gradient");
    assert!(g.iter().all(|x| x.is_finite()));
}

/// d/dx of L = Σ g_logp·logp + g_H·H, by central differences of the f64 reference, equals the
/// reference's analytic gradient (and so, through the sweep, every backend's).
#[test]
fn gradient_matches_finite_differences() {
    for (v, tau) in [(7usize, 0.7f32), (33, 1.3)] {
        let shape = RowShape::new(3, v);
        let mut rng = Rng::new(v as u64);
        let logits: Vec<f32> = rng.logits(shape, 2.0);
        let targets = [2i64, 0, (v - 1) as i64];
        let (gl, gh) = (rng.normals(3, 1.0), rng.normals(3, 1.0));
        let opts = TokenLogprobsOptions::default().temperature(tau);
        let tokens = Tokens::new(&targets);
        let loss = |x: &[f32]| {
            let r = reference::token_logprobs(x, shape, &tokens, &opts).unwrap();
            (0..3).map(|i| gl[i] as f64 * r.logp[i] + gh[i] as f64 * r.entropy[i]).sum::<f64>()
        };
        let analytic =
            reference::token_logprobs_backward(&logits, shape, &tokens, Some(&gl), Some(&gh), &opts).unwrap();
        for i in 0..logits.len() {
            let (mut up, mut down) = (logits.clone(), logits.clone());
            up[i] += 1e-3;
            down[i] -= 1e-3;
            let numeric = (loss(&up) - loss(&down)) / (up[i] as f64 - down[i] as f64);
            assert!(
                (numeric - analytic[i]).abs() < 1e-5 * (1.0 + analytic[i].abs()),
                "V={v} i={i}: {numeric} vs {}",
                analytic[i]
            );
        }
    }
}

/// A row split into shards of uneven sizes, merged in order, gives the whole row's results.
#[test]
fn shards_merge_to_the_whole_row() {
    let case = Case::<bf16>::random(RowShape::new(16, 50_000), 0.7, 11);
    let whole = Cpu.forward(&case, true).unwrap();
    let tokens = case.tokens();
    for bounds in [vec![0, 25_000, 50_000], vec![0, 1, 12_345, 30_000, 49_999, 50_000]] {
        let shards = bounds.len() - 1;
        let mut partials = vec![VocabPartial::EMPTY; shards * 16];
        for s in 0..shards {
            let (lo, hi) = (bounds[s], bounds[s + 1]);
            let cols = hi - lo;
            let shard: Vec<bf16> =
                (0..16).flat_map(|r| case.logits[r * 50_000 + lo..r * 50_000 + hi].iter().copied()).collect();
            cpu::vocab_shard_partials(
                &shard,
                RowShape::new(16, cols),
                &tokens,
                lo,
                &mut partials[s * 16..(s + 1) * 16],
                &case.opts,
            )
            .unwrap();
        }
        let mut f = Fwd { logp: vec![0.0; 16], entropy: vec![0.0; 16], lse: vec![0.0; 16] };
        let out = TokenOutputs::default().logp(&mut f.logp).entropy(&mut f.entropy).lse(&mut f.lse);
        cpu::finish_vocab_partials(&partials, shards, &tokens, out, &case.opts).unwrap();
        let tol = Tolerance { rel: 1e-5, abs: 1e-5 * case.scale() };
        let as_f64 = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
        assert_close(&f.logp, &as_f64(&whole.logp), tol, "logp from shards");
        assert_close(&f.entropy, &as_f64(&whole.entropy), tol, "entropy from shards");
        assert_close(&f.lse, &as_f64(&whole.lse), tol, "lse from shards");
    }
}

/// Blocks (and shards) whose maxima are far apart rescale to exactly 0: the entropy stays
/// finite, never 0·(-inf).
#[test]
fn huge_logit_gaps_keep_the_entropy_finite() {
    let cols = 3000;
    let mut logits = vec![-3e38f32; cols];
    logits[2500] = 3e38; // a later block holds the max
    logits[10] = -2.9e38;
    let case = Case {
        logits,
        shape: RowShape::new(1, cols),
        targets: vec![2500],
        mask: None,
        opts: TokenLogprobsOptions::default(),
    };
    let f = Cpu.forward(&case, true).unwrap();
    assert_eq!((f.logp[0], f.entropy[0]), (0.0, 0.0));
    let opts = TokenLogprobsOptions::default();
    let mut parts = [VocabPartial::EMPTY; 2];
    let tokens = Tokens::new(&case.targets);
    cpu::vocab_shard_partials(
        &case.logits[..1500],
        RowShape::new(1, 1500),
        &tokens,
        0,
        &mut parts[..1],
        &opts,
    )
    .unwrap();
    cpu::vocab_shard_partials(
        &case.logits[1500..],
        RowShape::new(1, 1500),
        &tokens,
        1500,
        &mut parts[1..],
        &opts,
    )
    .unwrap();
    let stats = rlhf_kernels::merge_vocab_partials(&parts, &opts).unwrap().finish(&opts).unwrap();
    assert_eq!((stats.logp, stats.entropy), (0.0, 0.0));
}

#[test]
fn padding_rows_are_not_read_and_give_zero() {
    let mut case = Case::<f32>::random(RowShape::new(4, 10), 1.0, 2);
    case.mask = Some(vec![1, 0, 1, 0]);
    case.targets[2] = -100; // ignore index
    for r in [1, 2, 3] {
        case.logits[case.shape.row_range(r)].fill(f32::NAN);
    }
    let f = Cpu.forward(&case, true).unwrap();
    for r in 1..4 {
        assert_eq!((f.logp[r], f.entropy[r], f.lse[r]), (0.0, 0.0, 0.0));
    }
    let grads = TokenGrads::new(&f.lse).grad_logp(&[1.0; 4]);
    let g = Cpu.backward(&case, &grads, false).unwrap();
    assert!(g[10..].iter().all(|&x| x == 0.0) && g[..10].iter().all(|x| x.is_finite()));
}

#[test]
fn a_fully_masked_batch_gives_zeros() {
    let mut case = Case::<bf16>::random(RowShape::new(8, 3000), 1.0, 4);
    case.mask = Some(vec![0; 8]);
    let f = Cpu.forward(&case, true).unwrap();
    assert!(f.logp.iter().chain(&f.entropy).chain(&f.lse).all(|&x| x == 0.0));
    let grads = TokenGrads::new(&f.lse).grad_logp(&[1.0; 8]).grad_entropy(&[1.0; 8], &f.entropy);
    for in_place in [false, true] {
        let g = Cpu.backward(&case, &grads, in_place).unwrap();
        assert!(g.iter().all(|x| x.to_f32() == 0.0));
    }
}

#[test]
fn errors() {
    let opts = TokenLogprobsOptions::default();
    let shape = RowShape::new(2, 3);
    let logits = [0.0f32; 6];
    let mut logp = [0.0f32; 2];
    let run = |logits: &[f32], targets: &[i64], out: TokenOutputs<'_>| {
        cpu::token_logprobs(logits, shape, &Tokens::new(targets), out, &opts)
    };
    assert_eq!(
        run(&logits, &[0, 3], TokenOutputs::default().logp(&mut logp)).unwrap_err(),
        Error::TargetOutOfRange { row: 1, target: 3, vocab: 3 }
    );
    assert!(matches!(
        run(&logits, &[0], TokenOutputs::default().logp(&mut logp)),
        Err(Error::ShapeMismatch { what: "targets", .. })
    ));
    assert!(matches!(
        run(&logits, &[0, 1], TokenOutputs::default()),
        Err(Error::InvalidOption { name: "outputs", .. })
    ));
    let mut short = [0.0f32; 1];
    assert!(matches!(
        run(&logits, &[0, 1], TokenOutputs::default().entropy(&mut short)),
        Err(Error::ShapeMismatch { what: "entropy", .. })
    ));
    let mask = [1u8];
    let err = cpu::token_logprobs(
        &logits,
        shape,
        &Tokens::new(&[0i64, 1]).with_mask(&mask),
        TokenOutputs::default().logp(&mut logp),
        &opts,
    );
    assert!(matches!(err, Err(Error::ShapeMismatch { what: "mask", .. })));
    for (bad, problem) in [(f32::NAN, RowProblem::NaN), (f32::INFINITY, RowProblem::PosInf)] {
        let mut l = logits;
        l[4] = bad;
        let err = run(&l, &[0, 1], TokenOutputs::default().logp(&mut logp)).unwrap_err();
        assert_eq!(err, Error::InvalidRow { op: "token_logprobs", row: 1, problem });
    }
    let l = [0.0, 0.0, 0.0, f32::NEG_INFINITY, f32::NEG_INFINITY, f32::NEG_INFINITY];
    let err = run(&l, &[0, 1], TokenOutputs::default().logp(&mut logp)).unwrap_err();
    assert_eq!(err, Error::InvalidRow { op: "token_logprobs", row: 1, problem: RowProblem::AllNegInf });

    // Backward.
    let mut grad = [0.0f32; 6];
    let tokens = [0i64, 1];
    let bwd = |grads: &TokenGrads<'_>, grad: &mut [f32]| {
        cpu::token_logprobs_backward(&logits, shape, &Tokens::new(&tokens), grads, grad, &opts)
    };
    let lse = [1.0f32, 1.0];
    assert!(matches!(
        bwd(&TokenGrads::new(&lse), &mut grad),
        Err(Error::InvalidOption { name: "grads", .. })
    ));
    let no_entropy = TokenGrads { grad_entropy: Some(&[1.0f32, 1.0][..]), ..TokenGrads::new(&lse) };
    assert!(matches!(bwd(&no_entropy, &mut grad), Err(Error::InvalidOption { name: "grads.entropy", .. })));
    let err = bwd(&TokenGrads::new(&[1.0, f32::NAN]).grad_logp(&[1.0, 1.0]), &mut grad).unwrap_err();
    assert_eq!(err, Error::InvalidRow { op: "token_logprobs_backward", row: 1, problem: RowProblem::NaN });
    let err = bwd(&TokenGrads::new(&lse).grad_logp(&[f32::INFINITY, 1.0]), &mut grad).unwrap_err();
    assert_eq!(
        err,
        Error::InvalidRow { op: "token_logprobs_backward", row: 0, problem: RowProblem::GradNonFinite }
    );
    assert!(matches!(
        bwd(&TokenGrads::new(&lse).grad_logp(&[1.0]), &mut grad),
        Err(Error::ShapeMismatch { what: "grad_logp", .. })
    ));
    assert!(matches!(
        bwd(&TokenGrads::new(&lse).grad_logp(&[1.0, 1.0]), &mut grad[..5]),
        Err(Error::ShapeMismatch { what: "grad_logits", .. })
    ));

    // Shards: a target no shard holds.
    let mut p = [VocabPartial::EMPTY; 2];
    cpu::vocab_shard_partials(&logits, shape, &Tokens::new(&[0i64, 5]), 0, &mut p, &opts).unwrap();
    let err = cpu::finish_vocab_partials(
        &p,
        1,
        &Tokens::new(&[0i64, 5]),
        TokenOutputs::default().logp(&mut logp),
        &opts,
    );
    assert_eq!(
        err.unwrap_err(),
        Error::InvalidRow { op: "token_logprobs", row: 1, problem: RowProblem::TargetOutOfRange }
    );
}

#[test]
fn index_types_agree() {
    let case = Case::<f32>::random(RowShape::new(9, 100), 1.0, 9);
    let expected = Cpu.forward(&case, true).unwrap();
    let (t32, tu32): (Vec<i32>, Vec<u32>) =
        case.targets.iter().map(|&t| (t as i32, if t < 0 { 0 } else { t as u32 })).unzip();
    let mut logp = vec![0.0f32; 9];
    let opts = case.opts;
    let mask = case.mask.clone().unwrap();
    cpu::token_logprobs(
        &case.logits,
        case.shape,
        &Tokens::new(&t32).with_mask(&mask),
        TokenOutputs::default().logp(&mut logp),
        &opts,
    )
    .unwrap();
    assert!(bits_equal(&logp, &expected.logp));
    // u32 cannot hold -100: those rows use the mask instead.
    let mut mask_u = mask.clone();
    for (m, &t) in mask_u.iter_mut().zip(&case.targets) {
        if t < 0 {
            *m = 0;
        }
    }
    cpu::token_logprobs(
        &case.logits,
        case.shape,
        &Tokens::new(&tu32).with_mask(&mask_u),
        TokenOutputs::default().logp(&mut logp),
        &opts,
    )
    .unwrap();
    assert!(bits_equal(&logp, &expected.logp));
}

fn dtype_strategy() -> impl Strategy<Value = DType> {
    prop_oneof![Just(DType::F32), Just(DType::F16), Just(DType::BF16)]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]

    #[test]
    fn random_shapes_match_the_reference(
        rows in 1usize..9, cols in 1usize..20000, pad in 0usize..9, tau in 0.25f32..4.0,
        dtype in dtype_strategy(), seed in any::<u64>(),
    ) {
        let shape = RowShape::new(rows, cols).with_row_stride(cols + pad);
        match dtype {
            DType::F32 => tokens::check_case(&Cpu, &Case::<f32>::random(shape, tau, seed), seed),
            DType::F16 => tokens::check_case(&Cpu, &Case::<f16>::random(shape, tau, seed), seed),
            DType::BF16 => tokens::check_case(&Cpu, &Case::<bf16>::random(shape, tau, seed), seed),
        }
    }
}
