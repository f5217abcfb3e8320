//! The device peak that MFU is measured against.

use std::time::Instant;

use tch::{Device, Kind, Tensor};

/// Peak FLOP/s: the configured TFLOP/s; else H100 SXM bf16 (989 TF/s) on CUDA; else on CPU
/// a short float32 matmul measurement, so CPU MFU is relative to what this CPU really does.
pub fn peak_flops(configured_tflops: Option<f64>, device: Device) -> Option<f64> {
    if let Some(t) = configured_tflops {
        return Some(t * 1e12);
    }
    if device.is_cuda() {
        return Some(989e12);
    }
    Some(measure_cpu_matmul_flops())
}

/// Achieved float32 GEMM FLOP/s on this CPU (512³ matmuls for ~0.2 s).
pub fn measure_cpu_matmul_flops() -> f64 {
    let _guard = tch::no_grad_guard();
    let n = 512i64;
    let a = Tensor::randn([n, n], (Kind::Float, Device::Cpu));
    let b = Tensor::randn([n, n], (Kind::Float, Device::Cpu));
    let _ = a.matmul(&b);
    let start = Instant::now();
    let mut runs = 0u32;
    while start.elapsed().as_secs_f64() < 0.2 {
        let _ = a.matmul(&b);
        runs += 1;
    }
    2.0 * (n * n * n) as f64 * runs as f64 / start.elapsed().as_secs_f64()
}
