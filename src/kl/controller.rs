//! The KL coefficient β over training: fixed or adaptive.

use crate::{Error, Result};

/// The KL-coefficient controller: fixed, or adaptive after Ziegler et al. (2019).
///
/// Adaptive: `e = clip(KL_observed / KL_target − 1, −0.2, 0.2)`, `β ← β·(1 + e·n_steps/horizon)`.
/// β stays finite and positive: the constructors reject a NaN, infinite or non-positive setting,
/// and an update that would take β to 0, below it or past f64's range is an error that leaves β
/// as it was.
///
/// ```
/// use rlhf_kernels::KlController;
/// let mut c = KlController::adaptive(0.1, 6.0, 10_000.0)?;
/// c.update(12.0, 256)?; // KL twice the target: e = 0.2 (clipped)
/// assert!((c.value() - 0.1 * (1.0 + 0.2 * 256.0 / 10_000.0)).abs() < 1e-12);
/// assert!(c.update(0.0, 60_000).is_err()); // 1 − 0.2·6 < 0: β would turn negative
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KlController {
    value: f64,
    /// `(target KL, horizon in samples)` when adaptive.
    adaptive: Option<(f64, f64)>,
}

impl KlController {
    /// A fixed β (finite, ≥ 0).
    pub fn fixed(value: f64) -> Result<Self> {
        if !(value.is_finite() && value >= 0.0) {
            return Err(bad_controller("beta", value, "a finite β ≥ 0"));
        }
        Ok(KlController { value, adaptive: None })
    }
    /// An adaptive β starting at `initial` (> 0), steering the observed KL towards `target` (> 0)
    /// over `horizon` samples (> 0); all finite.
    pub fn adaptive(initial: f64, target: f64, horizon: f64) -> Result<Self> {
        for (name, v) in [("initial beta", initial), ("target KL", target), ("horizon", horizon)] {
            if !(v.is_finite() && v > 0.0) {
                return Err(bad_controller(name, v, "a finite value > 0"));
            }
        }
        Ok(KlController { value: initial, adaptive: Some((target, horizon)) })
    }
    /// The current β.
    pub fn value(&self) -> f64 {
        self.value
    }
    /// Whether β follows the observed KL.
    pub fn is_adaptive(&self) -> bool {
        self.adaptive.is_some()
    }
    /// Updates β after `n_steps` samples whose KL was `observed` (no-op when fixed) and returns
    /// the new β. A non-finite observation leaves β unchanged. Errors, β unchanged: a step that
    /// would make β non-positive (`e·n_steps/horizon ≤ −1`) or overflow.
    pub fn update(&mut self, observed: f64, n_steps: usize) -> Result<f64> {
        if let Some((target, horizon)) = self.adaptive
            && observed.is_finite()
        {
            let e = (observed / target - 1.0).clamp(-0.2, 0.2);
            let next = self.value * (1.0 + e * n_steps as f64 / horizon);
            if !(next.is_finite() && next > 0.0) {
                return Err(bad_controller(
                    "n_steps",
                    n_steps as f64,
                    "a step after which β stays finite and > 0 (n_steps/horizon too large)",
                ));
            }
            self.value = next;
        }
        Ok(self.value)
    }
}

fn bad_controller(name: &'static str, value: f64, expected: &'static str) -> Error {
    Error::InvalidOption { name, value: value.to_string(), expected }
}
