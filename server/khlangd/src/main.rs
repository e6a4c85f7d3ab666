//! `khlangd`: initialise, serve, or run a development vault.
#![forbid(unsafe_code)]

/// glibc's malloc took ~20% of the daemon's CPU under 64 concurrent requests (perf: arena
/// contention and consolidation); mimalloc keeps per-thread heaps.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `println!` that ends the daemon quietly, as a killed-by-SIGPIPE program would (status 141),
/// when standard output is closed (`khlangd init … | head -1`), instead of panicking.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout().lock(), $($arg)*) {
            $crate::stdout_failed(e);
        }
    }};
}

fn stdout_failed(e: std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(141);
    }
    eprintln!("error: cannot write to standard output: {e}");
    std::process::exit(1);
}

/// One line for a failure: each cause once (a context that already quotes its cause's text is
/// not followed by it again), no backtrace.
fn error_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    // An error may quote what it could not take (a TOML line, an argument): never a password.
    config::scrub(&line)
}

mod config;
mod file_modes;
mod lifecycle;
mod offline;
mod passphrases;
mod tls;

use lifecycle::run;
use offline::{config_check, open_stopped, verify};
use passphrases::{init_passphrases, read_file_passphrase, serve_passphrases};
use tls::dev_certs;

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, CommandFactory as _, FromArgMatches as _, Parser, Subcommand, ValueEnum};
use khlang_keys::SealParams;
use khlang_server::api::ServerTls;
use khlang_server::policy::regulations::Regulations;
use khlang_server::storage::Durability;
use khlang_server::vault::keyops::JobPacing;
use khlang_server::{AuthLimits, CipherMode, Limits, StorageLocation, Vault, VaultOptions, api, dev};
use zeroize::Zeroizing;

#[derive(Parser)]
#[command(name = "khlangd", version, about = "Khlang encrypted personal-data vault server")]
struct Cli {
    /// How log lines are written to standard error: `text` for people, `json` (one object a
    /// line) for a log collector. The level is KHLANG_LOG (default `info`: one line per request).
    #[arg(long, env = "KHLANG_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    /// A TOML file of settings named as the long flags (`data-dir = "/var/lib/khlang"`). A flag
    /// on the command line beats its environment variable, which beats the file, which beats the
    /// built-in default. Check one with `khlangd config check FILE`.
    #[arg(long, env = config::CONFIG_ENV, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate FILE as `khlangd serve` would read it under this environment (the regulations
    /// parse, TLS files load, bounds hold) and print the effective settings, each with where it
    /// came from; a PostgreSQL password is never printed, nor any passphrase.
    Check {
        /// The configuration file.
        file: PathBuf,
    },
}

#[derive(Subcommand)]
enum TlsCommand {
    /// Write a development CA, a server certificate and client certificates into DIR (keys 0600;
    /// refuses to overwrite): `ca.pem`, `server.pem` + `server.key`, `client-NAME.pem` +
    /// `client-NAME.key` for each --client, whose common name is the identity it authenticates as.
    DevCerts {
        /// The folder to write into (created if missing).
        dir: PathBuf,
        /// Names the server certificate is valid for (DNS names or IP addresses).
        #[arg(long = "host", default_values_t = ["localhost".to_owned(), "127.0.0.1".to_owned()])]
        hosts: Vec<String>,
        /// Identities to make client certificates for (repeatable).
        #[arg(long = "client", default_values_t = ["registration-app".to_owned()])]
        clients: Vec<String>,
        /// Days the certificates are valid.
        #[arg(long, default_value_t = 90)]
        days: u32,
    },
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
enum LogFormat {
    Text,
    Json,
}

/// Where the vault's records, keys and identities live.
#[derive(Args)]
struct StorageArgs {
    /// `sled` (in the data folder; the default) or a PostgreSQL connection string, libpq style:
    /// `postgres://user@host1,host2/db?target_session_attrs=read-write` (prefer KHLANG_STORAGE
    /// for one carrying a password: flags show in `ps`). The audit log's files stay in --data-dir.
    #[arg(long, env = "KHLANG_STORAGE", default_value = "sled", hide_env_values = true)]
    storage: String,
    /// The CA certificate (PEM) that signed the PostgreSQL server's certificate: the connection
    /// then uses TLS (add `sslmode=require` to the connection string to refuse one without).
    #[arg(long, env = "KHLANG_STORAGE_CA_CERT")]
    storage_ca_cert: Option<PathBuf>,
}

impl StorageArgs {
    /// Parsed here rather than by clap, whose refusal would echo the value — and with it any
    /// password a mistyped connection string carries.
    fn location(self) -> anyhow::Result<StorageLocation> {
        let storage: StorageLocation = self.storage.parse().map_err(|e| anyhow::anyhow!("--storage: {e}"))?;
        match (storage, self.storage_ca_cert) {
            (StorageLocation::Postgres { url, .. }, ca_cert) => {
                Ok(StorageLocation::Postgres { url, ca_cert })
            }
            (StorageLocation::Sled, None) => Ok(StorageLocation::Sled),
            (StorageLocation::Sled, Some(_)) => bail!("--storage-ca-cert is for a postgres:// --storage"),
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Create a vault: a random root key sealed under a passphrase, the first key-encryption key,
    /// and a first identity (an administrator) whose token is printed once.
    Init {
        #[arg(long, env = "KHLANG_DATA_DIR")]
        data_dir: PathBuf,
        #[command(flatten)]
        storage: StorageArgs,
        #[command(flatten)]
        passphrase: PassphraseArgs,
        /// Split the root key among this many custodians, each with their own passphrase
        /// (give --passphrase-file once per custodian, in order, or be prompted for each).
        #[arg(long, default_value_t = 1)]
        custodians: u8,
        /// How many custodians' passphrases unseal the vault (split knowledge, dual control).
        #[arg(long, default_value_t = 1)]
        threshold: u8,
        /// Argon2id memory in KiB (at least 19456).
        #[arg(long, default_value_t = SealParams::DEFAULT.m_cost)]
        argon2_memory_kib: u32,
        /// Argon2id passes (at least 2).
        #[arg(long, default_value_t = SealParams::DEFAULT.t_cost)]
        argon2_passes: u32,
        /// The regulations file the vault will serve (default: the embedded municipal sample).
        #[arg(long, env = "KHLANG_REGULATIONS")]
        regulations: Option<PathBuf>,
        /// Names of the first identities, all of `--initial-role` (repeat the flag). Two by
        /// default: creating a privileged identity later needs a second administrator's approval.
        #[arg(long, default_values_t = [String::from("admin"), String::from("admin-2")])]
        initial_identity: Vec<String>,
        /// Their role: one of the regulations' roles.
        #[arg(long, default_value = "key-admin")]
        initial_role: String,
    },
    /// Serve an initialised vault, unsealed with the passphrases given; with fewer than its
    /// threshold it starts sealed and custodians unseal it with `khlang operator unseal`.
    Serve {
        #[arg(long, env = "KHLANG_DATA_DIR")]
        data_dir: PathBuf,
        #[command(flatten)]
        storage: StorageArgs,
        #[command(flatten)]
        passphrase: PassphraseArgs,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Move audit entries older than the regulations' retention (at least 365 days) out of a
    /// STOPPED vault into an archive file (JSON Lines, verifiable offline with the public key).
    /// Entries younger than the retention are never removed; there is no API for this.
    ArchiveAudit {
        #[arg(long, env = "KHLANG_DATA_DIR")]
        data_dir: PathBuf,
        #[command(flatten)]
        storage: StorageArgs,
        #[command(flatten)]
        passphrase: PassphraseArgs,
        /// Archive entries older than this many days (at least the retention).
        #[arg(long)]
        older_than_days: u32,
        /// The archive file to create (refuses to overwrite one).
        #[arg(long)]
        output: PathBuf,
        #[arg(long, env = "KHLANG_REGULATIONS")]
        regulations: Option<PathBuf>,
        #[command(flatten)]
        audit: AuditArgs,
    },
    /// Restore a backup (`khlang operator backup`) into a new or empty folder. The whole file is
    /// checked first — its checksum, and its signature under the vault's audit public key —
    /// nothing is written from a damaged or forged one. Then check it with `khlangd verify`.
    Restore {
        /// The backup file.
        file: PathBuf,
        /// The folder to restore into (must be empty or absent).
        #[arg(long, env = "KHLANG_DATA_DIR")]
        data_dir: PathBuf,
        /// The vault's audit public key (hex, from `khlang audit public-key`, kept apart from the
        /// backups): only a backup that vault signed is restored.
        #[arg(long, env = "KHLANG_AUDIT_PUBLIC_KEY")]
        audit_public_key: String,
    },
    /// Check a STOPPED (or restored) vault: open every record's data key, subject id and field
    /// envelope (showing none) and verify the audit log. Recorded in its log. Exits 0 when
    /// everything opens and the log is intact, 3 when the log is only unverified, 2 on damage.
    Verify {
        /// The vault's folder (the node's folder, for a vault on PostgreSQL).
        #[arg(long, env = "KHLANG_DATA_DIR")]
        data_dir: PathBuf,
        #[command(flatten)]
        storage: StorageArgs,
        #[command(flatten)]
        passphrase: PassphraseArgs,
        /// The vault's regulations file (default: the regulations the vault holds).
        #[arg(long, env = "KHLANG_REGULATIONS")]
        regulations: Option<PathBuf>,
    },
    /// Break-glass for the two-person rule: with the STOPPED vault opened by its custodians'
    /// quorum (`--passphrase-file N=FILE` for K of them), approve a pending identity request when no
    /// identity but its requester could approve it (the last administrator left). Prints the token.
    ApproveIdentity {
        #[arg(long, env = "KHLANG_DATA_DIR")]
        data_dir: PathBuf,
        #[command(flatten)]
        storage: StorageArgs,
        #[command(flatten)]
        passphrase: PassphraseArgs,
        /// The request's id (`khlang identity requests`).
        #[arg(long)]
        request: String,
    },
    /// TLS certificates for trying TLS and mutual TLS out (not for production: use your own CA).
    #[command(subcommand)]
    Tls(TlsCommand),
    /// The configuration file (see --config).
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Run on embedded defaults: a local folder, development unseal, the sample regulations and a
    /// printed token for each sample identity. Not for real data.
    Dev {
        #[arg(long, default_value = dev::DEFAULT_DIR)]
        data_dir: PathBuf,
        #[command(flatten)]
        storage: StorageArgs,
        #[command(flatten)]
        server: ServerArgs,
        #[command(flatten)]
        bench: BenchArgs,
    },
}

/// The benchmark's switches, only in a `bench` build (`cargo build --features khlangd/bench`):
/// a production binary has no flag that turns encryption, the regulations or the audit off.
#[derive(Args, Default)]
struct BenchArgs {
    /// Benchmark baseline only: store field values WITHOUT encryption, to measure what
    /// encryption costs. The data folder remembers this mode and an encrypted server refuses it.
    #[cfg(feature = "bench")]
    #[arg(long, hide = true)]
    bench_plaintext_baseline: bool,
    /// Benchmark baseline only: allow every request without consulting the regulations.
    #[cfg(feature = "bench")]
    #[arg(long, hide = true)]
    bench_skip_policy: bool,
    /// Benchmark baseline only: write no audit entries.
    #[cfg(feature = "bench")]
    #[arg(long, hide = true)]
    bench_skip_audit: bool,
    /// Benchmark setup only: before serving, store encrypted records in bulk (bypassing the
    /// API and the audit log) until the vault holds this many.
    #[cfg(feature = "bench")]
    #[arg(long, hide = true)]
    bench_populate: Option<u64>,
}

impl BenchArgs {
    fn mode(&self) -> CipherMode {
        #[cfg(feature = "bench")]
        if self.bench_plaintext_baseline {
            return CipherMode::PlaintextBaseline;
        }
        CipherMode::Encrypted
    }

    /// The options with the switches applied.
    fn apply(&self, options: VaultOptions) -> VaultOptions {
        #[cfg(feature = "bench")]
        return VaultOptions {
            bench_skip_policy: self.bench_skip_policy,
            bench_skip_audit: self.bench_skip_audit,
            ..options
        };
        #[cfg(not(feature = "bench"))]
        options
    }

    /// Stores records in bulk before serving, if asked.
    async fn populate(&self, vault: &Vault) -> anyhow::Result<()> {
        #[cfg(feature = "bench")]
        if let Some(target) = self.bench_populate {
            let have = vault.record_count().await?;
            if have < target {
                let started = std::time::Instant::now();
                vault
                    .bench_populate(target - have, |done| {
                        if done % 100_000 == 0 {
                            tracing::info!(done, "bench populate");
                        }
                    })
                    .await?;
                tracing::info!(
                    records = target,
                    secs = started.elapsed().as_secs_f64(),
                    "bench populate finished"
                );
            }
        }
        let _ = vault;
        Ok(())
    }

    fn warnings(&self) -> Vec<&'static str> {
        #[allow(unused_mut)]
        let mut out = Vec::new();
        #[cfg(feature = "bench")]
        {
            if self.bench_plaintext_baseline {
                out.push("!! BENCHMARK BASELINE: field values are stored WITHOUT encryption !!");
            }
            if self.bench_skip_policy {
                out.push("!! BENCHMARK BASELINE: the regulations are NOT enforced !!");
            }
            if self.bench_skip_audit {
                out.push("!! BENCHMARK BASELINE: requests are NOT audited !!");
            }
        }
        out
    }
}

#[derive(Args)]
struct PassphraseArgs {
    /// Read a passphrase from this file (first line). `serve` takes `N=FILE` for custodian N
    /// (repeatable); `init --custodians N` takes one file per custodian, in order. Otherwise
    /// KHLANG_PASSPHRASE (one custodian), otherwise a prompt.
    #[arg(long)]
    passphrase_file: Vec<String>,
}

/// Flags that go together are checked here rather than by clap's `requires`, which a setting
/// from the configuration file (a default to clap) would not satisfy.
#[derive(Args)]
struct ServerArgs {
    #[arg(long, env = "KHLANG_LISTEN", default_value = dev::DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// The regulations file (TOML). Reload it with SIGHUP or `khlang regulations reload`. The
    /// vault remembers the regulations it is under: without this flag it takes them; with a file
    /// that differs it refuses to start unless --regulations-changed.
    #[arg(long, env = "KHLANG_REGULATIONS")]
    regulations: Option<PathBuf>,
    /// The --regulations file replaces the regulations the vault is under: it starts under the
    /// ones it holds and, once unsealed, puts the file in force (an audited reload).
    #[arg(long)]
    regulations_changed: bool,
    /// Serve TLS with this certificate chain (PEM)...
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    /// ...and this private key (PEM).
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// Require client certificates issued by this CA (PEM); a certificate's subject common name is
    /// the identity it authenticates as.
    #[arg(long)]
    client_ca: Option<PathBuf>,
    /// With --client-ca: also accept clients without a certificate (they present a token instead).
    #[arg(long)]
    client_cert_optional: bool,
    /// Allow plaintext (no TLS) on an address other than loopback.
    #[arg(long)]
    allow_plaintext: bool,
    /// Write the daemon's process id here once it listens (removed when it stops), for
    /// `kill -HUP $(cat FILE)` and service managers.
    #[arg(long, env = "KHLANG_PID_FILE")]
    pid_file: Option<PathBuf>,
    /// Serve Prometheus metrics (text format, `GET /metrics`) on this address, apart from the
    /// API; off unless given. Labels never carry an identity, subject, record id or value.
    #[arg(long, env = "KHLANG_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Failures of one credential (a token, a custodian's passphrase) within 15 minutes that lock
    /// it out, from any address (PCI DSS 8.3.4: at most 10); an address failing more than this is
    /// throttled, never locked.
    #[arg(long, default_value_t = AuthLimits::default().max_failures)]
    auth_max_failures: u32,
    /// How long a locked-out credential stays locked, in seconds (PCI DSS 8.3.4: at least 1800);
    /// a lockout survives a restart.
    #[arg(long, default_value_t = AuthLimits::default().lockout.as_secs())]
    auth_lockout_secs: u64,
    /// Largest gRPC message accepted, in bytes.
    #[arg(long, default_value_t = Limits::default().max_message_bytes)]
    max_message_bytes: usize,
    /// Most fields one record may hold.
    #[arg(long, default_value_t = Limits::default().max_fields_per_record)]
    max_fields: usize,
    /// Largest field value, in bytes.
    #[arg(long, default_value_t = Limits::default().max_field_bytes)]
    max_field_bytes: usize,
    /// How writes become durable before they are acknowledged (per-request exists for benchmarks).
    #[arg(long, value_enum, default_value_t = DurabilityArg::Group, hide = true)]
    durability: DurabilityArg,
    /// Records per step of a background key job (rewrap, re-encryption).
    #[arg(long, default_value_t = JobPacing::default().batch)]
    key_job_batch: usize,
    /// Share of its time (percent) a background key job may spend working; it rests the rest, so
    /// requests keep most of the machine while data keys are rewrapped.
    #[arg(long, default_value_t = JobPacing::default().duty_percent, value_parser = clap::value_parser!(u8).range(1..=100))]
    key_job_duty: u8,
    /// Fixed pause between steps of a background key job, in milliseconds (a floor under the rest).
    #[arg(long, default_value_t = 0)]
    key_job_pause_ms: u64,
    #[command(flatten)]
    audit: AuditArgs,
    /// Accept the audit break the vault carried forward at this entry (the seq its ERROR names):
    /// the acceptance is recorded in the log and data requests are served again.
    #[arg(long, value_name = "SEQ")]
    accept_audit_break: Option<u64>,
    /// Accept that the audit log starts at this entry with no signed archive base (it was archived
    /// by a version before the base was kept): older authority values are then judged by their
    /// tags alone, and older records are not checked. Refused without it.
    #[arg(long, value_name = "SEQ")]
    accept_unbased_log: Option<u64>,
}

#[derive(Args)]
struct AuditArgs {
    /// Also append every signed audit checkpoint to this file, synced, OUTSIDE the data folder
    /// (another disk or host): `khlang audit verify --witness FILE` then detects a rolled-back log.
    #[arg(long, env = "KHLANG_AUDIT_WITNESS", value_name = "FILE")]
    audit_witness: Option<PathBuf>,
    /// Also stream every audit entry, best-effort, to a SIEM: `file:///var/log/khlang-audit.jsonl`
    /// (JSON Lines), or RFC 5424 to `syslog://host:514` (UDP), `syslog+tcp://host:601` (TCP,
    /// octet-counted) or `syslog+tls://host:6514` (TLS, with --audit-sink-ca). Never a substitute
    /// for the log.
    #[arg(long, env = "KHLANG_AUDIT_SINK", value_name = "URL")]
    audit_sink: Option<String>,
    /// The CA certificate (PEM) that signs a `syslog+tls://` sink's certificate; the only one
    /// trusted for it.
    #[arg(long, env = "KHLANG_AUDIT_SINK_CA", value_name = "FILE")]
    audit_sink_ca: Option<PathBuf>,
    /// The certificate (PEM) the vault presents to a `syslog+tls://` sink that requires one
    /// (with --audit-sink-key).
    #[arg(long, env = "KHLANG_AUDIT_SINK_CERT", value_name = "FILE", requires = "audit_sink_key")]
    audit_sink_cert: Option<PathBuf>,
    /// The private key (PEM) of --audit-sink-cert.
    #[arg(long, env = "KHLANG_AUDIT_SINK_KEY", value_name = "FILE", requires = "audit_sink_cert")]
    audit_sink_key: Option<PathBuf>,
    /// Entries per audit segment file (tests use small ones).
    #[arg(long, hide = true, default_value_t = khlang_server::audit::files::ROLL_ENTRIES)]
    audit_segment_entries: u64,
}

impl AuditArgs {
    fn files(&self) -> anyhow::Result<khlang_server::audit::files::FileOptions> {
        if let Some(w) = &self.audit_witness
            && w.parent().is_some_and(|p| !p.as_os_str().is_empty() && !p.exists())
        {
            bail!("the audit witness's folder {} does not exist", w.display());
        }
        let mut sink = self
            .audit_sink
            .as_deref()
            .map(str::parse::<khlang_server::audit::sink::SinkTarget>)
            .transpose()
            .map_err(|e| anyhow::anyhow!("--audit-sink: {e}"))?;
        if let Some(ca) = &self.audit_sink_ca {
            let Some(target) = sink.take() else { bail!("--audit-sink-ca is given without --audit-sink") };
            sink = Some(target.with_ca(ca.clone())?);
        }
        if let (Some(cert), Some(key)) = (&self.audit_sink_cert, &self.audit_sink_key) {
            let Some(target) = sink.take() else { bail!("--audit-sink-cert is given without --audit-sink") };
            sink = Some(target.with_identity(cert.clone(), key.clone())?);
        }
        Ok(khlang_server::audit::files::FileOptions {
            segment_entries: self.audit_segment_entries.max(1),
            witness: self.audit_witness.clone(),
            sink,
        })
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum DurabilityArg {
    Group,
    PerRequest,
}

fn load_regulations(path: Option<&Path>) -> anyhow::Result<Regulations> {
    let Some(path) = path else { return Ok(Regulations::sample()) };
    file_modes::check(path, "regulations file", file_modes::Holds::Settings)?;
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    Regulations::parse(&text).with_context(|| format!("in {}", path.display()))
}

/// PCI DSS 8.3.4: lock out after at most 10 failed attempts, for at least 30 minutes.
const MAX_FAILURES_BOUND: u32 = 10;
const MIN_LOCKOUT_SECS: u64 = 1800;

impl ServerArgs {
    fn options(&self, mode: CipherMode) -> anyhow::Result<VaultOptions> {
        if self.regulations_changed && self.regulations.is_none() {
            bail!("--regulations-changed says the --regulations file replaces the rules: give that file");
        }
        if !(1..=MAX_FAILURES_BOUND).contains(&self.auth_max_failures) {
            bail!(
                "--auth-max-failures {} is out of bounds: 1 to {MAX_FAILURES_BOUND} (PCI DSS 8.3.4)",
                self.auth_max_failures
            );
        }
        if self.auth_lockout_secs < MIN_LOCKOUT_SECS {
            bail!(
                "--auth-lockout-secs {} is too short: at least {MIN_LOCKOUT_SECS} (30 minutes, PCI DSS 8.3.4)",
                self.auth_lockout_secs
            );
        }
        Ok(VaultOptions {
            limits: Limits {
                max_message_bytes: self.max_message_bytes,
                max_fields_per_record: self.max_fields,
                max_field_bytes: self.max_field_bytes,
                ..Limits::default()
            },
            durability: match self.durability {
                DurabilityArg::Group => Durability::Group,
                DurabilityArg::PerRequest => Durability::PerRequest,
            },
            mode,
            auth: AuthLimits {
                max_failures: self.auth_max_failures,
                lockout: Duration::from_secs(self.auth_lockout_secs),
                ..AuthLimits::default()
            },
            regulations: Arc::new(load_regulations(self.regulations.as_deref())?),
            regulations_path: self.regulations.clone(),
            regulations_changed: self.regulations_changed,
            #[cfg(feature = "bench")]
            bench_skip_policy: false,
            #[cfg(feature = "bench")]
            bench_skip_audit: false,
            checkpoints: Default::default(),
            audit_files: self.audit.files()?,
            accept_audit_break: self.accept_audit_break,
            accept_unbased_log: self.accept_unbased_log,
            job_pacing: JobPacing {
                batch: self.key_job_batch.max(1),
                duty_percent: self.key_job_duty,
                pause: Duration::from_millis(self.key_job_pause_ms),
            },
            seal_params: SealParams::DEFAULT,
            ..VaultOptions::default()
        })
    }

    fn tls(&self) -> anyhow::Result<Option<ServerTls>> {
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            bail!("--tls-cert and --tls-key go together: give both or neither");
        }
        if self.client_ca.is_some() && self.tls_cert.is_none() {
            bail!("--client-ca needs TLS: give --tls-cert and --tls-key");
        }
        if self.client_cert_optional && self.client_ca.is_none() {
            bail!("--client-cert-optional is for a --client-ca: give the clients' CA");
        }
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            if !self.listen.ip().is_loopback() && !self.allow_plaintext {
                bail!(
                    "refusing plaintext on {}: personal data is sent only over encrypted channels. \
                     Give --tls-cert/--tls-key, listen on loopback, or pass --allow-plaintext",
                    self.listen
                );
            }
            return Ok(None);
        };
        let read = |p: &PathBuf| std::fs::read(p).with_context(|| format!("cannot read {}", p.display()));
        file_modes::check(key, "TLS private key", file_modes::Holds::Secret)?;
        file_modes::check(cert, "TLS certificate", file_modes::Holds::Settings)?;
        if let Some(ca) = &self.client_ca {
            file_modes::check(ca, "client CA file", file_modes::Holds::Settings)?;
        }
        let key_pem = Zeroizing::new(read(key)?);
        let ca = self.client_ca.as_ref().map(read).transpose()?;
        let tls =
            ServerTls::from_pem(&read(cert)?, key_pem.as_slice(), ca.as_deref(), self.client_cert_optional)
                .with_context(|| {
                format!("TLS from --tls-cert {} and --tls-key {}", cert.display(), key.display())
            })?;
        Ok(Some(tls))
    }
}

async fn bind(listen: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(listen).await.with_context(|| format!("cannot listen on {listen}"))
}

/// Installs the Prometheus exporter on its own listener (it runs on this runtime).
fn serve_metrics(listen: Option<SocketAddr>) -> anyhow::Result<()> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    let Some(listen) = listen else { return Ok(()) };
    let seconds = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];
    let sizes = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];
    PrometheusBuilder::new()
        .with_http_listener(listen)
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &seconds)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full("khlang_audit_batch_requests".into()), &sizes))
        .context("metrics buckets")?
        .install()
        .with_context(|| format!("cannot serve metrics on {listen}"))?;
    khlang_server::metrics::enable();
    tracing::info!(metrics_address = %listen, "serving metrics (GET /metrics)");
    Ok(())
}

fn print_dev_banner(
    listen: SocketAddr,
    dir: &Path,
    creds: &dev::DevCredentials,
    warnings: &[&str],
    tls: bool,
) {
    outln!("Khlang development vault — NOT for real data (its passphrase is public).");
    for w in warnings {
        outln!("{w}");
    }
    let scheme = if tls { "https" } else { "http" };
    outln!("  data folder: {}", dir.display());
    outln!("  listening:   {scheme}://{listen}");
    outln!("  credentials: {}", dir.join(dev::CREDENTIALS_FILE).display());
    outln!();
    outln!("Connect with:");
    outln!("  export KHLANG_ADDR={scheme}://{listen}");
    for (name, token) in &creds.0 {
        outln!("  export KHLANG_TOKEN={token}   # identity '{name}'");
    }
    outln!();
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match khlangd().await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", error_line(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The command line parsed over the configuration file's settings (see [`config`]).
fn parse_command_line() -> anyhow::Result<Cli> {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let mut cmd = Cli::command();
    if let Some(path) = config::named_in(&args) {
        cmd = config::ConfigFile::read(&path)?.apply(cmd)?;
    }
    let matches = match cmd.try_get_matches_from(args) {
        Ok(m) => m,
        // --help and --version print to standard output as clap does.
        Err(e) if !e.use_stderr() => e.exit(),
        // A refused value is quoted back: never with its password.
        Err(e) => {
            eprint!("{}", config::scrub(&e.render().to_string()));
            std::process::exit(e.exit_code());
        }
    };
    Ok(Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit()))
}

async fn khlangd() -> anyhow::Result<std::process::ExitCode> {
    let cli = parse_command_line()?;
    let filter =
        || tracing_subscriber::EnvFilter::try_from_env("KHLANG_LOG").unwrap_or_else(|_| "info".into());
    // A line per request: written by a thread of its own (a request does not wait on stderr;
    // at 20,000 reads/s writing in place cost them 8-11%, bench/logging.sh). Never lossy: when the
    // writer falls behind, requests wait rather than lines vanish. Flushed when `_log` drops.
    let (writer, _log) =
        tracing_appender::non_blocking::NonBlockingBuilder::default().lossy(false).finish(std::io::stderr());
    match cli.log_format {
        LogFormat::Text => tracing_subscriber::fmt()
            .with_env_filter(filter())
            .with_writer(writer.clone())
            .with_ansi(std::io::stderr().is_terminal())
            .init(),
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_env_filter(filter())
            .with_writer(writer)
            .init(),
    }
    match cli.command {
        Command::Init {
            data_dir,
            passphrase,
            custodians,
            threshold,
            argon2_memory_kib,
            argon2_passes,
            regulations,
            initial_identity,
            initial_role,
            storage,
        } => {
            let regs = load_regulations(regulations.as_deref())?;
            if !regs.roles.contains_key(&initial_role) {
                bail!("role '{initial_role}' is not in the regulations");
            }
            if custodians == 0 || threshold > custodians || (custodians > 1 && threshold < 2) {
                bail!("--threshold must be between 2 and --custodians (or both 1)");
            }
            let passes = init_passphrases(&passphrase, custodians)?;
            let refs: Vec<&[u8]> = passes.iter().map(|p| p.as_bytes()).collect();
            let params = SealParams { m_cost: argon2_memory_kib, t_cost: argon2_passes, p_cost: 1 };
            let options = VaultOptions {
                storage: storage.location()?,
                regulations: Arc::new(regs),
                ..VaultOptions::default()
            };
            let vault = Vault::init_custodians(&data_dir, threshold, &refs, params, &options)
                .await
                .with_context(|| format!("cannot initialise a vault in {}", data_dir.display()))?;
            for (i, pass) in passes.iter().enumerate().take(threshold.max(1) as usize) {
                vault.unseal_with(i as u8 + 1, pass.as_bytes(), None, "", "").await?;
            }
            let mut tokens = Vec::new();
            for name in &initial_identity {
                tokens.push((name, vault.bootstrap_identity(name, &initial_role).await?));
            }
            outln!("Initialised a vault in {}", data_dir.display());
            if custodians > 1 {
                outln!("Its root key is split among {custodians} custodians; any {threshold} unseal it.");
            }
            if tokens.len() > 1 {
                outln!("Give each token to a different person: one approves what the other requests.");
            }
            for (name, token) in &tokens {
                outln!("Token for identity '{name}' (role {initial_role}; shown once, store it safely):");
                outln!("{}", token.expose_secret());
            }
        }
        Command::ArchiveAudit {
            data_dir,
            storage,
            passphrase,
            older_than_days,
            output,
            regulations,
            audit,
        } => {
            let options = VaultOptions {
                storage: storage.location()?,
                regulations: Arc::new(load_regulations(regulations.as_deref())?),
                regulations_path: regulations,
                audit_files: audit.files()?,
                ..VaultOptions::default()
            };
            let vault = open_stopped(&data_dir, &options, &passphrase).await?;
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as u64;
            let before = now.saturating_sub(u64::from(older_than_days) * 86_400_000);
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&output)
                .with_context(|| format!("cannot create {}", output.display()))?;
            let report = match vault.archive_audit(before, now, &mut file).await {
                Ok(r) => r,
                Err(e) => {
                    drop(file);
                    std::fs::remove_file(&output).ok();
                    return Err(e.into());
                }
            };
            vault.flush().await?;
            if report.entries == 0 {
                std::fs::remove_file(&output).ok();
                outln!("nothing to archive: no signed checkpoint is older than {older_than_days} days");
            } else {
                outln!(
                    "archived entries {} to {} ({} entries) to {}; verify it with `khlang audit verify --offline`",
                    report.first,
                    report.last,
                    report.entries,
                    output.display()
                );
            }
        }
        Command::Serve { data_dir, storage, passphrase, server } => {
            let options =
                VaultOptions { storage: storage.location()?, ..server.options(CipherMode::Encrypted)? };
            let tls = server.tls()?;
            let passes = serve_passphrases(&passphrase)?;
            let vault = Vault::open_sealed(&data_dir, &options)
                .await
                .with_context(|| format!("cannot open the vault in {}", data_dir.display()))?;
            for (custodian, pass) in &passes {
                vault
                    .unseal_with(*custodian, pass.as_bytes(), None, "", "")
                    .await
                    .with_context(|| format!("cannot unseal with custodian {custodian}'s passphrase"))?;
            }
            drop(passes);
            let status = vault.seal_status().await?;
            if status.sealed {
                tracing::warn!(
                    threshold = status.threshold,
                    received = status.received.len(),
                    "serving SEALED: custodians unseal with `khlang operator unseal`"
                );
            }
            serve_metrics(server.metrics_listen)?;
            run(vault, bind(server.listen).await?, tls, server.pid_file.as_deref()).await?;
        }
        Command::Config(ConfigCommand::Check { file }) => config_check(&file)?,
        Command::Restore { file, data_dir, audit_public_key } => {
            let key = hex::decode(audit_public_key.trim())
                .ok()
                .filter(|k| k.len() == 32)
                .context("--audit-public-key: 64 hex digits, as `khlang audit public-key` prints them")?;
            let report = khlang_server::vault::backup::restore(&file, &data_dir, &key)
                .with_context(|| format!("cannot restore {}", file.display()))?;
            outln!(
                "restored {} records ({} stored entries) and the audit log up to entry {} ({} bytes) into {}",
                report.records,
                report.store_entries,
                report.header.audit_seq,
                report.audit_bytes,
                data_dir.display()
            );
            outln!("next: khlangd verify --data-dir {}", data_dir.display());
        }
        Command::Verify { data_dir, storage, passphrase, regulations } => {
            let code = verify(data_dir, storage, passphrase, regulations).await?;
            return Ok(std::process::ExitCode::from(code));
        }
        Command::ApproveIdentity { data_dir, storage, passphrase, request } => {
            offline::approve_identity(&data_dir, storage, &passphrase, &request).await?;
        }
        Command::Tls(TlsCommand::DevCerts { dir, hosts, clients, days }) => {
            dev_certs(&dir, &hosts, &clients, days)?;
        }
        Command::Dev { data_dir, storage, server, bench } => {
            let options =
                VaultOptions { storage: storage.location()?, ..bench.apply(server.options(bench.mode())?) };
            let tls = server.tls()?;
            let (vault, creds) = dev::open_dev_vault(&data_dir, &options)
                .await
                .with_context(|| format!("cannot open the development vault in {}", data_dir.display()))?;
            bench.populate(&vault).await?;
            let listener = bind(server.listen).await?;
            print_dev_banner(listener.local_addr()?, &data_dir, &creds, &bench.warnings(), tls.is_some());
            if vault.is_sealed() {
                outln!(
                    "SEALED: the development passphrase was changed; unseal with \
                     `khlang operator unseal --custodian 1` and your new passphrase."
                );
            }
            drop(creds);
            serve_metrics(server.metrics_listen)?;
            run(vault, listener, tls, server.pid_file.as_deref()).await?;
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}
