//! Backend selection rules. Kept in its own test binary: one test sets an environment
//! variable that the selection reads.

use rlhf_kernels::{Backend, CudaUnavailable};

#[test]
fn selection_rules() {
    let (backend, why) = Backend::best_with_reason();
    assert_eq!(backend.is_cuda(), why.is_none(), "CUDA is chosen exactly when there is no reason against it");
    #[cfg(not(feature = "cuda"))]
    assert_eq!(why, Some(CudaUnavailable::FeatureDisabled));
    if let Some(reason) = &why {
        assert!(!reason.to_string().is_empty());
    }
    assert!(!backend.describe().is_empty());

    // SAFETY (set_var): this is the only test in this binary, so no other thread reads or
    // writes the environment meanwhile.
    unsafe { std::env::set_var("RLHF_KERNELS_BACKEND", "cpu") };
    let (forced, why) = Backend::best_with_reason();
    // SAFETY: as above.
    unsafe { std::env::remove_var("RLHF_KERNELS_BACKEND") };
    assert!(!forced.is_cuda());
    assert_eq!(why, Some(CudaUnavailable::DisabledByEnv));
    assert!(forced.describe().starts_with("cpu ("), "{}", forced.describe());
}
