//! Projections of one input joined into one matrix, for inference: a layer's q, k and v,
//! and its feed-forward's gate and up. A decode step multiplies a handful of rows by each
//! matrix; on a GPU each of those small products is a kernel of its own, so one product
//! where there were three (two) saves a few kernels a layer, every token. Each output
//! column is the same dot product as before.
//!
//! The named weights become views of the joined matrix (`wq` its first rows, and so on): no
//! memory is added, and a change made in place to either is seen by both.

use tch::Tensor;

use crate::lillm::linear;
use crate::lora::Weight;

#[derive(Debug)]
pub(crate) struct Joined {
    /// The parts' rows one after another: (sum of their outputs, in).
    weight: Tensor,
    /// Each part's rows.
    sizes: Vec<i64>,
}

impl Joined {
    /// Joins `parts`, which must share their input and carry no adapter (an adapter adds
    /// to its part alone); `None` when one carries one.
    pub(crate) fn join(parts: &mut [&mut Weight]) -> Option<Self> {
        if parts.iter().any(|w| !w.is_plain()) {
            return None;
        }
        let _guard = tch::no_grad_guard();
        let weight = Tensor::cat(&parts.iter().map(|w| &w.base).collect::<Vec<_>>(), 0);
        let sizes: Vec<i64> = parts.iter().map(|w| w.base.size()[0]).collect();
        let mut start = 0;
        for (part, &rows) in parts.iter_mut().zip(&sizes) {
            part.base.set_data(&weight.narrow(0, start, rows));
            start += rows;
        }
        Some(Self { weight, sizes })
    }

    /// The parts' outputs for `x` (…, in) side by side: (…, sum of their outputs).
    pub(crate) fn product(&self, x: &Tensor) -> Tensor {
        linear(x, &self.weight)
    }

    /// Each part's output for `x` (…, in), from one product: views of its columns.
    pub(crate) fn apply(&self, x: &Tensor) -> Vec<Tensor> {
        self.product(x).split_with_sizes(&self.sizes, -1)
    }
}
