//! Files that hold secrets (passphrases, the TLS private key) or decide what the vault does (its
//! configuration, regulations, the CAs it trusts) are refused when other users of the machine
//! could read the secrets or rewrite the settings: the vault is only as private as these files.

use std::path::Path;

use anyhow::bail;

/// What a file holds, and so which of its mode bits matter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Holds {
    /// Readable or writable by anyone but its owner: refused (`chmod 600`).
    Secret,
    /// Writable by anyone but its owner: refused (`chmod go-w`); reading it is harmless.
    Settings,
}

/// Refuses `path` (`what` names it in the message) when its mode lets others at it.
#[cfg(unix)]
pub(crate) fn check(path: &Path, what: &str, holds: Holds) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    // A file that cannot be read is reported by the reader, with its own context.
    let Ok(meta) = std::fs::metadata(path) else { return Ok(()) };
    let mode = meta.permissions().mode() & 0o777;
    match holds {
        Holds::Secret if mode & 0o077 != 0 => bail!(
            "{what} {} is open to other users (mode {mode:04o}): run `chmod 600 {}`",
            path.display(),
            path.display()
        ),
        Holds::Settings if mode & 0o022 != 0 => bail!(
            "{what} {} can be changed by other users (mode {mode:04o}): run `chmod go-w {}`",
            path.display(),
            path.display()
        ),
        _ => Ok(()),
    }
}

#[cfg(not(unix))]
pub(crate) fn check(_path: &Path, _what: &str, _holds: Holds) -> anyhow::Result<()> {
    Ok(())
}

#[cfg(all(test, unix))]
#[allow(clippy::unwrap_used)] // in tests a panic is the failure report
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn with_mode(mode: u32) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, "x").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        (dir, path)
    }

    #[test]
    fn secrets_must_be_the_owners_alone_and_settings_only_theirs_to_change() {
        for (mode, secret_ok, settings_ok) in [
            (0o600, true, true),
            (0o400, true, true),
            (0o640, false, true),
            (0o644, false, true),
            (0o604, false, true),
            (0o620, false, false),
            (0o666, false, false),
            (0o602, false, false),
        ] {
            let (_dir, path) = with_mode(mode);
            let secret = check(&path, "passphrase file", Holds::Secret);
            assert_eq!(secret.is_ok(), secret_ok, "{mode:o}");
            assert_eq!(check(&path, "configuration file", Holds::Settings).is_ok(), settings_ok, "{mode:o}");
            if let Err(e) = secret {
                let text = e.to_string();
                assert!(text.contains(&format!("{mode:04o}")) && text.contains("chmod 600"), "{text}");
                assert!(text.contains(path.to_str().unwrap()), "names the file: {text}");
            }
        }
    }
}
