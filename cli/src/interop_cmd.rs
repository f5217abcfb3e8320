//! `lillm export hf`, `lillm import hf`, `lillm import lillm-pt`.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use lillm_checkpoint::{
    check_vocab, write_checkpoint, CheckpointData, CheckpointState, LoadedModel,
};
use lillm_data::tokenizer::{Tokenizer, BOS_ID, EOS_ID};
use lillm_model::{hf, weights, LilLM, ModelConfig};
use serde_json::{json, Value};
use tch::{nn::VarStore, Device, Tensor};

const PT_CONVERTER: &str = include_str!("python/lillm_pt_to_safetensors.py");

#[derive(Subcommand)]
pub enum ExportCmd {
    /// Write a Hugging Face model directory (config.json, model.safetensors, tokenizer):
    /// LlamaForCausalLM, or MixtralForCausalLM for a Mixture-of-Experts model.
    Hf {
        /// Checkpoint directory, or a run directory (its latest checkpoint).
        #[arg(long)]
        checkpoint: PathBuf,
        /// Output directory (must not exist or be empty).
        #[arg(long)]
        out: PathBuf,
        /// The checkpoint holds LoRA adapters: export its base with them merged in.
        #[arg(long)]
        merge_lora: bool,
    },
    /// Write a LoRA checkpoint's adapters as a PEFT adapter directory (adapter_config.json,
    /// adapter_model.safetensors) for its base exported with `lillm export hf`.
    Peft {
        /// LoRA checkpoint (`lillm sft --lora-rank`), or its run directory.
        #[arg(long)]
        checkpoint: PathBuf,
        /// Output directory (must not exist or be empty).
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
pub enum ImportCmd {
    /// Import a Hugging Face Llama or Mixtral model directory as a lillm checkpoint.
    Hf {
        /// Directory with config.json and model.safetensors (or sharded safetensors + index).
        dir: PathBuf,
        /// Output checkpoint directory.
        #[arg(long)]
        out: PathBuf,
    },
    /// Import an original lilLM PyTorch checkpoint (.pt with `model` and `config`).
    LillmPt {
        file: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Tokenizer to attach (tokenizer.json or a directory holding one).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
    },
}

fn ensure_fresh_dir(out: &Path) -> Result<()> {
    if out.exists() && fs::read_dir(out)?.next().is_some() {
        bail!(
            "{}: already exists and is not empty; choose another --out",
            out.display()
        );
    }
    Ok(())
}

pub fn export(cmd: ExportCmd) -> Result<()> {
    match cmd {
        ExportCmd::Hf {
            checkpoint,
            out,
            merge_lora,
        } => export_hf(&checkpoint, &out, merge_lora),
        ExportCmd::Peft { checkpoint, out } => export_peft(&checkpoint, &out),
    }
}

/// Fills a fresh `out` through `fill(tmp)`, written beside it and renamed into place, so
/// a failed export leaves nothing behind.
fn write_dir(out: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    ensure_fresh_dir(out)?;
    let tmp = out.with_file_name(format!(
        ".{}.partial",
        out.file_name().unwrap_or_default().to_string_lossy()
    ));
    if tmp.exists() {
        fs::remove_dir_all(&tmp)?;
    }
    fs::create_dir_all(&tmp)?;
    fill(&tmp)?;
    if out.exists() {
        fs::remove_dir(out)?;
    }
    fs::rename(&tmp, out)?;
    Ok(())
}

fn write_json(dir: &Path, name: &str, v: &Value) -> Result<()> {
    fs::write(dir.join(name), serde_json::to_string_pretty(v)?)?;
    Ok(())
}

fn export_hf(checkpoint: &Path, out: &Path, merge_lora: bool) -> Result<()> {
    ensure_fresh_dir(out)?;
    let loaded = LoadedModel::load(checkpoint, Device::Cpu)?;
    match (&loaded.state.lora, merge_lora) {
        (Some(_), false) => bail!(
            "{}: holds LoRA adapters; pass --merge-lora to export its base with them merged, or use `lillm export peft` for the adapters alone",
            loaded.dir.display()
        ),
        (None, true) => bail!(
            "{}: has no LoRA adapters to merge; drop --merge-lora",
            loaded.dir.display()
        ),
        _ => {}
    }
    let cfg = loaded.model.config().clone();
    let tensors = hf::to_hf(&cfg, weights::var_store_tensors(&loaded.vs))?;
    write_dir(out, |tmp| {
        weights::write_tensors(&tmp.join("model.safetensors"), &tensors)?;
        write_json(tmp, "config.json", &hf::hf_config(&cfg, BOS_ID, EOS_ID))?;
        write_json(
            tmp,
            "generation_config.json",
            &json!({"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "do_sample": true,
                    "temperature": 0.8, "top_k": 50, "top_p": 0.95, "max_length": cfg.max_seq_len}),
        )?;
        if let Some(tok) = &loaded.tokenizer {
            tok.save_dir(tmp)?;
        }
        Ok(())
    })?;
    println!(
        "exported {} → {} (Hugging Face {}{})",
        loaded.dir.display(),
        out.display(),
        if cfg.moe.is_some() {
            "Mixtral"
        } else {
            "Llama"
        },
        if merge_lora { ", LoRA merged" } else { "" }
    );
    Ok(())
}

fn export_peft(checkpoint: &Path, out: &Path) -> Result<()> {
    ensure_fresh_dir(out)?;
    let dir = lillm_checkpoint::resolve(checkpoint)?;
    let state = lillm_checkpoint::verify_checkpoint(&dir)?;
    let Some(lora) = &state.lora else {
        bail!(
            "{}: holds a whole model, not LoRA adapters; export it with `lillm export hf`",
            dir.display()
        );
    };
    let adapters = weights::read_tensors(&dir.join(lillm_checkpoint::MODEL_FILE))?;
    let tensors = hf::to_peft(&state.model, adapters)?;
    let base = lora.base.display().to_string();
    write_dir(out, |tmp| {
        weights::write_tensors(&tmp.join("adapter_model.safetensors"), &tensors)?;
        write_json(
            tmp,
            "adapter_config.json",
            &hf::peft_config(&lora.config, &base),
        )
    })?;
    println!(
        "exported {} → {} (PEFT LoRA adapter, rank {} on {}; base: {base}, exported with `lillm export hf`)",
        dir.display(),
        out.display(),
        lora.config.rank,
        lora.config.targets.join(", ")
    );
    Ok(())
}

/// Reads `model.safetensors`, or every shard listed in `model.safetensors.index.json`.
fn read_hf_weights(dir: &Path) -> Result<BTreeMap<String, Tensor>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(weights::read_tensors(&single)?);
    }
    let index = dir.join("model.safetensors.index.json");
    let text = fs::read_to_string(&index).with_context(|| {
        format!(
            "{}: holds neither model.safetensors nor model.safetensors.index.json",
            dir.display()
        )
    })?;
    let index: Value =
        serde_json::from_str(&text).with_context(|| format!("{}: malformed", index.display()))?;
    let mut files: Vec<&str> = index["weight_map"]
        .as_object()
        .with_context(|| "weight_map missing from the index")?
        .values()
        .filter_map(Value::as_str)
        .collect();
    files.sort();
    files.dedup();
    let mut all = BTreeMap::new();
    for f in files {
        all.extend(weights::read_tensors(&dir.join(f))?);
    }
    Ok(all)
}

/// Builds the model from `tensors` (checking every name and shape) and writes a checkpoint.
fn write_imported(
    cfg: ModelConfig,
    tensors: BTreeMap<String, Tensor>,
    origin: &Path,
    tokenizer: Option<&Path>,
    source: &str,
    out: &Path,
) -> Result<()> {
    if let Some(tok) = tokenizer {
        check_vocab(&Tokenizer::load(tok)?, cfg.vocab_size)?;
    }
    let vs = VarStore::new(Device::Cpu);
    LilLM::for_loading(&vs.root(), &cfg)?;
    weights::load_into(&vs, &tensors, origin)?;
    let state = CheckpointState {
        step: 0,
        tokens_seen: 0,
        val_loss: None,
        best_val_loss: None,
        model: cfg.clone(),
        train: None,
        world_size: 1,
        seed: 0,
        generation: 0,
        evaluated_at_step: false,
        dataset_fingerprint: None,
        source: source.into(),
        reference_sha256: None,
        lora: None,
    };
    write_checkpoint(
        out,
        &CheckpointData {
            state,
            model: weights::var_store_tensors(&vs),
            optimizer: None,
            tokenizer,
        },
    )?;
    println!(
        "imported {} → {} ({})",
        origin.display(),
        out.display(),
        cfg.size_summary()
    );
    Ok(())
}

pub fn import(cmd: ImportCmd) -> Result<()> {
    match cmd {
        ImportCmd::Hf { dir, out } => {
            ensure_fresh_dir(&out)?;
            let config_path = dir.join("config.json");
            let text = fs::read_to_string(&config_path)
                .with_context(|| format!("{}: cannot read", config_path.display()))?;
            let cfg = hf::config_from_hf(
                &serde_json::from_str(&text)
                    .with_context(|| format!("{}: malformed JSON", config_path.display()))?,
            )?;
            let tensors = hf::from_hf(&cfg, read_hf_weights(&dir)?)?;
            let tok = dir.join("tokenizer.json");
            write_imported(
                cfg,
                tensors,
                &dir,
                tok.is_file().then_some(tok.as_path()),
                "import-hf",
                &out,
            )
        }
        ImportCmd::LillmPt {
            file,
            out,
            tokenizer,
        } => {
            ensure_fresh_dir(&out)?;
            if !file.is_file() {
                bail!("{}: file not found", file.display());
            }
            let work = tempfile::tempdir()?;
            let script = work.path().join("convert.py");
            fs::write(&script, PT_CONVERTER)?;
            let python = project_python();
            let status = std::process::Command::new(&python)
                .arg(&script)
                .arg(&file)
                .arg(work.path())
                .status()
                .with_context(|| {
                    format!(
                        "cannot run `{}` (set LILLM_PYTHON to a Python with torch)",
                        python.display()
                    )
                })?;
            if !status.success() {
                bail!(
                    "{}: conversion failed (see the message above)",
                    file.display()
                );
            }
            let meta: Value =
                serde_json::from_str(&fs::read_to_string(work.path().join("config.json"))?)?;
            let tensors = weights::read_tensors(&work.path().join("model.safetensors"))?;
            let cfg = lillm_pt_config(&meta["config"], &tensors)
                .with_context(|| format!("{}: config", file.display()))?;
            write_imported(
                cfg,
                tensors,
                &file,
                tokenizer.as_deref(),
                "import-lillm-pt",
                &out,
            )
        }
    }
}

/// The original `Config` fields, with sizes the file leaves out read off the tensor shapes.
fn lillm_pt_config(fields: &Value, tensors: &BTreeMap<String, Tensor>) -> Result<ModelConfig> {
    let shape = |name: &str| -> Result<Vec<i64>> {
        Ok(tensors
            .get(name)
            .with_context(|| format!("tensor `{name}` is missing"))?
            .size())
    };
    let emb = shape("tok_emb.weight")?;
    let (vocab_size, d_model) = (emb[0] as usize, emb[1] as usize);
    let n_layers = (0..)
        .take_while(|i| tensors.contains_key(&format!("transformer_blocks.{i}.attn.wq.weight")))
        .count();
    let hidden = shape("transformer_blocks.0.ffn.w1.weight")?[0] as usize;
    let get = |k: &str| fields.get(k).and_then(Value::as_u64).map(|v| v as usize);
    let q_heads = get("q_heads").context("config lacks q_heads")?;
    let kv_heads = get("kv_heads").context("config lacks kv_heads")?;
    let cfg = ModelConfig {
        vocab_size,
        d_model,
        n_layers,
        max_seq_len: get("max_seq_len").unwrap_or(512),
        q_heads,
        kv_heads,
        hidden_dim: Some(hidden),
        multiple_of: get("multiple_of").unwrap_or(128),
        eps: fields.get("eps").and_then(Value::as_f64).unwrap_or(1e-6),
        rope_theta: 10000.0,
        dropout: 0.0,
        moe: None,
    };
    cfg.validate()?;
    Ok(cfg)
}

/// The Python that reads original `.pt` files (it needs torch): `LILLM_PYTHON`, else the
/// project's `.venv` that `scripts/bootstrap` made — found from this executable's place in
/// `target/{release,debug}/`, as the binary finds libtorch — else `python3` on `PATH`.
fn project_python() -> std::path::PathBuf {
    if let Some(python) = std::env::var_os("LILLM_PYTHON") {
        return python.into();
    }
    let exe = std::env::current_exe().ok();
    let beside = exe
        .as_deref()
        .and_then(|e| e.parent())
        .into_iter()
        .flat_map(|dir| {
            // target/release/lillm, or target/debug/deps/… for a test binary.
            [
                dir.join("../../.venv/bin/python"),
                dir.join("../../../.venv/bin/python"),
            ]
        });
    beside
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| "python3".into())
}
