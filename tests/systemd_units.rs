//! The systemd units under `appliance/systemd/`: `systemd-analyze verify` accepts them (with
//! the binary's path pointed at this build, since verify checks that it exists), and the node's
//! unit is the `Type=notify` service with a watchdog that `twinblade run` is written for.
//! Skipped, saying so, where `systemd-analyze` is not installed (Debian package `systemd`).

use std::path::Path;
use std::process::Command;

const INSTALLED: &str = "/usr/local/bin/twinblade";
/// Where some units expect it instead.
const INSTALLED_SBIN: &str = "/usr/sbin/twinblade";

fn units() -> Vec<std::path::PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("appliance/systemd");
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "service"))
        .collect();
    v.sort();
    v
}

#[test]
fn the_node_unit_is_notify_with_a_watchdog_and_keeps_its_cleanup() {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("appliance/systemd/twinblade.service"),
    )
    .unwrap();
    let has = |line: &str| text.lines().any(|l| l.trim() == line);
    assert!(has("Type=notify"), "{text}");
    assert!(has("NotifyAccess=main"), "{text}");
    assert!(
        text.lines().any(|l| l.starts_with("WatchdogSec=")),
        "{text}"
    );
    assert!(has(&format!(
        "ExecStartPre={INSTALLED} check-config -q --config /etc/twinblade.toml"
    )));
    assert!(has(&format!(
        "ExecStart={INSTALLED} run --config /etc/twinblade.toml"
    )));
    assert!(has(&format!(
        "ExecStopPost={INSTALLED} release-ips --config /etc/twinblade.toml"
    )));
    assert!(
        units()
            .iter()
            .any(|u| u.ends_with("twinblade-vblade@.service")),
        "{:?}",
        units()
    );
}

#[test]
fn systemd_analyze_verifies_every_unit() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!(
            "SKIPPED: systemd-analyze is not installed (Debian package systemd); the units were not verified"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut names = Vec::new();
    for unit in units() {
        let text = std::fs::read_to_string(&unit)
            .unwrap()
            .replace(INSTALLED, env!("CARGO_BIN_EXE_twinblade"))
            .replace(INSTALLED_SBIN, env!("CARGO_BIN_EXE_twinblade"));
        let name = unit.file_name().unwrap().to_str().unwrap().to_string();
        std::fs::write(dir.path().join(&name), text).unwrap();
        names.push(name);
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(&names)
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify: {stderr}");
    // Unknown keys and bad values are only warnings: any line about our units fails.
    let about_ours: Vec<&str> = stderr
        .lines()
        .filter(|l| {
            names
                .iter()
                .any(|n| l.contains(n.trim_end_matches(".service")))
        })
        .collect();
    assert!(about_ours.is_empty(), "systemd-analyze verify: {stderr}");
}
