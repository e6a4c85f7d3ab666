//! Development mode's embedded defaults, like `vault server -dev`: a local folder, a fixed
//! development passphrase at the minimum Argon2id cost, and a token per development identity.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::path::Path;

use khlang_keys::SealParams;
use zeroize::Zeroize;

use crate::{Vault, VaultError, VaultOptions};

/// Publicly known, so a development vault protects nothing: never use one for real data.
pub const DEV_PASSPHRASE: &str = "khlang-development-passphrase-not-for-real-data";
pub const DEFAULT_DIR: &str = "./khlang-dev";
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7420";
pub const CREDENTIALS_FILE: &str = "dev-credentials.json";
/// `(identity name, role)` of every development identity: one per role of the sample regulations.
pub const DEV_IDENTITIES: &[(&str, &str)] = &[
    ("registration-app", "registration-app"),
    ("billing-clerk", "billing-clerk"),
    ("postal-contractor", "postal-contractor"),
    ("statistics-contractor", "statistics-contractor"),
    ("marketing-officer", "marketing-officer"),
    ("security-officer", "security-officer"),
    ("key-admin", "key-admin"),
    // A second administrator: privileged identities need another's approval (two-person rule).
    ("key-admin-2", "key-admin"),
    ("data-protection-officer", "data-protection-officer"),
];

/// Identity name → token. Wiped on drop; `Debug` shows names only.
#[derive(Default)]
pub struct DevCredentials(pub BTreeMap<String, String>);

impl Drop for DevCredentials {
    fn drop(&mut self) {
        for token in self.0.values_mut() {
            token.zeroize();
        }
    }
}

impl fmt::Debug for DevCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.0.keys()).finish()
    }
}

/// Opens (creating if needed) a development vault in `dir`, with valid credentials for every
/// development identity written to `dir/dev-credentials.json` (mode 0600).
pub async fn open_dev_vault(
    dir: &Path,
    options: &VaultOptions,
) -> Result<(Vault, DevCredentials), VaultError> {
    let vault =
        Vault::open_or_init_sealed(dir, DEV_PASSPHRASE.as_bytes(), SealParams::MINIMUM, options).await?;
    let path = dir.join(CREDENTIALS_FILE);
    match vault.unseal_with(1, DEV_PASSPHRASE.as_bytes(), None, "", "").await {
        Ok(_) => {}
        Err(VaultError::PermissionDenied(_)) => {
            // The custodian changed the development passphrase: the vault cannot unseal itself,
            // so it serves sealed with the credentials it had, and says how to go on.
            tracing::warn!(
                "the development passphrase was changed (khlang operator passwd): serving SEALED; \
                 unseal with `khlang operator unseal --custodian 1`; tokens are those of {}",
                path.display()
            );
            return Ok((vault, read_credentials(&path).unwrap_or_default()));
        }
        Err(e) => return Err(e),
    }
    // Which development identities were revoked, asked once (the store is async).
    let mut revoked_names = Vec::new();
    for (name, _) in DEV_IDENTITIES {
        if vault.identity_is_revoked(name).await.unwrap_or(false) {
            revoked_names.push(*name);
        }
    }
    let revoked = |name: &str| revoked_names.contains(&name);
    let written = |creds: &DevCredentials| {
        write_credentials(&path, creds)
            .map_err(|e| VaultError::FailedPrecondition(format!("cannot write {}: {e}", path.display())))
    };
    if let Some(mut existing) = read_credentials(&path) {
        let dropped: Vec<String> = existing.0.keys().filter(|name| revoked(name)).cloned().collect();
        existing.0.retain(|name, _| !dropped.contains(name));
        let mut all_valid = true;
        for (name, _) in DEV_IDENTITIES.iter().filter(|(name, _)| !revoked(name)) {
            all_valid &= match existing.0.get(*name) {
                Some(t) => vault.token_is_valid(t).await,
                None => false,
            };
        }
        if all_valid {
            if !dropped.is_empty() {
                tracing::warn!(
                    identities = %dropped.join(","),
                    "a development identity was revoked; starting without it, its token gone from the credentials file"
                );
                written(&existing)?;
            }
            return Ok((vault, existing));
        }
    }
    let mut creds = DevCredentials::default();
    for (name, role) in DEV_IDENTITIES {
        if revoked(name) {
            // A revocation stands, in development too: start without that identity, and say so.
            tracing::warn!(identity = name, "this development identity was revoked; starting without it");
            continue;
        }
        let token = match vault.bootstrap_identity(name, role).await {
            Err(VaultError::AlreadyExists(_)) => vault.issue_token(name).await?,
            other => other?,
        };
        creds.0.insert((*name).to_owned(), token.expose_secret().to_owned());
    }
    written(&creds)?;
    Ok((vault, creds))
}

fn read_credentials(path: &Path) -> Option<DevCredentials> {
    let mut text = std::fs::read_to_string(path).ok()?;
    let parsed = serde_json::from_str::<BTreeMap<String, String>>(&text).ok();
    text.zeroize();
    parsed.map(DevCredentials)
}

fn write_credentials(path: &Path, creds: &DevCredentials) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("json.tmp");
    let mut json = serde_json::to_string_pretty(&creds.0).map_err(std::io::Error::other)?;
    let result = (|| {
        let mut file =
            std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        file.write_all(json.as_bytes())?;
        file.write_all(b"\n")?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    json.zeroize();
    result
}
