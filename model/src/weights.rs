//! Safetensors IO for a `VarStore`, with errors that name the file and the tensor.

use std::collections::BTreeMap;
use std::path::Path;

use tch::{nn::VarStore, Kind, Tensor};

use crate::{Error, Result};

/// Reads every tensor of a safetensors file, keyed by name.
pub fn read_tensors(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    if !path.is_file() {
        return Err(Error::weights(path, "file not found"));
    }
    let tensors = Tensor::read_safetensors(path).map_err(|e| {
        Error::weights(
            path,
            format!("not a readable safetensors file (truncated or corrupted?): {e}"),
        )
    })?;
    Ok(tensors.into_iter().collect())
}

/// Writes tensors (moved to CPU) to a safetensors file, sorted by name.
pub fn write_tensors(path: &Path, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
    let cpu: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(name, t)| (name.clone(), t.to_device(tch::Device::Cpu).contiguous()))
        .collect();
    Tensor::write_safetensors(&cpu, path).map_err(|e| Error::weights(path, e.to_string()))
}

/// Copies the variables of `vs` out as a name → tensor map (shallow clones of the storage).
pub fn var_store_tensors(vs: &VarStore) -> BTreeMap<String, Tensor> {
    vs.variables().into_iter().collect()
}

/// Loads `tensors` into the variables of `vs`. Every variable must be present with the same
/// shape; a tensor the model does not have is an error too (it means another architecture).
pub fn load_into(vs: &VarStore, tensors: &BTreeMap<String, Tensor>, origin: &Path) -> Result<()> {
    // In name order, so the first problem reported is the same on every run.
    let vars: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
    if let Some(extra) = tensors.keys().find(|name| !vars.contains_key(*name)) {
        return Err(Error::weights(
            origin,
            format!("tensor `{extra}` is not a parameter of this model; the file holds another architecture"),
        ));
    }
    let _guard = tch::no_grad_guard();
    for (name, mut var) in vars {
        let Some(src) = tensors.get(&name) else {
            return Err(Error::weights(
                origin,
                format!(
                    "tensor `{name}` is missing; the file holds another model or is incomplete"
                ),
            ));
        };
        if src.size() != var.size() {
            return Err(Error::weights(
                origin,
                format!(
                    "tensor `{name}` has shape {:?} but this model config expects {:?}; the checkpoint was made with another config",
                    src.size(),
                    var.size()
                ),
            ));
        }
        var.copy_(&src.to_kind(Kind::Float).to_device(var.device()));
    }
    Ok(())
}

/// Saves the variables of `vs` to `path`.
pub fn save_var_store(vs: &VarStore, path: &Path) -> Result<()> {
    write_tensors(path, &var_store_tensors(vs))
}

/// Loads `path` into the variables of `vs` (see [`load_into`]).
pub fn load_var_store(vs: &VarStore, path: &Path) -> Result<()> {
    load_into(vs, &read_tensors(path)?, path)
}

/// Stores a model's weights in its compute `kind` for inference: a 16-bit model casts every
/// weight to `kind` where it is used, so holding them in `kind` gives the same logits bit for
/// bit, with half the memory and no cast per weight per forward (a decode step's many small
/// kernels). Never for training: the optimizer updates float32 masters.
pub fn store_for_inference(vs: &mut VarStore, kind: Kind) {
    match kind {
        Kind::BFloat16 => vs.bfloat16(),
        Kind::Half => vs.half(),
        _ => {}
    }
}
