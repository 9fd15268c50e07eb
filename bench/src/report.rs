//! Side-by-side measurements and the report: `BENCHMARKS.md` and `bench/results.json`.
//!
//! Every figure is a pair, ours and a peer, measured in the same run with the repetitions
//! interleaved (ours, peer, ours, peer, ...) so that machine noise hits both alike. The ratio is
//! taken between the medians.

use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

/// Median, min and max of repeated rates (units per second).
#[derive(Clone, Debug, Serialize)]
pub struct Stats {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub samples: usize,
}

impl Stats {
    pub fn of(mut xs: Vec<f64>) -> Stats {
        assert!(!xs.is_empty(), "BUG: a measurement has at least one sample");
        xs.sort_by(f64::total_cmp);
        let n = xs.len();
        let median = if n % 2 == 1 { xs[n / 2] } else { (xs[n / 2 - 1] + xs[n / 2]) / 2.0 };
        Stats { median, min: xs[0], max: xs[n - 1], samples: n }
    }
}

/// Whether a larger figure is better (rates) or a smaller one (latency, bytes).
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Better {
    Higher,
    Lower,
}

/// One figure and its peer.
#[derive(Clone, Debug, Serialize)]
pub struct Pair {
    pub group: String,
    pub name: String,
    pub unit: String,
    pub better: Better,
    pub ours: Stats,
    pub peer_name: String,
    pub peer: Stats,
    /// ours.median / peer.median
    pub ratio: f64,
    /// The target, as text ("ratio >= 0.8"), and whether the median meets it.
    pub target: Option<String>,
    pub target_met: Option<bool>,
}

/// A target on the ratio ours/peer.
#[derive(Clone, Copy, Debug)]
pub enum Target {
    RatioAtLeast(f64),
    RatioAtMost(f64),
    /// An absolute target on our median, in the pair's unit.
    OursAtLeast(f64),
    OursAtMost(f64),
}

impl Pair {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        group: &str,
        name: &str,
        unit: &str,
        better: Better,
        ours: Vec<f64>,
        peer_name: &str,
        peer: Vec<f64>,
        target: Option<Target>,
    ) -> Pair {
        let (ours, peer) = (Stats::of(ours), Stats::of(peer));
        let ratio = ours.median / peer.median;
        let (target, target_met) = match target {
            Some(Target::RatioAtLeast(t)) => (Some(format!("ratio >= {t}")), Some(ratio >= t)),
            Some(Target::RatioAtMost(t)) => (Some(format!("ratio <= {t}")), Some(ratio <= t)),
            Some(Target::OursAtLeast(t)) => (Some(format!("pagesync >= {t} {unit}")), Some(ours.median >= t)),
            Some(Target::OursAtMost(t)) => (Some(format!("pagesync <= {t} {unit}")), Some(ours.median <= t)),
            None => (None, None),
        };
        let (group, name, unit, peer_name) =
            (group.to_owned(), name.to_owned(), unit.to_owned(), peer_name.to_owned());
        Pair { group, name, unit, better, ours, peer_name, peer, ratio, target, target_met }
    }
}

/// Runs `ours` and `peer` alternately `reps` times; each returns a figure (e.g. ops/s).
pub fn interleave(
    reps: usize,
    mut ours: impl FnMut() -> f64,
    mut peer: impl FnMut() -> f64,
) -> (Vec<f64>, Vec<f64>) {
    let mut a = Vec::with_capacity(reps);
    let mut b = Vec::with_capacity(reps);
    for _ in 0..reps {
        a.push(ours());
        b.push(peer());
    }
    (a, b)
}

pub fn per_second(count: u64, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64().max(1e-9)
}

/// The machine and commit a report was measured on.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub cpu_model: String,
    pub commit: String,
}

impl Machine {
    pub fn detect() -> Machine {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split(':').nth(1))
                    .map(|m| m.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".into());
        let commit = std::process::Command::new("git")
            .args(["rev-parse", "--short", "HEAD"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_else(|| "unknown".into());
        // Figures from a tree with changes are not that commit's: say so.
        let dirty = std::process::Command::new("git")
            .args(["status", "--porcelain", "--untracked-files=no"])
            .output()
            .ok()
            .is_some_and(|o| o.status.success() && !o.stdout.is_empty());
        let commit = if dirty { format!("{commit} plus uncommitted changes") } else { commit };
        Machine { cores, cpu_model, commit }
    }
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub machine: Machine,
    pub quick: bool,
    pub pairs: Vec<Pair>,
    /// (file stem, title) of each chart in `bench/charts/`.
    pub charts: Vec<(String, String)>,
}

impl Report {
    pub fn markdown(&self) -> String {
        let m = &self.machine;
        let mut s = String::new();
        let _ = writeln!(s, "# pagesync benchmarks\n");
        let _ = writeln!(
            s,
            "Generated by `cargo run --release -p pagesync-bench -- all`. Do not edit by hand.\n"
        );
        let _ = writeln!(s, "- machine: {} cores, {}", m.cores, m.cpu_model);
        let _ = writeln!(s, "- commit: {}", m.commit);
        let _ = writeln!(s, "- mode: {}\n", if self.quick { "quick (smoke figures)" } else { "full" });
        let _ = writeln!(
            s,
            "Each pair is measured in the same run, repetitions interleaved; median [min..max].\n"
        );
        let _ = writeln!(s, "| group | figure | pagesync | peer | ratio | target |");
        let _ = writeln!(s, "|---|---|---|---|---|---|");
        for p in &self.pairs {
            let target = match (&p.target, p.target_met) {
                (Some(t), Some(true)) => format!("{t}: met"),
                (Some(t), _) => format!("{t}: **not met**"),
                _ => "-".into(),
            };
            let _ = writeln!(
                s,
                "| {} | {} ({}, {} better) | {} | {}: {} | {:.2}x | {} |",
                p.group,
                p.name,
                p.unit,
                if p.better == Better::Higher { "higher" } else { "lower" },
                fmt_stats(&p.ours),
                p.peer_name,
                fmt_stats(&p.peer),
                p.ratio,
                target
            );
        }
        if !self.charts.is_empty() {
            let _ = writeln!(s, "\n## Charts\n");
            for (name, title) in &self.charts {
                let _ = writeln!(s, "![{title}](bench/charts/{name}.svg)\n");
            }
        }
        s
    }
}

fn fmt_stats(s: &Stats) -> String {
    format!("{} [{}..{}]", fmt_num(s.median), fmt_num(s.min), fmt_num(s.max))
}

fn fmt_num(x: f64) -> String {
    if x >= 100.0 { format!("{x:.0}") } else { format!("{x:.3}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_even_and_odd_counts() {
        assert_eq!(Stats::of(vec![3.0, 1.0, 2.0]).median, 2.0);
        let s = Stats::of(vec![4.0, 1.0, 2.0, 3.0]);
        assert_eq!((s.median, s.min, s.max), (2.5, 1.0, 4.0));
    }

    #[test]
    fn targets_are_judged_on_the_median_ratio() {
        let p = Pair::new(
            "g",
            "n",
            "ops/s",
            Better::Higher,
            vec![8.0],
            "raw",
            vec![10.0],
            Some(Target::RatioAtLeast(0.8)),
        );
        assert_eq!(p.target_met, Some(true));
        let p = Pair::new(
            "g",
            "n",
            "ops/s",
            Better::Higher,
            vec![7.0],
            "raw",
            vec![10.0],
            Some(Target::RatioAtLeast(0.8)),
        );
        assert_eq!(p.target_met, Some(false));
    }
}
