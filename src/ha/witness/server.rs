//! `twinblade witness`: the witness's UDP service. One socket answers claims and queries for
//! every pair in its configuration, each pair authenticated with its own shared secret. A
//! grant reaches the book's file (written to a new file, flushed, renamed over the old one,
//! directory flushed) before its verdict leaves, so a witness that restarts never forgets a
//! grant it announced. Anything it cannot authenticate gets no answer at all (and a
//! rate-limited log line): an unknown pair, a wrong secret, a malformed datagram.
//!
//! Configuration (`/etc/twinblade/witness.toml`):
//!
//! ```toml
//! listen = "0.0.0.0:7791"                      # optional, this is the default
//! state = "/var/lib/twinblade/witness.book"    # the book of grants (its directory must exist)
//! [pair.lab]                                   # the pair's `[cluster] name`
//! shared-secret-file = "/etc/twinblade/lab.secret"   # or shared-secret = "…"
//! ```

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use super::book::{is_book_name, Book, BookError};
use crate::config::secret::{read_secret_file, Secret};
use crate::ratelimit::LogLimiter;
use crate::wire::witness::{Kind, Packet, WitnessRepr, MAX_LEN};

/// How long the service waits for a datagram before it looks at its cancellation token.
const POLL: Duration = Duration::from_millis(200);

/// What can keep the witness from starting or answering.
#[derive(Debug, thiserror::Error)]
pub enum WitnessError {
    /// The configuration file cannot be read.
    #[error("{path}: {source}")]
    ReadConfig {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A key of the configuration is wrong; the message names it.
    #[error("{file}: {key}: {problem}")]
    Config {
        /// The file (or a label for text).
        file: String,
        /// The key, as written in the file.
        key: String,
        /// What is wrong.
        problem: String,
    },
    /// The book's file exists but does not read: the witness will not answer from an empty one.
    #[error("{path}: {source} (move it away only if no pair relies on its grants)")]
    Book {
        /// The file.
        path: PathBuf,
        /// Which line, and why.
        source: BookError,
    },
    /// The book's file cannot be read or written.
    #[error("{path}: {source}")]
    BookIo {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The socket cannot be bound.
    #[error("cannot listen on {address}: {source}")]
    Bind {
        /// The address.
        address: SocketAddr,
        /// Why.
        source: io::Error,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct File {
    listen: Option<String>,
    state: PathBuf,
    #[serde(default)]
    pair: BTreeMap<String, PairFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct PairFile {
    shared_secret: Option<Secret>,
    shared_secret_file: Option<PathBuf>,
}

/// The witness's settings: where it listens, where its book lives, and each pair's secret.
#[derive(Debug, Clone)]
pub struct WitnessConfig {
    /// The UDP address it answers on.
    pub listen: SocketAddr,
    /// The book's file.
    pub state: PathBuf,
    /// Each pair's shared secret, by pair name.
    pub pairs: BTreeMap<String, Secret>,
}

impl WitnessConfig {
    /// Reads and checks the configuration file at `path` (secret files included).
    pub fn load(path: &Path) -> Result<WitnessConfig, WitnessError> {
        let text = std::fs::read_to_string(path).map_err(|source| WitnessError::ReadConfig {
            path: path.to_path_buf(),
            source,
        })?;
        WitnessConfig::parse(&text, &path.display().to_string())
    }

    /// Checks a configuration's text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<WitnessConfig, WitnessError> {
        WitnessConfig::parse_with(text, file, true)
    }

    /// Checks a configuration's text without reading its secret files (a pair whose secret is
    /// in a file gets an empty one): for validating an example on another machine.
    pub fn parse_offline(text: &str, file: &str) -> Result<WitnessConfig, WitnessError> {
        WitnessConfig::parse_with(text, file, false)
    }

    fn parse_with(text: &str, file: &str, read_files: bool) -> Result<WitnessConfig, WitnessError> {
        let error = |key: &str, problem: String| WitnessError::Config {
            file: file.to_string(),
            key: key.to_string(),
            problem,
        };
        let parsed: File = toml::from_str(text).map_err(|e| {
            error(
                "(file)",
                e.to_string().lines().collect::<Vec<_>>().join(" "),
            )
        })?;
        let listen = match parsed.listen.as_deref() {
            None => SocketAddr::from(([0, 0, 0, 0], super::DEFAULT_PORT)),
            Some(text) => text.parse().map_err(|_| {
                error(
                    "listen",
                    format!("{text:?} is not ADDRESS:PORT (e.g. \"0.0.0.0:7791\")"),
                )
            })?,
        };
        if !parsed.state.is_absolute() {
            return Err(error(
                "state",
                format!("{} is not an absolute path", parsed.state.display()),
            ));
        }
        if parsed.pair.is_empty() {
            return Err(error(
                "pair",
                "no [pair.NAME] section: the witness would answer nobody".into(),
            ));
        }
        let mut pairs = BTreeMap::new();
        for (name, pair) in parsed.pair {
            let key = |k: &str| format!("pair.{name}.{k}");
            if !is_book_name(&name) {
                return Err(error(
                    &format!("pair.{name}"),
                    "a pair name is 1 to 64 bytes without spaces".into(),
                ));
            }
            let secret = match (pair.shared_secret, pair.shared_secret_file) {
                (Some(_), Some(_)) => {
                    return Err(error(
                        &key("shared-secret-file"),
                        "give shared-secret or shared-secret-file, not both".into(),
                    ))
                }
                (None, None) => {
                    return Err(error(
                        &key("shared-secret"),
                        "missing (or shared-secret-file)".into(),
                    ))
                }
                (Some(secret), None) => secret,
                (None, Some(path)) if !read_files => {
                    if !path.is_absolute() {
                        return Err(error(
                            &key("shared-secret-file"),
                            format!("{} is not an absolute path", path.display()),
                        ));
                    }
                    pairs.insert(name, Secret::new(Vec::new()));
                    continue;
                }
                (None, Some(path)) => {
                    read_secret_file(&path).map_err(|p| error(&key("shared-secret-file"), p))?
                }
            };
            if secret.is_empty() {
                return Err(error(&key("shared-secret"), "empty".into()));
            }
            pairs.insert(name, secret);
        }
        Ok(WitnessConfig {
            listen,
            state: parsed.state,
            pairs,
        })
    }
}

/// The running witness (before [`run`](WitnessServer::run), bound and with its book read).
pub struct WitnessServer {
    config: WitnessConfig,
    socket: UdpSocket,
    book: Book,
    refused: AtomicU64,
}

impl WitnessServer {
    /// Reads the book (a missing file is an empty book) and binds the socket.
    pub fn bind(config: WitnessConfig) -> Result<WitnessServer, WitnessError> {
        let book = match std::fs::read_to_string(&config.state) {
            Ok(text) => Book::from_text(&text).map_err(|source| WitnessError::Book {
                path: config.state.clone(),
                source,
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Book::default(),
            Err(source) => {
                return Err(WitnessError::BookIo {
                    path: config.state.clone(),
                    source,
                })
            }
        };
        let socket = UdpSocket::bind(config.listen).map_err(|source| WitnessError::Bind {
            address: config.listen,
            source,
        })?;
        socket
            .set_read_timeout(Some(POLL))
            .map_err(|source| WitnessError::Bind {
                address: config.listen,
                source,
            })?;
        Ok(WitnessServer {
            config,
            socket,
            book,
            refused: AtomicU64::new(0),
        })
    }

    /// The address it answers on (the bound port when the configuration said port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// The book as it stands.
    pub fn book(&self) -> &Book {
        &self.book
    }

    /// Datagrams refused so far (unknown pair, bad tag, malformed).
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Answers datagrams until `token` is cancelled.
    pub fn run(mut self, token: CancellationToken) {
        tracing::info!(
            listen = %self.config.listen,
            pairs = self.config.pairs.len(),
            grants = self.book.len(),
            "witness: answering"
        );
        let mut buf = vec![0u8; MAX_LEN + 1];
        while !token.is_cancelled() {
            let (len, from) = match self.socket.recv_from(&mut buf) {
                Ok(got) => got,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    continue
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    static RECV_LOG: LogLimiter = LogLimiter::network();
                    crate::warn_limited!(RECV_LOG, "witness: receive failed: {e}");
                    std::thread::sleep(POLL);
                    continue;
                }
            };
            if let Some(reply) = self.answer(&buf[..len], from) {
                if let Err(e) = self.socket.send_to(&reply, from) {
                    static SEND_LOG: LogLimiter = LogLimiter::network();
                    crate::warn_limited!(SEND_LOG, %from, "witness: cannot answer: {e}");
                }
            }
        }
        tracing::info!("witness: stopped");
    }

    /// The reply to one datagram, if it deserves one. A grant is on disk before this returns
    /// it; if it cannot be written, the grant is taken back and nothing is answered.
    pub fn answer(&mut self, bytes: &[u8], from: SocketAddr) -> Option<Vec<u8>> {
        let request = match self.authenticate(bytes) {
            Ok(request) => request,
            Err(reason) => {
                static REFUSED_LOG: LogLimiter = LogLimiter::network();
                self.refused.fetch_add(1, Ordering::Relaxed);
                crate::warn_limited!(REFUSED_LOG, %from, "witness: refusing a datagram: {reason}");
                return None;
            }
        };
        let (pair, resource, node) = (&request.pair, &request.resource, &request.node);
        let outcome = match request.kind {
            Kind::Claim => {
                let before = self.book.clone();
                let outcome = self.book.claim(pair, resource, node, request.generation);
                if outcome.changed {
                    if let Err(e) = write_book(&self.config.state, &self.book) {
                        tracing::error!(path = %self.config.state.display(), "witness: cannot write the book, not granting: {e}");
                        self.book = before;
                        return None;
                    }
                    tracing::info!(%pair, %resource, %node, generation = format_args!("{:016X}", request.generation), "witness: granted");
                } else {
                    tracing::info!(%pair, %resource, %node, holder = %outcome.holder, generation = format_args!("{:016X}", request.generation), "witness: claim answered from the book");
                }
                outcome
            }
            Kind::Query => self.book.query(pair, resource, request.generation),
            Kind::Verdict(_) => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                return None;
            }
        };
        let secret = &self.config.pairs[pair.as_str()];
        let holder = if outcome.holder.is_empty() {
            node.clone()
        } else {
            outcome.holder
        };
        let verdict = WitnessRepr {
            kind: Kind::Verdict(outcome.verdict),
            node: holder,
            ..request
        };
        Some(verdict.to_signed_vec(secret.as_bytes()))
    }

    fn authenticate(&self, bytes: &[u8]) -> Result<WitnessRepr, String> {
        let packet = Packet::new_checked(bytes).map_err(|e| e.to_string())?;
        let pair = String::from_utf8_lossy(packet.pair());
        let secret = self
            .config
            .pairs
            .get(pair.as_ref())
            .ok_or_else(|| format!("unknown pair {pair:?}"))?;
        let request = WitnessRepr::parse_authenticated(bytes, secret.as_bytes())
            .map_err(|e| format!("pair {pair:?}: {e}"))?;
        if !is_book_name(&request.node) || !is_book_name(&request.resource) {
            return Err(format!(
                "pair {pair:?}: node or resource name with spaces or control characters"
            ));
        }
        Ok(request)
    }
}

/// Writes the book so that a crash leaves either the old file or the new one, never a torn one.
fn write_book(path: &Path, book: &Book) -> io::Result<()> {
    let directory = path.parent().unwrap_or(Path::new("/"));
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".new");
    let temporary = PathBuf::from(temporary);
    {
        let mut file = std::fs::File::create(&temporary)?;
        file.write_all(book.to_text().as_bytes())?;
        file.sync_all()?;
    }
    std::fs::rename(&temporary, path)?;
    std::fs::File::open(directory)?.sync_all()
}
