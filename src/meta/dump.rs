//! What `twinblade dump-md` shows: an [`Inspection`] of the meta-data, as `key: value` lines
//! or one JSON object.
//!
//! # Output
//!
//! Read-only. One `key: value` line per item, in this order (`--json` prints one JSON object
//! with the same keys, numbers as numbers, lists as arrays, uuids as 16-digit hex strings):
//!
//! | key | value |
//! |-----|-------|
//! | `resource` | resource name from the superblock |
//! | `node` | the node the configuration selected |
//! | `meta-disk` | `internal PATH` or `external PATH` (the device holding the meta-data) |
//! | `format` | on-disk format version |
//! | `md-uuid` | 16 hex digits: identity of this meta-data, new at every create-md |
//! | `superblock` | `copy N, seq S; other copy: valid seq S' / damaged (why) / missing` |
//! | `flags` | space-separated: `consistent primary-ind crashed-primary peer-outdated al-clean`, or `none` |
//! | `uuid-current`, `uuid-bitmap` | 16 hex digits |
//! | `uuid-history` | two uuids, newest first |
//! | `data-size` | usable bytes and sectors: `N bytes (S sectors)` |
//! | `agreed-size` | the smaller size agreed with the peer, `N bytes (S sectors)`, or `none` |
//! | `meta-data` | `N bytes at byte O` |
//! | `activity-log` | `T transactions at byte O, E extents of X bytes` |
//! | `al-ring` | `V valid, I invalid, newest transaction N` (or `newest none`) |
//! | `al-state` | `clean`, `dirty: N extents` or `dirty: incomplete (whole device out of sync on attach)` |
//! | `al-extents` | the extent numbers the log names (only when dirty; `none` if empty) |
//! | `bitmap` | `P pages at byte O, 4096 bytes per bit` |
//! | `bitmap-corrupt-pages` | page indices, or `none` |
//! | `out-of-sync` | on-disk bitmap: `N bytes (B blocks)` |
//! | `out-of-sync-after-attach` | bitmap plus the AL extents if dirty: `N bytes` |
//! | `out-of-sync-ranges` | up to 32 `START-END` byte ranges (END exclusive), `...` if more, or `none` |
//!
//! After a power cut with one write in flight in extent 1 (64 KiB extents, as in this
//! file's test), the lines that differ from a clean dump are:
//!
//! ```text
//! superblock: copy 0, seq 2; other copy: valid seq 1
//! flags: none
//! al-ring: 1 valid, 7 invalid, newest transaction 0
//! al-state: dirty: 1 extents
//! al-extents: 1
//! out-of-sync: 0 bytes (0 blocks)
//! out-of-sync-after-attach: 65536 bytes
//! ```
//!
//! The on-disk bitmap is still clear; the next attach adds the 64 KiB of extent 1 (rule 4 in
//! [`crate::meta`]). The README shows a complete dump of fresh meta-data.

use std::path::Path;

use crate::wire::ondisk::{flags, AlTransactionRepr, MetaKind, SuperblockRepr, BLOCK_LEN};
use crate::wire::Error as WireError;

use super::activity_log::Recovery;
use super::bitmap::Bitmap;
use super::layout::{Layout, BM_BLOCK_SIZE};
use super::superblock::{CopyState, SuperblockPair};

/// Everything on the meta-data device, read without changing anything (dump-md).
#[derive(Debug, Clone)]
pub struct Inspection {
    /// Both superblock copies.
    pub superblocks: SuperblockPair,
    /// Which copy is in force.
    pub copy_in_force: usize,
    /// The superblock in force.
    pub superblock: SuperblockRepr,
    /// Its geometry.
    pub layout: Layout,
    /// Each ring slot, parsed and checked.
    pub ring: Vec<Result<AlTransactionRepr, WireError>>,
    /// The activity log rebuilt from the ring (ignored if the AL is clean).
    pub al: Recovery,
    /// The bitmap as loaded (corrupt pages already set).
    pub bitmap: Bitmap,
    /// Pages that failed their checks.
    pub corrupt_pages: Vec<u32>,
}

/// One dump-md value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// Printed as is; a JSON string.
    Str(String),
    /// A JSON number.
    Num(u64),
    /// Space-separated; a JSON array.
    List(Vec<Value>),
}

impl Value {
    /// As printed in a `key: value` line.
    pub fn text(&self) -> String {
        match self {
            Value::Str(s) => s.clone(),
            Value::Num(n) => n.to_string(),
            Value::List(v) if v.is_empty() => "none".into(),
            Value::List(v) => v.iter().map(Value::text).collect::<Vec<_>>().join(" "),
        }
    }

    /// As a JSON value.
    pub fn json(&self) -> String {
        match self {
            Value::Str(s) => {
                let mut out = String::from("\"");
                for c in s.chars() {
                    match c {
                        '"' => out.push_str("\\\""),
                        '\\' => out.push_str("\\\\"),
                        c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
                        c => out.push(c),
                    }
                }
                out.push('"');
                out
            }
            Value::Num(n) => n.to_string(),
            Value::List(v) => format!(
                "[{}]",
                v.iter().map(Value::json).collect::<Vec<_>>().join(",")
            ),
        }
    }
}

/// The fields as one JSON object, in their order.
pub fn to_json(fields: &[(&'static str, Value)]) -> String {
    let body: Vec<String> = fields
        .iter()
        .map(|(k, v)| format!("{}:{}", Value::Str(k.to_string()).json(), v.json()))
        .collect();
    format!("{{{}}}", body.join(","))
}

fn hex(v: u64) -> Value {
    Value::Str(format!("{v:016X}"))
}

/// The dump-md lines for an inspection (see the module docs for the format).
pub fn dump_fields(
    insp: &Inspection,
    node: &str,
    kind: MetaKind,
    meta_path: &Path,
) -> Vec<(&'static str, Value)> {
    let sb = &insp.superblock;
    let l = &insp.layout;
    let s = |v: String| Value::Str(v);
    let other = 1 - insp.copy_in_force;
    let other_state = match &insp.superblocks.copies[other] {
        CopyState::Valid(r) => format!("valid seq {}", r.seq),
        CopyState::Invalid(e) => format!("damaged ({e})"),
        CopyState::Missing => "missing".into(),
    };
    let flag_names: Vec<Value> = [
        (flags::CONSISTENT, "consistent"),
        (flags::PRIMARY_IND, "primary-ind"),
        (flags::CRASHED_PRIMARY, "crashed-primary"),
        (flags::PEER_OUTDATED, "peer-outdated"),
        (flags::AL_CLEAN, "al-clean"),
        (flags::OUTDATED, "outdated"),
    ]
    .iter()
    .filter(|(bit, _)| sb.flags & bit != 0)
    .map(|(_, name)| s(name.to_string()))
    .collect();
    let clean = sb.flags & flags::AL_CLEAN != 0;
    let al_state = if clean {
        "clean".to_string()
    } else if insp.al.complete {
        format!("dirty: {} extents", insp.al.extents.len())
    } else {
        "dirty: incomplete (whole device out of sync on attach)".to_string()
    };
    let mut after = insp.bitmap.clone();
    if !clean {
        if insp.al.complete {
            for &e in &insp.al.extents {
                after.set_range((e as u64) << l.al_extent_shift, l.extent_size());
            }
        } else {
            after.set_all();
        }
    }
    let runs = insp.bitmap.runs(l.data_size);
    let mut ranges: Vec<Value> = runs
        .iter()
        .take(32)
        .map(|r| s(format!("{}-{}", r.start, r.end)))
        .collect();
    if runs.len() > 32 {
        ranges.push(s("...".into()));
    }
    let kind_name = match kind {
        MetaKind::Internal => "internal",
        MetaKind::External => "external",
    };
    let mut fields = vec![
        ("resource", s(sb.name.clone())),
        ("node", s(node.to_string())),
        (
            "meta-disk",
            s(format!("{kind_name} {}", meta_path.display())),
        ),
        ("format", Value::Num(crate::wire::ondisk::SB_VERSION as u64)),
        ("md-uuid", hex(sb.md_uuid)),
        (
            "superblock",
            s(format!(
                "copy {}, seq {}; other copy: {other_state}",
                insp.copy_in_force, sb.seq
            )),
        ),
        ("flags", Value::List(flag_names)),
        ("uuid-current", hex(sb.uuids[0])),
        ("uuid-bitmap", hex(sb.uuids[1])),
        (
            "uuid-history",
            Value::List(vec![hex(sb.uuids[2]), hex(sb.uuids[3])]),
        ),
        (
            "data-size",
            s(format!(
                "{} bytes ({} sectors)",
                l.data_size,
                l.data_size / 512
            )),
        ),
        (
            "agreed-size",
            s(match sb.agreed_size {
                0 => "none".to_string(),
                n => format!("{n} bytes ({} sectors)", n / 512),
            }),
        ),
        (
            "meta-data",
            s(format!("{} bytes at byte {}", l.md_size, l.md_offset)),
        ),
        (
            "activity-log",
            s(format!(
                "{} transactions at byte {}, {} extents of {} bytes",
                l.al_transactions,
                l.al_offset,
                l.al_extents,
                l.extent_size()
            )),
        ),
        (
            "al-ring",
            s(format!(
                "{} valid, {} invalid, newest transaction {}",
                insp.al.valid,
                insp.al.invalid,
                insp.al.newest.map_or("none".to_string(), |n| n.to_string())
            )),
        ),
        ("al-state", s(al_state)),
    ];
    if !clean {
        fields.push((
            "al-extents",
            Value::List(
                insp.al
                    .extents
                    .iter()
                    .map(|&e| Value::Num(e as u64))
                    .collect(),
            ),
        ));
    }
    fields.extend([
        (
            "bitmap",
            s(format!(
                "{} pages at byte {}, {} bytes per bit",
                l.bm_pages, l.bm_offset, BM_BLOCK_SIZE
            )),
        ),
        (
            "bitmap-corrupt-pages",
            Value::List(
                insp.corrupt_pages
                    .iter()
                    .map(|&p| Value::Num(p as u64))
                    .collect(),
            ),
        ),
        (
            "out-of-sync",
            s(format!(
                "{} bytes ({} blocks)",
                insp.bitmap.out_of_sync_bytes(),
                insp.bitmap.count()
            )),
        ),
        (
            "out-of-sync-after-attach",
            s(format!("{} bytes", after.out_of_sync_bytes())),
        ),
        ("out-of-sync-ranges", Value::List(ranges)),
    ]);
    debug_assert!(BLOCK_LEN as u64 == BM_BLOCK_SIZE);
    fields
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::crash::{CrashDevice, CrashMode};
    use crate::meta::store::{create, inspect, CreateOptions, MetaStore};
    use crate::meta::LayoutParams;
    use std::sync::Arc;

    #[test]
    fn dump_fields_describe_a_crashed_store() {
        let dev = Arc::new(CrashDevice::new(4 << 20));
        let opts = CreateOptions {
            name: "r0".into(),
            params: LayoutParams {
                al_extents: 7,
                al_extent_shift: 16,
            },
            force: false,
        };
        create(dev.as_ref(), 0, MetaKind::Internal, &opts).unwrap();
        let insp = inspect(dev.as_ref(), 0, MetaKind::Internal).unwrap();
        let fields = dump_fields(&insp, "alpha", MetaKind::Internal, Path::new("/x"));
        let get = |fields: &[(&str, Value)], k: &str| {
            fields.iter().find(|(key, _)| *key == k).unwrap().1.text()
        };
        assert_eq!(get(&fields, "resource"), "r0");
        assert_eq!(get(&fields, "flags"), "al-clean");
        assert_eq!(get(&fields, "al-state"), "clean");
        assert_eq!(get(&fields, "uuid-current"), "0000000000000004");
        assert_eq!(get(&fields, "out-of-sync-ranges"), "none");
        assert!(get(&fields, "superblock").starts_with("copy 1, seq 1; other copy: valid seq 0"));

        let (store, _) = MetaStore::attach(dev.clone(), dev.clone(), MetaKind::Internal).unwrap();
        store.write_begin(65536, 4096).unwrap();
        store.mark_out_of_sync(65536, 4096);
        store.write_end(65536, 4096);
        let crashed = dev.crash(CrashMode::DropAll);
        let insp = inspect(&crashed, 0, MetaKind::Internal).unwrap();
        let fields = dump_fields(&insp, "alpha", MetaKind::Internal, Path::new("/x"));
        assert_eq!(get(&fields, "al-state"), "dirty: 1 extents");
        assert_eq!(get(&fields, "al-extents"), "1");
        assert_eq!(get(&fields, "flags"), "none");
        assert_eq!(get(&fields, "out-of-sync"), "0 bytes (0 blocks)");
        assert_eq!(get(&fields, "out-of-sync-after-attach"), "65536 bytes");
        let json = to_json(&fields);
        assert!(
            json.starts_with("{\"resource\":\"r0\",\"node\":\"alpha\""),
            "{json}"
        );
        assert!(json.contains("\"al-extents\":[1]"), "{json}");
        assert!(json.contains("\"flags\":[]"), "{json}");
        assert_eq!(
            Value::Str("a\"b\\\n".into()).json(),
            "\"a\\\"b\\\\\\u000a\""
        );
    }
}
