//! The `khlang` command line, as clap derive types.

use clap::{Parser, Subcommand, ValueEnum};

/// Exit statuses, for scripts (also in the README).
pub const EXIT_STATUSES: &str = "Exit status:
  0   success (audit verify: intact)
  1   any other failure (a local file, an internal error)
  2   audit verify: the log is broken
  3   audit verify: nothing wrong found, but not all of it is covered by a signature
  10  InvalidArgument     the request is malformed or a value fails its field's check
  11  NotFound            no such record, identity, request or key version
  12  AlreadyExists       the name is taken
  13  PermissionDenied    the regulations do not allow it for this identity
  14  Unauthenticated     missing, wrong or revoked token (or certificate)
  15  ResourceExhausted   locked out or throttled after failures, or a limit exceeded
  16  FailedPrecondition  not now: sealed, a job running, an audit break open
  17  Unavailable         the vault (or its database) cannot be reached; try again
  18  DataLoss            stored data failed its integrity check
  64  usage               a flag or argument is wrong (see --help)";

#[derive(Parser)]
#[command(name = "khlang", version, about = "Client for the Khlang encrypted personal-data vault", after_help = EXIT_STATUSES)]
pub struct Cli {
    /// Vault address.
    #[arg(long, env = "KHLANG_ADDR", default_value = khlang_client::DEFAULT_ADDR, global = true)]
    pub addr: String,
    /// Bearer token of the identity to act as (prefer the environment variable: flags show in `ps`).
    #[arg(long, env = "KHLANG_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// CA certificate (PEM) that signed the vault's TLS certificate; needed for https:// addresses.
    #[arg(long, env = "KHLANG_CACERT", global = true)]
    pub ca_cert: Option<std::path::PathBuf>,
    /// Client certificate (PEM) for mutual TLS; its subject common name is the identity.
    #[arg(long, env = "KHLANG_CLIENT_CERT", global = true, requires = "client_key")]
    pub client_cert: Option<std::path::PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, env = "KHLANG_CLIENT_KEY", global = true, requires = "client_cert")]
    pub client_key: Option<std::path::PathBuf>,
    /// Times in tables in UTC rather than the local zone (JSON always has milliseconds).
    #[arg(long, global = true)]
    pub utc: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Store a new record for a data subject; prints the record id.
    Put {
        /// The data subject's id (e.g. a citizen number); never printed back.
        #[arg(long)]
        subject: String,
        /// Fields as FIELD=VALUE.
        #[arg(required = true, value_parser = parse_assignment)]
        fields: Vec<(String, String)>,
    },
    /// Print a record's fields.
    Get {
        /// The record's id, as `put` printed it.
        record_id: String,
        /// Only these fields (comma-separated).
        #[arg(long, value_delimiter = ',')]
        fields: Vec<String>,
        /// Why you read the data (e.g. billing).
        #[arg(long)]
        purpose: Option<String>,
        /// One JSON object, field → value.
        #[arg(long)]
        json: bool,
    },
    /// Set and/or remove fields of a record.
    Update {
        /// The record's id.
        record_id: String,
        /// Fields to set, as FIELD=VALUE.
        #[arg(value_parser = parse_assignment)]
        fields: Vec<(String, String)>,
        /// Fields to remove (comma-separated).
        #[arg(long, value_delimiter = ',')]
        remove: Vec<String>,
    },
    /// Destroy a record and its data key.
    Delete {
        /// The record's id.
        record_id: String,
    },
    /// List a subject's record ids and field names (never values).
    List {
        /// The data subject's id.
        #[arg(long)]
        subject: String,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Identities (needs identity administration).
    #[command(subcommand)]
    Identity(IdentityCommand),
    /// The regulations in force (needs regulations administration).
    #[command(subcommand)]
    Regulations(RegulationsCommand),
    /// A data subject's consent and opt-outs, per purpose.
    #[command(subcommand)]
    Consent(ConsentCommand),
    /// Data subjects' rights: export (access, portability) and erasure.
    #[command(subcommand)]
    Subject(SubjectCommand),
    /// The access log (needs audit_read, except `verify --offline`).
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Custodians: unseal, seal, passphrase changes, rekey.
    #[command(subcommand)]
    Operator(OperatorCommand),
    /// Key-encryption keys: rotate, status, retire, re-encrypt (needs key_admin).
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Load records from a JSON Lines file (`{"subject_id": "…", "fields": {"name": "…"}}` per
    /// line) in batches, with a progress bar; run again, it resumes after the last line done.
    /// Writes FILE.ids (line, record id), FILE.refused (line, status, why) and FILE.progress.
    Import {
        /// The JSON Lines file.
        file: std::path::PathBuf,
        /// Records per request (at most the vault's batch limit, 1,000 by default).
        #[arg(long, default_value_t = 500)]
        batch: usize,
        /// Requests in flight at once.
        #[arg(long, default_value_t = 4)]
        parallel: usize,
        /// Start from the first line, ignoring (and replacing) a recorded position.
        #[arg(long)]
        restart: bool,
    },
    /// Load generator over real gRPC: reports ops/s and latency percentiles.
    Bench {
        /// What to measure.
        #[arg(value_enum)]
        op: BenchOp,
        /// Requests in flight at once.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// HTTP/2 connections the requests are spread over (one connection caps what a
        /// multi-core server can be shown to do).
        #[arg(long, default_value_t = 4)]
        connections: usize,
        /// Measured seconds (after the warm-up).
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// Unmeasured seconds before measuring.
        #[arg(long, default_value_t = 1.0)]
        warmup: f64,
        /// Records written before a `get` run, then read at random.
        #[arg(long, default_value_t = 1000)]
        records: usize,
        /// Purpose stated by `get` requests.
        #[arg(long, default_value = "service_delivery")]
        purpose: String,
        /// Fields `get` requests name (comma-separated; default: all).
        #[arg(long, value_delimiter = ',')]
        fields: Vec<String>,
        /// Token that writes the records a `get` run reads (default: the main token), for
        /// identities that may read but not write.
        #[arg(long, env = "KHLANG_PREFILL_TOKEN", hide_env_values = true)]
        prefill_token: Option<String>,
        /// One JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script (e.g. `khlang completions bash > /etc/bash_completion.d/khlang`).
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand)]
pub enum IdentityCommand {
    /// Create an identity with a role; prints its token once, or, for a privileged role, the id
    /// of the request a second identity must approve.
    Create {
        /// The identity's name (a person or an application).
        name: String,
        /// One of the regulations' roles.
        #[arg(long)]
        role: String,
    },
    /// List identities (never tokens).
    List {
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Revoke an identity: its tokens stop working at once.
    Revoke {
        /// The identity's name.
        name: String,
    },
    /// Requests for privileged identities waiting for a second identity's approval.
    Requests {
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Approve another identity's request; prints the new identity's token once.
    Approve {
        /// The request's id, as `identity create` printed it.
        request_id: String,
    },
    /// Refuse a request (or withdraw your own); nothing is created.
    Refuse {
        /// The request's id.
        request_id: String,
        /// Why (recorded in the audit log).
        #[arg(long, default_value = "")]
        reason: String,
    },
}

#[derive(Subcommand)]
pub enum RegulationsCommand {
    /// Re-read the regulations file; an invalid file is refused and the rules in force stay.
    Reload,
    /// Show the version, roles, purposes and fields in force.
    Show {
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum ConsentCommand {
    /// Record the subject's consent to a purpose.
    Grant {
        /// The data subject's id.
        subject: String,
        /// One of the regulations' purposes.
        purpose: String,
    },
    /// Record that the subject withdrew consent / opted out of a purpose.
    Withdraw {
        /// The data subject's id.
        subject: String,
        /// One of the regulations' purposes.
        purpose: String,
    },
    /// Show the subject's current choices and their history.
    Show {
        /// The data subject's id.
        subject: String,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum SubjectCommand {
    /// Every record of the subject, decrypted, as JSON.
    Export {
        /// The data subject's id.
        subject: String,
    },
    /// Destroy every record and data key of the subject.
    Erase {
        /// The data subject's id.
        subject: String,
    },
}

#[derive(Subcommand)]
pub enum OperatorCommand {
    /// Whether the vault is sealed and how many custodians' shares it has (no token needed).
    Status,
    /// Give one custodian's passphrase; with enough of them the vault unseals (no token needed).
    Unseal {
        /// Custodian number, 1..N.
        #[arg(long, default_value_t = 1)]
        custodian: u32,
        /// Read the passphrase from this file (first line) instead of a prompt.
        #[arg(long)]
        passphrase_file: Option<std::path::PathBuf>,
    },
    /// Wipe the keys from the vault's memory (needs key_admin).
    Seal,
    /// Back the whole vault up into one file (needs key_admin; online): its ciphertext, wrapped
    /// keys, sealed shares and audit log with a fresh signed checkpoint. Restore it with
    /// `khlangd restore FILE --data-dir DIR`, then check it with `khlangd verify`.
    Backup {
        /// The file to write (refuses to overwrite one; removed again if the backup fails).
        #[arg(long)]
        output: std::path::PathBuf,
    },
    /// Change a custodian's passphrase (no token needed: the old passphrase is the credential).
    Passwd {
        /// Custodian number, 1..N.
        #[arg(long, default_value_t = 1)]
        custodian: u32,
        /// Old passphrase on the first line, new on the second (instead of prompts).
        #[arg(long)]
        passphrase_file: Option<std::path::PathBuf>,
    },
    /// Start a rekey ceremony: a new root key split among new custodians (needs key_admin).
    /// Prints the nonce to hand to the custodians; nothing changes until they finish.
    Rekey {
        /// The identity that will hold each new share, once per new custodian in order (all
        /// different, not you): only it, with its own token, can set that share's passphrase.
        #[arg(long = "holder", required = true)]
        holders: Vec<String>,
        /// How many of them it takes to unseal.
        #[arg(long)]
        threshold: u32,
    },
    /// A new custodian sets their own new passphrase in a rekey ceremony, with the token of the
    /// identity its share is bound to.
    RekeyPassphrase {
        /// The ceremony's nonce, as `operator rekey` printed it.
        #[arg(long, env = "KHLANG_REKEY_NONCE")]
        nonce: String,
        /// New custodian number, 1..N.
        #[arg(long)]
        custodian: u32,
        /// Read the passphrase from this file (first line) instead of a prompt.
        #[arg(long)]
        passphrase_file: Option<std::path::PathBuf>,
    },
    /// A current custodian approves a rekey ceremony with their current passphrase (no token
    /// needed); the approval that reaches the unseal threshold replaces the root key.
    RekeyApprove {
        /// The ceremony's nonce, as `operator rekey` printed it.
        #[arg(long, env = "KHLANG_REKEY_NONCE")]
        nonce: String,
        /// Current custodian number, 1..N.
        #[arg(long)]
        custodian: u32,
        /// Read the current passphrase from this file (first line) instead of a prompt.
        #[arg(long)]
        passphrase_file: Option<std::path::PathBuf>,
    },
    /// Abandon the rekey ceremony in progress (needs key_admin).
    RekeyCancel,
}

#[derive(Subcommand)]
pub enum KeysCommand {
    /// Make a new KEK version, active at once; data keys are rewrapped in the background.
    Rotate,
    /// Versions (state, age, data keys under each) and the background job's progress.
    Status {
        /// Follow the background job with a progress bar until it finishes.
        #[arg(long)]
        watch: bool,
        /// Skip counting data keys per version (a scan of every record).
        #[arg(long)]
        no_count: bool,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Destroy a KEK version; refused while any data key still references it.
    Retire {
        /// The KEK version (see `keys status`).
        version: u32,
    },
    /// Fresh data keys and ciphertexts (after a suspected key compromise).
    Reencrypt {
        /// One record, now.
        #[arg(long, conflicts_with_all = ["subject", "all"])]
        record: Option<String>,
        /// Every record of one data subject, now.
        #[arg(long, conflicts_with = "all")]
        subject: Option<String>,
        /// Every record, by a background job (follow it with `khlang keys status --watch`).
        #[arg(long)]
        all: bool,
    },
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
pub enum BenchOp {
    /// Store records.
    Put,
    /// Store records 500 to a `PutRecords` request (ops/s counts records; latency is per request).
    PutMany,
    /// Read records written first.
    Get,
    /// The baseline: `ListRecords` of a subject that has none — authenticated, decided and
    /// audited like a read, with no record and no crypto. Put and Get are reported against it.
    List,
}

fn parse_assignment(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err("expected FIELD=VALUE".to_owned()),
    }
}

/// The operations the vault records (a filter naming another matches nothing, so it is refused):
/// the server's `Operation` names, repeated here because the CLI depends only on the client
/// library (`audit query --operation` against a real server tests them).
pub const OPERATIONS: &[&str] = &[
    "write",
    "read",
    "update",
    "delete",
    "list",
    "export",
    "erase",
    "consent",
    "audit_read",
    "key_admin",
    "identity_admin",
    "regulations_admin",
];

/// A decision the regulations made.
#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
pub enum Decision {
    /// The regulations allowed it.
    Allow,
    /// The regulations refused it.
    Deny,
    /// No decision was needed (unauthenticated, custodian and operator calls).
    None,
}

#[derive(clap::Args, Debug, Default)]
pub struct AuditFilters {
    /// Entries at or after this time: RFC 3339 (`2026-12-01T08:00:00+07:00`), a local date and
    /// time (`2026-12-01T08:00`, `2026-12-01`), or milliseconds since the Unix epoch.
    #[arg(long, value_parser = parse_when, conflicts_with = "since")]
    pub from: Option<u64>,
    /// Entries at or before this time (as --from).
    #[arg(long, value_parser = parse_when)]
    pub to: Option<u64>,
    /// Entries of the last DURATION (`90s`, `15m`, `2h`, `7d`).
    #[arg(long, value_parser = parse_ago)]
    pub since: Option<u64>,
    /// Entries of this identity.
    #[arg(long, default_value = "")]
    pub identity: String,
    /// Entries of identities with this role.
    #[arg(long, default_value = "")]
    pub role: String,
    /// Entries about this data subject.
    #[arg(long, default_value = "")]
    pub subject: String,
    /// Entries about this record.
    #[arg(long, default_value = "")]
    pub record: String,
    /// Entries of this operation.
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(OPERATIONS))]
    pub operation: Option<String>,
    /// Entries with this decision.
    #[arg(long, value_enum)]
    pub decision: Option<Decision>,
    /// Entries that stated this purpose.
    #[arg(long, default_value = "")]
    pub purpose: String,
    /// At most this many entries (0: all).
    #[arg(long, default_value_t = 0)]
    pub limit: u32,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A time given on the command line, as milliseconds since the Unix epoch.
pub fn parse_when(s: &str) -> Result<u64, String> {
    use jiff::tz::TimeZone;
    let ms = if let Ok(ms) = s.parse::<u64>() {
        return Ok(ms);
    } else if let Ok(t) = s.parse::<jiff::Timestamp>() {
        t.as_millisecond()
    } else if let Ok(dt) = s.parse::<jiff::civil::DateTime>() {
        dt.to_zoned_datetime(TimeZone::system()).map_err(|e| e.to_string())?.timestamp().as_millisecond()
    } else if let Ok(d) = s.parse::<jiff::civil::Date>() {
        d.to_zoned_datetime(TimeZone::system()).map_err(|e| e.to_string())?.timestamp().as_millisecond()
    } else {
        return Err(format!(
            "'{s}' is not a time: give RFC 3339 (2026-12-01T08:00:00+07:00), a local date and time \
             (2026-12-01T08:00), a date (2026-12-01) or milliseconds since the Unix epoch"
        ));
    };
    u64::try_from(ms).map_err(|_| format!("'{s}' is before 1970"))
}

/// `--since DURATION`: the time that long ago, in milliseconds since the Unix epoch.
pub fn parse_ago(s: &str) -> Result<u64, String> {
    let d: jiff::SignedDuration = s
        .parse()
        .map_err(|_| format!("'{s}' is not a duration: give e.g. 90s, 15m, 2h or 7d"))
        .or_else(|e| {
            // Days are a calendar unit to jiff; here a day is 24 hours.
            s.strip_suffix('d')
                .and_then(|n| n.parse::<i64>().ok())
                .map(|n| jiff::SignedDuration::from_hours(n * 24))
                .ok_or(e)
        })?;
    if d.is_negative() {
        return Err(format!("'{s}': a duration back in time must be positive"));
    }
    let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    Ok(now_ms().saturating_sub(ms))
}

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Entries matching the filters: a table, or JSON Lines with --json.
    Query {
        #[command(flatten)]
        filters: AuditFilters,
        /// JSON Lines (times in milliseconds) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Every access to one person's data: who, when, for which purpose, allowed or denied (PDPA).
    Subject {
        /// The data subject's id.
        subject: String,
        /// JSON Lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The whole log as JSON Lines with the signed checkpoints, for archiving.
    Export {
        /// Write here instead of standard output.
        #[arg(long)]
        output: Option<std::path::PathBuf>,
    },
    /// Verify the live log, or (--offline) an export with only the public key.
    /// Exit status: 0 intact, 2 broken, 3 unverified (nothing wrong found, but not everything is
    /// covered by a signature), 1 could not verify.
    Verify {
        /// An export file (`audit export --output`) to verify without the vault.
        #[arg(long, requires = "public_key")]
        offline: Option<std::path::PathBuf>,
        /// The vault's audit public key (hex), from `khlang audit public-key`.
        #[arg(long)]
        public_key: Option<String>,
        /// A witness file (`khlangd --audit-witness`): the log must contain every head it holds,
        /// or it was rolled back or cut.
        #[arg(long)]
        witness: Option<std::path::PathBuf>,
    },
    /// Print the Ed25519 public key that verifies this vault's checkpoints.
    PublicKey,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every argument of every command says what it is (`--help` is the manual).
    #[test]
    fn every_argument_has_help_text() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let builtin = matches!(arg.get_id().as_str(), "help" | "version");
                if !builtin && arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} {}", arg.get_id()));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_about().is_none() && sub.get_name() != "help" {
                    missing.push(format!("{path} {} (no about)", sub.get_name()));
                }
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "khlang", &mut missing);
        assert!(missing.is_empty(), "without help text: {missing:#?}");
    }

    #[test]
    fn times_and_durations_parse_and_bad_ones_say_what_is_expected() {
        assert_eq!(parse_when("1764576000000").unwrap(), 1_764_576_000_000);
        assert_eq!(parse_when("2025-12-01T08:00:00Z").unwrap(), 1_764_576_000_000);
        assert_eq!(parse_when("2025-12-01T15:00:00+07:00").unwrap(), 1_764_576_000_000);
        assert!(parse_when("2025-12-01T08:00").is_ok(), "a local date and time");
        assert!(parse_when("2025-12-01").is_ok(), "a local date");
        let e = parse_when("yesterday").unwrap_err();
        assert!(e.contains("RFC 3339"), "{e}");
        let now = now_ms();
        let two_hours = parse_ago("2h").unwrap();
        assert!((now - 7_200_000..=now - 7_200_000 + 5_000).contains(&two_hours));
        let week = parse_ago("7d").unwrap();
        assert!((now - 604_800_000..=now - 604_800_000 + 5_000).contains(&week));
        assert!(parse_ago("90s").is_ok() && parse_ago("15m").is_ok());
        assert!(parse_ago("soon").unwrap_err().contains("2h"));
    }
}
