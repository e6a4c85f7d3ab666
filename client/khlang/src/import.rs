//! `khlang import FILE.jsonl`: loads records in batches (`PutRecords`), several batches in flight,
//! with a progress bar on stderr and a position it can resume from.
//!
//! Each line is one record: `{"subject_id": "…", "fields": {"name": "…", …}}`. Beside the input it
//! keeps `FILE.jsonl.ids` (`line<TAB>record id` for each record stored), `FILE.jsonl.refused`
//! (`line<TAB>status<TAB>why`, never a value) and `FILE.jsonl.progress` (how many lines are done,
//! written after their answers are). Run again, it goes on after the last line done; a batch
//! whose answer was not recorded (the importer killed while it was in flight) is sent again, so
//! at most the batches in flight then may be stored twice (their ids are then in `.ids` once).

use std::collections::VecDeque;
use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use khlang_client::{Client, NewRecord, PutOutcome};

/// What `khlang import` was asked to do.
pub struct Plan {
    pub file: PathBuf,
    pub batch: usize,
    pub parallel: usize,
    pub restart: bool,
}

/// What an import did (this run).
#[derive(Debug, Default)]
pub struct Summary {
    pub lines: u64,
    pub stored: u64,
    pub refused: u64,
    pub skipped: u64,
    pub seconds: f64,
}

#[derive(serde::Deserialize)]
struct Line {
    subject_id: String,
    fields: std::collections::BTreeMap<String, String>,
}

fn beside(file: &Path, suffix: &str) -> PathBuf {
    let mut name = file.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// The position a previous run recorded: lines done, and the input's length then (an input that
/// changed since is refused rather than resumed at a wrong line).
#[derive(serde::Serialize, serde::Deserialize)]
struct Progress {
    lines_done: u64,
    input_bytes: u64,
}

fn read_progress(path: &Path) -> anyhow::Result<Option<Progress>> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(
            serde_json::from_slice(&bytes)
                .with_context(|| format!("{} is not a progress file", path.display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Written to a temporary name and renamed: a kill leaves the old position or the new one.
fn write_progress(path: &Path, p: &Progress) -> anyhow::Result<()> {
    let tmp = beside(path, ".tmp");
    std::fs::write(&tmp, serde_json::to_vec(p)?)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

fn append(path: &Path) -> anyhow::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))
}

/// A batch on its way: its first line number and, per line, the record or why it was not sent.
type Sent = tokio::task::JoinHandle<anyhow::Result<(u64, Vec<Result<PutOutcome, String>>)>>;

pub async fn run(client: Client, plan: Plan) -> anyhow::Result<Summary> {
    if plan.batch == 0 || plan.parallel == 0 {
        bail!("--batch and --parallel must be at least 1");
    }
    let file =
        std::fs::File::open(&plan.file).with_context(|| format!("cannot open {}", plan.file.display()))?;
    let input_bytes = file.metadata()?.len();
    let total = std::io::BufReader::new(&file).lines().count() as u64;
    let progress_path = beside(&plan.file, ".progress");
    let done_before = match (plan.restart, read_progress(&progress_path)?) {
        (false, Some(p)) if p.input_bytes != input_bytes => bail!(
            "{} changed since the import recorded in {} (pass --restart to import it from the start)",
            plan.file.display(),
            progress_path.display()
        ),
        (false, Some(p)) => p.lines_done,
        _ => 0,
    };
    let mut ids = append(&beside(&plan.file, ".ids"))?;
    let mut refused_out = append(&beside(&plan.file, ".refused"))?;
    let mut reader = std::io::BufReader::new(
        std::fs::File::open(&plan.file).with_context(|| format!("cannot open {}", plan.file.display()))?,
    )
    .lines();
    let mut summary = Summary { skipped: done_before, ..Summary::default() };
    for _ in 0..done_before {
        reader.next().transpose()?;
    }
    let started = Instant::now();
    let mut bar = Bar::new(total, done_before);
    let mut in_flight: VecDeque<Sent> = VecDeque::new();
    let mut next_line = done_before + 1;
    let mut done = done_before;
    loop {
        // Fill the pipeline.
        while in_flight.len() < plan.parallel {
            let first = next_line;
            let mut batch: Vec<Result<NewRecord, String>> = Vec::with_capacity(plan.batch);
            for line in reader.by_ref().take(plan.batch) {
                let line = line.with_context(|| format!("cannot read {}", plan.file.display()))?;
                batch.push(
                    serde_json::from_str::<Line>(&line)
                        .map(|l| NewRecord { subject: l.subject_id, fields: l.fields.into_iter().collect() })
                        .map_err(|_| "not a JSON object with subject_id and fields".to_owned()),
                );
            }
            if batch.is_empty() {
                break;
            }
            next_line += batch.len() as u64;
            let mut client = client.clone();
            in_flight.push_back(tokio::spawn(async move {
                let records: Vec<NewRecord> = batch.iter().filter_map(|r| r.as_ref().ok().cloned()).collect();
                let mut answers = if records.is_empty() {
                    Vec::new()
                } else {
                    client.put_many(&records, false).await.context("the vault refused a batch")?
                }
                .into_iter();
                let per_line = batch
                    .into_iter()
                    .map(|r| match r {
                        Ok(_) => answers.next().ok_or_else(|| "no answer for this record".to_owned()),
                        Err(why) => Err(why),
                    })
                    .collect();
                Ok((first, per_line))
            }));
        }
        let Some(oldest) = in_flight.pop_front() else { break };
        let (first, per_line) = oldest.await.context("an import task failed")??;
        for (i, outcome) in per_line.into_iter().enumerate() {
            let line = first + i as u64;
            match outcome {
                Ok(PutOutcome::Stored(id)) => {
                    writeln!(ids, "{line}\t{id}")?;
                    summary.stored += 1;
                }
                Ok(PutOutcome::Refused(code, why)) => {
                    writeln!(refused_out, "{line}\t{code:?}\t{}", why.replace(['\t', '\n'], " "))?;
                    summary.refused += 1;
                }
                Err(why) => {
                    writeln!(refused_out, "{line}\tInvalidArgument\t{why}")?;
                    summary.refused += 1;
                }
            }
            done = line;
        }
        ids.flush()?;
        refused_out.flush()?;
        ids.sync_data()?;
        refused_out.sync_data()?;
        write_progress(&progress_path, &Progress { lines_done: done, input_bytes })?;
        bar.show(done, started.elapsed());
    }
    bar.finish(done, started.elapsed());
    summary.lines = done - done_before;
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

/// `[#####-----]  41%  410000/1000000 lines  38512 rec/s  ETA 15 s` on stderr: redrawn in place
/// on a terminal, a line every few seconds otherwise.
struct Bar {
    total: u64,
    from: u64,
    terminal: bool,
    last: Option<Instant>,
}

impl Bar {
    fn new(total: u64, from: u64) -> Self {
        Self { total, from, terminal: std::io::stderr().is_terminal(), last: None }
    }

    fn line(&self, done: u64, elapsed: Duration) -> String {
        let share = if self.total == 0 { 1.0 } else { done as f64 / self.total as f64 };
        let filled = (share * 30.0).round() as usize;
        let rate = (done - self.from) as f64 / elapsed.as_secs_f64().max(1e-3);
        let eta = if rate > 0.0 { (self.total.saturating_sub(done)) as f64 / rate } else { 0.0 };
        format!(
            "[{}{}] {:>3.0}%  {done}/{} lines  {rate:.0} rec/s  ETA {eta:.0} s",
            "#".repeat(filled.min(30)),
            "-".repeat(30 - filled.min(30)),
            share * 100.0,
            self.total
        )
    }

    fn show(&mut self, done: u64, elapsed: Duration) {
        let every = if self.terminal { Duration::from_millis(100) } else { Duration::from_secs(5) };
        if self.last.is_some_and(|l| l.elapsed() < every) {
            return;
        }
        self.last = Some(Instant::now());
        let line = self.line(done, elapsed);
        if self.terminal {
            eprint!("\r{line}");
        } else {
            eprintln!("{line}");
        }
    }

    fn finish(&mut self, done: u64, elapsed: Duration) {
        let line = self.line(done, elapsed);
        if self.terminal {
            eprintln!("\r{line}");
        } else {
            eprintln!("{line}");
        }
    }
}
