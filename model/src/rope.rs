//! Rotary position embedding (adjacent pairs, Meta-style), in its reference and its fused
//! form ([`Kernels`]).
//!
//! The reference rotates in four element-wise kernels on float32 (plus a cast each way): a
//! pair (a, b) becomes x·cos + swap(x)·sin = (a·cos − b·sin, b·cos + a·sin), bit for bit the
//! rotation of the two halves computed apart. On q and k of a bf16 batch that is about a
//! dozen passes over float32 activations forward and as many backward: for lillm-39m at
//! 128 × 512, by arithmetic, more memory traffic than any other element-wise layer. The
//! fused form (`lillm_cuda::kernels::rope`) reads each pair once, computes in float32 as the
//! reference does and rounds once; its backward needs only the tables.

use std::sync::OnceLock;

use tch::{Device, Kind, Tensor};

use crate::fused::{agrees_with_reference, checked_once, Kernels};
use crate::ModelConfig;

/// The rotation's tables, float32, on the model's device. The fused kernel reads one value
/// per pair: every other column of these (views, no copy).
#[derive(Debug)]
pub(crate) struct Rope {
    /// (positions, head_dim): each pair's cosine twice.
    cos: Tensor,
    /// (positions, head_dim): each pair's (−sin, sin).
    sin: Tensor,
}

impl Rope {
    pub(crate) fn new(cfg: &ModelConfig, device: Device) -> Self {
        let hd = cfg.head_dim() as i64;
        let opts = (Kind::Float, device);
        let exponents = Tensor::arange_start_step(0, hd, 2, opts) / hd as f64;
        let inv_freq = Tensor::from(cfg.rope_theta as f32)
            .to_device(device)
            .pow(&exponents)
            .reciprocal();
        let positions = Tensor::arange(cfg.max_seq_len as i64, opts);
        let angles = positions.outer(&inv_freq);
        Self::from_pair_tables(angles.cos(), angles.sin())
    }

    fn from_pair_tables(pair_cos: Tensor, pair_sin: Tensor) -> Self {
        let (positions, pairs) = pair_cos.size2().expect("rope tables are 2-d");
        let interleave = |first: &Tensor, second: &Tensor| {
            Tensor::stack(&[first, second], 2).view([positions, 2 * pairs])
        };
        Self {
            cos: interleave(&pair_cos, &pair_cos),
            sin: interleave(&pair_sin.neg(), &pair_sin),
        }
    }

    /// Column `which` of each pair of `table`: (positions, head_dim / 2), a view.
    fn per_pair(table: &Tensor, which: i64) -> Tensor {
        let (positions, hd) = table.size2().expect("rope tables are 2-d");
        table.view([positions, hd / 2, 2]).select(2, which)
    }

    /// Rotates `x` of shape (B, T, H, hd) whose first position is `start_pos`.
    pub(crate) fn apply(&self, x: &Tensor, start_pos: i64, kernels: Kernels) -> Tensor {
        let fused = kernels.rope && fused_rope_in_use(x.device());
        self.rotate(x, start_pos, fused)
            .unwrap_or_else(|e| panic!("{e} (it passed its check at start)"))
    }

    /// The angles of a decode step whose row `i` is at position `positions[i]`, for every
    /// layer's q and k ([`RowAngles::apply`]).
    pub(crate) fn at_rows(&self, positions: &Tensor, kernels: Kernels) -> RowAngles {
        self.angles_at(
            positions,
            kernels.rope && fused_rope_in_use(positions.device()),
        )
    }

    fn angles_at(&self, positions: &Tensor, fused: bool) -> RowAngles {
        let (cos, sin) = self.tables(fused);
        RowAngles {
            cos: cos.index_select(0, positions),
            sin: sin.index_select(0, positions),
            fused,
        }
    }

    /// The tables a rotation reads: each pair's cosine and sine for the fused kernel (views),
    /// the whole (positions, head_dim) tables for the reference.
    fn tables(&self, fused: bool) -> (Tensor, Tensor) {
        match fused {
            // The sine is the second of each pair's (−sin, sin).
            true => (Self::per_pair(&self.cos, 0), Self::per_pair(&self.sin, 1)),
            false => (self.cos.shallow_clone(), self.sin.shallow_clone()),
        }
    }

    /// `x` (B, T, H, hd) from position `start` rotated, by the fused kernel or the reference.
    fn rotate(&self, x: &Tensor, start: i64, fused: bool) -> lillm_cuda::Result<Tensor> {
        let t = x.size()[1];
        let (cos, sin) = self.tables(fused);
        let rows = |table: &Tensor| table.narrow(0, start, t).view([1, t, 1, -1]);
        rotate_by(x, &rows(&cos), &rows(&sin), fused)
    }
}

/// A decode step's rows of the rotation's tables, row `i` those of its own position:
/// gathered once per step for all layers (at each use, a step of lillm-39m would gather 48
/// times instead of twice).
pub(crate) struct RowAngles {
    /// (B, width): the rows of [`Rope::tables`].
    cos: Tensor,
    sin: Tensor,
    fused: bool,
}

impl RowAngles {
    /// Rotates `x` of shape (B, 1, H, hd), row `i` at the position the angles were taken at.
    pub(crate) fn apply(&self, x: &Tensor) -> Tensor {
        self.rotate(x)
            .unwrap_or_else(|e| panic!("{e} (it passed its check at start)"))
    }

    fn rotate(&self, x: &Tensor) -> lillm_cuda::Result<Tensor> {
        let rows = |table: &Tensor| table.view([x.size()[0], 1, 1, -1]);
        rotate_by(x, &rows(&self.cos), &rows(&self.sin), self.fused)
    }
}

/// `x` rotated by angles whose rows broadcast against it: by the fused kernel (each pair's
/// cosine and sine), or the reference (the whole tables): x·cos + swap(x)·sin in float32,
/// rounded to x's kind.
fn rotate_by(x: &Tensor, cos: &Tensor, sin: &Tensor, fused: bool) -> lillm_cuda::Result<Tensor> {
    if fused {
        return lillm_cuda::kernels::rope(x, cos, sin);
    }
    let (b, t, h, hd) = x.size4().expect("rope input is 4-d");
    let x32 = x.to_kind(Kind::Float);
    // Each pair (a, b) as (b, a).
    let swapped = x32.view([b, t, h, hd / 2, 2]).flip([4]).view([b, t, h, hd]);
    Ok((x32 * cos + swapped * sin).to_kind(x.kind()))
}

/// Whether RoPE runs the fused kernel on `device` (when [`Kernels::rope`] asks): on CUDA once
/// the kernel, compiled on first use, has matched the reference on a known input in this
/// process (a kernel that fails to compile or differs is reported and the reference runs).
pub fn fused_rope_in_use(device: Device) -> bool {
    static CHECKED: OnceLock<bool> = OnceLock::new();
    checked_once(&CHECKED, device, "RoPE", || check_fused_rope(device))
}

/// The fused rotation against the reference on a fixed bf16 input and fixed angles (no draw
/// from libtorch's generator, which seeded runs replay), at positions in a batch's layout,
/// on q's and k's heads side by side in a joined projection's output (strided), and, as a
/// decode step has them, one per row.
fn check_fused_rope(device: Device) -> Result<(), String> {
    let (t, pairs) = (8, 16);
    let angles = Tensor::linspace(-40.0, 300.0, t * pairs, (Kind::Float, device)).view([t, pairs]);
    let rope = Rope::from_pair_tables(angles.cos(), angles.sin());
    // Three heads of which the first two are rotated.
    let wide = Tensor::linspace(-6.0, 5.0, 3 * t * 3 * 2 * pairs, (Kind::Float, device))
        .view([3, t, 3 * 2 * pairs])
        .to_kind(Kind::BFloat16);
    let joined = wide.narrow(2, 0, 2 * 2 * pairs).view([3, t, 2, 2 * pairs]);
    let x = joined.contiguous();
    let error = |e: lillm_cuda::Error| e.to_string();
    for x in [&x, &joined] {
        agrees_with_reference(
            &[x.shallow_clone()],
            |x| rope.rotate(&x[0], 0, true).map_err(error),
            |x| rope.rotate(&x[0], 0, false).expect("the reference"),
        )?;
    }
    let per_row = Tensor::from_slice(&[5i64, 0, 7]).to_device(device);
    let (fused, reference) = (
        rope.angles_at(&per_row, true),
        rope.angles_at(&per_row, false),
    );
    agrees_with_reference(
        &[x.narrow(1, 2, 1)],
        |x| fused.rotate(&x[0]).map_err(error),
        |x| reference.rotate(&x[0]).expect("the reference"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rotation as the original computes it: each pair's halves apart, then stacked.
    fn rotate_pairs(x: &Tensor, start: i64, cfg: &ModelConfig) -> Tensor {
        let (b, t, h, hd) = x.size4().unwrap();
        let exponents = Tensor::arange_start_step(0, hd, 2, (Kind::Float, Device::Cpu)) / hd as f64;
        let inv_freq = Tensor::from(cfg.rope_theta as f32)
            .pow(&exponents)
            .reciprocal();
        let positions = Tensor::arange_start(start, start + t, (Kind::Float, Device::Cpu));
        let angles = positions.outer(&inv_freq).view([1, t, 1, hd / 2]);
        let (cos, sin) = (angles.cos(), angles.sin());
        let pairs = x.view([b, t, h, hd / 2, 2]);
        let (even, odd) = (pairs.select(4, 0), pairs.select(4, 1));
        let rotated = [&even * &cos - &odd * &sin, &even * &sin + &odd * &cos];
        Tensor::stack(&rotated, 4).view([b, t, h, hd])
    }

    #[test]
    fn the_rotation_in_four_kernels_is_the_pairwise_rotation_bit_for_bit() {
        let cfg = ModelConfig::preset("tiny").unwrap();
        let rope = Rope::new(&cfg, Device::Cpu);
        let hd = cfg.head_dim() as i64;
        let x = Tensor::randn([2, 5, 3, hd], (Kind::Float, Device::Cpu)) * 10.0;
        // Off CUDA the reference runs whatever is asked.
        for kernels in [Kernels::REFERENCE, Kernels::FUSED] {
            for start in [0, 7] {
                let want = rotate_pairs(&x, start, &cfg);
                assert!(rope.apply(&x, start, kernels).equal(&want));
            }
            // Rows at their own positions, as a decode step rotates them.
            let row = x.narrow(1, 0, 1);
            let positions = Tensor::from_slice(&[9i64, 2]);
            let each: Vec<Tensor> = [9, 2]
                .iter()
                .enumerate()
                .map(|(i, &p)| rotate_pairs(&row.narrow(0, i as i64, 1), p, &cfg))
                .collect();
            assert!(rope
                .at_rows(&positions, kernels)
                .apply(&row)
                .equal(&Tensor::cat(&each, 0)));
        }
        assert!(!fused_rope_in_use(Device::Cpu));
    }

    #[test]
    fn the_fused_kernels_tables_are_each_pairs_cosine_and_sine() {
        let angles = Tensor::linspace(-2.0, 9.0, 12, (Kind::Float, Device::Cpu)).view([3, 4]);
        let rope = Rope::from_pair_tables(angles.cos(), angles.sin());
        assert!(Rope::per_pair(&rope.cos, 0).equal(&angles.cos()));
        assert!(Rope::per_pair(&rope.sin, 1).equal(&angles.sin()));
    }
}
