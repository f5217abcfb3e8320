//! Naming a libtorch device on the command line.

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
                Error::Config(format!(
                    "device `{other}` is not one of auto, cpu, cuda, cuda:N"
                ))
            }),
    }
}
