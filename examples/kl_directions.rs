//! The two KL directions and the sampled estimators, made visible.
//!
//! A toy vocabulary of 64 tokens with a bimodal reference policy (modes at tokens 16 and 48)
//! and a family of unimodal policies whose mode sweeps across the vocabulary:
//!
//! - left: the exact `KL[π‖π_ref]` and `KL[π_ref‖π]` of each policy (the crate's exact
//!   full-vocabulary op). The policy-first KL drops low when the policy sits on *either* mode
//!   (it only asks the policy not to put mass where the reference has little); the
//!   reference-first KL stays high there, since one of the reference's modes is left uncovered.
//! - right: the mean ± one standard deviation of the sampled estimators k1, k2 and k3 over
//!   4000 tokens drawn from each policy, against the exact `KL[π‖π_ref]`: k1 and k3 are
//!   unbiased and k2 is not; k3's spread is small only where the policy is close to the
//!   reference (its variance grows with the ratio r = π_ref/π). No clamps here: the default
//!   clamps (verl's) keep training stable but bias k3 downwards where `r` exceeds them.
//!
//! ```text
//! cargo run --release --example kl_directions -- [--out docs/kl_directions.png] [--font /path/to/font.ttf]
//! ```

use std::error::Error;

use plotters::prelude::*;
use plotters::style::FontStyle;
use rlhf_kernels::ReferenceRows;
use rlhf_kernels::testing::Rng;
use rlhf_kernels::{
    Aggregation, ExactDivergence, ExactKlOptions, KlEstimator, RowShape, SampledKlOptions, cpu,
};
use rlhf_kernels::{ExactKlOutputs, SampledKlInputs, SampledKlOutputs};

const VOCAB: usize = 64;
const SAMPLES: usize = 4000;
const WIDTH: f64 = 6.0;

/// Fonts tried when `--font` is not given (text needs one; nothing is read at build time).
const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/Library/Fonts/Arial.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

fn main() -> Result<(), Box<dyn Error>> {
    let mut out = "docs/kl_directions.png".to_string();
    let mut font = None;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        match (flag.as_str(), args.next()) {
            ("--out", Some(v)) => out = v,
            ("--font", Some(v)) => font = Some(v),
            _ => return Err("usage: kl_directions [--out file.png] [--font font.ttf]".into()),
        }
    }
    register_font(font.as_deref())?;

    // Reference: two bumps. Policies: one bump centred at μ = 0..63.
    let reference: Vec<f32> = (0..VOCAB).map(|v| bump(v, &[16.0, 48.0])).collect();
    let policies: Vec<f32> =
        (0..VOCAB).flat_map(|mu| (0..VOCAB).map(move |v| bump(v, &[mu as f64]))).collect();
    let shape = RowShape::new(VOCAB, VOCAB);
    let references: Vec<f32> = (0..VOCAB).flat_map(|_| reference.iter().copied()).collect();

    let exact = |divergence| -> Result<Vec<f32>, rlhf_kernels::Error> {
        let mut kl = vec![0.0f32; VOCAB];
        let reference_rows = ReferenceRows::new(&references, shape);
        let out = ExactKlOutputs::default().value(&mut kl);
        cpu::exact_kl(&policies, shape, &reference_rows, out, &ExactKlOptions::new(divergence))?;
        Ok(kl)
    };
    let kl_pr = exact(ExactDivergence::PolicyRef)?;
    let kl_rp = exact(ExactDivergence::RefPolicy)?;

    // Sampled estimators: per policy, SAMPLES tokens drawn from it.
    let log_softmax = |row: &[f32]| {
        let mut out = vec![0.0f32; VOCAB];
        cpu::log_softmax(row, RowShape::new(1, VOCAB), &mut out, &Default::default()).map(|_| out)
    };
    let ref_logp = log_softmax(&reference)?;
    let mut rng = Rng::new(7);
    let estimators = [KlEstimator::K1, KlEstimator::K2, KlEstimator::K3];
    let mut bands = vec![Vec::new(); estimators.len()];
    for mu in 0..VOCAB {
        let logp = log_softmax(&policies[mu * VOCAB..(mu + 1) * VOCAB])?;
        let tokens: Vec<usize> = (0..SAMPLES).map(|_| draw(&logp, &mut rng)).collect();
        let lp: Vec<f32> = tokens.iter().map(|&y| logp[y]).collect();
        let rlp: Vec<f32> = tokens.iter().map(|&y| ref_logp[y]).collect();
        for (k, &e) in estimators.iter().enumerate() {
            let mut values = vec![0.0f32; SAMPLES];
            // No clamps: they keep training stable but bias the estimates where |log r| is large.
            let opts = SampledKlOptions::new(e)
                .aggregation(Aggregation::TokenMean)
                .log_ratio_clamp(None)
                .value_clamp(None);
            let stats = cpu::sampled_kl(
                &SampledKlInputs::new(RowShape::new(1, SAMPLES), &lp, &rlp),
                SampledKlOutputs::default().values(&mut values),
                &opts,
            )?;
            let mean = stats.mean(e);
            let var = values.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / (SAMPLES - 1) as f64;
            bands[k].push((mu as f64, mean, var.sqrt()));
        }
    }

    if let Some(dir) = std::path::Path::new(&out).parent() {
        std::fs::create_dir_all(dir)?;
    }
    let root = BitMapBackend::new(&out, (1400, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(700);
    let xs = || (0..VOCAB).map(|v| v as f64);

    let top = kl_pr.iter().chain(&kl_rp).fold(0.0f32, |m, &v| m.max(v)) as f64 * 1.05;
    let mut chart = ChartBuilder::on(&left)
        .caption("Exact KL of a one-mode policy against a two-mode reference", ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(0.0..(VOCAB - 1) as f64, 0.0..top)?;
    chart.configure_mesh().x_desc("policy mode μ (token)").y_desc("nats").draw()?;
    chart
        .draw_series(LineSeries::new(xs().zip(kl_pr.iter().map(|&v| v as f64)), BLUE.stroke_width(3)))?
        .label("KL[π ‖ π_ref]: low on either mode (conservative)")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLUE.stroke_width(3)));
    chart
        .draw_series(LineSeries::new(xs().zip(kl_rp.iter().map(|&v| v as f64)), RED.stroke_width(3)))?
        .label("KL[π_ref ‖ π]: punishes an uncovered mode (mass-covering)")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RED.stroke_width(3)));
    for mode in [16.0, 48.0] {
        chart.draw_series(LineSeries::new([(mode, 0.0), (mode, top)], BLACK.mix(0.25)))?;
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.9))
        .position(SeriesLabelPosition::LowerMiddle)
        .draw()?;

    let band_top = bands.iter().flatten().map(|(_, m, s)| m + s).fold(0.0f64, f64::max) * 1.05;
    let band_bottom = bands.iter().flatten().map(|(_, m, s)| m - s).fold(0.0f64, f64::min);
    let mut chart = ChartBuilder::on(&right)
        .caption(
            format!("Sampled estimators of KL[π ‖ π_ref], mean ± std over {SAMPLES} tokens"),
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(0.0..(VOCAB - 1) as f64, band_bottom..band_top)?;
    chart.configure_mesh().x_desc("policy mode μ (token)").y_desc("nats").draw()?;
    let colours = [GREEN, MAGENTA, BLUE];
    let names = [
        "k1 = −log r: unbiased",
        "k2 = ½ log² r: biased",
        "k3 = r − 1 − log r: unbiased, low variance only near π_ref",
    ];
    for ((band, colour), name) in bands.iter().zip(colours).zip(names) {
        let upper = band.iter().map(|&(x, m, s)| (x, m + s));
        let lower = band.iter().rev().map(|&(x, m, s)| (x, m - s));
        chart.draw_series(std::iter::once(Polygon::new(
            upper.chain(lower).collect::<Vec<_>>(),
            colour.mix(0.12),
        )))?;
        chart
            .draw_series(LineSeries::new(band.iter().map(|&(x, m, _)| (x, m)), colour.stroke_width(2)))?
            .label(name)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], colour.stroke_width(2)));
    }
    chart
        .draw_series(LineSeries::new(xs().zip(kl_pr.iter().map(|&v| v as f64)), BLACK.stroke_width(2)))?
        .label("exact KL[π ‖ π_ref]")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK.stroke_width(2)));
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.9))
        .position(SeriesLabelPosition::UpperMiddle)
        .draw()?;
    root.present()?;
    println!("wrote {out}");
    Ok(())
}

/// Log of a mixture of Gaussian bumps of width [`WIDTH`] at `centres` over a 3 % floor, as a
/// logit. The floor keeps every ratio π_ref/π moderate; without it rare draws from a tail
/// where the reference is large give k3 an enormous variance.
fn bump(v: usize, centres: &[f64]) -> f32 {
    let density: f64 = centres.iter().map(|c| (-(v as f64 - c).powi(2) / (2.0 * WIDTH * WIDTH)).exp()).sum();
    (density + 0.03).ln() as f32
}

/// A token drawn from the distribution with log-probabilities `logp`.
fn draw(logp: &[f32], rng: &mut Rng) -> usize {
    let u = rng.uniform();
    let mut acc = 0.0;
    for (v, &l) in logp.iter().enumerate() {
        acc += (l as f64).exp();
        if u < acc {
            return v;
        }
    }
    logp.len() - 1
}

fn register_font(path: Option<&str>) -> Result<(), Box<dyn Error>> {
    let candidates: Vec<&str> = path.map_or_else(|| FONT_PATHS.to_vec(), |p| vec![p]);
    for p in candidates {
        if let Ok(bytes) = std::fs::read(p) {
            // The font must outlive every chart: leak it (once, in a short-lived program).
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                .map_err(|_| format!("{p}: not a usable font"))?;
            return Ok(());
        }
    }
    Err("no font found: pass --font /path/to/a/font.ttf".into())
}
