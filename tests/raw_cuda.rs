//! The raw layer of the ops the Python module and other pointer-owning callers reach (sampled
//! KL, KL-in-reward shaping, the aggregation, moments and whitening, the value loss, the fused
//! path from the logits with a caller's workspace, the vocabulary shards of the token log-probs
//! and of the exact divergences), each held
//! bitwise to its safe twin on the same inputs, with its status word and a refused null pointer.
//! Skips visibly without a GPU; `RLHF_KERNELS_REQUIRE_GPU=1` makes that a failure.

#[macro_use]
mod common;

use rlhf_kernels::cuda_or_skip;

#[cfg(feature = "cuda")]
mod gpu {
    use std::sync::Arc;

    use super::common::advantages::AdvantagesBackend;
    use super::common::gpu::Gpu;
    use super::common::kl::{SampledBackend, SampledCase};
    use super::common::ppo::{self, FusedBackend, FusedCase, PpoBackend, ValueCase};
    use rlhf_kernels::cuda::raw::{self, RawStream};
    use rlhf_kernels::cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr};
    use rlhf_kernels::{
        Aggregation, DType, Error, FusedPolicyOptions, IndexType, KlEstimator, KlRewardsInputs,
        KlRewardsOptions, Normaliser, PolicyLossOptions, RowProblem, RowShape, SampledKlOptions,
        TokenLogprobsOptions, ValueLossOptions, WhitenOptions, bf16,
    };

    const SHAPE: RowShape = RowShape::new(6, 70).with_row_stride(73);

    fn stream(s: &Arc<CudaStream>) -> RawStream {
        RawStream { ordinal: s.context().ordinal(), stream: s.cu_stream() }
    }

    fn same(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
    }

    fn up<T: DeviceRepr>(s: &Arc<CudaStream>, v: &[T]) -> CudaSlice<T> {
        s.clone_htod(v).unwrap()
    }

    fn clear_status(s: &Arc<CudaStream>) -> CudaSlice<u64> {
        up(s, &[raw::STATUS_CLEAR])
    }

    fn status_of(s: &Arc<CudaStream>, st: &CudaSlice<u64>) -> rlhf_kernels::Result<()> {
        raw::decode_status(s.clone_dtoh(st).unwrap()[0])
    }

    pub fn sampled_kl(gpu: &Gpu) {
        let s = &gpu.0;
        let mut c = SampledCase::random(SHAPE, 61);
        c.opts = SampledKlOptions::new(KlEstimator::K2).coef(0.05).log_ratio_clamp(Some(10.0));
        let (values, grad, stats) = gpu.sampled(&c).unwrap();
        let n = SHAPE.rows * SHAPE.row_stride;
        let (lp, rlp, mask) = (up(s, &c.logp), up(s, &c.ref_logp), up(s, c.mask.as_ref().unwrap()));
        let (mut v, mut g) = (up(s, &vec![f32::NAN; n]), up(s, &vec![f32::NAN; n]));
        let mut words = s.alloc_zeros::<f64>(raw::SAMPLED_KL_STATS_WORDS).unwrap();
        let mut st = clear_status(s);
        {
            let (a, _a) = lp.device_ptr(s);
            let (b, _b) = rlp.device_ptr(s);
            let (m, _c) = mask.device_ptr(s);
            let (vp, _d) = v.device_ptr_mut(s);
            let (gp, _e) = g.device_ptr_mut(s);
            let (sp, _f) = words.device_ptr_mut(s);
            let (stp, _g) = st.device_ptr_mut(s);
            let args = raw::SampledKlArgs {
                shape: SHAPE,
                logp: a,
                ref_logp: b,
                mask: m,
                old_logp: 0,
                values: vp,
                grad_logp: gp,
                stats: sp,
                workspace: 0,
                status: stp,
            };
            // SAFETY: the buffers were allocated above on this context, cover the shape, and
            // live until the synchronising copies below.
            unsafe { raw::sampled_kl(stream(s), &args, &c.opts) }.unwrap();
            let null = raw::SampledKlArgs { ref_logp: 0, ..args };
            // SAFETY: refused before any launch.
            let err = unsafe { raw::sampled_kl(stream(s), &null, &c.opts) }.unwrap_err();
            assert!(matches!(err, Error::InvalidOption { name: "ref_logp", .. }), "{err}");
            let none = raw::SampledKlArgs { values: 0, grad_logp: 0, stats: 0, ..args };
            // SAFETY: refused before any launch (no output).
            assert!(unsafe { raw::sampled_kl(stream(s), &none, &c.opts) }.is_err());
        }
        status_of(s, &st).unwrap();
        assert!(same(&s.clone_dtoh(&v).unwrap(), &values), "raw values differ from the safe path");
        assert!(same(&s.clone_dtoh(&g).unwrap(), &grad), "raw grad differs from the safe path");
        assert_eq!(raw::sampled_kl_stats_from_words(&s.clone_dtoh(&words).unwrap()).unwrap(), stats);
    }

    pub fn kl_rewards(gpu: &Gpu) {
        let s = &gpu.0;
        let c = SampledCase::random(SHAPE, 62);
        let scores: Vec<f32> = (0..SHAPE.rows).map(|i| i as f32 - 2.5).collect();
        let expected = gpu
            .rewards(
                &KlRewardsInputs { mask: c.mask.as_deref(), ..KlRewardsInputs::new(SHAPE, &c.logp, &scores) },
                &KlRewardsOptions::new(0.1),
            )
            .unwrap();
        let n = SHAPE.rows * SHAPE.row_stride;
        let (kl, mask, sc) = (up(s, &c.logp), up(s, c.mask.as_ref().unwrap()), up(s, &scores));
        let mut r = up(s, &vec![f32::NAN; n]);
        let mut st = clear_status(s);
        {
            let (k, _a) = kl.device_ptr(s);
            let (m, _b) = mask.device_ptr(s);
            let (scp, _c) = sc.device_ptr(s);
            let (rp, _d) = r.device_ptr_mut(s);
            let (stp, _e) = st.device_ptr_mut(s);
            let args =
                raw::KlRewardsArgs { shape: SHAPE, kl: k, mask: m, scores: scp, rewards: rp, status: stp };
            // SAFETY: as in `sampled_kl`.
            unsafe { raw::kl_rewards(stream(s), &args, &KlRewardsOptions::new(0.1)) }.unwrap();
            // SAFETY: refused before any launch.
            assert!(
                unsafe {
                    raw::kl_rewards(
                        stream(s),
                        &raw::KlRewardsArgs { scores: 0, ..args },
                        &KlRewardsOptions::new(0.1),
                    )
                }
                .is_err()
            );
            // SAFETY: refused before any launch (β must be finite).
            assert!(unsafe { raw::kl_rewards(stream(s), &args, &KlRewardsOptions::new(f32::NAN)) }.is_err());
        }
        status_of(s, &st).unwrap();
        assert!(same(&s.clone_dtoh(&r).unwrap(), &expected), "raw rewards differ from the safe path");
    }

    pub fn aggregate(gpu: &Gpu) {
        let s = &gpu.0;
        let c = SampledCase::random(SHAPE, 63);
        let mask = c.mask.as_deref();
        let mut values = c.logp.clone();
        for (mode, norm) in [
            (Aggregation::SeqMeanTokenMean, Normaliser::Local),
            (
                Aggregation::TokenMean,
                Normaliser::Global { valid_tokens: 500.0, valid_sequences: 9.0, sequences: 12.0 },
            ),
        ] {
            let expected = gpu.aggregate(&values, SHAPE, mask, mode, norm).unwrap();
            let (v, m) = (up(s, &values), up(s, c.mask.as_ref().unwrap()));
            let mut out = s.alloc_zeros::<f64>(4).unwrap();
            let mut work = s.alloc_zeros::<u8>(rlhf_kernels::cuda::aggregate_workspace_bytes(SHAPE)).unwrap();
            let mut st = clear_status(s);
            {
                let (vp, _a) = v.device_ptr(s);
                let (mp, _b) = m.device_ptr(s);
                let (op, _c) = out.device_ptr_mut(s);
                let (wp, _d) = work.device_ptr_mut(s);
                let (stp, _e) = st.device_ptr_mut(s);
                let args = raw::ReductionArgs {
                    shape: SHAPE,
                    values: vp,
                    mask: mp,
                    out: op,
                    workspace: wp,
                    status: stp,
                };
                // SAFETY: as in `sampled_kl`; the workspace holds aggregate_workspace_bytes.
                unsafe { raw::aggregate(stream(s), &args, mode, norm) }.unwrap();
                // SAFETY: refused before any launch.
                assert!(
                    unsafe { raw::aggregate(stream(s), &raw::ReductionArgs { out: 0, ..args }, mode, norm) }
                        .is_err()
                );
            }
            status_of(s, &st).unwrap();
            assert_eq!(s.clone_dtoh(&out).unwrap()[0].to_bits(), expected.to_bits(), "{mode:?}");
        }
        // A NaN at a valid token is reported in the status word.
        let t = SHAPE.row_start(2);
        values[t] = f32::NAN;
        let (v, mut out, mut st) = (up(s, &values), s.alloc_zeros::<f64>(4).unwrap(), clear_status(s));
        {
            let (vp, _a) = v.device_ptr(s);
            let (op, _b) = out.device_ptr_mut(s);
            let (stp, _c) = st.device_ptr_mut(s);
            let args =
                raw::ReductionArgs { shape: SHAPE, values: vp, mask: 0, out: op, workspace: 0, status: stp };
            // SAFETY: as in `sampled_kl`.
            unsafe { raw::aggregate(stream(s), &args, Aggregation::TokenMean, Normaliser::Local) }.unwrap();
        }
        let err = status_of(s, &st).unwrap_err();
        assert_eq!(err, Error::InvalidRow { op: "aggregate", row: 2, problem: RowProblem::NonFinite });
    }

    pub fn moments_and_whiten(gpu: &Gpu) {
        let s = &gpu.0;
        let c = SampledCase::random(SHAPE, 64);
        let mask = c.mask.as_deref();
        let expected = gpu.moments(&c.logp, SHAPE, mask).unwrap();
        let opts = WhitenOptions::default().keep_mean(true);
        let (whitened, _) = gpu.whiten(&c.logp, SHAPE, mask, &opts).unwrap();
        for whiten in [false, true] {
            let (mut v, m) = (up(s, &c.logp[..SHAPE.min_len()]), up(s, c.mask.as_ref().unwrap()));
            let mut out = s.alloc_zeros::<f64>(5).unwrap();
            let mut st = clear_status(s);
            {
                let (vp, _a) = v.device_ptr_mut(s);
                let (mp, _b) = m.device_ptr(s);
                let (op, _c) = out.device_ptr_mut(s);
                let (stp, _d) = st.device_ptr_mut(s);
                let args = raw::ReductionArgs {
                    shape: SHAPE,
                    values: vp,
                    mask: mp,
                    out: op,
                    workspace: 0,
                    status: stp,
                };
                // SAFETY: as in `sampled_kl`.
                let r = unsafe {
                    if whiten {
                        raw::whiten(stream(s), &args, &opts)
                    } else {
                        raw::masked_moments(stream(s), &args)
                    }
                };
                r.unwrap();
                // SAFETY: refused before any launch.
                assert!(
                    unsafe { raw::masked_moments(stream(s), &raw::ReductionArgs { values: 0, ..args }) }
                        .is_err()
                );
            }
            status_of(s, &st).unwrap();
            let w = s.clone_dtoh(&out).unwrap();
            assert_eq!(
                [w[0], w[1], w[2], w[3], w[4]],
                [expected.count, expected.mean, expected.var, expected.min, expected.max]
            );
            if whiten {
                let got = s.clone_dtoh(&v).unwrap();
                let valid = |v: &[f32]| -> Vec<f32> {
                    (0..SHAPE.rows).flat_map(|r| v[SHAPE.row_range(r)].to_vec()).collect()
                };
                assert!(same(&valid(&got), &valid(&whitened)), "raw whitening differs from the safe path");
            }
        }
    }

    pub fn value_loss(gpu: &Gpu) {
        let s = &gpu.0;
        let c = ValueCase::random(SHAPE, 65);
        let opts = ValueLossOptions::default().clip(Some(0.2)).aggregation(Aggregation::SeqMeanTokenSum);
        let (loss, grad, stats) = gpu.value(&c, &opts).unwrap();
        let n = SHAPE.min_len();
        let (v, old, ret, m) =
            (up(s, &c.values), up(s, &c.old_values), up(s, &c.returns), up(s, c.mask.as_ref().unwrap()));
        let (mut l, mut g) = (s.alloc_zeros::<f32>(n).unwrap(), s.alloc_zeros::<f32>(n).unwrap());
        let mut words = s.alloc_zeros::<f64>(raw::VALUE_STATS_WORDS).unwrap();
        let mut st = clear_status(s);
        {
            let (vp, _a) = v.device_ptr(s);
            let (op, _b) = old.device_ptr(s);
            let (rp, _c) = ret.device_ptr(s);
            let (mp, _d) = m.device_ptr(s);
            let (lp, _e) = l.device_ptr_mut(s);
            let (gp, _f) = g.device_ptr_mut(s);
            let (sp, _g) = words.device_ptr_mut(s);
            let (stp, _h) = st.device_ptr_mut(s);
            let args = raw::ValueLossArgs {
                shape: SHAPE,
                values: vp,
                old_values: op,
                returns: rp,
                mask: mp,
                loss: lp,
                grad_values: gp,
                stats: sp,
                workspace: 0,
                status: stp,
            };
            // SAFETY: as in `sampled_kl`.
            unsafe { raw::value_loss(stream(s), &args, &opts) }.unwrap();
            // SAFETY: refused before any launch.
            assert!(
                unsafe { raw::value_loss(stream(s), &raw::ValueLossArgs { returns: 0, ..args }, &opts) }
                    .is_err()
            );
        }
        status_of(s, &st).unwrap();
        let dense = |v: &[f32]| -> Vec<f32> {
            (0..SHAPE.rows).flat_map(|r| v[SHAPE.row_range(r)].to_vec()).collect()
        };
        assert!(same(&dense(&s.clone_dtoh(&l).unwrap()), &loss), "raw loss differs from the safe path");
        assert!(same(&dense(&s.clone_dtoh(&g).unwrap()), &grad), "raw grad differs from the safe path");
        assert_eq!(raw::value_stats_from_words(&s.clone_dtoh(&words).unwrap()).unwrap(), stats);
    }

    /// The fused path on raw pointers with a caller's workspace, out of place and in place,
    /// with and without the KL term: bitwise the safe path's gradient and statistics.
    pub fn fused_path(gpu: &Gpu) {
        let s = &gpu.0;
        for (with_kl, in_place) in [(false, false), (true, false), (true, true)] {
            let c = FusedCase::<bf16>::random(3, 7, 1000, 1003, with_kl, 66);
            let opts = PolicyLossOptions::default().entropy_coef(0.01);
            let (expected, stats) = gpu.fused(&c, &c.options(&opts), in_place).unwrap();
            let need = raw::fused_workspace_bytes(c.shape, DType::BF16, c.sequences);
            let mut logits = up(s, &c.logits);
            let mut grad = up(s, &vec![bf16::from_f32(f32::NAN); c.logits.len()]);
            let (targets, mask) = (up(s, &c.targets), up(s, &c.mask));
            let (old, adv) = (up(s, &c.old_logp), up(s, &c.advantages));
            let ref_logp = up(s, c.ref_logp.as_deref().unwrap_or(&[0.0]));
            let mut words =
                s.alloc_zeros::<f64>(raw::POLICY_STATS_WORDS + raw::SAMPLED_KL_STATS_WORDS).unwrap();
            let mut work = s.alloc_zeros::<u8>(need).unwrap();
            let mut st = clear_status(s);
            {
                let (lp, _a) = logits.device_ptr_mut(s);
                let (gp, _b) = grad.device_ptr_mut(s);
                let (tp, _c) = targets.device_ptr(s);
                let (mp, _d) = mask.device_ptr(s);
                let (op, _e) = old.device_ptr(s);
                let (ap, _f) = adv.device_ptr(s);
                let (rp, _g) = ref_logp.device_ptr(s);
                let (sp, _h) = words.device_ptr_mut(s);
                let (wp, _i) = work.device_ptr_mut(s);
                let (stp, _j) = st.device_ptr_mut(s);
                let args = raw::FusedPolicyArgs {
                    logits: lp,
                    dtype: DType::BF16,
                    shape: c.shape,
                    targets: tp,
                    index_type: IndexType::I64,
                    mask: mp,
                    sequences: c.sequences,
                    old_logp: op,
                    advantages: ap,
                    ref_logp: if with_kl { rp } else { 0 },
                    grad_logits: if in_place { lp } else { gp },
                    policy_stats: sp,
                    kl_stats: if with_kl { sp + 8 * raw::POLICY_STATS_WORDS as u64 } else { 0 },
                    workspace: wp,
                    status: stp,
                };
                let fused = c.options(&opts);
                // SAFETY: the buffers were allocated above on this context, cover the shapes, the
                // workspace holds fused_workspace_bytes, and all live until the copies below.
                unsafe { raw::policy_loss_from_logits(stream(s), &args, &fused) }.unwrap();
                let mismatched = raw::FusedPolicyArgs { ref_logp: 0, ..args };
                let with_kl_opts = FusedPolicyOptions::new(opts).kl(ppo::fused_kl());
                // SAFETY: refused before any launch: KL options without the reference.
                assert!(
                    unsafe { raw::policy_loss_from_logits(stream(s), &mismatched, &with_kl_opts) }.is_err()
                );
            }
            status_of(s, &st).unwrap();
            let got = s.clone_dtoh(if in_place { &logits } else { &grad }).unwrap();
            let same_bits = got.len() == expected.len()
                && got.iter().zip(&expected).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same_bits, "raw fused gradient differs (kl {with_kl}, in place {in_place})");
            let w = s.clone_dtoh(&words).unwrap();
            assert_eq!(raw::policy_stats_from_words(&w[..raw::POLICY_STATS_WORDS]).unwrap(), stats.policy);
            if with_kl {
                let kl_stats = raw::sampled_kl_stats_from_words(&w[raw::POLICY_STATS_WORDS..]).unwrap();
                assert_eq!(Some(kl_stats), stats.kl);
            }
        }
    }

    /// Two vocabulary shards of the same rows through the raw shard ops: the merged log-probs,
    /// entropies and lse match the whole-row forward (f32 rounding apart), and a null buffer
    /// is refused.
    pub fn vocab_shards(gpu: &Gpu) {
        use super::common::tokens::{Case, TokenBackend};
        let s = &gpu.0;
        let (rows, v, half) = (5usize, 1000usize, 381usize);
        let case = Case::<f32>::random(RowShape::new(rows, v), 1.0, 67);
        let whole = TokenBackend::forward(gpu, &case, true).unwrap();
        let (logits, targets) = (up(s, &case.logits), up(s, &case.targets));
        let mask = up(s, case.mask.as_deref().unwrap_or(&vec![1u8; rows]));
        let mut partials =
            s.alloc_zeros::<u8>(2 * rows * std::mem::size_of::<rlhf_kernels::VocabPartial>()).unwrap();
        let mut outs = s.alloc_zeros::<f32>(3 * rows).unwrap();
        let mut st = clear_status(s);
        let opts = TokenLogprobsOptions::default();
        {
            let (x, _a) = logits.device_ptr(s);
            let (t, _b) = targets.device_ptr(s);
            let (m, _c) = mask.device_ptr(s);
            let (p, _d) = partials.device_ptr_mut(s);
            let (o, _e) = outs.device_ptr_mut(s);
            let (stp, _f) = st.device_ptr_mut(s);
            let record = std::mem::size_of::<rlhf_kernels::VocabPartial>() as u64;
            for (k, (lo, width)) in [(0usize, half), (half, v - half)].into_iter().enumerate() {
                let args = raw::VocabShardArgs {
                    logits: x + 4 * lo as u64,
                    dtype: DType::F32,
                    shape: RowShape::new(rows, width).with_row_stride(v),
                    targets: t,
                    index_type: IndexType::I64,
                    mask: m,
                    vocab_offset: lo,
                    partials: p + k as u64 * rows as u64 * record,
                };
                // SAFETY: the buffers were allocated above on this context and cover the shard's
                // rows and records; they live until the copies below.
                unsafe { raw::vocab_shard_partials(stream(s), &args, &opts) }.unwrap();
            }
            let args = raw::FinishVocabArgs {
                partials: p,
                shards: 2,
                rows,
                targets: t,
                index_type: IndexType::I64,
                mask: m,
                logp: o,
                entropy: o + 4 * rows as u64,
                lse: o + 8 * rows as u64,
                status: stp,
            };
            // SAFETY: as above; `partials` holds the two shards' records [shards][rows].
            unsafe { raw::finish_vocab_partials(stream(s), &args, &opts) }.unwrap();
            // SAFETY: refused before any launch.
            assert!(
                unsafe {
                    raw::finish_vocab_partials(
                        stream(s),
                        &raw::FinishVocabArgs { partials: 0, ..args },
                        &opts,
                    )
                }
                .is_err()
            );
        }
        status_of(s, &st).unwrap();
        let o = s.clone_dtoh(&outs).unwrap();
        let close =
            |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-5 * (1.0 + y.abs()));
        assert!(close(&o[..rows], &whole.logp), "sharded logp {:?} vs {:?}", &o[..rows], whole.logp);
        assert!(close(&o[rows..2 * rows], &whole.entropy), "sharded entropy");
        assert!(close(&o[2 * rows..], &whole.lse), "sharded lse");
    }
    /// The exact divergences over two vocabulary shards through the raw layer (partials, merge;
    /// for the JSD the second round and its merge) equal the safe sharded path bit for bit, and
    /// the raw merges refuse a null pointer, a JSD value asked of the first merge and
    /// misaligned sums before any launch.
    pub fn exact_shards(gpu: &Gpu) {
        use super::common::kl::{ExactBackend, ExactCase};
        use rlhf_kernels::{ExactDivergence, ExactKlOptions, ExactKlPartial};
        let s = &gpu.0;
        let (rows, cols) = (5usize, 1000usize);
        for divergence in [ExactDivergence::PolicyRef, ExactDivergence::Jsd { beta: 0.3 }] {
            let c = ExactCase::<f32, bf16>::random(rows, cols, divergence, 1.0, 71);
            let shards = c.shards(&[0, 381, cols]);
            let want = gpu.forward_sharded(&c, &shards).unwrap();
            let jsd = matches!(divergence, ExactDivergence::Jsd { .. });
            let up_shards: Vec<_> =
                shards.iter().map(|sh| (up(s, &sh.policy), up(s, &sh.reference))).collect();
            let mask = up(s, c.mask.as_ref().unwrap());
            let record = std::mem::size_of::<ExactKlPartial>();
            let mut partials = s.alloc_zeros::<u8>(2 * rows * record).unwrap();
            let mut sums = s.alloc_zeros::<f32>(2 * 2 * rows).unwrap();
            let mut outs = up(s, &vec![f32::NAN; 4 * rows]);
            let mut st = clear_status(s);
            let opts: &ExactKlOptions = &c.opts;
            {
                let (m, _a) = mask.device_ptr(s);
                let (pp, _b) = partials.device_ptr_mut(s);
                let (sm, _c) = sums.device_ptr_mut(s);
                let (o, _d) = outs.device_ptr_mut(s);
                let (stp, _e) = st.device_ptr_mut(s);
                let out = |k: u64| o + 4 * k * rows as u64;
                let ptrs: Vec<_> =
                    up_shards.iter().map(|(p, q)| (p.device_ptr(s), q.device_ptr(s))).collect();
                let pair = |k: usize| {
                    let shape = shards[k].shape;
                    let ((policy, _), (reference, _)) = &ptrs[k];
                    raw::PairArgs {
                        policy: *policy,
                        policy_dtype: DType::F32,
                        policy_shape: shape,
                        reference: *reference,
                        ref_dtype: DType::BF16,
                        ref_shape: shape,
                        mask: m,
                    }
                };
                for k in 0..2 {
                    let args =
                        raw::ExactKlShardArgs { pair: pair(k), partials: pp + (k * rows * record) as u64 };
                    // SAFETY: the buffers were allocated above on this context and cover the
                    // shard's rows and records; they live until the copies below.
                    unsafe { raw::exact_kl_shard_partials(stream(s), &args, opts) }.unwrap();
                }
                let (value, term) = if jsd { (0, 0) } else { (out(0), out(3)) };
                let finish = raw::FinishExactKlArgs {
                    partials: pp,
                    shards: 2,
                    rows,
                    mask: m,
                    value,
                    policy_lse: out(1),
                    ref_lse: out(2),
                    policy_term: term,
                    status: stp,
                };
                // SAFETY: as above; the partials hold both shards' records [shards][rows].
                unsafe { raw::finish_exact_kl_partials(stream(s), &finish, opts) }.unwrap();
                // SAFETY: refused before any launch.
                let null = unsafe {
                    raw::finish_exact_kl_partials(
                        stream(s),
                        &raw::FinishExactKlArgs { partials: 0, ..finish },
                        opts,
                    )
                };
                assert!(matches!(null, Err(Error::InvalidOption { name: "partials", .. })), "{null:?}");
                if jsd {
                    // SAFETY: refused before any launch (the JSD's value comes from the second round).
                    let value = unsafe {
                        raw::finish_exact_kl_partials(
                            stream(s),
                            &raw::FinishExactKlArgs { value: out(0), ..finish },
                            opts,
                        )
                    };
                    assert!(matches!(value, Err(Error::InvalidOption { name: "outputs", .. })), "{value:?}");
                    for k in 0..2 {
                        let args = raw::JsdShardArgs {
                            pair: pair(k),
                            policy_lse: out(1),
                            ref_lse: out(2),
                            sums: sm + (8 * k * rows) as u64,
                        };
                        // SAFETY: as above; the sums hold 2·rows f32 per shard, 8-byte aligned.
                        unsafe { raw::jsd_shard_sums(stream(s), &args, opts) }.unwrap();
                    }
                    let finish = raw::FinishJsdArgs {
                        sums: sm,
                        shards: 2,
                        rows,
                        mask: m,
                        policy_lse: out(1),
                        ref_lse: out(2),
                        value: out(0),
                        policy_term: out(3),
                    };
                    // SAFETY: refused before any launch: the sums must be read as float2.
                    let misaligned = unsafe {
                        raw::finish_jsd_sums(stream(s), &raw::FinishJsdArgs { sums: sm + 4, ..finish }, opts)
                    };
                    assert!(
                        matches!(misaligned, Err(Error::InvalidOption { name: "sums", .. })),
                        "{misaligned:?}"
                    );
                    // SAFETY: as above.
                    unsafe { raw::finish_jsd_sums(stream(s), &finish, opts) }.unwrap();
                }
            }
            status_of(s, &st).unwrap();
            let o = s.clone_dtoh(&outs).unwrap();
            let what = format!("{divergence:?}");
            assert!(same(&o[..rows], &want.value), "{what} value {:?} vs {:?}", &o[..rows], want.value);
            assert!(same(&o[rows..2 * rows], &want.policy_lse), "{what} policy lse");
            assert!(same(&o[2 * rows..3 * rows], &want.ref_lse), "{what} ref lse");
            if !jsd {
                // The safe sharded path writes no policy term; for the two KLs it is the value.
                assert!(same(&o[3 * rows..], &want.value), "{what} policy term");
            }
        }
    }
}

gpu_test!(exact_shards);
gpu_test!(fused_path);
gpu_test!(vocab_shards);
gpu_test!(sampled_kl);
gpu_test!(kl_rewards);
gpu_test!(aggregate);
gpu_test!(moments_and_whiten);
gpu_test!(value_loss);
