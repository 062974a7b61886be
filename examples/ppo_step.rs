//! The main job: the kernels of one PPO / GRPO training step on a synthetic batch, on the best
//! backend, each stage checked against the f64 reference, with timings. The step is written
//! once, over [`Executor`](rlhf_kernels::Executor) (`step` below): [`Backend::run`] runs it on
//! the CPU or on the GPU's stream.
//!
//! Stages:
//! 1. policy forward: per-token log-prob of the sampled tokens, entropy and lse from the
//!    policy logits, never materialising the `[N, V]` log-softmax;
//! 2. reference forward: per-token log-prob under the reference policy's logits;
//! 3. KL to the reference, in either placement (`--kl`): as a loss term (the gradient-correct
//!    estimator for `KL[π‖π_ref]`, β·token-mean, no importance ratio), or the per-token k1
//!    estimate that GAE folds into the rewards (`r_t = −β·k1_t`; PPO path only);
//! 4. advantages (`--estimator`): GAE with a critic's values (the PPO path; γ = 1, λ = 0.95,
//!    the KL penalty `−β·k1_t` fused into the scan in the reward placement, the score on the
//!    last valid token), then whitened over the batch's valid tokens; or GRPO over groups of
//!    4 responses (the critic-free path), broadcast to every valid token;
//! 5. losses: the clipped PPO surrogate (ε = 0.2, dual clip 3) with the entropy bonus, token-mean,
//!    its statistics, and `∂loss/∂logp` accumulated onto the KL term's gradient (loss placement)
//!    and `∂loss/∂H`; on the PPO path also the clipped value loss and its gradient w.r.t. the
//!    critic's values. Old log-probs are the policy's own plus N(0, 0.15²) noise, as after a
//!    few optimiser steps on the rollout batch;
//! 6. policy backward, in place over the policy logits, from the loss's `∂loss/∂logp` and
//!    `∂loss/∂H`: the gradient a trainer hands to the lm_head backward.
//!
//! ```text
//! cargo run --release --example ppo_step -- [--rows N] [--vocab V] [--seq-len T] [--dtype f32|f16|bf16]
//!     [--temperature T] [--kl loss|reward] [--estimator gae|grpo] [--backend auto|cpu|cuda] [--iters K]
//! ```

use std::process::ExitCode;
use std::time::Instant;

use rlhf_kernels::testing::{Rng, Tolerance, check_close};
use rlhf_kernels::{
    Backend, DType, Element, Error, Executor, GaeInputs, GaeOptions, GaeOutputs, GroupAdvantageOptions,
    GroupAdvantageOutputs, Groups, Job, KlDirection, KlEstimator, PolicyLossInputs, PolicyLossOptions,
    PolicyLossOutputs, PolicyLossStats, RowShape, SampledKlInputs, SampledKlOptions, SampledKlOutputs,
    Scalar, TokenGrads, TokenLogprobsOptions, TokenOutputs, Tokens, ValueLossInputs, ValueLossOptions,
    ValueLossOutputs, ValueLossStats, WhitenOptions, Workspace, bf16, f16, gae_error_bound_factor,
    gae_error_scale, reference,
};

/// Entropy-bonus coefficient c_H: the upstream gradient of H is −c_H.
const ENTROPY_COEF: f32 = 0.01;
/// KL coefficient β.
const KL_COEF: f32 = 0.05;
/// Responses per prompt on the GRPO path.
const GROUP_SIZE: usize = 4;

/// The policy loss of both paths: PPO's clipped surrogate with a dual clip and the entropy
/// bonus, token-mean over this batch.
fn policy_options() -> PolicyLossOptions {
    PolicyLossOptions::default().dual_clip(Some(3.0)).entropy_coef(ENTROPY_COEF)
}

/// The critic's loss on the PPO path (verl's value clip).
fn value_options() -> ValueLossOptions {
    ValueLossOptions::default().clip(Some(0.5))
}

/// GAE's discount and trace on the PPO path (verl's defaults).
fn gae_options() -> GaeOptions {
    GaeOptions::new(1.0, 0.95)
}

/// How the advantages are estimated.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Estimator {
    /// GAE from a critic's values, then batch whitening (PPO).
    Gae,
    /// GRPO over groups of responses to the same prompt (critic-free).
    Grpo,
}

/// Where the KL to the reference enters the objective.
#[derive(Debug, Clone, Copy, PartialEq)]
enum KlPlacement {
    /// A loss term of its own, differentiated at the current policy (no importance ratio).
    Loss,
    /// Folded into the per-token rewards, entering through the advantages.
    Reward,
}

impl KlPlacement {
    fn options(self) -> SampledKlOptions {
        match self {
            KlPlacement::Loss => {
                SampledKlOptions::new(KlEstimator::gradient_of(KlDirection::PolicyRef)).coef(KL_COEF)
            }
            KlPlacement::Reward => SampledKlOptions::new(KlEstimator::K1).coef(KL_COEF),
        }
    }
}

#[derive(Debug, Clone)]
struct Args {
    rows: usize,
    vocab: usize,
    seq_len: usize,
    dtype: DType,
    temperature: f32,
    kl: KlPlacement,
    estimator: Estimator,
    backend: String,
    iters: usize,
}

const USAGE: &str = "usage: ppo_step [--rows N] [--vocab V] [--seq-len T] [--dtype f32|f16|bf16] [--temperature T] \
                     [--kl loss|reward] [--estimator gae|grpo] [--backend auto|cpu|cuda] [--iters K]";

impl Args {
    fn parse() -> Result<Args, String> {
        let mut a = Args {
            rows: 1024,
            vocab: 32000,
            seq_len: 256,
            dtype: DType::BF16,
            temperature: 1.0,
            kl: KlPlacement::Loss,
            estimator: Estimator::Gae,
            backend: "auto".into(),
            iters: 10,
        };
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            if flag == "--help" || flag == "-h" {
                return Err(String::new());
            }
            let value = it.next().ok_or(format!("{flag} needs a value"))?;
            let bad = |e: &dyn std::fmt::Display| format!("{flag} {value}: {e}");
            match flag.as_str() {
                "--rows" => a.rows = value.parse().map_err(|e| bad(&e))?,
                "--vocab" => a.vocab = value.parse().map_err(|e| bad(&e))?,
                "--seq-len" => a.seq_len = value.parse().map_err(|e| bad(&e))?,
                "--kl" => {
                    a.kl = match value.as_str() {
                        "loss" => KlPlacement::Loss,
                        "reward" => KlPlacement::Reward,
                        _ => return Err(bad(&"expected loss or reward")),
                    }
                }
                "--estimator" => {
                    a.estimator = match value.as_str() {
                        "gae" => Estimator::Gae,
                        "grpo" => Estimator::Grpo,
                        _ => return Err(bad(&"expected gae or grpo")),
                    }
                }
                "--dtype" => a.dtype = value.parse().map_err(|e: Error| bad(&e))?,
                "--temperature" => a.temperature = value.parse().map_err(|e| bad(&e))?,
                "--backend" => a.backend = value,
                "--iters" => a.iters = value.parse::<usize>().map_err(|e| bad(&e))?.max(1),
                _ => return Err(format!("unknown flag {flag}")),
            }
        }
        if a.estimator == Estimator::Grpo && a.kl == KlPlacement::Reward {
            return Err(
                "GRPO's advantages come from outcome scores: take the KL as a loss term (--kl loss)".into()
            );
        }
        if a.seq_len == 0 || a.rows % a.seq_len != 0 {
            return Err(format!("--rows {} must be a multiple of --seq-len {}", a.rows, a.seq_len));
        }
        Ok(a)
    }
}

fn main() -> ExitCode {
    let args = match Args::parse() {
        Ok(a) => a,
        Err(msg) => {
            if !msg.is_empty() {
                eprintln!("error: {msg}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let result = match args.dtype {
        DType::F32 => run::<f32>(&args),
        DType::F16 => run::<f16>(&args),
        DType::BF16 => run::<bf16>(&args),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("FAILED: a stage is outside its tolerance of the f64 reference");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn choose_backend(name: &str) -> Result<Backend, Error> {
    match name {
        "cpu" => Ok(Backend::Cpu),
        "auto" => {
            let (best, why) = Backend::best_with_reason();
            if let Some(reason) = why {
                println!("CUDA not used: {reason}");
            }
            Ok(best)
        }
        #[cfg(feature = "cuda")]
        "cuda" => Ok(Backend::Cuda(rlhf_kernels::cuda::CudaDevice::new(0)?)),
        other => Err(Error::InvalidOption {
            name: "--backend",
            value: other.into(),
            expected: "auto, cpu or cuda (cuda needs the `cuda` feature)",
        }),
    }
}

/// A synthetic batch: policy and reference logits, sampled tokens (a few padding rows),
/// outcome scores, a critic's values and the noise that makes the old log-probs.
struct Batch<T> {
    shape: RowShape,
    policy: Vec<T>,
    reference: Vec<T>,
    targets: Vec<i64>,
    mask: Vec<u8>,
    /// The response's score per sequence.
    scores: Vec<f32>,
    /// The critic's value per token now, and at rollout time (GAE path).
    values: Vec<f32>,
    old_values: Vec<f32>,
    /// `old_logp = logp + noise` (the rollout policy a few optimiser steps back).
    old_logp_noise: Vec<f32>,
    /// Prompt of each sequence, groups of GROUP_SIZE interleaved (GRPO path).
    groups: Groups,
    /// `[B, T]`: sequences of `seq_len` tokens.
    seq_shape: RowShape,
    opts: TokenLogprobsOptions,
    kl: KlPlacement,
    estimator: Estimator,
}

impl<T: Element> Batch<T> {
    fn new(args: &Args) -> Self {
        let shape = RowShape::new(args.rows, args.vocab);
        let mut rng = Rng::new(42);
        let policy: Vec<T> = rng.logits(shape, 3.0);
        // The reference is the policy plus a small perturbation, as after a few PPO updates.
        let reference = policy.iter().map(|&x| T::from_f32(x.to_f32() + 0.3 * rng.normal() as f32)).collect();
        let targets = (0..shape.rows).map(|_| rng.below(shape.cols) as i64).collect();
        // Every 16th row is padding (the tail of a shorter response).
        let mask = (0..shape.rows).map(|r| u8::from(r % 16 != 15)).collect();
        let opts = TokenLogprobsOptions::default().temperature(args.temperature);
        let seq_shape = RowShape::new(args.rows / args.seq_len, args.seq_len);
        let scores = rng.normals(seq_shape.rows, 1.0);
        let values = rng.normals(shape.rows, 0.5);
        let old_values = values.iter().map(|&v| v + 0.3 * rng.normal() as f32).collect();
        let old_logp_noise = rng.normals(shape.rows, 0.15);
        let prompts = seq_shape.rows.div_ceil(GROUP_SIZE);
        let ids: Vec<u32> = (0..seq_shape.rows).map(|i| (i % prompts) as u32).collect();
        let groups = Groups::new(&ids, prompts).expect("at least one sequence");
        Batch {
            shape,
            policy,
            reference,
            targets,
            mask,
            scores,
            values,
            old_values,
            old_logp_noise,
            groups,
            seq_shape,
            opts,
            kl: args.kl,
            estimator: args.estimator,
        }
    }

    /// The old log-probs from this run's log-probs.
    fn old_logp(&self, logp: &[f32]) -> Vec<f32> {
        logp.iter().zip(&self.old_logp_noise).map(|(l, n)| l + n).collect()
    }

    /// GAE's inputs, with the KL penalty fused in the reward placement (from `kl`).
    fn gae_inputs<'a>(&'a self, kl: &'a [f32]) -> GaeInputs<'a> {
        let inputs =
            GaeInputs::new(self.seq_shape).scores(&self.scores).values(&self.values).mask(&self.mask);
        match self.kl {
            KlPlacement::Reward => inputs.kl_penalty(kl, KL_COEF),
            KlPlacement::Loss => inputs,
        }
    }
}

/// What a backend produced: per-token vectors, statistics and the gradient, plus timings.
struct Produced<T> {
    logp: Vec<f32>,
    entropy: Vec<f32>,
    ref_logp: Vec<f32>,
    old_logp: Vec<f32>,
    /// Per-token KL estimate.
    kl: Vec<f32>,
    /// Per-token advantages (GAE before whitening, or GRPO's broadcast).
    advantages: Vec<f32>,
    /// GAE's returns (empty for GRPO).
    returns: Vec<f32>,
    /// GAE's advantages after whitening (empty for GRPO).
    whitened: Vec<f32>,
    /// `∂loss/∂logp` (policy loss plus the KL term) and `∂loss/∂H`.
    grad_logp: Vec<f32>,
    grad_entropy: Vec<f32>,
    policy_stats: PolicyLossStats,
    /// `∂loss/∂v` and the value-loss statistics (GAE path).
    grad_values: Vec<f32>,
    value_stats: Option<ValueLossStats>,
    grad: Vec<T>,
    stages: Vec<Stage>,
}

impl<T> Produced<T> {
    /// The advantages the policy loss used.
    fn loss_advantages(&self) -> &[f32] {
        if self.whitened.is_empty() { &self.advantages } else { &self.whitened }
    }
}

/// One row of the report.
struct Stage {
    name: &'static str,
    millis: f64,
    bytes: usize,
    extra_bytes: usize,
}

fn run<T: Element + Scalar>(args: &Args) -> Result<bool, Error> {
    let backend = choose_backend(&args.backend)?;
    let batch = Batch::<T>::new(args);
    println!("backend: {}", backend.describe());
    println!(
        "batch: {} sequences x {} tokens, vocabulary {}, {} logits, temperature {}, KL as a {:?} term, {:?} advantages",
        batch.seq_shape.rows,
        batch.seq_shape.cols,
        batch.shape.cols,
        T::DTYPE,
        args.temperature,
        args.kl,
        args.estimator
    );
    let produced = backend.run(PpoStep { batch: &batch, iters: args.iters })?;
    check(&batch, &produced, args.iters)
}

/// A named comparison with the reference.
type Check = (&'static str, Result<(), rlhf_kernels::testing::Mismatch>);

/// Holds every stage to the f64 reference, each from the inputs this backend produced for it
/// (a spread of rows, all of them for small batches, for the stages that read logits), and
/// prints the table.
fn check<T: Element>(batch: &Batch<T>, p: &Produced<T>, iters: usize) -> Result<bool, Error> {
    let shape = batch.shape;
    let rows: Vec<usize> = (0..shape.rows).step_by(shape.rows.div_ceil(256)).collect();
    let sub = RowShape::new(rows.len(), shape.cols);
    let pick = |v: &[T]| rows.iter().flat_map(|&r| v[shape.row_range(r)].iter().copied()).collect::<Vec<T>>();
    let per_row = |v: &[f32]| rows.iter().map(|&r| v[r]).collect::<Vec<f32>>();
    let (targets, mask): (Vec<i64>, Vec<u8>) =
        rows.iter().map(|&r| (batch.targets[r], batch.mask[r])).unzip();
    let tokens = Tokens::new(&targets).with_mask(&mask);
    let started = Instant::now();
    let exp_policy = reference::token_logprobs(&pick(&batch.policy), sub, &tokens, &batch.opts)?;
    let exp_ref = reference::token_logprobs(&pick(&batch.reference), sub, &tokens, &batch.opts)?;
    let (gl, gh) = (per_row(&p.grad_logp), per_row(&p.grad_entropy));
    let exp_grad = reference::token_logprobs_backward(
        &pick(&batch.policy),
        sub,
        &tokens,
        Some(&gl),
        Some(&gh),
        &batch.opts,
    )?;
    let (seqs, seq_mask) = (batch.seq_shape, Some(batch.mask.as_slice()));
    let kl_opts = batch.kl.options();
    let exp_kl = reference::sampled_kl(
        &SampledKlInputs { mask: seq_mask, ..SampledKlInputs::new(seqs, &p.logp, &p.ref_logp) },
        &kl_opts,
    )?;
    let mut checks = advantage_checks(batch, p)?;
    // Losses, from this backend's log-probs, entropies and advantages.
    let inputs = PolicyLossInputs::new(seqs, &p.logp, &p.old_logp, p.loss_advantages())
        .mask(&batch.mask)
        .entropy(&p.entropy);
    let exp_loss = reference::policy_loss(&inputs, &policy_options())?;
    let exp_grad_logp: Vec<f64> = match batch.kl {
        KlPlacement::Loss => exp_loss.grad_logp.iter().zip(&exp_kl.grad_logp).map(|(a, b)| a + b).collect(),
        KlPlacement::Reward => exp_loss.grad_logp.clone(),
    };
    let grad_tol =
        |v: &[f64]| Tolerance { rel: 1e-4, abs: 1e-5 * v.iter().fold(1e-30f64, |m, x| m.max(x.abs())) };
    // Scalars to f32 rounding and a few ulps of summation order.
    let stat = |a: f64, b: f64| check_close(&[a as f32], &[b], Tolerance { rel: 1e-5, abs: 1e-6 });
    checks.push(("loss grad_logp", check_close(&p.grad_logp, &exp_grad_logp, grad_tol(&exp_grad_logp))));
    checks.push((
        "loss grad_entropy",
        check_close(&p.grad_entropy, &exp_loss.grad_entropy, grad_tol(&exp_loss.grad_entropy)),
    ));
    checks.push(("loss value", stat(p.policy_stats.loss, exp_loss.stats.loss)));
    checks.push((
        "clip fraction",
        stat(
            p.policy_stats.clip_fraction_high + p.policy_stats.clip_fraction_low,
            exp_loss.stats.clip_fraction_high + exp_loss.stats.clip_fraction_low,
        ),
    ));
    if let Some(vs) = &p.value_stats {
        let inputs = ValueLossInputs {
            mask: seq_mask,
            ..ValueLossInputs::new(seqs, &batch.values, &batch.old_values, &p.returns)
        };
        let exp = reference::value_loss(&inputs, &value_options())?;
        checks
            .push(("value grad", check_close(&p.grad_values, &exp.grad_values, grad_tol(&exp.grad_values))));
        checks.push(("value loss", stat(vs.loss, exp.stats.loss)));
    }
    let reference_ms = started.elapsed().as_secs_f64() * 1e3;

    let scale = 12.0 * 3.0 / batch.opts.temperature as f64; // |logit/τ| of N(0, 3²) logits, generously
    let f32_tol = Tolerance::for_dtype(DType::F32).scaled(scale);
    let grad_scale = exp_grad.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    let mut all = vec![
        ("policy logp", check_close(&per_row(&p.logp), &exp_policy.logp, f32_tol)),
        ("policy entropy", check_close(&per_row(&p.entropy), &exp_policy.entropy, f32_tol)),
        ("reference logp", check_close(&per_row(&p.ref_logp), &exp_ref.logp, f32_tol)),
        ("kl", check_close(&p.kl, &exp_kl.values, f32_tol)),
    ];
    all.extend(checks);
    all.push((
        "policy grad",
        check_close(&pick(&p.grad), &exp_grad, Tolerance::for_dtype(T::DTYPE).scaled(grad_scale)),
    ));

    println!();
    println!("{:<36} {:>10} {:>10} {:>12}", "stage", "ms", "GB/s", "extra MiB");
    for s in &p.stages {
        let gbps = s.bytes as f64 / s.millis / 1e6;
        println!(
            "{:<36} {:>10.3} {:>10.1} {:>12.1}",
            s.name,
            s.millis,
            gbps,
            s.extra_bytes as f64 / (1 << 20) as f64
        );
    }
    let st = &p.policy_stats;
    println!();
    println!(
        "policy loss {:.5} (entropy bonus {:.5}); clipped low {:.3} high {:.3} dual {:.3}; approx KL k1 {:.5} k3 {:.5}; \
         ratio mean {:.4} in [{:.4}, {:.4}]; entropy {:.4}",
        st.loss,
        -ENTROPY_COEF as f64 * st.entropy_loss,
        st.clip_fraction_low,
        st.clip_fraction_high,
        st.dual_clip_fraction,
        st.approx_kl_k1,
        st.approx_kl_k3,
        st.ratio_mean,
        st.ratio_min,
        st.ratio_max,
        st.entropy_mean
    );
    if let Some(vs) = &p.value_stats {
        println!("value loss {:.5}; value clip fraction {:.3}", vs.loss, vs.clip_fraction);
    }
    println!();
    for (what, r) in &all {
        match r {
            Ok(()) => println!("check {what:<18} ok"),
            Err(m) => println!("check {what:<18} FAIL: {m}"),
        }
    }
    println!();
    println!(
        "ms: median of {iters} runs; GB/s: bytes each stage must move (logits read once, gradient written once, \
         per-token vectors) / time; extra MiB: device or host memory a stage allocates beyond its inputs and \
         outputs; checked {} of {} rows of the logits stages, every token of the others, against the f64 \
         reference in {reference_ms:.0} ms",
        rows.len(),
        shape.rows
    );
    Ok(all.iter().all(|(_, r)| r.is_ok()))
}

/// The advantages stage against the reference, from this backend's own KL: GAE within its
/// documented error bound, whitening and GRPO to f32 rounding.
fn advantage_checks<T: Element>(batch: &Batch<T>, p: &Produced<T>) -> Result<Vec<Check>, Error> {
    let (seqs, mask) = (batch.seq_shape, Some(batch.mask.as_slice()));
    let max_abs = |v: &[f64]| v.iter().fold(1.0f64, |m, x| m.max(x.abs()));
    match batch.estimator {
        Estimator::Gae => {
            let inputs = batch.gae_inputs(&p.kl);
            let exp = reference::gae(&inputs, &gae_options())?;
            let bound = gae_error_bound_factor(seqs.cols) * f64::from(f32::EPSILON) / 2.0
                * max_abs(&gae_error_scale(&inputs, &gae_options())?);
            let gae_tol = Tolerance { rel: 0.0, abs: bound };
            let white = reference::whiten(&p.advantages, seqs, mask, &WhitenOptions::default())?;
            let white_tol = Tolerance::for_dtype(DType::F32).scaled(max_abs(&white));
            Ok(vec![
                ("gae advantages", check_close(&p.advantages, &exp.advantages, gae_tol)),
                ("gae returns", check_close(&p.returns, &exp.returns, gae_tol)),
                ("whitened", check_close(&p.whitened, &white, white_tol)),
            ])
        }
        Estimator::Grpo => {
            let per_seq =
                reference::group_advantages(&batch.scores, &batch.groups, &GroupAdvantageOptions::grpo())?;
            let exp: Vec<f64> = (0..seqs.len())
                .map(|t| if batch.mask[t] != 0 { per_seq[t / seqs.cols] } else { 0.0 })
                .collect();
            let tol = Tolerance::for_dtype(DType::F32).scaled(max_abs(&exp));
            Ok(vec![("grpo advantages", check_close(&p.advantages, &exp, tol))])
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Bytes of (forward with entropy, forward logp only, KL, advantages, losses, backward).
fn bytes<T: Element>(shape: RowShape, kl: KlPlacement, estimator: Estimator) -> [usize; 6] {
    let (n, rows, t) = (shape.len(), shape.rows, T::DTYPE.size_bytes());
    let (advantages, losses) = match estimator {
        // GAE reads (kl,) values and mask, writes advantages and returns; whitening reads the
        // advantages and mask twice and writes them once. The policy loss reads logp, old_logp,
        // advantages, mask, entropy and writes two gradients (reading one to accumulate);
        // the value loss reads three arrays and the mask and writes one.
        Estimator::Gae => (
            rows * (4 * usize::from(kl == KlPlacement::Reward) + 4 + 1 + 8) + rows * (5 + 9),
            rows * (4 * 4 + 1 + 8 + 4 * usize::from(kl == KlPlacement::Loss)) + rows * (12 + 1 + 4),
        ),
        // The scores and group lists are tiny; the mask read and the broadcast write dominate.
        Estimator::Grpo => (rows * (1 + 4), rows * (4 * 4 + 1 + 8 + 4)),
    };
    [
        n * t + rows * (8 + 1 + 12),
        n * t + rows * (8 + 1 + 4),
        rows * (4 + 4 + 1 + 4 + 4),
        advantages,
        losses,
        2 * n * t + rows * (8 + 1 + 16),
    ]
}

fn stages<T: Element>(
    shape: RowShape,
    kl: KlPlacement,
    estimator: Estimator,
    times: [Vec<f64>; 6],
    extra: [usize; 6],
) -> Vec<Stage> {
    let kl_name = match kl {
        KlPlacement::Loss => "KL loss term + grad (k3 / k2 grad)",
        KlPlacement::Reward => "KL estimate for the rewards (k1)",
    };
    let (advantages_name, losses_name) = match estimator {
        Estimator::Gae => ("GAE + returns, whitened", "PPO loss + stats, value loss"),
        Estimator::Grpo => ("GRPO advantages (groups of 4)", "PPO loss + stats"),
    };
    let names = [
        "policy logp + entropy + lse",
        "reference logp",
        kl_name,
        advantages_name,
        losses_name,
        "policy backward (in place)",
    ];
    let b = bytes::<T>(shape, kl, estimator);
    names
        .into_iter()
        .zip(times)
        .enumerate()
        .map(|(i, (name, t))| Stage { name, millis: median(t), bytes: b[i], extra_bytes: extra[i] })
        .collect()
}

/// The training step as a [`Job`]: [`Backend::run`] hands it the executor of the chosen
/// backend, so the CPU and the GPU run this one definition.
struct PpoStep<'a, T> {
    batch: &'a Batch<T>,
    iters: usize,
}

impl<T: Element + Scalar> Job for PpoStep<'_, T> {
    type Output = Produced<T>;

    fn run<E: Executor>(self, e: &mut E) -> Result<Produced<T>, Error> {
        step(e, self.batch, self.iters)
    }
}

/// One untimed warm-up, then `iters` timed runs of each stage: buffers live in the executor's
/// memory, every op is queued on it (on a GPU: one stream, no host sync between stages, the
/// timeline read from events). The warm-up's log-probs make the old log-probs.
fn step<E: Executor, T: Element + Scalar>(
    e: &mut E,
    batch: &Batch<T>,
    iters: usize,
) -> Result<Produced<T>, Error> {
    let (shape, seqs, opts) = (batch.shape, batch.seq_shape, &batch.opts);
    let (gae, kl_loss) = (batch.estimator == Estimator::Gae, batch.kl == KlPlacement::Loss);
    let (policy, reference) = (e.upload(&batch.policy)?, e.upload(&batch.reference)?);
    let (targets, mask) = (e.upload(&batch.targets)?, e.upload(&batch.mask)?);
    let (scores, values) = (e.upload(&batch.scores)?, e.upload(&batch.values)?);
    let old_values = e.upload(&batch.old_values)?;
    let zeros = || e.zeros::<f32>(shape.rows);
    let (mut logp, mut entropy, mut lse, mut ref_logp) = (zeros()?, zeros()?, zeros()?, zeros()?);
    let (mut kl, mut grad_logp, mut grad_entropy, mut grad_values) = (zeros()?, zeros()?, zeros()?, zeros()?);
    let (mut advantages, mut returns, mut whitened, mut old_logp) = (zeros()?, zeros()?, zeros()?, zeros()?);
    let mut grad = e.zeros::<T>(shape.len())?;
    // Each op's scratch, allocated once (the host needs none: 0 bytes).
    let ws = [
        Workspace::TokenLogprobs(shape, T::DTYPE),
        Workspace::SampledKl(seqs),
        Workspace::Gae(seqs),
        Workspace::PolicyLoss(seqs),
        Workspace::ValueLoss(seqs),
    ]
    .map(|op| e.workspace_bytes(op));
    let scratch = |bytes: usize| e.zeros::<u8>(bytes.max(1));
    let (mut token_ws, mut kl_ws, mut gae_ws) = (scratch(ws[0])?, scratch(ws[1])?, scratch(ws[2])?);
    let (mut policy_ws, mut value_ws) = (scratch(ws[3])?, scratch(ws[4])?);
    let mut policy_stats = e.stats::<PolicyLossStats>()?;
    let mut value_stats = e.stats::<ValueLossStats>()?;
    let groups = e.groups(&batch.groups)?;
    let tokens = Tokens::new(E::view(&targets)).with_mask(E::view(&mask));
    let kl_opts = batch.kl.options();
    let mut times: [Vec<f64>; 6] = Default::default();
    for i in 0..=iters {
        e.copy(&policy, &mut grad)?; // the in-place backward's target
        let m0 = e.mark()?;
        let out = TokenOutputs::default()
            .logp(E::view_mut(&mut logp))
            .entropy(E::view_mut(&mut entropy))
            .lse(E::view_mut(&mut lse))
            .workspace(E::view_mut(&mut token_ws));
        e.token_logprobs(E::view(&policy), shape, &tokens, out, opts)?;
        let m1 = e.mark()?;
        if i == 0 {
            old_logp = e.upload(&batch.old_logp(&e.download(&logp)?))?;
        }
        let m1b = e.mark()?;
        let out =
            TokenOutputs::default().logp(E::view_mut(&mut ref_logp)).workspace(E::view_mut(&mut token_ws));
        e.token_logprobs(E::view(&reference), shape, &tokens, out, opts)?;
        let m2 = e.mark()?;
        let inputs = SampledKlInputs::new(seqs, E::view(&logp), E::view(&ref_logp)).mask(E::view(&mask));
        let out = SampledKlOutputs::default().values(E::view_mut(&mut kl)).workspace(E::view_mut(&mut kl_ws));
        let out = if kl_loss { out.grad_logp(E::view_mut(&mut grad_logp)) } else { out };
        e.sampled_kl(&inputs, out, &kl_opts)?;
        let m3 = e.mark()?;
        if gae {
            let inputs =
                GaeInputs::new(seqs).scores(E::view(&scores)).values(E::view(&values)).mask(E::view(&mask));
            let inputs = if kl_loss { inputs } else { inputs.kl_penalty(E::view(&kl), KL_COEF) };
            let out = GaeOutputs::default()
                .advantages(E::view_mut(&mut advantages))
                .returns(E::view_mut(&mut returns))
                .workspace(E::view_mut(&mut gae_ws));
            e.gae(&inputs, out, &gae_options())?;
            e.copy(&advantages, &mut whitened)?;
            e.whiten(E::view_mut(&mut whitened), seqs, Some(E::view(&mask)), &WhitenOptions::default())?;
        } else {
            let out = GroupAdvantageOutputs::default().per_token(
                E::view_mut(&mut advantages),
                seqs,
                Some(E::view(&mask)),
            );
            e.group_advantages(E::view(&scores), &groups, out, &GroupAdvantageOptions::grpo())?;
        }
        let m4 = e.mark()?;
        let adv = if gae { &whitened } else { &advantages };
        let inputs = PolicyLossInputs::new(seqs, E::view(&logp), E::view(&old_logp), E::view(adv))
            .mask(E::view(&mask))
            .entropy(E::view(&entropy));
        let out = PolicyLossOutputs::default()
            .grad_logp(E::view_mut(&mut grad_logp))
            .grad_entropy(E::view_mut(&mut grad_entropy))
            .accumulate(kl_loss)
            .stats(E::stats_out(&mut policy_stats))
            .workspace(E::view_mut(&mut policy_ws));
        e.policy_loss(&inputs, out, &policy_options())?;
        if gae {
            let inputs =
                ValueLossInputs::new(seqs, E::view(&values), E::view(&old_values), E::view(&returns))
                    .mask(E::view(&mask));
            let out = ValueLossOutputs::default()
                .grad_values(E::view_mut(&mut grad_values))
                .stats(E::stats_out(&mut value_stats))
                .workspace(E::view_mut(&mut value_ws));
            e.value_loss(&inputs, out, &value_options())?;
        }
        let m5 = e.mark()?;
        let grads = TokenGrads::new(E::view(&lse))
            .grad_logp(E::view(&grad_logp))
            .grad_entropy(E::view(&grad_entropy), E::view(&entropy));
        e.token_logprobs_backward_in_place(E::view_mut(&mut grad), shape, &tokens, &grads, opts)?;
        let m6 = e.mark()?;
        if i > 0 {
            let spans = [(&m0, &m1), (&m1b, &m2), (&m2, &m3), (&m3, &m4), (&m4, &m5), (&m5, &m6)];
            for (k, (start, end)) in spans.into_iter().enumerate() {
                times[k].push(e.elapsed_ms(start, end)?);
            }
        }
    }
    e.finish()?;
    let gae_only = |buf: &E::Buffer<f32>| if gae { e.download(buf) } else { Ok(Vec::new()) };
    Ok(Produced {
        logp: e.download(&logp)?,
        entropy: e.download(&entropy)?,
        ref_logp: e.download(&ref_logp)?,
        old_logp: e.download(&old_logp)?,
        kl: e.download(&kl)?,
        advantages: e.download(&advantages)?,
        returns: gae_only(&returns)?,
        whitened: gae_only(&whitened)?,
        grad_logp: e.download(&grad_logp)?,
        grad_entropy: e.download(&grad_entropy)?,
        policy_stats: e.read(&policy_stats)?,
        grad_values: gae_only(&grad_values)?,
        value_stats: if gae { Some(e.read(&value_stats)?) } else { None },
        grad: e.download(&grad)?,
        stages: stages::<T>(
            shape,
            batch.kl,
            batch.estimator,
            times,
            [ws[0], ws[0], ws[1], ws[2], ws[3] + ws[4], 0],
        ),
    })
}
