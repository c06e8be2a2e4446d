//! `twinblade check-config` as an admin runs it: the binary on good and broken files, against
//! this machine (the loopback interface and address, disks in a temporary directory), and on
//! every example under `appliance/`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

const SECRET: &str = "do-not-print-me-7f3a";

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn check_config(args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_twinblade"))
        .arg("check-config")
        .args(args)
        .env_remove("TWINBLADE_NODE")
        .output()
        .expect("run twinblade");
    Run {
        code: out.status.code().expect("exited"),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A pair on this machine: alpha on 127.0.0.1 and `lo`, its disks in `dir`.
fn pair(dir: &Path) -> String {
    format!(
        r#"
[cluster]
shared-secret = "{SECRET}"
[node.alpha]
address = "127.0.0.1"
interface = "lo"
[node.beta]
address = "127.0.0.2"
interface = "lo"
[resource.r0]
aoe = "e0.3"
port = 7788
floating-ip = "127.0.0.100/8"
nbd = "127.0.0.100:10809"
[resource.r0.on.alpha]
disk = "{d}/r0.img"
meta-disk = "internal"
[resource.r0.on.beta]
disk = "/dev/sdb"
meta-disk = "/dev/loop0"
[resource.r1]
aoe = "e0.4"
port = 7789
[resource.r1.on.alpha]
disk = "{d}/r1.img"
meta-disk = "{d}/r1.md"
[resource.r1.on.beta]
disk = "/dev/sdc"
meta-disk = "internal"
"#,
        d = dir.display()
    )
}

/// A directory with alpha's disks, and the configuration written into it as `name`.
fn setup(text: impl FnOnce(&Path) -> String) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    for (name, size) in [
        ("r0.img", 64 << 20),
        ("r1.img", 32 << 20),
        ("r1.md", 1 << 20),
    ] {
        std::fs::File::create(dir.path().join(name))
            .unwrap()
            .set_len(size)
            .unwrap();
    }
    let conf = dir.path().join("twinblade.toml");
    std::fs::write(&conf, text(dir.path())).unwrap();
    (dir, conf)
}

/// Every file in `dir` with its size and modification time.
fn listing(dir: &Path) -> Vec<(PathBuf, u64, std::time::SystemTime)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let m = e.metadata().unwrap();
            (e.path(), m.len(), m.modified().unwrap())
        })
        .collect();
    v.sort();
    v
}

#[test]
fn a_good_file_prints_the_effective_settings_and_touches_nothing() {
    let (dir, conf) = setup(pair);
    let before = listing(dir.path());
    let r = check_config(&["-c", conf.to_str().unwrap(), "--node", "alpha"]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    for line in [
        "[node.alpha]  # this node",
        "shared-secret = \"<hidden>\"",
        "heartbeat = [\"127.0.0.1\"]",
        "protocol = \"C\"",
        "al-extent-kib = 4096",
        "degr-wfc-timeout = 60.0",
        "on-no-quorum = \"io-error\"",
        "on-no-quorum-timeout = 30.0",
        "[resource.r1.on.alpha]",
        "regular file, 67108864 bytes (64.00 MiB)",
        "usable ",
    ] {
        assert!(r.stdout.contains(line), "{line:?} missing in\n{}", r.stdout);
    }
    assert!(!r.stdout.contains(SECRET) && !r.stderr.contains(SECRET));
    // One heartbeat path each: a warning, not an error.
    assert!(
        r.stderr.contains("warning: ")
            && r.stderr
                .contains(": node.alpha.heartbeat: one heartbeat path"),
        "{}",
        r.stderr
    );
    // Without --node, the node comes from where `run` takes it: $TWINBLADE_NODE here.
    let out = Command::new(env!("CARGO_BIN_EXE_twinblade"))
        .args(["check-config", "-q", "-c", conf.to_str().unwrap()])
        .env("TWINBLADE_NODE", "alpha")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("valid for node alpha on this machine"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
    // The dump is a configuration again.
    let again = dir.path().join("again.toml");
    std::fs::write(&again, &r.stdout).unwrap();
    let r2 = check_config(&["-c", again.to_str().unwrap(), "--node", "alpha", "-q"]);
    assert_eq!(r2.code, 0, "{}", r2.stderr);
    assert!(r2.stdout.is_empty());
    std::fs::remove_file(&again).unwrap();
    assert_eq!(
        listing(dir.path()),
        before,
        "check-config changed the directory"
    );
}

#[test]
fn each_broken_file_names_the_key_and_the_problem() {
    // (change to the good file, exit status, what stderr must say)
    let cases: &[(&str, &str, i32, &str)] = &[
        (
            "floating-ip = \"127.0.0.100/8\"",
            "floating-ip = \"127.0.0.1/8\"",
            2,
            ": resource.r0.floating-ip: 127.0.0.1 is node alpha's own address",
        ),
        ("aoe = \"e0.4\"", "aoe = \"e0.3\"", 2, ": resource.r1.aoe: e0.3 is already used by resource r0"),
        ("disk = \"/dev/sdc\"", "disk = \"/dev/sdb\"", 2, ": resource.r1.on.beta.disk: /dev/sdb is also resource r0's disk on beta"),
        ("interface = \"lo\"\n[node.beta]", "interface = \"nosuchif0\"\n[node.beta]", 1, ": node.alpha.interface: this machine has no interface nosuchif0"),
        ("address = \"127.0.0.1\"", "address = \"192.0.2.77\"", 1, ": node.alpha.address: 192.0.2.77 is not an address of this machine"),
        ("r0.img", "r0-missing.img", 1, "r0-missing.img does not exist (create it, then: twinblade create-md r0)"),
        ("r1.md", "r1-missing.md", 1, ": resource.r1.on.alpha.meta-disk: "),
        ("port = 7789", "port = 7789\nprotocol = \"D\"", 2, ": resource.r1.protocol: unknown variant `D`"),
        ("port = 7789", "port = 7789\nbogus = 1", 2, ": resource.r1.bogus: unknown key"),
        ("port = 7789", "port = 7789\non-no-quorum = \"freeze\"", 2, ": resource.r1.on-no-quorum: unknown value \"freeze\", expected \"io-error\" or \"suspend-io\""),
        ("port = 7789", "port = 7789\non-no-quorum-timeout = 0", 2, ": resource.r1.on-no-quorum-timeout: 0 is not a number of seconds in (0, 86400]"),
        ("port = 7789", "port = 7789\non-no-quorum-timeout = -2.5", 2, ": resource.r1.on-no-quorum-timeout: -2.5 is not a number of seconds"),
        ("port = 7789", "port = 7789\non-no-quorum-timeout = nan", 2, ": resource.r1.on-no-quorum-timeout: NaN is not a number of seconds"),
        ("port = 7789", "port = 7789\non-no-quorum-timeout = 100000", 2, ": resource.r1.on-no-quorum-timeout: 100000 is not a number of seconds"),
        (
            "port = 7789",
            "port = 7789\non-no-quorum = \"suspend-io\"\non-no-quorum-timeout = 5",
            2,
            ": resource.r1.on-no-quorum-timeout: means nothing with on-no-quorum = \"suspend-io\"",
        ),
        ("port = 7789", "port = 7789\npreferred = \"gamma\"", 2, ": resource.r1.preferred-primary: gamma is not a node"),
        ("port = 7789", "port = 7789\nauto-failback = true", 2, ": resource.r1.auto-failback: needs `preferred` (the node to fail back to)"),
        (
            "port = 7789",
            "port = 7789\npreferred = \"alpha\"\nauto-failback = true\nauto-promote = false",
            2,
            ": resource.r1.auto-failback: needs auto-promote",
        ),
        ("port = 7789", "port = 7789\nfailback-delay = -1", 2, ": resource.r1.failback-delay: -1 is not a number of seconds in 0..86400"),
        ("[node.beta]", "[node.gamma]\naddress = \"127.0.0.3\"\ninterface = \"lo\"\n[node.beta]", 2, ": node: exactly two nodes are needed, found 3"),
        (
            "shared-secret = ",
            "shared-secret-file = \"/etc/twinblade/secret\"\nshared-secret = ",
            2,
            ": cluster.shared-secret-file: give the secret either inline (shared-secret) or in a file",
        ),
    ];
    for (from, to, code, says) in cases {
        let (dir, conf) = setup(|d| {
            let good = pair(d);
            assert!(good.contains(from), "{from}");
            good.replacen(from, to, 1)
        });
        let before = listing(dir.path());
        let r = check_config(&["-c", conf.to_str().unwrap(), "--node", "alpha"]);
        assert_eq!(r.code, *code, "{to}: {}", r.stderr);
        assert!(
            r.stderr.contains(says),
            "{to}: {says:?} not in {}",
            r.stderr
        );
        assert!(r.stderr.contains("error: "), "{}", r.stderr);
        assert!(r.stdout.is_empty(), "no dump with errors: {}", r.stdout);
        assert!(!r.stderr.contains(SECRET));
        assert_eq!(
            listing(dir.path()),
            before,
            "{to}: check-config changed the directory"
        );
    }
    // A tiny internal disk: the meta-data does not fit.
    let (dir, conf) = setup(pair);
    std::fs::File::options()
        .write(true)
        .open(dir.path().join("r0.img"))
        .unwrap()
        .set_len(16 << 10)
        .unwrap();
    let r = check_config(&["-c", conf.to_str().unwrap(), "--node", "alpha"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr
            .contains(": resource.r0.on.alpha.meta-disk: device of 16384 bytes is too small"),
        "{}",
        r.stderr
    );
    // Not a node here, a file that is not there.
    let r = check_config(&["-c", conf.to_str().unwrap(), "--node", "gamma"]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains(": node: --node gives \"gamma\""),
        "{}",
        r.stderr
    );
    let r = check_config(&["-c", "/nonexistent/twinblade.toml"]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.starts_with("error: /nonexistent/twinblade.toml: "),
        "{}",
        r.stderr
    );
}

#[test]
fn on_no_quorum_is_dumped_as_given_and_loads_again() {
    for (extra, dumped) in [
        (
            "on-no-quorum = \"suspend-io\"",
            &[
                "on-no-quorum = \"suspend-io\"",
                "# on-no-quorum-timeout: none",
            ][..],
        ),
        (
            "on-no-quorum = \"io-error\"\non-no-quorum-timeout = 2.5",
            &["on-no-quorum = \"io-error\"", "on-no-quorum-timeout = 2.5"][..],
        ),
    ] {
        let (dir, conf) =
            setup(|d| pair(d).replacen("port = 7789", &format!("port = 7789\n{extra}"), 1));
        let r = check_config(&["-c", conf.to_str().unwrap(), "--node", "alpha"]);
        assert_eq!(r.code, 0, "{extra}: {}", r.stderr);
        let r1 = r.stdout.split("[resource.r1]").nth(1).expect("r1 dumped");
        for line in dumped {
            assert!(r1.contains(line), "{line:?} missing in\n{r1}");
        }
        let again = dir.path().join("again.toml");
        std::fs::write(&again, &r.stdout).unwrap();
        let r2 = check_config(&["-c", again.to_str().unwrap(), "--node", "alpha"]);
        assert_eq!(r2.code, 0, "{}", r2.stderr);
        for line in dumped {
            assert!(r2.stdout.contains(line), "{line:?} lost in the dump's dump");
        }
    }
}

#[test]
fn a_secret_file_must_be_private_and_is_never_printed() {
    let (dir, conf) = setup(|d| {
        pair(d).replace(
            &format!("shared-secret = \"{SECRET}\""),
            &format!("shared-secret-file = \"{}/secret\"", d.display()),
        )
    });
    let secret = dir.path().join("secret");
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
    for mode in [0o644, 0o640, 0o604, 0o660] {
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(mode)).unwrap();
        let r = check_config(&["-c", conf.to_str().unwrap(), "--node", "alpha"]);
        assert_eq!(r.code, 1, "{mode:o}: {}", r.stderr);
        assert!(
            r.stderr.contains(&format!(
                ": cluster.shared-secret-file: {}/secret has mode {mode:04o}",
                dir.path().display()
            )),
            "{}",
            r.stderr
        );
        assert!(!r.stderr.contains(SECRET));
    }
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let r = check_config(&["-c", conf.to_str().unwrap(), "--node", "alpha"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("shared-secret-file = ") && r.stdout.contains("<hidden>"));
    assert!(!r.stdout.contains(SECRET) && !r.stderr.contains(SECRET));
}

/// Every node configuration shipped under `appliance/` (the witness's, `witness*.toml`, is
/// tests/witness.rs's), for both of its nodes: valid as a file (the machine running the tests
/// is neither node).
#[test]
fn every_example_configuration_is_valid() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("appliance");
    let mut found = Vec::new();
    let mut dirs = vec![root];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "toml")
                && !p
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("witness"))
            {
                found.push(p);
            }
        }
    }
    found.sort();
    assert!(found.len() >= 2, "examples: {found:?}");
    for file in &found {
        for node in ["alpha", "beta"] {
            let r = check_config(&["-c", file.to_str().unwrap(), "--node", node, "--offline"]);
            assert_eq!(r.code, 0, "{} for {node}: {}", file.display(), r.stderr);
            assert!(
                !r.stderr.contains("warning: "),
                "{}: {}",
                file.display(),
                r.stderr
            );
            assert!(r.stdout.contains(&format!("[node.{node}]  # this node")));
        }
    }
}

/// `[cluster] ping` and its timers: every mistake names its key; a good list is dumped with
/// its timers and loads again.
#[test]
fn ping_targets_are_checked_and_dumped() {
    let secret_line = format!("shared-secret = \"{SECRET}\"");
    let cases: &[(&str, &str)] = &[
        ("ping = []", ": cluster.ping: empty list"),
        (
            "ping = [\"10.0.0.1\", \"gateway\"]",
            ": cluster.ping: \"gateway\" is not an IP address",
        ),
        (
            "ping = [\"10.0.0.1\", \"10.0.0.1\"]",
            ": cluster.ping: 10.0.0.1 is listed twice",
        ),
        (
            "ping = [\"fd00::1\"]",
            ": cluster.ping: fd00::1 is an IPv6 address",
        ),
        (
            "ping = [\"10.0.0.1\"]\nping-interval = 0",
            ": cluster.ping-interval: 0 is not a number of seconds",
        ),
        (
            "ping = [\"10.0.0.1\"]\nping-interval = 2.0\nping-dead-time = 3.0",
            ": cluster.ping-dead-time: 3 s must be at least two ping intervals",
        ),
        (
            "ping = [\"10.0.0.1\"]\nping-switch-delay = -1",
            ": cluster.ping-switch-delay: -1 is not a number of seconds",
        ),
    ];
    for (lines, says) in cases {
        let (_dir, conf) =
            setup(|d| pair(d).replacen(&secret_line, &format!("{secret_line}\n{lines}"), 1));
        let r = check_config(&["-c", conf.to_str().unwrap(), "--node", "alpha"]);
        assert_eq!(r.code, 2, "{lines}: {}", r.stderr);
        assert!(
            r.stderr.contains(says),
            "{lines}: {says:?} not in {}",
            r.stderr
        );
        assert!(r.stdout.is_empty());
    }
    // Seventeen targets: one too many.
    let many: Vec<String> = (1..=17).map(|i| format!("\"10.0.0.{i}\"")).collect();
    let (_dir, conf) = setup(|d| {
        pair(d).replacen(
            &secret_line,
            &format!("{secret_line}\nping = [{}]", many.join(", ")),
            1,
        )
    });
    let r = check_config(&["-c", conf.to_str().unwrap(), "--node", "alpha"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains(": cluster.ping: 17 targets; at most 16"),
        "{}",
        r.stderr
    );
    // A good list: dumped with the defaults, and the dump loads again.
    let (dir, conf) = setup(|d| {
        pair(d).replacen(
            &secret_line,
            &format!("{secret_line}\nping = [\"10.0.0.1\", \"10.0.0.2\"]\nping-switch-delay = 4"),
            1,
        )
    });
    let r = check_config(&["-c", conf.to_str().unwrap(), "--node", "alpha"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    for line in [
        "ping = [\"10.0.0.1\", \"10.0.0.2\"]",
        "ping-interval = 1.0",
        "ping-dead-time = 3.0",
        "ping-switch-delay = 4.0",
    ] {
        assert!(r.stdout.contains(line), "{line:?} missing in\n{}", r.stdout);
    }
    let again = dir.path().join("again.toml");
    std::fs::write(
        &again,
        r.stdout.replace("\"<hidden>\"", &format!("\"{SECRET}\"")),
    )
    .unwrap();
    let r2 = check_config(&["-c", again.to_str().unwrap(), "--node", "alpha", "-q"]);
    assert_eq!(r2.code, 0, "{}", r2.stderr);
    // Without the key: no targets, said as a comment.
    let (_dir, conf) = setup(pair);
    let r = check_config(&["-c", conf.to_str().unwrap(), "--node", "alpha"]);
    assert!(r.stdout.contains("# ping: no ping targets"), "{}", r.stdout);
}
