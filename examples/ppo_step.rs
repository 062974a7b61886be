//! The main job: one training step's worth of kernels on a synthetic batch, on the best
//! backend, checked against the f64 reference, with timings.
//!
//! Today it runs the logprobs family's log-softmax forward and backward; later op families
//! extend it into the full PPO / GRPO step.
//!
//! ```text
//! cargo run --release --example ppo_step -- [--rows N] [--vocab V] [--dtype f32|f16|bf16]
//!                                           [--temperature T] [--backend auto|cpu|cuda] [--iters K]
//! ```

use std::process::ExitCode;
use std::time::Instant;

use rlhf_kernels::testing::{Rng, Tolerance, check_close};
use rlhf_kernels::{Backend, DType, Element, Error, LogSoftmaxOptions, RowShape, bf16, cpu, f16, reference};

#[derive(Debug, Clone)]
struct Args {
    rows: usize,
    vocab: usize,
    dtype: DType,
    temperature: f32,
    backend: String,
    iters: usize,
}

impl Args {
    fn parse() -> Result<Args, String> {
        let mut a = Args {
            rows: 256,
            vocab: 32000,
            dtype: DType::BF16,
            temperature: 1.0,
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
                "--dtype" => a.dtype = value.parse().map_err(|e: Error| bad(&e))?,
                "--temperature" => a.temperature = value.parse().map_err(|e| bad(&e))?,
                "--backend" => a.backend = value,
                "--iters" => a.iters = value.parse::<usize>().map_err(|e| bad(&e))?.max(1),
                _ => return Err(format!("unknown flag {flag}")),
            }
        }
        Ok(a)
    }
}

const USAGE: &str = "usage: ppo_step [--rows N] [--vocab V] [--dtype f32|f16|bf16] [--temperature T] \
                     [--backend auto|cpu|cuda] [--iters K]";

/// One row of the report.
struct Stage {
    name: &'static str,
    millis: f64,
    bytes: usize,
    extra_bytes: usize,
    max_error: f64,
    tolerance: Tolerance,
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
    let (best, why) = Backend::best_with_reason();
    match name {
        "cpu" => Ok(Backend::Cpu),
        "auto" => {
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

fn run<T: Element>(args: &Args) -> Result<bool, Error> {
    let backend = choose_backend(&args.backend)?;
    let shape = RowShape::new(args.rows, args.vocab);
    let opts = LogSoftmaxOptions::default().temperature(args.temperature);
    println!("backend: {}", backend.describe());
    println!(
        "batch: {} rows x {} vocab, {} logits, temperature {}",
        shape.rows,
        shape.cols,
        T::DTYPE,
        args.temperature
    );

    let mut rng = Rng::new(42);
    let logits: Vec<T> = rng.logits(shape, 3.0);
    let grad_out = rng.normals(shape.len(), 1.0);

    let (out, grad, mut stages) = match &backend {
        Backend::Cpu => run_cpu(&logits, &grad_out, shape, &opts, args.iters)?,
        #[cfg(feature = "cuda")]
        Backend::Cuda(device) => run_cuda(device, &logits, &grad_out, shape, &opts, args.iters)?,
        _ => unreachable!("Backend has no other variant in this build"),
    };

    // Hold a spread of rows (all of them for small batches) to the f64 reference.
    let check_rows: Vec<usize> = (0..shape.rows).step_by(shape.rows.div_ceil(256)).collect();
    let sub = |r: &[usize]| RowShape::new(r.len(), shape.cols);
    let pick =
        |v: &[T]| check_rows.iter().flat_map(|&r| v[shape.row_range(r)].iter().copied()).collect::<Vec<T>>();
    let pick_f32 = |v: &[f32]| {
        check_rows.iter().flat_map(|&r| v[shape.row_range(r)].iter().copied()).collect::<Vec<f32>>()
    };
    let (x, g) = (pick(&logits), pick_f32(&grad_out));
    let started = Instant::now();
    let expected_out = reference::log_softmax(&x, sub(&check_rows), &opts)?;
    let expected_grad = reference::log_softmax_backward(&x, sub(&check_rows), &g, &opts)?;
    let reference_ms = started.elapsed().as_secs_f64() * 1e3;
    stages[0].max_error = max_error(&pick_f32(&out), &expected_out);
    stages[1].max_error = max_error(&pick(&grad), &expected_grad);
    let scale = expected_grad.iter().fold(0.0f64, |m, e| m.max(e.abs()));
    stages[0].tolerance = Tolerance::for_dtype(DType::F32).scaled(12.0 * 3.0 / args.temperature as f64);
    stages[1].tolerance = Tolerance::for_dtype(T::DTYPE).scaled(scale);
    let ok = [
        check_close(&pick_f32(&out), &expected_out, stages[0].tolerance),
        check_close(&pick(&grad), &expected_grad, stages[1].tolerance),
    ];

    println!();
    println!("{:<22} {:>10} {:>10} {:>12} {:>12}  check", "stage", "ms", "GB/s", "extra MiB", "max |err|");
    for (stage, ok) in stages.iter().zip(&ok) {
        println!(
            "{:<22} {:>10.3} {:>10.1} {:>12.1} {:>12.2e}  {}",
            stage.name,
            stage.millis,
            stage.bytes as f64 / stage.millis / 1e6,
            stage.extra_bytes as f64 / (1 << 20) as f64,
            stage.max_error,
            match ok {
                Ok(()) => "ok".to_string(),
                Err(m) => format!("FAIL: {m}"),
            }
        );
    }
    println!();
    println!(
        "ms: median of {} runs; GB/s: bytes each op must move (read inputs once, write outputs once) / time; \
         extra MiB: memory the op allocates beyond its inputs and outputs; checked {} of {} rows against the f64 \
         reference in {reference_ms:.0} ms",
        args.iters,
        check_rows.len(),
        shape.rows
    );
    Ok(ok.iter().all(|r| r.is_ok()))
}

fn max_error<A: Element>(actual: &[A], expected: &[f64]) -> f64 {
    actual
        .iter()
        .zip(expected)
        .filter(|(a, e)| a.to_f64() != **e)
        .map(|(a, e)| (a.to_f64() - e).abs())
        .fold(0.0, f64::max)
}

fn stage(name: &'static str, times_ms: &mut [f64], bytes: usize) -> Stage {
    times_ms.sort_by(f64::total_cmp);
    let millis = times_ms[times_ms.len() / 2];
    Stage { name, millis, bytes, extra_bytes: 0, max_error: 0.0, tolerance: Tolerance { rel: 0.0, abs: 0.0 } }
}

fn bytes_moved<T: Element>(shape: RowShape) -> (usize, usize) {
    let n = shape.len();
    let forward = n * (T::DTYPE.size_bytes() + 4);
    let backward = n * (4 + 4 + T::DTYPE.size_bytes());
    (forward, backward)
}

type Outcome<T> = (Vec<f32>, Vec<T>, Vec<Stage>);

fn run_cpu<T: Element>(
    logits: &[T],
    grad_out: &[f32],
    shape: RowShape,
    opts: &LogSoftmaxOptions,
    iters: usize,
) -> Result<Outcome<T>, Error> {
    let mut out = vec![0.0f32; shape.len()];
    let mut grad = vec![T::default(); shape.len()];
    let (mut fwd, mut bwd) = (Vec::new(), Vec::new());
    for _ in 0..iters {
        let t = Instant::now();
        cpu::log_softmax(logits, shape, &mut out, opts)?;
        fwd.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        cpu::log_softmax_backward(&out, grad_out, shape, &mut grad, opts)?;
        bwd.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let (fb, bb) = bytes_moved::<T>(shape);
    Ok((
        out,
        grad,
        vec![stage("log_softmax forward", &mut fwd, fb), stage("log_softmax backward", &mut bwd, bb)],
    ))
}

#[cfg(feature = "cuda")]
fn run_cuda<T: Element>(
    device: &rlhf_kernels::cuda::CudaDevice,
    logits: &[T],
    grad_out: &[f32],
    shape: RowShape,
    opts: &LogSoftmaxOptions,
    iters: usize,
) -> Result<Outcome<T>, Error> {
    use rlhf_kernels::cuda::{self, CudaStatus};
    use rlhf_kernels::cudarc::driver::sys::CUevent_flags;

    let s = device.stream();
    let drv = |during: &'static str| {
        move |e: rlhf_kernels::cudarc::driver::DriverError| Error::Driver {
            during,
            message: format!("{e:?}"),
        }
    };
    let x = s.clone_htod(logits).map_err(drv("uploading logits"))?;
    let g = s.clone_htod(grad_out).map_err(drv("uploading grad_out"))?;
    let mut y = s.alloc_zeros::<f32>(shape.len()).map_err(drv("allocating out"))?;
    let mut dx = s.alloc_zeros::<T>(shape.len()).map_err(drv("allocating grad"))?;
    let mut status = CudaStatus::new(s)?;
    let (mut fwd, mut bwd) = (Vec::new(), Vec::new());
    let event = || s.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(drv("recording an event"));
    // One untimed warm-up, then `iters` timed runs of each kernel with CUDA events.
    for i in 0..=iters {
        let e0 = event()?;
        cuda::log_softmax(s, &x, shape, &mut y, &mut status, opts)?;
        let e1 = event()?;
        cuda::log_softmax_backward(s, &y, &g, shape, &mut dx, &mut status, opts)?;
        let e2 = event()?;
        if i > 0 {
            fwd.push(e0.elapsed_ms(&e1).map_err(drv("timing"))? as f64);
            bwd.push(e1.elapsed_ms(&e2).map_err(drv("timing"))? as f64);
        }
    }
    status.check(s)?;
    let out = s.clone_dtoh(&y).map_err(drv("downloading out"))?;
    let grad = s.clone_dtoh(&dx).map_err(drv("downloading grad"))?;
    let (fb, bb) = bytes_moved::<T>(shape);
    Ok((
        out,
        grad,
        vec![stage("log_softmax forward", &mut fwd, fb), stage("log_softmax backward", &mut bwd, bb)],
    ))
}
