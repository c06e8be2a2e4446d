//! The failover stopwatch: where the seconds of a failover went. A timeline that starts at the
//! best estimate of the loss (the last time the peer was heard, or the moment the link broke)
//! and collects the first time each milestone was reached — declared lost, vouched, promoted,
//! exports started, answering, first client request served — for the log, `events` and
//! `status`. Pure bookkeeping: instants come from the caller.

use std::fmt;
use std::time::{Duration, Instant};

/// One failover's timeline.
#[derive(Debug, Clone)]
pub struct Stopwatch {
    since: Instant,
    start_label: &'static str,
    marks: Vec<(&'static str, Duration)>,
}

impl Stopwatch {
    /// A timeline starting at `since`, named by what happened then (e.g. "peer last heard").
    pub fn start(since: Instant, start_label: &'static str) -> Stopwatch {
        Stopwatch {
            since,
            start_label,
            marks: Vec::new(),
        }
    }

    /// Records the first time `label` was reached (a repeat changes nothing).
    pub fn mark(&mut self, label: &'static str, at: Instant) {
        if !self.reached(label) {
            self.marks
                .push((label, at.saturating_duration_since(self.since)));
        }
    }

    /// Whether `label` was reached.
    pub fn reached(&self, label: &str) -> bool {
        self.marks.iter().any(|(l, _)| *l == label)
    }

    /// Time from the start to `label`, if reached.
    pub fn to(&self, label: &str) -> Option<Duration> {
        self.marks.iter().find(|(l, _)| *l == label).map(|m| m.1)
    }

    /// Time from the start to `at`.
    pub fn elapsed(&self, at: Instant) -> Duration {
        at.saturating_duration_since(self.since)
    }
}

impl fmt::Display for Stopwatch {
    /// `peer last heard 0.000s, declared lost +1.004s, …`: one line, milestones in the order
    /// they were reached.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} 0.000s", self.start_label)?;
        for (label, at) in &self.marks {
            write!(f, ", {label} +{:.3}s", at.as_secs_f64())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn milestones_keep_their_first_time_and_order() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut watch = Stopwatch::start(t0, "peer last heard");
        watch.mark("declared lost", t0 + ms(1004));
        watch.mark("promoted", t0 + ms(1720));
        watch.mark("declared lost", t0 + ms(3000));
        watch.mark("first reply", t0 + ms(1900));
        assert_eq!(watch.to("declared lost"), Some(ms(1004)));
        assert!(watch.reached("promoted") && !watch.reached("answering"));
        assert_eq!(
            watch.to_string(),
            "peer last heard 0.000s, declared lost +1.004s, promoted +1.720s, first reply +1.900s"
        );
        assert_eq!(watch.elapsed(t0 + ms(5)), ms(5));
    }
}
