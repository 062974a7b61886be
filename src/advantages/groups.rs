//! Outcome estimators over groups of responses (module docs of [`crate::advantages`]).

use crate::memory::{Buffer, Host, IntoViewMut, Memory};
use crate::{Error, Result, RowShape};

/// The standard deviation GRPO divides by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupStd {
    /// With the `G/(G − 1)` correction (`torch.std`, verl).
    Unbiased,
    /// Without it.
    Biased,
    /// No division at all (Dr. GRPO): `A = s − mean`.
    NoStd,
}

/// An outcome-reward estimator over groups (module docs for the formulas).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum GroupEstimator {
    /// `(s − mean)/(std + ε)`, or `s − mean` with [`GroupStd::NoStd`].
    Grpo {
        /// Which standard deviation.
        std: GroupStd,
        /// ε added to the standard deviation (verl 1e-6).
        eps: f32,
    },
    /// Leave-one-out baseline: `s_i − mean of the others`.
    Rloo,
    /// `s − mean` (the first step of REINFORCE++-baseline).
    GroupMean,
}

impl GroupEstimator {
    /// The kernel's estimator code and ε (`group_affine` in kernels/advantages.cu).
    #[cfg(feature = "cuda")]
    pub(crate) fn code(self) -> (i32, f64) {
        match self {
            GroupEstimator::Grpo { std: GroupStd::Unbiased, eps } => (0, eps as f64),
            GroupEstimator::Grpo { std: GroupStd::Biased, eps } => (1, eps as f64),
            GroupEstimator::Grpo { std: GroupStd::NoStd, .. } | GroupEstimator::GroupMean => (2, 0.0),
            GroupEstimator::Rloo => (3, 0.0),
        }
    }
}

/// What a group with a single response gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SingletonGroups {
    /// Mean 0 and std 1 (verl), and an RLOO advantage of 0.
    #[default]
    Neutral,
    /// [`Error::InvalidOption`] naming the group.
    Error,
}

/// Options of `group_advantages`.
///
/// ```
/// use rlhf_kernels::{GroupAdvantageOptions, GroupStd, SingletonGroups};
/// let verl = GroupAdvantageOptions::grpo();
/// let biased = GroupAdvantageOptions::grpo().std(GroupStd::Biased).eps(1e-4);
/// let dr_grpo = GroupAdvantageOptions::grpo().std(GroupStd::NoStd);
/// let strict_rloo = GroupAdvantageOptions::rloo().singletons(SingletonGroups::Error);
/// # let _ = (verl, biased, dr_grpo, strict_rloo);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct GroupAdvantageOptions {
    /// The estimator.
    pub estimator: GroupEstimator,
    /// What a group of one gets.
    pub singletons: SingletonGroups,
}

impl GroupAdvantageOptions {
    /// `estimator`, singletons neutral.
    pub fn new(estimator: GroupEstimator) -> Self {
        GroupAdvantageOptions { estimator, singletons: SingletonGroups::Neutral }
    }
    /// Sets the estimator.
    pub fn estimator(self, estimator: GroupEstimator) -> Self {
        GroupAdvantageOptions { estimator, ..self }
    }
    /// GRPO as verl: unbiased std, ε = 1e-6, singletons neutral.
    pub fn grpo() -> Self {
        GroupAdvantageOptions {
            estimator: GroupEstimator::Grpo { std: GroupStd::Unbiased, eps: 1e-6 },
            singletons: SingletonGroups::Neutral,
        }
    }
    /// RLOO.
    pub fn rloo() -> Self {
        GroupAdvantageOptions { estimator: GroupEstimator::Rloo, singletons: SingletonGroups::Neutral }
    }
    /// The group-mean baseline of REINFORCE++-baseline.
    pub fn group_mean() -> Self {
        GroupAdvantageOptions { estimator: GroupEstimator::GroupMean, singletons: SingletonGroups::Neutral }
    }
    /// Sets GRPO's standard deviation (no effect on the other estimators).
    pub fn std(mut self, s: GroupStd) -> Self {
        if let GroupEstimator::Grpo { std, .. } = &mut self.estimator {
            *std = s;
        }
        self
    }
    /// Sets GRPO's ε (no effect on the other estimators).
    pub fn eps(mut self, e: f32) -> Self {
        if let GroupEstimator::Grpo { eps, .. } = &mut self.estimator {
            *eps = e;
        }
        self
    }
    /// Sets the singleton rule.
    pub fn singletons(self, singletons: SingletonGroups) -> Self {
        GroupAdvantageOptions { singletons, ..self }
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if let GroupEstimator::Grpo { eps, .. } = self.estimator
            && !(eps.is_finite() && eps >= 0.0)
        {
            return Err(Error::InvalidOption {
                name: "eps",
                value: eps.to_string(),
                expected: "a finite ε ≥ 0",
            });
        }
        Ok(())
    }

    /// `(center, scale)` of a group of `n` members with mean `mean` and sum of squared
    /// deviations `m2`: every member's advantage is `(s − center)·scale` (RLOO:
    /// `s − (sum − s)/(n − 1) = (s − mean)·n/(n − 1)`). The GPU kernel uses the same form.
    pub(crate) fn group_affine(&self, n: usize, mean: f64, m2: f64) -> (f64, f64) {
        let single = n == 1;
        let nd = n as f64;
        let center = if single { 0.0 } else { mean };
        let scale = match self.estimator {
            GroupEstimator::Grpo { std: GroupStd::NoStd, .. } | GroupEstimator::GroupMean => 1.0,
            GroupEstimator::Grpo { std, eps } => {
                let sd = if single {
                    1.0
                } else {
                    (m2 / if std == GroupStd::Unbiased { nd - 1.0 } else { nd }).sqrt()
                };
                // A group without spread at ε = 0: every deviation is 0, and so is A.
                if sd + eps as f64 > 0.0 { 1.0 / (sd + eps as f64) } else { 0.0 }
            }
            GroupEstimator::Rloo => {
                if single {
                    0.0
                } else {
                    nd / (nd - 1.0)
                }
            }
        };
        (center, scale)
    }
}

/// The group of every sequence, as dense ids in `[0, count)`, sorted once into member lists
/// (counting sort, members in sequence order: every reduction over a group runs in that fixed
/// order). Groups need not be contiguous nor of equal size; an id may be unused.
///
/// ```
/// use rlhf_kernels::Groups;
/// let groups = Groups::new(&[1, 0, 1, 1, 0], 2)?;
/// assert_eq!(groups.members(1), &[0, 2, 3]);
/// assert!(Groups::new(&[0, 2], 2).is_err()); // id 2 is not below the count
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Groups {
    /// `offsets[g]..offsets[g + 1]` indexes `members` for group `g`.
    pub(crate) offsets: Vec<u32>,
    /// Sequence indices, grouped, ascending within a group.
    pub(crate) members: Vec<u32>,
    /// The group of each sequence.
    pub(crate) ids: Vec<u32>,
}

impl Groups {
    /// Groups sequences by `ids` (one per sequence, each below `count`).
    ///
    /// Errors: an empty batch, `count = 0`, an id `≥ count`, more than `u32::MAX` sequences.
    pub fn new(ids: &[u32], count: usize) -> Result<Self> {
        if ids.is_empty() || count == 0 {
            return Err(Error::EmptyInput { what: "groups", rows: ids.len(), cols: count });
        }
        if ids.len() > crate::MAX_DIM || count > crate::MAX_DIM {
            return Err(Error::TooLarge {
                what: "sequences or groups",
                value: ids.len().max(count),
                max: crate::MAX_DIM,
            });
        }
        let mut offsets = vec![0u32; count + 1];
        for (i, &g) in ids.iter().enumerate() {
            if g as usize >= count {
                return Err(Error::InvalidOption {
                    name: "group id",
                    value: format!("{g} (sequence {i})"),
                    expected: "an id below the group count",
                });
            }
            offsets[g as usize + 1] += 1;
        }
        for g in 0..count {
            offsets[g + 1] += offsets[g];
        }
        let mut cursor = offsets.clone();
        let mut members = vec![0u32; ids.len()];
        for (i, &g) in ids.iter().enumerate() {
            members[cursor[g as usize] as usize] = i as u32;
            cursor[g as usize] += 1;
        }
        Ok(Groups { offsets, members, ids: ids.to_vec() })
    }

    /// Number of sequences.
    pub fn sequences(&self) -> usize {
        self.members.len()
    }

    /// Number of group ids (`count`).
    pub fn count(&self) -> usize {
        self.offsets.len() - 1
    }

    /// The sequences of group `g`, ascending.
    pub fn members(&self, g: usize) -> &[u32] {
        &self.members[self.offsets[g] as usize..self.offsets[g + 1] as usize]
    }

    /// The member lists as `(offsets, members)` (CSR), for device upload.
    pub fn as_csr(&self) -> (&[u32], &[u32]) {
        (&self.offsets, &self.members)
    }

    /// The first singleton group, if `opts` refuses them.
    pub(crate) fn check_singletons(&self, opts: &GroupAdvantageOptions) -> Result<()> {
        if opts.singletons == SingletonGroups::Error
            && let Some(g) = (0..self.count()).find(|&g| self.members(g).len() == 1)
        {
            return Err(Error::InvalidOption {
                name: "groups",
                value: format!("group {g} has a single response (sequence {})", self.members(g)[0]),
                expected: "at least two responses per group (SingletonGroups::Error)",
            });
        }
        Ok(())
    }
}

/// A `[B, T]` per-token output (rows = sequences) and its mask (masked tokens get 0). `M` is
/// where the buffers live ([`Host`] by default, `Cuda` for device views).
#[derive(Debug)]
pub struct TokenOutput<'a, M: Memory = Host> {
    /// The buffer.
    pub out: M::ViewMut<'a, f32>,
    /// Its shape.
    pub shape: RowShape,
    /// One byte per token (0 = padding), or `None`.
    pub mask: Option<M::View<'a, u8>>,
}

/// Where the group estimators write: one value per sequence and/or every valid token of each
/// sequence's response (at least one). `M` as for [`TokenOutput`].
///
/// ```
/// use rlhf_kernels::{GroupAdvantageOutputs, RowShape};
/// let (mut per_seq, mut per_token) = ([0.0f32; 2], [0.0f32; 6]);
/// let out = GroupAdvantageOutputs::default()
///     .per_sequence(&mut per_seq)
///     .per_token(&mut per_token, RowShape::new(2, 3), Some(&[1u8, 1, 0, 1, 0, 0][..]));
/// assert!(out.per_token.is_some());
/// ```
pub struct GroupAdvantageOutputs<'a, M: Memory = Host> {
    /// One advantage per sequence.
    pub per_sequence: Option<M::ViewMut<'a, f32>>,
    /// The advantage broadcast to the tokens.
    pub per_token: Option<TokenOutput<'a, M>>,
}

// By hand: a derive would not see through the token output's views.
impl<'a, M: Memory> std::fmt::Debug for GroupAdvantageOutputs<'a, M>
where
    TokenOutput<'a, M>: std::fmt::Debug,
    M::ViewMut<'a, f32>: std::fmt::Debug,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupAdvantageOutputs")
            .field("per_sequence", &self.per_sequence)
            .field("per_token", &self.per_token)
            .finish()
    }
}

impl<M: Memory> Default for GroupAdvantageOutputs<'_, M> {
    fn default() -> Self {
        GroupAdvantageOutputs { per_sequence: None, per_token: None }
    }
}

impl<'a, M: Memory> GroupAdvantageOutputs<'a, M> {
    /// Requests one advantage per sequence.
    pub fn per_sequence(self, out: impl IntoViewMut<'a, f32, Memory = M>) -> Self {
        GroupAdvantageOutputs { per_sequence: Some(out.into_view_mut()), ..self }
    }
    /// Requests the advantage on every valid token of `shape` (mask: one byte per token).
    pub fn per_token(
        self,
        out: impl IntoViewMut<'a, f32, Memory = M>,
        shape: RowShape,
        mask: Option<M::View<'a, u8>>,
    ) -> Self {
        GroupAdvantageOutputs {
            per_token: Some(TokenOutput { out: out.into_view_mut(), shape, mask }),
            ..self
        }
    }

    /// At least one output, sized for `sequences`; returns the token shape (`[B, 1]` without
    /// a per-token output).
    pub(crate) fn check(&self, sequences: usize) -> Result<RowShape> {
        if let Some(o) = &self.per_sequence {
            crate::logprobs::check_len("per-sequence advantages", o.len(), sequences)?;
        }
        let token_shape = match &self.per_token {
            Some(TokenOutput { out, shape, mask }) => {
                shape.check_buffer("per-token advantages", out.len())?;
                crate::logprobs::check_len("per-token advantage rows", shape.rows, sequences)?;
                if let Some(m) = mask {
                    shape.check_buffer("mask", m.len())?;
                }
                *shape
            }
            None => RowShape::new(sequences, 1),
        };
        if self.per_sequence.is_none() && self.per_token.is_none() {
            return Err(Error::InvalidOption {
                name: "outputs",
                value: "none".into(),
                expected: "per-sequence and/or per-token advantages",
            });
        }
        Ok(token_shape)
    }
}
