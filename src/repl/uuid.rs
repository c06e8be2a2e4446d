//! Generation UUIDs: the handshake decision (who syncs from whom, or split brain) and the UUID
//! rotations around promotion and resync. Pure functions over plain `u64`s.
//!
//! Each node keeps four UUIDs ([`UuidSet`]): **C** (current: names the data generation),
//! **B** (bitmap: the generation the out-of-sync bitmap counts from; 0 when the peer is in
//! sync), **H1**, **H2** (history, newest first). The superblock stores them (see
//! [`crate::meta`]); the peers exchange them as [`crate::wire::repl::UuidsRepr`].
//!
//! # The decision ([`decide`])
//!
//! DRBD 8.4's `drbd_uuid_compare` rule table, checked in order (bit 0 of every UUID is ignored;
//! `JC` = 4 "just created", `OFF` = `0x0001_0000_0000_0000`; "S" is us, "P" the peer):
//!
//! | rule | condition | result |
//! |---|---|---|
//! | 10 | S.C, P.C ∈ {JC, 0} | none |
//! | 20 / 30 | only S.C (P.C) ∈ {JC, 0} | full sync, that side target |
//! | 34 / 35 | S.C = P.C, only S.B (P.B) ≠ 0, and it matches the other's history (a missed "resync finished") | bitmap, that side source |
//! | 36 / 37 | S.C = P.C, only S.B (P.B) ≠ 0 (the peer failed to store the sync UUID) | bitmap, that side source |
//! | 40 | S.C = P.C, no crashed primary | none |
//! | 41 | S.C = P.C, a crashed primary, a side is Primary now | bitmap, the Primary is source (both Primary: split brain) |
//! | 42 | S.C = P.C, both Secondary | bitmap, the crashed primary is source; both crashed: the side *without* resolve-conflicts |
//! | 50 / 70 | S.C = P.B (S.B = P.C) | bitmap, S (P) target |
//! | 51 / 71 | S.C = P.H1 and P.H1 + OFF = P.B (the sync UUID packet was lost) | bitmap, S (P) target |
//! | 60 / 80 | S.C ∈ P.H (P.C ∈ S.H) | full, S (P) target |
//! | 90 | S.B = P.B ≠ 0 | split brain (both wrote since the same generation) |
//! | 100 | some S.Hi = P.Hj ≠ 0 | split brain |
//! | -1000 | nothing matched | unrelated data: refuse |
//!
//! Deviations from DRBD, each to keep the decision **antisymmetric** (the peer, deciding with
//! the sides swapped, reaches the mirror decision): rule 10 also covers C = 0 on both sides; a
//! mirrored pair of rules (50/70, 51/71, 60/80) where *both* directions match is contradictory
//! and skipped on both sides; rules 90 and 100 ignore zero UUIDs (empty slots). DRBD's rules
//! 34/35 and 51/71 also *repair* UUIDs as a side effect; here the decision is pure and the repair
//! is what the resync's own rotations do anyway.
//!
//! Post-processing, in order (DRBD's `drbd_sync_handshake`):
//! 1. Unrelated data aborts.
//! 2. If exactly one side is Inconsistent, it becomes the target (full if the rule said full or
//!    split brain 100).
//! 3. Both Primary is split brain.
//! 4. Split brain (rules 90, 100) is resolved only if exactly one side was told
//!    `--discard-my-data`: that side becomes target — bitmap sync over the union of both bitmaps
//!    for rule 90 (both bitmaps count from the same generation), full sync for rule 100.
//!    Otherwise both go StandAlone. (DRBD's automatic after-sb policies are not implemented; the
//!    default, `disconnect`, is.)
//! 5. A Primary with consistent data never becomes sync target (DRBD's `rr-conflict
//!    disconnect`): split brain.
//!
//! The rotations that produce these sets (new generation, resync start and end) are the one
//! generation model in [`crate::meta::generation`], which the daemon, the meta-data store and
//! the simulator all run.

pub use crate::meta::generation::{
    random_uuid, UuidFlags, UuidSet, UUID_JUST_CREATED, UUID_NEW_BM_OFFSET,
};
use crate::wire::repl::Role;
use std::fmt;

/// What a handshake needs besides the two UUID sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandshakeContext {
    /// Our role now.
    pub local_role: Role,
    /// The peer's role now.
    pub peer_role: Role,
    /// We hold "resolve conflicts" (the tie-breaker for rule 42). Exactly one side holds it;
    /// the connection layer decides, e.g. the side with the larger Hello nonce.
    pub resolve_conflicts: bool,
}

impl HandshakeContext {
    /// Both Secondary; we hold resolve-conflicts if `resolve_conflicts`.
    pub fn secondaries(resolve_conflicts: bool) -> Self {
        HandshakeContext {
            local_role: Role::Secondary,
            peer_role: Role::Secondary,
            resolve_conflicts,
        }
    }

    /// The same context as the peer sees it.
    pub fn mirrored(self) -> Self {
        HandshakeContext {
            local_role: self.peer_role,
            peer_role: self.local_role,
            resolve_conflicts: !self.resolve_conflicts,
        }
    }
}

/// A post-processing step that changed the table's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Adjustment {
    /// Exactly one side was Inconsistent and became the target.
    Inconsistent,
    /// Split brain resolved by `--discard-my-data` on one side.
    DiscardMyData,
}

/// Which rule of the table fired (DRBD numbering), and any post-processing that changed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rule {
    /// Rule number: 10 ... 100, or -1000 for unrelated data.
    pub number: i32,
    /// Post-processing that changed the result, if any.
    pub adjustment: Option<Adjustment>,
}

impl Rule {
    const fn plain(number: i32) -> Rule {
        Rule {
            number,
            adjustment: None,
        }
    }

    /// What the rule means, from our side.
    pub fn describe(&self) -> &'static str {
        match self.number {
            10 => "both just created",
            20 => "local has no data generation yet",
            30 => "peer has no data generation yet",
            34 => "local was sync source and missed the resync-finished event",
            35 => "peer was sync source and missed the resync-finished event",
            36 => "local was sync source; peer failed to store the sync UUID",
            37 => "peer was sync source; local failed to store the sync UUID",
            40 => "same current UUID, no crashed primary",
            41 => "same current UUID after a crash; the current primary is source",
            42 => "same current UUID; the crashed primary is source",
            50 => "local current == peer bitmap",
            51 => "local current == peer history1; peer's sync UUID was lost",
            60 => "local current in peer history",
            70 => "local bitmap == peer current",
            71 => "peer current == local history1; local sync UUID was lost",
            80 => "peer current in local history",
            90 => "local bitmap == peer bitmap: both changed since the same generation",
            100 => "a local history UUID == a peer history UUID",
            -1000 => "no common generation: unrelated data",
            _ => "unknown rule",
        }
    }

    /// The rule the peer sees fire (20 ↔ 30, 34 ↔ 35, 36 ↔ 37, 50 ↔ 70, 51 ↔ 71, 60 ↔ 80).
    pub fn mirrored(self) -> Rule {
        let number = match self.number {
            20 => 30,
            30 => 20,
            34 => 35,
            35 => 34,
            36 => 37,
            37 => 36,
            50 => 70,
            70 => 50,
            51 => 71,
            71 => 51,
            60 => 80,
            80 => 60,
            n => n,
        };
        Rule { number, ..self }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rule {}: {}", self.number, self.describe())?;
        match self.adjustment {
            Some(Adjustment::Inconsistent) => {
                f.write_str(" (direction set by the Inconsistent disk)")
            }
            Some(Adjustment::DiscardMyData) => {
                f.write_str(" (split brain resolved by discard-my-data)")
            }
            None => Ok(()),
        }
    }
}

/// Why the nodes must not sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SplitBrainReason {
    /// Both changed the data since their last common generation, and no side (or both) was
    /// told `--discard-my-data`.
    Diverged,
    /// Both are Primary.
    BothPrimary,
    /// The side that would become sync target is a Primary with consistent data
    /// (`rr-conflict`): demote it first.
    PrimaryWouldBecomeTarget,
}

impl fmt::Display for SplitBrainReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SplitBrainReason::Diverged => "data diverged",
            SplitBrainReason::BothPrimary => "both nodes are primary",
            SplitBrainReason::PrimaryWouldBecomeTarget => "a primary would become sync target",
        })
    }
}

/// Direction of a resync, from our side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SyncDirection {
    /// We send data.
    Source,
    /// We receive data.
    Target,
}

impl SyncDirection {
    /// The peer's direction.
    pub fn mirrored(self) -> Self {
        match self {
            SyncDirection::Source => SyncDirection::Target,
            SyncDirection::Target => SyncDirection::Source,
        }
    }
}

/// The outcome of the UUID handshake, from our side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SyncDecision {
    /// Same data: nothing to sync.
    NoSync {
        /// Rule that fired.
        rule: Rule,
    },
    /// Sync the blocks set in the (union of both) bitmaps, we send.
    BitmapSyncSource {
        /// Rule that fired.
        rule: Rule,
    },
    /// Sync the blocks set in the (union of both) bitmaps, we receive.
    BitmapSyncTarget {
        /// Rule that fired.
        rule: Rule,
    },
    /// Sync everything, we send.
    FullSyncSource {
        /// Rule that fired.
        rule: Rule,
    },
    /// Sync everything, we receive.
    FullSyncTarget {
        /// Rule that fired.
        rule: Rule,
    },
    /// Split brain: go StandAlone; the operator must resolve it.
    SplitBrain {
        /// Rule that fired.
        rule: Rule,
        /// Why.
        reason: SplitBrainReason,
    },
    /// No common generation: refuse to connect.
    Unrelated,
}

impl SyncDecision {
    /// The rule that fired.
    pub fn rule(&self) -> Rule {
        match *self {
            SyncDecision::NoSync { rule }
            | SyncDecision::BitmapSyncSource { rule }
            | SyncDecision::BitmapSyncTarget { rule }
            | SyncDecision::FullSyncSource { rule }
            | SyncDecision::FullSyncTarget { rule }
            | SyncDecision::SplitBrain { rule, .. } => rule,
            SyncDecision::Unrelated => Rule::plain(-1000),
        }
    }

    /// Our direction, if a resync follows.
    pub fn direction(&self) -> Option<SyncDirection> {
        match self {
            SyncDecision::BitmapSyncSource { .. } | SyncDecision::FullSyncSource { .. } => {
                Some(SyncDirection::Source)
            }
            SyncDecision::BitmapSyncTarget { .. } | SyncDecision::FullSyncTarget { .. } => {
                Some(SyncDirection::Target)
            }
            _ => None,
        }
    }

    /// Whether the resync covers the whole device.
    pub fn is_full(&self) -> bool {
        matches!(
            self,
            SyncDecision::FullSyncSource { .. } | SyncDecision::FullSyncTarget { .. }
        )
    }

    /// Whether the nodes may stay connected (no split brain, related data).
    pub fn may_connect(&self) -> bool {
        !matches!(
            self,
            SyncDecision::SplitBrain { .. } | SyncDecision::Unrelated
        )
    }

    /// The decision the peer reaches.
    pub fn mirrored(self) -> SyncDecision {
        match self {
            SyncDecision::NoSync { rule } => SyncDecision::NoSync {
                rule: rule.mirrored(),
            },
            SyncDecision::BitmapSyncSource { rule } => SyncDecision::BitmapSyncTarget {
                rule: rule.mirrored(),
            },
            SyncDecision::BitmapSyncTarget { rule } => SyncDecision::BitmapSyncSource {
                rule: rule.mirrored(),
            },
            SyncDecision::FullSyncSource { rule } => SyncDecision::FullSyncTarget {
                rule: rule.mirrored(),
            },
            SyncDecision::FullSyncTarget { rule } => SyncDecision::FullSyncSource {
                rule: rule.mirrored(),
            },
            SyncDecision::SplitBrain { rule, reason } => SyncDecision::SplitBrain {
                rule: rule.mirrored(),
                reason,
            },
            SyncDecision::Unrelated => SyncDecision::Unrelated,
        }
    }

    /// The variant's name, as in the test case file.
    pub fn name(&self) -> &'static str {
        match self {
            SyncDecision::NoSync { .. } => "NoSync",
            SyncDecision::BitmapSyncSource { .. } => "BitmapSyncSource",
            SyncDecision::BitmapSyncTarget { .. } => "BitmapSyncTarget",
            SyncDecision::FullSyncSource { .. } => "FullSyncSource",
            SyncDecision::FullSyncTarget { .. } => "FullSyncTarget",
            SyncDecision::SplitBrain { .. } => "SplitBrain",
            SyncDecision::Unrelated => "Unrelated",
        }
    }
}

impl fmt::Display for SyncDecision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SyncDecision::SplitBrain { rule, reason } => {
                write!(f, "split brain ({reason}), {rule}")
            }
            SyncDecision::Unrelated => write!(f, "unrelated data, {}", self.rule()),
            d => write!(f, "{}, {}", d.name(), d.rule()),
        }
    }
}

/// Bit 0 encodes the role in DRBD and is ignored in every comparison.
fn m(u: u64) -> u64 {
    u & !1
}

/// The rule table. Returns (hg, rule): ±2 full, ±1 bitmap, 0 none, ±100 split brain,
/// -1000 unrelated; positive = we are source.
fn compare(s: &UuidSet, p: &UuidSet, ctx: &HandshakeContext) -> (i32, i32) {
    const JC: u64 = UUID_JUST_CREATED;
    let (sc, pc) = (m(s.current), m(p.current));
    let (sb, pb) = (m(s.bitmap), m(p.bitmap));
    let (sh, ph) = (s.history.map(m), p.history.map(m));
    let fresh = |c: u64| c == JC || c == 0;

    if fresh(sc) && fresh(pc) {
        return (0, 10);
    }
    if fresh(sc) && pc != JC {
        return (-2, 20);
    }
    if sc != JC && fresh(pc) {
        return (2, 30);
    }
    if sc == pc {
        if pb == 0 && sb != 0 {
            return if sb == ph[0] && sh[0] == ph[1] {
                (1, 34)
            } else {
                (1, 36)
            };
        }
        if sb == 0 && pb != 0 {
            return if pb == sh[0] && ph[0] == sh[1] {
                (-1, 35)
            } else {
                (-1, 37)
            };
        }
        let (sc_crash, pc_crash) = (s.flags.crashed_primary, p.flags.crashed_primary);
        if !sc_crash && !pc_crash {
            return (0, 40);
        }
        let (s_pri, p_pri) = (
            ctx.local_role == Role::Primary,
            ctx.peer_role == Role::Primary,
        );
        match (s_pri, p_pri) {
            (true, true) => return (-100, 41),
            (true, false) => return (1, 41),
            (false, true) => return (-1, 41),
            (false, false) => {}
        }
        return match (sc_crash, pc_crash) {
            (true, false) => (1, 42),
            (false, true) => (-1, 42),
            _ => {
                if ctx.resolve_conflicts {
                    (-1, 42)
                } else {
                    (1, 42)
                }
            }
        };
    }
    // Mirrored pairs: a pair fires only if exactly one direction matches.
    let pair = |ours: bool, theirs: bool| -> Option<bool> { (ours != theirs).then_some(ours) };
    if let Some(we_target) = pair(sc == pb, sb == pc) {
        return if we_target { (-1, 50) } else { (1, 70) };
    }
    let lost_sync =
        |c: u64, h1: u64, b: u64| c == h1 && m(h1.wrapping_add(UUID_NEW_BM_OFFSET)) == b;
    if let Some(we_target) = pair(lost_sync(sc, ph[0], pb), lost_sync(pc, sh[0], sb)) {
        return if we_target { (-1, 51) } else { (1, 71) };
    }
    if let Some(we_target) = pair(ph.contains(&sc), sh.contains(&pc)) {
        return if we_target { (-2, 60) } else { (2, 80) };
    }
    if sb == pb && sb != 0 {
        return (100, 90);
    }
    if sh.iter().any(|&h| h != 0 && ph.contains(&h)) {
        return (-100, 100);
    }
    (-1000, -1000)
}

/// Decides what happens when we connect to the peer: the rule table, then the post-processing
/// (see the module docs). Antisymmetric: `decide(p, s, &ctx.mirrored()) ==
/// decide(s, p, ctx).mirrored()`.
pub fn decide(local: &UuidSet, peer: &UuidSet, ctx: &HandshakeContext) -> SyncDecision {
    let (mut hg, number) = compare(local, peer, ctx);
    let mut rule = Rule::plain(number);
    if hg == -1000 {
        return SyncDecision::Unrelated;
    }
    // 2. One Inconsistent side sets the direction.
    let (li, pi) = (local.flags.inconsistent, peer.flags.inconsistent);
    if li != pi {
        let full = number == 100 || hg.abs() == 2;
        let mut new = if li { -1 } else { 1 };
        if full {
            new *= 2;
        }
        if new != hg {
            hg = new;
            rule.adjustment = Some(Adjustment::Inconsistent);
        }
    }
    // 3. Two primaries never sync.
    if ctx.local_role == Role::Primary && ctx.peer_role == Role::Primary {
        return SyncDecision::SplitBrain {
            rule,
            reason: SplitBrainReason::BothPrimary,
        };
    }
    // 4. Split brain, unless exactly one side discards its data.
    if hg.abs() == 100 {
        let (ld, pd) = (local.flags.discard_my_data, peer.flags.discard_my_data);
        if ld == pd {
            return SyncDecision::SplitBrain {
                rule,
                reason: SplitBrainReason::Diverged,
            };
        }
        let step = if number == 90 { 1 } else { 2 };
        hg = if ld { -step } else { step };
        rule.adjustment = Some(Adjustment::DiscardMyData);
    }
    // 5. rr-conflict: a consistent primary does not become target.
    let target_is_consistent_primary = if hg < 0 {
        ctx.local_role == Role::Primary && !li
    } else if hg > 0 {
        ctx.peer_role == Role::Primary && !pi
    } else {
        false
    };
    if target_is_consistent_primary {
        return SyncDecision::SplitBrain {
            rule,
            reason: SplitBrainReason::PrimaryWouldBecomeTarget,
        };
    }
    match hg {
        0 => SyncDecision::NoSync { rule },
        1 => SyncDecision::BitmapSyncSource { rule },
        -1 => SyncDecision::BitmapSyncTarget { rule },
        2 => SyncDecision::FullSyncSource { rule },
        -2 => SyncDecision::FullSyncTarget { rule },
        _ => unreachable!("hg {hg} after post-processing"),
    }
}

#[cfg(test)]
mod tests;
