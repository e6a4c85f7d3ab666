//! `khlang bench`: a closed-loop load generator. N workers each keep one request in flight for a
//! fixed time; latencies are collected per worker and merged for percentiles.

use std::time::{Duration, Instant};

use khlang_client::{Client, ClientError, NewRecord};

use crate::cli::BenchOp;

/// The same eight fields for every run, so encrypted and baseline servers move the same bytes.
pub const SAMPLE_FIELDS: &[(&str, &str)] = &[
    ("name", "สมชาย ใจดี"),
    ("email", "somchai.bench@example.go.th"),
    ("phone", "+66 81 234 5678"),
    ("home_address", "99/1 ถนนราชดำเนิน ตำบลในเมือง อำเภอเมืองนครศรีธรรมราช"),
    ("postal_code", "80000"),
    ("card_number", "4111111111111111"),
    ("billing_address", "99/1 Ratchadamnoen Rd, Nakhon Si Thammarat"),
    ("national_id", "1101700203450"),
];

#[derive(Debug)]
pub struct Report {
    pub op: BenchOp,
    pub concurrency: usize,
    pub seconds: f64,
    pub ok: u64,
    pub errors: u64,
    /// Microseconds, sorted.
    latencies: Vec<u32>,
}

impl Report {
    pub fn ops_per_sec(&self) -> f64 {
        self.ok as f64 / self.seconds
    }

    /// Latency at quantile `q` (0..1), in milliseconds.
    pub fn percentile_ms(&self, q: f64) -> f64 {
        if self.latencies.is_empty() {
            return 0.0;
        }
        let idx = ((self.latencies.len() as f64 * q).ceil() as usize).clamp(1, self.latencies.len()) - 1;
        f64::from(self.latencies[idx]) / 1000.0
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "op": format!("{:?}", self.op).to_lowercase(),
            "concurrency": self.concurrency,
            "seconds": self.seconds,
            "ok": self.ok,
            "errors": self.errors,
            "ops_per_sec": self.ops_per_sec(),
            "p50_ms": self.percentile_ms(0.50),
            "p99_ms": self.percentile_ms(0.99),
            "p999_ms": self.percentile_ms(0.999),
        })
    }
}

async fn one(
    client: &mut Client,
    op: BenchOp,
    ids: &[String],
    purpose: &str,
    fields: &[String],
    n: usize,
    worker: usize,
) -> Result<u64, ClientError> {
    match op {
        BenchOp::Put => {
            client.put(&format!("bench-subject-{worker}-{n}"), SAMPLE_FIELDS.iter().copied()).await.map(|_| 1)
        }
        BenchOp::PutMany => {
            let records: Vec<NewRecord> = (0..PUT_MANY_BATCH)
                .map(|i| NewRecord {
                    subject: format!("bench-subject-{worker}-{n}-{i}"),
                    fields: SAMPLE_FIELDS.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
                })
                .collect();
            let outcomes = client.put_many(&records, false).await?;
            Ok(outcomes.iter().filter(|o| matches!(o, khlang_client::PutOutcome::Stored(_))).count() as u64)
        }
        BenchOp::Get => client
            .get(&ids[(n * 7919 + worker * 104_729) % ids.len()], fields, Some(purpose))
            .await
            .map(|_| 1),
        BenchOp::List => client.list("bench-nobody").await.map(|_| 1),
    }
}

/// Records per `PutRecords` request of a `put-many` run (the measure: batches of 500).
pub const PUT_MANY_BATCH: usize = 500;

/// What one benchmark run does.
#[derive(Debug, Clone)]
pub struct Plan {
    pub op: BenchOp,
    pub concurrency: usize,
    pub warmup: Duration,
    pub duration: Duration,
    /// Records written before a `get` run.
    pub records: usize,
    pub purpose: String,
    pub fields: Vec<String>,
}

/// Runs `plan` with `clients` (one per connection; worker `w` uses connection `w mod n`);
/// `prefill` (default: the first) writes the records a `get` run reads.
pub async fn run(clients: Vec<Client>, plan: Plan, prefill: Option<Client>) -> Result<Report, ClientError> {
    let Plan { op, concurrency, warmup, duration, records, purpose, fields } = plan;
    let concurrency = concurrency.max(1);
    let Some(first) = clients.first().cloned() else {
        return Err(ClientError::InvalidAddress("no connection to benchmark".into()));
    };
    let ids = if op == BenchOp::Get {
        let mut c = prefill.unwrap_or_else(|| first.clone());
        let mut ids = Vec::with_capacity(records.max(1));
        for i in 0..records.max(1) {
            ids.push(c.put(&format!("bench-get-{i}"), SAMPLE_FIELDS.iter().copied()).await?);
        }
        ids
    } else {
        Vec::new()
    };
    let ids = std::sync::Arc::new(ids);
    let start = Instant::now();
    let measure_from = start + warmup;
    let stop_at = measure_from + duration;
    let mut tasks = Vec::with_capacity(concurrency);
    for worker in 0..concurrency {
        let mut client = clients[worker % clients.len()].clone();
        let ids = ids.clone();
        let purpose = purpose.clone();
        let fields = fields.clone();
        tasks.push(tokio::spawn(async move {
            let (mut lat, mut ok, mut errors) = (Vec::with_capacity(1 << 16), 0u64, 0u64);
            let mut n = 0usize;
            loop {
                let t0 = Instant::now();
                if t0 >= stop_at {
                    break;
                }
                let result = one(&mut client, op, &ids, &purpose, &fields, n, worker).await;
                n += 1;
                if t0 < measure_from {
                    continue;
                }
                match result {
                    Ok(records) => {
                        ok += records;
                        lat.push(t0.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                    }
                    Err(_) => errors += 1,
                }
            }
            (lat, ok, errors)
        }));
    }
    let (mut latencies, mut ok, mut errors) = (Vec::new(), 0, 0);
    for t in tasks {
        // A worker only panics on a bug; count its work as lost rather than abort the report.
        if let Ok((l, o, e)) = t.await {
            latencies.extend(l);
            ok += o;
            errors += e;
        }
    }
    latencies.sort_unstable();
    Ok(Report { op, concurrency, seconds: duration.as_secs_f64(), ok, errors, latencies })
}
