//! The main job: the kernels of one PPO / GRPO training step on a synthetic batch, on the best
//! backend, each stage checked against the f64 reference, with timings.
//!
//! Stages so far (the loss family adds the PPO loss):
//! 1. policy forward: per-token log-prob of the sampled tokens, entropy and lse from the
//!    policy logits, never materialising the `[N, V]` log-softmax;
//! 2. reference forward: per-token log-prob under the reference policy's logits;
//! 3. KL to the reference, in either placement (`--kl`): as a loss term (the gradient-correct
//!    estimator for `KL[π‖π_ref]`, β·token-mean, no importance ratio), or folded into the
//!    per-token rewards (`r_t = −β·k1_t`, the sequence score on the last valid token);
//! 4. advantages (`--estimator`): GAE with a critic's values (the PPO path; γ = 1, λ = 0.95,
//!    the KL penalty `−β·k1_t` fused into the scan in the reward placement, the score on the
//!    last valid token), then whitened over the batch's valid tokens; or GRPO over groups of
//!    4 responses (the critic-free path), broadcast to every valid token;
//! 5. policy backward, in place over the policy logits: the gradient of
//!    `Σ g_logp·logp − c_H·H` (a stand-in upstream gradient until the loss family lands).
//!
//! ```text
//! cargo run --release --example ppo_step -- [--rows N] [--vocab V] [--seq-len T] [--dtype f32|f16|bf16]
//!     [--temperature T] [--kl loss|reward] [--estimator gae|grpo] [--backend auto|cpu|cuda] [--iters K]
//! ```

use std::process::ExitCode;
use std::time::Instant;

use rlhf_kernels::testing::{Rng, Tolerance, check_close};
use rlhf_kernels::{
    Backend, DType, Element, Error, GaeInputs, GaeOptions, GroupAdvantageOptions, Groups, KlDirection,
    KlEstimator, RowShape, SampledKlOptions, TokenGrads, TokenLogprobsOptions, TokenOutputs, Tokens,
    WhitenOptions, bf16, cpu, f16, gae_error_bound_factor, gae_error_scale, reference,
};

/// Entropy-bonus coefficient c_H: the upstream gradient of H is −c_H.
const ENTROPY_COEF: f32 = 0.01;
/// KL coefficient β.
const KL_COEF: f32 = 0.05;
/// Responses per prompt on the GRPO path.
const GROUP_SIZE: usize = 4;

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
            KlPlacement::Reward => SampledKlOptions::new(KlEstimator::K1),
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

/// A synthetic batch: policy and reference logits, sampled tokens (a few padding rows), and
/// the upstream gradient of logp.
struct Batch<T> {
    shape: RowShape,
    policy: Vec<T>,
    reference: Vec<T>,
    targets: Vec<i64>,
    mask: Vec<u8>,
    grad_logp: Vec<f32>,
    grad_entropy: Vec<f32>,
    /// The response's score per sequence (reward placement).
    scores: Vec<f32>,
    /// The critic's value per token (GAE path).
    values: Vec<f32>,
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
        let grad_logp = rng.normals(shape.rows, 1.0 / shape.rows as f64);
        let grad_entropy = vec![-ENTROPY_COEF; shape.rows];
        let opts = TokenLogprobsOptions::default().temperature(args.temperature);
        let seq_shape = RowShape::new(args.rows / args.seq_len, args.seq_len);
        let scores = rng.normals(seq_shape.rows, 1.0);
        let values = rng.normals(shape.rows, 0.5);
        let prompts = seq_shape.rows.div_ceil(GROUP_SIZE);
        let ids: Vec<u32> = (0..seq_shape.rows).map(|i| (i % prompts) as u32).collect();
        let groups = Groups::new(&ids, prompts).expect("at least one sequence");
        Batch {
            shape,
            policy,
            reference,
            targets,
            mask,
            grad_logp,
            grad_entropy,
            scores,
            values,
            groups,
            seq_shape,
            opts,
            kl: args.kl,
            estimator: args.estimator,
        }
    }

    fn tokens(&self) -> Tokens<'_, i64> {
        Tokens::new(&self.targets).with_mask(&self.mask)
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

/// What a backend produced: per-token vectors and the gradient, plus timings.
struct Produced<T> {
    logp: Vec<f32>,
    entropy: Vec<f32>,
    ref_logp: Vec<f32>,
    /// Per-token KL estimate.
    kl: Vec<f32>,
    /// The KL loss's gradient w.r.t. logp (loss placement) or the shaped rewards (reward).
    kl_out: Vec<f32>,
    /// Per-token advantages (GAE before whitening, or GRPO's broadcast).
    advantages: Vec<f32>,
    /// GAE's returns (empty for GRPO).
    returns: Vec<f32>,
    /// GAE's advantages after whitening (empty for GRPO).
    whitened: Vec<f32>,
    grad: Vec<T>,
    stages: Vec<Stage>,
}

/// One row of the report.
struct Stage {
    name: &'static str,
    millis: f64,
    bytes: usize,
    extra_bytes: usize,
}

fn run<T: Element>(args: &Args) -> Result<bool, Error> {
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
    let produced = match &backend {
        Backend::Cpu => run_cpu(&batch, args.iters)?,
        #[cfg(feature = "cuda")]
        Backend::Cuda(device) => run_cuda(device, &batch, args.iters)?,
        #[allow(unreachable_patterns)]
        _ => unreachable!("no other backend in this build"),
    };
    check(&batch, &produced, args.iters)
}

/// Holds a spread of rows (all of them for small batches) to the f64 reference and prints
/// the table.
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
    let (gl, gh) = (per_row(&batch.grad_logp), per_row(&batch.grad_entropy));
    let exp_grad = reference::token_logprobs_backward(
        &pick(&batch.policy),
        sub,
        &tokens,
        Some(&gl),
        Some(&gh),
        &batch.opts,
    )?;
    // KL stage, from the log-probs this backend produced (so that it is checked on its own).
    let kl_opts = batch.kl.options();
    let exp_kl = reference::sampled_kl(&p.logp, &p.ref_logp, batch.seq_shape, Some(&batch.mask), &kl_opts)?;
    let exp_kl_out = match batch.kl {
        KlPlacement::Loss => exp_kl.grad_logp.clone(),
        KlPlacement::Reward => {
            reference::kl_rewards(&p.kl, batch.seq_shape, Some(&batch.mask), &batch.scores, KL_COEF)?
        }
    };
    let advantage_checks = check_advantages(batch, p)?;
    let reference_ms = started.elapsed().as_secs_f64() * 1e3;

    let scale = 12.0 * 3.0 / batch.opts.temperature as f64; // |logit/τ| of N(0, 3²) logits, generously
    let f32_tol = Tolerance::for_dtype(DType::F32).scaled(scale);
    let grad_scale = exp_grad.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    let mut checks = vec![
        ("policy logp", check_close(&per_row(&p.logp), &exp_policy.logp, f32_tol)),
        ("policy entropy", check_close(&per_row(&p.entropy), &exp_policy.entropy, f32_tol)),
        ("reference logp", check_close(&per_row(&p.ref_logp), &exp_ref.logp, f32_tol)),
        ("kl", check_close(&p.kl, &exp_kl.values, Tolerance::for_dtype(DType::F32).scaled(scale))),
        (
            match batch.kl {
                KlPlacement::Loss => "kl loss grad",
                KlPlacement::Reward => "kl rewards",
            },
            check_close(&p.kl_out, &exp_kl_out, Tolerance::for_dtype(DType::F32).scaled(scale)),
        ),
        (
            "policy grad",
            check_close(&pick(&p.grad), &exp_grad, Tolerance::for_dtype(T::DTYPE).scaled(grad_scale)),
        ),
    ];
    checks.extend(advantage_checks);

    println!();
    println!("{:<34} {:>10} {:>10} {:>12}", "stage", "ms", "GB/s", "extra MiB");
    for s in &p.stages {
        let gbps = s.bytes as f64 / s.millis / 1e6;
        println!(
            "{:<34} {:>10.3} {:>10.1} {:>12.1}",
            s.name,
            s.millis,
            gbps,
            s.extra_bytes as f64 / (1 << 20) as f64
        );
    }
    println!();
    for (what, r) in &checks {
        match r {
            Ok(()) => println!("check {what:<16} ok"),
            Err(m) => println!("check {what:<16} FAIL: {m}"),
        }
    }
    println!();
    println!(
        "ms: median of {iters} runs; GB/s: bytes each stage must move (logits read once, gradient written once, \
         per-token vectors) / time; extra MiB: device or host memory a stage allocates beyond its inputs and \
         outputs; checked {} of {} rows against the f64 reference in {reference_ms:.0} ms",
        rows.len(),
        shape.rows
    );
    Ok(checks.iter().all(|(_, r)| r.is_ok()))
}

/// A named comparison with the reference.
type Check = (&'static str, Result<(), rlhf_kernels::testing::Mismatch>);

/// The advantages stage against the reference, from this backend's own KL (so that the stage
/// is checked on its own): GAE within its documented error bound, whitening and GRPO to f32
/// rounding.
fn check_advantages<T: Element>(batch: &Batch<T>, p: &Produced<T>) -> Result<Vec<Check>, Error> {
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

/// Bytes of (forward with entropy, forward logp only, KL, advantages, backward).
fn bytes<T: Element>(shape: RowShape, kl: KlPlacement, estimator: Estimator) -> [usize; 5] {
    let (n, rows, t) = (shape.len(), shape.rows, T::DTYPE.size_bytes());
    let advantages = match estimator {
        // GAE reads (kl,) values and mask, writes advantages and returns; whitening reads the
        // advantages and mask twice and writes them once.
        Estimator::Gae => rows * (4 * usize::from(kl == KlPlacement::Reward) + 4 + 1 + 8) + rows * (5 + 9),
        // The scores and group lists are tiny; the mask read and the broadcast write dominate.
        Estimator::Grpo => rows * (1 + 4),
    };
    [
        n * t + rows * (8 + 1 + 12),
        n * t + rows * (8 + 1 + 4),
        rows * (4 + 4 + 1 + 4 + 4),
        advantages,
        2 * n * t + rows * (8 + 1 + 16),
    ]
}

fn stages<T: Element>(
    shape: RowShape,
    kl: KlPlacement,
    estimator: Estimator,
    times: [Vec<f64>; 5],
    extra: [usize; 5],
) -> Vec<Stage> {
    let kl_name = match kl {
        KlPlacement::Loss => "KL loss term + grad (k3 / k2 grad)",
        KlPlacement::Reward => "KL in rewards (k1)",
    };
    let advantages_name = match estimator {
        Estimator::Gae => "GAE + returns, whitened",
        Estimator::Grpo => "GRPO advantages (groups of 4)",
    };
    let names = [
        "policy logp + entropy + lse",
        "reference logp",
        kl_name,
        advantages_name,
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

fn run_cpu<T: Element>(batch: &Batch<T>, iters: usize) -> Result<Produced<T>, Error> {
    let (shape, opts, tokens) = (batch.shape, &batch.opts, batch.tokens());
    let n = shape.rows;
    let (mut logp, mut entropy, mut lse, mut ref_logp) =
        (vec![0.0; n], vec![0.0; n], vec![0.0; n], vec![0.0; n]);
    let mut times: [Vec<f64>; 5] = Default::default();
    let mut grad = Vec::new();
    let (mut kl, mut kl_out) = (vec![0.0f32; n], vec![0.0f32; n]);
    let (mut advantages, mut returns, mut whitened) = (vec![0.0f32; n], vec![0.0f32; n], vec![0.0f32; n]);
    let kl_opts = batch.kl.options();
    for _ in 0..iters {
        let t = Instant::now();
        let out = TokenOutputs::default().logp(&mut logp).entropy(&mut entropy).lse(&mut lse);
        cpu::token_logprobs(&batch.policy, shape, &tokens, out, opts)?;
        times[0].push(t.elapsed().as_secs_f64() * 1e3);

        let t = Instant::now();
        cpu::token_logprobs(
            &batch.reference,
            shape,
            &tokens,
            TokenOutputs::default().logp(&mut ref_logp),
            opts,
        )?;
        times[1].push(t.elapsed().as_secs_f64() * 1e3);

        let t = Instant::now();
        let (seqs, mask) = (batch.seq_shape, Some(batch.mask.as_slice()));
        match batch.kl {
            KlPlacement::Loss => {
                let out = cpu::SampledKlOutputs::default().values(&mut kl).grad_logp(&mut kl_out);
                cpu::sampled_kl(&logp, &ref_logp, seqs, mask, out, &kl_opts)?;
            }
            KlPlacement::Reward => {
                let out = cpu::SampledKlOutputs::default().values(&mut kl);
                cpu::sampled_kl(&logp, &ref_logp, seqs, mask, out, &kl_opts)?;
                cpu::kl_rewards(&kl, seqs, mask, &batch.scores, KL_COEF, &mut kl_out)?;
            }
        }
        times[2].push(t.elapsed().as_secs_f64() * 1e3);

        let t = Instant::now();
        match batch.estimator {
            Estimator::Gae => {
                let out = cpu::GaeOutputs::default().advantages(&mut advantages).returns(&mut returns);
                cpu::gae(&batch.gae_inputs(&kl), out, &gae_options())?;
                whitened.copy_from_slice(&advantages);
                cpu::whiten(&mut whitened, seqs, mask, &WhitenOptions::default())?;
            }
            Estimator::Grpo => {
                let out = cpu::GroupAdvantageOutputs::default().per_token(&mut advantages, seqs, mask);
                cpu::group_advantages(&batch.scores, &batch.groups, &GroupAdvantageOptions::grpo(), out)?;
            }
        }
        times[3].push(t.elapsed().as_secs_f64() * 1e3);

        // In place over a copy of the logits (a trainer would overwrite its own buffer).
        grad = batch.policy.clone();
        let grads =
            TokenGrads::new(&lse).grad_logp(&batch.grad_logp).grad_entropy(&batch.grad_entropy, &entropy);
        let t = Instant::now();
        cpu::token_logprobs_backward_in_place(&mut grad, shape, &tokens, &grads, opts)?;
        times[4].push(t.elapsed().as_secs_f64() * 1e3);
    }
    let stages = stages::<T>(shape, batch.kl, batch.estimator, times, [0; 5]);
    if batch.estimator == Estimator::Grpo {
        (returns, whitened) = (Vec::new(), Vec::new());
    }
    Ok(Produced { logp, entropy, ref_logp, kl, kl_out, advantages, returns, whitened, grad, stages })
}

#[cfg(feature = "cuda")]
fn run_cuda<T: Element>(
    device: &rlhf_kernels::cuda::CudaDevice,
    batch: &Batch<T>,
    iters: usize,
) -> Result<Produced<T>, Error> {
    use rlhf_kernels::cuda::{
        self, CudaStatus, DeviceGaeInputs, DeviceGaeOutputs, DeviceGroupAdvantageOutputs, DeviceGroups,
        DeviceKlStats, DeviceMoments, DeviceSampledKlOutputs, DeviceTokenGrads, DeviceTokenOutputs,
        DeviceTokens, SampledKlInputs,
    };
    use rlhf_kernels::cudarc::driver::DriverError;
    use rlhf_kernels::cudarc::driver::sys::CUevent_flags;

    let s = device.stream();
    let shape = batch.shape;
    let n = shape.rows;
    let drv =
        |during: &'static str| move |e: DriverError| Error::Driver { during, message: format!("{e:?}") };
    let policy = s.clone_htod(&batch.policy).map_err(drv("uploading policy logits"))?;
    let reference = s.clone_htod(&batch.reference).map_err(drv("uploading reference logits"))?;
    let targets = s.clone_htod(&batch.targets).map_err(drv("uploading targets"))?;
    let mask = s.clone_htod(&batch.mask).map_err(drv("uploading the mask"))?;
    let gl = s.clone_htod(&batch.grad_logp).map_err(drv("uploading grad_logp"))?;
    let gh = s.clone_htod(&batch.grad_entropy).map_err(drv("uploading grad_entropy"))?;
    let alloc = || s.alloc_zeros::<f32>(n).map_err(drv("allocating per-token outputs"));
    let (mut logp, mut entropy, mut lse, mut ref_logp) = (alloc()?, alloc()?, alloc()?, alloc()?);
    let mut grad = s.alloc_zeros::<T>(shape.len()).map_err(drv("allocating the gradient"))?;
    let workspace_bytes = cuda::token_logprobs_workspace_bytes(shape, T::DTYPE);
    let mut workspace =
        s.alloc_zeros::<u8>(workspace_bytes.max(1)).map_err(drv("allocating the workspace"))?;
    let mut status = CudaStatus::new(s)?;
    let tokens = DeviceTokens::new(targets.as_view()).with_mask(mask.as_view());
    let opts = &batch.opts;
    let (mut kl, mut kl_out) = (alloc()?, alloc()?);
    let scores = s.clone_htod(&batch.scores).map_err(drv("uploading scores"))?;
    let kl_workspace_bytes = cuda::sampled_kl_workspace_bytes(batch.seq_shape);
    let mut kl_workspace =
        s.alloc_zeros::<u8>(kl_workspace_bytes).map_err(drv("allocating the KL workspace"))?;
    let mut kl_stats = DeviceKlStats::new(s)?;
    let kl_opts = batch.kl.options();
    let values = s.clone_htod(&batch.values).map_err(drv("uploading values"))?;
    let groups = DeviceGroups::new(s, &batch.groups)?;
    let (mut advantages, mut returns, mut whitened) = (alloc()?, alloc()?, alloc()?);
    let gae_workspace_bytes = cuda::gae_workspace_bytes(batch.seq_shape);
    let mut gae_workspace =
        s.alloc_zeros::<u8>(gae_workspace_bytes.max(1)).map_err(drv("allocating the GAE workspace"))?;
    let mut moments = DeviceMoments::new(s)?;
    let event = || s.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(drv("recording an event"));
    let mut times: [Vec<f64>; 5] = Default::default();
    // One untimed warm-up, then `iters` timed runs of each stage (CUDA events, no host sync
    // between stages).
    for i in 0..=iters {
        s.memcpy_dtod(&policy, &mut grad).map_err(drv("copying the logits"))?; // the in-place target
        let e0 = event()?;
        let out = DeviceTokenOutputs::default()
            .logp(logp.as_view_mut())
            .entropy(entropy.as_view_mut())
            .lse(lse.as_view_mut())
            .workspace(workspace.as_view_mut());
        cuda::token_logprobs(s, &policy, shape, &tokens, out, &mut status, opts)?;
        let e1 = event()?;
        let out =
            DeviceTokenOutputs::default().logp(ref_logp.as_view_mut()).workspace(workspace.as_view_mut());
        cuda::token_logprobs(s, &reference, shape, &tokens, out, &mut status, opts)?;
        let e2 = event()?;
        let inputs = SampledKlInputs {
            logp: logp.as_view(),
            ref_logp: ref_logp.as_view(),
            mask: Some(mask.as_view()),
        };
        let out = DeviceSampledKlOutputs {
            values: Some(kl.as_view_mut()),
            grad_logp: (batch.kl == KlPlacement::Loss).then(|| kl_out.as_view_mut()),
            stats: Some(&mut kl_stats),
            workspace: Some(kl_workspace.as_view_mut()),
        };
        cuda::sampled_kl(s, &inputs, batch.seq_shape, out, &mut status, &kl_opts)?;
        if batch.kl == KlPlacement::Reward {
            let m = mask.as_view();
            cuda::kl_rewards(s, &kl, batch.seq_shape, Some(&m), &scores, KL_COEF, &mut kl_out)?;
        }
        let e3 = event()?;
        let seqs = batch.seq_shape;
        match batch.estimator {
            Estimator::Gae => {
                let mut inputs = DeviceGaeInputs::new(seqs)
                    .scores(scores.as_view())
                    .values(values.as_view())
                    .mask(mask.as_view());
                if batch.kl == KlPlacement::Reward {
                    inputs = inputs.kl_penalty(kl.as_view(), KL_COEF);
                }
                let out = DeviceGaeOutputs::default()
                    .advantages(advantages.as_view_mut())
                    .returns(returns.as_view_mut())
                    .workspace(gae_workspace.as_view_mut());
                cuda::gae(s, &inputs, out, &mut status, &gae_options())?;
                s.memcpy_dtod(&advantages, &mut whitened).map_err(drv("copying the advantages"))?;
                let m = mask.as_view();
                let white = WhitenOptions::default();
                cuda::whiten(s, &mut whitened, seqs, Some(&m), &white, &mut moments, &mut status)?;
            }
            Estimator::Grpo => {
                let out = DeviceGroupAdvantageOutputs::default().per_token(
                    advantages.as_view_mut(),
                    seqs,
                    Some(mask.as_view()),
                );
                let opts = GroupAdvantageOptions::grpo();
                cuda::group_advantages(s, &scores.as_view(), &groups, &opts, out, &mut status)?;
            }
        }
        let e4 = event()?;
        let grads = DeviceTokenGrads::new(lse.as_view())
            .grad_logp(gl.as_view())
            .grad_entropy(gh.as_view(), entropy.as_view());
        cuda::token_logprobs_backward_in_place(s, &mut grad, shape, &tokens, &grads, &mut status, opts)?;
        let e5 = event()?;
        if i > 0 {
            let spans = [(&e0, &e1), (&e1, &e2), (&e2, &e3), (&e3, &e4), (&e4, &e5)];
            for (k, (a, b)) in spans.into_iter().enumerate() {
                times[k].push(a.elapsed_ms(b).map_err(drv("timing"))? as f64);
            }
        }
    }
    status.check(s)?;
    let down = |v: &rlhf_kernels::cudarc::driver::CudaSlice<f32>| s.clone_dtoh(v).map_err(drv("downloading"));
    Ok(Produced {
        logp: down(&logp)?,
        entropy: down(&entropy)?,
        ref_logp: down(&ref_logp)?,
        kl: down(&kl)?,
        kl_out: down(&kl_out)?,
        advantages: down(&advantages)?,
        returns: if batch.estimator == Estimator::Gae { down(&returns)? } else { Vec::new() },
        whitened: if batch.estimator == Estimator::Gae { down(&whitened)? } else { Vec::new() },
        grad: s.clone_dtoh(&grad).map_err(drv("downloading the gradient"))?,
        stages: stages::<T>(
            shape,
            batch.kl,
            batch.estimator,
            times,
            [workspace_bytes, workspace_bytes, kl_workspace_bytes, gae_workspace_bytes, 0],
        ),
    })
}
