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
    /// Load generator over real gRPC: reports ops/s and latency percentiles.
    Bench {
        #[arg(value_enum)]
        op: BenchOp,
        /// Requests in flight at once.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Measured seconds (after the warm-up).
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// Unmeasured seconds before measuring.
        #[arg(long, default_value_t = 1.0)]
        warmup: f64,
        /// Records written before a `get` run, then read at random.
        #[arg(long, default_value_t = 1000)]
        records: usize,
        /// One JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
pub enum BenchOp {
    Put,
    Get,
}

fn parse_assignment(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err("expected FIELD=VALUE".to_owned()),
    }
}
