//! Pipelines written once over `Executor`, run on the CPU executor and, when a GPU (or the
//! emulated device) is there, on the CUDA executor: the three steps of a PPO update (token
//! log-probs, the policy loss with its statistics, the backward in place) held to the CPU ops
//! called directly, and every other op of the executor (log-softmax and its backward, the
//! out-of-place token backward, the exact KL and its backward, moments, aggregate, the KL
//! rewards, the fused path) held across the two executors, and the vocabulary shards (token
//! log-probs, the exact KL and the JSD from two shards) held to the whole rows on both.

use rlhf_kernels::testing::Rng;
use rlhf_kernels::{
    Aggregated, Aggregation, Backend, ExactDivergence, ExactKlGrads, ExactKlOptions, ExactKlOutputs,
    Executor, FusedPolicyInputs, FusedPolicyOptions, FusedPolicyStats, Job, KlDirection, KlEstimator,
    KlRewardsInputs, KlRewardsOptions, LogSoftmaxOptions, Moments, Normaliser, OverlongInputs,
    OverlongOptions, PolicyLossInputs, PolicyLossOptions, PolicyLossOutputs, PolicyLossStats, ReferenceRows,
    Result, RowShape, SampledKlOptions, TokenGrads, TokenLogprobsOptions, TokenOutputs, Tokens, cpu,
};
use rlhf_kernels::{ExactKlPartial, VocabPartial};

/// `[B, T] = [3, 5]` tokens over a vocabulary of 37, the last two tokens of each row padding.
struct Batch {
    logits: Vec<f32>,
    /// The reference policy's logits: the policy's, perturbed.
    reference: Vec<f32>,
    targets: Vec<i64>,
    mask: Vec<u8>,
    old_logp: Vec<f32>,
    advantages: Vec<f32>,
}

const SEQS: RowShape = RowShape { rows: 3, cols: 5, row_stride: 5 };
const SHAPE: RowShape = RowShape { rows: 15, cols: 37, row_stride: 37 };

fn batch() -> Batch {
    let mut rng = Rng::new(7);
    let logits = rng.normals(SHAPE.len(), 3.0);
    Batch {
        reference: logits.iter().map(|&x| x + 0.5 * rng.normal() as f32).collect(),
        logits,
        targets: (0..15).map(|i| (i * 5 % 37) as i64).collect(),
        mask: (0..15).map(|i| u8::from(i % 5 < 3)).collect(),
        old_logp: (0..15).map(|_| (-3.0 - rng.uniform()) as f32).collect(),
        advantages: rng.normals(15, 1.0),
    }
}

/// The pipeline, once: what it produced, downloaded.
struct Step<'a>(&'a Batch);

struct Produced {
    logp: Vec<f32>,
    grad_logits: Vec<f32>,
    stats: PolicyLossStats,
}

impl Job for Step<'_> {
    type Output = Produced;

    fn run<E: Executor>(self, e: &mut E) -> Result<Produced> {
        let b = self.0;
        let (logits, targets, mask) = (e.upload(&b.logits)?, e.upload(&b.targets)?, e.upload(&b.mask)?);
        let (old_logp, advantages) = (e.upload(&b.old_logp)?, e.upload(&b.advantages)?);
        let (mut logp, mut lse, mut grad_logp) =
            (e.zeros::<f32>(15)?, e.zeros::<f32>(15)?, e.zeros::<f32>(15)?);
        let mut grad_logits = e.zeros::<f32>(SHAPE.len())?;
        let mut stats = e.stats::<PolicyLossStats>()?;
        let opts = TokenLogprobsOptions::default();
        let tokens = Tokens::new(E::view(&targets)).with_mask(E::view(&mask));

        let out = TokenOutputs::default().logp(E::view_mut(&mut logp)).lse(E::view_mut(&mut lse));
        e.token_logprobs(E::view(&logits), SHAPE, &tokens, out, &opts)?;
        let inputs = PolicyLossInputs::new(SEQS, E::view(&logp), E::view(&old_logp), E::view(&advantages))
            .mask(E::view(&mask));
        let out = PolicyLossOutputs::default()
            .grad_logp(E::view_mut(&mut grad_logp))
            .stats(E::stats_out(&mut stats));
        e.policy_loss(&inputs, out, &PolicyLossOptions::default())?;
        e.copy(&logits, &mut grad_logits)?;
        let grads = TokenGrads::new(E::view(&lse)).grad_logp(E::view(&grad_logp));
        e.token_logprobs_backward_in_place(E::view_mut(&mut grad_logits), SHAPE, &tokens, &grads, &opts)?;
        e.finish()?;
        Ok(Produced {
            logp: e.download(&logp)?,
            grad_logits: e.download(&grad_logits)?,
            stats: e.read(&stats)?,
        })
    }
}

/// The same step through the CPU functions directly.
fn direct(b: &Batch) -> Produced {
    let opts = TokenLogprobsOptions::default();
    let tokens = Tokens::new(&b.targets).with_mask(&b.mask);
    let (mut logp, mut lse, mut grad_logp) = (vec![0.0f32; 15], vec![0.0f32; 15], vec![0.0f32; 15]);
    cpu::token_logprobs(
        &b.logits,
        SHAPE,
        &tokens,
        TokenOutputs::default().logp(&mut logp).lse(&mut lse),
        &opts,
    )
    .unwrap();
    let inputs = PolicyLossInputs::new(SEQS, &logp, &b.old_logp, &b.advantages).mask(&b.mask);
    let out = PolicyLossOutputs::default().grad_logp(&mut grad_logp);
    let stats = cpu::policy_loss(&inputs, out, &PolicyLossOptions::default()).unwrap();
    let mut grad_logits = b.logits.clone();
    let grads = TokenGrads::new(&lse).grad_logp(&grad_logp);
    cpu::token_logprobs_backward_in_place(&mut grad_logits, SHAPE, &tokens, &grads, &opts).unwrap();
    Produced { logp, grad_logits, stats }
}

#[cfg(feature = "cuda")]
fn check(got: &Produced, want: &Produced, what: &str) {
    use rlhf_kernels::testing::{Tolerance, assert_close};
    let tol = Tolerance::for_dtype(rlhf_kernels::DType::F32).scaled(8.0);
    let f64s = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
    assert_close(&got.logp, &f64s(&want.logp), tol, &format!("{what}: logp"));
    assert_close(&got.grad_logits, &f64s(&want.grad_logits), tol, &format!("{what}: grad logits"));
    let (g, w) = (got.stats, want.stats);
    assert_eq!(g.counts, w.counts, "{what}: counts");
    assert!((g.loss - w.loss).abs() <= 1e-5 * w.loss.abs().max(1.0), "{what}: loss {} vs {}", g.loss, w.loss);
}

#[test]
fn cpu_executor_matches_the_cpu_functions() {
    let b = batch();
    let got = Backend::Cpu.run(Step(&b)).unwrap();
    let want = direct(&b);
    // The executor calls the same functions: bit for bit.
    assert_eq!(got.logp, want.logp);
    assert_eq!(got.grad_logits, want.grad_logits);
    assert_eq!(got.stats, want.stats);
}

#[test]
fn cuda_executor_matches_the_cpu_functions() {
    #[cfg(feature = "cuda")]
    {
        let device = rlhf_kernels::cuda_or_skip!();
        let b = batch();
        let got = Backend::Cuda(device).run(Step(&b)).unwrap();
        check(&got, &direct(&b), "cuda executor");
    }
    #[cfg(not(feature = "cuda"))]
    rlhf_kernels::testing::skip("executor::cuda_executor_matches_the_cpu_functions", "built without `cuda`");
}

/// Every other op of the executor, once: what each produced.
struct Others<'a>(&'a Batch);

#[derive(Debug, Clone, PartialEq)]
struct OthersOut {
    log_softmax: Vec<f32>,
    log_softmax_grad: Vec<f32>,
    token_grad: Vec<f32>,
    exact: Vec<f32>,
    exact_grad: Vec<f32>,
    moments: Moments,
    aggregated: Aggregated,
    rewards: Vec<f32>,
    overlong: Vec<f32>,
    fused_grad: Vec<f32>,
    fused: FusedPolicyStats,
    fused_kl_grad: Vec<f32>,
    fused_kl: FusedPolicyStats,
}

impl Job for Others<'_> {
    type Output = OthersOut;

    fn run<E: Executor>(self, e: &mut E) -> Result<OthersOut> {
        let b = self.0;
        let (logits, reference) = (e.upload(&b.logits)?, e.upload(&b.reference)?);
        let (targets, mask) = (e.upload(&b.targets)?, e.upload(&b.mask)?);
        let (old_logp, advantages) = (e.upload(&b.old_logp)?, e.upload(&b.advantages)?);
        let n = SHAPE.len();
        let ls_opts = LogSoftmaxOptions::default().temperature(0.8);
        let (mut ls, mut ls_grad, upstream) =
            (e.zeros::<f32>(n)?, e.zeros::<f32>(n)?, e.upload(&vec![0.25f32; n])?);
        e.log_softmax(E::view(&logits), SHAPE, E::view_mut(&mut ls), &ls_opts)?;
        e.log_softmax_backward(E::view(&ls), E::view(&upstream), SHAPE, E::view_mut(&mut ls_grad), &ls_opts)?;

        let tokens = Tokens::new(E::view(&targets)).with_mask(E::view(&mask));
        let opts = TokenLogprobsOptions::default();
        let (mut logp, mut lse, mut token_grad) =
            (e.zeros::<f32>(15)?, e.zeros::<f32>(15)?, e.zeros::<f32>(n)?);
        let out = TokenOutputs::default().logp(E::view_mut(&mut logp)).lse(E::view_mut(&mut lse));
        e.token_logprobs(E::view(&logits), SHAPE, &tokens, out, &opts)?;
        let grads = TokenGrads::new(E::view(&lse)).grad_logp(E::view(&advantages));
        e.token_logprobs_backward(
            E::view(&logits),
            SHAPE,
            &tokens,
            &grads,
            E::view_mut(&mut token_grad),
            &opts,
        )?;

        let rows = ReferenceRows::new(E::view(&reference), SHAPE).with_mask(E::view(&mask));
        let kl_opts = ExactKlOptions::new(ExactDivergence::PolicyRef);
        let (mut exact, mut p_lse, mut q_lse) =
            (e.zeros::<f32>(15)?, e.zeros::<f32>(15)?, e.zeros::<f32>(15)?);
        let out = ExactKlOutputs::default()
            .value(E::view_mut(&mut exact))
            .lse(E::view_mut(&mut p_lse), E::view_mut(&mut q_lse));
        e.exact_kl(E::view(&logits), SHAPE, &rows, out, &kl_opts)?;
        let mut exact_grad = e.upload(&b.logits)?;
        let grads =
            ExactKlGrads::new(E::view(&advantages), E::view(&p_lse), E::view(&q_lse)).value(E::view(&exact));
        e.exact_kl_backward_in_place(E::view_mut(&mut exact_grad), SHAPE, &rows, &grads, &kl_opts)?;
        let mut exact_grad_out = e.zeros::<f32>(n)?;
        e.exact_kl_backward(
            E::view(&logits),
            SHAPE,
            &rows,
            &grads,
            E::view_mut(&mut exact_grad_out),
            &kl_opts,
        )?;

        let mut moments = e.stats::<Moments>()?;
        e.masked_moments(E::view(&advantages), SEQS, Some(E::view(&mask)), E::stats_out(&mut moments))?;
        let mut aggregated = e.stats::<Aggregated>()?;
        let (agg, norm) = (Aggregation::SeqMeanTokenMean, Normaliser::Local);
        e.aggregate(E::view(&logp), SEQS, Some(E::view(&mask)), agg, norm, E::stats_out(&mut aggregated))?;
        let (scores, mut rewards) = (e.upload(&[1.0f32, -0.5, 2.0])?, e.zeros::<f32>(15)?);
        let inputs = KlRewardsInputs::new(SEQS, E::view(&exact), E::view(&scores)).mask(E::view(&mask));
        e.kl_rewards(&inputs, E::view_mut(&mut rewards), &KlRewardsOptions::new(0.05))?;
        let mut overlong = e.zeros::<f32>(3)?;
        let inputs = OverlongInputs::new(SEQS, E::view(&scores)).mask(E::view(&mask));
        e.overlong_shaping(&inputs, E::view_mut(&mut overlong), &OverlongOptions::new(SEQS.cols, 3))?;

        let inputs = FusedPolicyInputs::new(tokens, SEQS, E::view(&old_logp), E::view(&advantages));
        let (mut fused_grad, mut fused) = (e.zeros::<f32>(n)?, e.fused_stats()?);
        let fused_opts = FusedPolicyOptions::new(PolicyLossOptions::default().entropy_coef(0.01));
        e.policy_loss_from_logits(
            E::view(&logits),
            SHAPE,
            &inputs,
            E::view_mut(&mut fused_grad),
            &mut fused,
            &fused_opts,
        )?;
        let mut in_place = e.upload(&b.logits)?;
        let mut fused_in_place = e.fused_stats()?;
        e.policy_loss_from_logits_in_place(
            E::view_mut(&mut in_place),
            SHAPE,
            &inputs,
            &mut fused_in_place,
            &fused_opts,
        )?;
        // With a KL term to the reference's log-probs (here: the old ones).
        let (mut fused_kl_grad, mut fused_kl) = (e.zeros::<f32>(n)?, e.fused_stats()?);
        let inputs = inputs.ref_logp(E::view(&old_logp));
        let kl_term = SampledKlOptions::new(KlEstimator::gradient_of(KlDirection::PolicyRef)).coef(0.1);
        let kl_opts = fused_opts.kl(kl_term);
        let grad = E::view_mut(&mut fused_kl_grad);
        e.policy_loss_from_logits(E::view(&logits), SHAPE, &inputs, grad, &mut fused_kl, &kl_opts)?;
        e.finish()?;
        let exact_grad = e.download(&exact_grad)?;
        assert_eq!(exact_grad, e.download(&exact_grad_out)?, "exact backward: in place == out of place");
        let fused_grad = e.download(&fused_grad)?;
        assert_eq!(fused_grad, e.download(&in_place)?, "fused: in place == out of place");
        assert_eq!(e.read_fused(&fused)?, e.read_fused(&fused_in_place)?);
        let fused_kl = e.read_fused(&fused_kl)?;
        assert!(fused_kl.kl.is_some_and(|k| k.loss.is_finite()), "fused with a KL term: {fused_kl:?}");
        Ok(OthersOut {
            log_softmax: e.download(&ls)?,
            log_softmax_grad: e.download(&ls_grad)?,
            token_grad: e.download(&token_grad)?,
            exact: e.download(&exact)?,
            exact_grad,
            moments: e.read(&moments)?,
            aggregated: e.read(&aggregated)?,
            rewards: e.download(&rewards)?,
            overlong: e.download(&overlong)?,
            fused_grad,
            fused: e.read_fused(&fused)?,
            fused_kl_grad: e.download(&fused_kl_grad)?,
            fused_kl,
        })
    }
}

#[test]
fn cpu_executor_runs_every_op() {
    let b = batch();
    let got = Backend::Cpu.run(Others(&b)).unwrap();
    // Spot checks against the CPU functions (the rest forward the same way).
    let mut ls = vec![0.0f32; SHAPE.len()];
    cpu::log_softmax(&b.logits, SHAPE, &mut ls, &LogSoftmaxOptions::default().temperature(0.8)).unwrap();
    assert_eq!(got.log_softmax, ls);
    assert_eq!(got.moments, cpu::masked_moments(&b.advantages, SEQS, Some(&b.mask)).unwrap());
    assert_eq!(got.aggregated.counts, rlhf_kernels::BatchCounts::of(SEQS, Some(&b.mask)));
    assert!(got.fused.total_loss().is_finite() && got.exact.iter().all(|&v| v >= 0.0));
    let mut shaped = [0.0f32; 3];
    let inputs = OverlongInputs::new(SEQS, &[1.0, -0.5, 2.0]).mask(&b.mask);
    cpu::overlong_shaping(&inputs, &mut shaped, &OverlongOptions::new(SEQS.cols, 3)).unwrap();
    assert_eq!(got.overlong, shaped);
}

#[test]
fn cuda_executor_runs_every_op_as_the_cpu() {
    #[cfg(feature = "cuda")]
    {
        use rlhf_kernels::testing::{Tolerance, assert_close};
        let device = rlhf_kernels::cuda_or_skip!();
        let b = batch();
        let (got, want) =
            (Backend::Cuda(device).run(Others(&b)).unwrap(), Backend::Cpu.run(Others(&b)).unwrap());
        let tol = Tolerance::for_dtype(rlhf_kernels::DType::F32).scaled(8.0);
        let f64s = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
        for (what, g, w) in [
            ("log_softmax", &got.log_softmax, &want.log_softmax),
            ("log_softmax backward", &got.log_softmax_grad, &want.log_softmax_grad),
            ("token backward", &got.token_grad, &want.token_grad),
            ("exact KL", &got.exact, &want.exact),
            ("exact KL backward", &got.exact_grad, &want.exact_grad),
            ("kl rewards", &got.rewards, &want.rewards),
            ("overlong shaping", &got.overlong, &want.overlong),
            ("fused gradient", &got.fused_grad, &want.fused_grad),
            ("fused gradient with a KL term", &got.fused_kl_grad, &want.fused_kl_grad),
        ] {
            assert_close(g, &f64s(w), tol, what);
        }
        let close = |a: f64, b: f64, what: &str| {
            assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{what}: {a} vs {b}")
        };
        close(got.moments.mean, want.moments.mean, "moments mean");
        close(got.moments.var, want.moments.var, "moments var");
        assert_eq!(got.moments.count, want.moments.count);
        close(got.aggregated.value, want.aggregated.value, "aggregate");
        assert_eq!(got.aggregated.counts, want.aggregated.counts);
        close(got.fused.total_loss(), want.fused.total_loss(), "fused loss");
        close(got.fused_kl.total_loss(), want.fused_kl.total_loss(), "fused loss with a KL term");
        assert_eq!(got.fused.policy.counts, want.fused.policy.counts);
    }
    #[cfg(not(feature = "cuda"))]
    rlhf_kernels::testing::skip("executor::cuda_executor_runs_every_op_as_the_cpu", "built without `cuda`");
}

/// The shard pipeline, once: the token outputs, the exact KL and the JSD from two vocabulary
/// shards (columns `[0, 16)` and `[16, 37)`, each uploaded by its "rank"), and the same from
/// the whole rows.
struct Shards<'a>(&'a Batch);

/// `(from the shards, from the whole rows)` per output.
struct ShardsOut {
    logp: (Vec<f32>, Vec<f32>),
    lse: (Vec<f32>, Vec<f32>),
    kl: (Vec<f32>, Vec<f32>),
    jsd: (Vec<f32>, Vec<f32>),
}

impl Job for Shards<'_> {
    type Output = ShardsOut;

    fn run<E: Executor>(self, e: &mut E) -> Result<ShardsOut> {
        let b = self.0;
        const CUT: usize = 16;
        let cut = |v: &[f32], lo: usize, hi: usize| -> Vec<f32> {
            (0..SHAPE.rows).flat_map(|r| v[r * SHAPE.cols + lo..r * SHAPE.cols + hi].to_vec()).collect()
        };
        let bounds = [(0, CUT), (CUT, SHAPE.cols)];
        let (targets, mask) = (e.upload(&b.targets)?, e.upload(&b.mask)?);
        let tokens = Tokens::new(E::view(&targets)).with_mask(E::view(&mask));
        let rows = SHAPE.rows;
        let (opts, n) = (TokenLogprobsOptions::default(), rows);
        let mut vocab = e.upload(&vec![VocabPartial::EMPTY; 2 * n])?;
        let mut exact = e.upload(&vec![ExactKlPartial::EMPTY; 2 * n])?;
        let (sum_len, kl_opts) = (2 * n, ExactKlOptions::new(ExactDivergence::PolicyRef));
        let jsd_opts = ExactKlOptions::new(ExactDivergence::Jsd { beta: 0.4 });
        let mut shards = Vec::new();
        for (k, &(lo, hi)) in bounds.iter().enumerate() {
            let shape = RowShape::new(rows, hi - lo);
            let (p, q) = (e.upload(&cut(&b.logits, lo, hi))?, e.upload(&cut(&b.reference, lo, hi))?);
            // Each rank writes its records into its own part of the gathered buffer: here, one
            // shard's records to a buffer of their own, copied in.
            let mut mine = e.zeros::<VocabPartial>(n)?;
            e.vocab_shard_partials(E::view(&p), shape, &tokens, lo, E::view_mut(&mut mine), &opts)?;
            let mut gathered = e.download(&vocab)?;
            gathered[k * n..(k + 1) * n].copy_from_slice(&e.download(&mine)?);
            vocab = e.upload(&gathered)?;
            let mut mine = e.zeros::<ExactKlPartial>(n)?;
            {
                let rr = ReferenceRows::new(E::view(&q), shape).with_mask(E::view(&mask));
                e.exact_kl_shard_partials(E::view(&p), shape, &rr, E::view_mut(&mut mine), &kl_opts)?;
            }
            let mut gathered = e.download(&exact)?;
            gathered[k * n..(k + 1) * n].copy_from_slice(&e.download(&mine)?);
            exact = e.upload(&gathered)?;
            shards.push((shape, p, q));
        }
        let (mut logp, mut token_lse) = (e.zeros::<f32>(n)?, e.zeros::<f32>(n)?);
        let out = TokenOutputs::default().logp(E::view_mut(&mut logp)).lse(E::view_mut(&mut token_lse));
        e.finish_vocab_partials(E::view(&vocab), 2, &tokens, out, &opts)?;
        let (mut kl, mut p_lse, mut q_lse) = (e.zeros::<f32>(n)?, e.zeros::<f32>(n)?, e.zeros::<f32>(n)?);
        let out = ExactKlOutputs::default()
            .value(E::view_mut(&mut kl))
            .lse(E::view_mut(&mut p_lse), E::view_mut(&mut q_lse));
        e.finish_exact_kl_partials(E::view(&exact), Some(E::view(&mask)), out, &kl_opts)?;
        // The JSD's second round from the merged normalisers (the same for every divergence).
        let mut sums = vec![0.0f32; 2 * sum_len];
        for (k, (shape, p, q)) in shards.iter().enumerate() {
            let rr = ReferenceRows::new(E::view(q), *shape).with_mask(E::view(&mask));
            let mut mine = e.zeros::<f32>(sum_len)?;
            let lse = (E::view(&p_lse), E::view(&q_lse));
            e.jsd_shard_sums(E::view(p), *shape, &rr, lse.0, lse.1, E::view_mut(&mut mine), &jsd_opts)?;
            sums[k * sum_len..(k + 1) * sum_len].copy_from_slice(&e.download(&mine)?);
        }
        let (sums, mut jsd) = (e.upload(&sums)?, e.zeros::<f32>(n)?);
        let out = ExactKlOutputs::default().value(E::view_mut(&mut jsd));
        let lse = [E::view(&p_lse), E::view(&q_lse)];
        e.finish_jsd_sums(E::view(&sums), Some(E::view(&mask)), lse, out, &jsd_opts)?;

        // The whole rows.
        let (logits, reference) = (e.upload(&b.logits)?, e.upload(&b.reference)?);
        let (mut whole_logp, mut whole_lse) = (e.zeros::<f32>(n)?, e.zeros::<f32>(n)?);
        let out = TokenOutputs::default().logp(E::view_mut(&mut whole_logp)).lse(E::view_mut(&mut whole_lse));
        e.token_logprobs(E::view(&logits), SHAPE, &tokens, out, &opts)?;
        let rr = ReferenceRows::new(E::view(&reference), SHAPE).with_mask(E::view(&mask));
        let (mut whole_kl, mut whole_jsd) = (e.zeros::<f32>(n)?, e.zeros::<f32>(n)?);
        e.exact_kl(
            E::view(&logits),
            SHAPE,
            &rr,
            ExactKlOutputs::default().value(E::view_mut(&mut whole_kl)),
            &kl_opts,
        )?;
        let out = ExactKlOutputs::default().value(E::view_mut(&mut whole_jsd));
        e.exact_kl(E::view(&logits), SHAPE, &rr, out, &jsd_opts)?;
        e.finish()?;
        let d = |e: &E, a: &E::Buffer<f32>, b: &E::Buffer<f32>| {
            Ok::<_, rlhf_kernels::Error>((e.download(a)?, e.download(b)?))
        };
        Ok(ShardsOut {
            logp: d(e, &logp, &whole_logp)?,
            lse: d(e, &token_lse, &whole_lse)?,
            kl: d(e, &kl, &whole_kl)?,
            jsd: d(e, &jsd, &whole_jsd)?,
        })
    }
}

/// The shards' outputs against the whole rows' (a different order of the same f32 sums).
fn check_shards(got: &ShardsOut, what: &str) {
    for (name, (shards, whole)) in
        [("logp", &got.logp), ("lse", &got.lse), ("kl", &got.kl), ("jsd", &got.jsd)]
    {
        let close = shards.iter().zip(whole).all(|(a, b)| (a - b).abs() <= 1e-5 * (1.0 + b.abs()));
        assert!(close, "{what} {name}: shards {shards:?} vs whole {whole:?}");
        assert!(shards.iter().all(|x| x.is_finite()), "{what} {name}: {shards:?}");
    }
    assert!(got.jsd.0.iter().any(|&v| v > 0.0), "{what}: the JSD is not all 0");
}

#[test]
fn shards_merge_to_the_whole_rows_on_every_executor() {
    let b = batch();
    let cpu = Backend::Cpu.run(Shards(&b)).unwrap();
    check_shards(&cpu, "cpu");
    #[cfg(feature = "cuda")]
    {
        let device = rlhf_kernels::cuda_or_skip!();
        let gpu = Backend::Cuda(device).run(Shards(&b)).unwrap();
        check_shards(&gpu, "cuda");
        // The same merges on both: the shard results agree across the executors too.
        for (name, g, c) in
            [("kl", &gpu.kl, &cpu.kl), ("jsd", &gpu.jsd, &cpu.jsd), ("logp", &gpu.logp, &cpu.logp)]
        {
            let close = g.0.iter().zip(&c.0).all(|(a, b)| (a - b).abs() <= 1e-5 * (1.0 + b.abs()));
            assert!(close, "{name}: cuda {:?} vs cpu {:?}", g.0, c.0);
        }
    }
    #[cfg(not(feature = "cuda"))]
    rlhf_kernels::testing::skip(
        "executor::shards_merge_to_the_whole_rows_on_every_executor",
        "built without `cuda`",
    );
}

#[test]
fn executor_errors_are_typed() {
    // A shape mismatch reaches the caller as the op's error, not a panic.
    struct Bad;
    impl Job for Bad {
        type Output = ();
        fn run<E: Executor>(self, e: &mut E) -> Result<()> {
            let (logits, targets) = (e.upload(&[0.0f32; 6])?, e.upload(&[0i64; 2])?);
            let mut logp = e.zeros::<f32>(3)?;
            let out = TokenOutputs::default().logp(E::view_mut(&mut logp));
            let tokens = Tokens::new(E::view(&targets));
            e.token_logprobs(
                E::view(&logits),
                RowShape::new(3, 2),
                &tokens,
                out,
                &TokenLogprobsOptions::default(),
            )
        }
    }
    assert!(matches!(Backend::Cpu.run(Bad), Err(rlhf_kernels::Error::ShapeMismatch { what: "targets", .. })));
    // The JSD's sums are pairs of f32: an odd buffer is a shape error on the host too.
    struct OddSums;
    impl Job for OddSums {
        type Output = ();
        fn run<E: Executor>(self, e: &mut E) -> Result<()> {
            let (sums, lse, mut value) =
                (e.upload(&[0.0f32; 3])?, e.upload(&[0.0f32; 1])?, e.zeros::<f32>(1)?);
            let out = ExactKlOutputs::default().value(E::view_mut(&mut value));
            let opts = ExactKlOptions::new(ExactDivergence::Jsd { beta: 0.5 });
            e.finish_jsd_sums(E::view(&sums), None, [E::view(&lse), E::view(&lse)], out, &opts)
        }
    }
    assert!(matches!(Backend::Cpu.run(OddSums), Err(rlhf_kernels::Error::ShapeMismatch { .. })));
}
