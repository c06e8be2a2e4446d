//! Both nodes lose power at the same moment: crash property tests for the durability levels.
//!
//! `tests/meta_crash.rs` models the peer as surviving. Here the two replicas share one power
//! supply: alpha (internal meta-data, one device) and beta (external meta-data on a device of
//! its own, as the seed's loop device) are recorded as one crash group, and the power is cut to
//! all three devices at once, at **every durability point** of a random workload, in each
//! crash mode (unflushed writes dropped, an arbitrary subset kept, a subset kept with one
//! sector torn). The workload is replicated the way the engine does it at the resource's
//! durability level (`crate::wire::repl::Durability`):
//!
//! * `node`: the write goes to both nodes' operating systems (no flush) before it is
//!   acknowledged; only a client FLUSH makes it durable;
//! * `power`: before the acknowledgement it is on stable storage on both (a FUA write, or a
//!   write followed by a flush of the data device).
//!
//! Both nodes keep their own activity log (DRBD's secondary does too); alpha also marks the
//! writes beta missed. After the crash both re-attach, and the test checks:
//!
//! * **coverage, at both levels**: every 4 KiB block in which the two replicas' data differ is
//!   named by alpha's or beta's AL + bitmap (the resync after a reconnect ORs the two bitmaps,
//!   so that is what it copies); every block alpha had marked out of sync still is;
//! * **durability, at `power`**: every acknowledged write is on each replica that received it
//!   (blocks of the one write in flight at the cut are exempt).
//!
//! At `node` the test also counts acknowledged writes that the power cut took from both
//! replicas (allowed at that level) and prints the count, so a run shows the difference.

use std::sync::Arc;
use std::time::Instant;

use proptest::prelude::*;
use twinblade::block::crash::{CrashDevice, CrashMode};
use twinblade::block::BlockDevice;
use twinblade::meta::{create, CreateOptions, Layout, LayoutParams, MetaStore};
use twinblade::wire::ondisk::MetaKind;
use twinblade::wire::repl::Durability;

const BLOCK: u64 = 4096;
const SECTOR: u64 = 512;
const DATA_SIZE: u64 = 1 << 20; // 16 extents of 64 KiB

#[derive(Debug, Clone)]
enum Op {
    /// A replicated write; `missed`: beta did not get it (link down). At `power`, `via_flush`
    /// makes it durable with write + flush instead of FUA.
    Write {
        sector: u64,
        sectors: u64,
        missed: bool,
        via_flush: bool,
    },
    /// A client FLUSH, replicated to both.
    Flush,
    /// Bitmap write-back on both.
    FlushBitmap,
    /// Clean shutdown of both (and carrying on).
    MarkClean,
    /// Copy alpha's first dirty run (up to `blocks` blocks) to beta and clear its bits.
    Resync { blocks: u64 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        12 => (0u64..2048, 1u64..=48, prop::bool::weighted(0.2), any::<bool>())
            .prop_map(|(sector, sectors, missed, via_flush)| Op::Write { sector, sectors, missed, via_flush }),
        2 => Just(Op::Flush),
        1 => Just(Op::FlushBitmap),
        1 => Just(Op::MarkClean),
        1 => (1u64..16).prop_map(|blocks| Op::Resync { blocks }),
    ]
}

/// One write to one replica, with the durability-point counts at which it was issued (the
/// first data write went out) and acknowledged. A crash at point `k` happened after it was
/// issued iff `issued <= k`, after its acknowledgement iff `acked <= k`.
#[derive(Debug)]
struct Sent {
    issued: usize,
    acked: usize,
    offset: u64,
    data: Vec<u8>,
}

#[derive(Debug)]
enum OosEvent {
    Set { stamp: usize, offset: u64, len: u64 },
    Clear { stamp: usize, offset: u64, len: u64 },
}

/// Two nodes on one power supply.
struct Pair {
    alpha: Arc<CrashDevice>,
    beta_meta: Arc<CrashDevice>,
    beta_data: Arc<CrashDevice>,
}

impl Pair {
    fn new(params: LayoutParams) -> Pair {
        let md = Layout::internal(DATA_SIZE + (1 << 20), params)
            .unwrap()
            .md_size;
        let pair = Pair {
            alpha: Arc::new(CrashDevice::new(DATA_SIZE + md)),
            beta_meta: Arc::new(CrashDevice::new(256 << 10)),
            beta_data: Arc::new(CrashDevice::new(DATA_SIZE)),
        };
        let opts = CreateOptions {
            name: "r0".into(),
            params,
            force: false,
        };
        let a = create(pair.alpha.as_ref(), 0, MetaKind::Internal, &opts).unwrap();
        let b = create(
            pair.beta_meta.as_ref(),
            DATA_SIZE,
            MetaKind::External,
            &opts,
        )
        .unwrap();
        assert_eq!(
            (a.layout.data_size, b.layout.data_size),
            (DATA_SIZE, DATA_SIZE)
        );
        pair
    }

    fn devices(&self) -> [&CrashDevice; 3] {
        [&self.alpha, &self.beta_meta, &self.beta_data]
    }

    fn points(&self) -> usize {
        self.alpha.durability_points()
    }
}

fn contents(serial: u32, offset: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            let at = offset + i as u64;
            (serial.wrapping_mul(2_654_435_761) >> ((at % 4) * 8)) as u8 ^ (at / 512) as u8 ^ 0xa5
        })
        .collect()
}

/// Writes `data` at `offset` of one replica's data device durably enough for `level`.
fn replica_write(dev: &CrashDevice, data: &[u8], offset: u64, level: Durability, via_flush: bool) {
    match level {
        Durability::Node => dev.write_at(data, offset, false).unwrap(),
        Durability::Power if via_flush => {
            dev.write_at(data, offset, false).unwrap();
            dev.flush().unwrap();
        }
        Durability::Power => dev.write_at(data, offset, true).unwrap(),
    }
}

/// What each sector of a replica must hold after a crash at point `k`: `None` where a write was
/// in flight (either version, or a torn mix, is allowed there).
fn expected(sent: &[Sent], k: usize) -> Vec<Option<Vec<u8>>> {
    let mut sectors: Vec<Option<Vec<u8>>> =
        vec![Some(vec![0; SECTOR as usize]); (DATA_SIZE / SECTOR) as usize];
    for s in sent.iter().filter(|s| s.issued <= k) {
        for (i, chunk) in s.data.chunks(SECTOR as usize).enumerate() {
            let at = (s.offset / SECTOR) as usize + i;
            sectors[at] = (s.acked <= k).then(|| chunk.to_vec());
        }
    }
    sectors
}

#[derive(Default, Clone, Copy)]
struct Totals {
    cases: usize,
    points: usize,
    checks: usize,
    lost_acked: usize,
}

/// Runs the workload, then cuts the power to both nodes at every point in every mode.
fn run_case(level: Durability, al_extents: u32, ops: &[Op], seed: u64) -> Totals {
    let params = LayoutParams {
        al_extents,
        al_extent_shift: 16,
    };
    let pair = Pair::new(params);
    let (alpha, _) =
        MetaStore::attach(pair.alpha.clone(), pair.alpha.clone(), MetaKind::Internal).unwrap();
    let (beta, _) = MetaStore::attach(
        pair.beta_meta.clone(),
        pair.beta_data.clone(),
        MetaKind::External,
    )
    .unwrap();
    CrashDevice::record_group_history(&pair.devices());
    let mut to_alpha: Vec<Sent> = Vec::new();
    let mut to_beta: Vec<Sent> = Vec::new();
    let mut oos_events = Vec::new();
    for (serial, op) in ops.iter().enumerate() {
        match *op {
            Op::Write {
                sector,
                sectors,
                missed,
                via_flush,
            } => {
                let offset = sector * SECTOR;
                let len = (sectors * SECTOR).min(DATA_SIZE - offset);
                let data = contents(serial as u32 + 1, offset, len as usize);
                alpha.write_begin(offset, len).unwrap();
                if !missed {
                    beta.write_begin(offset, len).unwrap();
                }
                let issued = pair.points();
                replica_write(&pair.alpha, &data, offset, level, via_flush);
                if missed {
                    alpha.mark_out_of_sync(offset, len);
                    oos_events.push(OosEvent::Set {
                        stamp: pair.points(),
                        offset,
                        len,
                    });
                } else {
                    replica_write(&pair.beta_data, &data, offset, level, via_flush);
                    beta.write_end(offset, len);
                }
                alpha.write_end(offset, len);
                let acked = pair.points();
                if !missed {
                    to_beta.push(Sent {
                        issued,
                        acked,
                        offset,
                        data: data.clone(),
                    });
                }
                to_alpha.push(Sent {
                    issued,
                    acked,
                    offset,
                    data,
                });
            }
            Op::Flush => {
                pair.alpha.flush().unwrap();
                pair.beta_data.flush().unwrap();
            }
            Op::FlushBitmap => {
                alpha.flush_bitmap().unwrap();
                beta.flush_bitmap().unwrap();
            }
            Op::MarkClean => {
                alpha.mark_clean().unwrap();
                beta.mark_clean().unwrap();
            }
            Op::Resync { blocks } => {
                let Some(run) = alpha.iterate_dirty().next() else {
                    continue;
                };
                let len = (run.end - run.start).min(blocks * BLOCK);
                let mut data = vec![0u8; len as usize];
                pair.alpha.read_at(&mut data, run.start).unwrap();
                beta.write_begin(run.start, len).unwrap();
                let issued = pair.points();
                replica_write(&pair.beta_data, &data, run.start, level, false);
                beta.write_end(run.start, len);
                let acked = pair.points();
                to_beta.push(Sent {
                    issued,
                    acked,
                    offset: run.start,
                    data,
                });
                // Only now is the run on both replicas at the resource's level.
                alpha.clear_in_sync(run.start, len);
                oos_events.push(OosEvent::Clear {
                    stamp: pair.points(),
                    offset: run.start,
                    len,
                });
            }
        }
    }
    let total = pair.points();
    let mut t = Totals {
        cases: 1,
        points: total + 1,
        ..Totals::default()
    };
    let mut a_data = vec![0u8; DATA_SIZE as usize];
    let mut b_data = vec![0u8; DATA_SIZE as usize];
    CrashDevice::for_each_crash_point(&pair.devices(), |cut| {
        let k = cut.point();
        let mut oos = vec![false; (DATA_SIZE / BLOCK) as usize];
        for e in &oos_events {
            match *e {
                OosEvent::Set { stamp, offset, len } if stamp <= k => {
                    for b in offset / BLOCK..(offset + len).div_ceil(BLOCK) {
                        oos[b as usize] = true;
                    }
                }
                OosEvent::Clear { stamp, offset, len } if stamp <= k => {
                    for b in offset.div_ceil(BLOCK)..(offset + len) / BLOCK {
                        oos[b as usize] = false;
                    }
                }
                _ => {}
            }
        }
        let want_a = expected(&to_alpha, k);
        let want_b = expected(&to_beta, k);
        for mode in [
            CrashMode::DropAll,
            CrashMode::KeepSubset(seed ^ k as u64),
            CrashMode::TearSector(seed.rotate_left(23) ^ k as u64),
        ] {
            let mut devs = cut.crash(mode).into_iter().map(Arc::new);
            let (a_dev, b_meta, b_dev) = (
                devs.next().unwrap(),
                devs.next().unwrap(),
                devs.next().unwrap(),
            );
            let at = || format!("power cut at point {k}/{total} {mode:?} ({level})");
            let (a_after, a_rep) =
                MetaStore::attach(a_dev.clone(), a_dev.clone(), MetaKind::Internal)
                    .unwrap_or_else(|e| panic!("alpha attach after {}: {e}", at()));
            let (b_after, b_rep) = MetaStore::attach(b_meta, b_dev.clone(), MetaKind::External)
                .unwrap_or_else(|e| panic!("beta attach after {}: {e}", at()));
            assert!(
                !a_rep.al_incomplete && !b_rep.al_incomplete,
                "activity log lost after {}",
                at()
            );
            a_dev.read_at(&mut a_data, 0).unwrap();
            b_dev.read_at(&mut b_data, 0).unwrap();
            for b in 0..DATA_SIZE / BLOCK {
                let r = (b * BLOCK) as usize..((b + 1) * BLOCK) as usize;
                let named = a_after.is_out_of_sync(b * BLOCK) || b_after.is_out_of_sync(b * BLOCK);
                assert!(
                    a_data[r.clone()] == b_data[r] || named,
                    "block {b} differs between the replicas but neither names it after {} (alpha {a_rep:?}, beta {b_rep:?})",
                    at()
                );
                assert!(
                    !oos[b as usize] || a_after.is_out_of_sync(b * BLOCK),
                    "block {b} was marked out of sync on alpha and is not after {}",
                    at()
                );
            }
            let mut lost = false;
            for (name, data, want) in [("alpha", &a_data, &want_a), ("beta", &b_data, &want_b)] {
                for (s, w) in want.iter().enumerate() {
                    let Some(w) = w else { continue };
                    let got = &data[s * SECTOR as usize..(s + 1) * SECTOR as usize];
                    if got != &w[..] {
                        assert!(
                            level == Durability::Node,
                            "{name} lost an acknowledged write in sector {s} after {}",
                            at()
                        );
                        lost = true;
                    }
                }
            }
            t.lost_acked += lost as usize;
            t.checks += 1;
        }
    });
    t
}

fn config(default_cases: u32) -> ProptestConfig {
    // PROPTEST_CASES=N runs N cases for a deeper search than CI's default.
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_cases);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

macro_rules! power_cut_property {
    ($name:ident, $level:expr, $cases:expr) => {
        #[test]
        fn $name() {
            let started = Instant::now();
            let totals = std::cell::Cell::new(Totals::default());
            proptest!(config($cases), |(al_extents in 7u32..12,
                                        ops in prop::collection::vec(op(), 1..60),
                                        seed in any::<u64>())| {
                let c = run_case($level, al_extents, &ops, seed);
                let mut t = totals.get();
                t.cases += c.cases;
                t.points += c.points;
                t.checks += c.checks;
                t.lost_acked += c.lost_acked;
                totals.set(t);
            });
            let t = totals.get();
            eprintln!(
                "{}: {} cases, {} crash points, {} power cuts x 2 nodes recovered and checked, {} of them lost an acknowledged write, in {:.1?}",
                stringify!($name), t.cases, t.points, t.checks, t.lost_acked, started.elapsed()
            );
        }
    };
}

power_cut_property!(
    power_cut_of_both_nodes_at_node_level_is_covered_by_the_meta_data,
    Durability::Node,
    8
);
power_cut_property!(
    power_cut_of_both_nodes_at_power_level_keeps_every_acknowledged_write,
    Durability::Power,
    8
);

/// The difference between the levels on one write: at `node` a simultaneous power cut may take
/// an acknowledged write from both replicas (they still agree, and the activity logs name the
/// extent); at `power` it survives on both.
#[test]
fn one_acknowledged_write_under_a_simultaneous_power_cut() {
    for level in [Durability::Node, Durability::Power] {
        let pair = Pair::new(LayoutParams {
            al_extents: 7,
            al_extent_shift: 16,
        });
        let (alpha, _) =
            MetaStore::attach(pair.alpha.clone(), pair.alpha.clone(), MetaKind::Internal).unwrap();
        let (beta, _) = MetaStore::attach(
            pair.beta_meta.clone(),
            pair.beta_data.clone(),
            MetaKind::External,
        )
        .unwrap();
        let data = contents(7, 3 * 65536, 4096);
        alpha.write_begin(3 * 65536, 4096).unwrap();
        beta.write_begin(3 * 65536, 4096).unwrap();
        replica_write(&pair.alpha, &data, 3 * 65536, level, false);
        replica_write(&pair.beta_data, &data, 3 * 65536, level, false);
        beta.write_end(3 * 65536, 4096);
        alpha.write_end(3 * 65536, 4096);
        // Acknowledged. Now both lose power.
        let a = Arc::new(pair.alpha.crash(CrashMode::DropAll));
        let (bm, bd) = (
            pair.beta_meta.crash(CrashMode::DropAll),
            Arc::new(pair.beta_data.crash(CrashMode::DropAll)),
        );
        let mut got = [vec![0u8; 4096], vec![0u8; 4096]];
        a.read_at(&mut got[0], 3 * 65536).unwrap();
        bd.read_at(&mut got[1], 3 * 65536).unwrap();
        let (a_after, _) = MetaStore::attach(a.clone(), a, MetaKind::Internal).unwrap();
        let (b_after, _) = MetaStore::attach(Arc::new(bm), bd, MetaKind::External).unwrap();
        match level {
            Durability::Node => {
                assert_eq!(got, [vec![0; 4096], vec![0; 4096]], "node level lost it");
            }
            Durability::Power => assert_eq!(got, [data.clone(), data.clone()]),
        }
        // Either way each node's log named the extent, so a resync would compare it.
        assert!(a_after.is_out_of_sync(3 * 65536) && b_after.is_out_of_sync(3 * 65536));
    }
}
