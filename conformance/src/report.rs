//! The summary table the runner prints.

use std::fmt::Write as _;

use crate::{Outcome, TrialResult};

/// Results of a run.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// One entry per trial, in run order.
    pub results: Vec<TrialResult>,
}

impl Report {
    /// Number of failed trials.
    pub fn failed(&self) -> usize {
        self.results.iter().filter(|r| matches!(r.outcome, Outcome::Failed(_))).count()
    }

    /// Number of passed trials.
    pub fn passed(&self) -> usize {
        self.results.iter().filter(|r| r.outcome == Outcome::Passed).count()
    }

    /// Appends another report's results.
    pub fn extend(&mut self, other: Report) {
        self.results.extend(other.results);
    }

    /// The table (kind, backend, passed, skipped, failed, disabled), then every skip, disabled
    /// test and failure with its reason, then a closing `N passed, N failed, N skipped` line.
    pub fn render(&self) -> String {
        let mut rows: Vec<(&str, &str, [usize; 4])> = Vec::new();
        for r in &self.results {
            let i = match rows.iter().position(|(k, b, _)| *k == r.kind && *b == r.backend) {
                Some(i) => i,
                None => {
                    rows.push((r.kind, &r.backend, [0; 4]));
                    rows.len() - 1
                }
            };
            let col = match r.outcome {
                Outcome::Passed => 0,
                Outcome::Skipped(_) => 1,
                Outcome::Failed(_) => 2,
                Outcome::Disabled(_) => 3,
            };
            rows[i].2[col] += 1;
        }
        let wb = rows.iter().map(|(_, b, _)| b.len()).chain([7]).max().unwrap_or(7);
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<9}  {:<wb$}  {:>6}  {:>7}  {:>6}  {:>8}",
            "KIND", "BACKEND", "PASSED", "SKIPPED", "FAILED", "DISABLED"
        );
        for (k, b, [p, s, f, d]) in &rows {
            let _ = writeln!(out, "{k:<9}  {b:<wb$}  {p:>6}  {s:>7}  {f:>6}  {d:>8}");
        }
        let mut section = |title: &str, pick: &dyn Fn(&Outcome) -> Option<String>| {
            let lines: Vec<String> = self
                .results
                .iter()
                .filter_map(|r| pick(&r.outcome).map(|why| format!("  {}/{}/{}: {why}", r.kind, r.backend, r.name)))
                .collect();
            if !lines.is_empty() {
                let _ = writeln!(out, "\n{title}:");
                for l in lines {
                    let _ = writeln!(out, "{l}");
                }
            }
        };
        section("Skipped", &|o| if let Outcome::Skipped(w) = o { Some(w.clone()) } else { None });
        section("Disabled", &|o| if let Outcome::Disabled(w) = o { Some(w.clone()) } else { None });
        section("Failed", &|o| if let Outcome::Failed(w) = o { Some(w.clone()) } else { None });
        let skipped =
            self.results.iter().filter(|r| !matches!(r.outcome, Outcome::Passed | Outcome::Failed(_))).count();
        let _ = writeln!(out, "\nconformance: {} passed, {} failed, {} skipped", self.passed(), self.failed(), skipped);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn r(backend: &str, name: &str, outcome: Outcome) -> TrialResult {
        TrialResult { kind: "transport", backend: backend.into(), name: name.into(), outcome, elapsed: Duration::ZERO }
    }

    #[test]
    fn table_counts_and_lists_reasons() {
        let rep = Report {
            results: vec![
                r("tcp", "a", Outcome::Passed),
                r("tcp", "b", Outcome::Skipped("no rdma".into())),
                r("loopback", "c", Outcome::Failed("boom".into())),
                r("loopback", "d", Outcome::Disabled("flaky".into())),
            ],
        };
        let s = rep.render();
        assert!(s.contains("transport  tcp            1        1       0         0"), "{s}");
        assert!(s.contains("transport/tcp/b: no rdma"));
        assert!(s.contains("transport/loopback/c: boom"));
        assert!(s.contains("transport/loopback/d: flaky"));
        assert!(s.contains("conformance: 1 passed, 1 failed, 2 skipped"));
        assert_eq!(rep.failed(), 1);
    }
}
