//! Crash property tests for the replication meta-data.
//!
//! Each case runs a random workload through a [`MetaStore`] the way the replication engine
//! does (write_begin → data write → mark_out_of_sync if the peer missed it → write_end; data
//! flushes; bitmap flushes; clean shutdowns; resync steps that copy a dirty run to the peer
//! and clear its bits), on [`CrashDevice`]s that record every write and flush. Then it cuts
//! the power at **every durability point** of the run (every flush and FUA write, with that
//! write or flush in flight) in each of three modes — unflushed writes dropped, an arbitrary
//! subset kept, a subset kept with one sector torn — re-attaches, and checks:
//!
//! * attach succeeds (a superblock copy survives; the activity log is always recoverable);
//! * every 4 KiB block whose local contents differ from the peer's is marked out of sync;
//! * every block marked out of sync before the crash (and not resynced) still is.
//!
//! The peer is modelled as surviving the crash (it has every write it acknowledged): the
//! local node lost power. Blocks are compared at 4 KiB granularity with unique contents per
//! write, so any lost or torn write shows up as a difference.

use std::sync::Arc;
use std::time::Instant;

use proptest::prelude::*;
use twinblade::block::crash::{CrashDevice, CrashMode};
use twinblade::block::BlockDevice;
use twinblade::meta::{create, CreateOptions, LayoutParams, MetaStore};
use twinblade::wire::ondisk::MetaKind;

const BLOCK: u64 = 4096;
const DATA_SIZE: u64 = 1 << 20; // 16 extents of 64 KiB

#[derive(Debug, Clone)]
enum Op {
    /// A replicated write; `missed`: the peer did not get it.
    Write {
        sector: u64,
        sectors: u64,
        fua: bool,
        missed: bool,
    },
    /// A data flush (a client's FLUSH).
    Flush,
    /// Bitmap write-back.
    FlushBitmap,
    /// Clean shutdown (and carrying on afterwards).
    MarkClean,
    /// Resync the first dirty run (up to `blocks` blocks) to the peer.
    Resync { blocks: u64 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        12 => (0u64..2048, 1u64..=64, prop::bool::weighted(0.15), prop::bool::weighted(0.2))
            .prop_map(|(sector, sectors, fua, missed)| Op::Write { sector, sectors, fua, missed }),
        2 => Just(Op::Flush),
        1 => Just(Op::FlushBitmap),
        1 => Just(Op::MarkClean),
        1 => (1u64..16).prop_map(|blocks| Op::Resync { blocks }),
    ]
}

/// Something that happened to the model, stamped with the number of durability points issued
/// before it: it is part of a crash at point `k` iff `stamp <= k`.
#[derive(Debug)]
enum Event {
    PeerWrite {
        stamp: usize,
        offset: u64,
        data: Vec<u8>,
    },
    SetOos {
        stamp: usize,
        offset: u64,
        len: u64,
    },
    ClearOos {
        stamp: usize,
        offset: u64,
        len: u64,
    },
}

struct Rig {
    kind: MetaKind,
    meta: Arc<CrashDevice>,
    data: Arc<CrashDevice>,
}

impl Rig {
    fn new(kind: MetaKind, params: LayoutParams) -> Rig {
        let (meta, data) = match kind {
            MetaKind::Internal => {
                // Size the device so the usable size is exactly DATA_SIZE.
                let md = twinblade::meta::Layout::internal(DATA_SIZE + (1 << 20), params)
                    .unwrap()
                    .md_size;
                let dev = Arc::new(CrashDevice::new(DATA_SIZE + md));
                (dev.clone(), dev)
            }
            MetaKind::External => (
                Arc::new(CrashDevice::new(256 << 10)),
                Arc::new(CrashDevice::new(DATA_SIZE)),
            ),
        };
        let opts = CreateOptions {
            name: "r0".into(),
            params,
            force: false,
        };
        let report = create(meta.as_ref(), data.size(), kind, &opts).unwrap();
        assert_eq!(report.layout.data_size, DATA_SIZE);
        Rig { kind, meta, data }
    }

    fn attach(&self) -> MetaStore {
        let (store, _) =
            MetaStore::attach(self.meta.clone(), self.data.clone(), self.kind).unwrap();
        store
    }

    fn points(&self) -> usize {
        self.meta.durability_points()
    }

    fn start_recording(&self) {
        if Arc::ptr_eq(&self.meta, &self.data) {
            self.meta.record_history();
        } else {
            CrashDevice::record_group_history(&[&self.meta, &self.data]);
        }
    }

    /// Calls `f(point, cut)` for every durability point and "now"; `cut(mode)` returns the
    /// surviving (meta, data) devices.
    fn for_each_crash_point(
        &self,
        mut f: impl FnMut(usize, &dyn Fn(CrashMode) -> (Arc<CrashDevice>, Arc<CrashDevice>)),
    ) {
        let internal = Arc::ptr_eq(&self.meta, &self.data);
        let group: Vec<&CrashDevice> = if internal {
            vec![&self.meta]
        } else {
            vec![&self.meta, &self.data]
        };
        CrashDevice::for_each_crash_point(&group, |c| {
            let cut = |mode| {
                let mut devs = c.crash(mode).into_iter().map(Arc::new);
                let meta = devs.next().unwrap();
                let data = if internal {
                    meta.clone()
                } else {
                    devs.next().unwrap()
                };
                (meta, data)
            };
            f(c.point(), &cut)
        });
    }

    fn crash_at(&self, point: usize, mode: CrashMode) -> (Arc<CrashDevice>, Arc<CrashDevice>) {
        if Arc::ptr_eq(&self.meta, &self.data) {
            let dev = Arc::new(self.meta.crash_at(point, mode));
            (dev.clone(), dev)
        } else {
            let mut both =
                CrashDevice::crash_group_at(&[&self.meta, &self.data], point, mode).into_iter();
            (
                Arc::new(both.next().unwrap()),
                Arc::new(both.next().unwrap()),
            )
        }
    }
}

fn contents(serial: u32, offset: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            let at = offset + i as u64;
            (serial.wrapping_mul(2_654_435_761) >> ((at % 4) * 8)) as u8 ^ (at / 512) as u8 ^ 0x5a
        })
        .collect()
}

/// Runs the workload, then crashes at every point in every mode. Returns (points, checks).
fn run_case(kind: MetaKind, al_extents: u32, ops: &[Op], seed: u64) -> (usize, usize) {
    let params = LayoutParams {
        al_extents,
        al_extent_shift: 16,
    };
    let rig = Rig::new(kind, params);
    let store = rig.attach();
    rig.start_recording();
    let mut events = Vec::new();
    for (serial, op) in ops.iter().enumerate() {
        match *op {
            Op::Write {
                sector,
                sectors,
                fua,
                missed,
            } => {
                let offset = sector * 512;
                let len = (sectors * 512).min(DATA_SIZE - offset);
                let data = contents(serial as u32 + 1, offset, len as usize);
                store.write_begin(offset, len).unwrap();
                if !missed {
                    // The peer may get the write before the local disk does.
                    events.push(Event::PeerWrite {
                        stamp: rig.points(),
                        offset,
                        data: data.clone(),
                    });
                }
                rig.data.write_at(&data, offset, fua).unwrap();
                if missed {
                    store.mark_out_of_sync(offset, len);
                    events.push(Event::SetOos {
                        stamp: rig.points(),
                        offset,
                        len,
                    });
                }
                store.write_end(offset, len);
            }
            Op::Flush => rig.data.flush().unwrap(),
            Op::FlushBitmap => store.flush_bitmap().unwrap(),
            Op::MarkClean => store.mark_clean().unwrap(),
            Op::Resync { blocks } => {
                if let Some(run) = store.iterate_dirty().next() {
                    let len = (run.end - run.start).min(blocks * BLOCK);
                    let mut data = vec![0u8; len as usize];
                    rig.data.read_at(&mut data, run.start).unwrap();
                    events.push(Event::PeerWrite {
                        stamp: rig.points(),
                        offset: run.start,
                        data,
                    });
                    store.clear_in_sync(run.start, len);
                    events.push(Event::ClearOos {
                        stamp: rig.points(),
                        offset: run.start,
                        len,
                    });
                }
            }
        }
    }
    let total = rig.points();
    let mut checks = 0;
    // Reused across points: fresh megabyte buffers cost more in page faults than the checks.
    let mut peer = vec![0u8; DATA_SIZE as usize];
    let mut local = vec![0u8; DATA_SIZE as usize];
    rig.for_each_crash_point(|point, cut| {
        let modes = [
            CrashMode::DropAll,
            CrashMode::KeepSubset(seed ^ point as u64),
            CrashMode::TearSector(seed.rotate_left(17) ^ point as u64),
        ];
        // The model at this point.
        peer.fill(0);
        let mut oos = vec![false; (DATA_SIZE / BLOCK) as usize];
        for e in &events {
            match e {
                Event::PeerWrite {
                    stamp,
                    offset,
                    data,
                } if *stamp <= point => {
                    peer[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
                }
                Event::SetOos { stamp, offset, len } if *stamp <= point => {
                    for b in offset / BLOCK..(offset + len).div_ceil(BLOCK) {
                        oos[b as usize] = true;
                    }
                }
                Event::ClearOos { stamp, offset, len } if *stamp <= point => {
                    for b in offset.div_ceil(BLOCK)..(offset + len) / BLOCK {
                        oos[b as usize] = false;
                    }
                }
                _ => {}
            }
        }
        for mode in modes {
            let (meta, data) = cut(mode);
            let (after, report) = MetaStore::attach(meta, data.clone(), kind).unwrap_or_else(|e| {
                panic!("attach after crash at point {point}/{total} {mode:?}: {e}")
            });
            assert!(
                !report.al_incomplete,
                "activity log lost at point {point} {mode:?}"
            );
            data.read_at(&mut local, 0).unwrap();
            for b in 0..DATA_SIZE / BLOCK {
                let r = (b * BLOCK) as usize..((b + 1) * BLOCK) as usize;
                let differs = local[r.clone()] != peer[r];
                if (differs || oos[b as usize]) && !after.is_out_of_sync(b * BLOCK) {
                    panic!(
                        "block {b} {} but is not marked out of sync after a crash at point {point}/{total} {mode:?} (report {report:?})",
                        if differs { "differs from the peer" } else { "was marked out of sync" }
                    );
                }
            }
            checks += 1;
        }
    });
    (total + 1, checks)
}

fn config(default_cases: u32) -> ProptestConfig {
    // Each case crashes ~60 points x 3 modes; CI's default keeps the test to a few seconds.
    // PROPTEST_CASES=N runs N cases for a deeper search.
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

/// Counts for the report, printed with `--nocapture`.
fn report(name: &str, cases: usize, points: usize, checks: usize, started: Instant) {
    eprintln!(
        "{name}: {cases} cases, {points} crash points, {checks} crash+recover checks in {:.1?}",
        started.elapsed()
    );
}

macro_rules! crash_property {
    ($name:ident, $kind:expr, $cases:expr) => {
        #[test]
        fn $name() {
            let started = Instant::now();
            let totals = std::cell::Cell::new((0usize, 0usize, 0usize));
            proptest!(config($cases), |(al_extents in 7u32..12,
                                        ops in prop::collection::vec(op(), 1..100),
                                        seed in any::<u64>())| {
                let (points, checks) = run_case($kind, al_extents, &ops, seed);
                let (c, p, k) = totals.get();
                totals.set((c + 1, p + points, k + checks));
            });
            let (c, p, k) = totals.get();
            report(stringify!($name), c, p, k, started);
        }
    };
}

crash_property!(
    crash_anywhere_internal_meta_data_covers_every_difference,
    MetaKind::Internal,
    24
);
crash_property!(
    crash_anywhere_external_meta_data_covers_every_difference,
    MetaKind::External,
    24
);

/// A fixed workload that fills and churns the activity log, so eviction (bitmap write-back,
/// data flush, transaction) happens many times between crash points.
#[test]
fn crash_during_heavy_eviction_covers_every_difference() {
    let started = Instant::now();
    let mut ops = Vec::new();
    for i in 0..120u64 {
        let extent = (i * 7) % 16;
        ops.push(Op::Write {
            sector: extent * 128 + (i % 8) * 16,
            sectors: 9,
            fua: i % 11 == 0,
            missed: i % 5 == 0,
        });
        if i % 40 == 39 {
            ops.push(Op::Resync { blocks: 8 });
        }
    }
    let mut total = (0, 0);
    for kind in [MetaKind::Internal, MetaKind::External] {
        let (p, c) = run_case(kind, 7, &ops, 42);
        total = (total.0 + p, total.1 + c);
    }
    report("crash_during_heavy_eviction", 2, total.0, total.1, started);
}

/// Without the rules, the property fails: a store whose AL is bypassed (the data written with
/// no write_begin) must be caught — proves the checker can see a violation.
#[test]
fn checker_catches_a_write_outside_the_activity_log() {
    let params = LayoutParams {
        al_extents: 7,
        al_extent_shift: 16,
    };
    let rig = Rig::new(MetaKind::Internal, params);
    let store = rig.attach();
    // Make the store dirty (AL not clean) with some other extent, then write around it.
    store.write_begin(0, 4096).unwrap();
    store.write_end(0, 4096);
    rig.data.flush().unwrap();
    rig.start_recording();
    let data = contents(1, 5 * 65536, 4096);
    rig.data.write_at(&data, 5 * 65536, false).unwrap(); // peer has it, local only in cache
    rig.data.flush().unwrap();
    let (meta, dev) = rig.crash_at(0, CrashMode::DropAll);
    let (after, _) = MetaStore::attach(meta, dev.clone(), MetaKind::Internal).unwrap();
    let mut local = vec![0u8; 4096];
    dev.read_at(&mut local, 5 * 65536).unwrap();
    assert_ne!(local, data, "the write was lost");
    assert!(
        !after.is_out_of_sync(5 * 65536),
        "and nothing marks it: the rules are what protect it"
    );
}
