//! The commands that open a stopped vault: `verify`, and `config check`.

use super::*;

/// A stopped vault (its folder's lock free), unsealed with the passphrases given, for the
/// operator's offline commands.
pub(crate) async fn open_stopped(
    data_dir: &Path,
    options: &VaultOptions,
    passphrase: &PassphraseArgs,
) -> anyhow::Result<Vault> {
    let vault = Vault::open_sealed(data_dir, options)
        .await
        .with_context(|| format!("cannot open the vault in {} (is it still running?)", data_dir.display()))?;
    for (custodian, pass) in &serve_passphrases(passphrase)? {
        vault
            .unseal_with(*custodian, pass.as_bytes(), None, "", "")
            .await
            .with_context(|| format!("cannot unseal with custodian {custodian}'s passphrase"))?;
    }
    if vault.is_sealed() {
        bail!("the vault is still sealed: give enough custodians' passphrases (--passphrase-file N=FILE)");
    }
    Ok(vault)
}

/// `khlangd verify`: the exit status (0 intact, 3 unverified, 2 damage).
pub(crate) async fn verify(
    data_dir: PathBuf,
    storage: StorageArgs,
    passphrase: PassphraseArgs,
    regulations: Option<PathBuf>,
) -> anyhow::Result<u8> {
    use khlang_keys::audit_chain::Verdict;
    let options = VaultOptions {
        storage: storage.location()?,
        regulations: Arc::new(load_regulations(regulations.as_deref())?),
        regulations_path: regulations,
        ..VaultOptions::default()
    };
    let vault = open_stopped(&data_dir, &options, &passphrase).await?;
    let check = vault.check_vault().await?;
    let authority = vault.authority_check();
    vault.shut_down().await?;
    outln!("records: {} opened ({} fields), {} damaged", check.records, check.fields, check.damaged);
    for named in &check.named {
        outln!("  {named}");
    }
    let log = &check.against_log;
    outln!(
        "records against the log: {} accounted for, {} vanished without their delete entry, {} appeared without their put{}",
        log.matched,
        log.vanished,
        log.appeared,
        if log.before_log > 0 {
            format!(", {} older than the log's first kept entry", log.before_log)
        } else {
            String::new()
        }
    );
    for finding in &log.named {
        outln!("  {finding}");
    }
    let entries = check.audit.entries;
    let audit_code = match check.audit.verdict() {
        Verdict::Intact => {
            outln!("audit log: intact ({entries} entries)");
            0
        }
        Verdict::Unverified(why) => {
            outln!("audit log: unverified ({entries} entries): {why}");
            3
        }
        Verdict::Broken(b) => {
            outln!("audit log: BROKEN at entry {}: {}", b.seq, b.reason);
            2
        }
    };
    // Values that decide who may do what: tagged by this vault and the newest its log names.
    let unauthentic = authority.forged + authority.untagged - authority.migrated;
    outln!(
        "authority: {} genuine, {} not written by this vault{}",
        authority.tagged + authority.migrated,
        unauthentic,
        if authority.migrated > 0 {
            format!(" ({} from an earlier build authenticated now)", authority.migrated)
        } else {
            String::new()
        }
    );
    Ok(if check.damaged > 0 || unauthentic > 0 || !log.holds() { 2 } else { audit_code })
}

/// `khlangd approve-identity`: the custodians' quorum approves a request nobody else can.
pub(crate) async fn approve_identity(
    data_dir: &Path,
    storage: StorageArgs,
    passphrase: &PassphraseArgs,
    request: &str,
) -> anyhow::Result<()> {
    let options = VaultOptions { storage: storage.location()?, ..VaultOptions::default() };
    let vault = open_stopped(data_dir, &options, passphrase).await?;
    let approved = vault.approve_identity_by_custodians(request).await;
    vault.shut_down().await?;
    let (name, token) = approved.with_context(|| format!("request {request} not approved"))?;
    outln!("Approved by the custodians (break-glass, audited). Token for identity '{name}' (shown once):");
    outln!("{}", token.expose_secret());
    Ok(())
}

/// `khlangd config check FILE`.
pub(crate) fn config_check(path: &Path) -> anyhow::Result<()> {
    let file = config::ConfigFile::read(path)?;
    let cmd = file.apply(Cli::command())?;
    let matches = cmd.clone().try_get_matches_from(["khlangd", "serve"]).map_err(|e| {
        let text = e.to_string();
        let before_usage = text.split("Usage:").next().unwrap_or_default();
        let first = before_usage.split_whitespace().collect::<Vec<_>>().join(" ");
        let first = first.trim_start_matches("error: ").to_owned();
        anyhow::anyhow!(
            "{} (with this environment) is not a complete `khlangd serve`: {first}",
            path.display()
        )
    })?;
    let redact = |long: &str, v: &str| {
        if long == "storage" && v != "sled" { khlang_server::storage::redacted(v) } else { config::scrub(v) }
    };
    let plain = Cli::command();
    let Some(serve) = plain.find_subcommand("serve") else { bail!("no serve command") };
    let Some(("serve", serve_matches)) = matches.subcommand() else { bail!("no serve command") };
    let cli = Cli::from_arg_matches(&matches)?;
    let Command::Serve { data_dir, storage, passphrase, server } = cli.command else {
        bail!("no serve command")
    };
    let storage = storage.location().with_context(|| format!("in {}", path.display()))?;
    let options = server.options(CipherMode::Encrypted).with_context(|| format!("in {}", path.display()))?;
    let tls = server.tls().with_context(|| format!("in {}", path.display()))?;
    server.audit.files()?;
    for spec in &passphrase.passphrase_file {
        let file =
            spec.split_once('=').filter(|(n, _)| n.parse::<u8>().is_ok()).map_or(spec.as_str(), |(_, f)| f);
        read_file_passphrase(Path::new(file))?;
    }
    outln!("# khlangd serve, as configured by {} (flag > environment > file > default)", path.display());
    for line in config::effective(&plain, &matches, &file, &redact) {
        outln!("{line}");
    }
    for line in config::effective(serve, serve_matches, &file, &redact) {
        outln!("{line}");
    }
    let regs = &options.regulations;
    outln!(
        "# OK: regulations '{}' of {} ({} roles); TLS {}; storage {}",
        regs.version,
        regs.organisation,
        regs.roles.len(),
        if tls.is_some() { "on" } else { "off (loopback)" },
        match storage {
            StorageLocation::Sled => format!("sled in {}", data_dir.display()),
            StorageLocation::Postgres { .. } => "PostgreSQL".to_owned(),
        }
    );
    if !data_dir.is_dir() {
        outln!("# note: {} does not exist yet: `khlangd init` makes it", data_dir.display());
    }
    Ok(())
}
