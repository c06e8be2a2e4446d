//! The heartbeat thread of [`super::Heartbeat`]: the path sockets, the loop that sends and
//! receives on them, and what it concludes from each accepted datagram (the peer's state, our
//! lease, the peer's death). It shares only [`super::Shared`] with the handles.

use super::*;

/// The `SCHED_FIFO` priority the heartbeat thread asks for: above every normal thread, low
/// among real-time ones (corosync uses the same range), so it never starves kernel threads.
const REALTIME_PRIORITY: libc::c_int = 5;

/// A non-blocking UDP socket bound to `address`.
///
/// Deliberately without `SO_REUSEADDR`: for UDP on Linux it lets a second socket bind the
/// same address and port, and unicast datagrams then go to only one of them. A second daemon
/// (or a stray test) would silently steal the peer's heartbeats and answer them with its own
/// boot nonce; without the option it fails to start with an error naming the address. UDP has
/// no TIME_WAIT, so a restarted daemon binds again at once without it.
pub(super) fn bind_exclusive(address: SocketAddr) -> io::Result<UdpSocket> {
    let socket = UdpSocket::bind(address)?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// Asks for `SCHED_FIFO` for the calling thread; says once per process if that is refused.
fn try_realtime_priority() {
    static REFUSAL_LOGGED: AtomicBool = AtomicBool::new(false);
    let param = libc::sched_param {
        sched_priority: REALTIME_PRIORITY,
    };
    // SAFETY: pid 0 is the calling thread on Linux; `param` is a valid sched_param.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
    if rc == 0 {
        tracing::debug!(
            priority = REALTIME_PRIORITY,
            "heartbeat thread runs SCHED_FIFO"
        );
    } else if !REFUSAL_LOGGED.swap(true, Ordering::Relaxed) {
        tracing::info!(
            "heartbeat thread runs at normal priority: SCHED_FIFO refused ({})",
            io::Error::last_os_error()
        );
    }
}

pub(super) struct PathSocket {
    pub(super) path: HeartbeatPath,
    pub(super) peer: SocketAddr,
    pub(super) socket: UdpSocket,
}

/// The heartbeat thread's own state: nothing here is shared.
pub(super) struct Runner {
    pub(super) shared: Arc<Shared>,
    pub(super) secret: Vec<u8>,
    pub(super) interval: Duration,
    pub(super) sockets: Vec<PathSocket>,
    pub(super) woken: UnixDatagram,
    pub(super) boot_nonce: u64,
    pub(super) next_sequence: u64,
    pub(super) replay: ReplayWindow,
    /// The peer boot we last accepted a datagram from, and the highest sequence of it whose
    /// resource entries we took.
    pub(super) peer_latest: Option<(u64, u64)>,
    /// `peer_dead` as subscribers were last told.
    pub(super) reported_dead: bool,
    /// The `sent µs` of our heartbeats of the last dead time, oldest first: an echo must name
    /// one of them.
    pub(super) recent_sends: VecDeque<u64>,
    pub(super) send_buf: Vec<u8>,
    pub(super) recv_buf: Vec<u8>,
}

/// Why an authenticated datagram was still refused.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("sent by {0:?}, not the configured peer")]
    WrongSender(String),
    #[error("echoes a send time that is not one of our recent heartbeats")]
    UnknownEcho,
    #[error("echoes a send time in the future")]
    EchoFromTheFuture,
    #[error("echoes a heartbeat older than the dead time")]
    StaleEcho,
    #[error(transparent)]
    Replayed(#[from] Refused),
}

/// Calls each distinct callback once.
pub(super) fn fire(callbacks: Vec<Callback>) {
    let mut called: Vec<Callback> = Vec::with_capacity(callbacks.len());
    for callback in callbacks {
        if !called.iter().any(|done| Arc::ptr_eq(done, &callback)) {
            callback();
            called.push(callback);
        }
    }
}

impl Runner {
    pub(super) fn run(mut self, token: CancellationToken) {
        try_realtime_priority();
        let mut next_send = Instant::now();
        let mut last_round = next_send;
        while !token.is_cancelled() {
            let now = Instant::now();
            self.note_pause(now.saturating_duration_since(last_round));
            last_round = now;
            self.shared
                .last_round_nanos
                .store(clock::nanos_at(now), Ordering::Release);
            if now >= next_send {
                self.send_heartbeats();
                next_send = now + self.interval;
            }
            self.note_dead_flip(Instant::now());
            let wait = next_send.saturating_duration_since(Instant::now());
            let (readable, woken) = match self.poll(wait) {
                Ok(ready) => ready,
                Err(e) => {
                    static POLL_LOG: LogLimiter = LogLimiter::new(Duration::from_secs(10), 3);
                    crate::warn_limited!(POLL_LOG, "heartbeat poll failed: {e}");
                    // Do not spin: wait out the interval before trying again.
                    std::thread::sleep(wait);
                    continue;
                }
            };
            for index in readable {
                self.receive_all(index);
            }
            if woken {
                let mut drain = [0u8; 16];
                while self.woken.recv(&mut drain).is_ok() {}
                // A publish changed what we announce: tell the peer now.
                self.send_heartbeats();
                next_send = Instant::now() + self.interval;
            }
        }
        tracing::debug!(peer = %self.shared.peer, "heartbeat thread stopped");
    }

    /// Waits up to `wait` for a datagram or a wake-up. Returns the indexes of the readable
    /// path sockets and whether the wake-up channel is readable.
    fn poll(&self, wait: Duration) -> io::Result<(Vec<usize>, bool)> {
        let mut fds: Vec<libc::pollfd> = self
            .sockets
            .iter()
            .map(|path| path.socket.as_raw_fd())
            .chain(std::iter::once(self.woken.as_raw_fd()))
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // Round up, so the thread does not wake a little early and poll again with 0.
        let timeout = wait.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int;
        // SAFETY: `fds` is a live array of `fds.len()` pollfd structures.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                return Ok((Vec::new(), false));
            }
            return Err(err);
        }
        let (wake, sockets) = fds.split_last().expect("the wake-up channel is polled");
        let readable = sockets
            .iter()
            .enumerate()
            .filter(|(_, fd)| fd.revents != 0)
            .map(|(index, _)| index)
            .collect();
        Ok((readable, wake.revents != 0))
    }

    fn take_sequence(&mut self) -> u64 {
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        sequence
    }

    /// The summary role and flags, and the entries, for what we announce now. The role is
    /// Primary if any resource is, Secondary if any is announced at all; serving if any
    /// resource is served; up to date if every announced resource is.
    fn announcement(&self) -> (Role, StatusFlags, Vec<ResourceEntry>) {
        let st = lock(&self.shared.state);
        let role = if st.local.values().any(|r| r.role == Role::Primary) {
            Role::Primary
        } else if st.local.is_empty() {
            Role::Unknown
        } else {
            Role::Secondary
        };
        let answering = |name: &String, r: &LocalResource| {
            r.serving && st.gates.get(name).is_none_or(|gate| gate.may_answer())
        };
        let flags = StatusFlags::new(
            st.local.iter().any(|(name, r)| answering(name, r)),
            !st.local.is_empty() && st.local.values().all(|r| r.up_to_date),
        );
        let entries = st
            .local
            .iter()
            .map(|(name, r)| ResourceEntry {
                name: name.clone(),
                role: r.role,
                flags: r.flags().with(ResourceFlags::SERVING, answering(name, r)),
            })
            .collect();
        (role, flags, entries)
    }

    fn datagram(&mut self, kind: Kind, path: u8, echo_us: u64) -> HeartbeatRepr {
        let (role, flags, resources) = self.announcement();
        HeartbeatRepr {
            kind,
            path,
            role,
            flags,
            name: self.shared.node.clone(),
            boot_nonce: self.boot_nonce,
            sequence: self.take_sequence(),
            sent_us: clock::now_nanos() / 1000,
            echo_us,
            reach: lock(&self.shared.state).own_reach,
            resources,
        }
    }

    pub(super) fn send_heartbeats(&mut self) {
        for index in 0..self.sockets.len() {
            let repr = self.datagram(Kind::Heartbeat, self.sockets[index].path.id, 0);
            self.remember_send(repr.sent_us);
            self.send(index, &repr);
        }
    }

    /// Remembers a heartbeat's send time, forgetting those an echo could no longer renew the
    /// lease with (older than the dead time). The cap only matters if publishes come in a
    /// flood; then the oldest go first, and their late echoes are merely refused.
    fn remember_send(&mut self, sent_us: u64) {
        const MOST_REMEMBERED: usize = 4096;
        let dead_time_us = self.shared.dead_time.as_micros() as u64;
        while self.recent_sends.front().is_some_and(|&oldest| {
            sent_us.saturating_sub(oldest) > dead_time_us
                || self.recent_sends.len() >= MOST_REMEMBERED
        }) {
            self.recent_sends.pop_front();
        }
        self.recent_sends.push_back(sent_us);
    }

    fn send(&mut self, index: usize, repr: &HeartbeatRepr) {
        let len = repr.emit_signed(&self.secret, &mut self.send_buf);
        let path = &self.sockets[index];
        match path.socket.send_to(&self.send_buf[..len], path.peer) {
            Ok(_) => {}
            // The socket buffer is full: this heartbeat is lost like any other datagram.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => {
                static SEND_LOG: LogLimiter = LogLimiter::new(Duration::from_secs(30), 4);
                crate::warn_limited!(
                    SEND_LOG,
                    path = path.path.id,
                    peer = %path.peer,
                    "cannot send a heartbeat: {e}"
                );
            }
        }
    }

    fn receive_all(&mut self, index: usize) {
        loop {
            let mut buf = std::mem::take(&mut self.recv_buf);
            let received = self.sockets[index].socket.recv_from(&mut buf);
            match received {
                Ok((len, from)) => self.handle(index, &buf[..len], from),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.recv_buf = buf;
                    return;
                }
                Err(e) => {
                    self.recv_buf = buf;
                    // Typically a queued ICMP error; reading it cleared it. Next poll.
                    static RECV_LOG: LogLimiter = LogLimiter::new(Duration::from_secs(30), 4);
                    crate::warn_limited!(
                        RECV_LOG,
                        path = self.sockets[index].path.id,
                        "heartbeat receive failed: {e}"
                    );
                    return;
                }
            }
            self.recv_buf = buf;
        }
    }

    fn refuse(&self, index: usize, from: SocketAddr, reason: &dyn std::fmt::Display) {
        static REFUSED_LOG: LogLimiter = LogLimiter::network();
        self.shared.bad_datagrams.fetch_add(1, Ordering::Relaxed);
        crate::warn_limited!(
            REFUSED_LOG,
            path = self.sockets[index].path.id,
            %from,
            "refusing a heartbeat datagram: {reason}"
        );
    }

    pub(super) fn handle(&mut self, index: usize, bytes: &[u8], from: SocketAddr) {
        let now = Instant::now();
        let repr = match HeartbeatRepr::parse_authenticated(bytes, &self.secret) {
            Ok(repr) => repr,
            Err(e) => return self.refuse(index, from, &e),
        };
        match self.accept(&repr, now) {
            Ok(rtt) => self.believe(index, &repr, now, rtt),
            // A late echo of a heartbeat sent before a path went down: most likely the network
            // delivered it late. Counted, but not worth a warning.
            Err(Refusal::StaleEcho) => {
                self.shared.bad_datagrams.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(path = self.sockets[index].path.id, %from, "late echo dropped");
                return;
            }
            Err(refusal) => return self.refuse(index, from, &refusal),
        }
        if repr.kind == Kind::Heartbeat {
            let reply = self.datagram(Kind::EchoReply, self.sockets[index].path.id, repr.sent_us);
            self.send(index, &reply);
        }
        self.note_dead_flip(Instant::now());
    }

    /// Checks an authenticated datagram is from the peer, fresh, and (for an echo) names a
    /// recent heartbeat of ours; returns the round trip it measured, if an echo. Changes
    /// nothing unless it accepts.
    fn accept(&mut self, repr: &HeartbeatRepr, now: Instant) -> Result<Option<Duration>, Refusal> {
        if repr.name != self.shared.peer {
            return Err(Refusal::WrongSender(repr.name.clone()));
        }
        let rtt = match repr.kind {
            Kind::Heartbeat => None,
            Kind::EchoReply => Some(self.echo_round_trip(repr.echo_us, now)?),
        };
        match self.replay.accept(repr.boot_nonce, repr.sequence) {
            // A restart we heard too late to believe by its sequence alone: while the peer is
            // dead, its new boot is let in (see the module docs).
            Err(Refused::NotARestart { .. }) if self.peer_dead(now) => {
                self.replay.forget();
                self.replay.accept(repr.boot_nonce, repr.sequence)
            }
            other => other,
        }?;
        Ok(rtt)
    }

    /// The round trip of an echo of our heartbeat sent at `echo_us`; renews the lease.
    fn echo_round_trip(&self, echo_us: u64, now: Instant) -> Result<Duration, Refusal> {
        if self
            .recent_sends
            .front()
            .is_some_and(|&oldest| echo_us < oldest)
        {
            return Err(Refusal::StaleEcho);
        }
        if !self.recent_sends.contains(&echo_us) {
            return Err(Refusal::UnknownEcho);
        }
        let sent = clock::instant_at(echo_us.saturating_mul(1000));
        if sent > now {
            return Err(Refusal::EchoFromTheFuture);
        }
        let rtt = now - sent;
        if rtt > self.shared.dead_time {
            return Err(Refusal::StaleEcho);
        }
        Ok(rtt)
    }

    fn peer_dead(&self, now: Instant) -> bool {
        let st = lock(&self.shared.state);
        self.shared.peer_dead_at(&st, now)
    }

    /// Takes in an accepted datagram: liveness, lease, the peer's resource state.
    fn believe(&mut self, index: usize, repr: &HeartbeatRepr, now: Instant, rtt: Option<Duration>) {
        let restarted = self
            .peer_latest
            .is_some_and(|(nonce, _)| nonce != repr.boot_nonce);
        // Paths reorder: a datagram older than one already taken says the peer is alive, but
        // its resource entries are stale and must not undo newer ones.
        let newest = match self.peer_latest {
            Some((nonce, sequence)) if nonce == repr.boot_nonce => repr.sequence > sequence,
            _ => true,
        };
        if newest {
            self.peer_latest = Some((repr.boot_nonce, repr.sequence));
        }
        if restarted {
            // The new boot has heard nothing from us: no earlier echo vouches for anything.
            self.shared.lease.revoke();
            for gate in lock(&self.shared.state).gates.values() {
                gate.lease().revoke();
            }
            static RESTART_LOG: LogLimiter = LogLimiter::network();
            crate::warn_limited!(RESTART_LOG, peer = %self.shared.peer, "the peer restarted");
        }
        if let Some(rtt) = rtt {
            let sent = now - rtt;
            self.shared.lease.renew_until(sent + self.shared.lease_time);
        }
        let heard: BTreeMap<String, PeerResource> = repr
            .resources
            .iter()
            .map(|entry| (entry.name.clone(), PeerResource::from_entry(entry)))
            .collect();
        let callbacks = {
            let mut st = lock(&self.shared.state);
            if let Some(rtt) = rtt {
                // A resource's own lease: only a peer that is not primary for it vouches that
                // it will not promote itself before the dead time. A peer that already took
                // over (while we stood still) echoes too, and must not reopen our gate.
                let sent = now - rtt;
                for (name, gate) in &st.gates {
                    let vouches = heard
                        .get(name)
                        .is_none_or(|p| p.role != Role::Primary && !p.serving);
                    if vouches {
                        gate.lease().renew_until(sent + self.shared.lease_time);
                    }
                }
            }
            let path = self.sockets[index].path.id;
            // Cannot fail: the liveness was built with every path's id.
            let _ = st.liveness.heard(path, now, rtt);
            if !newest {
                return;
            }
            let mut callbacks = Vec::new();
            let reach_changed = st.peer_reach != repr.reach;
            for (name, subscribers) in &st.subscribers {
                if reach_changed || st.peer.get(name) != heard.get(name) {
                    callbacks.extend(subscribers.iter().cloned());
                }
            }
            st.peer = heard;
            st.peer_reach = repr.reach;
            callbacks
        };
        fire(callbacks);
    }

    /// This thread never sleeps longer than an interval: a round that comes a lease or more
    /// after the previous one means the whole process stood still (SIGSTOP, a hung kernel,
    /// a suspended VM), and the peer may have declared us dead meanwhile. Counted, and every
    /// subscriber is told.
    fn note_pause(&mut self, gap: Duration) {
        if gap < self.shared.lease_time {
            return;
        }
        self.shared.pauses.fetch_add(1, Ordering::AcqRel);
        self.shared
            .last_pause_ms
            .store(gap.as_millis() as u64, Ordering::Release);
        tracing::warn!(
            peer = %self.shared.peer,
            "this process stood still for {gap:?}: longer than a lease; the peer may have taken over"
        );
        let callbacks = lock(&self.shared.state)
            .subscribers
            .values()
            .flatten()
            .cloned()
            .collect();
        fire(callbacks);
    }

    /// Tells every subscriber when `peer_dead` flipped since they were last told; forgets the
    /// peer's resource state when it died.
    fn note_dead_flip(&mut self, now: Instant) {
        let callbacks = {
            let mut st = lock(&self.shared.state);
            let dead = self.shared.peer_dead_at(&st, now);
            if dead == self.reported_dead {
                return;
            }
            self.reported_dead = dead;
            if dead {
                st.peer.clear();
                tracing::warn!(
                    peer = %self.shared.peer,
                    dead_time = ?self.shared.dead_time,
                    "the peer is dead: silent on every heartbeat path"
                );
            } else {
                tracing::info!(peer = %self.shared.peer, "the peer is alive again");
            }
            st.subscribers.values().flatten().cloned().collect()
        };
        fire(callbacks);
    }
}
