//! GRPO on a toy task with a tiny candle policy, every RL op from `rlhf_kernels::candle`.
//!
//! The task: given a target `S`, write `L` tokens whose digits (tokens `0`–`9`; every other
//! token of the V = 1000 vocabulary counts 0) add up to `S`. Reward `1 − |Σ digits − S| / 9L`.
//! A random policy almost never writes a digit, so the reward starts near `1 − S/9L` and rises
//! as the policy learns to count.
//!
//! Each step: sample `G` answers to each of `P` prompts, score them, GRPO advantages
//! ([`group_advantages`]), then two epochs of the clipped surrogate ([`policy_loss`]) on
//! token log-probabilities and entropies ([`token_logprobs`]) plus β·KL[π ‖ π_ref] to the
//! frozen initial policy, exact over the vocabulary ([`exact_kl`]); the gradients flow back
//! through candle's autograd into the model, updated by Adam.
//!
//! ```text
//! cargo run --release --features candle --example candle_grpo
//! cargo run --release --features candle-cuda --example candle_grpo -- --device cuda
//! ```
//! Options: `--steps N` (40), `--seed N` (1), `--device cpu|cuda`.

use std::time::Instant;

use candle_core::{D, DType, Device, Result, Tensor, Var};
use rlhf_kernels::candle::{PolicyTensors, exact_kl, group_advantages, policy_loss, token_logprobs};
use rlhf_kernels::testing::Rng;
use rlhf_kernels::{
    ExactDivergence, ExactKlOptions, GroupAdvantageOptions, Groups, PolicyLossOptions, PolicyObjective,
};

const VOCAB: usize = 1000;
const WIDTH: usize = 64;
const LEN: usize = 6;
const PROMPTS: usize = 16;
const GROUP: usize = 8;
/// The first token id that encodes a target sum (`TARGET_BASE + S`).
const TARGET_BASE: u32 = 900;

/// A tiny autoregressive policy: token + prompt + position embeddings, two tanh layers, an
/// LM head. Its next-token logits depend on the previous token, the target and the position.
struct Policy {
    embed: Var,
    position: Var,
    hidden: [Var; 2],
    head: Var,
}

impl Policy {
    fn new(rng: &mut Rng, dev: &Device) -> Result<Self> {
        let mut init = |rows: usize, cols: usize, scale: f64| {
            Var::from_tensor(&Tensor::from_vec(rng.normals(rows * cols, scale), (rows, cols), dev)?)
        };
        let hidden_scale = 1.0 / (WIDTH as f64).sqrt();
        Ok(Policy {
            embed: init(VOCAB, WIDTH, 0.5)?,
            position: init(LEN, WIDTH, 0.5)?,
            hidden: [init(WIDTH, WIDTH, hidden_scale)?, init(WIDTH, WIDTH, hidden_scale)?],
            head: init(WIDTH, VOCAB, hidden_scale)?,
        })
    }

    fn vars(&self) -> Vec<&Var> {
        vec![&self.embed, &self.position, &self.hidden[0], &self.hidden[1], &self.head]
    }

    /// A frozen copy (the reference policy).
    fn frozen(&self) -> Result<Policy> {
        let copy = |v: &Var| Var::from_tensor(&v.as_tensor().copy()?);
        Ok(Policy {
            embed: copy(&self.embed)?,
            position: copy(&self.position)?,
            hidden: [copy(&self.hidden[0])?, copy(&self.hidden[1])?],
            head: copy(&self.head)?,
        })
    }

    /// Logits `[B, T, V]` for inputs `[B, T]` (previous tokens) and targets `[B]`.
    fn logits(&self, inputs: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let (b, t) = inputs.dims2()?;
        let tokens = self.embed.embedding(&inputs.flatten_all()?)?.reshape((b, t, WIDTH))?;
        let prompt = self.embed.embedding(targets)?.unsqueeze(1)?;
        let position = self.position.narrow(0, 0, t)?.unsqueeze(0)?;
        let mut h = tokens.broadcast_add(&prompt)?.broadcast_add(&position)?.reshape((b * t, WIDTH))?;
        for w in &self.hidden {
            h = (h.matmul(w.as_tensor())?.tanh()? + &h)?;
        }
        h.matmul(self.head.as_tensor())?.reshape((b, t, VOCAB))
    }
}

/// Adam with bias correction.
struct Adam {
    moments: Vec<(Tensor, Tensor)>,
    lr: f64,
    step: i32,
}

impl Adam {
    fn new(vars: &[&Var], lr: f64) -> Result<Self> {
        let moments = vars.iter().map(|v| Ok((v.zeros_like()?, v.zeros_like()?))).collect::<Result<_>>()?;
        Ok(Adam { moments, lr, step: 0 })
    }

    fn update(&mut self, vars: &[&Var], grads: &candle_core::backprop::GradStore) -> Result<()> {
        let (b1, b2, eps): (f64, f64, f64) = (0.9, 0.999, 1e-8);
        self.step += 1;
        let (c1, c2) = (1.0 - b1.powi(self.step), 1.0 - b2.powi(self.step));
        for (var, (m, v)) in vars.iter().zip(&mut self.moments) {
            let Some(g) = grads.get(var) else { continue };
            *m = ((m.affine(b1, 0.0)? + g.affine(1.0 - b1, 0.0)?)?).detach();
            *v = ((v.affine(b2, 0.0)? + g.sqr()?.affine(1.0 - b2, 0.0)?)?).detach();
            let step = (m.affine(1.0 / c1, 0.0)? / (v.affine(1.0 / c2, 0.0)?.sqrt()? + eps)?)?;
            var.set(&(var.as_tensor() - step.affine(self.lr, 0.0)?)?)?;
        }
        Ok(())
    }
}

/// Samples `LEN` tokens per row from the policy; returns the answers `[B, LEN]`.
fn sample(policy: &Policy, targets: &Tensor, rng: &mut Rng) -> Result<Vec<Vec<u32>>> {
    let b = targets.dim(0)?;
    let mut answers = vec![Vec::with_capacity(LEN); b];
    for t in 0..LEN {
        // The input at position t is the previous token (the target token at t = 0).
        let prefix: Vec<u32> =
            (0..b).flat_map(|i| inputs_of(&answers[i], t, targets_at(targets, i))).collect();
        let inputs = Tensor::from_vec(prefix, (b, t + 1), targets.device())?;
        let logits = policy.logits(&inputs, targets)?.narrow(1, t, 1)?.squeeze(1)?;
        let probs = (logits.broadcast_sub(&logits.max_keepdim(D::Minus1)?)?.exp()?).to_vec2::<f32>()?;
        for (answer, p) in answers.iter_mut().zip(probs) {
            let total: f32 = p.iter().sum();
            let mut u = rng.uniform() as f32 * total;
            let pick = p.iter().position(|&x| {
                u -= x;
                u <= 0.0
            });
            answer.push(pick.unwrap_or(VOCAB - 1) as u32);
        }
    }
    Ok(answers)
}

fn targets_at(targets: &Tensor, i: usize) -> u32 {
    targets.get(i).and_then(|t| t.to_scalar::<u32>()).unwrap_or(TARGET_BASE)
}

/// The model's inputs for positions `0..len`: the target token, then the answer so far.
fn inputs_of(answer: &[u32], len: usize, target: u32) -> Vec<u32> {
    std::iter::once(target).chain(answer.iter().copied()).take(len + 1).collect()
}

fn reward(answer: &[u32], target_sum: u32) -> f32 {
    let sum: u32 = answer.iter().filter(|&&t| t < 10).sum();
    1.0 - sum.abs_diff(target_sum) as f32 / (9 * LEN) as f32
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let steps: usize = flag("--steps").map_or(40, |s| s.parse().expect("--steps N"));
    let seed: u64 = flag("--seed").map_or(1, |s| s.parse().expect("--seed N"));
    let dev = match flag("--device").as_deref() {
        None | Some("cpu") => Device::Cpu,
        Some("cuda") => Device::new_cuda(0)?,
        Some(other) => panic!("--device cpu|cuda, not {other}"),
    };
    let mut rng = Rng::new(seed);
    let policy = Policy::new(&mut rng, &dev)?;
    let reference = policy.frozen()?;
    let mut adam = Adam::new(&policy.vars(), 3e-3)?;
    let beta = 0.02;
    let loss_opts = PolicyLossOptions::new(PolicyObjective::Clip).entropy_coef(1e-3);
    let kl_opts = ExactKlOptions::new(ExactDivergence::PolicyRef);
    let group_ids: Vec<u32> = (0..PROMPTS * GROUP).map(|i| (i / GROUP) as u32).collect();
    let groups = Groups::new(&group_ids, PROMPTS).map_err(candle_core::Error::wrap)?;
    let b = PROMPTS * GROUP;
    println!("GRPO on {dev:?}: {PROMPTS} prompts x {GROUP} answers of {LEN} tokens, V = {VOCAB}");
    println!(
        "{:>4} {:>8} {:>10} {:>9} {:>8} {:>7}",
        "step", "reward", "KL[pi|ref]", "clip frac", "entropy", "ms"
    );
    let mut rewards_per_step = Vec::with_capacity(steps);
    for step in 0..steps {
        let start = Instant::now();
        let sums: Vec<u32> = (0..PROMPTS).map(|_| 3 + rng.below(9 * LEN / 2) as u32).collect();
        let target_ids: Vec<u32> = (0..b).map(|i| TARGET_BASE + sums[i / GROUP]).collect();
        let targets = Tensor::from_vec(target_ids.clone(), b, &dev)?;
        let answers = sample(&policy, &targets, &mut rng)?;
        let scores: Vec<f32> =
            answers.iter().zip(&target_ids).map(|(a, &t)| reward(a, t - TARGET_BASE)).collect();
        let mean_reward = scores.iter().sum::<f32>() / b as f32;
        rewards_per_step.push(mean_reward);

        let scores = Tensor::from_vec(scores, b, &dev)?;
        let mask = Tensor::ones((b, LEN), DType::U8, &dev)?;
        let advantages = group_advantages(&scores, &groups, Some(&mask), &GroupAdvantageOptions::grpo())?;
        let advantages = advantages.per_token.expect("asked for with a mask");
        let inputs: Vec<u32> =
            answers.iter().zip(&target_ids).flat_map(|(a, &t)| inputs_of(a, LEN - 1, t)).collect();
        let inputs = Tensor::from_vec(inputs, (b, LEN), &dev)?;
        let answers = Tensor::from_vec(answers.concat(), (b, LEN), &dev)?;
        let ref_logits = reference.logits(&inputs, &targets)?.detach();

        let mut old_logp = None;
        let (mut kl_mean, mut clip, mut entropy) = (0.0, 0.0, 0.0);
        for _epoch in 0..2 {
            let logits = policy.logits(&inputs, &targets)?;
            let tokens = token_logprobs(&logits, &answers, None, &Default::default())?;
            let old = old_logp.get_or_insert_with(|| tokens.logp.detach()).clone();
            let inputs = PolicyTensors::new(&old, &advantages).mask(&mask).entropy(&tokens.entropy);
            let loss = policy_loss(&tokens.logp, &inputs, &loss_opts)?;
            let kl = exact_kl(&logits, &ref_logits, None, &kl_opts)?.mean_all()?;
            let total = (&loss.loss + kl.affine(beta, 0.0)?)?;
            adam.update(&policy.vars(), &total.backward()?)?;
            (kl_mean, entropy) = (kl.to_scalar::<f32>()?, loss.stats.entropy_loss);
            clip = loss.stats.clip_fraction_low + loss.stats.clip_fraction_high;
        }
        let ms = start.elapsed().as_secs_f64() * 1e3;
        println!("{step:>4} {mean_reward:>8.4} {kl_mean:>10.5} {clip:>9.4} {entropy:>8.4} {ms:>7.1}");
    }
    let window = (steps / 4).max(1);
    let mean = |r: &[f32]| r.iter().sum::<f32>() / r.len() as f32;
    let (first, last) = (mean(&rewards_per_step[..window]), mean(&rewards_per_step[steps - window..]));
    println!("mean reward: first {window} steps {first:.4}, last {window} steps {last:.4}");
    if last <= first + 0.05 {
        eprintln!("the reward did not rise");
        std::process::exit(1);
    }
    Ok(())
}
