//! The crate's one error type. Every message says what went wrong and what to do about it.

use std::fmt;

/// Result alias used by every fallible function of the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong, from bad shapes to a missing GPU.
///
/// Numerically hostile but *valid* input (banned `-inf` logits, huge logits, all-masked rows)
/// is not an error: it gives the result `MATH.md` defines. Input that has no defined result
/// (a row of only `-inf`, a NaN) is reported as [`Error::InvalidRow`], never as a silent NaN.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A buffer's length does not match the shape it was passed with.
    #[error(
        "{what}: the shape needs {min}..={max} elements, the buffer has {actual}; \
         a strided buffer must cover (rows - 1) * row_stride + cols elements"
    )]
    ShapeMismatch {
        /// Which argument.
        what: &'static str,
        /// Fewest elements the shape can live in.
        min: usize,
        /// Most elements the shape can live in (`rows * row_stride`).
        max: usize,
        /// Elements the buffer has.
        actual: usize,
    },

    /// The distance between row starts is smaller than a row.
    #[error(
        "{what}: row stride {row_stride} is smaller than the row length {cols}; the stride is \
         the distance between row starts and must be at least cols"
    )]
    RowStrideTooSmall {
        /// Which argument.
        what: &'static str,
        /// The stride given.
        row_stride: usize,
        /// The row length.
        cols: usize,
    },

    /// A framework tensor's strides that the ops cannot read in place (see
    /// [`RowBlocks`](crate::RowBlocks)).
    #[error("{what}: {problem}")]
    Layout {
        /// Which argument.
        what: &'static str,
        /// What is wrong and what to do, e.g. "the last dimension must have unit stride (it has
        /// 4); make the tensor contiguous first".
        problem: String,
    },

    /// A shape with no rows or no columns.
    #[error("{what} is empty ({rows} rows x {cols} cols); every op needs at least one element")]
    EmptyInput {
        /// Which argument.
        what: &'static str,
        /// Rows given.
        rows: usize,
        /// Columns given.
        cols: usize,
    },

    /// A dimension beyond what the kernels index (rows and cols are 32-bit on the GPU).
    #[error("{what} = {value} is larger than the supported maximum {max}; split the batch")]
    TooLarge {
        /// Which dimension.
        what: &'static str,
        /// The value given.
        value: usize,
        /// The largest supported value.
        max: usize,
    },

    /// A target token id outside the vocabulary (and not the ignore index).
    #[error(
        "target {target} at row {row} is outside the vocabulary [0, {vocab}); mark padding \
         with the ignore index or the mask instead"
    )]
    TargetOutOfRange {
        /// Row of the offending target.
        row: usize,
        /// Its value.
        target: i64,
        /// The vocabulary size.
        vocab: usize,
    },

    /// A dtype the op does not implement.
    #[error("unsupported dtype {dtype} for {what}; supported: {supported}")]
    UnsupportedDtype {
        /// Which argument.
        what: &'static str,
        /// The dtype that was asked for.
        dtype: String,
        /// What would work.
        supported: &'static str,
    },

    /// An option outside its valid range.
    #[error("invalid option {name} = {value}: {expected}")]
    InvalidOption {
        /// Option name.
        name: &'static str,
        /// The value given.
        value: String,
        /// What is accepted.
        expected: &'static str,
    },

    /// A row whose result is undefined (MATH.md §1): only `-inf`, a NaN, a `+inf`, or a
    /// non-finite upstream gradient. The lowest such row is reported.
    #[error("{op}: row {row} {problem}")]
    InvalidRow {
        /// The op that found it.
        op: &'static str,
        /// Row index (0-based) in the batch.
        row: usize,
        /// What is wrong with it.
        problem: RowProblem,
    },

    /// `libcuda` could not be loaded.
    #[error(
        "the CUDA driver library (libcuda) was not found: install the NVIDIA driver or add its \
         directory to LD_LIBRARY_PATH, or use Backend::Cpu"
    )]
    NoDriver,

    /// The driver is there but the requested device is not.
    #[error(
        "no CUDA device with ordinal {ordinal} ({count} visible): check CUDA_VISIBLE_DEVICES \
         and nvidia-smi, or use Backend::Cpu"
    )]
    NoDevice {
        /// The ordinal asked for.
        ordinal: usize,
        /// Devices the driver reports.
        count: usize,
    },

    /// The crate was built without nvcc, so no kernel is embedded.
    #[error(
        "the CUDA kernels are not built into this binary (no nvcc when it was compiled): run \
         scripts/install-nvcc.sh and rebuild, or use Backend::Cpu"
    )]
    KernelsNotBuilt,

    /// A CUDA driver call failed.
    #[error("CUDA driver error while {during}: {message}")]
    Driver {
        /// What the crate was doing.
        during: &'static str,
        /// The driver's error name and description.
        message: String,
    },
}

/// Why a row has no defined result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RowProblem {
    /// A NaN logit (or a NaN in a saved forward output).
    NaN,
    /// A `+inf` logit.
    PosInf,
    /// Every entry is `-inf`: no token has positive probability.
    AllNegInf,
    /// The upstream gradient of the row is not finite (NaN or infinite, or its sum overflows).
    GradNonFinite,
    /// The row's target is outside `[0, V)` and not the ignore index (reported this way when
    /// only the device or the shard merge can see it; host-side checks return
    /// [`Error::TargetOutOfRange`] with the value).
    TargetOutOfRange,
    /// `KL[π ‖ π_ref]` (or a sampled estimate of it) is infinite: the policy gives
    /// probability to a token the reference forbids, and the gradient is undefined. For the
    /// exact divergence this includes finite reference logits so far below the row's maximum at
    /// this temperature (`Δ/τ` beyond f32) that the token's log-probability is `−inf` in f32.
    InfiniteKl,
    /// A NaN or infinite input (reward, value, KL, score) at a valid position.
    NonFinite,
    /// Every input is finite, but a result of the row does not fit its type: a loss, a reward
    /// or a log-sum-exp beyond f32 (|x| > 3.4e38), or a gradient beyond the logits' dtype (f32,
    /// f16 from 65520, bf16 from 0x7F7F8000). The inputs' scale (advantages, rewards, values,
    /// β, 1/τ) is out of any trainable range.
    Overflow,
}

impl RowProblem {
    /// Code shared with the kernels (`kernels/common.cuh`, enum `Problem`).
    pub(crate) const fn code(self) -> u8 {
        match self {
            RowProblem::NaN => 1,
            RowProblem::PosInf => 2,
            RowProblem::AllNegInf => 3,
            RowProblem::GradNonFinite => 4,
            RowProblem::TargetOutOfRange => 5,
            RowProblem::InfiniteKl => 6,
            RowProblem::NonFinite => 7,
            RowProblem::Overflow => 8,
        }
    }

    /// Every problem, in code order.
    pub(crate) const ALL: [RowProblem; 8] = [
        RowProblem::NaN,
        RowProblem::PosInf,
        RowProblem::AllNegInf,
        RowProblem::GradNonFinite,
        RowProblem::TargetOutOfRange,
        RowProblem::InfiniteKl,
        RowProblem::NonFinite,
        RowProblem::Overflow,
    ];

    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn from_code(code: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.code() == code)
    }
}

impl fmt::Display for RowProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RowProblem::NaN => "contains NaN: find where the NaN came from upstream",
            RowProblem::PosInf => "contains +inf: a logit must be finite or -inf",
            RowProblem::AllNegInf => {
                "has only -inf logits, so no token is possible: leave at least one token allowed \
                 or mask the row out"
            }
            RowProblem::GradNonFinite => "has a NaN or infinite upstream gradient",
            RowProblem::TargetOutOfRange => {
                "has a target outside [0, V) that is not the ignore index: mark padding with the \
                 ignore index or the mask"
            }
            RowProblem::InfiniteKl => {
                "has an infinite KL[policy || ref] (or estimate): the policy gives probability to a \
                 token the reference bans (-inf); use a clamped estimator (k3), KL[ref || policy] or the \
                 JSD, or ban the token in the policy too"
            }
            RowProblem::NonFinite => {
                "has a NaN or infinite input at a valid position: find where it came from upstream, or \
                 mask the position out"
            }
            RowProblem::Overflow => {
                "overflows f32 although its inputs are finite (a loss, gradient, reward or \
                 log-sum-exp beyond 3.4e38): scale the inputs (advantages, rewards, values, beta, \
                 1/temperature) into a trainable range"
            }
        })
    }
}

/// The ops that report problems through the status word, with the ids the kernels use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    LogSoftmax = 1,
    LogSoftmaxBackward = 2,
    TokenLogprobs = 3,
    TokenLogprobsBackward = 4,
    SampledKl = 5,
    ExactKl = 7,
    ExactKlBackward = 8,
    Gae = 9,
    GroupAdvantages = 10,
    Moments = 11,
    PolicyLoss = 12,
    ValueLoss = 13,
    KlRewards = 14,
    Aggregate = 15,
    Overlong = 16,
}

impl Op {
    pub(crate) const fn name(self) -> &'static str {
        match self {
            Op::LogSoftmax => "log_softmax",
            Op::LogSoftmaxBackward => "log_softmax_backward",
            Op::TokenLogprobs => "token_logprobs",
            Op::TokenLogprobsBackward => "token_logprobs_backward",
            Op::SampledKl => "sampled_kl",
            Op::ExactKl => "exact_kl",
            Op::ExactKlBackward => "exact_kl_backward",
            Op::Gae => "gae",
            Op::GroupAdvantages => "group_advantages",
            Op::Moments => "masked_moments",
            Op::PolicyLoss => "policy_loss",
            Op::ValueLoss => "value_loss",
            Op::KlRewards => "kl_rewards",
            Op::Aggregate => "aggregate",
            Op::Overlong => "overlong_shaping",
        }
    }

    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) const fn from_id(id: u8) -> Option<Self> {
        match id {
            1 => Some(Op::LogSoftmax),
            2 => Some(Op::LogSoftmaxBackward),
            3 => Some(Op::TokenLogprobs),
            4 => Some(Op::TokenLogprobsBackward),
            5 => Some(Op::SampledKl),
            7 => Some(Op::ExactKl),
            8 => Some(Op::ExactKlBackward),
            9 => Some(Op::Gae),
            10 => Some(Op::GroupAdvantages),
            11 => Some(Op::Moments),
            12 => Some(Op::PolicyLoss),
            13 => Some(Op::ValueLoss),
            14 => Some(Op::KlRewards),
            15 => Some(Op::Aggregate),
            16 => Some(Op::Overlong),
            _ => None,
        }
    }

    /// The error for `row` of this op.
    pub(crate) fn invalid_row(self, row: usize, problem: RowProblem) -> Error {
        Error::InvalidRow { op: self.name(), row, problem }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernels report problems by number: the numbers in kernels/common.cuh must be ours.
    #[test]
    fn problem_codes_match_the_kernels() {
        let header = include_str!("../kernels/common.cuh");
        for (name, problem) in [
            ("PROBLEM_NAN", RowProblem::NaN),
            ("PROBLEM_POS_INF", RowProblem::PosInf),
            ("PROBLEM_ALL_NEG_INF", RowProblem::AllNegInf),
            ("PROBLEM_GRAD_NON_FINITE", RowProblem::GradNonFinite),
            ("PROBLEM_TARGET_OUT_OF_RANGE", RowProblem::TargetOutOfRange),
            ("PROBLEM_INFINITE_KL", RowProblem::InfiniteKl),
            ("PROBLEM_NON_FINITE", RowProblem::NonFinite),
            ("PROBLEM_OVERFLOW", RowProblem::Overflow),
        ] {
            let line = format!("{name} = {},", problem.code());
            assert!(header.contains(&line), "kernels/common.cuh lacks `{line}`");
            assert_eq!(RowProblem::from_code(problem.code()), Some(problem));
        }
        let kernels = [
            include_str!("../kernels/logprobs.cu"),
            include_str!("../kernels/kl_sampled.cu"),
            include_str!("../kernels/kl_exact.cu"),
            include_str!("../kernels/advantages.cu"),
            include_str!("../kernels/ppo.cu"),
            include_str!("../kernels/aggregation.cu"),
        ]
        .concat();
        for op in [
            Op::LogSoftmax,
            Op::LogSoftmaxBackward,
            Op::TokenLogprobs,
            Op::TokenLogprobsBackward,
            Op::SampledKl,
            Op::ExactKl,
            Op::ExactKlBackward,
            Op::Gae,
            Op::GroupAdvantages,
            Op::Moments,
            Op::PolicyLoss,
            Op::ValueLoss,
            Op::KlRewards,
            Op::Aggregate,
        ] {
            let line = format!("OP_{} = {};", op.name().to_uppercase(), op as u8);
            let line = line.replace("OP_LOG_SOFTMAX =", "OP_LOG_SOFTMAX_FORWARD =");
            assert!(kernels.contains(&line), "kernels/*.cu lack `{line}`");
            assert_eq!(Op::from_id(op as u8), Some(op));
        }
    }
}
