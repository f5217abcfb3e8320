//! Naming a libtorch device and the activations' dtype on the command line, whether this
//! CPU computes bf16 natively, and moving host values to a device without waiting for it.

use crate::{Error, Result};

/// `auto` (CUDA when available), `cpu`, `cuda` or `cuda:N` as a libtorch device.
pub fn parse_device(name: &str) -> Result<tch::Device> {
    match name {
        "auto" => Ok(tch::Device::cuda_if_available()),
        "cpu" => Ok(tch::Device::Cpu),
        "cuda" => Ok(tch::Device::Cuda(0)),
        other => other
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(tch::Device::Cuda)
            .ok_or_else(|| {
                Error::Name(format!(
                    "device `{other}` is not one of auto, cpu, cuda, cuda:N"
                ))
            }),
    }
}

/// `auto` (`None`: the caller's rule), `float32` or `bfloat16`: the dtype activations are
/// computed in (weights stay float32).
pub fn parse_dtype(name: &str) -> Result<Option<tch::Kind>> {
    match name {
        "auto" => Ok(None),
        "float32" => Ok(Some(tch::Kind::Float)),
        "bfloat16" => Ok(Some(tch::Kind::BFloat16)),
        other => Err(Error::Name(format!(
            "dtype `{other}` is not one of auto, float32, bfloat16"
        ))),
    }
}

/// Whether this CPU does bf16 arithmetic natively (AVX512-BF16 or AMX-BF16), where bf16
/// mixed precision roughly doubles training throughput over float32 (2.15× for lillm-39m on
/// an AVX512-BF16 CPU); elsewhere libtorch emulates bf16 and it is slower.
pub fn cpu_has_native_bf16() -> bool {
    static NATIVE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *NATIVE.get_or_init(|| {
        std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|info| cpu_flags_have_bf16(&info))
    })
}

fn cpu_flags_have_bf16(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .flat_map(|l| l.split_whitespace())
        .any(|flag| flag == "avx512_bf16" || flag == "amx_bf16")
}

/// `values` as a tensor on `device`, copied there without asking libtorch to wait for the
/// device.
///
/// libtorch's plain copy from host memory to a GPU (`to`, `copy_`) synchronizes the stream
/// after it: the host waits for every kernel queued before it, so a decode step that
/// uploads its token ids, positions and sampling parameters would stop the host five or ten
/// times per token, and a training step could not queue its forward while the last
/// optimizer step runs. This copy (libtorch's `non_blocking`) leaves that wait out. The
/// host values are pageable memory, which CUDA copies out before the call returns, so they
/// may be dropped at once; whether the driver itself waits for the stream first is its
/// choice (it may, to stage a large copy), never worse than before. Kernels queued after
/// the copy on the stream read the values in order. On a CPU it is the plain tensor.
pub fn upload<T: tch::kind::Element>(values: &[T], device: tch::Device) -> tch::Tensor {
    let host = tch::Tensor::from_slice(values);
    match device {
        tch::Device::Cpu => host,
        _ => host.to_device_(device, T::KIND, true, false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn native_bf16_is_read_from_the_cpu_flags() {
        let with = "processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16 avx512_vnni\n";
        let amx = "flags\t\t: fpu amx_bf16 amx_tile\n";
        let without = "flags\t\t: fpu sse avx2 avx512f\nbugs\t\t: avx512_bf16\n";
        assert!(cpu_flags_have_bf16(with));
        assert!(cpu_flags_have_bf16(amx));
        assert!(!cpu_flags_have_bf16(without));
    }

    #[test]
    fn an_upload_holds_the_values_on_the_device_asked() {
        let t = upload(&[3i64, 1, 4], tch::Device::Cpu);
        assert_eq!(Vec::<i64>::try_from(&t).unwrap(), [3, 1, 4]);
        assert_eq!(t.kind(), tch::Kind::Int64);
        if tch::Cuda::is_available() {
            let on_gpu = upload(&[0.5f32, 2.0], tch::Device::Cuda(0));
            assert_eq!(on_gpu.device(), tch::Device::Cuda(0));
            let back = on_gpu.to_device(tch::Device::Cpu);
            assert_eq!(Vec::<f32>::try_from(&back).unwrap(), [0.5, 2.0]);
        }
    }
}
