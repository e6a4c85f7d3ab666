//! The log on a store that holds one chain for every node ([`SharedChain`]): a node's requests
//! queue their entries (and changes) for one task, which appends whatever waits as one batch, in
//! one transaction under the chain head's lock (group commit: the lock and the WAL flush are paid
//! once per batch). Seqs and links are computed inside that transaction, from the head it locked,
//! so entries of all nodes interleave in one gap-free chain. The batch's head is tagged, and signed
//! when a checkpoint is due (by entries or by time, counted from the newest checkpoint any node
//! signed).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use khlang_keys::audit_chain::{Checkpoint, chain_hash};
use tokio::sync::{mpsc, oneshot};

use super::{AuditEntry, CheckpointPolicy, Committed, LogKeys, StoredCheckpoint, lock};
use crate::clock::now_ms;
use crate::storage::{AuditHead, ChainAppend, ChainTip, Changes, SharedChain};
use crate::{Outcome, StoreError, VaultError};

/// Most requests one batch carries (a bound on one transaction's size and lock time).
const MAX_BATCH: usize = 256;

/// What a node's requests hand the batcher.
enum Job {
    Entry(Box<AuditEntry>, Changes),
    /// Sign the head now if anything follows the newest checkpoint.
    Checkpoint,
}

struct Pending {
    job: Job,
    reply: oneshot::Sender<Result<Committed, VaultError>>,
}

/// What the batch task shares with the log.
pub(super) struct State {
    pub chain: Arc<dyn SharedChain>,
    pub keys: Arc<std::sync::Mutex<Option<LogKeys>>>,
    pub policy: CheckpointPolicy,
    /// Held across each batch; key retirement holds it to keep this node's commits off.
    pub order: Arc<tokio::sync::Mutex<()>>,
    /// Fault drill: every batch fails.
    pub failing: AtomicBool,
    /// The newest batch failed (the database away): health says NOT_SERVING until a batch or
    /// a probe of the chain succeeds.
    pub last_failed: AtomicBool,
    /// The newest head this node appended (a verification's known head: the database's head row
    /// may not go back before it).
    pub mine: std::sync::Mutex<Option<AuditHead>>,
    /// The operator's witness file, which every checkpoint this node signs is appended to.
    pub witness: Option<std::path::PathBuf>,
    /// This node's own record of the newest checkpoint it signed ([`super::NODE_WITNESS`]).
    pub node_witness: std::path::PathBuf,
    /// Where each entry is also streamed (best-effort).
    pub sink: Option<Arc<super::sink::AuditSink>>,
}

pub(super) struct Batcher {
    queue: mpsc::UnboundedSender<Pending>,
    pub state: Arc<State>,
}

impl Batcher {
    /// Starts the batch task (it ends when the log is dropped).
    pub fn start(state: State) -> Self {
        let state = Arc::new(state);
        let (queue, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(state.clone(), rx));
        Self { queue, state }
    }

    async fn send(&self, job: Job) -> Result<Committed, VaultError> {
        let (reply, answer) = oneshot::channel();
        self.queue.send(Pending { job, reply }).map_err(|_| VaultError::AuditUnavailable)?;
        answer.await.map_err(|_| VaultError::AuditUnavailable)?
    }

    pub async fn commit(&self, entry: AuditEntry, changes: Changes) -> Result<Committed, VaultError> {
        self.send(Job::Entry(Box::new(entry), changes)).await
    }

    pub async fn checkpoint(&self) -> Result<(), VaultError> {
        self.send(Job::Checkpoint).await.map(|_| ())
    }

    /// Appends a carried-forward break: chained from `anchor` (not from the damaged head), its
    /// checkpoints naming `anchor` next. Not batched: the integrity procedure runs it alone.
    pub async fn append_break(&self, mut entry: AuditEntry, anchor: Checkpoint) -> Result<u64, VaultError> {
        let _order = self.state.order.lock().await;
        let mut seq = 0;
        let mut seal = |tip: &ChainTip, _: &[bool]| -> Result<ChainAppend, StoreError> {
            entry.seq = tip.seq + 1;
            entry.damaged_to = tip.seq;
            entry.time_ms = now_ms();
            let canonical = entry.canonical()?;
            let hash = chain_hash(&anchor.hash, &canonical);
            seq = entry.seq;
            Ok(ChainAppend {
                entries: vec![(entry.seq, [hash.as_slice(), &canonical].concat())],
                tag: tag(&self.state, entry.seq, &hash),
                checkpoint: None,
                signed: Some((anchor.seq, entry.time_ms)),
                head: Some(AuditHead { seq: entry.seq, hash }),
            })
        };
        self.state.chain.append(vec![Changes::none()], &mut seal).await?;
        Ok(seq)
    }
}

/// Records a checkpoint this node signed (and the database committed) outside the database: in
/// the node's own file (replaced) and the operator's witness (appended). A few hundred bytes,
/// synced, once per checkpoint (every ten seconds by default). A failure is logged, not fatal:
/// the entries are committed already, and the database holds the checkpoint itself.
fn witness(state: &State, json: &[u8]) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let line = [json, b"\n"].concat();
    let tmp = state.node_witness.with_extension("json.tmp");
    // Private like the rest of the data folder (its checks refuse a file others may read).
    let private = |path: &std::path::Path, append: bool| {
        let mut o = std::fs::OpenOptions::new();
        o.create(true).mode(0o600);
        if append {
            o.append(true)
        } else {
            o.write(true).truncate(true)
        };
        o.open(path)
    };
    let replaced = (|| {
        let mut f = private(&tmp, false)?;
        f.write_all(&line)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &state.node_witness)
    })();
    if let Err(e) = replaced {
        tracing::error!(error = %e, path = %state.node_witness.display(), "could not record the signed head in this node's folder");
    }
    if let Some(path) = &state.witness {
        let appended = (|| {
            let mut f = private(path, true)?;
            f.write_all(&line)?;
            f.sync_all()
        })();
        if let Err(e) = appended {
            tracing::error!(error = %e, path = %path.display(), "could not append the signed head to the audit witness");
        }
    }
}

fn tag(state: &State, seq: u64, hash: &[u8; 32]) -> Option<Vec<u8>> {
    lock(&state.keys).as_ref().map(|k| k.tagger.tag(seq, hash).to_vec())
}

async fn run(state: Arc<State>, mut rx: mpsc::UnboundedReceiver<Pending>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let _order = state.order.lock().await;
        let results = commit_batch(&state, &mut batch).await;
        state.last_failed.store(results.is_err(), Ordering::Relaxed);
        answer(&state, batch, results).await;
    }
}

/// Answers each request; when the whole batch failed and held more than one, each is tried alone,
/// so one change the database refuses fails only its own request.
async fn answer(state: &State, batch: Vec<Pending>, results: Result<Vec<Option<u64>>, StoreError>) {
    match results {
        Ok(seqs) => {
            for (p, seq) in batch.into_iter().zip(seqs) {
                let _ = p.reply.send(Ok(seq.map_or(Committed::Conflict, Committed::Done)));
            }
        }
        Err(_) if batch.len() > 1 => {
            for p in batch {
                let mut one = vec![p];
                let result = commit_batch(state, &mut one).await;
                Box::pin(answer(state, one, result)).await;
            }
        }
        Err(e) => {
            for p in batch {
                let Pending { job, reply } = p;
                let _ = reply.send(Err(failed(state, job, e.clone()).await));
            }
        }
    }
}

/// A request whose batch could not be stored: a change is recorded as failed (its entry alone);
/// if even that cannot be written, the log is unavailable.
async fn failed(state: &State, job: Job, e: StoreError) -> VaultError {
    match job {
        Job::Entry(mut entry, changes) if !changes.is_empty() => {
            tracing::error!(error = %e, "a change and its audit entry could not be stored");
            entry.outcome = Outcome::Internal;
            entry.reason = "the change could not be stored".into();
            let mut one =
                vec![Pending { job: Job::Entry(entry, Changes::none()), reply: oneshot::channel().0 }];
            match commit_batch(state, &mut one).await {
                Ok(_) => e.into(),
                Err(_) => super::unavailable(e),
            }
        }
        _ => super::unavailable(e),
    }
}

/// Appends one batch; returns each request's seq (`None`: its change set conflicted and nothing of
/// it was written).
async fn commit_batch(state: &State, batch: &mut [Pending]) -> Result<Vec<Option<u64>>, StoreError> {
    if state.failing.load(Ordering::Relaxed) {
        return Err(StoreError::Flush("audit append failure injected".into()));
    }
    let mut sets = Vec::with_capacity(batch.len());
    let mut force = false;
    for p in batch.iter_mut() {
        match &mut p.job {
            Job::Entry(_, changes) => sets.push(std::mem::replace(changes, Changes::none())),
            Job::Checkpoint => {
                force = true;
                sets.push(Changes::none());
            }
        }
    }
    let mut seqs = vec![None; batch.len()];
    let every = state.policy.every;
    let every_entries = state.policy.every_entries;
    let mut head = None;
    let mut seal = |tip: &ChainTip, applied: &[bool]| -> Result<ChainAppend, StoreError> {
        let (mut seq, mut hash) = (tip.seq, tip.hash);
        let now = now_ms();
        let mut out = ChainAppend::default();
        for (i, p) in batch.iter_mut().enumerate() {
            seqs[i] = None;
            let Job::Entry(entry, _) = &mut p.job else { continue };
            if !applied[i] {
                continue;
            }
            seq += 1;
            entry.seq = seq;
            entry.time_ms = now;
            entry.bound();
            let canonical = entry.canonical()?;
            hash = chain_hash(&hash, &canonical);
            out.entries.push((seq, [hash.as_slice(), &canonical].concat()));
            seqs[i] = Some(seq);
        }
        head = (!out.entries.is_empty()).then_some(AuditHead { seq, hash });
        let keys = lock(&state.keys);
        let Some(keys) = keys.as_ref() else { return Ok(out) };
        if !out.entries.is_empty() {
            out.tag = Some(keys.tagger.tag(seq, &hash).to_vec());
        }
        let due = seq.saturating_sub(tip.signed_seq) >= every_entries
            || Duration::from_millis(now.saturating_sub(tip.signed_ms)) >= every
            || force;
        if due && seq > tip.signed_seq {
            let cp = keys
                .signer
                .sign_checkpoint(seq, &hash, now, tip.signed_seq)
                .map_err(|_| StoreError::Corrupt("checkpoint (sign)"))?;
            let json = serde_json::to_vec(&StoredCheckpoint::from_checkpoint(&cp))
                .map_err(|_| StoreError::Corrupt("checkpoint (encode)"))?;
            out.checkpoint = Some(json);
            out.signed = Some((seq, now));
        }
        Ok(out)
    };
    let mut signed = None;
    let mut sealed: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut seal = |tip: &ChainTip, applied: &[bool]| {
        let out = seal(tip, applied)?;
        signed.clone_from(&out.checkpoint);
        if state.sink.is_some() {
            sealed.clone_from(&out.entries);
        }
        Ok(out)
    };
    let applied = state.chain.append(sets, &mut seal).await?;
    if let Some(sink) = &state.sink {
        let now = now_ms();
        for (seq, value) in &sealed {
            sink.send(*seq, now, value.get(32..).unwrap_or_default());
        }
    }
    if let Some(json) = signed {
        witness(state, &json);
    }
    if let Some(head) = head {
        let mut mine = lock(&state.mine);
        if mine.is_none_or(|m| m.seq < head.seq) {
            *mine = Some(head);
        }
    }
    Ok(applied.iter().zip(seqs).map(|(ok, seq)| if *ok { seq } else { None }).collect())
}
