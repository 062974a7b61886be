//! One device buffer for every batch statistic: the CPU ops return their statistics, the
//! kernels write the same statistics as f64 words into a [`DeviceStats`], read when the caller
//! chooses (one synchronisation), or handed to the caller's own kernels without a round trip.

use std::marker::PhantomData;
use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, CudaView, DevicePtrMut, SyncOnDrop};

use crate::cuda::driver_error;
use crate::cuda::raw::{
    POLICY_STATS_WORDS, SAMPLED_KL_STATS_WORDS, VALUE_STATS_WORDS, policy_stats_from_words,
    sampled_kl_stats_from_words, value_stats_from_words,
};
use crate::{Aggregated, BatchCounts, Moments, PolicyLossStats, Result, SampledKlStats, ValueLossStats};

/// A batch statistic the kernels write as `WORDS` f64 words: [`SampledKlStats`],
/// [`PolicyLossStats`], [`ValueLossStats`], [`Moments`] and [`Aggregated`]. Sealed.
pub trait DeviceStatistic: Sized + sealed::Sealed {
    /// Number of f64 words on the device.
    const WORDS: usize;
    /// What the words hold, for error messages.
    const WHAT: &'static str;
    /// Decodes the words.
    fn from_words(words: &[f64]) -> Result<Self>;
}

mod sealed {
    pub trait Sealed {}
}

macro_rules! statistic {
    ($($ty:ty => $words:expr, $what:literal, $decode:expr;)*) => {$(
        impl sealed::Sealed for $ty {}
        impl DeviceStatistic for $ty {
            const WORDS: usize = $words;
            const WHAT: &'static str = $what;
            fn from_words(words: &[f64]) -> Result<Self> {
                $decode(words)
            }
        }
    )*};
}

statistic! {
    SampledKlStats => SAMPLED_KL_STATS_WORDS, "sampled KL statistics", sampled_kl_stats_from_words;
    PolicyLossStats => POLICY_STATS_WORDS, "policy statistics", policy_stats_from_words;
    ValueLossStats => VALUE_STATS_WORDS, "value statistics", value_stats_from_words;
    Moments => 5, "moments", |w: &[f64]| {
        crate::logprobs::check_len("moments words", w.len(), 5)?;
        Ok(Moments { count: w[0], mean: w[1], var: w[2], min: w[3], max: w[4] })
    };
    Aggregated => 4, "an aggregate", |w: &[f64]| {
        crate::logprobs::check_len("aggregate words", w.len(), 4)?;
        Ok(Aggregated {
            value: w[0],
            counts: BatchCounts { valid_tokens: w[1], valid_sequences: w[2], sequences: w[3] },
        })
    };
}

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

impl<S: DeviceStatistic> DeviceStats<S> {
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
