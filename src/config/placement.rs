//! `[resource.NAME] preferred` (`preferred-primary`), `auto-failback` and `failback-delay`:
//! where a resource runs when both nodes are healthy, and whether it goes back there after a
//! failover (see [`crate::cluster::machine`]'s `switchover`), checked.

use super::Resource;

/// The longest `failback-delay` accepted, seconds (a day).
const MAX_FAILBACK_DELAY: f64 = 86_400.0;

/// The placement keys of one resource: `preferred` names a node, `auto-failback` has a node to
/// go back to and automatic promotion to do it with, `failback-delay` is 0..86400 seconds.
/// Errors name the key.
pub(super) fn validate_placement(
    res: &Resource,
    is_node: impl Fn(&str) -> bool,
) -> Result<(), (&'static str, String)> {
    if let Some(p) = &res.preferred_primary {
        if !is_node(p) {
            return Err(("preferred-primary", format!("{p} is not a node")));
        }
    }
    if res.auto_failback == Some(true) {
        if res.preferred_primary.is_none() {
            return Err((
                "auto-failback",
                "needs `preferred` (the node to fail back to)".into(),
            ));
        }
        if res.auto_promote == Some(false) {
            return Err((
                "auto-failback",
                "needs auto-promote (with auto-promote = false nothing moves by itself)".into(),
            ));
        }
    }
    if let Some(v) = res.failback_delay {
        if !v.is_finite() || !(0.0..=MAX_FAILBACK_DELAY).contains(&v) {
            return Err((
                "failback-delay",
                format!("{v} is not a number of seconds in 0..86400"),
            ));
        }
    }
    Ok(())
}
