//! The engine: one per resource, on a thread of its own. It owns the cluster [`Machine`], the
//! peer connection, the exports (AoE, NBD) and the resync job — nobody else touches them. It
//! feeds the machine what the other roles report through the [`Input`] channel (and ticks),
//! and carries out the machine's [`Action`]s: what a restart must keep by the persistent
//! executor ([`crate::cluster::persist`], which the simulator runs too), the rest here. After
//! every step it publishes the machine's status for `status` and the connector.

use super::*;

mod vouches;

/// The engine's state (see the module docs). Only the engine thread has it.
pub(super) struct Engine {
    pub(super) res: Arc<Resource>,
    pub(super) machine: Machine,
    pub(super) link: Option<Arc<PeerLink>>,
    /// The service group (floating IP, AoE, NBD) while serving.
    pub(super) service: Option<ServiceGroup>,
    /// When the floating IP went up in this step, for the failover timeline.
    pub(super) ip_up: Option<Instant>,
    /// The service group failed to start in this step (see `start_serving`).
    pub(super) service_failed: bool,
    pub(super) job: Option<Job>,
    /// Shared with the copier: `pause-sync` holds it.
    pub(super) paused: Arc<AtomicBool>,
    pub(super) source_at_start: Option<UuidSet>,
    pub(super) last_ping: Instant,
    pub(super) last_alive_seen: Option<Instant>,
    pub(super) last_progress_event: Instant,
    /// The lease had lapsed at the last look (see `watch_lease`).
    pub(super) lease_lapsed: bool,
    /// What the heartbeat last told the machine (see `listen`).
    pub(super) last_heard: Option<Event>,
    /// The ping targets' figures (ours, the peer's) last fed to the machine.
    pub(super) last_reach: Option<(Option<u8>, Option<u8>)>,
    /// Pauses of the process the heartbeat reported, as far as the machine was told.
    pub(super) pauses_seen: u64,
    /// The failover being timed, and the AoE replies and announces counted when the gate
    /// opened.
    pub(super) stopwatch: Option<(Stopwatch, Counts)>,
}

/// AoE counters the failover stopwatch compares.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Counts {
    replies: u64,
    announces: u64,
}

impl Engine {
    /// Makes the machine's current status visible to the other roles.
    fn publish_state(&self) {
        *lock(&self.res.published) = Published {
            status: self.machine.status(),
            uuid_flags: self.machine.uuid_flags(),
        };
    }

    /// The engine loop: inputs and ticks until the token is cancelled, then the orderly stop.
    pub(super) fn run(mut self, rx: Receiver<Input>, token: CancellationToken) {
        while !token.is_cancelled() {
            self.res.ops.beat(self.res.now_ms());
            match rx.recv_timeout(TICK) {
                Ok(input) => {
                    // What the heartbeat knows (a pause above all) goes in before anything
                    // that arrived meanwhile.
                    self.listen();
                    self.handle(input)
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            self.tick();
        }
        self.shutdown();
    }

    pub(super) fn step(&mut self, event: Event) -> Vec<Action> {
        let before = self.machine.status();
        let decided = Instant::now();
        let actions = self.machine.step(Instant::now(), event);
        // A gate closes before the actions run (failing writes over to dirty bits completes
        // them: their replies must find the gate shut); it opens only after them, once what
        // it stands on (a new generation, the exports) is in place.
        let authority = self.machine.status().authority;
        let narrower = match authority {
            Authority::Closed => true,
            Authority::Lease => self.res.gate.authority() == Authority::Open,
            Authority::Open => false,
        };
        if narrower {
            self.res.gate.set(authority);
        }
        self.execute(actions.clone());
        self.res.gate.set(authority);
        self.publish_state();
        if self.link.is_none() {
            // Only now may the connector offer a new connection: with this step's role.
            self.res.linked.store(false, Ordering::Release);
        }
        self.announce();
        self.time_failover(&event, &before, &actions, decided);
        if std::mem::take(&mut self.service_failed) {
            self.step(Event::ServiceFailed);
        }
        actions
    }

    /// AoE replies and announces sent so far (0 while not serving).
    fn counts(&self) -> Counts {
        let Some(aoe) = self.service.as_ref().and_then(ServiceGroup::aoe) else {
            return Counts::default();
        };
        let sum = |f: fn(&crate::export::aoe::BladeStats) -> &AtomicU64| {
            aoe.stats()
                .iter()
                .map(|(_, s)| f(s).load(Ordering::Relaxed))
                .sum()
        };
        Counts {
            replies: sum(|s| &s.replies),
            announces: sum(|s| &s.announces),
        }
    }

    /// The failover stopwatch: starts when the peer is declared lost (from when it was last
    /// heard) or a primary loses its link, marks each milestone of this step, and ends at the
    /// first client request answered afterwards (see `tick`), at a demotion, or when the peer
    /// is heard again with nothing taken over.
    fn time_failover(
        &mut self,
        event: &Event,
        before: &crate::cluster::Status,
        actions: &[Action],
        decided: Instant,
    ) {
        let now = Instant::now();
        let s = self.machine.status();
        if self.stopwatch.is_none() {
            let could_serve = s.role == Role::Primary || s.disk == DiskState::UpToDate;
            if matches!(event, Event::PeerSilent) && could_serve {
                let heard_ago = self
                    .res
                    .heartbeat
                    .paths()
                    .iter()
                    .filter_map(|p| p.last_heard_age)
                    .min();
                let since = heard_ago
                    .and_then(|age| now.checked_sub(age))
                    .unwrap_or(now);
                let mut watch = Stopwatch::start(since, "peer last heard");
                watch.mark("declared lost", now);
                self.stopwatch = Some((watch, Counts::default()));
            } else if before.conn == ConnState::Connected
                && s.conn != ConnState::Connected
                && before.role == Role::Primary
            {
                self.stopwatch = Some((
                    Stopwatch::start(now, "replication link lost"),
                    Counts::default(),
                ));
            } else {
                return;
            }
        }
        let counts = self.counts();
        let ip_up = self.ip_up.take();
        let Some((watch, at_open)) = &mut self.stopwatch else {
            return;
        };
        // In the order it happened: what this step heard and decided (at `decided`), then
        // what carrying it out brought up (the floating IP, the exports: by `now`).
        match event {
            Event::WireChecked { answered: false } => watch.mark("nobody else answers", decided),
            Event::PeerHeard(Some(p)) if p.outdated => watch.mark("peer outdated", decided),
            Event::FenceResult { outcome } if outcome.vouches() => {
                watch.mark("fence-peer vouched", decided)
            }
            Event::FenceResult { .. } => watch.mark("fence-peer refused", decided),
            Event::WitnessAnswered {
                verdict: crate::cluster::WitnessVerdict::Granted,
                ..
            } => watch.mark("witness granted", decided),
            Event::WitnessAnswered { .. } => watch.mark("witness refused", decided),
            _ => {}
        }
        if s.outdate_request {
            watch.mark("asked the peer to step aside", decided);
        }
        if before.role != Role::Primary && s.role == Role::Primary {
            watch.mark("promoted", decided);
        }
        for action in actions {
            match action {
                Action::CheckWire => watch.mark("wire guard asked", decided),
                Action::FencePeer => watch.mark("fence-peer started", decided),
                Action::AskWitness => watch.mark("witness asked", decided),
                Action::NewCurrentUuid => watch.mark("new generation", decided),
                _ => {}
            }
        }
        if let Some(at) = ip_up {
            watch.mark("floating IP up", at);
        }
        if actions.contains(&Action::StartServing) {
            watch.mark("exports started", now);
        }
        if s.serving && s.authority != Authority::Closed && !watch.reached("answering") {
            watch.mark("answering", now);
            *at_open = counts;
        }
        let demoted = before.role == Role::Primary && s.role != Role::Primary;
        let back = matches!(event, Event::PeerHeard(_))
            && s.role == Role::Secondary
            && !watch.reached("promoted");
        if demoted {
            watch.mark("demoted", now);
        }
        if demoted || back {
            self.finish_failover(if demoted {
                "demoted"
            } else {
                "the peer is heard again"
            });
        }
    }

    /// Marks the first announce from the service MAC after the gate opened; a timed failover
    /// is over once a client request was answered after that.
    fn watch_first_reply(&mut self) {
        let counts = self.counts();
        let now = Instant::now();
        let Some((watch, at_open)) = &mut self.stopwatch else {
            return;
        };
        if watch.reached("answering")
            && counts.announces > at_open.announces
            && !watch.reached("MAC announced")
        {
            watch.mark("MAC announced", now);
        }
        if watch.reached("answering") && counts.replies > at_open.replies {
            watch.mark("first reply", now);
            self.finish_failover("served");
        } else if watch.elapsed(now) > FAILOVER_TIMEOUT {
            self.finish_failover("no client request answered within two minutes");
        }
    }

    fn finish_failover(&mut self, outcome: &str) {
        let Some((watch, _)) = self.stopwatch.take() else {
            return;
        };
        let (counted, served_in) = match outcome {
            "served" => (FailoverOutcome::Served, watch.to("first reply")),
            "demoted" => (FailoverOutcome::Demoted, None),
            "the peer is heard again" => (FailoverOutcome::PeerBack, None),
            _ => (FailoverOutcome::TimedOut, None),
        };
        self.res.ops.failover(counted, served_in);
        let name = &self.res.spec.name;
        tracing::info!(resource = %name, "failover timeline ({outcome}): {watch}");
        let line = format!("{outcome}: {watch}");
        self.res.publish(format!(
            "change resource name:{name} failover:{}",
            line.replace(' ', "_")
        ));
        *lock(&self.res.last_failover) = Some(line);
    }

    /// What the peer's heartbeat should say about this resource now.
    fn announce(&self) {
        let s = self.machine.status();
        self.res.heartbeat.publish(
            &self.res.spec.name,
            LocalResource {
                role: s.role,
                serving: s.serving,
                up_to_date: s.disk == DiskState::UpToDate,
                outdated: s.disk == DiskState::Outdated,
                outdate_request: s.outdate_request,
                handing_over: s.handing_over(),
                wants_switchover: s.wants_switchover(),
            },
        );
    }

    /// Feeds the machine what the heartbeat hears, when it changed: heard on some path (with
    /// what the peer says about this resource), or silent on every path for the dead time;
    /// and both nodes' reach of the ping targets.
    /// Right after start, neither: nothing is fed until the peer is heard or provably silent.
    fn listen(&mut self) {
        // A pause first: whatever the heartbeat hears after it must be judged knowing that.
        let (pauses, last_pause) = self.res.heartbeat.pauses();
        if pauses != self.pauses_seen {
            self.pauses_seen = pauses;
            self.step(Event::StoodStill { length: last_pause });
        } else if let Some(quiet) = self.res.heartbeat.quiet_for() {
            self.step(Event::StoodStill { length: quiet });
        }
        let hb = &self.res.heartbeat;
        let heard = hb.peer_heard();
        let now = if heard {
            Some(Event::PeerHeard(hb.peer_resource(&self.res.spec.name).map(
                |p| PeerSeen {
                    role: p.role,
                    serving: p.serving,
                    up_to_date: p.up_to_date,
                    outdated: p.outdated,
                    outdate_request: p.outdate_request,
                    handing_over: p.handing_over,
                    wants_switchover: p.wants_switchover,
                },
            )))
        } else if hb.peer_dead() {
            Some(Event::PeerSilent)
        } else {
            None
        };
        let reach = (hb.own_reach(), hb.peer_reach());
        if let Some(event) = now {
            if self.last_heard != Some(event) {
                self.last_heard = Some(event);
                self.step(event);
            }
        }
        if self.last_reach != Some(reach) {
            self.last_reach = Some(reach);
            self.step(Event::Reach {
                own: reach.0,
                peer: reach.1,
            });
        }
    }

    /// Logs each lapse of the lease while the exports depend on it (a spurious lapse on a busy
    /// machine is a figure the soak test counts).
    fn watch_lease(&mut self) {
        let under_lease = self.machine.status().authority == Authority::Lease;
        let lapsed = under_lease && !self.res.gate.may_answer();
        if lapsed && !self.lease_lapsed {
            self.res.lease_lapses.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(resource = %self.res.spec.name, "lease lapsed: answering nothing until the peer hears us again");
            self.res.publish(format!(
                "change resource name:{} lease:lapsed",
                self.res.spec.name
            ));
        } else if !lapsed && self.lease_lapsed && under_lease {
            tracing::info!(resource = %self.res.spec.name, "lease renewed: answering again");
            self.res.publish(format!(
                "change resource name:{} lease:held",
                self.res.spec.name
            ));
        }
        self.lease_lapsed = lapsed;
    }

    pub(super) fn tick(&mut self) {
        if let Some(link) = self.link.clone() {
            let heard = link.last_heard();
            if self.last_alive_seen != Some(heard) {
                self.last_alive_seen = Some(heard);
                self.step(Event::PeerAlive);
            }
            self.step(Event::PeerWrites {
                oldest_pending: link.oldest_pending(),
            });
            if self.last_ping.elapsed() >= self.res.spec.ping_interval {
                self.last_ping = Instant::now();
                // Never wait for the sender: if it is busy, data is flowing, which the peer
                // hears as well as a ping; and a sender stuck on a dead link must not stop
                // this thread from noticing that the peer has gone silent. The cookie is the
                // send time: its answer renews the lease (see the reader).
                let cookie = crate::ha::clock::now_nanos();
                let _ = link.try_send(Message::Ping(PingRepr { cookie }));
            }
        }
        self.listen();
        self.step(Event::Tick);
        self.poll_witness();
        self.watch_lease();
        self.watch_first_reply();
        self.publish_progress(false);
    }

    pub(super) fn handle(&mut self, input: Input) {
        match input {
            Input::Command(command, reply) => {
                let actions = self.step(Event::Command(command));
                let refused = actions.iter().find_map(|a| match a {
                    Action::Refuse { reason, .. } => Some(reason.to_string()),
                    _ => None,
                });
                let logs: Vec<String> = actions
                    .iter()
                    .filter_map(|a| match a {
                        Action::Log(l) => Some(l.clone()),
                        _ => None,
                    })
                    .collect();
                let _ = reply.send(match refused {
                    Some(r) => Err(format!("{command}: refused: {r}")),
                    None => Ok(logs.join("\n")),
                });
            }
            Input::PeerUp(hs) => self.peer_up(*hs),
            Input::PeerMessage(conn_id, message) => {
                if self.link.as_ref().map(|l| l.conn_id) == Some(conn_id) {
                    self.peer_message(message);
                }
            }
            Input::PeerDown(conn_id, why) => {
                if self.link.as_ref().map(|l| l.conn_id) == Some(conn_id) {
                    tracing::warn!(resource = %self.res.spec.name, "connection to {} lost: {why}", self.res.spec.identity.peer);
                    self.drop_link();
                    self.step(Event::PeerLost);
                }
            }
            Input::Device(DeviceEvent::LocalIoError) => {
                self.step(Event::LocalIoError);
            }
            Input::Device(DeviceEvent::PeerIoError) => {
                // The reader marked what the peer may have lost; make it durable here.
                if let Err(e) = self.res.meta.flush_bitmap() {
                    self.res.persist_failed("the bitmap", &e.to_string());
                }
            }
            Input::CopierDone(conn_id, ok) => {
                if self.link.as_ref().map(|l| l.conn_id) != Some(conn_id) {
                    return;
                }
                if let Some(job) = &mut self.job {
                    job.copier_started = false;
                }
                if ok && self.job.as_ref().map(|j| j.direction) == Some(SyncDirection::Source) {
                    self.res.progress.end(self.res.now_ms());
                    self.publish_progress(true);
                    if let Err(e) = persist::finish_resync_source(&mut self.res.keeper()) {
                        self.res.persist_failed("the end of the resync", &e);
                    }
                    if let Some(link) = &self.link {
                        let _ = link.send(Message::SyncDone);
                    }
                    self.set_job(None);
                    tracing::info!(resource = %self.res.spec.name, "resync finished (source)");
                    self.step(Event::ResyncDone);
                }
            }
            Input::Heartbeat => self.listen(),
            Input::Stall(d) => {
                tracing::warn!(resource = %self.res.spec.name, "test hook: the engine stands still for {d:?}");
                std::thread::sleep(d);
            }
            Input::WireChecked(answered) => {
                self.step(Event::WireChecked { answered });
            }
            Input::FenceDone(outcome) => {
                *lock(&self.res.last_fence) = Some((outcome, Instant::now()));
                self.step(Event::FenceResult { outcome });
            }
            Input::WitnessDone(generation, verdict) => {
                self.res.note_witness(generation, verdict);
                self.step(Event::WitnessAnswered {
                    generation,
                    verdict,
                });
            }
            Input::Rival(mac) => {
                tracing::error!(resource = %self.res.spec.name, "another MAC ({mac}) answers e{}.{}: multiple-mount protection", self.res.spec.aoe.0, self.res.spec.aoe.1);
                self.step(Event::RivalAnswered);
            }
            Input::Verify(reply) => {
                let _ = reply.send(self.start_verify());
            }
            Input::VerifyDone(conn_id, ok) => self.verify_done(conn_id, ok),
        }
    }

    /// The current resync job; the device learns whether this node is a resync target.
    pub(super) fn set_job(&mut self, job: Option<Job>) {
        self.res.device.set_sync_target(
            job.as_ref()
                .is_some_and(|j| j.direction == SyncDirection::Target),
        );
        self.job = job;
    }

    pub(super) fn drop_link(&mut self) {
        self.res.device.set_link(None);
        if let Some(link) = self.link.take() {
            link.fail_all();
        }
        // `linked` stays set until the step that follows has published the machine's new
        // state (see `step`): the connector's next handshake must carry our role after it.
        self.set_job(None);
        self.last_alive_seen = None;
    }

    pub(super) fn peer_up(&mut self, hs: Handshaken) {
        let conn_id = self.res.conn_ids.fetch_add(1, Ordering::Relaxed);
        if !self.res.wants_connect.load(Ordering::Acquire) || self.link.is_some() {
            return;
        }
        let ours = self.res.uuid_set(self.machine.uuid_flags());
        // A new generation started while the handshake was in flight (a fenced peer's Outdated
        // arrived meanwhile): the peer judged UUIDs we no longer hold. Start over, or the two
        // sides would decide differently.
        if (hs.sent_uuids.current, hs.sent_uuids.bitmap) != (ours.current, ours.bitmap) {
            tracing::info!(resource = %self.res.spec.name, "our generation changed during the handshake: reconnecting");
            return;
        }
        let theirs: UuidSet = hs.uuids.into();
        static REFUSALS: LogLimiter = LogLimiter::new(Duration::from_secs(30), 2);
        // The machine judges the peer's terms (and may shrink the device) before anything of
        // this connection is set up; a refused peer changes nothing.
        let offer = Event::PeerOffered {
            ours: Terms {
                size: self.res.device.size(),
                protocol: self.res.spec.protocol,
                durability: self.res.spec.durability,
                checksum_alg: self.res.spec.csums,
            },
            theirs: Terms {
                size: hs.params.size,
                protocol: hs.params.protocol,
                durability: hs.params.durability,
                checksum_alg: hs.params.checksum_alg,
            },
        };
        let actions = self.step(offer);
        if let Some(reason) = actions.iter().find_map(|a| match a {
            Action::RefusePeer { reason } => Some(reason),
            _ => None,
        }) {
            crate::warn_limited!(REFUSALS, resource = %self.res.spec.name, "refusing the peer: {reason}");
            return;
        }
        let Handshaken { conn, params, .. } = hs;
        // A send blocked longer than the peer may stay silent means the peer is gone: fail
        // the link then, rather than hold the sender (and everyone queued behind it) until
        // TCP gives up many minutes later.
        let _ = conn.stream.set_write_timeout(Some(
            self.machine.config().dead_time.max(Duration::from_secs(1)),
        ));
        let reader_stream = match conn.stream.try_clone() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("cannot clone the peer socket: {e}");
                return;
            }
        };
        let link = Arc::new(PeerLink::new(
            conn_id,
            self.res.spec.identity.peer.clone(),
            conn.stream,
            conn.version,
            conn.seq_out,
        ));
        self.link = Some(link.clone());
        self.res.linked.store(true, Ordering::Release);
        self.source_at_start = Some(theirs);
        tracing::info!(resource = %self.res.spec.name, "connected to {}; our UUIDs {ours}, theirs {theirs}", self.res.spec.identity.peer);
        self.step(Event::PeerConnected);
        let s = self.machine.status();
        let decision = if s.disk == DiskState::Diskless || params.disk == DiskState::Diskless {
            None
        } else {
            let ctx = HandshakeContext {
                local_role: s.role,
                peer_role: params.role,
                resolve_conflicts: hs.resolve_conflicts,
            };
            Some(decide(&ours, &theirs, &ctx))
        };
        if let Some(d) = &decision {
            tracing::info!(resource = %self.res.spec.name, "handshake: {}", d.name());
        }
        // The reader starts before the machine reacts, so nothing the peer sends is lost.
        let decoder = conn.decoder;
        {
            let me = self.res.clone();
            let link = link.clone();
            let started = self
                .res
                .crew
                .spawn(format!("reader-{}", self.res.spec.name), move |_| {
                    me.reader(link, reader_stream, decoder)
                });
            if let Err(e) = started {
                tracing::error!(resource = %self.res.spec.name, "cannot start the connection's reader: {e}");
                self.drop_link();
                self.step(Event::PeerLost);
                return;
            }
        }
        self.step(Event::Handshake {
            decision,
            peer_role: params.role,
            peer_disk: params.disk,
        });
    }

    pub(super) fn peer_message(&mut self, message: Message) {
        match message {
            Message::SyncPause(paused) => {
                // Either node's pause-sync holds the resync on both; the echo of our own
                // pause finds the state already changed and does nothing.
                let repl = self.machine.status().repl;
                let running = matches!(repl, ReplState::SyncSource | ReplState::SyncTarget);
                let held = matches!(repl, ReplState::PausedSyncS | ReplState::PausedSyncT);
                if paused && running {
                    self.step(Event::Command(Command::PauseSync));
                } else if !paused && held {
                    self.step(Event::Command(Command::ResumeSync));
                }
            }
            Message::StateChange(s) => {
                self.step(Event::PeerState {
                    role: s.role,
                    disk: s.disk,
                });
            }
            Message::SyncStart(s) => {
                let direction = if s.sender_is_source {
                    SyncDirection::Target
                } else {
                    SyncDirection::Source
                };
                self.step(Event::PeerStartedResync {
                    direction,
                    full: s.full,
                });
            }
            Message::Uuids(u) => self.source_at_start = Some(u.into()),
            Message::SyncUuid(sync_uuid) => {
                if let Err(e) = persist::adopt_sync_uuid(&mut self.res.keeper(), sync_uuid) {
                    self.res.persist_failed("the sync UUID", &e);
                }
            }
            Message::BitmapChunk(c) => {
                // The bits were applied by the applier thread, in order with the resync data.
                if c.last {
                    if let Some(job) = &mut self.job {
                        job.peer_bitmap_done = true;
                        let total = self.res.meta.out_of_sync_bytes();
                        self.res.progress.total.store(total, Ordering::Relaxed);
                    }
                    self.maybe_start_copier();
                }
            }
            Message::SyncDone => {
                if self.job.as_ref().map(|j| j.direction) == Some(SyncDirection::Target) {
                    let source = self.source_at_start;
                    if let Err(e) =
                        persist::finish_resync_target(&mut self.res.keeper(), source.as_ref())
                    {
                        self.res.persist_failed("the end of the resync", &e);
                    }
                    self.set_job(None);
                    self.res.progress.end(self.res.now_ms());
                    self.publish_progress(true);
                    tracing::info!(
                        resource = %self.res.spec.name,
                        "resync finished (target): {} bytes received, {} equal, {} zero",
                        self.res.progress.sent.load(Ordering::Relaxed),
                        self.res.progress.same.load(Ordering::Relaxed),
                        self.res.progress.zero.load(Ordering::Relaxed)
                    );
                    self.step(Event::ResyncDone);
                }
            }
            Message::Disconnect(d) => {
                tracing::warn!(resource = %self.res.spec.name, "the peer disconnected: {} {}", d.reason, d.message);
                self.drop_link();
                self.step(Event::PeerDropped { reason: d.reason });
            }
            other => {
                tracing::debug!("ignored {:?} from the peer", other.msg_type());
            }
        }
    }

    pub(super) fn execute(&mut self, actions: Vec<Action>) {
        for action in actions {
            // What a restart must know first, by the executor the simulator runs too.
            let started = persist::execute(&mut self.res.keeper(), &action, &mut || {
                random_uuid(&mut rand::rng())
            })
            .unwrap_or_else(|e| {
                self.res.persist_failed(&format!("{action:?}"), &e);
                None
            });
            self.execute_one(action, started);
        }
        let s = self.machine.status();
        // The connected peer has no disk: the writes it forwards exist only here.
        let peer_diskless = s.conn == ConnState::Connected && s.peer_disk == DiskState::Diskless;
        self.res
            .peer_diskless
            .store(peer_diskless, Ordering::Release);
    }

    pub(super) fn execute_one(&mut self, action: Action, started: Option<SourceStarted>) {
        let res = self.res.clone();
        let name = &res.spec.name;
        match action {
            Action::StartServing => self.start_serving(),
            Action::StopServing => self.stop_serving(),
            Action::Connect => self.res.wants_connect.store(true, Ordering::Release),
            Action::Disconnect { reason } => {
                self.res.wants_connect.store(false, Ordering::Release);
                // A timed-out link is dead: telling it why would only block this thread on a
                // full socket. Otherwise a try: the engine never waits for the network.
                if let (Some(link), false) = (&self.link, reason == DisconnectReason::Timeout) {
                    let _ = link.try_send(Message::Disconnect(crate::wire::repl::DisconnectRepr {
                        reason,
                        message: String::new(),
                    }));
                }
                self.drop_link();
                // The machine decides whether to reconnect (a later Connect action).
                if reason != DisconnectReason::Shutdown {
                    tracing::warn!(resource = %name, "disconnected: {reason}");
                }
            }
            Action::SendState { role, disk, conn } => {
                if let Some(link) = &self.link {
                    let _ = link.send(Message::StateChange(StateChangeRepr { role, disk, conn }));
                }
            }
            Action::StartResync {
                direction,
                full,
                tell_peer,
            } => {
                let Some(link) = self.link.clone() else {
                    return;
                };
                if tell_peer {
                    let _ = link.send(Message::SyncStart(SyncStartRepr {
                        sender_is_source: direction == SyncDirection::Source,
                        full,
                    }));
                }
                self.paused.store(false, Ordering::Release);
                // Bits beyond a size shrunk to the peer's are never resynced: drop them.
                let size = self.res.device.size();
                let data_size = self.res.meta.data_size();
                if data_size > size {
                    self.res.meta.clear_in_sync(size, data_size - size);
                }
                if !full {
                    self.res.send_bitmap(&link);
                }
                self.res
                    .progress
                    .begin(self.res.meta.out_of_sync_bytes(), self.res.now_ms());
                if direction == SyncDirection::Source {
                    // The executor rotated our UUIDs; the target learns the result.
                    let Some(started) = started else {
                        tracing::error!(resource = %name, "resync not started: the generation UUIDs could not be written");
                        return;
                    };
                    let _ = link.send(Message::Uuids(UuidsRepr::from(UuidSet {
                        dirty_bits: self.res.meta.out_of_sync_bytes() / 4096,
                        flags: self.machine.uuid_flags(),
                        ..started.at_start
                    })));
                    let _ = link.send(Message::SyncUuid(started.sync_uuid));
                }
                tracing::info!(resource = %name, "resync: {direction:?}, {}", if full { "full" } else { "bitmap" });
                self.set_job(Some(Job {
                    direction,
                    full,
                    peer_bitmap_done: false,
                    copier_started: false,
                }));
                self.maybe_start_copier();
            }
            Action::PauseResync | Action::ResumeResync => {
                let paused = action == Action::PauseResync;
                self.paused.store(paused, Ordering::Release);
                if let Some(link) = &self.link {
                    let _ = link.send(Message::SyncPause(paused));
                }
            }
            // Persisted by the executor before this.
            Action::NewCurrentUuid | Action::PersistFlags { .. } => {}
            Action::Shrink { size } => self.res.device.limit_size(size),
            Action::RefusePeer { reason } => {
                tracing::debug!(resource = %name, "peer refused: {reason}")
            }
            Action::Replicate(true) => match &self.link {
                Some(link) => self.res.device.set_link(Some(link.clone())),
                None => tracing::error!(resource = %name, "replicate: no connection"),
            },
            Action::Replicate(false) => self.res.device.set_link(None),
            Action::MarkOutOfSync => {
                // Waiting writes fail over to dirty bits; new writes are marked from now on.
                self.res.device.set_link(None);
                if let Some(link) = &self.link {
                    link.fail_all();
                }
            }
            Action::Detach => self.res.device.detach(),
            Action::CheckWire => self.check_wire(),
            Action::FencePeer => self.fence_peer(),
            Action::AskWitness => self.ask_witness(),
            Action::Notify(n) => {
                // drbdsetup events2 style: `change <object> name:<res> <key>:<value>`.
                let line = match &n {
                    Notification::Change { object, key, value } => {
                        format!("change {object} name:{name} {key}:{value}")
                    }
                    Notification::Rival => {
                        tracing::error!(resource = %name, "{n}");
                        format!("alarm name:{name} multiple-mount: another MAC answers this resource's shelf.slot; stopped serving")
                    }
                    Notification::SplitBrain(why) => {
                        tracing::error!(resource = %name, "Split-Brain detected: {why}; dropping the connection");
                        format!("call helper name:{name} split-brain: {why}")
                    }
                };
                self.res.publish(line);
            }
            Action::Log(l) => tracing::info!(resource = %name, "{l}"),
            Action::Refuse { command, reason } => {
                tracing::warn!(resource = %name, "{command} refused: {reason}")
            }
        }
    }
}
