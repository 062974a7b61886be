//! Where a buffer lives. Every op's input and output structs ([`Tokens`](crate::Tokens),
//! [`TokenOutputs`](crate::TokenOutputs), …) take a memory parameter `M` — [`Host`] (the
//! default: `&[T]` and `&mut [T]`) or `Cuda` (feature `cuda`: cudarc's `CudaView` and
//! `CudaViewMut`) — so one set of types serves the reference, CPU and CUDA backends.
//!
//! The constructors take anything that reads as a buffer of one memory ([`IntoView`],
//! [`IntoViewMut`]): `&[T]`, `&[T; N]`, `&Vec<T>` on the host; `CudaView`, `&CudaSlice<T>` on
//! the device. The memory follows from the argument, so the same call builds either:
//!
//! ```
//! use rlhf_kernels::{Host, Tokens};
//! let targets = vec![5i64, 17];
//! let tokens: Tokens<'_, i64, Host> = Tokens::new(&targets).with_mask(&[1u8, 0]);
//! assert_eq!(tokens.targets.len(), 2);
//! ```

/// A buffer of some memory, read through its length (the ops check every length before they
/// touch the data).
pub trait Buffer {
    /// Number of elements.
    fn len(&self) -> usize;
    /// True when the buffer holds no element.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A kind of memory: the view types an op's structs hold for it. Implemented by [`Host`] and
/// (feature `cuda`) `Cuda`; sealed.
pub trait Memory: sealed::Sealed + Sized + 'static {
    /// A read-only buffer of `T` in this memory.
    type View<'a, T: 'a>: Buffer + IntoView<'a, T, Memory = Self>;
    /// A writable buffer of `T` in this memory.
    type ViewMut<'a, T: 'a>: Buffer + IntoViewMut<'a, T, Memory = Self>;
    /// Where an op writes a batch statistic `S` of this memory: `&mut S` on the host (the
    /// host ops also return it), `&mut cuda::DeviceStats<S>` on the device (written on the
    /// stream, read when the caller chooses).
    type Stats<'a, S: 'a>;
}

/// Host memory: views are `&[T]`, writable views `&mut [T]`. The default memory of every
/// struct, so host code never names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Host {}

impl Memory for Host {
    type View<'a, T: 'a> = &'a [T];
    type ViewMut<'a, T: 'a> = &'a mut [T];
    type Stats<'a, S: 'a> = &'a mut S;
}

/// CUDA device memory: views are cudarc's `CudaView`, writable views `CudaViewMut`.
#[cfg(feature = "cuda")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cuda {}

#[cfg(feature = "cuda")]
impl Memory for Cuda {
    type View<'a, T: 'a> = cudarc::driver::CudaView<'a, T>;
    type ViewMut<'a, T: 'a> = cudarc::driver::CudaViewMut<'a, T>;
    type Stats<'a, S: 'a> = &'a mut crate::cuda::DeviceStats<S>;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for super::Host {}
    #[cfg(feature = "cuda")]
    impl Sealed for super::Cuda {}
}

/// Something that reads as a view of `T` in one memory (`&[T]`, `&Vec<T>`, `&[T; N]`,
/// `CudaView<T>`, `&CudaSlice<T>`).
pub trait IntoView<'a, T> {
    /// The memory the buffer lives in.
    type Memory: Memory;
    /// The view.
    fn into_view(self) -> <Self::Memory as Memory>::View<'a, T>;
}

/// Something that reads as a writable view of `T` in one memory (`&mut [T]`, `&mut Vec<T>`,
/// `&mut [T; N]`, `CudaViewMut<T>`, `&mut CudaSlice<T>`).
pub trait IntoViewMut<'a, T> {
    /// The memory the buffer lives in.
    type Memory: Memory;
    /// The writable view.
    fn into_view_mut(self) -> <Self::Memory as Memory>::ViewMut<'a, T>;
}

impl<T> Buffer for &[T] {
    fn len(&self) -> usize {
        <[T]>::len(self)
    }
}

impl<T> Buffer for &mut [T] {
    fn len(&self) -> usize {
        <[T]>::len(self)
    }
}

/// The host views: a slice, an array or a vector, borrowed.
macro_rules! host_views {
    ($($ty:ty $(, const $n:ident)?);*) => {$(
        impl<'a, T $(, const $n: usize)?> IntoView<'a, T> for &'a $ty {
            type Memory = Host;
            fn into_view(self) -> &'a [T] {
                self
            }
        }
        impl<'a, T $(, const $n: usize)?> IntoViewMut<'a, T> for &'a mut $ty {
            type Memory = Host;
            fn into_view_mut(self) -> &'a mut [T] {
                self
            }
        }
    )*};
}
host_views!([T]; Vec<T>; [T; N], const N);

#[cfg(feature = "cuda")]
mod device {
    use cudarc::driver::{CudaSlice, CudaView, CudaViewMut};

    use super::{Buffer, Cuda, IntoView, IntoViewMut};

    impl<T> Buffer for CudaView<'_, T> {
        fn len(&self) -> usize {
            CudaView::len(self)
        }
    }

    impl<T> Buffer for CudaViewMut<'_, T> {
        fn len(&self) -> usize {
            CudaViewMut::len(self)
        }
    }

    impl<'a, T> IntoView<'a, T> for CudaView<'a, T> {
        type Memory = Cuda;
        fn into_view(self) -> CudaView<'a, T> {
            self
        }
    }

    impl<'a, T> IntoView<'a, T> for &'a CudaSlice<T> {
        type Memory = Cuda;
        fn into_view(self) -> CudaView<'a, T> {
            self.as_view()
        }
    }

    impl<'a, T> IntoViewMut<'a, T> for CudaViewMut<'a, T> {
        type Memory = Cuda;
        fn into_view_mut(self) -> CudaViewMut<'a, T> {
            self
        }
    }

    impl<'a, T> IntoViewMut<'a, T> for &'a mut CudaSlice<T> {
        type Memory = Cuda;
        fn into_view_mut(self) -> CudaViewMut<'a, T> {
            self.as_view_mut()
        }
    }
}
