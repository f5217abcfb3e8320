//! libtorch's profiler (Kineto, as PyTorch's `torch.profiler`) for a span of work: the time
//! each operator took on the CPU and each kernel on CUDA, and a Chrome trace of it
//! (`chrome://tracing`, Perfetto). Recording is per thread for operators (the thread that
//! started it) and per process for CUDA kernels.

use std::ffi::{c_char, CString};
use std::path::Path;

use crate::{take_error, take_string, Error, Result};

extern "C" {
    fn lillm_profiler_start(cuda: bool, err: *mut *mut c_char) -> i32;
    fn lillm_profiler_stop(trace: *const c_char, err: *mut *mut c_char) -> *mut c_char;
}

/// What one operator or kernel took over the recorded span.
#[derive(Debug, Clone, PartialEq)]
pub struct OpTime {
    pub name: String,
    /// `cpu` (an operator, its time including the operators it called) or `cuda` (a kernel).
    pub device: String,
    pub calls: u64,
    pub total_ns: u64,
}

/// A running recording; [`Profiler::finish`] ends it (dropping it discards what it holds).
#[derive(Debug)]
pub struct Profiler {
    finished: bool,
    _one_thread: std::marker::PhantomData<*mut ()>,
}

impl Profiler {
    /// Starts recording this thread's operators, and the kernels of `device` when it is CUDA.
    pub fn start(device: tch::Device) -> Result<Self> {
        let mut err = std::ptr::null_mut();
        // SAFETY: a plain value in; the shim sets `err` only on failure.
        let rc = unsafe { lillm_profiler_start(device.is_cuda(), &mut err) };
        if rc != 0 {
            return Err(take_error("profiler", err));
        }
        Ok(Self {
            finished: false,
            _one_thread: std::marker::PhantomData,
        })
    }

    /// Ends the recording, writes its Chrome trace to `trace` when given, and returns what
    /// each operator and kernel took, the longest first.
    pub fn finish(mut self, trace: Option<&Path>) -> Result<Vec<OpTime>> {
        self.finished = true;
        stop(trace)
    }
}

impl Drop for Profiler {
    fn drop(&mut self) {
        if !self.finished {
            let _ = stop(None);
        }
    }
}

fn stop(trace: Option<&Path>) -> Result<Vec<OpTime>> {
    let trace = trace
        .map(|p| CString::new(p.to_string_lossy().as_bytes()))
        .transpose()
        .map_err(|_| Error::Unavailable("the trace path holds a NUL byte".into()))?;
    let mut err = std::ptr::null_mut();
    // SAFETY: `trace` is null or a NUL-terminated string that outlives the call; the shim
    // returns a strdup'd string we own, or null with `err` set.
    let raw = unsafe {
        lillm_profiler_stop(
            trace.as_ref().map_or(std::ptr::null(), |t| t.as_ptr()),
            &mut err,
        )
    };
    match take_string(raw) {
        Some(json) => parse(&json),
        None => Err(take_error("profiler", err)),
    }
}

/// The shim's `[[name, device, calls, total ns], …]`, the longest first.
fn parse(json: &str) -> Result<Vec<OpTime>> {
    let rows: Vec<(String, String, u64, u64)> = serde_json::from_str(json)
        .map_err(|e| Error::Cuda(format!("profiler: unreadable summary ({e})")))?;
    let mut ops: Vec<OpTime> = rows
        .into_iter()
        .map(|(name, device, calls, total_ns)| OpTime {
            name,
            device,
            calls,
            total_ns,
        })
        .collect();
    ops.sort_by(|a, b| b.total_ns.cmp(&a.total_ns).then(a.name.cmp(&b.name)));
    Ok(ops)
}

/// The `top` longest kernels (when there are any) and operators as a table, in ms per
/// step over `steps` recorded steps; a kernel's share is of all kernel time.
pub fn table(ops: &[OpTime], steps: u64, top: usize) -> String {
    let steps = steps.max(1) as f64;
    let mut out = String::new();
    for device in ["cuda", "cpu"] {
        let rows: Vec<&OpTime> = ops.iter().filter(|o| o.device == device).collect();
        if rows.is_empty() {
            continue;
        }
        let total: u64 = rows.iter().map(|o| o.total_ns).sum();
        let what = match device {
            // Kernels do not nest: their times add up.
            "cuda" => format!(
                "CUDA kernels: {:.2} ms per step in all",
                total as f64 / 1e6 / steps
            ),
            _ => "CPU operators (inclusive: an operator's time holds those it calls)".into(),
        };
        out.push_str(&format!(
            "{what}\n{:>10} {:>7} {:>8}  name\n",
            "ms/step", "share", "calls"
        ));
        for o in rows.iter().take(top) {
            let share = match device {
                "cuda" => format!("{:.1}%", 100.0 * o.total_ns as f64 / total.max(1) as f64),
                _ => String::new(),
            };
            let name: String = o.name.chars().take(100).collect();
            out.push_str(&format!(
                "{:>10.3} {share:>7} {:>8}  {name}\n",
                o.total_ns as f64 / 1e6 / steps,
                (o.calls as f64 / steps).round() as u64,
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Kind, Tensor};

    #[test]
    fn a_recorded_matmul_is_in_the_summary_and_the_trace() {
        let dir = tempfile::tempdir().unwrap();
        let trace = dir.path().join("trace.json");
        let a = Tensor::randn([64, 64], (Kind::Float, tch::Device::Cpu));
        let profiler = Profiler::start(tch::Device::Cpu).unwrap();
        for _ in 0..3 {
            let _ = a.matmul(&a);
        }
        let ops = profiler.finish(Some(&trace)).unwrap();
        let matmul = ops
            .iter()
            .find(|o| o.name == "aten::matmul")
            .expect("aten::matmul");
        assert_eq!((matmul.device.as_str(), matmul.calls), ("cpu", 3));
        assert!(matmul.total_ns > 0);
        let written: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&trace).unwrap()).unwrap();
        assert!(written["traceEvents"].to_string().contains("aten::matmul"));
        let printed = table(&ops, 3, 5);
        assert!(
            printed.contains("aten::matmul") && printed.contains("CPU operators"),
            "{printed}"
        );
    }

    #[test]
    fn the_table_is_per_step_and_kernels_come_first_with_their_share() {
        let op = |name: &str, device: &str, calls, total_ns| OpTime {
            name: name.into(),
            device: device.into(),
            calls,
            total_ns,
        };
        let ops = [
            op("gemm", "cuda", 20, 30_000_000),
            op("aten::mm", "cpu", 20, 8_000_000),
            op("rmsnorm", "cuda", 40, 10_000_000),
        ];
        let printed = table(&ops, 10, 5);
        let kernels = printed
            .find("CUDA kernels: 4.00 ms per step")
            .expect(&printed);
        assert!(
            kernels < printed.find("CPU operators").unwrap(),
            "{printed}"
        );
        assert!(
            printed.contains("     3.000   75.0%        2  gemm"),
            "{printed}"
        );
        assert!(
            printed.contains("     1.000   25.0%        4  rmsnorm"),
            "{printed}"
        );
    }
}
