//! `khlangd`: initialise, serve, or run a development vault.
#![forbid(unsafe_code)]

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use khlang_keys::SealParams;
use khlang_server::audit::TracingAudit;
use khlang_server::policy::DEVELOPER_ROLE;
use khlang_server::store::Durability;
use khlang_server::{CipherMode, Limits, Vault, VaultOptions, dev, grpc};
use zeroize::Zeroizing;

#[derive(Parser)]
#[command(name = "khlangd", version, about = "Khlang encrypted personal-data vault server")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a vault: a random root key sealed under a passphrase, and the first key-encryption key.
    Init {
        #[arg(long, env = "KHLANG_DATA_DIR")]
        data_dir: PathBuf,
        #[command(flatten)]
        passphrase: PassphraseArgs,
        /// Argon2id memory in KiB (at least 19456).
        #[arg(long, default_value_t = SealParams::DEFAULT.m_cost)]
        argon2_memory_kib: u32,
        /// Argon2id passes (at least 2).
        #[arg(long, default_value_t = SealParams::DEFAULT.t_cost)]
        argon2_passes: u32,
        /// Name of the first identity, whose token is printed once.
        #[arg(long, default_value = "developer")]
        initial_identity: String,
    },
    /// Unseal an initialised vault with its passphrase and serve it.
    Serve {
        #[arg(long, env = "KHLANG_DATA_DIR")]
        data_dir: PathBuf,
        #[arg(long, env = "KHLANG_LISTEN", default_value = dev::DEFAULT_LISTEN)]
        listen: SocketAddr,
        #[command(flatten)]
        passphrase: PassphraseArgs,
        #[command(flatten)]
        tuning: Tuning,
    },
    /// Run on embedded defaults: a local folder, development unseal, a printed token. Not for real data.
    Dev {
        #[arg(long, default_value = dev::DEFAULT_LISTEN)]
        listen: SocketAddr,
        #[arg(long, default_value = dev::DEFAULT_DIR)]
        data_dir: PathBuf,
        #[command(flatten)]
        tuning: Tuning,
        /// Benchmark baseline only: store field values WITHOUT encryption, to measure what
        /// encryption costs. The data folder remembers this mode and an encrypted server refuses it.
        #[arg(long, hide = true)]
        bench_plaintext_baseline: bool,
    },
}

#[derive(Args)]
struct PassphraseArgs {
    /// Read the passphrase from this file (first line). Otherwise KHLANG_PASSPHRASE, otherwise a prompt.
    #[arg(long)]
    passphrase_file: Option<PathBuf>,
}

#[derive(Args)]
struct Tuning {
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
}

#[derive(Clone, Copy, ValueEnum)]
enum DurabilityArg {
    Group,
    PerRequest,
}

impl Tuning {
    fn options(&self, mode: CipherMode) -> VaultOptions {
        VaultOptions {
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
        }
    }
}

fn read_passphrase(args: &PassphraseArgs, confirm: bool) -> anyhow::Result<Zeroizing<String>> {
    let pass = if let Some(path) = &args.passphrase_file {
        let text = Zeroizing::new(
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read passphrase file {}", path.display()))?,
        );
        Zeroizing::new(text.lines().next().unwrap_or_default().to_owned())
    } else if let Ok(p) = std::env::var("KHLANG_PASSPHRASE") {
        Zeroizing::new(p)
    } else if std::io::stdin().is_terminal() {
        let p = Zeroizing::new(rpassword::prompt_password("Vault passphrase: ")?);
        if confirm {
            let again = Zeroizing::new(rpassword::prompt_password("Repeat passphrase: ")?);
            if *again != *p {
                bail!("the passphrases differ");
            }
        }
        p
    } else {
        bail!("no passphrase: use --passphrase-file, KHLANG_PASSPHRASE, or run in a terminal to be prompted");
    };
    if pass.is_empty() {
        bail!("the passphrase is empty");
    }
    Ok(pass)
}

async fn bind(listen: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(listen).await.with_context(|| format!("cannot listen on {listen}"))
}

async fn run(vault: Vault, listener: tokio::net::TcpListener) -> anyhow::Result<()> {
    tracing::info!(address = %listener.local_addr()?, "serving khlang.v1");
    grpc::serve(Arc::new(vault), listener, shutdown_signal()).await?;
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    tracing::info!("shutting down");
}

fn print_dev_banner(listen: SocketAddr, dir: &Path, creds: &dev::DevCredentials, baseline: bool) {
    println!("Khlang development vault — NOT for real data (its passphrase is public).");
    if baseline {
        println!("!! BENCHMARK BASELINE: field values are stored WITHOUT encryption !!");
    }
    println!("  data folder: {}", dir.display());
    println!("  listening:   http://{listen}");
    println!("  credentials: {}", dir.join(dev::CREDENTIALS_FILE).display());
    println!();
    println!("Connect with:");
    println!("  export KHLANG_ADDR=http://{listen}");
    for (name, token) in &creds.0 {
        println!("  export KHLANG_TOKEN={token}   # identity '{name}'");
    }
    println!();
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KHLANG_LOG").unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Init { data_dir, passphrase, argon2_memory_kib, argon2_passes, initial_identity } => {
            let pass = read_passphrase(&passphrase, true)?;
            let params = SealParams { m_cost: argon2_memory_kib, t_cost: argon2_passes, p_cost: 1 };
            let options = VaultOptions::default();
            Vault::init(&data_dir, pass.as_bytes(), params, &options)
                .with_context(|| format!("cannot initialise a vault in {}", data_dir.display()))?;
            let vault = Vault::open(&data_dir, pass.as_bytes(), &options, Arc::new(TracingAudit))?;
            let token = vault.issue_token(&initial_identity, DEVELOPER_ROLE).await?;
            println!("Initialised a vault in {}", data_dir.display());
            println!("Token for identity '{initial_identity}' (shown once; store it safely):");
            println!("{}", token.expose_secret());
        }
        Command::Serve { data_dir, listen, passphrase, tuning } => {
            let pass = read_passphrase(&passphrase, false)?;
            let vault = Vault::open(
                &data_dir,
                pass.as_bytes(),
                &tuning.options(CipherMode::Encrypted),
                Arc::new(TracingAudit),
            )
            .with_context(|| format!("cannot unseal the vault in {}", data_dir.display()))?;
            drop(pass);
            run(vault, bind(listen).await?).await?;
        }
        Command::Dev { listen, data_dir, tuning, bench_plaintext_baseline } => {
            let mode =
                if bench_plaintext_baseline { CipherMode::PlaintextBaseline } else { CipherMode::Encrypted };
            let (vault, creds) =
                dev::open_dev_vault(&data_dir, &tuning.options(mode), Arc::new(TracingAudit))
                    .await
                    .with_context(|| {
                        format!("cannot open the development vault in {}", data_dir.display())
                    })?;
            let listener = bind(listen).await?;
            print_dev_banner(listener.local_addr()?, &data_dir, &creds, bench_plaintext_baseline);
            drop(creds);
            run(vault, listener).await?;
        }
    }
    Ok(())
}
