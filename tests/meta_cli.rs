//! `twinblade create-md` / `dump-md` end to end: the binary on temporary files with a temporary
//! configuration, internal meta-data on one node and external on the other.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use twinblade::meta::{Layout, LayoutParams};

const DISK: u64 = 16 << 20;

struct Lab {
    _dir: tempfile::TempDir,
    config: PathBuf,
    alpha_disk: PathBuf,
    beta_meta: PathBuf,
}

fn lab() -> Lab {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name);
    for (name, size) in [
        ("alpha.img", DISK),
        ("beta.img", DISK),
        ("beta.md", 1 << 20),
    ] {
        std::fs::File::create(p(name))
            .unwrap()
            .set_len(size)
            .unwrap();
    }
    let config = p("twinblade.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[cluster]
shared-secret = "test"
[node.alpha]
address = "192.168.100.1"
interface = "eth0"
[node.beta]
address = "192.168.100.2"
interface = "eth0"
[resource.r0]
aoe = "e0.3"
port = 7788
[resource.r0.on.alpha]
disk = "{}"
meta-disk = "internal"
[resource.r0.on.beta]
disk = "{}"
meta-disk = "{}"
"#,
            p("alpha.img").display(),
            p("beta.img").display(),
            p("beta.md").display()
        ),
    )
    .unwrap();
    Lab {
        config,
        alpha_disk: p("alpha.img"),
        beta_meta: p("beta.md"),
        _dir: dir,
    }
}

fn twinblade(args: &[&str], config: &Path, node: Option<&str>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_twinblade"));
    cmd.args(args)
        .arg("--config")
        .arg(config)
        .env_remove("TWINBLADE_NODE");
    if let Some(node) = node {
        cmd.env("TWINBLADE_NODE", node);
    }
    cmd.output().unwrap()
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn create_md_then_dump_md_internal_and_external() {
    let lab = lab();
    let layout = Layout::internal(DISK, LayoutParams::default()).unwrap();

    // alpha: internal meta-data; the usable size is reported.
    let out = twinblade(&["create-md", "r0", "--node", "alpha"], &lab.config, None);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!("usable size: {} bytes", layout.data_size)),
        "{stdout}"
    );
    assert!(stdout.contains("internal meta-data"), "{stdout}");

    let out = twinblade(&["dump-md", "r0", "--node", "alpha"], &lab.config, None);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    for line in [
        "resource: r0",
        "node: alpha",
        "flags: al-clean",
        "uuid-current: 0000000000000004",
        "al-state: clean",
        "out-of-sync: 0 bytes (0 blocks)",
        "bitmap-corrupt-pages: none",
        &format!("data-size: {} bytes", layout.data_size),
    ] {
        assert!(
            stdout.lines().any(|l| l.starts_with(line)),
            "missing {line:?} in\n{stdout}"
        );
    }

    // Existing meta-data is refused without --force, and named.
    let out = twinblade(&["create-md", "r0", "--node", "alpha"], &lab.config, None);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("twinblade meta-data of resource \"r0\""),
        "{stderr}"
    );
    assert!(stderr.contains("--force"), "{stderr}");
    let out = twinblade(
        &["create-md", "r0", "--node", "alpha", "--force"],
        &lab.config,
        None,
    );
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));

    // beta (chosen through $TWINBLADE_NODE): external meta-data; JSON output.
    let out = twinblade(&["create-md", "r0"], &lab.config, Some("beta"));
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!("usable size: {DISK} bytes")),
        "{stdout}"
    );
    let out = twinblade(&["dump-md", "r0", "--json"], &lab.config, Some("beta"));
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(
        stdout.starts_with("{\"resource\":\"r0\",\"node\":\"beta\""),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "\"meta-disk\":\"external {}\"",
            lab.beta_meta.display()
        )),
        "{stdout}"
    );
    assert!(stdout.contains("\"flags\":[\"al-clean\"]"), "{stdout}");
}

#[test]
fn create_md_refuses_an_ext4_signature_in_the_meta_data_area() {
    let lab = lab();
    let layout = Layout::internal(DISK, LayoutParams::default()).unwrap();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&lab.alpha_disk)
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(
        &file,
        &0xEF53u16.to_le_bytes(),
        layout.md_offset + 1080,
    )
    .unwrap();
    let out = twinblade(&["create-md", "r0", "--node", "alpha"], &lab.config, None);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(stderr.contains("ext2/3/4 filesystem"), "{stderr}");
    assert!(
        stderr.contains(&format!("byte {}", layout.md_offset + 1080)),
        "{stderr}"
    );
    // dump-md finds nothing there.
    let out = twinblade(&["dump-md", "r0", "--node", "alpha"], &lab.config, None);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).1.contains("no twinblade meta-data"),
        "{:?}",
        text(&out)
    );
}

#[test]
fn config_errors_exit_2_and_name_the_key() {
    let lab = lab();
    let bad = std::fs::read_to_string(&lab.config)
        .unwrap()
        .replace("port = 7788", "port = 7788\nfoo = 1");
    std::fs::write(&lab.config, bad).unwrap();
    let out = twinblade(&["dump-md", "r0", "--node", "alpha"], &lab.config, None);
    assert_eq!(out.status.code(), Some(2));
    let (_, stderr) = text(&out);
    assert!(
        stderr.contains(&format!(
            "{}: resource.r0.foo: unknown key",
            lab.config.display()
        )),
        "{stderr}"
    );
}
