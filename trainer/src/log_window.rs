//! The log window in progress: this rank's training figures ([`crate::loss::Scored::add_to`])
//! summed over the window's completed steps, reduced over the ranks once per log interval.
//! It outlives a regroup in place, so that a window spanning a regroup reports what it would
//! have without one — when every rank of the new group holds the same window. Its two
//! buffers are allocated once per run: a step only zeroes and adds.

use std::time::Instant;

use tch::{Device, Kind, Tensor};

pub struct LogWindow {
    sums: Tensor,
    steps: u64,
    /// The figures of the step in progress ([`LogWindow::begin_step`]).
    step_figures: Tensor,
    /// The step those figures complete, until they are added: a peer's update may have
    /// completed that step even though this rank saw its collective fail, and then the new
    /// group starts from it.
    held: Option<u64>,
    /// The step the window started at, and how many ranks shared its steps (each rank's
    /// sums are its share: they add up to the step's figures only over the same ranks).
    from_step: u64,
    world_size: usize,
    started: Instant,
}

impl LogWindow {
    /// An empty window of `figures` values starting at `step`.
    pub fn new(figures: i64, device: Device, step: u64, world_size: usize) -> Self {
        Self {
            sums: Tensor::zeros([figures], (Kind::Float, device)),
            steps: 0,
            step_figures: Tensor::zeros([figures], (Kind::Float, device)),
            held: None,
            from_step: step,
            world_size,
            started: Instant::now(),
        }
    }

    /// Empties the window, which now starts at `step`.
    pub fn restart(&mut self, step: u64, world_size: usize) {
        let _ = self.sums.zero_();
        self.steps = 0;
        self.held = None;
        self.from_step = step;
        self.world_size = world_size;
        self.started = Instant::now();
    }

    /// Starts the step that completes `step`: returns the (zeroed) tensor its figures are
    /// added to, held until [`LogWindow::add_held`].
    pub fn begin_step(&mut self, step: u64) -> Tensor {
        let _ = self.step_figures.zero_();
        self.held = Some(step);
        self.step_figures.shallow_clone()
    }

    /// Adds the held step, now completed.
    pub fn add_held(&mut self) {
        if self.held.take().is_some() {
            let _ = self.sums.g_add_(&self.step_figures);
            self.steps += 1;
        }
    }

    /// The sums with the held step's figures, not yet added.
    pub fn sums_with_held(&self) -> Tensor {
        &self.sums + &self.step_figures
    }

    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Seconds per step since the window started (a regroup inside it counts: the record
    /// says what the job got).
    pub fn seconds_per_step(&self) -> f64 {
        self.started.elapsed().as_secs_f64() / self.steps.max(1) as f64
    }

    /// Time spent outside steps (an evaluation) does not count.
    pub fn restart_clock(&mut self) {
        self.started = Instant::now();
    }

    /// Whether the window goes on at `step` with `world_size` ranks.
    pub fn continues(&self, step: u64, world_size: usize) -> bool {
        self.from_step + self.steps == step && self.world_size == world_size
    }

    /// Whether the window can reach `step` with `world_size` ranks: it is there, or it
    /// holds the figures of the one step it lacks (see [`LogWindow::begin_step`]).
    fn reaches(&self, step: u64, world_size: usize) -> Option<u64> {
        if self.world_size != world_size {
            return None;
        }
        let end = self.from_step + self.steps;
        match self.held {
            _ if end == step => Some(self.steps),
            Some(held) if held == step && end + 1 == step => Some(self.steps + 1),
            _ => None,
        }
    }

    /// What this rank says to a new group of `world_size` ranks that starts at `step`:
    /// summed over the ranks, [`LogWindow::agreed`] reads whether every rank holds the same
    /// window.
    pub fn vote(&self, step: u64, world_size: usize) -> [f64; 5] {
        let Some(steps) = self.reaches(step, world_size) else {
            return [0.0; 5];
        };
        let (from, steps) = (self.from_step as f64, steps as f64);
        [1.0, from, from * from, steps, steps * steps]
    }

    /// Goes on into a new group starting at `step`: with this window (completed by its
    /// held step if it lacks it) when every rank `agreed`, else with an empty one.
    pub fn settle(&mut self, step: u64, world_size: usize, agreed: bool) {
        match (agreed, self.reaches(step, world_size)) {
            (true, Some(steps)) => {
                if steps > self.steps {
                    self.add_held();
                }
                self.held = None;
            }
            _ => self.restart(step, world_size),
        }
    }

    /// Whether the summed votes of `world_size` ranks say they all hold one window: every
    /// rank voted, and the values are equal (a sum n·x with a sum of squares n·x²).
    pub fn agreed(sums: &[f64], world_size: usize) -> bool {
        let n = world_size as f64;
        let same = |sum: f64, squares: f64| {
            let mean = sum / n;
            (squares - n * mean * mean).abs() < 0.5
        };
        sums.len() == 5 && sums[0] == n && same(sums[1], sums[2]) && same(sums[3], sums[4])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(votes: &[[f64; 5]]) -> Vec<f64> {
        (0..5).map(|i| votes.iter().map(|v| v[i]).sum()).collect()
    }

    /// Runs the next step of `w` with these figures, up to its collectives.
    fn begin(w: &mut LogWindow, figures: &[f32]) {
        let next = w.from_step + w.steps + 1;
        let mut t = w.begin_step(next);
        t.copy_(&Tensor::from_slice(figures));
    }

    /// Runs the next step of `w` to its end.
    fn step(w: &mut LogWindow, figures: &[f32]) {
        begin(w, figures);
        w.add_held();
    }

    #[test]
    fn a_window_goes_on_only_where_every_rank_holds_it() {
        let mut w = LogWindow::new(3, Device::Cpu, 30, 2);
        for _ in 0..4 {
            step(&mut w, &[1.0, 2.0, 3.0]);
        }
        assert!(w.continues(34, 2));
        assert!(!w.continues(34, 1), "other ranks shared its steps");
        assert!(!w.continues(33, 2));
        let same = w.vote(34, 2);
        assert!(LogWindow::agreed(&sum(&[same, same]), 2));
        // A restarted rank holds no window; a rank that started its window elsewhere
        // disagrees even if the counts add up.
        let fresh = LogWindow::new(3, Device::Cpu, 34, 2).vote(34, 2);
        assert!(!LogWindow::agreed(&sum(&[same, fresh]), 2));
        // Three ranks whose windows all reach step 34 but started at 30, 28 and 32: the
        // counts and the sums agree, the squares do not.
        let window = |from: u64| {
            let mut w = LogWindow::new(3, Device::Cpu, from, 3);
            for _ in from..34 {
                step(&mut w, &[0.0; 3]);
            }
            w.vote(34, 3)
        };
        assert!(!LogWindow::agreed(
            &sum(&[window(30), window(28), window(32)]),
            3
        ));
        assert!(LogWindow::agreed(
            &sum(&[window(30), window(30), window(30)]),
            3
        ));
        begin(&mut w, &[1.0, 1.0, 1.0]);
        assert_eq!(
            Vec::<f32>::try_from(&w.sums_with_held()).unwrap(),
            vec![5.0, 9.0, 13.0]
        );
        // A new window reuses the buffers, empty.
        w.restart(40, 2);
        assert!(w.continues(40, 2));
        step(&mut w, &[2.0, 2.0, 2.0]);
        assert_eq!(Vec::<f32>::try_from(&w.sums).unwrap(), vec![2.0, 2.0, 2.0]);
    }

    /// A peer completed step 35 while this rank saw the step's collective fail: the new
    /// group starts at 35, and this rank's held figures of that step complete its window.
    #[test]
    fn a_held_step_completes_the_window_when_the_group_starts_after_it() {
        let mut behind = LogWindow::new(1, Device::Cpu, 30, 2);
        let mut ahead = LogWindow::new(1, Device::Cpu, 30, 2);
        for w in [&mut behind, &mut ahead] {
            for _ in 0..4 {
                step(w, &[1.0]);
            }
        }
        begin(&mut behind, &[2.0]);
        step(&mut ahead, &[2.0]);
        let votes = sum(&[behind.vote(35, 2), ahead.vote(35, 2)]);
        assert!(LogWindow::agreed(&votes, 2));
        behind.settle(35, 2, true);
        assert_eq!(behind.steps(), 5);
        assert_eq!(Vec::<f32>::try_from(&behind.sums).unwrap(), vec![6.0]);
        // Without the held step it cannot reach 35: a new window there.
        let mut lacking = LogWindow::new(1, Device::Cpu, 30, 2);
        assert_eq!(lacking.vote(35, 2), [0.0; 5]);
        lacking.settle(35, 2, true);
        assert!(lacking.continues(35, 2) && lacking.steps() == 0);
    }
}
