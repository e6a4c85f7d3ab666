//! The `khlang` command line, as clap derive types.

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(name = "khlang", version, about = "Client for the Khlang encrypted personal-data vault")]
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
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Store a new record for a data subject; prints the record id.
    Put {
        #[arg(long)]
        subject: String,
        /// Fields as FIELD=VALUE.
        #[arg(required = true, value_parser = parse_assignment)]
        fields: Vec<(String, String)>,
    },
    /// Print a record's fields.
    Get {
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
        record_id: String,
        /// Fields to set, as FIELD=VALUE.
        #[arg(value_parser = parse_assignment)]
        fields: Vec<(String, String)>,
        /// Fields to remove (comma-separated).
        #[arg(long, value_delimiter = ',')]
        remove: Vec<String>,
    },
    /// Destroy a record and its data key.
    Delete { record_id: String },
    /// List a subject's record ids and field names (never values).
    List {
        #[arg(long)]
        subject: String,
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
    /// Load generator over real gRPC: reports ops/s and latency percentiles.
    Bench {
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
}

#[derive(Subcommand)]
pub enum IdentityCommand {
    /// Create an identity with a role; prints its token once, or, for a privileged role, the id
    /// of the request a second identity must approve.
    Create {
        name: String,
        #[arg(long)]
        role: String,
    },
    /// List identities (never tokens).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke an identity: its tokens stop working at once.
    Revoke { name: String },
    /// Requests for privileged identities waiting for a second identity's approval.
    Requests {
        #[arg(long)]
        json: bool,
    },
    /// Approve another identity's request; prints the new identity's token once.
    Approve { request_id: String },
    /// Refuse a request (or withdraw your own); nothing is created.
    Refuse {
        request_id: String,
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
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum ConsentCommand {
    /// Record the subject's consent to a purpose.
    Grant { subject: String, purpose: String },
    /// Record that the subject withdrew consent / opted out of a purpose.
    Withdraw { subject: String, purpose: String },
    /// Show the subject's current choices and their history.
    Show {
        subject: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum SubjectCommand {
    /// Every record of the subject, decrypted, as JSON.
    Export { subject: String },
    /// Destroy every record and data key of the subject.
    Erase { subject: String },
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
    /// Change a custodian's passphrase (no token needed: the old passphrase is the credential).
    Passwd {
        #[arg(long, default_value_t = 1)]
        custodian: u32,
        /// Old passphrase on the first line, new on the second (instead of prompts).
        #[arg(long)]
        passphrase_file: Option<std::path::PathBuf>,
    },
    /// Start a rekey ceremony: a new root key split among new custodians (needs key_admin).
    /// Prints the nonce to hand to the custodians; nothing changes until they finish.
    Rekey {
        #[arg(long)]
        custodians: u32,
        #[arg(long)]
        threshold: u32,
    },
    /// A new custodian sets their own new passphrase in a rekey ceremony (no token needed).
    RekeyPassphrase {
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
        #[arg(long, env = "KHLANG_REKEY_NONCE")]
        nonce: String,
        /// Current custodian number, 1..N.
        #[arg(long)]
        custodian: u32,
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
        #[arg(long)]
        json: bool,
    },
    /// Destroy a KEK version; refused while any data key still references it.
    Retire { version: u32 },
    /// Fresh data keys and ciphertexts (after a suspected key compromise).
    Reencrypt {
        #[arg(long, conflicts_with_all = ["subject", "all"])]
        record: Option<String>,
        #[arg(long, conflicts_with = "all")]
        subject: Option<String>,
        /// Every record, by a background job (follow it with `khlang keys status --watch`).
        #[arg(long)]
        all: bool,
    },
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
pub enum BenchOp {
    Put,
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

#[derive(clap::Args, Debug, Default)]
pub struct AuditFilters {
    /// Entries at or after this time (milliseconds since the Unix epoch).
    #[arg(long, default_value_t = 0)]
    pub from_ms: u64,
    /// Entries at or before this time (milliseconds since the Unix epoch).
    #[arg(long, default_value_t = 0)]
    pub to_ms: u64,
    #[arg(long, default_value = "")]
    pub identity: String,
    #[arg(long, default_value = "")]
    pub role: String,
    #[arg(long, default_value = "")]
    pub subject: String,
    #[arg(long, default_value = "")]
    pub record: String,
    /// e.g. read, write, audit_read.
    #[arg(long, default_value = "")]
    pub operation: String,
    /// allow, deny or none.
    #[arg(long, default_value = "")]
    pub decision: String,
    #[arg(long, default_value = "")]
    pub purpose: String,
    /// At most this many entries (0: all).
    #[arg(long, default_value_t = 0)]
    pub limit: u32,
}

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Entries matching the filters: a table, or JSON Lines with --json.
    Query {
        #[command(flatten)]
        filters: AuditFilters,
        #[arg(long)]
        json: bool,
    },
    /// Every access to one person's data: who, when, for which purpose, allowed or denied (PDPA).
    Subject {
        subject: String,
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
