//! Data-parallel collectives through libtorch's c10d (`csrc/c10d_shim.cpp`): a TCPStore
//! rendezvous, a Gloo process group, gradient averaging in a few flat buckets and the
//! parameter broadcast that starts every rank from the same weights. A group can be
//! aborted from another thread ([`AbortHandle`]): a collective waiting on a peer that went
//! silent (stopped, partitioned) fails at once instead of after the collective timeout.

use std::ffi::{c_char, c_void, CStr, CString};
use std::sync::Arc;

use tch::{Kind, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A collective or the rendezvous failed (or was aborted).
    #[error("collective: {0}")]
    Collective(String),
    /// An argument the shim cannot take.
    #[error("invalid c10d argument: {0}")]
    Config(String),
    /// A fused libtorch kernel refused its arguments.
    #[error("libtorch kernel: {0}")]
    Kernel(String),
}

pub type Result<T> = std::result::Result<T, Error>;

extern "C" {
    fn lillm_c10d_gloo_new(
        store_host: *const c_char,
        store_port: u16,
        bind_host: *const c_char,
        rank: i32,
        world: i32,
        prefix: *const c_char,
        timeout_ms: i64,
        err: *mut *mut c_char,
    ) -> *mut c_void;
    fn lillm_c10d_nccl_new(
        store_host: *const c_char,
        store_port: u16,
        bind_host: *const c_char,
        rank: i32,
        world: i32,
        prefix: *const c_char,
        timeout_ms: i64,
        err: *mut *mut c_char,
    ) -> *mut c_void;
    fn lillm_c10d_allreduce_sum(
        group: *mut c_void,
        tensor: *mut c_void,
        err: *mut *mut c_char,
    ) -> i32;
    fn lillm_c10d_broadcast(
        group: *mut c_void,
        tensor: *mut c_void,
        root: i32,
        err: *mut *mut c_char,
    ) -> i32;
    fn lillm_c10d_serve_store(timeout_ms: i64, err: *mut *mut c_char) -> u16;
    fn lillm_c10d_abort(group: *mut c_void);
    fn lillm_c10d_free(group: *mut c_void);
    fn lillm_c10d_free_error(err: *mut c_char);
    fn lillm_cuda_peak_allocated(device: i32, reset: bool) -> i64;
    fn lillm_fused_adamw(
        params: *mut *mut c_void,
        grads: *mut *mut c_void,
        exp_avgs: *mut *mut c_void,
        exp_avg_sqs: *mut *mut c_void,
        n: usize,
        step: f64,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
        err: *mut *mut c_char,
    ) -> i32;
    fn lillm_foreach_zero(list: *mut *mut c_void, n: usize, err: *mut *mut c_char) -> i32;
    fn lillm_fused_clip_grad_norm(
        grads: *mut *mut c_void,
        n: usize,
        max_norm: f64,
        err: *mut *mut c_char,
    ) -> *mut c_void;
}

/// Scales `grads` in place so that their global L2 norm is at most `max_norm` (0: never)
/// with libtorch's multi-tensor kernels; returns the norm before clipping (a 0-d tensor on
/// the gradients' device, read without a host sync only when logging).
pub fn fused_clip_grad_norm(grads: &[Tensor], max_norm: f64) -> Result<Tensor> {
    let mut ptrs: Vec<*mut c_void> = grads.iter().map(|t| t.as_ptr() as *mut c_void).collect();
    let mut err = std::ptr::null_mut();
    // SAFETY: `ptrs` holds `grads.len()` pointers to live at::Tensor objects owned by
    // `grads`, which outlives the call; the shim catches libtorch's exceptions.
    let total =
        unsafe { lillm_fused_clip_grad_norm(ptrs.as_mut_ptr(), ptrs.len(), max_norm, &mut err) };
    if total.is_null() {
        return Err(Error::Kernel(format!(
            "fused gradient clipping: {}",
            take_error(err)
        )));
    }
    // SAFETY: the shim returned a fresh heap-allocated at::Tensor (tch's C_tensor) that
    // nobody else owns; the Tensor frees it on drop.
    Ok(unsafe { Tensor::from_ptr(total as *mut torch_sys::C_tensor) })
}

/// Zeroes `tensors` in place with libtorch's multi-tensor kernel (`_foreach_zero_`): on
/// CUDA a launch or two for all of them instead of one per tensor.
pub fn foreach_zero(tensors: &[Tensor]) -> Result<()> {
    if tensors.is_empty() {
        // libtorch's multi-tensor kernels refuse an empty list; there is nothing to do.
        return Ok(());
    }
    let mut ptrs: Vec<*mut c_void> = tensors.iter().map(|t| t.as_ptr() as *mut c_void).collect();
    let mut err = std::ptr::null_mut();
    // SAFETY: `ptrs` holds `tensors.len()` pointers to live at::Tensor objects owned by
    // `tensors`, which outlives the call; the shim catches libtorch's exceptions.
    let rc = unsafe { lillm_foreach_zero(ptrs.as_mut_ptr(), ptrs.len(), &mut err) };
    if rc != 0 {
        return Err(Error::Kernel(format!(
            "zeroing gradients: {}",
            take_error(err)
        )));
    }
    Ok(())
}

/// AdamW's settings for [`fused_adamw`].
#[derive(Debug, Clone, Copy)]
pub struct AdamWStep {
    /// The optimizer step this update is (1 for the first), for the bias corrections.
    pub step: u64,
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
    pub eps: f64,
}

/// One AdamW update of every parameter by libtorch's fused multi-tensor kernel
/// (`_fused_adamw_`): on CUDA one launch for all of them. The four lists are parallel; every
/// parameter needs a gradient.
pub fn fused_adamw(
    params: &[Tensor],
    grads: &[Tensor],
    exp_avgs: &[Tensor],
    exp_avg_sqs: &[Tensor],
    s: AdamWStep,
) -> Result<()> {
    let n = params.len();
    assert!(
        grads.len() == n && exp_avgs.len() == n && exp_avg_sqs.len() == n,
        "parallel lists"
    );
    let ptrs = |list: &[Tensor]| -> Vec<*mut c_void> {
        list.iter().map(|t| t.as_ptr() as *mut c_void).collect()
    };
    let (mut p, mut g, mut m, mut v) =
        (ptrs(params), ptrs(grads), ptrs(exp_avgs), ptrs(exp_avg_sqs));
    let mut err = std::ptr::null_mut();
    // SAFETY: each list holds `n` pointers to live at::Tensor objects owned by the slices,
    // which outlive the call; the shim copies the handles and catches libtorch's exceptions.
    let rc = unsafe {
        lillm_fused_adamw(
            p.as_mut_ptr(),
            g.as_mut_ptr(),
            m.as_mut_ptr(),
            v.as_mut_ptr(),
            n,
            s.step as f64,
            s.lr,
            s.beta1,
            s.beta2,
            s.weight_decay,
            s.eps,
            &mut err,
        )
    };
    if rc != 0 {
        return Err(Error::Kernel(format!("fused AdamW: {}", take_error(err))));
    }
    Ok(())
}

/// The most bytes libtorch's CUDA allocator had allocated on `device` since the previous
/// call (each call starts a new window): a run's peak GPU memory. `None` on a CPU device or
/// a build without CUDA.
pub fn cuda_peak_allocated(device: tch::Device) -> Option<u64> {
    let tch::Device::Cuda(index) = device else {
        return None;
    };
    // SAFETY: plain values in and out; the shim catches libtorch's exceptions.
    let peak = unsafe { lillm_cuda_peak_allocated(index as i32, true) };
    u64::try_from(peak).ok()
}

/// Where and how the ranks of one job meet.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Rendezvous {
    /// Host and port of the TCPStore; rank 0 serves it.
    pub store_host: String,
    pub store_port: u16,
    /// Local address Gloo binds for this rank's connections.
    pub bind_host: String,
    pub rank: usize,
    pub world_size: usize,
    /// Store key prefix: a new one per membership generation keeps old groups apart.
    pub prefix: String,
    pub timeout_ms: u64,
}

/// Which c10d backend carries the collectives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// CPU tensors.
    Gloo,
    /// CUDA tensors (needs a build with NCCL: see build.rs).
    Nccl,
}

impl Backend {
    /// NCCL for CUDA devices, Gloo otherwise.
    pub fn for_device(device: tch::Device) -> Self {
        match device {
            tch::Device::Cuda(_) => Backend::Nccl,
            _ => Backend::Gloo,
        }
    }
}

/// Starts, once per process, the c10d store this process serves whenever it is rank 0 of
/// a group, on a port the OS picks; returns the port (the same on every call). Kept for the
/// process's life: a group aborted mid-collective is never freed, and must not hold the
/// port the next group's store needs.
pub fn serve_store(timeout: std::time::Duration) -> Result<u16> {
    let mut err = std::ptr::null_mut();
    // SAFETY: `err` is a valid out-pointer; the shim serialises concurrent calls.
    let port = unsafe { lillm_c10d_serve_store(timeout.as_millis() as i64, &mut err) };
    if port == 0 {
        return Err(Error::Collective(format!(
            "cannot serve the c10d store: {}",
            take_error(err)
        )));
    }
    Ok(port)
}

/// The shim's group, freed when the group and every [`AbortHandle`] are gone.
struct RawGroup(*mut c_void);

// SAFETY: the pointer is only used through the shim: collectives by the one thread that owns
// the `ProcessGroup` (which is not `Sync`), `lillm_c10d_abort` from any thread (the shim
// makes it thread-safe) and `lillm_c10d_free` once, on the last reference.
unsafe impl Send for RawGroup {}
unsafe impl Sync for RawGroup {}

impl Drop for RawGroup {
    fn drop(&mut self) {
        // SAFETY: `self.0` came from `lillm_c10d_gloo_new` or `lillm_c10d_nccl_new` (never
        // null: `join` returns an error instead) and is freed exactly once, here; the shim
        // keeps it allocated if a collective was given up in flight.
        unsafe { lillm_c10d_free(self.0) };
    }
}

/// Aborts a group from another thread (the membership's, when the coordinator says the
/// generation is over): its collectives, waiting or to come, fail at once.
#[derive(Clone)]
pub struct AbortHandle(Arc<RawGroup>);

impl AbortHandle {
    pub fn abort(&self) {
        // SAFETY: the group is alive while this handle holds it; abort is thread-safe.
        unsafe { lillm_c10d_abort(self.0 .0) };
    }
}

impl std::fmt::Debug for AbortHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AbortHandle")
    }
}

/// A process group. Collectives block until every rank has joined them, or the group is
/// aborted.
pub struct ProcessGroup {
    raw: Arc<RawGroup>,
    pub rank: usize,
    pub world_size: usize,
    /// `Send` but not `Sync`: one thread at a time runs the group's collectives. (c10d's
    /// Gloo and NCCL backends hold no thread-local state and may be used from whichever
    /// thread owns them.)
    _one_thread: std::marker::PhantomData<std::cell::Cell<()>>,
}

fn take_error(err: *mut c_char) -> String {
    if err.is_null() {
        return "unknown c10d error".into();
    }
    // SAFETY: `err` is non-null and the shim set it to a NUL-terminated string from strdup,
    // which nobody else owns.
    let msg = unsafe { CStr::from_ptr(err) }
        .to_string_lossy()
        .into_owned();
    // SAFETY: `err` came from the shim's strdup and is freed exactly once, here, after the
    // last read above.
    unsafe { lillm_c10d_free_error(err) };
    msg
}

impl ProcessGroup {
    /// Joins the group described by `rdzv` (rank 0 starts the store); blocks until all
    /// `world_size` ranks have arrived or the timeout passes.
    pub fn gloo(rdzv: &Rendezvous) -> Result<Self> {
        Self::join(rdzv, Backend::Gloo)
    }

    /// Joins the group described by `rdzv` with `backend`.
    pub fn join(rdzv: &Rendezvous, backend: Backend) -> Result<Self> {
        let c = |s: &str| {
            CString::new(s).map_err(|_| Error::Config(format!("`{s}` contains a NUL byte")))
        };
        let (store, bind, prefix) = (c(&rdzv.store_host)?, c(&rdzv.bind_host)?, c(&rdzv.prefix)?);
        let mut err = std::ptr::null_mut();
        let new_group = match backend {
            Backend::Gloo => lillm_c10d_gloo_new,
            Backend::Nccl => lillm_c10d_nccl_new,
        };
        // SAFETY: both constructors take the same arguments; the strings are NUL-terminated
        // `CString`s alive until after the call, and `err` is a valid out-pointer.
        let raw = unsafe {
            new_group(
                store.as_ptr(),
                rdzv.store_port,
                bind.as_ptr(),
                rdzv.rank as i32,
                rdzv.world_size as i32,
                prefix.as_ptr(),
                rdzv.timeout_ms as i64,
                &mut err,
            )
        };
        if raw.is_null() {
            return Err(Error::Collective(format!(
                "rank {} could not join the {backend:?} group at {}:{}: {}",
                rdzv.rank,
                rdzv.store_host,
                rdzv.store_port,
                take_error(err)
            )));
        }
        Ok(Self {
            raw: Arc::new(RawGroup(raw)),
            rank: rdzv.rank,
            world_size: rdzv.world_size,
            _one_thread: std::marker::PhantomData,
        })
    }

    /// [`Self::join`], given up as soon as `give_up()` says so (checked every 50 ms): a peer
    /// that froze before the group formed would otherwise hold every rank for the whole
    /// rendezvous timeout. The rendezvous goes on in a thread of its own; a group that forms
    /// after all is dropped there.
    pub fn join_unless(
        rdzv: &Rendezvous,
        backend: Backend,
        give_up: impl Fn() -> bool,
    ) -> Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel();
        let rendezvous = rdzv.clone();
        std::thread::Builder::new()
            .name("c10d-rendezvous".into())
            .spawn(move || {
                let _ = tx.send(Self::join(&rendezvous, backend));
            })
            .map_err(|e| Error::Collective(format!("cannot start the rendezvous: {e}")))?;
        loop {
            match rx.recv_timeout(std::time::Duration::from_millis(50)) {
                Ok(joined) => return joined,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) if give_up() => {
                    return Err(Error::Collective(format!(
                        "aborted: rank {} gave up forming the group at {}:{}",
                        rdzv.rank, rdzv.store_host, rdzv.store_port
                    )))
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(Error::Collective("the rendezvous thread died".into()))
                }
            }
        }
    }

    pub fn abort_handle(&self) -> AbortHandle {
        AbortHandle(self.raw.clone())
    }

    /// Sums `tensor` over all ranks, in place. `tensor` must be a buffer the caller alone
    /// uses: after an abort, a peer that wakes up may still complete the given-up collective
    /// into it.
    pub fn all_reduce_sum(&self, tensor: &mut Tensor) -> Result<()> {
        let mut err = std::ptr::null_mut();
        // SAFETY: `raw` is a live group; the tensor pointer is valid for the call.
        let rc = unsafe {
            lillm_c10d_allreduce_sum(self.raw.0, tensor.as_mut_ptr() as *mut c_void, &mut err)
        };
        if rc != 0 {
            return Err(Error::Collective(format!(
                "all-reduce failed: {}",
                take_error(err)
            )));
        }
        Ok(())
    }

    /// Overwrites `tensor` on every rank with rank `root`'s value. The collective runs on a
    /// private copy, so that a collective given up by an abort can never write into live
    /// state (weights, optimizer moments) later.
    pub fn broadcast(&self, tensor: &mut Tensor, root: usize) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let mut buffer = tensor.copy();
        let mut err = std::ptr::null_mut();
        // SAFETY: as in `all_reduce_sum`.
        let rc = unsafe {
            lillm_c10d_broadcast(
                self.raw.0,
                buffer.as_mut_ptr() as *mut c_void,
                root as i32,
                &mut err,
            )
        };
        if rc != 0 {
            return Err(Error::Collective(format!(
                "broadcast failed: {}",
                take_error(err)
            )));
        }
        tensor.copy_(&buffer);
        Ok(())
    }

    /// Replaces every rank's parameters with rank `root`'s.
    pub fn broadcast_params<'a>(
        &self,
        params: impl Iterator<Item = &'a Tensor>,
        root: usize,
    ) -> Result<()> {
        let _guard = tch::no_grad_guard();
        for p in params {
            let mut data = p.detach();
            self.broadcast(&mut data, root)?;
        }
        Ok(())
    }

    /// Checks that every rank holds the same parameters: each compares a float64 checksum
    /// with rank 0's, and the verdict is shared so all ranks stop together on divergence.
    pub fn check_params_agree<'a>(
        &self,
        params: impl Iterator<Item = &'a Tensor>,
        step: u64,
    ) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let sums: Vec<Tensor> = params
            .map(|p| p.to_kind(Kind::Double).sum(Kind::Double))
            .collect();
        let local = Tensor::stack(&sums, 0).sum(Kind::Double);
        let mut reference = local.copy();
        self.broadcast(&mut reference, 0)?;
        let (mine, theirs) = (local.double_value(&[]), reference.double_value(&[]));
        let differs = (mine - theirs).abs() > 1e-9 * theirs.abs().max(1.0);
        // On the checksum's device: NCCL only reduces CUDA tensors.
        let mut votes = Tensor::from(f64::from(u8::from(differs))).to_device(local.device());
        self.all_reduce_sum(&mut votes)?;
        let diverged = votes.double_value(&[]);
        if diverged > 0.0 {
            return Err(Error::Collective(format!(
                "parameters diverged at step {step}: {diverged} rank(s) disagree with rank 0 (this rank: checksum {mine} vs {theirs}); stopping"
            )));
        }
        Ok(())
    }

    /// Averages gradients over ranks, packing them into flat buckets of at most
    /// `bucket_bytes` so a step makes a few large collectives instead of one per tensor.
    pub fn average_gradients<'a>(
        &self,
        params: impl Iterator<Item = &'a Tensor>,
        bucket_bytes: usize,
    ) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let grads: Vec<Tensor> = params.map(|p| p.grad()).filter(|g| g.defined()).collect();
        let mut start = 0;
        while start < grads.len() {
            let mut end = start;
            let mut bytes = 0;
            while end < grads.len()
                && (end == start || bytes + grads[end].numel() * 4 <= bucket_bytes)
            {
                bytes += grads[end].numel() * 4;
                end += 1;
            }
            let bucket = &grads[start..end];
            let views: Vec<Tensor> = bucket
                .iter()
                .map(|g| g.to_kind(Kind::Float).view([-1]))
                .collect();
            let mut flat = Tensor::cat(&views, 0);
            self.all_reduce_sum(&mut flat)?;
            let _ = flat.g_div_scalar_(self.world_size as f64);
            let mut offset = 0;
            for g in bucket {
                let n = g.numel() as i64;
                let mut g = g.shallow_clone();
                g.copy_(&flat.narrow(0, offset, n).view_as(&g));
                offset += n;
            }
            start = end;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(rank: usize, port: u16) -> ProcessGroup {
        ProcessGroup::gloo(&Rendezvous {
            store_host: "127.0.0.1".into(),
            store_port: port,
            bind_host: "127.0.0.1".into(),
            rank,
            world_size: 2,
            prefix: "test".into(),
            timeout_ms: 30_000,
        })
        .unwrap()
    }

    /// Runs `f(rank, group)` on two ranks (threads) of one group.
    fn on_two_ranks<T: Send + 'static>(f: fn(usize, ProcessGroup) -> T) -> Vec<T> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let handles: Vec<_> = (0..2)
            .map(|rank| std::thread::spawn(move || f(rank, group(rank, port))))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    /// A peer that never reaches the collective (stopped, partitioned): an abort from
    /// another thread ends the wait at once, later collectives of the group fail without
    /// waiting, and the next group forms on the same store (the process's own).
    #[test]
    fn an_aborted_collective_fails_at_once_and_the_next_group_reuses_the_store() {
        use std::time::{Duration, Instant};
        let port = serve_store(Duration::from_secs(30)).unwrap();
        assert_eq!(serve_store(Duration::from_secs(30)).unwrap(), port);
        let rdzv = move |rank: usize, prefix: &str| Rendezvous {
            store_host: "127.0.0.1".into(),
            store_port: port,
            bind_host: "127.0.0.1".into(),
            rank,
            world_size: 2,
            prefix: prefix.into(),
            timeout_ms: 30_000,
        };
        let (release, hold) = std::sync::mpsc::channel::<()>();
        let silent = std::thread::spawn(move || {
            let _group = ProcessGroup::gloo(&rdzv(1, "gen1")).unwrap();
            let _ = hold.recv();
        });
        let group = ProcessGroup::gloo(&rdzv(0, "gen1")).unwrap();
        let handle = group.abort_handle();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            handle.abort();
        });
        let started = Instant::now();
        let mut t = Tensor::from_slice(&[1.0f32]);
        let err = group.all_reduce_sum(&mut t).unwrap_err().to_string();
        assert!(err.contains("aborted"), "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        let later = group.broadcast(&mut t, 0).unwrap_err().to_string();
        assert!(later.contains("aborted"), "{later}");

        let peer = std::thread::spawn(move || {
            let g = ProcessGroup::gloo(&rdzv(1, "gen2")).unwrap();
            let mut t = Tensor::from_slice(&[2.0f32]);
            g.all_reduce_sum(&mut t).unwrap();
            f32::try_from(&t).unwrap()
        });
        let next = ProcessGroup::gloo(&rdzv(0, "gen2")).unwrap();
        let mut t = Tensor::from_slice(&[1.0f32]);
        next.all_reduce_sum(&mut t).unwrap();
        assert_eq!(f32::try_from(&t).unwrap(), 3.0);
        assert_eq!(peer.join().unwrap(), 3.0);
        release.send(()).unwrap();
        silent.join().unwrap();
    }

    /// A peer that never arrives: forming the group is given up on request, long before
    /// the rendezvous timeout.
    #[test]
    fn forming_a_group_can_be_given_up() {
        use std::time::{Duration, Instant};
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let rdzv = Rendezvous {
            store_host: "127.0.0.1".into(),
            store_port: port,
            bind_host: "127.0.0.1".into(),
            rank: 0,
            world_size: 2,
            prefix: "alone".into(),
            timeout_ms: 20_000,
        };
        let started = Instant::now();
        let err = ProcessGroup::join_unless(&rdzv, Backend::Gloo, || {
            started.elapsed() > Duration::from_millis(300)
        })
        .err()
        .expect("no peer, no group")
        .to_string();
        assert!(err.contains("gave up forming the group"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn gradients_are_averaged_and_divergence_is_caught_on_every_rank() {
        let results = on_two_ranks(|rank, g| {
            let mut p = Tensor::zeros([3], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
            let loss = (&p * (rank as f64 + 1.0)).sum(Kind::Float);
            loss.backward();
            g.average_gradients([&p].into_iter(), 8).unwrap();
            let grad: Vec<f32> = Vec::try_from(&p.grad()).unwrap();
            // Same parameters agree; then rank 1 drifts and both ranks are told.
            let agreed = g.check_params_agree([&p].into_iter(), 1).is_ok();
            tch::no_grad(|| {
                let _ = p.fill_(rank as f64);
            });
            let caught = g
                .check_params_agree([&p].into_iter(), 2)
                .unwrap_err()
                .to_string();
            (grad, agreed, caught)
        });
        for (grad, agreed, caught) in results {
            assert_eq!(grad, vec![1.5, 1.5, 1.5], "mean of 1 and 2");
            assert!(agreed);
            assert!(caught.contains("diverged at step 2"), "{caught}");
        }
    }
}
