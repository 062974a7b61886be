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
//! 5. losses: the policy objective (`--objective`: by default the clipped PPO surrogate, ε = 0.2,
//!    dual clip 3, token-mean; `sapo`, `gmpo`, `gspo` and `cispo` with their papers' settings,
//!    sequence-mean-token-mean) with the entropy bonus, its statistics, and `∂loss/∂logp` accumulated onto the KL term's gradient (loss placement)
//!    and `∂loss/∂H`; on the PPO path also the clipped value loss and its gradient w.r.t. the
//!    critic's values. Old log-probs are the policy's own plus N(0, 0.15²) noise, as after a
//!    few optimiser steps on the rollout batch;
//! 6. policy backward, in place over the policy logits, from the loss's `∂loss/∂logp` and
//!    `∂loss/∂H`: the gradient a trainer hands to the lm_head backward.
//!
//! ```text
//! cargo run --release --example ppo_step -- [--rows N] [--vocab V] [--seq-len T] [--dtype f32|f16|bf16]
//!     [--temperature T] [--kl loss|reward] [--estimator gae|grpo] [--objective clip|sapo|gmpo|gspo|cispo]
//!     [--backend auto|cpu|cuda] [--iters K]
//! ```

use std::process::ExitCode;
mod check;

use check::{Stage, check, stages};
use rlhf_kernels::testing::Rng;
use rlhf_kernels::{
    Aggregation, Backend, DType, Element, Error, Executor, GaeInputs, GaeOptions, GaeOutputs,
    GroupAdvantageOptions, GroupAdvantageOutputs, Groups, Job, KlDirection, KlEstimator, PolicyLossInputs,
    PolicyLossOptions, PolicyLossOutputs, PolicyLossStats, PolicyObjective, RowShape, SampledKlInputs,
    SampledKlOptions, SampledKlOutputs, Scalar, TokenGrads, TokenLogprobsOptions, TokenOutputs, Tokens,
    ValueLossInputs, ValueLossOptions, ValueLossOutputs, ValueLossStats, WhitenOptions, Workspace, bf16, f16,
};

/// Entropy-bonus coefficient c_H: the upstream gradient of H is −c_H.
const ENTROPY_COEF: f32 = 0.01;
/// KL coefficient β.
const KL_COEF: f32 = 0.05;
/// Responses per prompt on the GRPO path.
const GROUP_SIZE: usize = 4;

/// The policy loss of both paths, with the entropy bonus: PPO's clipped surrogate with a dual
/// clip, token-mean over this batch; or a variant with its paper's settings, aggregated per
/// sequence as its authors do (GSPO's ε 3e-4 / 4e-4, GMPO's log-space 0.4).
fn policy_options(objective: PolicyObjective) -> PolicyLossOptions {
    let per_sequence = PolicyLossOptions::new(objective).aggregation(Aggregation::SeqMeanTokenMean);
    match objective {
        PolicyObjective::Gspo => per_sequence.clip(3e-4, 4e-4),
        PolicyObjective::Gmpo => per_sequence.clip(0.4, 0.4),
        PolicyObjective::Sapo { .. } => per_sequence,
        PolicyObjective::Cispo => per_sequence.clip(1.0, 0.28),
        _ => PolicyLossOptions::default().dual_clip(Some(3.0)),
    }
    .entropy_coef(ENTROPY_COEF)
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
    objective: PolicyObjective,
    backend: String,
    iters: usize,
}

const USAGE: &str = "usage: ppo_step [--rows N] [--vocab V] [--seq-len T] [--dtype f32|f16|bf16] [--temperature T] \
                     [--kl loss|reward] [--estimator gae|grpo] [--objective clip|sapo|gmpo|gspo|cispo] \
                     [--backend auto|cpu|cuda] [--iters K]";

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
            objective: PolicyObjective::Clip,
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
                "--objective" => {
                    a.objective = match value.as_str() {
                        "clip" => PolicyObjective::Clip,
                        "sapo" => PolicyObjective::SAPO,
                        "gmpo" => PolicyObjective::Gmpo,
                        "gspo" => PolicyObjective::Gspo,
                        "cispo" => PolicyObjective::Cispo,
                        _ => return Err(bad(&"expected clip, sapo, gmpo, gspo or cispo")),
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
    /// The policy loss's options.
    loss: PolicyLossOptions,
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
            loss: policy_options(args.objective),
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

fn run<T: Element + Scalar>(args: &Args) -> Result<bool, Error> {
    let backend = choose_backend(&args.backend)?;
    let batch = Batch::<T>::new(args);
    println!("backend: {}", backend.describe());
    println!(
        "batch: {} sequences x {} tokens, vocabulary {}, {} logits, temperature {}, KL as a {:?} term, {:?} advantages, {:?} loss",
        batch.seq_shape.rows,
        batch.seq_shape.cols,
        batch.shape.cols,
        T::DTYPE,
        args.temperature,
        args.kl,
        args.estimator,
        args.objective
    );
    let produced = backend.run(PpoStep { batch: &batch, iters: args.iters })?;
    check(&batch, &produced, args.iters)
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
        e.policy_loss(&inputs, out, &batch.loss)?;
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
