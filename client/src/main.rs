//! `khlang`: the command-line client. Errors print the status code and message and exit non-zero.
#![forbid(unsafe_code)]

mod bench;
mod cli;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use khlang_client::Client;

use cli::{Cli, Command};

async fn connect(cli: &Cli) -> anyhow::Result<Client> {
    let token = cli.token.as_deref().context("no token: set KHLANG_TOKEN or pass --token")?;
    Ok(Client::connect(&cli.addr, token).await?)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut client = connect(&cli).await?;
    match cli.command {
        Command::Put { subject, fields } => {
            println!("{}", client.put(&subject, fields).await?);
        }
        Command::Get { record_id, fields, purpose, json } => {
            let record = client.get(&record_id, &fields, purpose.as_deref()).await?;
            if json {
                let obj: serde_json::Map<String, serde_json::Value> = record
                    .fields
                    .iter()
                    .map(|(k, v)| (k.clone(), serde_json::Value::String(v.expose_secret().to_owned())))
                    .collect();
                println!("{}", serde_json::Value::Object(obj));
            } else {
                let width = record.fields.keys().map(String::len).max().unwrap_or(0);
                for (name, value) in &record.fields {
                    println!("{name:<width$}  {}", value.expose_secret());
                }
            }
        }
        Command::Update { record_id, fields, remove } => {
            let names = client.update(&record_id, fields, &remove).await?;
            println!("{}", names.join(","));
        }
        Command::Delete { record_id } => {
            client.delete(&record_id).await?;
            println!("deleted {record_id}");
        }
        Command::List { subject, json } => {
            let records = client.list(&subject).await?;
            if json {
                let rows: Vec<_> = records
                    .iter()
                    .map(|r| serde_json::json!({"record_id": r.record_id, "fields": r.field_names}))
                    .collect();
                println!("{}", serde_json::Value::Array(rows));
            } else {
                for r in &records {
                    println!("{}  {}", r.record_id, r.field_names.join(","));
                }
            }
        }
        Command::Bench { op, concurrency, duration, warmup, records, json } => {
            let report = bench::run(
                client,
                op,
                concurrency,
                Duration::from_secs_f64(warmup.max(0.0)),
                Duration::from_secs_f64(duration.max(0.1)),
                records,
            )
            .await?;
            if json {
                println!("{}", report.to_json());
            } else {
                println!(
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
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
