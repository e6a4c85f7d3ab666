//! The data folder's permissions: created 0700, refused when others can write it, and every file
//! in it tightened to 0600 (sled's files, the audit log's).

use std::path::Path;

use crate::StoreError;

/// Creates the data folder 0700 whatever the umask, and refuses one that others (group or world)
/// can write: they could replace the database or the log. One others can read holds only
/// ciphertext, but is warned about.
#[cfg(unix)]
pub fn secure_folder(dir: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |e: std::io::Error| StoreError::Io(format!("{}: {e}", dir.display()));
    if !dir.exists() {
        std::fs::create_dir_all(dir).map_err(io)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
    }
    let mode = std::fs::metadata(dir).map_err(io)?.permissions().mode() & 0o777;
    if mode & 0o022 != 0 {
        return Err(StoreError::Insecure(format!(
            "the data folder {} can be written by others (mode {mode:o}): refusing to serve from it; `chmod 700` it",
            dir.display()
        )));
    }
    if mode & 0o044 != 0 {
        tracing::warn!(folder = %dir.display(), mode = format!("{mode:o}"), "the data folder can be read by others; `chmod 700` it");
    }
    Ok(())
}

/// Every file under the data folder 0600 and every folder 0700, whatever the umask made them
/// (sled's files, the audit log's).
#[cfg(unix)]
pub fn tighten(dir: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |e: std::io::Error| StoreError::Io(format!("{}: {e}", dir.display()));
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).map_err(io)? {
            let entry = entry.map_err(io)?;
            let kind = entry.file_type().map_err(io)?;
            let mode = if kind.is_dir() {
                stack.push(entry.path());
                0o700
            } else if kind.is_file() {
                0o600
            } else {
                continue;
            };
            if entry.metadata().map_err(io)?.permissions().mode() & 0o777 != mode {
                std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(mode)).map_err(io)?;
            }
        }
    }
    Ok(())
}

#[cfg(not(unix))]
pub fn secure_folder(_dir: &Path) -> Result<(), StoreError> {
    Ok(())
}

#[cfg(not(unix))]
pub fn tighten(_dir: &Path) -> Result<(), StoreError> {
    Ok(())
}
