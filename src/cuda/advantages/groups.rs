//! The group estimators on the GPU: one warp per group over its member list.

use std::sync::Arc;

use cudarc::driver::{
    CudaSlice, CudaStream, CudaView, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg,
};

use crate::cuda::module::{Module, function};
use crate::cuda::{LaunchContext, driver_error, opt_ptr_mut, view_ptr};
use crate::logprobs::check_len;
use crate::{Cuda, GroupAdvantageOptions, GroupAdvantageOutputs, Groups, Result, RowShape, TokenOutput};

/// [`Groups`] on the device: the member lists (CSR) uploaded once, reusable for every call on
/// batches with the same grouping.
#[derive(Debug)]
pub struct DeviceGroups {
    host: Groups,
    offsets: CudaSlice<u32>,
    members: CudaSlice<u32>,
}

impl DeviceGroups {
    /// Uploads `groups` on `stream`.
    pub fn new(stream: &Arc<CudaStream>, groups: &Groups) -> Result<Self> {
        let (offsets, members) = groups.as_csr();
        let up = |v: &[u32]| stream.clone_htod(v).map_err(driver_error("uploading groups"));
        Ok(DeviceGroups { host: groups.clone(), offsets: up(offsets)?, members: up(members)? })
    }

    /// The grouping on the host.
    pub fn groups(&self) -> &Groups {
        &self.host
    }
}

/// Outcome advantages over groups on the GPU, the twin of
/// [`cpu::group_advantages`](crate::cpu::group_advantages): one launch, one warp per group (f64
/// sums over its members in a fixed order), writing per sequence and/or broadcasting to every valid
/// token. A non-finite score or advantage is reported to `ctx`'s status word; a singleton group
/// refused by the options is an error before the launch.
///
/// ```no_run
/// use rlhf_kernels::cuda::{self, CudaDevice, LaunchContext, DeviceGroups};
/// use rlhf_kernels::{GroupAdvantageOutputs};
/// use rlhf_kernels::{GroupAdvantageOptions, Groups};
/// let device = CudaDevice::new(0)?;
/// let s = device.stream();
/// let groups = DeviceGroups::new(s, &Groups::new(&[0, 0, 1, 1], 2)?)?;
/// let scores = s.clone_htod(&[1.0f32, 0.0, 0.5, 0.5]).unwrap();
/// let mut adv = s.alloc_zeros::<f32>(4).unwrap();
/// let mut ctx = LaunchContext::new(s)?;
/// let out = GroupAdvantageOutputs::default().per_sequence(adv.as_view_mut());
/// cuda::group_advantages(&mut ctx, &scores.as_view(), &groups, out, &GroupAdvantageOptions::grpo())?;
/// ctx.check()?;
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
pub fn group_advantages(
    ctx: &mut LaunchContext,
    scores: &CudaView<'_, f32>,
    groups: &DeviceGroups,
    mut out: GroupAdvantageOutputs<'_, Cuda>,
    opts: &GroupAdvantageOptions,
) -> Result<()> {
    let (stream, status) = ctx.parts();
    let b = groups.host.sequences();
    check_len("scores", scores.len(), b)?;
    opts.validate()?;
    groups.host.check_singletons(opts)?;
    let token_shape = out.check(b)?;
    let s: &CudaStream = stream;
    let (sc, _g1) = scores.device_ptr(s);
    let (per_seq, _g4) = opt_ptr_mut(&mut out.per_sequence, s);
    let (tokens, mask, _g5, _g6) = match &mut out.per_token {
        Some(TokenOutput { out: o, mask: m, .. }) => {
            let (t, g) = o.device_ptr_mut(s);
            let (mp, gm) = view_ptr(m.as_ref(), s);
            (t, mp, Some(g), gm)
        }
        None => (0, 0, None, None),
    };
    let (st, _g7) = status.device_ptr(s);
    let ptrs = GroupPtrs { scores: sc, per_sequence: per_seq, per_token: tokens, mask, status: st };
    // SAFETY: every address comes from a checked view of this stream's context (or is 0), the
    // token buffer and mask cover `token_shape`, and the guards keep them alive past the launch.
    unsafe { launch_groups(stream, groups, opts, &ptrs, token_shape) }
}

/// Device addresses of one group-advantage launch (0 for an absent output or mask).
pub(super) struct GroupPtrs {
    pub(super) scores: u64,
    pub(super) per_sequence: u64,
    pub(super) per_token: u64,
    pub(super) mask: u64,
    pub(super) status: u64,
}

/// The kernels' `GroupParams` (kernels/advantages.cu), field for field.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct GroupParams {
    scores: u64,
    offsets: u64,
    members: u64,
    per_sequence: u64,
    tokens: u64,
    mask: u64,
    ld: i64,
    groups: i32,
    estimator: i32,
    cols: i32,
    eps: f64,
}

// The kernels pin the same size and offsets (`static_assert` in kernels/).
pin_layout!(GroupParams, 80, {
    scores: 0, offsets: 8, members: 16, per_sequence: 24, tokens: 32, mask: 40, ld: 48,
    groups: 56, estimator: 60, cols: 64, eps: 72,
});

// SAFETY: repr(C) with the layout of the kernels' `struct GroupParams` (asserted above and in
// the kernel), passed by value; plain old data.
unsafe impl DeviceRepr for GroupParams {}

/// The group kernel's launch (the safe and raw entry points share it).
///
/// # Safety
/// `scores` and a non-zero `per_sequence` hold B f32, a non-zero `per_token` (and `mask`)
/// cover `token_shape` (B rows), `status` one u64, all in `stream`'s context and alive until
/// the kernel ran.
pub(super) unsafe fn launch_groups(
    stream: &Arc<CudaStream>,
    groups: &DeviceGroups,
    opts: &GroupAdvantageOptions,
    p: &GroupPtrs,
    token_shape: RowShape,
) -> Result<()> {
    let s: &CudaStream = stream;
    let (off, _g2) = groups.offsets.device_ptr(s);
    let (mem, _g3) = groups.members.device_ptr(s);
    let count = groups.host.count();
    let (code, eps) = opts.estimator.code();
    let params = GroupParams {
        scores: p.scores,
        offsets: off,
        members: mem,
        per_sequence: p.per_sequence,
        tokens: p.per_token,
        mask: p.mask,
        ld: token_shape.row_stride as i64,
        groups: count as i32,
        estimator: code,
        cols: token_shape.cols as i32,
        eps,
    };
    let f = function(stream.context(), Module::Advantages, "group_advantages")?;
    let mut l = stream.launch_builder(&f);
    l.arg(&params).arg(&p.status);
    let cfg = LaunchConfig {
        grid_dim: (count.div_ceil(8) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // Kernel: group_advantages(GroupParams, unsigned long long*); a warp a group.
    // SAFETY: the arguments match that signature (the struct's layout is asserted on both sides); `offsets` has count + 1 entries, `members` is a
    // permutation of 0..B (built by `Groups`); scores, outputs and mask cover B rows (caller).
    unsafe { l.launch(cfg) }.map_err(driver_error("launching group_advantages"))?;
    Ok(())
}

/// Buffers of a raw [`group_advantages`](crate::cuda::raw::group_advantages) call: device
/// addresses, 0 for an absent output.
#[derive(Debug, Clone, Copy)]
pub struct GroupAdvantageArgs {
    /// B f32 scores, one per sequence.
    pub scores: u64,
    /// B f32 out, one advantage per sequence, or 0.
    pub per_sequence: u64,
    /// f32 out laid out as `token_shape` (B rows): the advantage on every valid token, or 0.
    pub per_token: u64,
    /// The per-token output's shape.
    pub token_shape: RowShape,
    /// Mask bytes laid out as `token_shape` (0 = padding, gets 0), or 0.
    pub mask: u64,
    /// One u64 status word, initialised to [`STATUS_CLEAR`](crate::cuda::raw::STATUS_CLEAR).
    pub status: u64,
}
