//! `khlang`: the command-line client. Errors print the status code and message and exit non-zero.
#![forbid(unsafe_code)]

/// `println!` that ends the program quietly, as a killed-by-SIGPIPE program would (status 141),
/// when standard output is closed (`khlang audit query | head -1`), instead of panicking.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout().lock(), $($arg)*) {
            $crate::stdout_failed(e);
        }
    }};
}

mod bench;
mod cli;
mod import;
mod show;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use khlang_client::{
    AuditQuery, AuditRecord, ChainReport, Client, ConsentEntry, IdentityCreation, KeysStatus, Record,
    ReencryptTarget, RekeyStatus, SealStatus, TlsOptions, Verdict,
};
use zeroize::Zeroizing;

use show::*;

use cli::{
    AuditCommand, Cli, Command, ConsentCommand, IdentityCommand, KeysCommand, OperatorCommand,
    RegulationsCommand, SubjectCommand,
};

/// Standard output could not be written: a closed pipe ends the program quietly, anything else
/// with a message.
fn stdout_failed(e: std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(141);
    }
    eprintln!("error: cannot write to standard output: {e}");
    std::process::exit(1);
}

async fn connect(cli: &Cli) -> anyhow::Result<Client> {
    connect_as(cli, cli.token.as_deref()).await
}

async fn connect_as_anyone(cli: &Cli) -> anyhow::Result<Client> {
    connect_as(cli, None).await
}

async fn connect_as(cli: &Cli, token: Option<&str>) -> anyhow::Result<Client> {
    let read =
        |p: &std::path::PathBuf| std::fs::read(p).with_context(|| format!("cannot read {}", p.display()));
    if cli.addr.starts_with("https://") && cli.ca_cert.is_none() {
        anyhow::bail!(
            "{} uses TLS: pass --ca-cert FILE (or KHLANG_CACERT), the CA that signed its certificate \
             (`khlangd tls dev-certs` writes ca.pem)",
            cli.addr
        );
    }
    if cli.client_cert.is_some() && cli.ca_cert.is_none() {
        anyhow::bail!("a client certificate needs TLS: use an https:// address and --ca-cert FILE");
    }
    let tls = match &cli.ca_cert {
        Some(ca) => Some(TlsOptions {
            ca_pem: read(ca)?,
            client_cert_pem: cli.client_cert.as_ref().map(read).transpose()?,
            client_key_pem: cli.client_key.as_ref().map(read).transpose()?.map(Zeroizing::new),
            domain: None,
        }),
        None => None,
    };
    if token.is_none() && cli.client_cert.is_none() && !needs_no_token(&cli.command) {
        anyhow::bail!("no credentials: set KHLANG_TOKEN (or --token), or give --client-cert/--client-key");
    }
    Ok(Client::connect_with(&cli.addr, token, tls.as_ref()).await?)
}

/// Custodians' calls carry no token: a sealed vault cannot check one.
fn needs_no_token(command: &Command) -> bool {
    matches!(
        command,
        Command::Operator(
            OperatorCommand::Status
                | OperatorCommand::Unseal { .. }
                | OperatorCommand::Passwd { .. }
                | OperatorCommand::RekeyApprove { .. }
        )
    )
}

/// Passphrases from a file (one per line) or prompts.
fn passphrases(file: Option<&std::path::Path>, prompts: &[String]) -> anyhow::Result<Vec<Zeroizing<String>>> {
    if let Some(path) = file {
        let text = Zeroizing::new(
            std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?,
        );
        let lines: Vec<Zeroizing<String>> =
            text.lines().take(prompts.len()).map(|l| Zeroizing::new(l.to_owned())).collect();
        if lines.len() < prompts.len() || lines.iter().any(|l| l.is_empty()) {
            anyhow::bail!("{} needs {} non-empty lines", path.display(), prompts.len());
        }
        return Ok(lines);
    }
    prompts.iter().map(|p| Ok(Zeroizing::new(rpassword::prompt_password(format!("{p}: "))?))).collect()
}

/// The exit status of `audit verify` when the log is broken or unverified.
#[derive(Debug)]
struct VerifyOutcome(u8);

impl std::fmt::Display for VerifyOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "verification outcome {}", self.0)
    }
}

impl std::error::Error for VerifyOutcome {}

/// Exit status of `audit verify`: 0 intact, 2 broken, 3 unverified.
const EXIT_BROKEN: u8 = 2;
const EXIT_UNVERIFIED: u8 = 3;

fn print_report(r: &ChainReport, verdict: &Verdict) -> anyhow::Result<()> {
    outln!(
        "entries {}  checkpoints {}  last verified checkpoint {}  newest entry {}",
        r.entries,
        r.checkpoints,
        r.last_checkpoint,
        r.last_entry
    );
    if !r.resumed_at.is_empty() {
        let at: Vec<String> = r.resumed_at.iter().map(u64::to_string).collect();
        outln!("verified on past breaks the vault carried forward at {}", at.join(", "));
    }
    match verdict {
        Verdict::Intact => {
            outln!("intact");
            Ok(())
        }
        Verdict::Broken(b) => {
            outln!("BROKEN: first untrustworthy entry {}: {}", b.seq, b.reason);
            Err(VerifyOutcome(EXIT_BROKEN).into())
        }
        Verdict::Unverified(why) => {
            outln!("UNVERIFIED: {why}");
            Err(VerifyOutcome(EXIT_UNVERIFIED).into())
        }
    }
}

fn load_witness(path: &std::path::Path) -> anyhow::Result<Vec<khlang_client::Checkpoint>> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    Ok(khlang_client::read_witness(std::io::BufReader::new(file))?)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let _ = UTC.set(cli.utc);
    if let Command::Completions { shell } = &cli.command {
        let mut command = <Cli as clap::CommandFactory>::command();
        let mut script = Vec::new();
        clap_complete::generate(*shell, &mut command, "khlang", &mut script);
        let mut out = std::io::stdout().lock();
        if let Err(e) =
            std::io::Write::write_all(&mut out, &script).and_then(|()| std::io::Write::flush(&mut out))
        {
            stdout_failed(e);
        }
        return Ok(());
    }
    // Offline verification needs no vault and no credentials.
    if let Command::Audit(AuditCommand::Verify { offline: Some(path), public_key: Some(key), witness }) =
        &cli.command
    {
        let witness = witness.as_deref().map(load_witness).transpose()?.unwrap_or_default();
        let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let report = khlang_client::verify_export(std::io::BufReader::new(file), key, &witness)?;
        return print_report(&report, &report.verdict());
    }
    let mut client = if needs_no_token(&cli.command) && cli.token.is_none() {
        connect_as_anyone(&cli).await?
    } else {
        connect(&cli).await?
    };
    let prefill = match &cli.command {
        Command::Bench { prefill_token: Some(t), .. } => Some(connect_as(&cli, Some(t)).await?),
        _ => None,
    };
    let mut extra_connections = Vec::new();
    if let Command::Bench { connections, .. } = &cli.command {
        for _ in 1..(*connections).max(1) {
            extra_connections.push(connect(&cli).await?);
        }
    }
    match cli.command {
        // Answered above, before connecting.
        Command::Completions { .. } => {}
        Command::Put { subject, fields } => {
            outln!("{}", client.put(&subject, fields).await?);
        }
        Command::Get { record_id, fields, purpose, json } => {
            let record = client.get(&record_id, &fields, purpose.as_deref()).await?;
            if json {
                outln!("{}", record_json(&record));
            } else {
                let width = record.fields.keys().map(String::len).max().unwrap_or(0);
                for (name, value) in &record.fields {
                    let shown = Zeroizing::new(terminal_safe(value.expose_secret()));
                    outln!("{:<width$}  {}", terminal_safe(name), shown.as_str());
                }
            }
        }
        Command::Update { record_id, fields, remove } => {
            let names = client.update(&record_id, fields, &remove).await?;
            outln!("{}", names.join(","));
        }
        Command::Delete { record_id } => {
            client.delete(&record_id).await?;
            outln!("deleted {record_id}");
        }
        Command::List { subject, json } => {
            let records = client.list(&subject).await?;
            if json {
                let rows: Vec<_> = records
                    .iter()
                    .map(|r| serde_json::json!({"record_id": r.record_id, "fields": r.field_names}))
                    .collect();
                outln!("{}", serde_json::Value::Array(rows));
            } else {
                for r in &records {
                    outln!("{}  {}", r.record_id, r.field_names.join(","));
                }
            }
        }
        Command::Identity(cmd) => match cmd {
            IdentityCommand::Create { name, role } => match client.create_identity(&name, &role).await? {
                IdentityCreation::Created(token) => {
                    eprintln!("Token for identity '{name}' (role {role}), shown once:");
                    outln!("{}", token.expose_secret());
                }
                IdentityCreation::Pending(r) => {
                    eprintln!(
                        "Role '{role}' needs a second identity's approval: `khlang identity approve {}` \
                             (expires {})",
                        r.id,
                        when(r.expires_ms)
                    );
                    outln!("{}", r.id);
                }
            },
            IdentityCommand::Requests { json } => {
                let list = client.identity_requests().await?;
                if json {
                    let rows: Vec<_> = list
                        .iter()
                        .map(|r| {
                            serde_json::json!({"id": r.id, "name": r.name, "role": r.role,
                                "requested_by": r.requested_by, "requested_ms": r.requested_ms,
                                "expires_ms": r.expires_ms})
                        })
                        .collect();
                    outln!("{}", serde_json::Value::Array(rows));
                } else {
                    for r in &list {
                        outln!(
                            "{}  {:<28} {:<24} requested by {}",
                            r.id,
                            terminal_safe(&r.name),
                            terminal_safe(&r.role),
                            terminal_safe(&r.requested_by)
                        );
                    }
                }
            }
            IdentityCommand::Approve { request_id } => {
                let token = client.approve_identity(&request_id).await?;
                eprintln!("Request {request_id} approved; the new identity's token, shown once:");
                outln!("{}", token.expose_secret());
            }
            IdentityCommand::Refuse { request_id, reason } => {
                client.refuse_identity(&request_id, &reason).await?;
                outln!("refused {request_id}");
            }
            IdentityCommand::List { json } => {
                let ids = client.list_identities().await?;
                if json {
                    let rows: Vec<_> = ids
                        .iter()
                        .map(|i| {
                            serde_json::json!({"name": i.name, "role": i.role, "created_ms": i.created_ms,
                                "created_by": i.created_by, "revoked_ms": i.revoked_ms})
                        })
                        .collect();
                    outln!("{}", serde_json::Value::Array(rows));
                } else {
                    for i in &ids {
                        let state = if i.revoked_ms.is_some() { "revoked" } else { "active" };
                        outln!("{:<28} {:<24} {state:<8} created by {}", i.name, i.role, i.created_by);
                    }
                }
            }
            IdentityCommand::Revoke { name } => {
                client.revoke_identity(&name).await?;
                outln!("revoked {name}");
            }
        },
        Command::Regulations(cmd) => {
            let (info, json) = match cmd {
                RegulationsCommand::Reload => (client.reload_regulations().await?, false),
                RegulationsCommand::Show { json } => (client.regulations().await?, json),
            };
            if json {
                outln!(
                    "{}",
                    serde_json::json!({"version": info.version, "organisation": info.organisation,
                        "roles": info.roles, "purposes": info.purposes, "fields": info.fields, "warnings": info.warnings})
                );
            } else {
                outln!("version       {}", info.version);
                outln!("organisation  {}", info.organisation);
                outln!("roles         {}", info.roles.join(", "));
                outln!("purposes      {}", info.purposes.join(", "));
                outln!("fields        {}", info.fields.join(", "));
                for w in &info.warnings {
                    outln!("warning       {w}");
                }
            }
        }
        Command::Consent(cmd) => match cmd {
            ConsentCommand::Grant { subject, purpose } => {
                let c = client.set_consent(&subject, &purpose, true).await?;
                outln!("{}: granted by {}", c.purpose, c.recorded_by);
            }
            ConsentCommand::Withdraw { subject, purpose } => {
                let c = client.set_consent(&subject, &purpose, false).await?;
                outln!("{}: withdrawn by {}", c.purpose, c.recorded_by);
            }
            ConsentCommand::Show { subject, json } => {
                let (current, history) = client.consent(&subject).await?;
                if json {
                    let cur: Vec<_> = current.iter().map(consent_json).collect();
                    let hist: Vec<_> = history.iter().map(consent_json).collect();
                    outln!("{}", serde_json::json!({"current": cur, "history": hist}));
                } else {
                    for c in &current {
                        let state = if c.granted { "granted" } else { "withdrawn" };
                        outln!("{:<24} {state:<10} at {} by {}", c.purpose, when(c.at_ms), c.recorded_by);
                    }
                    outln!("({} changes recorded)", history.len());
                }
            }
        },
        Command::Subject(cmd) => match cmd {
            SubjectCommand::Export { subject } => {
                let records = client.export_subject(&subject).await?;
                let rows: Vec<_> = records
                    .iter()
                    .map(|r| serde_json::json!({"record_id": r.record_id, "fields": record_json(r)}))
                    .collect();
                outln!("{}", serde_json::json!({"subject_id": subject, "records": rows}));
            }
            SubjectCommand::Erase { subject } => {
                let n = client.erase_subject(&subject).await?;
                outln!("erased {n} records of the subject and their data keys");
            }
        },
        Command::Audit(cmd) => match cmd {
            AuditCommand::Query { filters: f, json } => {
                let q = AuditQuery {
                    from_ms: f.from.or(f.since).unwrap_or(0),
                    to_ms: f.to.unwrap_or(0),
                    identity: f.identity,
                    role: f.role,
                    subject_id: f.subject,
                    record_id: f.record,
                    operation: f.operation.unwrap_or_default(),
                    decision: f.decision.map(decision_name).unwrap_or_default(),
                    purpose: f.purpose,
                    limit: f.limit,
                };
                print_audit(&client.query_audit(&q).await?, json);
            }
            AuditCommand::Subject { subject, json } => {
                let q = AuditQuery { subject_id: subject, ..AuditQuery::default() };
                let entries: Vec<AuditRecord> = client
                    .query_audit(&q)
                    .await?
                    .into_iter()
                    .filter(|e| e.operation != "audit_read")
                    .collect();
                print_audit(&entries, json);
            }
            AuditCommand::Export { output } => {
                use std::io::Write;
                let mut out: Box<dyn Write> = match &output {
                    Some(p) => Box::new(std::io::BufWriter::new(
                        std::fs::File::create(p).with_context(|| format!("cannot create {}", p.display()))?,
                    )),
                    None => Box::new(std::io::BufWriter::new(std::io::stdout())),
                };
                let mut failed = None;
                let n = client
                    .export_audit(|line| {
                        if failed.is_none()
                            && let Err(e) = writeln!(out, "{line}")
                        {
                            failed = Some(e);
                        }
                    })
                    .await?;
                if let Some(e) = failed {
                    return Err(e.into());
                }
                out.flush()?;
                eprintln!("exported {n} lines");
            }
            AuditCommand::Verify { witness, .. } => {
                let heads = match witness {
                    Some(path) => {
                        let key = client.audit_public_key().await?;
                        khlang_client::witnessed_heads(&load_witness(&path)?, &key)?
                    }
                    None => Vec::new(),
                };
                let live = client.verify_audit(&heads).await?;
                if live.break_open {
                    outln!(
                        "the vault found its log damaged and refuses data requests until the operator accepts the break"
                    );
                }
                let r = &live.records;
                outln!(
                    "records against the log: {} accounted for, {} vanished without their delete entry, {} appeared without their put{}",
                    r.matched,
                    r.vanished,
                    r.appeared,
                    if r.before_log > 0 {
                        format!(" ({} older than the log's first kept entry)", r.before_log)
                    } else {
                        String::new()
                    }
                );
                for finding in &r.findings {
                    outln!("  {}", terminal_safe(finding));
                }
                print_report(&live.report, &live.verdict)?;
                if !r.holds() {
                    return Err(VerifyOutcome(EXIT_BROKEN).into());
                }
            }
            AuditCommand::PublicKey => outln!("{}", client.audit_public_key().await?),
        },
        Command::Operator(cmd) => match cmd {
            OperatorCommand::Status => print_seal(&client.seal_status().await?),
            OperatorCommand::Unseal { custodian, passphrase_file } => {
                let p = passphrases(
                    passphrase_file.as_deref(),
                    &[format!("Custodian {custodian}'s passphrase")],
                )?;
                print_seal(&client.unseal(custodian, &p[0]).await?);
            }
            OperatorCommand::Seal => print_seal(&client.seal().await?),
            OperatorCommand::Backup { output } => {
                use std::io::Write;
                use std::os::unix::fs::OpenOptionsExt as _;
                // Ciphertext and sealed keys only, yet nobody else's to read: 0600.
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&output)
                    .with_context(|| format!("cannot create {}", output.display()))?;
                let mut out = std::io::BufWriter::new(file);
                let mut failed = None;
                let got = client
                    .backup(|bytes| match out.write_all(bytes) {
                        Ok(()) => true,
                        Err(e) => {
                            failed = Some(e);
                            false
                        }
                    })
                    .await;
                let written = match (got, failed) {
                    (Ok(n), None) => out
                        .into_inner()
                        .map_err(|e| e.into_error())
                        .and_then(|f| f.sync_all())
                        .map(|()| n)
                        .with_context(|| format!("cannot write {}", output.display())),
                    (_, Some(e)) => {
                        Err(anyhow::Error::new(e).context(format!("cannot write {}", output.display())))
                    }
                    (Err(e), None) => Err(e.into()),
                };
                match written {
                    Ok(n) => outln!(
                        "backup of {n} bytes written to {}; restore it with `khlangd restore {} --data-dir DIR`",
                        output.display(),
                        output.display()
                    ),
                    Err(e) => {
                        std::fs::remove_file(&output).ok();
                        return Err(e);
                    }
                }
            }
            OperatorCommand::Passwd { custodian, passphrase_file } => {
                let prompts =
                    [format!("Custodian {custodian}'s current passphrase"), "New passphrase".to_owned()];
                let p = passphrases(passphrase_file.as_deref(), &prompts)?;
                if passphrase_file.is_none() {
                    let again = Zeroizing::new(rpassword::prompt_password("Repeat new passphrase: ")?);
                    if *again != *p[1] {
                        anyhow::bail!("the new passphrases differ");
                    }
                }
                client.change_passphrase(custodian, &p[0], &p[1]).await?;
                outln!("custodian {custodian}'s passphrase changed");
            }
            OperatorCommand::Rekey { holders, threshold } => {
                let holders: Vec<&str> = holders.iter().map(String::as_str).collect();
                let r = client.rekey(threshold, &holders).await?;
                eprintln!(
                    "Rekey ceremony started. Give this nonce to the custodians: each new share's holder runs \
                     `khlang operator rekey-passphrase --nonce N --custodian J` with their own token, then {} \
                     current custodians run `khlang operator rekey-approve --nonce N --custodian I`.",
                    r.approvals_needed
                );
                outln!("{}", r.nonce.as_ref().map(|n| n.expose_secret()).unwrap_or_default());
            }
            OperatorCommand::RekeyPassphrase { nonce, custodian, passphrase_file } => {
                let p = passphrases(
                    passphrase_file.as_deref(),
                    &[format!("New custodian {custodian}'s passphrase")],
                )?;
                if passphrase_file.is_none() {
                    let again = Zeroizing::new(rpassword::prompt_password("Repeat it: ")?);
                    if *again != *p[0] {
                        anyhow::bail!("the passphrases differ");
                    }
                }
                print_rekey(&client.rekey_passphrase(&nonce, custodian, &p[0]).await?);
            }
            OperatorCommand::RekeyApprove { nonce, custodian, passphrase_file } => {
                let p = passphrases(
                    passphrase_file.as_deref(),
                    &[format!("Custodian {custodian}'s current passphrase")],
                )?;
                print_rekey(&client.rekey_approve(&nonce, custodian, &p[0]).await?);
            }
            OperatorCommand::RekeyCancel => {
                client.rekey_cancel().await?;
                outln!("rekey ceremony cancelled; nothing changed");
            }
        },
        Command::Keys(cmd) => match cmd {
            KeysCommand::Rotate => {
                let k = client.rotate_key().await?;
                print_keys(&k);
                outln!("follow the rewrap with `khlang keys status --watch`");
            }
            KeysCommand::Status { watch, no_count, json } => {
                if watch {
                    use std::io::Write;
                    loop {
                        let k = client.key_status(false).await?;
                        let line = job_line(&k).unwrap_or_else(|| "no key job has run".into());
                        eprint!("\r{line}\x1b[K");
                        let _ = std::io::stderr().flush();
                        if k.job.as_ref().is_none_or(|j| j.finished_ms.is_some()) {
                            eprintln!();
                            break;
                        }
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
                let k = client.key_status(!no_count).await?;
                if json {
                    outln!("{}", keys_json(&k));
                } else {
                    print_keys(&k);
                }
            }
            KeysCommand::Retire { version } => {
                client.retire_key(version).await?;
                outln!("KEK v{version} retired: destroyed, no data key referenced it");
            }
            KeysCommand::Reencrypt { record, subject, all } => {
                let target = match (record, subject, all) {
                    (Some(r), None, false) => ReencryptTarget::Record(r),
                    (None, Some(s), false) => ReencryptTarget::Subject(s),
                    (None, None, true) => ReencryptTarget::All,
                    _ => anyhow::bail!("give one of --record ID, --subject S, --all"),
                };
                let background = target == ReencryptTarget::All;
                let n = client.reencrypt(target).await?;
                if background {
                    outln!(
                        "re-encrypting {n} records in the background; follow with `khlang keys status --watch`"
                    );
                } else {
                    outln!("re-encrypted {n} records: new data keys, new ciphertexts, same values");
                }
            }
        },
        Command::Import { file, batch, parallel, restart } => {
            let s = import::run(client, import::Plan { file, batch, parallel, restart }).await?;
            outln!(
                "{} lines: {} stored, {} refused{} in {:.1} s ({:.0} records/s)",
                s.lines,
                s.stored,
                s.refused,
                if s.skipped > 0 { format!(" (resumed after line {})", s.skipped) } else { String::new() },
                s.seconds,
                s.stored as f64 / s.seconds.max(1e-3)
            );
            if s.refused > 0 {
                bail_refused(s.refused)?;
            }
        }
        Command::Bench {
            op,
            concurrency,
            connections: _,
            duration,
            warmup,
            records,
            purpose,
            fields,
            prefill_token: _,
            json,
        } => {
            let plan = bench::Plan {
                op,
                concurrency,
                warmup: Duration::from_secs_f64(warmup.max(0.0)),
                duration: Duration::from_secs_f64(duration.max(0.1)),
                records,
                purpose,
                fields,
            };
            let mut clients = vec![client];
            clients.extend(extra_connections);
            let report = bench::run(clients, plan, prefill).await?;
            if json {
                outln!("{}", report.to_json());
            } else {
                outln!(
                    "{:?} x{}: {:.0} ops/s  p50 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms  ({} ok, {} errors, {:.1} s)",
                    op,
                    concurrency,
                    report.ops_per_sec(),
                    report.percentile_ms(0.50),
                    report.percentile_ms(0.99),
                    report.percentile_ms(0.999),
                    report.ok,
                    report.errors,
                    report.seconds
                );
            }
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version print to stdout and succeed; a usage error is status 64.
        Err(e) => {
            let usage = e.use_stderr();
            if let Err(io) = e.print() {
                stdout_failed(io);
            }
            return if usage { ExitCode::from(EXIT_USAGE) } else { ExitCode::SUCCESS };
        }
    };
    let (addr, client_cert) = (cli.addr.clone(), cli.client_cert.is_some());
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => match e.downcast_ref::<VerifyOutcome>() {
            Some(VerifyOutcome(code)) => ExitCode::from(*code),
            None => {
                eprintln!("error: {e:#}");
                if let Some(hint) = hint(&e, &addr, client_cert) {
                    eprintln!("hint: {hint}");
                }
                ExitCode::from(exit_status(&e))
            }
        },
    }
}

const EXIT_USAGE: u8 = 64;

/// An import that refused records ends with status 1 (the file names them).
fn bail_refused(n: u64) -> anyhow::Result<()> {
    anyhow::bail!("{n} records were refused: see the .refused file beside the input")
}

/// What to do about a connection that failed in a way TLS explains.
fn hint(e: &anyhow::Error, addr: &str, client_cert: bool) -> Option<&'static str> {
    use khlang_client::{ClientError, Code};
    let client = e.chain().find_map(|c| c.downcast_ref::<ClientError>())?;
    let text = format!("{e:#}");
    // The stream broke below gRPC (no status from the vault): how a TLS mismatch shows.
    let broken = matches!(
        client,
        ClientError::Status { code: Code::Cancelled | Code::Unavailable | Code::Unknown, .. }
    ) || matches!(client, ClientError::Status { code: Code::Internal, .. })
        && text.contains("h2 protocol error");
    match client {
        // Plaintext HTTP/2 to a TLS listener: the server reads garbage and hangs up.
        ClientError::Status { .. } if broken && addr.starts_with("http://") => {
            Some("if the server uses TLS, use an https:// address and --ca-cert FILE")
        }
        ClientError::Connect { .. }
            if text.contains("UnknownIssuer") || text.contains("invalid peer certificate") =>
        {
            Some("the server's certificate is not signed by the CA given with --ca-cert")
        }
        // A TLS server that requires client certificates ends the handshake of a client without
        // one: the client sees its call cancelled or the connection fail.
        ClientError::Status { .. } | ClientError::Connect { .. }
            if (broken || matches!(client, ClientError::Connect { .. }))
                && addr.starts_with("https://")
                && !client_cert =>
        {
            Some("the server may require a client certificate: pass --client-cert and --client-key")
        }
        _ => None,
    }
}

/// The exit status of a failed command, by the vault's status code (table: [`cli::EXIT_STATUSES`]).
fn exit_status(e: &anyhow::Error) -> u8 {
    use khlang_client::{ClientError, Code};
    let Some(client) = e.chain().find_map(|c| c.downcast_ref::<ClientError>()) else { return 1 };
    match client {
        ClientError::Connect { .. } => 17,
        ClientError::InvalidAddress(_) | ClientError::InvalidToken | ClientError::Tls(_) => EXIT_USAGE,
        ClientError::Status { code, .. } => match code {
            Code::InvalidArgument | Code::OutOfRange => 10,
            Code::NotFound => 11,
            Code::AlreadyExists => 12,
            Code::PermissionDenied => 13,
            Code::Unauthenticated => 14,
            Code::ResourceExhausted => 15,
            Code::FailedPrecondition | Code::Aborted => 16,
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => 17,
            Code::DataLoss => 18,
            _ => 1,
        },
        _ => 1,
    }
}
