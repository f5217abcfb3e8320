//! Next-token cross-entropy through the tied output head, a chunk of positions at a time:
//! the (positions × vocab) float32 logits of a whole batch are never held at once.
//!
//! The unfused path ([`crate::LilLM::mean_cross_entropy`] of the full logits) keeps the
//! logits, their softmax and their gradient alive for the backward pass: at the seed's
//! shape (128 × 512 positions, vocab 6,400) that is 1.7 GB per copy. Here each chunk's
//! logits are computed, turned into that chunk's loss and its gradients with respect to the
//! hidden states and the head's weight (softmax minus the one-hot target, times the count's
//! reciprocal), and dropped. The loss returned carries those gradients through a surrogate
//! that is linear in the hidden states and the weight, so autograd hands the rest of the
//! model exactly these gradients. The arithmetic is the unfused path's (three matmuls per
//! chunk: the logits, then the two gradients); only what is kept differs.
//!
//! A chunk's pass over its logits is memory-bound on a GPU, so it makes few full passes:
//! to float32 (libtorch's log-softmax casts a bf16 input first), the log-softmax, the
//! exponential in place, and back to the compute kind for the matmuls. Everything per row
//! (the picked target, the rows that carry no loss) is applied to (rows × 1) or (rows × d)
//! tensors instead.

use tch::{Device, Kind, Tensor};

/// Float32 logits held at once on a GPU, in bytes: a few hundred MiB keeps the matmuls large.
const GPU_CHUNK_LOGIT_BYTES: i64 = 256 << 20;

/// On a CPU, a chunk whose passes stay in the processor's caches instead of memory: at
/// `make bench`'s training shape (2,048 positions, vocabulary 4,096) chunks of 4 or 16 MiB
/// trained about 10% faster than the whole micro-batch's logits (32 MiB); at d_model 512
/// and vocabulary 8,192, 16 MiB chunks were faster than 4 MiB ones (their matmuls larger).
const CPU_CHUNK_LOGIT_BYTES: i64 = 16 << 20;

/// Rows per chunk for a vocabulary of `vocab` tokens on `device`.
pub fn chunk_rows(vocab: i64, device: Device) -> i64 {
    let bytes = match device {
        Device::Cuda(_) => GPU_CHUNK_LOGIT_BYTES,
        _ => CPU_CHUNK_LOGIT_BYTES,
    };
    (bytes / (vocab.max(1) * 4)).max(1)
}

/// Mean cross-entropy of `hidden` (…, d) through the head `weight` (vocab, d) against
/// `targets` (…), over the targets that are not −1 (their count floored at 1), computed
/// `rows` positions at a time. Equal to the unfused loss of `hidden · weightᵀ`, with the
/// same gradients, when `hidden` requires grad (in training it always does: it depends on
/// the head's weight through the tied embedding; evaluation computes it under no-grad).
pub fn mean_cross_entropy(hidden: &Tensor, weight: &Tensor, targets: &Tensor, rows: i64) -> Tensor {
    let d = *hidden
        .size()
        .last()
        .expect("hidden states have a feature dimension");
    let h = hidden.reshape([-1, d]);
    let y = targets.reshape([-1]);
    let recording = hidden.requires_grad();
    let count = y.ne(-1).sum(Kind::Float).clamp_min(1.0);
    let (hd, wd) = (h.detach(), weight.detach().to_kind(h.kind()));
    let positions = h.size()[0];
    let total = Tensor::zeros([], (Kind::Float, h.device()));
    let grad_h = recording.then(|| hd.zeros_like());
    let grad_w = recording.then(|| Tensor::zeros(weight.size(), (Kind::Float, h.device())));
    tch::no_grad(|| {
        let mut start = 0;
        while start < positions {
            let len = rows.min(positions - start);
            let (hc, yc) = (hd.narrow(0, start, len), y.narrow(0, start, len));
            // The logits in the compute kind, as the unfused head computes them.
            let mut log_p = hc.matmul(&wd.tr()).log_softmax(1, Kind::Float);
            let counted = yc.ne(-1).unsqueeze(1);
            let target = yc.clamp_min(0).unsqueeze(1);
            let picked = log_p.gather(1, &target, false);
            let mut sum = total.shallow_clone();
            sum -= (picked * &counted).sum(Kind::Float);
            if let (Some(grad_h), Some(grad_w)) = (&grad_h, &grad_w) {
                // d loss_sum / d logits = softmax − one-hot(target) on counted rows, zero on
                // the others: the mask multiplies the (rows × d) factors instead.
                let mut p = log_p.exp_();
                let minus_one = Tensor::full(target.size(), -1.0, (Kind::Float, p.device()));
                let _ = p.scatter_add_(1, &target, &minus_one);
                // Both products in the compute kind, as the unfused backward computes them.
                let p = p.to_kind(hd.kind());
                let counted = counted.to_kind(hd.kind());
                let mut gh = grad_h.narrow(0, start, len);
                gh.copy_(&(p.matmul(&wd) * &counted));
                let mut gw = grad_w.shallow_clone();
                gw += p.tr().matmul(&(hc * counted)).to_kind(Kind::Float);
            }
            start += len;
        }
    });
    let loss = total / &count;
    let (Some(grad_h), Some(grad_w)) = (grad_h, grad_w) else {
        return loss;
    };
    // value: `loss`; gradient: grad_h / count for the hidden states, grad_w / count for the
    // weight (each product's own value is subtracted again, so only its gradient remains).
    let linear = (&h * &grad_h).sum(Kind::Float)
        + (weight * &grad_w.to_kind(weight.kind())).sum(Kind::Float);
    loss + (&linear - linear.detach()) / count
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// The reference: the model's loss of the full logits (computed in the inputs' kind,
    /// taken in float32, as the model's head does).
    fn unfused(hidden: &Tensor, weight: &Tensor, targets: &Tensor) -> Tensor {
        let logits = hidden.matmul(&weight.tr()).to_kind(Kind::Float);
        crate::LilLM::mean_cross_entropy(&logits, targets)
    }

    /// (loss, d loss / d hidden, d loss / d weight) of `f`.
    fn with_grads(
        f: impl Fn(&Tensor, &Tensor) -> Tensor,
        hidden: &Tensor,
        weight: &Tensor,
    ) -> (f64, Tensor, Tensor) {
        let h = hidden.detach().set_requires_grad(true);
        let w = weight.detach().set_requires_grad(true);
        // A downstream scale, as gradient accumulation applies.
        let loss = f(&h, &w);
        (loss.shallow_clone() * 0.5).backward();
        (loss.double_value(&[]), h.grad(), w.grad())
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    fn case(seed: i64) -> (Tensor, Tensor, Tensor) {
        tch::manual_seed(seed);
        let hidden = Tensor::randn([3, 7, 16], (Kind::Float, Device::Cpu));
        let weight = Tensor::randn([50, 16], (Kind::Float, Device::Cpu)) * 0.3;
        let targets = Tensor::randint(50, [3, 7], (Kind::Int64, Device::Cpu));
        // Some positions carry no loss (SFT's prompt tokens, padding).
        let _ = targets.narrow(1, 0, 2).fill_(-1);
        (hidden, weight, targets)
    }

    #[test]
    fn chunks_of_any_size_give_the_unfused_loss_and_gradients() {
        let (hidden, weight, targets) = case(1);
        let (loss, gh, gw) = with_grads(|h, w| unfused(h, w, &targets), &hidden, &weight);
        for rows in [1, 4, 21, 1000] {
            let (c_loss, c_gh, c_gw) = with_grads(
                |h, w| mean_cross_entropy(h, w, &targets, rows),
                &hidden,
                &weight,
            );
            assert!(
                (loss - c_loss).abs() < 1e-5,
                "rows {rows}: {loss} vs {c_loss}"
            );
            assert!(max_diff(&gh, &c_gh) < 1e-6, "rows {rows}: d/dhidden");
            assert!(max_diff(&gw, &c_gw) < 1e-6, "rows {rows}: d/dweight");
        }
    }

    #[test]
    fn in_bfloat16_it_gives_the_unfused_loss_and_gradients_to_its_rounding() {
        let (hidden, weight, targets) = case(3);
        let (hidden, weight) = (
            hidden.to_kind(Kind::BFloat16),
            weight.to_kind(Kind::BFloat16),
        );
        let (loss, gh, gw) = with_grads(|h, w| unfused(h, w, &targets), &hidden, &weight);
        let (c_loss, c_gh, c_gw) = with_grads(
            |h, w| mean_cross_entropy(h, w, &targets, 4),
            &hidden,
            &weight,
        );
        assert!(
            (loss - c_loss).abs() < 1e-5 * loss.abs(),
            "{loss} vs {c_loss}"
        );
        // Gradients of bf16 tensors, rounded at other points than the unfused backward rounds
        // them (the softmax, each product, the scale): within four roundings (2^-8 each) of
        // their largest (leaving out the mask fails this test and the float32 one).
        let relative = |a: &Tensor, b: &Tensor| {
            max_diff(&a.to_kind(Kind::Float), &b.to_kind(Kind::Float))
                / a.to_kind(Kind::Float).abs().max().double_value(&[])
        };
        assert!(
            relative(&gh, &c_gh) < 4.0 / 256.0,
            "d/dhidden: {}",
            relative(&gh, &c_gh)
        );
        assert!(
            relative(&gw, &c_gw) < 4.0 / 256.0,
            "d/dweight: {}",
            relative(&gw, &c_gw)
        );
    }

    #[test]
    fn without_autograd_it_is_the_loss_alone_and_all_masked_is_zero() {
        let (hidden, weight, targets) = case(2);
        let plain = tch::no_grad(|| mean_cross_entropy(&hidden, &weight, &targets, 5));
        assert!(!plain.requires_grad());
        let expected = unfused(&hidden, &weight, &targets).double_value(&[]);
        assert!((plain.double_value(&[]) - expected).abs() < 1e-5);
        let none = targets.full_like(-1);
        let zero = mean_cross_entropy(&hidden, &weight, &none, 5).double_value(&[]);
        assert_eq!(zero, 0.0);
    }

    #[test]
    fn the_chunk_holds_a_bounded_number_of_logits() {
        let cuda = Device::Cuda(0);
        assert_eq!(chunk_rows(6400, cuda), (256 << 20) / (6400 * 4));
        assert_eq!(chunk_rows(4096, Device::Cpu), 1024);
        assert_eq!(chunk_rows(1 << 40, cuda), 1);
    }
}
