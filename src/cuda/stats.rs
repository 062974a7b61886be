//! One device buffer for every batch statistic: the CPU ops return their statistics, the
//! kernels write the same statistics as f64 words into a [`DeviceStats`], read when the caller
//! chooses (one synchronisation), or handed to the caller's own kernels without a round trip.

use std::marker::PhantomData;
use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, CudaView, DevicePtrMut, SyncOnDrop};

use crate::cuda::driver_error;
use crate::{Result, Statistic};

/// The device buffer of a batch statistic `S` — what the CPU op returns, written by the
/// kernels on the stream and read with [`read`](Self::read) when the caller chooses. Reused
/// across calls; the ops that reduce over sequences (aggregate, moments) keep their per-sequence
/// records here too, grown when a batch has more sequences.
///
/// ```no_run
/// use rlhf_kernels::cuda::{CudaDevice, DeviceStats};
/// use rlhf_kernels::PolicyLossStats;
/// let device = CudaDevice::new(0)?;
/// let stats = DeviceStats::<PolicyLossStats>::new(device.stream())?;
/// // ... cuda::policy_loss(..., outputs.stats(&mut stats), ...) ...
/// let s: PolicyLossStats = stats.read(device.stream())?; // synchronises the stream once
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
#[derive(Debug)]
pub struct DeviceStats<S> {
    words: CudaSlice<f64>,
    records: Option<CudaSlice<u8>>,
    marker: PhantomData<fn() -> S>,
}

impl<S: Statistic> DeviceStats<S> {
    /// Allocates the statistic's words on `stream`'s device.
    pub fn new(stream: &Arc<CudaStream>) -> Result<Self> {
        let words =
            stream.alloc_zeros::<f64>(S::WORDS).map_err(driver_error("allocating device statistics"))?;
        Ok(DeviceStats { words, records: None, marker: PhantomData })
    }

    /// Synchronises `stream` and returns the statistic of the last call that wrote it.
    pub fn read(&self, stream: &Arc<CudaStream>) -> Result<S> {
        let w = stream.clone_dtoh(&self.words).map_err(driver_error("reading device statistics"))?;
        S::from_words(&w)
    }

    /// The words on the device, for callers that feed them to their own kernels (the layout
    /// of the raw layer's `*_from_words` for the same statistic).
    pub fn as_view(&self) -> CudaView<'_, f64> {
        self.words.as_view()
    }

    /// The words' device address and its event guard.
    pub(crate) fn words_ptr<'a>(&'a mut self, s: &'a CudaStream) -> (u64, SyncOnDrop<'a>) {
        self.words.device_ptr_mut(s)
    }

    /// [`words_ptr`](Self::words_ptr) of an optional statistics output (0 when absent).
    pub(crate) fn opt_words_ptr<'a>(
        stats: Option<&'a mut Self>,
        s: &'a CudaStream,
    ) -> (u64, Option<SyncOnDrop<'a>>) {
        match stats {
            Some(st) => {
                let (p, g) = st.words_ptr(s);
                (p, Some(g))
            }
            None => (0, None),
        }
    }

    /// The words' and the per-sequence records' addresses, the records grown to `bytes`
    /// (at least 16).
    pub(crate) fn with_records<'a>(
        &'a mut self,
        stream: &'a Arc<CudaStream>,
        bytes: usize,
    ) -> Result<((u64, SyncOnDrop<'a>), (u64, SyncOnDrop<'a>))> {
        let bytes = bytes.max(16);
        let records = match self.records.take() {
            Some(r) if r.len() >= bytes => r,
            _ => stream.alloc_zeros::<u8>(bytes).map_err(driver_error("allocating statistics records"))?,
        };
        let DeviceStats { words, records: slot, .. } = self;
        let records = slot.insert(records);
        let s: &CudaStream = stream;
        Ok((words.device_ptr_mut(s), records.device_ptr_mut(s)))
    }
}
