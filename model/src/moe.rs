//! The sparse feed-forward of a Mixture-of-Experts layer, as Mixtral defines it: router
//! linear → softmax → top-k → renormalised gates → SwiGLU experts, plus an optional shared
//! expert every token goes through.
//!
//! Compute follows the active parameters: the (token, expert) assignments are sorted by
//! expert, each expert runs on its contiguous slice of tokens (on CUDA in bf16 all of them
//! in one grouped matmul per projection, elsewhere one matmul each), and the gated outputs
//! are added back to their tokens (`index_add`). No expert sees a token it was not chosen
//! for. Expert weights are stacked, (experts, out, in), so an expert that got no token
//! still has a (zero) gradient that data-parallel ranks can average.

use tch::{nn, Kind, Tensor};

use crate::fused::Kernels;
use crate::lillm::{linear, normal_weight, FeedForward, Start};
use crate::ModelConfig;

/// One sparse layer's parameters (named `router.weight`, `experts.w1` …, `shared.w1.weight`).
#[derive(Debug)]
pub(crate) struct Moe {
    router: Tensor,
    /// Gate projections, (experts, hidden, d).
    w1: Tensor,
    /// Down projections, (experts, d, hidden).
    w2: Tensor,
    /// Up projections, (experts, hidden, d).
    w3: Tensor,
    shared: Option<FeedForward>,
    top_k: i64,
}

/// What one layer's router did with a batch, for the training losses and the load metrics.
pub(crate) struct LayerRouting {
    /// Switch/Mixtral load-balancing loss E·Σ_e f_e·P_e (f_e: share of the tokens sent to
    /// e, summing to k; P_e: mean router probability of e); k when perfectly balanced.
    aux: Tensor,
    /// mean(logsumexp(router logits)²).
    z: Tensor,
    /// Share of the (token, slot) assignments each expert got, (experts,), summing to 1.
    load: Tensor,
}

/// The routing of a whole forward pass: the MoE layers' losses averaged, their loads stacked.
#[derive(Debug)]
pub struct Routing {
    /// Mean over sparse layers of the load-balancing loss (k when balanced).
    pub aux_loss: Tensor,
    /// Mean over sparse layers of the router z-loss.
    pub z_loss: Tensor,
    /// (sparse layers, experts): each expert's share of its layer's assignments.
    pub load: Tensor,
}

impl Routing {
    pub(crate) fn combine(layers: Vec<LayerRouting>) -> Option<Self> {
        if layers.is_empty() {
            return None;
        }
        let (aux, z, load): (Vec<_>, Vec<_>, Vec<_>) =
            layers.into_iter().map(|l| (l.aux, l.z, l.load)).collect();
        Some(Self {
            aux_loss: Tensor::stack(&aux, 0).mean(Kind::Float),
            z_loss: Tensor::stack(&z, 0).mean(Kind::Float),
            load: Tensor::stack(&load, 0),
        })
    }

    /// What training adds to the loss: the weighted aux and z losses.
    pub fn penalty(&self, cfg: &ModelConfig) -> Tensor {
        let moe = cfg.moe.as_ref().expect("routing comes from an MoE model");
        &self.aux_loss * moe.aux_loss_coef + &self.z_loss * moe.z_loss_coef
    }
}

impl Moe {
    pub(crate) fn new(vs: nn::Path, cfg: &ModelConfig, start: Start) -> Self {
        let moe = cfg.moe.as_ref().expect("a sparse layer of an MoE config");
        let (d, h, e) = (
            cfg.d_model as i64,
            cfg.expert_hidden_dim() as i64,
            moe.experts as i64,
        );
        let init = |std: f64| match start {
            Start::Random => nn::Init::Randn {
                mean: 0.0,
                stdev: std,
            },
            Start::ToLoad => nn::Init::Const(0.0),
        };
        let d_std = (d as f64).powf(-0.5);
        let std_out = 0.02 / (2.0 * cfg.n_layers as f64).sqrt();
        let experts = &vs / "experts";
        Self {
            // Small router weights start near-uniform routing (Mixtral's initializer_range).
            router: normal_weight(
                &(&vs / "router"),
                "weight",
                (moe.experts, cfg.d_model),
                0.02,
                start,
            ),
            w1: experts.var("w1", &[e, h, d], init(d_std)),
            w2: experts.var("w2", &[e, d, h], init(std_out)),
            w3: experts.var("w3", &[e, h, d], init(d_std)),
            shared: moe.shared_expert.then(|| {
                FeedForward::with_hidden(&vs / "shared", cfg, cfg.expert_hidden_dim(), start)
            }),
            top_k: moe.experts_per_token as i64,
        }
    }

    /// x (B, T, d) → (B, T, d); the layer's routing too when `with_routing` (training).
    pub(crate) fn forward(&self, x: &Tensor, with_routing: bool) -> (Tensor, Option<LayerRouting>) {
        let (b, t, d) = x.size3().expect("moe input is 3-d");
        let flat = x.view([b * t, d]);
        let logits = linear(&flat, &self.router);
        let probs = logits.to_kind(Kind::Float).softmax(-1, Kind::Float);
        let (top_p, top_i) = probs.topk(self.top_k, -1, true, true);
        let gates = &top_p / top_p.sum_dim_intlist(-1, true, Kind::Float);
        let (routed, counts) = self.experts(&flat, &top_i, &gates);
        let out = match &self.shared {
            Some(shared) => routed + shared.forward(&flat, Kernels::REFERENCE),
            None => routed,
        };
        let routing = with_routing.then(|| {
            let tokens = (b * t) as f64;
            let experts = self.router.size()[0] as f64;
            let counts = counts.to_kind(Kind::Float);
            let share = &counts / tokens;
            let aux = (share * probs.mean_dim(0, false, Kind::Float)).sum(Kind::Float) * experts;
            let z = logits
                .to_kind(Kind::Float)
                .logsumexp(-1, false)
                .square()
                .mean(Kind::Float);
            LayerRouting {
                aux,
                z,
                load: counts / (tokens * self.top_k as f64),
            }
        });
        (out.view([b, t, d]), routing)
    }

    /// Σ over each token's chosen experts of gate × expert(token), (N, d), computed per
    /// expert on the tokens routed to it; also the tokens per expert, (experts,).
    ///
    /// On CUDA in bf16 nothing here reads a value back to the host, so the layer neither
    /// waits for the GPU nor stops a CUDA graph's capture: the expert sizes stay on the
    /// device as the offsets of one grouped matmul per projection (`_grouped_mm`). Elsewhere
    /// (and for shapes it cannot take) the experts run as a loop of matmuls, its reference.
    fn experts(&self, x: &Tensor, top_i: &Tensor, gates: &Tensor) -> (Tensor, Tensor) {
        let grouped_mm = x.device().is_cuda() && !self.reads_back_on_cuda(x.kind());
        self.experts_with(x, top_i, gates, grouped_mm)
    }

    fn experts_with(
        &self,
        x: &Tensor,
        top_i: &Tensor,
        gates: &Tensor,
        grouped_mm: bool,
    ) -> (Tensor, Tensor) {
        let routed = Routed::new(top_i, self.router.size()[0], self.top_k);
        let grouped = x.index_select(0, &routed.token);
        let outputs = if grouped_mm {
            let offsets = routed.counts.cumsum(0, Kind::Int);
            let project = |x: &Tensor, w: &Tensor| {
                x.internal_grouped_mm(
                    &w.to_kind(x.kind()).transpose(1, 2),
                    Some(&offsets),
                    None::<&Tensor>,
                    None,
                )
            };
            let hidden = project(&grouped, &self.w1).silu() * project(&grouped, &self.w3);
            project(&hidden, &self.w2)
        } else {
            self.experts_looped(&grouped, &routed.counts)
        };
        (routed.combine(x, &outputs, gates), routed.counts)
    }

    /// The experts as one matmul each on its slice of `grouped` (sorted by expert); reads
    /// the expert sizes back to the host.
    fn experts_looped(&self, grouped: &Tensor, counts: &Tensor) -> Tensor {
        let sizes = Vec::<i64>::try_from(&counts.to_device(tch::Device::Cpu))
            .expect("expert counts are integers");
        let (w1, w2, w3) = (self.w1.unbind(0), self.w2.unbind(0), self.w3.unbind(0));
        let mut outputs = Vec::new();
        let mut start = 0;
        for (e, &size) in sizes.iter().enumerate() {
            if size == 0 {
                continue;
            }
            let tokens = grouped.narrow(0, start, size);
            let hidden = linear(&tokens, &w1[e]).silu() * linear(&tokens, &w3[e]);
            outputs.push(linear(&hidden, &w2[e]));
            start += size;
        }
        Tensor::cat(&outputs, 0)
    }

    /// Whether the forward in `kind` on CUDA reads the expert sizes back to the host, which
    /// a CUDA graph cannot capture: the grouped matmul runs in bf16 only (libtorch's kernel
    /// for Hopper; its other paths read the offsets back themselves) and on rows of whole
    /// 16-byte units.
    pub(crate) fn reads_back_on_cuda(&self, kind: Kind) -> bool {
        kind != Kind::BFloat16 || !grouped_mm_fits(kind, &self.w1)
    }

    /// The same layer computed densely — every expert on every token, weighted by the
    /// top-k gates (zero for the experts a token did not choose) — as a reference.
    #[cfg(test)]
    // `x = x + f(x)`: tch's `+=` is in place, which autograd may not allow.
    #[allow(clippy::assign_op_pattern)]
    pub(crate) fn forward_dense(&self, x: &Tensor) -> Tensor {
        let (b, t, d) = x.size3().expect("moe input is 3-d");
        let flat = x.view([b * t, d]);
        let probs = linear(&flat, &self.router).softmax(-1, Kind::Float);
        let (top_p, top_i) = probs.topk(self.top_k, -1, true, true);
        let gates = &top_p / top_p.sum_dim_intlist(-1, true, Kind::Float);
        let dense_gates = probs.zeros_like().scatter(1, &top_i, &gates);
        let mut out = flat.zeros_like();
        for e in 0..self.router.size()[0] {
            let hidden = linear(&flat, &self.w1.get(e)).silu() * linear(&flat, &self.w3.get(e));
            let y = linear(&hidden, &self.w2.get(e));
            out = out + y * dense_gates.select(1, e).unsqueeze(1);
        }
        if let Some(shared) = &self.shared {
            out = out + shared.forward(&flat, Kernels::REFERENCE);
        }
        out.view([b, t, d])
    }
}

/// The (token, expert) assignments of a batch sorted by expert.
struct Routed {
    /// Assignment order: `order[j]` is the flat (token·k + slot) index of the j-th
    /// assignment in expert order (stable, so each expert's tokens stay in order).
    order: Tensor,
    /// The token of each sorted assignment.
    token: Tensor,
    /// Assignments per expert, (experts,), int64.
    counts: Tensor,
}

impl Routed {
    fn new(top_i: &Tensor, experts: i64, top_k: i64) -> Self {
        let assigned = top_i.view([-1]);
        let order = assigned.argsort_stable(true, 0, false);
        let token = order.floor_divide_scalar(top_k);
        // A scatter, not `bincount`, which reads the largest id back to the host on CUDA.
        let counts = Tensor::zeros([experts], (Kind::Int64, assigned.device())).scatter_add(
            0,
            &assigned,
            &assigned.ones_like(),
        );
        Self {
            order,
            token,
            counts,
        }
    }

    /// Adds each sorted assignment's expert output, scaled by its gate, to its token.
    fn combine(&self, x: &Tensor, outputs: &Tensor, gates: &Tensor) -> Tensor {
        let weights = gates
            .view([-1])
            .index_select(0, &self.order)
            .to_kind(outputs.kind())
            .unsqueeze(1);
        x.zeros_like()
            .index_add(0, &self.token, &(outputs * weights))
    }
}

/// Whether `_grouped_mm` takes these operands: it needs rows of whole 16-byte units
/// (d_model and the expert hidden size a multiple of 8 in bf16, of 4 in float32).
fn grouped_mm_fits(kind: Kind, w1: &Tensor) -> bool {
    let (_, h, d) = w1.size3().expect("stacked expert weights are 3-d");
    let bytes = kind.elt_size_in_bytes() as i64;
    (d * bytes) % 16 == 0 && (h * bytes) % 16 == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MoeConfig;

    fn layer(shared: bool) -> (nn::VarStore, Moe) {
        tch::manual_seed(7);
        let mut cfg = ModelConfig::preset("tiny").unwrap();
        cfg.d_model = 32;
        let mut moe = MoeConfig::new(6, 2, Some(24));
        moe.shared_expert = shared;
        cfg.moe = Some(moe);
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let layer = Moe::new(vs.root(), &cfg, Start::Random);
        // Larger router weights than the init, so the routing is far from uniform.
        let _ = tch::no_grad(|| layer.router.shallow_clone().normal_(0.0, 1.0));
        (vs, layer)
    }

    fn grads(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
        let mut out: Vec<_> = vs
            .variables()
            .into_iter()
            .map(|(n, v)| (n, v.grad().copy()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        vs.variables()
            .values()
            .for_each(|v| v.shallow_clone().zero_grad());
        out
    }

    #[test]
    fn grouped_experts_equal_the_dense_reference_forward_and_backward() {
        for shared in [false, true] {
            let (vs, layer) = layer(shared);
            // 3 tokens × top-2 of 6 experts: at least one expert gets no token.
            let x = Tensor::randn([1, 3, 32], (Kind::Float, tch::Device::Cpu));
            let (sparse, routing) = layer.forward(&x, true);
            let load = routing.unwrap().load;
            assert!(
                Vec::<f32>::try_from(&load).unwrap().contains(&0.0),
                "some expert is idle: {load:?}"
            );
            let weight = Tensor::randn([1, 3, 32], (Kind::Float, tch::Device::Cpu));
            (&sparse * &weight).sum(Kind::Float).backward();
            let sparse_grads = grads(&vs);
            let dense = layer.forward_dense(&x);
            (&dense * &weight).sum(Kind::Float).backward();
            let dense_grads = grads(&vs);
            let diff = (&sparse - &dense).abs().max().double_value(&[]);
            assert!(diff < 1e-5, "forward differs by {diff}");
            for ((name, a), (_, b)) in sparse_grads.iter().zip(&dense_grads) {
                let diff = (a - b).abs().max().double_value(&[]);
                assert!(diff < 1e-5, "gradient of {name} differs by {diff}");
            }
            // The idle experts' slices have a defined, zero gradient.
            let w1 = sparse_grads
                .iter()
                .find(|(n, _)| n == "experts.w1")
                .unwrap();
            assert!(w1.1.defined());
        }
    }

    #[test]
    fn the_grouped_matmul_equals_a_matmul_per_expert() {
        let (vs, layer) = layer(false);
        let x = Tensor::randn([2, 7, 32], (Kind::Float, tch::Device::Cpu));
        let flat = x.view([14, 32]);
        // The routing is computed afresh for each path: each backward frees its graph.
        let route = || {
            let probs = linear(&flat, &layer.router).softmax(-1, Kind::Float);
            let (top_p, top_i) = probs.topk(layer.top_k, -1, true, true);
            (top_i, &top_p / top_p.sum_dim_intlist(-1, true, Kind::Float))
        };
        assert!(grouped_mm_fits(Kind::Float, &layer.w1));
        let weight = Tensor::randn([14, 32], (Kind::Float, tch::Device::Cpu));
        let (top_i, gates) = route();
        let (grouped, _) = layer.experts_with(&flat, &top_i, &gates, true);
        (&grouped * &weight).sum(Kind::Float).backward();
        let grouped_grads = grads(&vs);
        let (top_i, gates) = route();
        let (looped, _) = layer.experts_with(&flat, &top_i, &gates, false);
        (&looped * &weight).sum(Kind::Float).backward();
        // Equal to float32 rounding: the two sum each dot product in their own order.
        let diff = (&grouped - &looped).abs().max().double_value(&[]);
        assert!(diff < 1e-6, "the outputs differ by {diff}");
        for ((name, a), (_, b)) in grouped_grads.iter().zip(&grads(&vs)) {
            let diff = (a - b).abs().max().double_value(&[]);
            assert!(diff < 1e-6, "the gradients of {name} differ by {diff}");
        }
    }

    #[test]
    fn the_grouped_matmul_takes_rows_of_whole_16_byte_units_only() {
        let w1 = Tensor::zeros([4, 24, 30], (Kind::Float, tch::Device::Cpu));
        // 30 bf16 = 60 bytes a row.
        assert!(!grouped_mm_fits(Kind::BFloat16, &w1));
        let w1 = Tensor::zeros([4, 24, 32], (Kind::Float, tch::Device::Cpu));
        assert!(grouped_mm_fits(Kind::BFloat16, &w1));
        let w1 = Tensor::zeros([4, 20, 32], (Kind::Float, tch::Device::Cpu));
        // 20 float32 = 80 bytes, 20 bf16 = 40.
        assert!(grouped_mm_fits(Kind::Float, &w1));
        assert!(!grouped_mm_fits(Kind::BFloat16, &w1));
    }

    #[test]
    fn balanced_routing_scores_k_and_the_loads_sum_to_one() {
        let (_vs, layer) = layer(false);
        let _ = tch::no_grad(|| layer.router.shallow_clone().zero_());
        let x = Tensor::randn([2, 5, 32], (Kind::Float, tch::Device::Cpu));
        let (_, routing) = layer.forward(&x, true);
        let routing = routing.unwrap();
        let load_sum = routing.load.sum(Kind::Float).double_value(&[]);
        assert!((load_sum - 1.0).abs() < 1e-6);
        // A zero router: uniform probabilities, so E·Σ f_e·(1/E) = Σ f_e = k exactly.
        let aux = routing.aux.double_value(&[]);
        assert!((aux - 2.0).abs() < 1e-6, "aux {aux}");
        // logsumexp of 6 zeros is ln 6.
        let z = routing.z.double_value(&[]);
        assert!((z - 6f64.ln().powi(2)).abs() < 1e-5, "z {z}");
    }
}
