//! Options shared by the three backends of the logprobs family (MATH.md §1).

use crate::{Error, Result};

/// Options of [`log_softmax`](crate::cpu::log_softmax) and its backward, on every backend.
///
/// ```
/// use rlhf_kernels::LogSoftmaxOptions;
/// let opts = LogSoftmaxOptions::default().temperature(0.7);
/// assert_eq!(opts.temperature, 0.7);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct LogSoftmaxOptions {
    /// Sampling temperature τ > 0: the op works on `z = logits / τ`. Default 1.
    pub temperature: f32,
}

impl Default for LogSoftmaxOptions {
    fn default() -> Self {
        LogSoftmaxOptions { temperature: 1.0 }
    }
}

impl LogSoftmaxOptions {
    /// Sets the temperature τ (finite, > 0, and 1/τ finite).
    pub fn temperature(mut self, temperature: f32) -> Self {
        self.temperature = temperature;
        self
    }

    /// Checks the options and returns 1/τ.
    pub(crate) fn inv_temperature(&self) -> Result<f32> {
        let t = self.temperature;
        let inv = 1.0 / t;
        if !(t.is_finite() && t > 0.0 && inv.is_finite()) {
            return Err(Error::InvalidOption {
                name: "temperature",
                value: t.to_string(),
                expected: "a finite temperature > 0 whose inverse is finite (e.g. 1.0 or 0.7)",
            });
        }
        Ok(inv)
    }
}
