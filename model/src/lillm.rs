//! The lilLM transformer (Llama-style: RMSNorm, RoPE, GQA, SwiGLU, tied embeddings).
//!
//! Struct fields mirror the tensor names of the original PyTorch state dict, so
//! `transformer_blocks.3.attn.wq.weight` here is the same tensor there.

use tch::{nn, Kind, Tensor};

use crate::fused::{swiglu, Kernels};
use crate::joined::Joined;
use crate::lora::{LoraConfig, Weight};
use crate::moe::{LayerRouting, Moe, Routing};
use crate::rms_norm::RmsNorm;
use crate::rope::{Rope, RowAngles};
use crate::{upload, KvCache, ModelConfig, Result, SlotCache};

#[derive(Debug)]
struct Attention {
    wq: Weight,
    wk: Weight,
    wv: Weight,
    wo: Weight,
    /// wq, wk and wv joined, for inference ([`LilLM::join_projections`]).
    joined: Option<Joined>,
    q_heads: i64,
    kv_heads: i64,
    head_dim: i64,
}

/// A bias-free linear layer with weight (out, in), computed in the activation's dtype.
pub(crate) fn linear(x: &Tensor, weight: &Tensor) -> Tensor {
    x.linear(&weight.to_kind(x.kind()), None::<&Tensor>)
}

/// How a new model's weights start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Start {
    /// The original's random initialisation.
    Random,
    /// Zeros, to be overwritten by loaded weights: draws nothing from libtorch's generator.
    ToLoad,
}

pub(crate) fn normal_weight(
    vs: &nn::Path,
    name: &str,
    (out_dim, in_dim): (usize, usize),
    std: f64,
    start: Start,
) -> Tensor {
    let init = match start {
        Start::Random => nn::Init::Randn {
            mean: 0.0,
            stdev: std,
        },
        Start::ToLoad => nn::Init::Const(0.0),
    };
    vs.var(name, &[out_dim as i64, in_dim as i64], init)
}

impl Attention {
    fn new(vs: nn::Path, cfg: &ModelConfig, start: Start) -> Self {
        let d = cfg.d_model;
        let hd = cfg.head_dim();
        let std_in = (d as f64).powf(-0.5);
        let std_out = 0.02 / (2.0 * cfg.n_layers as f64).sqrt();
        Self {
            wq: Weight::new(normal_weight(
                &(&vs / "wq"),
                "weight",
                (cfg.q_heads * hd, d),
                std_in,
                start,
            )),
            wk: Weight::new(normal_weight(
                &(&vs / "wk"),
                "weight",
                (cfg.kv_heads * hd, d),
                std_in,
                start,
            )),
            wv: Weight::new(normal_weight(
                &(&vs / "wv"),
                "weight",
                (cfg.kv_heads * hd, d),
                std_in,
                start,
            )),
            wo: Weight::new(normal_weight(
                &(&vs / "wo"),
                "weight",
                (d, cfg.q_heads * hd),
                std_out,
                start,
            )),
            joined: None,
            q_heads: cfg.q_heads as i64,
            kv_heads: cfg.kv_heads as i64,
            head_dim: hd as i64,
        }
    }

    fn forward(
        &self,
        x: &Tensor,
        span: &Span,
        cache: Option<(&mut Tensor, &mut Tensor)>,
    ) -> Tensor {
        let (b, t, _) = x.size3().expect("attention input is 3-d");
        let start_pos = span.start;
        let rotate = |x: &Tensor| span.rope.apply(x, start_pos, span.kernels);
        let [q, k, v] = self.project(x, t, rotate).map(|x| x.transpose(1, 2));
        let (k, v) = match cache {
            None => (k, v),
            Some((cache_k, cache_v)) => {
                cache_k.narrow(2, start_pos, t).copy_(&k);
                cache_v.narrow(2, start_pos, t).copy_(&v);
                (
                    cache_k.narrow(2, 0, start_pos + t),
                    cache_v.narrow(2, 0, start_pos + t),
                )
            }
        };
        let mask = span.chunk_mask.as_ref().map(|m| m.to_kind(q.kind()));
        let is_causal = mask.is_none() && t > 1;
        let out = Tensor::scaled_dot_product_attention(
            &q,
            &k.to_kind(q.kind()),
            &v.to_kind(q.kind()),
            mask.as_ref(),
            span.dropout,
            is_causal,
            None,
            true,
        );
        let out = out.transpose(1, 2).contiguous().view([b, t, -1]);
        linear(&out, &self.wo.get())
    }

    /// q and k of `x` (B, T, d) rotated by `rotate`, and v; each (B, T, heads, head_dim).
    /// Joined projections rotate q and k as one tensor of their heads side by side: one
    /// rotation (a few kernels) where apart there are two.
    fn project(&self, x: &Tensor, t: i64, rotate: impl Fn(&Tensor) -> Tensor) -> [Tensor; 3] {
        let b = x.size()[0];
        let heads = |x: &Tensor, n: i64| x.view([b, t, n, self.head_dim]);
        let Some(joined) = &self.joined else {
            let [q, k, v] = [&self.wq, &self.wk, &self.wv].map(|w| linear(x, &w.get()));
            return [
                rotate(&heads(&q, self.q_heads)),
                rotate(&heads(&k, self.kv_heads)),
                heads(&v, self.kv_heads),
            ];
        };
        let qkv = joined.product(x);
        let qk_width = (self.q_heads + self.kv_heads) * self.head_dim;
        let qk = rotate(&heads(
            &qkv.narrow(2, 0, qk_width),
            self.q_heads + self.kv_heads,
        ));
        [
            qk.narrow(2, 0, self.q_heads),
            qk.narrow(2, self.q_heads, self.kv_heads),
            heads(
                &qkv.narrow(2, qk_width, self.kv_heads * self.head_dim),
                self.kv_heads,
            ),
        ]
    }

    /// One new token for each of the step's `b` sequences, in cache slots `0..b`.
    fn forward_slots(
        &self,
        x: &Tensor,
        step: &DecodeRows,
        (cache_k, cache_v): (&mut Tensor, &mut Tensor),
    ) -> Tensor {
        let (b, _, _) = x.size3().expect("attention input is 3-d");
        let rotate = |x: &Tensor| step.angles.apply(x);
        let [q, k, v] = self.project(x, 1, rotate).map(|x| x.transpose(1, 2));
        let _ = cache_k.index_put_(&step.at, &k.squeeze_dim(2).to_kind(cache_k.kind()), false);
        let _ = cache_v.index_put_(&step.at, &v.squeeze_dim(2).to_kind(cache_v.kind()), false);
        let keys = step.mask.size()[3];
        let k = cache_k.narrow(0, 0, b).narrow(2, 0, keys);
        let v = cache_v.narrow(0, 0, b).narrow(2, 0, keys);
        let out = Tensor::scaled_dot_product_attention(
            &q,
            &k.to_kind(q.kind()),
            &v.to_kind(q.kind()),
            Some(&step.mask.to_kind(q.kind())),
            0.0,
            false,
            None,
            true,
        );
        let out = out.transpose(1, 2).contiguous().view([b, 1, -1]);
        linear(&out, &self.wo.get())
    }
}

/// What every layer's attention in a forward over consecutive positions shares.
struct Span<'a> {
    rope: &'a Rope,
    /// The first position.
    start: i64,
    /// For a chunk after earlier tokens in the cache ([`chunk_mask`]), made once for all
    /// layers.
    chunk_mask: Option<Tensor>,
    dropout: f64,
    kernels: Kernels,
}

/// What positions `start..start + t` of a chunk after earlier tokens add to their scores
/// over positions `0..start + t`: 0 where they see them (their own and those before), −∞
/// elsewhere; (t, start + t) in `kind`. Such a chunk needs this explicit mask: SDPA's causal
/// flag aligns the triangle to the top-left corner, not to the chunk's real positions.
fn chunk_mask(start: i64, t: i64, kind: Kind, device: tch::Device) -> Tensor {
    let rows = Tensor::arange_start(start, start + t, (Kind::Int64, device));
    let cols = Tensor::arange(start + t, (Kind::Int64, device));
    let unseen = cols.unsqueeze(0).gt_tensor(&rows.unsqueeze(1));
    Tensor::zeros([t, start + t], (kind, device)).masked_fill(&unseen, f64::NEG_INFINITY)
}

/// What every layer's attention in a decode step shares, made once per step: the same for
/// all layers, it would otherwise cost each layer a few small kernels of its own (on a GPU,
/// each of them part of every token's step).
struct DecodeRows {
    /// Row `i`'s rotation at its own position.
    angles: RowAngles,
    /// Where row `i`'s key and value go in a layer's cache: (slot i, position i), indices on
    /// dims 0 and 2.
    at: [Option<Tensor>; 3],
    /// What each row adds to its scores over the first `keys` positions: 0 where it sees
    /// them (its own position and those before), −∞ elsewhere; (b, 1, 1, keys) in the
    /// compute kind (attention would turn a boolean mask into this at every call).
    mask: Tensor,
}

impl DecodeRows {
    /// Rows at `positions` (b,), attending to the first `keys` positions of their slots,
    /// computing in `kind`.
    fn new(rope: &Rope, positions: &Tensor, keys: i64, kind: Kind, kernels: Kernels) -> Self {
        let b = positions.size()[0];
        let device = positions.device();
        let cols = Tensor::arange(keys, (Kind::Int64, device));
        let unseen = cols.unsqueeze(0).gt_tensor(&positions.unsqueeze(1));
        Self {
            angles: rope.at_rows(positions, kernels),
            at: [
                Some(Tensor::arange(b, (Kind::Int64, device))),
                None,
                Some(positions.shallow_clone()),
            ],
            mask: Tensor::zeros([b, keys], (kind, device))
                .masked_fill(&unseen, f64::NEG_INFINITY)
                .view([b, 1, 1, keys]),
        }
    }
}

#[derive(Debug)]
pub(crate) struct FeedForward {
    w1: Weight,
    w2: Weight,
    w3: Weight,
    /// w1 and w3 joined, for inference ([`LilLM::join_projections`]).
    joined: Option<Joined>,
}

impl FeedForward {
    fn new(vs: nn::Path, cfg: &ModelConfig, start: Start) -> Self {
        Self::with_hidden(vs, cfg, cfg.ffn_hidden_dim(), start)
    }

    pub(crate) fn with_hidden(vs: nn::Path, cfg: &ModelConfig, h: usize, start: Start) -> Self {
        let d = cfg.d_model;
        let std_out = 0.02 / (2.0 * cfg.n_layers as f64).sqrt();
        let d_std = (d as f64).powf(-0.5);
        Self {
            w1: Weight::new(normal_weight(&(&vs / "w1"), "weight", (h, d), d_std, start)),
            w2: Weight::new(normal_weight(
                &(&vs / "w2"),
                "weight",
                (d, h),
                std_out,
                start,
            )),
            w3: Weight::new(normal_weight(&(&vs / "w3"), "weight", (h, d), d_std, start)),
            joined: None,
        }
    }

    pub(crate) fn forward(&self, x: &Tensor, kernels: Kernels) -> Tensor {
        let [gate, up] = match &self.joined {
            Some(joined) => joined.apply(x).try_into().expect("two parts"),
            None => [&self.w1, &self.w3].map(|w| linear(x, &w.get())),
        };
        let hidden = swiglu(&gate, &up, kernels);
        linear(&hidden, &self.w2.get())
    }
}

/// A block's feed-forward: the original's dense SwiGLU (`ffn.*`) or a sparse MoE (`moe.*`).
#[derive(Debug)]
enum Mlp {
    Dense(FeedForward),
    Sparse(Moe),
}

impl Mlp {
    /// The output, and the layer's routing when sparse and `with_routing`.
    fn forward(
        &self,
        x: &Tensor,
        with_routing: bool,
        kernels: Kernels,
    ) -> (Tensor, Option<LayerRouting>) {
        match self {
            Self::Dense(ffn) => (ffn.forward(x, kernels), None),
            Self::Sparse(moe) => moe.forward(x, with_routing),
        }
    }
}

#[derive(Debug)]
struct TransformerBlock {
    attn_norm: RmsNorm,
    attn: Attention,
    ffn_norm: RmsNorm,
    mlp: Mlp,
}

/// The whole model. Parameters live in the `VarStore` the model was built from.
#[derive(Debug)]
pub struct LilLM {
    cfg: ModelConfig,
    tok_emb: Tensor,
    transformer_blocks: Vec<TransformerBlock>,
    norm: RmsNorm,
    rope: Rope,
    compute_kind: Kind,
    /// Which implementation of the norms, RoPE and SwiGLU runs (fused on CUDA).
    kernels: Kernels,
}

impl LilLM {
    /// Builds the model with the original initialisation, parameters named like the original.
    pub fn new(vs: &nn::Path, cfg: &ModelConfig) -> Result<Self> {
        Self::build(vs, cfg, Start::Random)
    }

    /// Builds the model with zero weights, for loading a checkpoint into: it skips the random
    /// initialisation and draws nothing from libtorch's generator, so a model loaded on one
    /// thread (an evaluator beside training) never shifts the seeded dropout of another.
    pub fn for_loading(vs: &nn::Path, cfg: &ModelConfig) -> Result<Self> {
        Self::build(vs, cfg, Start::ToLoad)
    }

    fn build(vs: &nn::Path, cfg: &ModelConfig, start: Start) -> Result<Self> {
        cfg.validate()?;
        let d = cfg.d_model;
        let embedding = (cfg.vocab_size, d);
        let tok_emb = normal_weight(
            &(vs / "tok_emb"),
            "weight",
            embedding,
            (d as f64).powf(-0.5),
            start,
        );
        let blocks = vs / "transformer_blocks";
        let transformer_blocks = (0..cfg.n_layers)
            .map(|i| {
                let block = &blocks / i;
                TransformerBlock {
                    attn_norm: RmsNorm::new(&block / "attn_norm", d, cfg.eps),
                    attn: Attention::new(&block / "attn", cfg, start),
                    ffn_norm: RmsNorm::new(&block / "ffn_norm", d, cfg.eps),
                    mlp: match cfg.is_moe_layer(i) {
                        true => Mlp::Sparse(Moe::new(&block / "moe", cfg, start)),
                        false => Mlp::Dense(FeedForward::new(&block / "ffn", cfg, start)),
                    },
                }
            })
            .collect();
        Ok(Self {
            cfg: cfg.clone(),
            tok_emb,
            transformer_blocks,
            norm: RmsNorm::new(vs / "norm", d, cfg.eps),
            rope: Rope::new(cfg, vs.device()),
            compute_kind: Kind::Float,
            kernels: Kernels::for_device(vs.device()),
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Adds trainable LoRA adapters to the `lora.targets` projections of every layer, as
    /// variables of `path` (`transformer_blocks.{i}.attn.wq.lora_A` …). Freezing the base
    /// weights is the caller's (their `VarStore`'s) business.
    pub fn attach_lora(&mut self, path: &nn::Path, lora: &LoraConfig) -> Result<()> {
        lora.validate()?;
        let blocks = path / "transformer_blocks";
        for (i, block) in self.transformer_blocks.iter_mut().enumerate() {
            let layer = &blocks / i;
            // An adapter adds to its own projection alone: joined ones go back to their parts.
            block.attn.joined = None;
            if let Mlp::Dense(ffn) = &mut block.mlp {
                ffn.joined = None;
            }
            for target in &lora.targets {
                let (group, weight) = match (target.as_str(), &mut block.mlp) {
                    ("wq", _) => ("attn", &mut block.attn.wq),
                    ("wk", _) => ("attn", &mut block.attn.wk),
                    ("wv", _) => ("attn", &mut block.attn.wv),
                    ("wo", _) => ("attn", &mut block.attn.wo),
                    ("w1", Mlp::Dense(ffn)) => ("ffn", &mut ffn.w1),
                    ("w2", Mlp::Dense(ffn)) => ("ffn", &mut ffn.w2),
                    ("w3", Mlp::Dense(ffn)) => ("ffn", &mut ffn.w3),
                    (ffn, Mlp::Sparse(_)) => {
                        return Err(crate::Error::Config(format!(
                            "lora target `{ffn}`: layer {i} is a Mixture-of-Experts layer, whose experts take no adapters; target the attention projections (wq, wk, wv, wo)"
                        )))
                    }
                    (other, _) => {
                        return Err(crate::Error::Config(format!("unknown lora target `{other}`")))
                    }
                };
                weight.attach(&(&(&layer / group) / target.as_str()), lora);
            }
        }
        Ok(())
    }

    /// Holds the model as inference uses it: computing in `kind`, its weights (in `vs`)
    /// stored in `kind` ([`weights::store_for_inference`]) and then its projections joined
    /// ([`Self::join_projections`]) — in that order, so the joined matrices are made of the
    /// weights as they are stored.
    pub fn hold_for_inference(&mut self, vs: &mut nn::VarStore, kind: Kind) {
        self.set_compute_kind(kind);
        crate::weights::store_for_inference(vs, kind);
        self.join_projections();
    }

    /// For inference: joins each layer's q, k and v projections into one matrix, and its
    /// gate and up projections into another, which its forward then multiplies by once
    /// ([`crate::joined`]; the named weights become views of them, so no memory is added).
    /// Call it after the weights have their final kind and values (as
    /// [`Self::hold_for_inference`] does): a weight given new memory later (a cast of the
    /// var store) would leave its joined copy behind. A layer whose projections carry LoRA
    /// adapters keeps them apart.
    pub fn join_projections(&mut self) {
        for block in &mut self.transformer_blocks {
            let attn = &mut block.attn;
            attn.joined = Joined::join(&mut [&mut attn.wq, &mut attn.wk, &mut attn.wv]);
            if let Mlp::Dense(ffn) = &mut block.mlp {
                ffn.joined = Joined::join(&mut [&mut ffn.w1, &mut ffn.w3]);
            }
        }
    }

    /// Folds every adapter into its base weight, leaving a plain model (for inference and
    /// export: no per-forward cost).
    pub fn merge_lora(&mut self) {
        for block in &mut self.transformer_blocks {
            for w in [
                &mut block.attn.wq,
                &mut block.attn.wk,
                &mut block.attn.wv,
                &mut block.attn.wo,
            ] {
                w.merge();
            }
            if let Mlp::Dense(ffn) = &mut block.mlp {
                for w in [&mut ffn.w1, &mut ffn.w2, &mut ffn.w3] {
                    w.merge();
                }
            }
        }
    }

    pub fn device(&self) -> tch::Device {
        self.tok_emb.device()
    }

    pub fn compute_kind(&self) -> Kind {
        self.compute_kind
    }

    /// Activations and matmuls in `kind` (bf16 on GPU) while parameters stay float32:
    /// weights are cast where they are used, so gradients flow back into the float32 masters.
    pub fn set_compute_kind(&mut self, kind: Kind) {
        self.compute_kind = kind;
    }

    pub fn kernels(&self) -> Kernels {
        self.kernels
    }

    /// Which of the layers that have both run their fused implementation rather than the
    /// reference (default: all on CUDA, none elsewhere: [`Kernels::for_device`]).
    pub fn set_kernels(&mut self, kernels: Kernels) {
        self.kernels = kernels;
    }

    /// Hidden states after the final norm, shape (B, T, d), and when training an MoE model
    /// what its routers did.
    // `x = x + f(x)` on purpose: tch's `+=` is an in-place add, which would overwrite a
    // tensor autograd still needs for the backward pass.
    #[allow(clippy::assign_op_pattern)]
    fn hidden(
        &self,
        tokens: &Tensor,
        start_pos: i64,
        mut cache: Option<&mut KvCache>,
        train: bool,
    ) -> (Tensor, Option<Routing>) {
        let dropout = if train { self.cfg.dropout } else { 0.0 };
        let mut x =
            Tensor::embedding(&self.tok_emb, tokens, -1, false, false).to_kind(self.compute_kind);
        let t = tokens.size()[1];
        let span = Span {
            rope: &self.rope,
            start: start_pos,
            chunk_mask: (cache.is_some() && t > 1 && start_pos > 0)
                .then(|| chunk_mask(start_pos, t, self.compute_kind, tokens.device())),
            dropout,
            kernels: self.kernels,
        };
        let mut routing = Vec::new();
        for (i, block) in self.transformer_blocks.iter().enumerate() {
            let layer_cache = cache.as_deref_mut().map(|c| c.layer(i));
            let attn_in = block.attn_norm.forward(&x, self.kernels);
            x = x + block.attn.forward(&attn_in, &span, layer_cache);
            let (ffn_out, layer_routing) = block.mlp.forward(
                &block.ffn_norm.forward(&x, self.kernels),
                train,
                self.kernels,
            );
            routing.extend(layer_routing);
            x = x + ffn_out.dropout(dropout, train);
        }
        (
            self.norm.forward(&x, self.kernels),
            Routing::combine(routing),
        )
    }

    fn head(&self, hidden: &Tensor) -> Tensor {
        linear(hidden, &self.tok_emb).to_kind(Kind::Float)
    }

    /// Logits (B, T, vocab) in float32 for every position.
    pub fn forward(&self, tokens: &Tensor, train: bool) -> Tensor {
        self.forward_routed(tokens, train).0
    }

    /// Logits, and for an MoE model in training its routing: the router losses training
    /// adds ([`Routing::penalty`]) and each expert's load.
    pub fn forward_routed(&self, tokens: &Tensor, train: bool) -> (Tensor, Option<Routing>) {
        let (hidden, routing) = self.hidden(tokens, 0, None, train);
        (self.head(&hidden), routing)
    }

    /// Hidden states after the final norm (B, T, d), and for an MoE model in training its
    /// routing: what [`Self::chunked_cross_entropy`] takes instead of logits.
    pub fn hidden_routed(&self, tokens: &Tensor, train: bool) -> (Tensor, Option<Routing>) {
        self.hidden(tokens, 0, None, train)
    }

    /// [`Self::mean_cross_entropy`] of these hidden states' logits, computed through the
    /// output head a chunk of positions at a time ([`crate::chunked_loss`]).
    pub fn chunked_cross_entropy(&self, hidden: &Tensor, targets: &Tensor) -> Tensor {
        let rows = crate::chunked_loss::chunk_rows(self.cfg.vocab_size as i64, hidden.device());
        crate::chunked_loss::mean_cross_entropy(hidden, &self.tok_emb, targets, rows)
    }

    /// The output head's weight: the token embedding, tied.
    pub fn head_weight(&self) -> &Tensor {
        &self.tok_emb
    }

    /// [`Self::mean_cross_entropy`] of these hidden states' full logits: the reference that
    /// [`Self::chunked_cross_entropy`] equals.
    pub fn full_cross_entropy(&self, hidden: &Tensor, targets: &Tensor) -> Tensor {
        Self::mean_cross_entropy(&self.head(hidden), targets)
    }

    /// Mean token cross entropy over the targets that are not −1: sum(mask·CE)/sum(mask),
    /// with the count floored at 1 so an all-masked batch gives 0, never NaN.
    pub fn loss(&self, tokens: &Tensor, targets: &Tensor, train: bool) -> Tensor {
        Self::mean_cross_entropy(&self.forward(tokens, train), targets)
    }

    /// [`Self::loss`] of given logits.
    pub fn mean_cross_entropy(logits: &Tensor, targets: &Tensor) -> Tensor {
        let vocab = logits.size()[2];
        let total = logits.view([-1, vocab]).cross_entropy_loss::<Tensor>(
            &targets.view([-1]),
            None,
            tch::Reduction::Sum,
            -1,
            0.0,
        );
        total / targets.ne(-1).sum(Kind::Float).clamp_min(1.0)
    }

    /// Per-token cross entropy (B, T), 0 where the target is −1. SFT weights it by its mask.
    pub fn token_losses(&self, tokens: &Tensor, targets: &Tensor, train: bool) -> Tensor {
        Self::token_cross_entropy(&self.forward(tokens, train), targets)
    }

    /// [`Self::token_losses`] of given logits.
    pub fn token_cross_entropy(logits: &Tensor, targets: &Tensor) -> Tensor {
        let vocab = logits.size()[2];
        logits
            .view([-1, vocab])
            .cross_entropy_loss::<Tensor>(&targets.view([-1]), None, tch::Reduction::None, -1, 0.0)
            .view_as(targets)
    }

    /// One decode step of continuous batching: `tokens[i]` is the next token of the sequence
    /// in slot `i` of `cache` (all used slots, in order); returns their logits (used, vocab).
    /// Each sequence attends to its own positions only, so its logits are those it would
    /// get decoded alone.
    pub fn decode_slots(&self, tokens: &[u32], cache: &mut SlotCache) -> Tensor {
        let b = tokens.len();
        assert_eq!(b, cache.used(), "one token per used slot");
        let device = self.device();
        let positions: Vec<i64> = (0..b).map(|i| cache.len(i) as i64).collect();
        let max_len = positions.iter().max().map_or(1, |p| p + 1);
        let positions = upload(&positions, device);
        let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
        let ids = upload(&ids, device).view([b as i64, 1]);
        let logits = self.decode_rows(&ids, &positions, cache, max_len);
        cache.advance_all();
        logits
    }

    /// The decode step with shapes that depend on nothing but `ids`' row count, as a CUDA
    /// graph needs: `ids` (R, 1) and `positions` (R,) on the model's device, row `i` the
    /// token at `positions[i]` of slot `i`, every row attending over the cache's whole
    /// capacity (masked to its own positions). Rows past the used slots are padding: they
    /// write only to free slots, which [`SlotCache::admit`] overwrites. Returns the logits
    /// (R, vocab); the caller advances the used slots ([`SlotCache::advance_all`]).
    pub fn decode_static(&self, ids: &Tensor, positions: &Tensor, cache: &mut SlotCache) -> Tensor {
        let capacity = cache.capacity() as i64;
        self.decode_rows(ids, positions, cache, capacity)
    }

    /// Whether the model's work — a decode step, a prefill, a training step's forward and
    /// backward — can be captured as a CUDA graph: nothing in its forward reads a value back
    /// to the host (an MoE layer reads its expert sizes unless it runs its grouped matmul:
    /// in bf16, on rows of whole 16-byte units).
    pub fn is_capturable(&self) -> bool {
        self.transformer_blocks.iter().all(|b| match &b.mlp {
            Mlp::Dense(_) => true,
            Mlp::Sparse(moe) => !moe.reads_back_on_cuda(self.compute_kind),
        })
    }

    /// Rows of `ids` through the model at `positions`, attending to the first `keys`
    /// positions of their slots.
    #[allow(clippy::assign_op_pattern)]
    fn decode_rows(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        cache: &mut SlotCache,
        keys: i64,
    ) -> Tensor {
        let step = DecodeRows::new(&self.rope, positions, keys, self.compute_kind, self.kernels);
        let mut x =
            Tensor::embedding(&self.tok_emb, ids, -1, false, false).to_kind(self.compute_kind);
        for (i, block) in self.transformer_blocks.iter().enumerate() {
            let attn_in = block.attn_norm.forward(&x, self.kernels);
            let attn = block.attn.forward_slots(&attn_in, &step, cache.layer(i));
            x = x + attn;
            let (ffn_out, _) = block.mlp.forward(
                &block.ffn_norm.forward(&x, self.kernels),
                false,
                self.kernels,
            );
            x = x + ffn_out;
        }
        self.head(&self.norm.forward(&x, self.kernels).select(1, 0))
    }

    /// Prefills several prompts in one forward: right-padded into one (P, L) batch written
    /// to `cache` (P rows, empty, holding at least L positions), returning the logits
    /// (P, vocab) at each prompt's last token. Padding comes after a prompt's tokens, so
    /// under causal attention no real position sees it: row `p`'s logits, and its keys and
    /// values at positions `0..prompts[p].len()`, are those of the prompt run alone.
    ///
    /// # Panics
    /// If a prompt is empty or `cache` is not empty.
    pub fn prefill_rows(&self, prompts: &[&[u32]], cache: &mut KvCache) -> Tensor {
        assert!(cache.is_empty(), "prefill_rows starts from an empty cache");
        let longest = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
        let mut ids = vec![0i64; prompts.len() * longest];
        for (row, prompt) in ids.chunks_mut(longest.max(1)).zip(prompts) {
            assert!(!prompt.is_empty(), "an empty prompt has no next token");
            for (id, &t) in row.iter_mut().zip(prompt.iter()) {
                *id = t as i64;
            }
        }
        let device = self.device();
        let tokens = upload(&ids, device).view([prompts.len() as i64, longest as i64]);
        let last: Vec<i64> = prompts.iter().map(|p| p.len() as i64 - 1).collect();
        self.prefill_static(&tokens, &upload(&last, device), cache)
    }

    /// [`Self::prefill_rows`] on tensors, with shapes that depend on `ids` alone, as a CUDA
    /// graph needs: `ids` (P, L) right-padded prompts and `last` (P,) the position of each
    /// one's last token, on the model's device. `cache` (P rows, at least L positions) is
    /// emptied first and holds L positions after (past a prompt's end, its padding's).
    /// Returns the logits (P, vocab) at `last`.
    pub fn prefill_static(&self, ids: &Tensor, last: &Tensor, cache: &mut KvCache) -> Tensor {
        self.prefill_from(ids, 0, last, cache)
    }

    /// [`Self::prefill_static`] of a chunk of a longer prompt: `ids` (P, L) at positions
    /// `start..start + L`, attending to the `start` positions `cache` already holds and to
    /// themselves; `last` (P,) indexes the chunk. `cache` needs `start + L` positions and
    /// holds that many after (past a prompt's end, its padding's). Every shape and the mask
    /// depend on `start` and the shapes alone, so one CUDA graph per chunk start serves
    /// every prompt.
    pub fn prefill_from(
        &self,
        ids: &Tensor,
        start: usize,
        last: &Tensor,
        cache: &mut KvCache,
    ) -> Tensor {
        cache.set_filled(start);
        let (hidden, _) = self.hidden(ids, start as i64, Some(cache), false);
        cache.advance(ids.size()[1] as usize);
        let d = hidden.size()[2];
        let last = last.view([-1, 1, 1]).expand([-1, 1, d], false);
        self.head(&hidden.gather(1, &last, false).squeeze_dim(1))
    }

    /// Runs `tokens` (B, T) at positions `cache.len()..` through the model, extending the
    /// cache, and returns the logits (B, vocab) of the last position.
    pub fn forward_cached(&self, tokens: &Tensor, cache: &mut KvCache) -> Tensor {
        let start = cache.len() as i64;
        let t = tokens.size()[1];
        let (hidden, _) = self.hidden(tokens, start, Some(cache), false);
        cache.advance(t as usize);
        self.head(&hidden.select(1, t - 1))
    }
}
