//! The resync rate controller: how many bytes the resync source may put on the wire in the
//! next step. Pure: time is an argument, nothing sleeps here.
//!
//! It is DRBD's dynamic controller (`c-plan-ahead`, `c-fill-target`, `c-max-rate`,
//! `c-min-rate`), stepped every [`RateConfig::step`]:
//!
//! ```text
//! correction = fill_target - in_flight - planned      (planned: corrections not yet applied)
//! spread it evenly over the plan-ahead steps
//! budget     = acked in the last step + this step's share of the corrections
//! budget     = max(budget, 2 × acked)                  while in_flight < fill_target / 2
//! budget     = min(budget, max_rate × step)
//! budget     = min_rate × step                         while the application does I/O
//! ```
//!
//! On an idle pair the budget grows until `fill_target` bytes are in flight — the link is full —
//! and then follows what the peer acknowledges, so the resync runs at the link's speed without
//! a configured rate. While clients read or write, the resync steps back to the floor
//! `min_rate`: the application gets the rest, and the resync never stops.
//!
//! [`Pacer`] wraps the controller for the copier: it runs the steps that are due, keeps the
//! budget (a debt carries over, an unused surplus does not: no bursts after an idle spell) and
//! says how long to wait when the budget is spent.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Controller settings (config keys `resync-rate-max`, `resync-rate-min`,
/// `resync-fill-target`, `resync-plan-ahead`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateConfig {
    /// Upper bound in bytes/s (`None`: unlimited).
    pub max_rate: Option<u64>,
    /// Floor in bytes/s while the application does I/O.
    pub min_rate: u64,
    /// Bytes the controller tries to keep in flight.
    pub fill_target: u64,
    /// Time over which a correction is spread.
    pub plan_ahead: Duration,
    /// Controller step.
    pub step: Duration,
}

/// Default `resync-rate-min`: 10 MiB/s.
pub const DEFAULT_MIN_RATE: u64 = 10 << 20;
/// Default `resync-fill-target`: 8 MiB in flight.
pub const DEFAULT_FILL_TARGET: u64 = 8 << 20;
/// Default `resync-plan-ahead`: 0.2 s.
pub const DEFAULT_PLAN_AHEAD: Duration = Duration::from_millis(200);
/// Controller step: 100 ms, as DRBD's.
pub const STEP: Duration = Duration::from_millis(100);

impl Default for RateConfig {
    fn default() -> Self {
        RateConfig {
            max_rate: None,
            min_rate: DEFAULT_MIN_RATE,
            fill_target: DEFAULT_FILL_TARGET,
            plan_ahead: DEFAULT_PLAN_AHEAD,
            step: STEP,
        }
    }
}

/// What happened during one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StepInput {
    /// Resync bytes the peer acknowledged during the step.
    pub acked: u64,
    /// Resync bytes sent and not yet acknowledged, now.
    pub in_flight: u64,
    /// Application bytes (client reads and writes) during the step.
    pub app_io: u64,
}

/// The dynamic controller.
#[derive(Debug, Clone)]
pub struct Controller {
    cfg: RateConfig,
    plan: VecDeque<i64>,
}

impl Controller {
    /// A controller with an empty plan.
    pub fn new(cfg: RateConfig) -> Controller {
        let steps = (cfg.plan_ahead.as_nanos() / cfg.step.as_nanos().max(1)).max(1) as usize;
        Controller {
            cfg,
            plan: VecDeque::from(vec![0; steps]),
        }
    }

    /// The settings.
    pub fn config(&self) -> &RateConfig {
        &self.cfg
    }

    fn per_step(&self, rate: u64) -> u64 {
        (rate as f64 * self.cfg.step.as_secs_f64()) as u64
    }

    /// One step: the bytes the copier may send before the next one.
    pub fn step(&mut self, input: StepInput) -> u64 {
        let steps = self.plan.len() as i64;
        let planned: i64 = self.plan.iter().sum();
        let correction = self.cfg.fill_target as i64 - input.in_flight as i64 - planned;
        let share = correction / steps;
        for p in self.plan.iter_mut() {
            *p += share;
        }
        // The rounding remainder goes to the current step, so no correction is lost.
        let current = self.plan.pop_front().unwrap_or(0) + (correction - share * steps);
        self.plan.push_back(0);
        let mut budget = (input.acked as i64 + current).max(0) as u64;
        if input.in_flight < self.cfg.fill_target / 2 {
            // Slow start: far below the fill target the link is not the limit yet; at most
            // double what got through, so a fast link is reached in a few steps, not seconds.
            budget = budget.max(2 * input.acked);
        }
        if let Some(max) = self.cfg.max_rate {
            budget = budget.min(self.per_step(max));
        }
        if input.app_io > 0 {
            let floor = match self.cfg.max_rate {
                Some(max) => self.cfg.min_rate.min(max),
                None => self.cfg.min_rate,
            };
            budget = self.per_step(floor);
        }
        budget
    }
}

/// The controller in real (or simulated) time, for one copier.
#[derive(Debug)]
pub struct Pacer {
    ctl: Controller,
    next_step: Instant,
    budget: i64,
    acked: u64,
    app_seen: Option<u64>,
}

impl Pacer {
    /// Starts pacing at `now`; the first step runs at the first [`Pacer::poll`].
    pub fn new(cfg: RateConfig, now: Instant) -> Pacer {
        Pacer {
            ctl: Controller::new(cfg),
            next_step: now,
            budget: 0,
            acked: 0,
            app_seen: None,
        }
    }

    /// The peer acknowledged `bytes` of resync data.
    pub fn acked(&mut self, bytes: u64) {
        self.acked += bytes;
    }

    /// `bytes` were sent.
    pub fn charge(&mut self, bytes: u64) {
        self.budget -= bytes as i64;
    }

    /// `bytes` reserved earlier were not needed after all (a resync chunk found equal).
    pub fn charge_back(&mut self, bytes: u64) {
        self.budget += bytes as i64;
    }

    /// Runs the steps that are due. `in_flight`: resync bytes sent and not acknowledged;
    /// `app_total`: the application's byte counter (reads plus writes, ever). `None` if the
    /// copier may send now, else how long until the next step.
    pub fn poll(&mut self, now: Instant, in_flight: u64, app_total: u64) -> Option<Duration> {
        if now >= self.next_step {
            let app_io = app_total.saturating_sub(self.app_seen.unwrap_or(app_total));
            self.app_seen = Some(app_total);
            let budget = self.ctl.step(StepInput {
                acked: std::mem::take(&mut self.acked),
                in_flight,
                app_io,
            });
            self.budget = self.budget.min(0) + budget as i64;
            let step = self.ctl.config().step;
            self.next_step += step;
            if self.next_step <= now {
                // Fell behind (a long pause): start the step grid again from now.
                self.next_step = now + step;
            }
        }
        if self.budget > 0 {
            None
        } else {
            Some(self.next_step.saturating_duration_since(now))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A simulated link: `capacity` bytes/s, everything sent is acknowledged once it has
    /// crossed (queueing only, no propagation delay). Returns bytes moved per simulated second,
    /// second by second.
    fn simulate(
        cfg: RateConfig,
        capacity: u64,
        secs: u32,
        app_busy: impl Fn(u32) -> bool,
    ) -> Vec<u64> {
        let step_cap = (capacity as f64 * cfg.step.as_secs_f64()) as u64;
        let steps_per_sec = (1.0 / cfg.step.as_secs_f64()).round() as u32;
        let mut ctl = Controller::new(cfg);
        let (mut queue, mut acked, mut out) = (0u64, 0u64, Vec::new());
        let mut this_sec = 0u64;
        for i in 0..secs * steps_per_sec {
            let budget = ctl.step(StepInput {
                acked,
                in_flight: queue,
                app_io: if app_busy(i / steps_per_sec) {
                    1 << 20
                } else {
                    0
                },
            });
            queue += budget;
            acked = queue.min(step_cap);
            queue -= acked;
            this_sec += acked;
            if (i + 1) % steps_per_sec == 0 {
                out.push(this_sec);
                this_sec = 0;
            }
        }
        out
    }

    const GBIT: u64 = 125_000_000;

    #[test]
    fn an_idle_pair_reaches_link_speed_and_keeps_the_fill_target() {
        let per_sec = simulate(RateConfig::default(), 10 * GBIT, 5, |_| false);
        // Ramp within the first second, then the link is full.
        for (s, &b) in per_sec.iter().enumerate().skip(1) {
            assert!(b >= 10 * GBIT * 95 / 100, "second {s}: {b} bytes");
        }
        // The queue does not grow without bound: roughly the fill target stays in flight.
        let mut ctl = Controller::new(RateConfig::default());
        let cap = GBIT / 10;
        let (mut queue, mut acked) = (0u64, 0u64);
        for _ in 0..100 {
            queue += ctl.step(StepInput {
                acked,
                in_flight: queue,
                app_io: 0,
            });
            acked = queue.min(cap);
            queue -= acked;
        }
        assert!(queue <= 2 * DEFAULT_FILL_TARGET, "in flight {queue}");
    }

    #[test]
    fn max_rate_caps_and_application_io_backs_off_to_the_floor() {
        let cfg = RateConfig {
            max_rate: Some(50 << 20),
            ..RateConfig::default()
        };
        let per_sec = simulate(cfg, 10 * GBIT, 4, |_| false);
        for &b in &per_sec {
            assert!(b <= 50 << 20, "{b}");
        }
        assert!(per_sec[3] >= 49 << 20, "{per_sec:?}");
        // Client I/O in seconds 2..4: the resync drops to the floor, then recovers.
        let per_sec = simulate(RateConfig::default(), 10 * GBIT, 7, |s| (2..4).contains(&s));
        assert!(per_sec[1] > 10 * GBIT / 2, "{per_sec:?}");
        for s in [2, 3] {
            let floor = DEFAULT_MIN_RATE;
            // The first step of a busy second still drains what was queued before.
            assert!(
                per_sec[s] <= floor + 2 * DEFAULT_FILL_TARGET,
                "second {s}: {per_sec:?}"
            );
            assert!(per_sec[s] >= floor * 9 / 10, "second {s}: {per_sec:?}");
        }
        assert!(per_sec[5] > 10 * GBIT / 2, "recovers: {per_sec:?}");
    }

    #[test]
    fn a_floor_above_the_maximum_is_the_maximum() {
        let mut ctl = Controller::new(RateConfig {
            max_rate: Some(1 << 20),
            min_rate: 100 << 20,
            ..RateConfig::default()
        });
        let b = ctl.step(StepInput {
            acked: 0,
            in_flight: 0,
            app_io: 4096,
        });
        assert_eq!(b, (1u64 << 20) / 10);
    }

    #[test]
    fn pacer_waits_for_the_next_step_when_the_budget_is_spent() {
        let t0 = Instant::now();
        let cfg = RateConfig {
            max_rate: Some(10 << 20),
            ..RateConfig::default()
        };
        let mut p = Pacer::new(cfg, t0);
        assert_eq!(p.poll(t0, 0, 0), None, "the first step grants a budget");
        p.charge(1 << 20); // the whole step's budget (10 MiB/s × 0.1 s)
        assert_eq!(p.poll(t0, 1 << 20, 0), Some(STEP));
        let t1 = t0 + Duration::from_millis(30);
        assert_eq!(p.poll(t1, 1 << 20, 0), Some(Duration::from_millis(70)));
        // A debt carries over: 3 MiB overspent takes three more steps to repay.
        p.charge(3 << 20);
        p.acked(4 << 20);
        let mut t = t0;
        let mut waited = 0;
        loop {
            t += STEP;
            if p.poll(t, 0, 0).is_none() {
                break;
            }
            waited += 1;
        }
        assert_eq!(waited, 3);
        // A long pause does not bank a burst: one step's budget, no more.
        let later = t + Duration::from_secs(60);
        assert_eq!(p.poll(later, 0, 0), None);
        p.charge(1 << 20);
        assert!(p.poll(later, 0, 0).is_some());
        // Application I/O since the last step: the floor.
        let mut p = Pacer::new(RateConfig::default(), t0);
        p.poll(t0, 0, 1000);
        p.charge(p.budget as u64);
        assert!(p.poll(t0 + STEP, 0, 5000).is_none());
        assert_eq!(p.budget as u64, DEFAULT_MIN_RATE / 10);
    }
}
