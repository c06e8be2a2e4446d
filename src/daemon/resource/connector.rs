//! The connector: while the engine wants a connection, dials (the node whose name sorts first)
//! or accepts, runs the handshake and hands the result to the engine.

use super::*;

impl Resource {
    pub(super) fn connector(self: Arc<Self>, listener: TcpListener, token: CancellationToken) {
        static LIMIT: LogLimiter = LogLimiter::new(Duration::from_secs(10), 3);
        // Waits return at once when the resource stops.
        let pause = |d| self.group.sleep_on(&token, d);
        while !token.is_cancelled() {
            let idle =
                !self.wants_connect.load(Ordering::Acquire) || self.linked.load(Ordering::Acquire);
            if idle {
                // Drain stray connection attempts so the peer sees a refusal, not a hang.
                if let Ok((s, _)) = listener.accept() {
                    drop(s);
                }
                pause(Duration::from_millis(100));
                continue;
            }
            let stream = if self.spec.dialer {
                match peer::dial(self.spec.peer_addr) {
                    Ok(s) => Some(s),
                    Err(_) => {
                        pause(Duration::from_millis(300));
                        None
                    }
                }
            } else {
                peer::accept(
                    &listener,
                    self.spec.peer_addr.ip(),
                    Duration::from_millis(300),
                    &LIMIT,
                )
            };
            let Some(stream) = stream else { continue };
            let me = self.clone();
            match peer::handshake(stream, &self.spec.identity, move || me.our_parameters()) {
                Ok(hs) => {
                    self.send(Input::PeerUp(Box::new(hs)));
                    // Give the engine time to take it (or refuse it) before trying again.
                    pause(Duration::from_secs(1));
                }
                Err(e) => {
                    crate::warn_limited!(
                        LIMIT,
                        "resource {}: connection to {} failed: {e}",
                        self.spec.name,
                        self.spec.identity.peer
                    );
                    pause(Duration::from_millis(500));
                }
            }
        }
    }

    pub(super) fn our_parameters(&self) -> (ParametersRepr, UuidsRepr) {
        let published = self.published();
        let s = published.status;
        (
            ParametersRepr {
                size: self.device.size(),
                protocol: self.spec.protocol,
                durability: self.spec.durability,
                role: s.role,
                disk: s.disk,
                max_write: MAX_DATA_LEN as u32,
                checksum_alg: self.spec.csums,
            },
            self.uuid_set(published.uuid_flags).into(),
        )
    }
}
