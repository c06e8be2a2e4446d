//! Tests of the handshake decision: the data-driven rule table (`uuid_cases.txt`),
//! antisymmetry, the rotations, and a simulated two-node history.

use super::*;
use crate::wire::repl::UuidsRepr;
use proptest::prelude::*;
use std::collections::BTreeSet;

const CASES: &str = include_str!("../uuid_cases.txt");

struct Side {
    uuids: UuidSet,
    role: Role,
    resolve_conflicts: bool,
}

fn parse_side(text: &str) -> Side {
    let f: Vec<&str> = text.split_whitespace().collect();
    assert_eq!(f.len(), 6, "side needs C B H1 H2 flags role: {text:?}");
    let hex = |s: &str| u64::from_str_radix(s, 16).unwrap_or_else(|_| panic!("bad hex {s:?}"));
    let flags = f[4];
    let uuids = UuidSet {
        current: hex(f[0]),
        bitmap: hex(f[1]),
        history: [hex(f[2]), hex(f[3])],
        dirty_bits: 0,
        flags: UuidFlags {
            discard_my_data: flags.contains('d'),
            crashed_primary: flags.contains('c'),
            inconsistent: flags.contains('i'),
        },
    };
    let role = match f[5] {
        "P" => Role::Primary,
        "S" => Role::Secondary,
        other => panic!("bad role {other:?}"),
    };
    Side {
        uuids,
        role,
        resolve_conflicts: flags.contains('r'),
    }
}

fn parse_expected(text: &str) -> SyncDecision {
    let f: Vec<&str> = text.split_whitespace().collect();
    let (number, adjustment) = match f[1].split_once('+') {
        Some((n, "inconsistent")) => (n, Some(Adjustment::Inconsistent)),
        Some((n, "discard")) => (n, Some(Adjustment::DiscardMyData)),
        Some((_, other)) => panic!("bad adjustment {other:?}"),
        None => (f[1], None),
    };
    let rule = Rule {
        number: number.parse().expect("rule number"),
        adjustment,
    };
    match f[0] {
        "NoSync" => SyncDecision::NoSync { rule },
        "BitmapSyncSource" => SyncDecision::BitmapSyncSource { rule },
        "BitmapSyncTarget" => SyncDecision::BitmapSyncTarget { rule },
        "FullSyncSource" => SyncDecision::FullSyncSource { rule },
        "FullSyncTarget" => SyncDecision::FullSyncTarget { rule },
        "Unrelated" => SyncDecision::Unrelated,
        "SplitBrain" => SyncDecision::SplitBrain {
            rule,
            reason: match f.get(2).copied() {
                Some("diverged") => SplitBrainReason::Diverged,
                Some("both-primary") => SplitBrainReason::BothPrimary,
                Some("primary-target") => SplitBrainReason::PrimaryWouldBecomeTarget,
                other => panic!("bad split-brain reason {other:?}"),
            },
        },
        other => panic!("bad decision {other:?}"),
    }
}

#[test]
fn decision_table_cases() {
    let mut rules_seen = BTreeSet::new();
    let mut count = 0;
    for (n, line) in CASES.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let parts: Vec<&str> = line.split('|').collect();
        assert_eq!(parts.len(), 3, "line {}: {line}", n + 1);
        let (local, peer) = (parse_side(parts[0]), parse_side(parts[1]));
        let expected = parse_expected(parts[2]);
        assert!(
            !(local.resolve_conflicts && peer.resolve_conflicts),
            "line {}: both hold resolve-conflicts",
            n + 1
        );
        let ctx = HandshakeContext {
            local_role: local.role,
            peer_role: peer.role,
            resolve_conflicts: local.resolve_conflicts,
        };
        let got = decide(&local.uuids, &peer.uuids, &ctx);
        assert_eq!(got, expected, "line {}: {line}\n  got {got}", n + 1);
        let mirrored = decide(&peer.uuids, &local.uuids, &ctx.mirrored());
        assert_eq!(
            mirrored,
            expected.mirrored(),
            "line {} mirrored: {line}",
            n + 1
        );
        rules_seen.insert(expected.rule().number);
        rules_seen.insert(expected.rule().mirrored().number);
        count += 1;
    }
    let every_rule = [
        10, 20, 30, 34, 35, 36, 37, 40, 41, 42, 50, 51, 60, 70, 71, 80, 90, 100, -1000,
    ];
    for rule in every_rule {
        assert!(rules_seen.contains(&rule), "no case for rule {rule}");
    }
    assert!(count >= 60, "only {count} cases");
}

#[test]
fn decision_display_names_the_rule() {
    let d = decide(
        &UuidSet {
            current: 0xa0,
            ..Default::default()
        },
        &UuidSet {
            current: 0xc0,
            bitmap: 0xa0,
            ..Default::default()
        },
        &HandshakeContext::secondaries(false),
    );
    assert_eq!(
        d.to_string(),
        "BitmapSyncTarget, rule 50: local current == peer bitmap"
    );
    assert_eq!(d.direction(), Some(SyncDirection::Target));
    assert!(!d.is_full() && d.may_connect());
}

#[test]
fn rotations_follow_drbd() {
    // Promotion while disconnected.
    let mut a = UuidSet {
        current: 0xa0,
        ..Default::default()
    };
    a.new_current(0xc0);
    assert_eq!((a.current, a.bitmap), (0xc0, 0xa0));
    // A second new generation while still parted keeps the older bitmap UUID.
    a.new_current(0xd0);
    assert_eq!((a.current, a.bitmap), (0xd0, 0xa0));

    // Resync a -> b, where b is still at 0xa0.
    let mut b = UuidSet {
        current: 0xa0,
        ..Default::default()
    };
    let a_at_start = a;
    let sync = a.start_resync_source(0x1234);
    assert_eq!(sync, 0xa0 + UUID_NEW_BM_OFFSET);
    assert_eq!((a.bitmap, a.history), (sync, [0xa0, 0]));
    b.start_resync_target(sync);
    assert_eq!((b.current, b.bitmap), (sync, 0));
    // Interrupted here, the next handshake says: continue the bitmap sync (rule 50).
    assert!(matches!(
        decide(&b, &a, &HandshakeContext::secondaries(false)),
        SyncDecision::BitmapSyncTarget { rule } if rule.number == 50
    ));
    a.finish_resync_source();
    b.finish_resync_target(&a_at_start);
    assert_eq!((a.current, a.bitmap, a.history), (0xd0, 0, [sync, 0xa0]));
    assert_eq!(
        (b.current, b.bitmap, b.history),
        (a.current, a.bitmap, a.history)
    );
    assert!(matches!(
        decide(&a, &b, &HandshakeContext::secondaries(true)),
        SyncDecision::NoSync { .. }
    ));

    // A full sync from a node without a bitmap UUID uses a fresh sync UUID.
    let mut c = UuidSet::just_created();
    let mut d = UuidSet {
        current: 0xe0,
        ..Default::default()
    };
    let d_at_start = d;
    let sync = d.start_resync_source(0x5550);
    assert_eq!(sync, 0x5550);
    c.start_resync_target(sync);
    d.finish_resync_source();
    c.finish_resync_target(&d_at_start);
    assert_eq!(c, d);
    assert_eq!(d.history, [0x5550, 0]);
}

#[test]
fn wire_round_trip_of_uuid_sets() {
    let s = UuidSet {
        current: 1,
        bitmap: 2,
        history: [3, 4],
        dirty_bits: 5,
        flags: UuidFlags {
            discard_my_data: true,
            crashed_primary: false,
            inconsistent: true,
        },
    };
    assert_eq!(UuidSet::from(UuidsRepr::from(s)), s);
    assert_eq!(
        s.to_string(),
        "0000000000000001:0000000000000002:0000000000000003:0000000000000004"
    );
}

#[test]
fn random_uuids_avoid_reserved_values() {
    let mut rng = rand::rng();
    for _ in 0..1000 {
        let u = random_uuid(&mut rng);
        assert!(u != 0 && u != UUID_JUST_CREATED && u & 1 == 0);
    }
}

/// UUIDs drawn from a small pool so that rules actually match.
fn pool_uuid() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(UUID_JUST_CREATED),
        Just(0xa0),
        Just(0xa1),
        Just(0xb0),
        Just(0xc0),
        Just(0xa0 + UUID_NEW_BM_OFFSET),
        Just(0xb0 + UUID_NEW_BM_OFFSET),
    ]
}

fn uuid_set() -> impl Strategy<Value = UuidSet> {
    (
        pool_uuid(),
        pool_uuid(),
        pool_uuid(),
        pool_uuid(),
        any::<[bool; 3]>(),
    )
        .prop_map(|(c, b, h1, h2, f)| UuidSet {
            current: c,
            bitmap: b,
            history: [h1, h2],
            dirty_bits: 0,
            flags: UuidFlags {
                discard_my_data: f[0],
                crashed_primary: f[1],
                inconsistent: f[2],
            },
        })
}

fn role() -> impl Strategy<Value = Role> {
    prop_oneof![Just(Role::Primary), Just(Role::Secondary)]
}

proptest! {
    #[test]
    fn decide_is_antisymmetric(l in uuid_set(), p in uuid_set(), lr in role(), pr in role(), rc in any::<bool>()) {
        let ctx = HandshakeContext { local_role: lr, peer_role: pr, resolve_conflicts: rc };
        let ours = decide(&l, &p, &ctx);
        let theirs = decide(&p, &l, &ctx.mirrored());
        prop_assert_eq!(theirs, ours.mirrored(), "ours: {}", ours);
    }

    #[test]
    fn identical_sets_never_sync(s in uuid_set(), rc in any::<bool>()) {
        let mut s = s;
        s.flags = UuidFlags::default();
        let d = decide(&s, &s, &HandshakeContext::secondaries(rc));
        prop_assert!(matches!(d, SyncDecision::NoSync { .. }), "{}", d);
    }

    #[test]
    fn simulated_history_yields_the_expected_decision(ops in proptest::collection::vec(op(), 1..60), seed in any::<u64>()) {
        let mut sim = History::new(seed);
        for op in ops {
            sim.apply(op)?;
        }
        sim.apply(Op::Reconnect)?;
    }
}

/// One step of the simulated history.
#[derive(Debug, Clone, Copy)]
enum Op {
    Write(usize, usize),
    Disconnect,
    Reconnect,
    /// Reconnect, but the link breaks after the resync started and before it finished.
    ReconnectInterrupted,
    Promote(usize),
    Demote(usize),
    /// Node crashes (while primary: with one write on its disk that never reached the peer)
    /// and comes back as secondary.
    Crash(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0usize..2, 0usize..BLOCKS).prop_map(|(n, b)| Op::Write(n, b)),
        2 => Just(Op::Disconnect),
        2 => Just(Op::Reconnect),
        1 => Just(Op::ReconnectInterrupted),
        2 => (0usize..2).prop_map(Op::Promote),
        1 => (0usize..2).prop_map(Op::Demote),
        1 => (0usize..2).prop_map(Op::Crash),
    ]
}

const BLOCKS: usize = 8;

#[derive(Debug, Clone)]
struct Node {
    uuids: UuidSet,
    primary: bool,
    blocks: [u64; BLOCKS],
    /// Out-of-sync blocks this node knows of (its bitmap, including activity-log extents).
    bitmap: BTreeSet<usize>,
    /// Started a new data generation since the nodes were last in sync.
    new_generation: bool,
}

/// Two nodes, a link, and the ground truth of what happened while they were parted.
struct History {
    nodes: [Node; 2],
    connected: bool,
    next_value: u64,
    rng: u64,
}

impl History {
    fn new(seed: u64) -> Self {
        let node = Node {
            uuids: UuidSet {
                current: 0x1000,
                ..Default::default()
            },
            primary: false,
            blocks: [0; BLOCKS],
            bitmap: BTreeSet::new(),
            new_generation: false,
        };
        History {
            nodes: [node.clone(), node],
            connected: true,
            next_value: 1,
            rng: seed | 1,
        }
    }

    fn fresh(&mut self) -> u64 {
        // xorshift64; UUIDs keep bit 0 clear and stay away from 0 and JC.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng & !0xff) | 0x100
    }

    fn new_generation(&mut self, n: usize) {
        let fresh = self.fresh();
        self.nodes[n].uuids.new_current(fresh);
        self.nodes[n].new_generation = true;
    }

    fn apply(&mut self, op: Op) -> Result<(), TestCaseError> {
        match op {
            Op::Write(n, b) => {
                if !self.nodes[n].primary || self.nodes[n].uuids.flags.inconsistent {
                    return Ok(());
                }
                let v = self.next_value;
                self.next_value += 1;
                self.nodes[n].blocks[b] = v;
                if self.connected {
                    self.nodes[1 - n].blocks[b] = v;
                } else {
                    self.nodes[n].bitmap.insert(b);
                }
            }
            Op::Disconnect => {
                if self.connected {
                    self.connected = false;
                    for n in 0..2 {
                        if self.nodes[n].primary {
                            self.new_generation(n);
                        }
                    }
                }
            }
            Op::Promote(n) => {
                let other_primary = self.nodes[1 - n].primary;
                if self.nodes[n].primary
                    || self.nodes[n].uuids.flags.inconsistent
                    || (self.connected && other_primary)
                {
                    return Ok(());
                }
                self.nodes[n].primary = true;
                if !self.connected {
                    self.new_generation(n);
                }
            }
            Op::Demote(n) => self.nodes[n].primary = false,
            Op::Crash(n) => {
                let was_primary = self.nodes[n].primary;
                // A dead node rotates nothing; the survivor is secondary (one primary at most
                // while connected), so losing the link changes no UUIDs.
                self.nodes[n].primary = false;
                if self.connected {
                    self.apply(Op::Disconnect)?;
                }
                let node = &mut self.nodes[n];
                if was_primary {
                    // One write reached this disk (and its activity log) but not the peer.
                    node.uuids.flags.crashed_primary = true;
                    node.blocks[0] = self.next_value;
                    self.next_value += 1;
                    node.bitmap.insert(0);
                }
            }
            Op::Reconnect => self.reconnect(false)?,
            Op::ReconnectInterrupted => self.reconnect(true)?,
        }
        Ok(())
    }

    fn reconnect(&mut self, interrupt: bool) -> Result<(), TestCaseError> {
        if self.connected {
            return Ok(());
        }
        let ctx = HandshakeContext {
            local_role: if self.nodes[0].primary {
                Role::Primary
            } else {
                Role::Secondary
            },
            peer_role: if self.nodes[1].primary {
                Role::Primary
            } else {
                Role::Secondary
            },
            resolve_conflicts: true,
        };
        let mut d = decide(&self.nodes[0].uuids, &self.nodes[1].uuids, &ctx);
        let d1 = decide(&self.nodes[1].uuids, &self.nodes[0].uuids, &ctx.mirrored());
        prop_assert_eq!(d1, d.mirrored());
        prop_assert_ne!(d, SyncDecision::Unrelated, "related nodes judged unrelated");

        let (g0, g1) = (self.nodes[0].new_generation, self.nodes[1].new_generation);
        if let SyncDecision::SplitBrain { reason, .. } = d {
            // Both started a generation while parted (or both are primary right now).
            prop_assert!(
                (g0 && g1) || reason != SplitBrainReason::Diverged,
                "split brain but only one side changed: {} {:?}",
                d,
                (g0, g1)
            );
            // The operator resolves it: node 1 loses, both secondary, discard-my-data on 1.
            self.nodes[0].primary = false;
            self.nodes[1].primary = false;
            self.nodes[1].uuids.flags.discard_my_data = true;
            d = decide(
                &self.nodes[0].uuids,
                &self.nodes[1].uuids,
                &HandshakeContext::secondaries(true),
            );
            self.nodes[1].uuids.flags.discard_my_data = false;
            prop_assert_eq!(d.direction(), Some(SyncDirection::Source), "{}", d);
        } else if g0 && g1 {
            prop_assert!(false, "both sides changed but no split brain: {}", d);
        } else if g0 != g1 {
            let source = if g0 { 0 } else { 1 };
            let want = if source == 0 {
                SyncDirection::Source
            } else {
                SyncDirection::Target
            };
            // An Inconsistent (interrupted) target may also be fixed by a full sync.
            prop_assert_eq!(
                d.direction(),
                Some(want),
                "generation changed on node {}: {}",
                source,
                d
            );
        }
        let source = match d.direction() {
            Some(SyncDirection::Source) => Some(0),
            Some(SyncDirection::Target) => Some(1),
            None => None,
        };
        let Some(s) = source else {
            // No sync: the data must already be identical.
            prop_assert_eq!(
                self.nodes[0].blocks,
                self.nodes[1].blocks,
                "NoSync but data differs: {}",
                d
            );
            self.connected = true;
            for node in &mut self.nodes {
                node.bitmap.clear();
                node.new_generation = false;
            }
            return Ok(());
        };
        let t = 1 - s;
        // Bitmap exchange: both sides keep the union.
        let union: BTreeSet<usize> = self.nodes[0]
            .bitmap
            .union(&self.nodes[1].bitmap)
            .copied()
            .collect();
        self.nodes[0].bitmap = union.clone();
        self.nodes[1].bitmap = union.clone();
        let source_at_start = self.nodes[s].uuids;
        let fresh = self.fresh();
        let sync_uuid = self.nodes[s].uuids.start_resync_source(fresh);
        self.nodes[t].uuids.start_resync_target(sync_uuid);
        self.nodes[t].uuids.flags.inconsistent = true;
        self.nodes[t].new_generation = false;
        self.nodes[s].new_generation = true;
        if interrupt {
            // The link breaks mid-resync: a primary source starts a new generation.
            self.connected = false;
            if self.nodes[s].primary {
                self.new_generation(s);
            }
            return Ok(());
        }
        let blocks: Vec<usize> = if d.is_full() {
            (0..BLOCKS).collect()
        } else {
            union.into_iter().collect()
        };
        for b in blocks {
            self.nodes[t].blocks[b] = self.nodes[s].blocks[b];
        }
        self.nodes[s].uuids.finish_resync_source();
        self.nodes[t].uuids.finish_resync_target(&source_at_start);
        prop_assert_eq!(
            self.nodes[s].blocks,
            self.nodes[t].blocks,
            "resync left the data different: {}",
            d
        );
        let (us, ut) = (self.nodes[s].uuids, self.nodes[t].uuids);
        prop_assert_eq!(
            (us.current, us.bitmap, us.history),
            (ut.current, ut.bitmap, ut.history)
        );
        self.connected = true;
        for node in &mut self.nodes {
            node.bitmap.clear();
            node.new_generation = false;
        }
        Ok(())
    }
}
