//! `[resource.NAME] on-no-quorum` and `on-no-quorum-timeout`: what a serving node does with
//! requests while its serve gate is shut ([`crate::ha::quorum`]), read and checked.

use super::Resource;
use crate::ha::quorum::OnNoQuorum;
use std::time::Duration;

/// The longest `on-no-quorum-timeout` accepted, seconds (a day).
const MAX_TIMEOUT: f64 = 86_400.0;

impl Resource {
    /// The resource's `on-no-quorum` policy (checked by [`validate_on_no_quorum`]; the
    /// default, [`OnNoQuorum::DEFAULT`], for anything unchecked).
    pub fn on_no_quorum(&self) -> OnNoQuorum {
        let after = self
            .on_no_quorum_timeout
            .filter(|t| t.is_finite() && *t > 0.0 && *t <= MAX_TIMEOUT)
            .map_or(OnNoQuorum::DEFAULT_TIMEOUT, Duration::from_secs_f64);
        match self.on_no_quorum.as_deref() {
            Some("suspend-io") => OnNoQuorum::SuspendIo,
            _ => OnNoQuorum::IoError { after },
        }
    }
}

/// The two keys of one resource: a known word, a timeout that is a positive number of seconds
/// up to a day, and no timeout with `suspend-io` (it would mean nothing). Errors name the key.
pub(super) fn validate_on_no_quorum(res: &Resource) -> Result<(), (&'static str, String)> {
    if let Some(word) = res.on_no_quorum.as_deref() {
        if !OnNoQuorum::WORDS.contains(&word) {
            return Err((
                "on-no-quorum",
                format!("unknown value {word:?}, expected \"io-error\" or \"suspend-io\""),
            ));
        }
    }
    if let Some(t) = res.on_no_quorum_timeout {
        if !t.is_finite() || t <= 0.0 || t > MAX_TIMEOUT {
            return Err((
                "on-no-quorum-timeout",
                format!("{t} is not a number of seconds in (0, 86400]"),
            ));
        }
        if res.on_no_quorum.as_deref() == Some("suspend-io") {
            return Err((
                "on-no-quorum-timeout",
                "means nothing with on-no-quorum = \"suspend-io\" (it holds requests without a bound)"
                    .into(),
            ));
        }
    }
    Ok(())
}
