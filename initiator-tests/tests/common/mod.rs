//! A tiny lab for tests: network namespaces joined by veth pairs, the twinblade binary run in
//! one of them, and test code run in another (a thread that joined the client namespace).
//!
//! Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_NET_RAW). Everything is removed on drop, also
//! when a test fails.

#![allow(dead_code)]

pub mod aoe_gate;
pub mod service_mac;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static NEXT_LAB: AtomicU32 = AtomicU32::new(0);

/// Two namespaces, `target` and `client`, with `links` veth pairs named eth0, eth1, ... in both
/// ([`Lab::new`]); or those two and more target namespaces, each with an eth0 on one bridge
/// ([`Lab::bridged`]).
pub struct Lab {
    pub target_ns: String,
    pub client_ns: String,
    /// Further target namespaces (only in a bridged lab).
    pub extra_target_ns: Vec<String>,
    /// The namespace holding the bridge (only in a bridged lab).
    bridge_ns: Option<String>,
    pub dir: tempfile::TempDir,
    children: Vec<Child>,
}

fn run(cmd: &[&str]) {
    let status = Command::new(cmd[0])
        .args(&cmd[1..])
        .status()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(status.success(), "{cmd:?} failed");
}

/// The twinblade binary built alongside this crate's binaries.
pub fn twinblade_bin() -> PathBuf {
    if let Ok(path) = std::env::var("TWINBLADE_BIN") {
        return PathBuf::from(path);
    }
    let here = PathBuf::from(env!("CARGO_BIN_EXE_aoe-init"));
    let path = here.with_file_name("twinblade");
    assert!(
        path.exists(),
        "{} missing: run `cargo build --workspace` first (or set TWINBLADE_BIN)",
        path.display()
    );
    path
}

/// Namespace and veth name prefixes of [`Lab::new`] and [`Lab::bridged`]: `tbt` and `tv`, or
/// `TWINBLADE_LAB_PREFIX` for both, so that a run beside another (a CI run on the same machine)
/// can keep to names of its own (a lab deletes leftover namespaces of its names first).
fn default_prefixes() -> (String, String) {
    match std::env::var("TWINBLADE_LAB_PREFIX") {
        Ok(prefix) if !prefix.is_empty() => (prefix.clone(), prefix),
        _ => ("tbt".into(), "tv".into()),
    }
}

pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "these tests build network namespaces and need root"
    );
}

impl Lab {
    pub fn new(mtu: u32, links: usize) -> Lab {
        require_root();
        let id = std::process::id() % 10000 * 100 + NEXT_LAB.fetch_add(1, Ordering::Relaxed);
        let (prefix, veth_prefix) = default_prefixes();
        let target_ns = format!("{prefix}{id}t");
        let client_ns = format!("{prefix}{id}c");
        let _ = Command::new("ip")
            .args(["netns", "del", &target_ns])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &client_ns])
            .status();
        run(&["ip", "netns", "add", &target_ns]);
        run(&["ip", "netns", "add", &client_ns]);
        for ns in [&target_ns, &client_ns] {
            run(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        for link in 0..links {
            let a = format!("{veth_prefix}{id}{link}a");
            let b = format!("{veth_prefix}{id}{link}b");
            let name = format!("eth{link}");
            run(&["ip", "link", "add", &a, "type", "veth", "peer", "name", &b]);
            run(&["ip", "link", "set", &a, "netns", &target_ns]);
            run(&["ip", "link", "set", &b, "netns", &client_ns]);
            run(&["ip", "-n", &target_ns, "link", "set", &a, "name", &name]);
            run(&["ip", "-n", &client_ns, "link", "set", &b, "name", &name]);
            for ns in [&target_ns, &client_ns] {
                run(&[
                    "ip",
                    "-n",
                    ns,
                    "link",
                    "set",
                    &name,
                    "mtu",
                    &mtu.to_string(),
                    "up",
                ]);
            }
        }
        Lab {
            target_ns,
            client_ns,
            extra_target_ns: Vec::new(),
            bridge_ns: None,
            dir: tempfile::tempdir_in("/var/tmp").expect("temp dir"),
            children: Vec::new(),
        }
    }

    /// The target and client namespaces and `extra_targets` more target namespaces, each with
    /// an `eth0` plugged into one bridge (in a namespace of its own): one Ethernet segment,
    /// as two storage nodes and a client share in production.
    pub fn bridged(mtu: u32, extra_targets: usize) -> Lab {
        let (prefix, veth_prefix) = default_prefixes();
        Lab::bridged_named(&prefix, &veth_prefix, mtu, extra_targets)
    }

    /// [`Lab::bridged`] with namespaces named `{prefix}…` and veth pairs `{veth_prefix}…`,
    /// for test binaries that must keep clear of other suites' names (a lab deletes leftover
    /// namespaces of its own names before it starts).
    pub fn bridged_named(prefix: &str, veth_prefix: &str, mtu: u32, extra_targets: usize) -> Lab {
        require_root();
        let id = std::process::id() % 10000 * 100 + NEXT_LAB.fetch_add(1, Ordering::Relaxed);
        let target_ns = format!("{prefix}{id}t");
        let client_ns = format!("{prefix}{id}c");
        let bridge_ns = format!("{prefix}{id}b");
        let extra_target_ns: Vec<String> = (0..extra_targets)
            .map(|n| format!("{prefix}{id}t{n}"))
            .collect();
        let mut all = vec![target_ns.clone(), client_ns.clone()];
        all.extend(extra_target_ns.iter().cloned());
        for ns in all.iter().chain([&bridge_ns]) {
            // Left over from a crashed run, if anything.
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
            run(&["ip", "netns", "add", ns]);
            run(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        let mtu = mtu.to_string();
        run(&[
            "ip", "-n", &bridge_ns, "link", "add", "br0", "type", "bridge",
        ]);
        run(&[
            "ip", "-n", &bridge_ns, "link", "set", "br0", "mtu", &mtu, "up",
        ]);
        for (port, ns) in all.iter().enumerate() {
            let inside = format!("{veth_prefix}{id}{port}a");
            let on_bridge = format!("{veth_prefix}{id}{port}b");
            run(&[
                "ip", "link", "add", &inside, "type", "veth", "peer", "name", &on_bridge,
            ]);
            run(&["ip", "link", "set", &inside, "netns", ns]);
            run(&["ip", "link", "set", &on_bridge, "netns", &bridge_ns]);
            run(&["ip", "-n", ns, "link", "set", &inside, "name", "eth0"]);
            run(&["ip", "-n", ns, "link", "set", "eth0", "mtu", &mtu, "up"]);
            run(&[
                "ip", "-n", &bridge_ns, "link", "set", &on_bridge, "master", "br0",
            ]);
            run(&[
                "ip", "-n", &bridge_ns, "link", "set", &on_bridge, "mtu", &mtu, "up",
            ]);
        }
        Lab {
            target_ns,
            client_ns,
            extra_target_ns,
            bridge_ns: Some(bridge_ns),
            dir: tempfile::tempdir_in("/var/tmp").expect("temp dir"),
            children: Vec::new(),
        }
    }

    /// A fully written (not sparse) backing file of `bytes` bytes filled with `byte`.
    pub fn backing_file(&self, name: &str, bytes: usize, byte: u8) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, vec![byte; bytes]).expect("write backing file");
        path
    }

    /// Starts `twinblade ARGS` in the target namespace and waits until it serves.
    pub fn start_target(&mut self, args: &[&str]) -> usize {
        self.start_target_with_env(args, &[])
    }

    /// [`Lab::start_target`] with extra environment variables.
    pub fn start_target_with_env(&mut self, args: &[&str], env: &[(&str, &str)]) -> usize {
        let log = File::create(
            self.dir
                .path()
                .join(format!("target-{}.log", self.children.len())),
        )
        .unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.target_ns])
            .arg(twinblade_bin())
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn twinblade");
        self.children.push(child);
        // Serving starts with an announce; give it a moment to open its sockets.
        std::thread::sleep(Duration::from_millis(300));
        self.children.len() - 1
    }

    /// Runs `twinblade ARGS` in the target namespace to completion.
    pub fn run_target_command(&self, args: &[&str]) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", &self.target_ns])
            .arg(twinblade_bin())
            .args(args)
            .output()
            .unwrap()
    }

    /// Stops target `index` with SIGTERM and waits for it; returns its exit status.
    pub fn stop_target(&mut self, index: usize) -> std::process::ExitStatus {
        let child = &mut self.children[index];
        // ip netns exec execs the binary, so the child pid is twinblade's.
        // SAFETY: sending a signal to a pid we spawned.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "target did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process id of target `index` (`ip netns exec` execs the binary, so it is
    /// twinblade's own).
    pub fn target_pid(&self, index: usize) -> u32 {
        self.children[index].id()
    }

    pub fn target_log(&self, index: usize) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("target-{index}.log")))
            .unwrap_or_default()
    }

    /// Runs `f` on a thread inside the client namespace.
    pub fn in_client<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> R {
        in_namespace(&self.client_ns, f)
    }

    /// The namespace holding the bridge, in a bridged lab.
    pub fn bridge_ns(&self) -> Option<&str> {
        self.bridge_ns.as_deref()
    }

    /// Runs `f` on a thread inside the target namespace.
    pub fn in_target<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> R {
        in_namespace(&self.target_ns, f)
    }
}

pub fn in_namespace<R: Send + 'static>(ns: &str, f: impl FnOnce() -> R + Send + 'static) -> R {
    let path = Path::new("/var/run/netns").join(ns);
    std::thread::spawn(move || {
        let file = File::open(&path).expect("open netns");
        // SAFETY: setns on this thread only, with a valid namespace fd.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

impl Drop for Lab {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let namespaces = [&self.target_ns, &self.client_ns]
            .into_iter()
            .chain(&self.extra_target_ns)
            .chain(&self.bridge_ns);
        for ns in namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}
