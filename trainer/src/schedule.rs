//! Learning-rate schedule of the original `pretrain.py`: linear warmup, cosine decay, floor.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_iters: u64,
    pub lr_decay_iters: u64,
    /// False keeps `lr` constant (SFT).
    pub decay_lr: bool,
}

impl LrSchedule {
    /// Learning rate for optimizer step `it` (0-based).
    pub fn at(&self, it: u64) -> f64 {
        if !self.decay_lr {
            return self.lr;
        }
        if it < self.warmup_iters {
            return self.lr * (it + 1) as f64 / (self.warmup_iters + 1) as f64;
        }
        if it > self.lr_decay_iters {
            return self.min_lr;
        }
        let span = self.lr_decay_iters.saturating_sub(self.warmup_iters).max(1) as f64;
        let ratio = (it - self.warmup_iters) as f64 / span;
        let coeff = 0.5 * (1.0 + (std::f64::consts::PI * ratio).cos());
        self.min_lr + coeff * (self.lr - self.min_lr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed_schedule() -> LrSchedule {
        LrSchedule {
            lr: 6e-4,
            min_lr: 6e-5,
            warmup_iters: 2000,
            lr_decay_iters: 20000,
            decay_lr: true,
        }
    }

    #[test]
    fn warmup_is_linear_then_cosine_reaches_min_lr() {
        let s = seed_schedule();
        assert!((s.at(0) - 6e-4 / 2001.0).abs() < 1e-15);
        assert!((s.at(999) - 6e-4 * 1000.0 / 2001.0).abs() < 1e-15);
        assert!((s.at(2000) - 6e-4).abs() < 1e-15);
        let mid = s.at(11000);
        assert!((mid - (6e-5 + 0.5 * (6e-4 - 6e-5))).abs() < 1e-12);
        assert!((s.at(20000) - 6e-5).abs() < 1e-15);
        assert_eq!(s.at(20001), 6e-5);
        for it in 2000..20000 {
            assert!(s.at(it + 1) <= s.at(it), "cosine decay is monotone at {it}");
        }
    }

    #[test]
    fn constant_when_decay_is_off() {
        let s = LrSchedule {
            decay_lr: false,
            ..seed_schedule()
        };
        assert_eq!(s.at(0), 6e-4);
        assert_eq!(s.at(50_000), 6e-4);
    }
}
