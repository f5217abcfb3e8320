//! `--profile-steps A:B`: libtorch's profiler over steps A to B-1 of a run, so that what a
//! training step spends its time on — each kernel on CUDA, each operator on the CPU — is
//! measured, not guessed. Each rank writes a Chrome trace (`profile-rank<R>.json`) and a
//! table of the longest kernels and operators (`profile-rank<R>.txt`) to the run
//! directory; the first rank prints its table.

use std::path::{Path, PathBuf};

use lillm_cuda::profiler::{table, Profiler};

use crate::{Error, Result};

/// Rows of each table.
const TOP: usize = 25;

/// Steps `from..to` of a run (`A:B`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepRange {
    pub from: u64,
    pub to: u64,
}

impl StepRange {
    /// Parses `A:B` (`A < B`); the error names the flag.
    pub fn parse(spec: &str) -> Result<Self> {
        let bad = || {
            Error::Config(format!(
                "profile_steps must be FIRST:END with FIRST < END (steps FIRST..END-1 are recorded, e.g. 20:25), got {spec:?}"
            ))
        };
        let (from, to) = spec.split_once(':').ok_or_else(bad)?;
        let (from, to) = (
            from.trim().parse::<u64>().map_err(|_| bad())?,
            to.trim().parse::<u64>().map_err(|_| bad())?,
        );
        if from >= to {
            return Err(bad());
        }
        Ok(Self { from, to })
    }
}

/// Whether recording starts before the step at `step`: at the range's first step, or — for
/// a run that resumed inside the range — at its first step there.
pub(crate) fn starts_at(range: StepRange, step: u64, recording: bool) -> bool {
    !recording && (range.from..range.to).contains(&step)
}

/// The profile of one run: idle, recording, or done.
pub(crate) struct StepProfile {
    range: Option<StepRange>,
    recording: Option<(Profiler, u64)>,
    dir: PathBuf,
    rank: usize,
    device: tch::Device,
}

impl StepProfile {
    pub(crate) fn new(
        range: Option<StepRange>,
        dir: &Path,
        rank: usize,
        device: tch::Device,
    ) -> Self {
        Self {
            range,
            recording: None,
            dir: dir.to_path_buf(),
            rank,
            device,
        }
    }

    /// Starts recording when the step at `step` is the range's.
    pub(crate) fn before_step(&mut self, step: u64) -> Result<()> {
        let Some(range) = self.range else {
            return Ok(());
        };
        if starts_at(range, step, self.recording.is_some()) {
            self.recording = Some((Profiler::start(self.device)?, step));
        }
        Ok(())
    }

    /// After the step that brought the run to `step`: at the range's end (or the run's),
    /// ends the recording, writes the trace and the table, and returns the table.
    pub(crate) fn after_step(&mut self, step: u64, last: bool) -> Result<Option<String>> {
        let ends = self.range.is_some_and(|r| step >= r.to) || last;
        let Some((profiler, from)) = self.recording.take_if(|_| ends) else {
            return Ok(None);
        };
        self.range = None;
        if let tch::Device::Cuda(index) = self.device {
            // Kernels still in flight would be missing from the recording.
            tch::Cuda::synchronize(index as i64);
        }
        let trace = self.dir.join(format!("profile-rank{}.json", self.rank));
        let ops = profiler.finish(Some(&trace))?;
        let text = format!(
            "profile of steps {from}..{} (trace: {}):\n{}",
            step - 1,
            trace.display(),
            table(&ops, step - from, TOP)
        );
        let summary = self.dir.join(format!("profile-rank{}.txt", self.rank));
        std::fs::write(&summary, &text).map_err(|e| Error::io(&summary, e))?;
        Ok(Some(text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_range_is_first_colon_end_with_first_before_end() {
        assert_eq!(
            StepRange::parse("20:25").unwrap(),
            StepRange { from: 20, to: 25 }
        );
        for bad in ["25:20", "5:5", "20", "a:b", ":3"] {
            let err = StepRange::parse(bad).unwrap_err().to_string();
            assert!(err.contains("profile_steps") && err.contains(bad), "{err}");
        }
    }

    #[test]
    fn recording_starts_at_the_first_step_or_on_resuming_inside_the_range() {
        let range = StepRange { from: 20, to: 25 };
        assert!(!starts_at(range, 19, false));
        assert!(starts_at(range, 20, false));
        assert!(starts_at(range, 22, false));
        assert!(!starts_at(range, 22, true));
        assert!(!starts_at(range, 25, false));
    }

    #[test]
    fn a_recorded_span_leaves_its_trace_and_table_in_the_run_directory() {
        let dir = tempfile::tempdir().unwrap();
        let cpu = tch::Device::Cpu;
        let mut profile = StepProfile::new(StepRange::parse("2:4").ok(), dir.path(), 1, cpu);
        let x = tch::Tensor::randn([32, 32], (tch::Kind::Float, cpu));
        let mut printed = None;
        for step in 0..6 {
            profile.before_step(step).unwrap();
            let _ = x.matmul(&x);
            if let Some(text) = profile.after_step(step + 1, false).unwrap() {
                assert!(printed.is_none(), "one table");
                printed = Some((step, text));
            }
        }
        let (at, text) = printed.expect("a table");
        assert_eq!(at, 3, "recorded steps 2 and 3");
        assert!(
            text.starts_with("profile of steps 2..3") && text.contains("aten::matmul"),
            "{text}"
        );
        assert!(dir.path().join("profile-rank1.json").is_file());
        let saved = std::fs::read_to_string(dir.path().join("profile-rank1.txt")).unwrap();
        assert_eq!(saved, text);
    }
}
