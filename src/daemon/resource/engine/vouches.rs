//! What the engine asks outside the machine before a node may serve alone: the wire guard (who
//! answers our shelf.slot), the fence command and the witness (claims, and the periodic query
//! status shows). Each runs on a thread of the resource's crew, never on the engine thread,
//! and comes back as an input.

use super::*;

impl Engine {
    /// The wire guard: asks the client network, on a thread of the crew (it waits
    /// [`ResourceSpec::wire_guard_wait`]), who answers our shelf.slot; the answer comes back as an input. A
    /// guard that cannot ask (no raw socket) reports "answered": a node that cannot prove it
    /// may serve, does not.
    pub(super) fn check_wire(&mut self) {
        let res = self.res.clone();
        let started = self.res.crew.spawn("wire-guard", move |_token| {
            let (shelf, slot) = res.spec.aoe;
            let answered = match crate::export::aoe::responders(
                &res.spec.interface,
                shelf,
                slot,
                res.spec.wire_guard_wait,
                WIRE_GUARD_QUERIES,
            ) {
                Ok(macs) if macs.is_empty() => false,
                Ok(macs) => {
                    let macs: Vec<String> = macs.iter().map(|m| m.to_string()).collect();
                    tracing::warn!(resource = %res.spec.name, "wire guard: e{shelf}.{slot} is answered by {}", macs.join(", "));
                    true
                }
                Err(e) => {
                    tracing::error!(resource = %res.spec.name, error = %e, "wire guard: cannot query {}; not serving alone", res.spec.interface);
                    true
                }
            };
            res.send(Input::WireChecked(answered));
        });
        if let Err(e) = started {
            tracing::error!(resource = %self.res.spec.name, error = %e, "cannot start the wire guard");
            self.step(Event::WireChecked { answered: true });
        }
    }

    /// The fence command, on a thread of the crew (it may run for its whole timeout); the
    /// outcome comes back as an input. One that cannot be started did not vouch.
    pub(super) fn fence_peer(&mut self) {
        let Some(spec) = self.res.spec.fence.clone() else {
            tracing::error!(resource = %self.res.spec.name, "no fence command configured");
            self.step(Event::FenceResult {
                outcome: crate::cluster::FenceOutcome::CouldNotRun,
            });
            return;
        };
        let res = self.res.clone();
        let started = self.res.crew.spawn("fence-peer", move |token| {
            let outcome = crate::daemon::fence::run(&spec, &token);
            res.send(Input::FenceDone(outcome));
        });
        if let Err(e) = started {
            tracing::error!(resource = %self.res.spec.name, error = %e, "cannot start the fence command");
            let outcome = crate::cluster::FenceOutcome::CouldNotRun;
            *lock(&self.res.last_fence) = Some((outcome, Instant::now()));
            self.step(Event::FenceResult { outcome });
        }
    }

    /// Every [`crate::daemon::witness::POLL`], a query at the witness on a thread of the crew
    /// (one at a time): status shows whether it is reachable before a failure needs it.
    pub(super) fn poll_witness(&mut self) {
        let Some(spec) = self.res.spec.witness.clone() else {
            return;
        };
        {
            let mut poll = lock(&self.res.witness_poll);
            if poll
                .1
                .is_some_and(|at| at.elapsed() < crate::daemon::witness::POLL)
                || self.res.witness_polling.load(Ordering::Acquire)
            {
                return;
            }
            poll.1 = Some(Instant::now());
        }
        self.res.witness_polling.store(true, Ordering::Release);
        let generation = self.res.meta.uuids().current;
        let res = self.res.clone();
        let started = self.res.crew.spawn("witness-query", move |_token| {
            let reachable = crate::daemon::witness::reachable(&spec, &res.spec.name, generation);
            let now = Instant::now();
            if !reachable {
                *lock(&res.witness_unreachable) = Some(now);
            }
            lock(&res.witness_poll).0 = Some((reachable, now));
            res.witness_polling.store(false, Ordering::Release);
        });
        if started.is_err() {
            self.res.witness_polling.store(false, Ordering::Release);
        }
    }

    /// A claim at the witness for our current data generation, on a thread of the crew (it
    /// may wait for all its tries); the verdict comes back as an input. One that cannot be
    /// started is "unreachable".
    pub(super) fn ask_witness(&mut self) {
        let generation = self.res.meta.uuids().current;
        let unreachable = crate::cluster::WitnessVerdict::Unreachable;
        let Some(spec) = self.res.spec.witness.clone() else {
            tracing::error!(resource = %self.res.spec.name, "no witness configured");
            self.step(Event::WitnessAnswered {
                generation,
                verdict: unreachable,
            });
            return;
        };
        let res = self.res.clone();
        let started = self.res.crew.spawn("witness-claim", move |_token| {
            let verdict = crate::daemon::witness::claim(&spec, &res.spec.name, generation, true);
            res.send(Input::WitnessDone(generation, verdict));
        });
        if let Err(e) = started {
            tracing::error!(resource = %self.res.spec.name, error = %e, "cannot ask the witness");
            self.res.note_witness(generation, unreachable);
            self.step(Event::WitnessAnswered {
                generation,
                verdict: unreachable,
            });
        }
    }

    /// Starts the service group in order (floating IP, AoE, NBD); a step that fails undoes
    /// the others and the machine demotes.
    pub(super) fn start_serving(&mut self) {
        if self.service.is_some() {
            return;
        }
        // Multiple-mount protection: another MAC answering our shelf.slot stops us.
        let guard = {
            let res = self.res.clone();
            crate::export::aoe::RivalAlarm::new(move |mac| res.send(Input::Rival(mac)))
        };
        match ServiceGroup::start(
            &self.res.service,
            self.res.device.clone(),
            self.res.gate.clone(),
            guard,
            &self.res.crew,
        ) {
            Ok(started) => {
                self.ip_up = started.ip_up;
                self.res.ops.serving(started.group.counters());
                self.service = Some(started.group);
            }
            Err(e) => {
                tracing::error!(resource = %self.res.spec.name, "cannot serve: {e}; what had started was stopped");
                self.res.publish(format!(
                    "alarm name:{} service-failed: {}",
                    self.res.spec.name,
                    e.to_string().replace(' ', "_")
                ));
                // Not from inside the step that started it: `step` feeds it next.
                self.service_failed = true;
            }
        }
    }

    /// Stops the service group in reverse order: NBD, AoE, floating IP.
    pub(super) fn stop_serving(&mut self) {
        if let Some(service) = self.service.take() {
            service.stop(&self.res.spec.name);
            tracing::info!(resource = %self.res.spec.name, "stopped serving");
        }
    }

    pub(super) fn shutdown(&mut self) {
        self.stop_serving();
        self.res.wants_connect.store(false, Ordering::Release);
        if let Some(link) = &self.link {
            let _ = link.send(Message::Disconnect(crate::wire::repl::DisconnectRepr {
                reason: DisconnectReason::Shutdown,
                message: "node stopping".into(),
            }));
        }
        self.drop_link();
        if self.machine.status().role == Role::Primary {
            // An orderly stop is a demotion: the next start is not a crashed primary.
            if let Err(e) = self.res.keeper().change_flags(0, flags::PRIMARY_IND) {
                self.res.persist_failed("the demotion", &e);
            }
        }
        // The applier may still be finishing a write from the peer; it cannot start another
        // (the link is down), so wait for it rather than leave the meta-data unclean.
        let still = self.res.meta.wait_for_writes(Duration::from_secs(10));
        if still > 0 {
            tracing::error!(resource = %self.res.spec.name, "{still} writes still in flight at shutdown");
        }
        if let Err(e) = self.res.device.local().flush() {
            tracing::error!(resource = %self.res.spec.name, error = %e, "flush at shutdown failed");
        }
        match self.res.meta.mark_clean() {
            Ok(()) => tracing::info!(resource = %self.res.spec.name, "meta-data marked clean"),
            Err(e) => {
                tracing::error!(resource = %self.res.spec.name, error = %e, "cannot mark the meta-data clean")
            }
        }
        // The connection's threads ended with the link; join them and anything else started.
        self.res.crew.stop();
    }
}
