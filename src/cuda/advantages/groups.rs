//! The group estimators on the GPU: one warp per group over its member list.

use std::sync::Arc;

use cudarc::driver::{
    CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
};

use crate::cuda::module::{Module, function};
use crate::cuda::{CudaStatus, driver_error, opt_ptr_mut, view_ptr};
use crate::logprobs::check_len;
use crate::{Error, GroupAdvantageOptions, GroupEstimator, GroupStd, Groups, Result, RowShape};

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

/// A `[B, T]` per-token output on the device (rows = sequences) and its mask (masked tokens
/// get 0).
#[derive(Debug)]
pub struct DeviceTokenOutput<'a> {
    /// The buffer.
    pub out: CudaViewMut<'a, f32>,
    /// Its shape.
    pub shape: RowShape,
    /// One byte per token (0 = padding), or `None`.
    pub mask: Option<CudaView<'a, u8>>,
}

/// Where [`group_advantages`] writes (at least one): one value per sequence, and/or every
/// valid token of each sequence's row.
#[derive(Debug, Default)]
pub struct DeviceGroupAdvantageOutputs<'a> {
    /// One advantage per sequence.
    pub per_sequence: Option<CudaViewMut<'a, f32>>,
    /// The advantage on every valid token.
    pub per_token: Option<DeviceTokenOutput<'a>>,
}

impl<'a> DeviceGroupAdvantageOutputs<'a> {
    /// Requests one advantage per sequence.
    pub fn per_sequence(self, out: CudaViewMut<'a, f32>) -> Self {
        DeviceGroupAdvantageOutputs { per_sequence: Some(out), ..self }
    }
    /// Requests the advantage on every valid token of `shape`.
    pub fn per_token(
        self,
        out: CudaViewMut<'a, f32>,
        shape: RowShape,
        mask: Option<CudaView<'a, u8>>,
    ) -> Self {
        DeviceGroupAdvantageOutputs { per_token: Some(DeviceTokenOutput { out, shape, mask }), ..self }
    }
}

/// The kernel's estimator code and ε.
fn estimator_code(opts: &GroupAdvantageOptions) -> (i32, f64) {
    match opts.estimator {
        GroupEstimator::Grpo { std: GroupStd::Unbiased, eps } => (0, eps as f64),
        GroupEstimator::Grpo { std: GroupStd::Biased, eps } => (1, eps as f64),
        GroupEstimator::Grpo { std: GroupStd::NoStd, .. } | GroupEstimator::GroupMean => (2, 0.0),
        GroupEstimator::Rloo => (3, 0.0),
    }
}

/// Outcome advantages over groups on the GPU, the twin of
/// [`cpu::group_advantages`](crate::cpu::group_advantages): one launch, one warp per group (f64
/// sums over its members in a fixed order), writing per sequence and/or broadcasting to every
/// valid token. A non-finite score or advantage is reported to `status`; a singleton group
/// refused by the options is an error before the launch.
///
/// ```no_run
/// use rlhf_kernels::cuda::{self, CudaDevice, CudaStatus, DeviceGroupAdvantageOutputs, DeviceGroups};
/// use rlhf_kernels::{GroupAdvantageOptions, Groups};
/// let device = CudaDevice::new(0)?;
/// let s = device.stream();
/// let groups = DeviceGroups::new(s, &Groups::new(&[0, 0, 1, 1], 2)?)?;
/// let scores = s.clone_htod(&[1.0f32, 0.0, 0.5, 0.5]).unwrap();
/// let mut adv = s.alloc_zeros::<f32>(4).unwrap();
/// let mut status = CudaStatus::new(s)?;
/// cuda::group_advantages(s, &scores.as_view(), &groups, &GroupAdvantageOptions::grpo(),
///     DeviceGroupAdvantageOutputs::default().per_sequence(adv.as_view_mut()), &mut status)?;
/// status.check(s)?;
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
pub fn group_advantages(
    stream: &Arc<CudaStream>,
    scores: &CudaView<'_, f32>,
    groups: &DeviceGroups,
    opts: &GroupAdvantageOptions,
    mut out: DeviceGroupAdvantageOutputs<'_>,
    status: &mut CudaStatus,
) -> Result<()> {
    let b = groups.host.sequences();
    check_len("scores", scores.len(), b)?;
    opts.validate()?;
    groups.host.check_singletons(opts)?;
    if let Some(o) = &out.per_sequence {
        check_len("per-sequence advantages", o.len(), b)?;
    }
    let token_shape = match &out.per_token {
        Some(DeviceTokenOutput { out: o, shape, mask }) => {
            shape.check_buffer("per-token advantages", o.len())?;
            check_len("per-token advantage rows", shape.rows, b)?;
            if let Some(m) = mask {
                shape.check_buffer("mask", m.len())?;
            }
            *shape
        }
        None => RowShape::new(b, 1),
    };
    if out.per_sequence.is_none() && out.per_token.is_none() {
        return Err(Error::InvalidOption {
            name: "outputs",
            value: "none".into(),
            expected: "per-sequence and/or per-token advantages",
        });
    }
    let s: &CudaStream = stream;
    let (sc, _g1) = scores.device_ptr(s);
    let (off, _g2) = groups.offsets.device_ptr(s);
    let (mem, _g3) = groups.members.device_ptr(s);
    let (per_seq, _g4) = opt_ptr_mut(&mut out.per_sequence, s);
    let (tokens, mask, _g5, _g6) = match &mut out.per_token {
        Some(DeviceTokenOutput { out: o, mask: m, .. }) => {
            let (t, g) = o.device_ptr_mut(s);
            let (mp, gm) = view_ptr(m.as_ref(), s);
            (t, mp, Some(g), gm)
        }
        None => (0, 0, None, None),
    };
    let (st, _g7) = status.device_ptr(s);
    let count = groups.host.count();
    let (code, eps) = estimator_code(opts);
    let (n_groups, ld, cols) = (count as i32, token_shape.row_stride as i64, token_shape.cols as i32);
    let f = function(stream.context(), Module::Advantages, "group_advantages")?;
    let mut l = stream.launch_builder(&f);
    l.arg(&sc).arg(&off).arg(&mem).arg(&n_groups).arg(&code).arg(&eps);
    l.arg(&per_seq).arg(&tokens).arg(&ld).arg(&cols).arg(&mask).arg(&st);
    let cfg = LaunchConfig {
        grid_dim: (count.div_ceil(8) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: matches `group_advantages(const float*, const unsigned*, const unsigned*, int, int,
    // double, float*, float*, long long, int, const unsigned char*, unsigned long long*)`; one
    // warp per group (warps past the last return); `offsets` has count + 1 entries and
    // `members` a permutation of 0..B (built by `Groups`), `scores` and `per_sequence` B
    // values, the token buffer and its mask cover a checked B-row shape.
    unsafe { l.launch(cfg) }.map_err(driver_error("launching group_advantages"))?;
    Ok(())
}
