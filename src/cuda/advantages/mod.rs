//! The advantages family on the GPU (kernels/advantages.cu): GAE as a parallel scan, the group
//! estimators, masked moments and whitening, DAPO's overlong shaping of the scores. Nothing synchronises the host; input problems go
//! to the caller's [`LaunchContext`].
//!
//! GAE picks its launch by the sequence length alone (so a row's result never depends on the
//! batch): up to 128 positions one warp per sequence; up to 4096 one block per sequence, which
//! scans its 1024-position chunks right to left, each entering with the state the one on its
//! right left (one pass over the inputs); longer sequences one block per chunk, after a first
//! pass that writes each chunk's composed map and a second (one thread per sequence, right to
//! left) the state entering each chunk, so every block starts from the exact state on its
//! right (B = 1 with T = 128k runs on 128 blocks).
mod gae;
mod groups;
mod moments;
mod overlong;
pub mod raw;

pub use gae::{gae, gae_workspace_bytes};
pub use groups::{DeviceGroups, group_advantages};
pub use moments::{masked_moments, moments_workspace_bytes, whiten};
pub use overlong::overlong_shaping;
