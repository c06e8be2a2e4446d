//! The cluster's shared secret: given inline (`shared-secret = "…"`) or in a file of its own
//! (`shared-secret-file = "/etc/twinblade/secret"`), exactly one of the two.
//!
//! A secret file must be a regular file that neither its group nor anyone else may read, write
//! or execute (mode `0600` or stricter), as heartbeat demands of its `authkeys`: a secret that
//! others can read authenticates nobody. The secret is the file's bytes with trailing newlines
//! (`\n`, `\r`) removed, so `head -c 32 /dev/urandom | base64 > secret` and an editor's final
//! newline both work; it must not be empty.
//!
//! [`Secret`] never shows its bytes: its `Debug` prints `<hidden>`, and nothing formats it
//! otherwise, so neither logs, `status`, nor `check-config` can reveal it.

use std::fmt;
use std::path::Path;

use serde::Deserialize;

/// What the dump and `Debug` print in place of a secret.
pub const HIDDEN: &str = "<hidden>";

/// Group and other permission bits a secret file must not have.
const GROUP_OTHER_BITS: u32 = 0o077;

/// A shared secret. Its bytes are reachable only through [`Secret::as_bytes`].
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// A secret of these bytes.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Secret {
        Secret(bytes.into())
    }

    /// The secret's bytes, for the HMACs that use it.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Whether it has no bytes.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(HIDDEN)
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(|s| Secret(s.into_bytes()))
    }
}

/// Checks the permissions of the secret file `path` and reads the secret from it. The error
/// is the problem alone (the caller names the key).
pub fn read_secret_file(path: &Path) -> Result<Secret, String> {
    use std::os::unix::fs::PermissionsExt;
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| format!("{shown}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("{shown} is not a regular file"));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & GROUP_OTHER_BITS != 0 {
        return Err(format!(
            "{shown} has mode {mode:04o}: its group or others may use it; \
             the secret must be readable by its owner only (chmod 600 {shown})"
        ));
    }
    let mut bytes = std::fs::read(path).map_err(|e| format!("{shown}: {e}"))?;
    while matches!(bytes.last(), Some(b'\n' | b'\r')) {
        bytes.pop();
    }
    if bytes.is_empty() {
        return Err(format!("{shown} is empty"));
    }
    Ok(Secret(bytes))
}

impl super::Cluster {
    /// The shared secret: `shared-secret`, or what [`super::Config::load`] read from
    /// `shared-secret-file` (empty before that, which every user of it refuses).
    pub fn secret(&self) -> &[u8] {
        self.shared_secret
            .as_ref()
            .or(self.file_secret.as_ref())
            .map_or(&[], Secret::as_bytes)
    }

    /// Exactly one of `shared-secret` and `shared-secret-file`, neither empty.
    pub(super) fn validate_secret_keys(&self) -> Result<(), (String, String)> {
        match (&self.shared_secret, &self.shared_secret_file) {
            (Some(_), Some(_)) => Err((
                "cluster.shared-secret-file".into(),
                "give the secret either inline (shared-secret) or in a file \
                 (shared-secret-file), not both"
                    .into(),
            )),
            (None, None) => Err((
                "cluster.shared-secret".into(),
                "missing (or name a file holding it: shared-secret-file)".into(),
            )),
            (Some(s), None) if s.is_empty() => {
                Err(("cluster.shared-secret".into(), "must not be empty".into()))
            }
            (None, Some(p)) if p.as_os_str().is_empty() => Err((
                "cluster.shared-secret-file".into(),
                "must not be empty".into(),
            )),
            _ => Ok(()),
        }
    }
}

impl super::Config {
    /// Reads `shared-secret-file`, if the configuration names one, refusing a file its group
    /// or others may use. The error names the key.
    pub fn read_secret_file(&mut self) -> Result<(), super::ConfigError> {
        let Some(path) = &self.cluster.shared_secret_file else {
            return Ok(());
        };
        let secret = read_secret_file(path).map_err(|problem| super::ConfigError::Invalid {
            file: self.path.clone(),
            key: "cluster.shared-secret-file".into(),
            problem,
        })?;
        self.cluster.file_secret = Some(secret);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn file_with(mode: u32, text: &[u8]) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        std::fs::set_permissions(f.path(), std::fs::Permissions::from_mode(mode)).unwrap();
        f
    }

    #[test]
    fn debug_hides_the_bytes() {
        let s = Secret::new("hunter2-very-secret");
        assert_eq!(format!("{s:?}"), "<hidden>");
        assert_eq!(format!("{:?}", Some(s.clone())), "Some(<hidden>)");
        assert_eq!(s.as_bytes(), b"hunter2-very-secret");
    }

    #[test]
    fn a_private_file_is_read_without_its_trailing_newline() {
        let f = file_with(0o600, b"from-a-file\r\n\n");
        assert_eq!(
            read_secret_file(f.path()).unwrap().as_bytes(),
            b"from-a-file"
        );
        let f = file_with(0o400, b"read-only-is-fine");
        assert!(read_secret_file(f.path()).is_ok());
    }

    #[test]
    fn a_file_others_may_use_is_refused() {
        for mode in [0o640, 0o604, 0o602, 0o620, 0o610, 0o644, 0o666] {
            let f = file_with(mode, b"s3cret");
            let e = read_secret_file(f.path()).unwrap_err();
            assert!(
                e.contains(&format!("has mode {mode:04o}")) && e.contains("chmod 600"),
                "{mode:o}: {e}"
            );
            assert!(!e.contains("s3cret"), "{e}");
        }
    }

    #[test]
    fn an_empty_or_missing_file_or_a_directory_is_refused() {
        let f = file_with(0o600, b"\n");
        assert!(read_secret_file(f.path()).unwrap_err().contains("is empty"));
        assert!(read_secret_file(Path::new("/nonexistent/secret"))
            .unwrap_err()
            .starts_with("/nonexistent/secret: "));
        let dir = tempfile::tempdir().unwrap();
        assert!(read_secret_file(dir.path())
            .unwrap_err()
            .contains("is not a regular file"));
    }
}
