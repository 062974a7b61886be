//! Helpers of the candle adapter's tests: the devices to run on and tensors from the tests' RNG.

use candle_core::{DType, Device, Tensor};
use rlhf_kernels::testing::Rng;

/// The CPU, and with `candle-cuda` the first GPU (a visible skip without one).
pub fn devices(test: &str) -> Vec<Device> {
    #[allow(unused_mut)] // only the CUDA build pushes
    let mut out = vec![Device::Cpu];
    #[cfg(feature = "candle-cuda")]
    match Device::new_cuda(0) {
        Ok(d) => out.push(d),
        Err(e) => rlhf_kernels::testing::skip(test, &format!("no CUDA device for candle: {e}")),
    }
    #[cfg(not(feature = "candle-cuda"))]
    let _ = test;
    out
}

pub fn f64s(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

pub fn f32s(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

pub fn normals(rng: &mut Rng, dims: &[usize], scale: f64, dev: &Device) -> Tensor {
    let n = dims.iter().product();
    Tensor::from_vec(rng.normals(n, scale), dims, dev).unwrap()
}

pub fn ids(rng: &mut Rng, dims: &[usize], v: usize, dev: &Device) -> Tensor {
    let n: usize = dims.iter().product();
    let t: Vec<u32> = (0..n).map(|_| rng.below(v) as u32).collect();
    Tensor::from_vec(t, dims, dev).unwrap()
}
