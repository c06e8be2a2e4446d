//! The witness as a third machine runs it: `twinblade witness` as a process, asked over UDP by
//! the library's client and by `twinblade witness-ask`, restarted (also by `kill -9`) between
//! claims; two pairs sharing it; wrong secrets and unknown pairs answered by silence.

use std::net::{SocketAddr, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use twinblade::ha::witness::{ask, AskError, Request, WitnessConfig, WitnessServer};
use twinblade::wire::witness::Verdict;

const LAB: &str = "lab-secret-1";
const PROD: &str = "prod-secret-2";

/// A free UDP port on loopback (bound and released: nothing else in this test binds ports).
fn free_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn write_config(dir: &Path, port: u16) -> std::path::PathBuf {
    let secret = dir.join("prod.secret");
    std::fs::write(&secret, format!("{PROD}\n")).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let config = dir.join("witness.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{port}\"\nstate = \"{}\"\n[pair.lab]\nshared-secret = \"{LAB}\"\n[pair.prod]\nshared-secret-file = \"{}\"\n",
            dir.join("witness.book").display(),
            secret.display()
        ),
    )
    .unwrap();
    config
}

struct Witness(Child);

impl Witness {
    fn start(config: &Path) -> Witness {
        let child = Command::new(env!("CARGO_BIN_EXE_twinblade"))
            .args(["witness", "-c"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start twinblade witness");
        Witness(child)
    }

    fn kill(mut self) {
        self.0.kill().unwrap();
        self.0.wait().unwrap();
    }
}

impl Drop for Witness {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn claim(
    witness: SocketAddr,
    secret: &str,
    pair: &str,
    node: &str,
    generation: u64,
) -> Result<(Verdict, String), AskError> {
    let request = Request {
        claim: true,
        pair,
        node,
        resource: "r0",
        generation,
    };
    // Generous tries: the process may still be starting.
    ask(
        witness,
        secret.as_bytes(),
        &request,
        Duration::from_millis(300),
        20,
    )
    .map(|answer| (answer.verdict, answer.holder))
}

#[test]
fn one_holder_per_generation_across_a_kill_and_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config(dir.path(), port);
    let witness: SocketAddr = ([127, 0, 0, 1], port).into();

    let process = Witness::start(&config);
    assert_eq!(
        claim(witness, LAB, "lab", "beta", 1).unwrap(),
        (Verdict::Granted, "beta".into())
    );
    assert_eq!(
        claim(witness, LAB, "lab", "alpha", 1).unwrap(),
        (Verdict::Held, "beta".into())
    );
    process.kill();

    // The grant was on disk before its verdict left: a witness killed and started again
    // still names beta.
    let process = Witness::start(&config);
    assert_eq!(
        claim(witness, LAB, "lab", "alpha", 1).unwrap(),
        (Verdict::Held, "beta".into())
    );
    // The winner's next generation is a new question.
    assert_eq!(
        claim(witness, LAB, "lab", "alpha", 2).unwrap(),
        (Verdict::Granted, "alpha".into())
    );
    // Another pair with its own secret shares the witness and its generation numbers.
    assert_eq!(
        claim(witness, PROD, "prod", "alpha", 1).unwrap(),
        (Verdict::Granted, "alpha".into())
    );

    // The admin's view through the binary: a query changes nothing, a wrong secret hears
    // nothing.
    let secret_file = dir.path().join("lab.secret");
    std::fs::write(&secret_file, LAB).unwrap();
    std::fs::set_permissions(&secret_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let witness_ask = |node: &str, generation: &str, extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_twinblade"))
            .args([
                "witness-ask",
                "--witness",
                &witness.to_string(),
                "--secret-file",
            ])
            .arg(&secret_file)
            .args([
                "--pair",
                "lab",
                "--node",
                node,
                "--resource",
                "r0",
                "--generation",
                generation,
                "--timeout",
                "0.3",
            ])
            .args(extra)
            .output()
            .unwrap();
        (
            out.status.code().unwrap(),
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
        )
    };
    assert_eq!(witness_ask("alpha", "1", &[]), (1, "held beta".to_string()));
    assert_eq!(witness_ask("alpha", "3", &[]), (0, "free".to_string()));
    assert_eq!(
        witness_ask("beta", "3", &["--claim"]),
        (0, "granted beta".to_string())
    );
    assert_eq!(
        witness_ask("alpha", "3", &["--claim"]),
        (1, "held beta".to_string())
    );
    process.kill();

    let book = std::fs::read_to_string(dir.path().join("witness.book")).unwrap();
    assert_eq!(
        book.lines().filter(|l| l.starts_with("grant ")).count(),
        4,
        "{book}"
    );
}

#[test]
fn a_wrong_secret_or_an_unknown_pair_gets_no_answer_and_no_grant() {
    let dir = tempfile::tempdir().unwrap();
    let config = WitnessConfig::parse(
        &format!(
            "listen = \"127.0.0.1:0\"\nstate = \"{}\"\n[pair.lab]\nshared-secret = \"{LAB}\"\n",
            dir.path().join("book").display()
        ),
        "test",
    )
    .unwrap();
    let server = WitnessServer::bind(config).unwrap();
    let witness = server.local_addr().unwrap();
    let token = tokio_util::sync::CancellationToken::new();
    let stop = token.clone();
    let thread = std::thread::spawn(move || server.run(stop));

    let quick = |secret: &str, pair: &str, node: &str| {
        let request = Request {
            claim: true,
            pair,
            node,
            resource: "r0",
            generation: 9,
        };
        ask(
            witness,
            secret.as_bytes(),
            &request,
            Duration::from_millis(200),
            2,
        )
    };
    assert!(matches!(
        quick("wrong", "lab", "alpha"),
        Err(AskError::Unreachable { .. })
    ));
    assert!(matches!(
        quick(LAB, "elsewhere", "alpha"),
        Err(AskError::Unreachable { .. })
    ));
    assert!(matches!(
        quick(LAB, "lab", "has space"),
        Err(AskError::Unreachable { .. })
    ));
    // None of them took generation 9: the first real claim does.
    assert_eq!(quick(LAB, "lab", "beta").unwrap().verdict, Verdict::Granted);
    assert_eq!(quick(LAB, "lab", "alpha").unwrap().holder, "beta");
    token.cancel();
    thread.join().unwrap();
}

#[test]
fn configuration_errors_name_the_key() {
    let err = |text: &str| {
        WitnessConfig::parse(text, "w.toml")
            .unwrap_err()
            .to_string()
    };
    let pair = "[pair.lab]\nshared-secret = \"x\"\n";
    assert!(err(&format!(
        "state = \"/var/lib/b\"\nlisten = \"nowhere\"\n{pair}"
    ))
    .contains("listen"));
    assert!(err(&format!("state = \"relative/b\"\n{pair}")).contains("state"));
    assert!(err("state = \"/var/lib/b\"\n").contains("pair"));
    assert!(err("state = \"/var/lib/b\"\n[pair.lab]\n").contains("pair.lab.shared-secret"));
    assert!(
        err("state = \"/var/lib/b\"\n[pair.lab]\nshared-secret = \"\"\n")
            .contains("pair.lab.shared-secret")
    );
    assert!(err(&format!("state = \"/var/lib/b\"\nbogus = 1\n{pair}")).contains("bogus"));
    let dir = tempfile::tempdir().unwrap();
    let open_secret = dir.path().join("s");
    std::fs::write(&open_secret, "x").unwrap();
    std::fs::set_permissions(&open_secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let text = format!(
        "state = \"/var/lib/b\"\n[pair.lab]\nshared-secret-file = \"{}\"\n",
        open_secret.display()
    );
    assert!(
        err(&text).contains("pair.lab.shared-secret-file"),
        "{}",
        err(&text)
    );
}

#[test]
fn a_book_that_does_not_read_keeps_the_witness_from_starting() {
    let dir = tempfile::tempdir().unwrap();
    let book = dir.path().join("book");
    std::fs::write(&book, "twinblade-witness-book 1\ngrant lab r0 zz alpha\n").unwrap();
    let config = WitnessConfig::parse(
        &format!(
            "listen = \"127.0.0.1:0\"\nstate = \"{}\"\n[pair.lab]\nshared-secret = \"x\"\n",
            book.display()
        ),
        "test",
    )
    .unwrap();
    let error = WitnessServer::bind(config)
        .err()
        .expect("refused")
        .to_string();
    assert!(error.contains("line 2"), "{error}");
}

#[test]
fn the_shipped_witness_example_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("appliance/examples/witness.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let config = WitnessConfig::parse_offline(&text, "witness.toml").unwrap();
    assert_eq!(config.listen.port(), twinblade::ha::witness::DEFAULT_PORT);
    assert_eq!(config.pairs.len(), 2);
}
