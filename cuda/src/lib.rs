//! libtorch's CUDA graphs and profiler for Rust, and the model's fused kernels. [`profiler`]
//! records what each operator and kernel of a span of work took (`csrc/profiler.cpp`);
//! [`kernels`] holds the fused element-wise kernels (`csrc/kernels.cpp`). The rest is CUDA graphs
//! (`csrc/cuda_graph.cpp`): the kernels a piece of libtorch work launches,
//! captured once and replayed with a single launch, so that a step whose arithmetic takes
//! microseconds is not paid for in milliseconds of host work and launches.
//!
//! A replay reruns the captured kernels on the very same memory: the work must read its
//! inputs from, and leave its outputs in, tensors that outlive the graph (the caller copies
//! new inputs in before each replay), must have shapes that do not change, and must not read
//! a value back to the host while it is captured.

use std::ffi::{c_char, c_void, CStr};
use std::ptr::NonNull;

pub mod kernels;
pub mod profiler;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Not a device or build that has CUDA graphs.
    #[error("{0}")]
    Unavailable(String),
    /// libtorch refused to capture or replay.
    #[error("{0}")]
    Cuda(String),
}

pub type Result<T> = std::result::Result<T, Error>;

extern "C" {
    fn lillm_cuda_side_stream_enter(device: i32, err: *mut *mut c_char) -> *mut c_void;
    fn lillm_cuda_side_stream_leave(handle: *mut c_void, err: *mut *mut c_char) -> i32;
    fn lillm_cuda_graph_capture_begin(
        pool_hi: u64,
        pool_lo: u64,
        err: *mut *mut c_char,
    ) -> *mut c_void;
    fn lillm_cuda_graph_capture_end(graph: *mut c_void, err: *mut *mut c_char) -> i32;
    fn lillm_cuda_graph_replay(graph: *mut c_void, err: *mut *mut c_char) -> i32;
    fn lillm_cuda_graph_pool(graph: *mut c_void, pool_hi: *mut u64, pool_lo: *mut u64);
    fn lillm_cuda_graph_free(graph: *mut c_void);
    fn lillm_cuda_reserved(device: i32) -> i64;
    fn lillm_cuda_free_error(err: *mut c_char);
}

pub(crate) fn take_error(context: &str, err: *mut c_char) -> Error {
    match take_string(err) {
        Some(msg) => Error::Cuda(format!("{context}: {msg}")),
        None => Error::Cuda(format!("{context}: unknown error")),
    }
}

/// A string the shim allocated (an error, a result), read and freed; `None` for null.
pub(crate) fn take_string(raw: *mut c_char) -> Option<String> {
    if raw.is_null() {
        return None;
    }
    // SAFETY: `raw` is non-null and the shim set it to a NUL-terminated string from strdup,
    // which nobody else owns.
    let text = unsafe { CStr::from_ptr(raw) }
        .to_string_lossy()
        .into_owned();
    // SAFETY: `raw` came from the shim's strdup and is freed exactly once, here, after the
    // last read above.
    unsafe { lillm_cuda_free_error(raw) };
    Some(text)
}

/// The memory pool of a captured graph. Graphs captured into one pool reuse each other's
/// intermediate buffers, which is sound only for graphs that never run at the same time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GraphPool(u64, u64);

/// A captured CUDA graph. Not `Send`: it stays on the thread that captured it.
#[derive(Debug)]
pub struct CudaGraph {
    raw: NonNull<c_void>,
    _one_thread: std::marker::PhantomData<*mut ()>,
}

impl CudaGraph {
    /// Runs `step` `warmups` times, then captures one more call of it (which does not run
    /// its kernels), all on a side stream of `device`; returns the graph and what the
    /// captured call returned, whose tensors each replay refills. With `pool`, the graph
    /// shares that pool's memory.
    ///
    /// # Errors
    /// On a device other than CUDA, a build without CUDA, or when libtorch cannot capture
    /// the work (it read a value back to the host, for one).
    pub fn capture<T>(
        device: tch::Device,
        pool: Option<GraphPool>,
        warmups: usize,
        mut step: impl FnMut() -> T,
    ) -> Result<(Self, T)> {
        let tch::Device::Cuda(index) = device else {
            return Err(Error::Unavailable(format!(
                "CUDA graphs need a CUDA device, not {device:?}"
            )));
        };
        // libtorch's errors surface as tch panics: a step that fails (or that a capture
        // refuses) becomes this function's error, and the stream and capture are undone.
        let mut run = || {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(&mut step)).map_err(|panic| {
                Error::Cuda(format!("CUDA graph capture: {}", panic_message(&panic)))
            })
        };
        let side = SideStream::enter(index)?;
        for _ in 0..warmups {
            let _ = run()?;
        }
        let GraphPool(hi, lo) = pool.unwrap_or(GraphPool(0, 0));
        let mut err = std::ptr::null_mut();
        // SAFETY: plain values in; the shim returns a new graph it owns or null with `err`.
        let raw = unsafe { lillm_cuda_graph_capture_begin(hi, lo, &mut err) };
        let raw = NonNull::new(raw).ok_or_else(|| take_error("CUDA graph capture", err))?;
        let graph = Self {
            raw,
            _one_thread: std::marker::PhantomData,
        };
        let out = run();
        // SAFETY: `graph.raw` is a live graph whose capture began above, on this thread.
        let rc = unsafe { lillm_cuda_graph_capture_end(graph.raw.as_ptr(), &mut err) };
        let out = out?;
        if rc != 0 {
            return Err(take_error("CUDA graph capture", err));
        }
        side.leave()?;
        Ok((graph, out))
    }

    /// Launches the captured kernels on the current stream.
    pub fn replay(&self) -> Result<()> {
        let mut err = std::ptr::null_mut();
        // SAFETY: `self.raw` is a live, captured graph; the shim catches libtorch's errors.
        let rc = unsafe { lillm_cuda_graph_replay(self.raw.as_ptr(), &mut err) };
        if rc != 0 {
            return Err(take_error("CUDA graph replay", err));
        }
        Ok(())
    }

    /// This graph's memory pool, for the next capture to share.
    pub fn pool(&self) -> GraphPool {
        let (mut hi, mut lo) = (0, 0);
        // SAFETY: `self.raw` is a live graph; the shim writes two integers.
        unsafe { lillm_cuda_graph_pool(self.raw.as_ptr(), &mut hi, &mut lo) };
        GraphPool(hi, lo)
    }
}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        // SAFETY: `self.raw` came from capture_begin and is freed exactly once, here.
        unsafe { lillm_cuda_graph_free(self.raw.as_ptr()) };
    }
}

/// A side stream made current for this thread; the previous stream comes back on
/// [`SideStream::leave`], or on drop when a capture failed.
struct SideStream(Option<NonNull<c_void>>);

impl SideStream {
    fn enter(device: usize) -> Result<Self> {
        let mut err = std::ptr::null_mut();
        // SAFETY: a plain value in; the shim returns a handle it owns or null with `err`.
        let raw = unsafe { lillm_cuda_side_stream_enter(device as i32, &mut err) };
        NonNull::new(raw)
            .map(|raw| Self(Some(raw)))
            .ok_or_else(|| take_error("CUDA side stream", err))
    }

    fn leave(mut self) -> Result<()> {
        let Some(raw) = self.0.take() else {
            return Ok(());
        };
        let mut err = std::ptr::null_mut();
        // SAFETY: `raw` came from enter and is handed back exactly once (taken above).
        let rc = unsafe { lillm_cuda_side_stream_leave(raw.as_ptr(), &mut err) };
        if rc != 0 {
            return Err(take_error("CUDA side stream", err));
        }
        Ok(())
    }
}

impl Drop for SideStream {
    fn drop(&mut self) {
        if self.0.is_some() {
            let _ = Self(self.0.take()).leave();
        }
    }
}

/// What a caught panic said.
pub fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "the step panicked".into())
}

/// Bytes libtorch's CUDA allocator holds on `device` now, graph pools included; `None` on a
/// CPU device or a build without CUDA.
pub fn cuda_reserved(device: tch::Device) -> Option<u64> {
    let tch::Device::Cuda(index) = device else {
        return None;
    };
    // SAFETY: a plain value in and out; the shim catches libtorch's exceptions.
    u64::try_from(unsafe { lillm_cuda_reserved(index as i32) }).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capturing_on_a_cpu_is_refused_with_the_device_named() {
        let mut ran = 0;
        let err = CudaGraph::capture(tch::Device::Cpu, None, 2, || ran += 1).unwrap_err();
        assert!(err.to_string().contains("CUDA device, not Cpu"), "{err}");
        assert_eq!(ran, 0, "nothing runs when there is nothing to capture on");
        assert_eq!(cuda_reserved(tch::Device::Cpu), None);
    }

    #[test]
    fn a_caught_panic_says_what_libtorch_said() {
        // tch panics with a formatted String; a literal panic carries a &str.
        let formatted = std::panic::catch_unwind(|| panic!("{}", "operation not permitted"));
        assert_eq!(
            panic_message(&formatted.unwrap_err()),
            "operation not permitted"
        );
        let literal = std::panic::catch_unwind(|| std::panic::panic_any("capture invalidated"));
        assert_eq!(panic_message(&literal.unwrap_err()), "capture invalidated");
    }

    #[test]
    fn on_a_machine_without_a_gpu_the_shim_fails_cleanly() {
        if tch::Cuda::is_available() {
            return;
        }
        // The CUDA device does not exist here: the shim reports libtorch's error, no crash.
        let err = CudaGraph::capture(tch::Device::Cuda(0), None, 0, || ()).unwrap_err();
        assert!(err.to_string().contains("CUDA"), "{err}");
    }
}
