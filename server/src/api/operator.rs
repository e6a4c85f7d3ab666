//! The Operator service: seal status, unsealing, passphrases, sealing and the rekey ceremony.

use super::*;

impl From<SealStatus> for pb::SealState {
    fn from(s: SealStatus) -> Self {
        Self {
            sealed: s.sealed,
            threshold: s.threshold.into(),
            custodians: s.custodians.into(),
            received: s.received.into_iter().map(u32::from).collect(),
            rekey: s.rekey.map(Into::into),
        }
    }
}

impl From<RekeyStatus> for pb::RekeyStatus {
    fn from(s: RekeyStatus) -> Self {
        Self {
            nonce: s.nonce.unwrap_or_default(),
            threshold: s.threshold.into(),
            custodians: s.custodians.into(),
            passphrases_set: s.passphrases_set.into_iter().map(u32::from).collect(),
            approved: s.approved.into_iter().map(u32::from).collect(),
            approvals_needed: s.approvals_needed.into(),
            started_by: s.started_by,
            expires_ms: s.expires_ms,
            done: s.done,
            slots: s
                .slots
                .into_iter()
                .map(|slot| pb::RekeySlot {
                    custodian: slot.custodian.into(),
                    holder: slot.holder,
                    set: slot.set,
                })
                .collect(),
        }
    }
}

impl From<JobStatus> for pb::KeyJob {
    fn from(j: JobStatus) -> Self {
        let (kind, target_version) = match j.kind {
            JobKind::Rewrap { target } => ("rewrap", target),
            JobKind::Reencrypt => ("reencrypt", 0),
        };
        Self {
            kind: kind.into(),
            target_version,
            changed: j.changed,
            skipped: j.skipped,
            total: j.total,
            started_ms: j.started_ms,
            finished_ms: j.finished_ms.unwrap_or(0),
            requested_by: j.requested_by,
            rate_per_sec: j.rate_per_sec,
            eta_secs: j.eta_secs,
        }
    }
}

impl From<KeyStatus> for pb::KeysStatus {
    fn from(k: KeyStatus) -> Self {
        Self {
            versions: k
                .versions
                .into_iter()
                .map(|v| pb::KeyVersion {
                    version: v.version,
                    state: v.state.as_str().into(),
                    created_ms: v.created_ms,
                    retired_ms: v.retired_ms.unwrap_or(0),
                    data_keys: v.data_keys,
                    overdue: v.overdue,
                })
                .collect(),
            job: k.job.map(Into::into),
            cryptoperiod_days: k.cryptoperiod_days,
        }
    }
}

impl From<IdentityRequest> for pb::IdentityRequest {
    fn from(r: IdentityRequest) -> Self {
        Self {
            id: r.id,
            name: r.name,
            role: r.role,
            requested_by: r.requested_by,
            requested_ms: r.requested_ms,
            expires_ms: r.expires_ms,
        }
    }
}

fn custodian_in(n: u32) -> Result<u8, VaultError> {
    u8::try_from(n).map_err(|_| VaultError::InvalidArgument(format!("custodian {n} does not exist")))
}

/// Runs a custodian's call (Argon2id, slow on purpose) off the async runtime. These calls carry
/// no token: the passphrase is the credential, and the vault audits each attempt itself.
/// A custodian's step of the rekey ceremony (nonce, custodian number, passphrase; a new share's
/// passphrase also with its holder's token, an approval with none).
struct CeremonyCall {
    request_id: String,
    client_id: String,
    peer: Option<std::net::SocketAddr>,
}

/// The ceremony step a custodian takes with their passphrase.
#[derive(Clone)]
enum CeremonyStep {
    /// By the identity named (authenticated) for the share.
    Passphrase {
        holder: String,
    },
    Approve,
}

impl CeremonyCall {
    fn of<T>(req: &Request<T>) -> Self {
        Self { request_id: request_id(req), client_id: client_request_id(req), peer: req.remote_addr() }
    }

    async fn run(
        self,
        vault: &Arc<Vault>,
        nonce: String,
        custodian: u32,
        passphrase: String,
        step: CeremonyStep,
    ) -> Result<Response<pb::RekeyStatus>, Status> {
        let (nonce, passphrase) = (Zeroizing::new(nonce), Zeroizing::new(passphrase));
        let Self { request_id, client_id, peer } = self;
        let rid = request_id.clone();
        let out = custodian_call(vault, &request_id, peer, move |v| async move {
            let custodian = custodian_in(custodian)?;
            match step {
                CeremonyStep::Passphrase { holder } => {
                    v.rekey_passphrase(
                        &nonce,
                        custodian,
                        passphrase.as_bytes(),
                        &holder,
                        peer,
                        &rid,
                        &client_id,
                    )
                    .await
                }
                CeremonyStep::Approve => {
                    v.rekey_approve(&nonce, custodian, passphrase.as_bytes(), peer, &rid, &client_id).await
                }
            }
        })
        .await?;
        if out.done {
            // A new root key: a key job waiting for the keys may go on.
            vault.job_signal.notify_one();
        }
        Ok(stamped(out.into(), &request_id))
    }
}

/// A wrong passphrase or nonce is a failure of its address too: the answer waits its turn. The
/// call derives from a passphrase (Argon2id, tens of milliseconds of CPU), so it runs on the
/// blocking pool, driving its own store calls there.
async fn custodian_call<T: Send + 'static, F: std::future::Future<Output = Result<T, VaultError>>>(
    vault: &Arc<Vault>,
    request_id: &str,
    peer: Option<std::net::SocketAddr>,
    call: impl FnOnce(Arc<Vault>) -> F + Send + 'static,
) -> Result<T, Status> {
    let v = vault.clone();
    let runtime = tokio::runtime::Handle::current();
    let result = tokio::task::spawn_blocking(move || runtime.block_on(call(v)))
        .await
        .map_err(|_| Status::internal(format!("internal error (request id {request_id})")))?;
    match result {
        Ok(value) => Ok(value),
        Err(VaultError::PermissionDenied(m)) => {
            let wait = vault.failure_answer_delay(peer.map(|p| p.ip())).map_err(|e| status(e, request_id))?;
            tokio::time::sleep(wait).await;
            Err(status(VaultError::PermissionDenied(m), request_id))
        }
        Err(e) => Err(status(e, request_id)),
    }
}

/// How much of a backup file one message carries.
const BACKUP_CHUNK: usize = 256 * 1024;

#[tonic::async_trait]
impl Operator for Api {
    type BackupStream = super::audit::Stream<pb::BackupChunk>;

    #[tracing::instrument(skip_all, fields(rpc = Rpc::Backup.as_str()))]
    async fn backup(&self, req: Request<pb::BackupRequest>) -> Result<Response<Self::BackupStream>, Status> {
        let caller = self.caller(&req, Rpc::Backup).await?;
        let (mut file, report) =
            self.vault.backup(&caller).await.map_err(|e| status(e, &caller.request_id))?;
        tracing::info!(
            audit_seq = report.header.audit_seq,
            records = report.records,
            bytes = report.bytes,
            commits_held_ms = report.held.as_millis() as u64,
            by = %caller.identity.name,
            "backup taken"
        );
        let stream =
            super::audit::stream_blocking(self.vault.clone(), caller.request_id.clone(), move |_, send| {
                use std::io::{Read, Seek};
                let unreadable = |e: std::io::Error| {
                    Err(crate::StoreError::Io(format!("cannot read the backup: {e}")).into())
                };
                if let Err(e) = file.rewind() {
                    send(unreadable(e));
                    return;
                }
                let mut buf = vec![0u8; BACKUP_CHUNK];
                loop {
                    match file.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            if !send(Ok(pb::BackupChunk { data: buf[..n].to_vec() })) {
                                break;
                            }
                        }
                        Err(e) => {
                            send(unreadable(e));
                            break;
                        }
                    }
                }
            });
        Ok(respond(stream, &caller))
    }

    #[tracing::instrument(skip_all, fields(rpc = Rpc::SealStatus.as_str()))]
    async fn seal_status(
        &self,
        req: Request<pb::SealStatusRequest>,
    ) -> Result<Response<pb::SealState>, Status> {
        let (request_id, client_id, peer) = (request_id(&req), client_request_id(&req), req.remote_addr());
        let rid = request_id.clone();
        let out = custodian_call(&self.vault, &request_id, peer, move |v| async move {
            v.seal_status_audited(peer, &rid, &client_id).await
        })
        .await?;
        Ok(stamped(out.into(), &request_id))
    }

    #[tracing::instrument(skip_all, fields(rpc = Rpc::Unseal.as_str()))]
    async fn unseal(&self, req: Request<pb::UnsealRequest>) -> Result<Response<pb::SealState>, Status> {
        let (request_id, client_id, peer) = (request_id(&req), client_request_id(&req), req.remote_addr());
        let msg = req.into_inner();
        let passphrase = Zeroizing::new(msg.passphrase);
        let rid = request_id.clone();
        let out = custodian_call(&self.vault, &request_id, peer, move |v| async move {
            v.unseal_with(custodian_in(msg.custodian)?, passphrase.as_bytes(), peer, &rid, &client_id).await
        })
        .await?;
        Ok(stamped(out.into(), &request_id))
    }

    #[tracing::instrument(skip_all, fields(rpc = Rpc::ChangePassphrase.as_str()))]
    async fn change_passphrase(
        &self,
        req: Request<pb::ChangePassphraseRequest>,
    ) -> Result<Response<pb::ChangePassphraseResponse>, Status> {
        let (request_id, client_id, peer) = (request_id(&req), client_request_id(&req), req.remote_addr());
        let msg = req.into_inner();
        let (old, new) = (Zeroizing::new(msg.old_passphrase), Zeroizing::new(msg.new_passphrase));
        let rid = request_id.clone();
        custodian_call(&self.vault, &request_id, peer, move |v| async move {
            v.change_passphrase(
                custodian_in(msg.custodian)?,
                old.as_bytes(),
                new.as_bytes(),
                peer,
                &rid,
                &client_id,
            )
            .await
        })
        .await?;
        Ok(stamped(pb::ChangePassphraseResponse {}, &request_id))
    }

    #[tracing::instrument(skip_all, fields(rpc = Rpc::Seal.as_str()))]
    async fn seal(&self, req: Request<pb::SealRequest>) -> Result<Response<pb::SealState>, Status> {
        handle!(self, req, Rpc::Seal, |caller, _msg| self.vault.seal(&caller).await.map(Into::into))
    }

    #[tracing::instrument(skip_all, fields(rpc = Rpc::Rekey.as_str()))]
    async fn rekey(&self, req: Request<pb::RekeyRequest>) -> Result<Response<pb::RekeyStatus>, Status> {
        handle!(self, req, Rpc::Rekey, |caller, msg| {
            match (u8::try_from(msg.threshold), u8::try_from(msg.custodians)) {
                (Ok(threshold), Ok(custodians)) => {
                    self.vault.start_rekey(&caller, threshold, custodians, &msg.holders).await.map(Into::into)
                }
                _ => Err(VaultError::InvalidArgument("at most 255 custodians".into())),
            }
        })
    }

    #[tracing::instrument(skip_all, fields(rpc = Rpc::RekeyPassphrase.as_str()))]
    async fn rekey_passphrase(
        &self,
        req: Request<pb::RekeyPassphraseRequest>,
    ) -> Result<Response<pb::RekeyStatus>, Status> {
        // Only the identity the share is bound to: its token is checked (and a refusal audited)
        // before any passphrase is looked at.
        let holder = self.caller(&req, Rpc::RekeyPassphrase).await?.identity.name;
        let call = CeremonyCall::of(&req);
        let msg = req.into_inner();
        call.run(&self.vault, msg.nonce, msg.custodian, msg.passphrase, CeremonyStep::Passphrase { holder })
            .await
    }

    #[tracing::instrument(skip_all, fields(rpc = Rpc::RekeyApprove.as_str()))]
    async fn rekey_approve(
        &self,
        req: Request<pb::RekeyApproveRequest>,
    ) -> Result<Response<pb::RekeyStatus>, Status> {
        let call = CeremonyCall::of(&req);
        let msg = req.into_inner();
        call.run(&self.vault, msg.nonce, msg.custodian, msg.passphrase, CeremonyStep::Approve).await
    }

    #[tracing::instrument(skip_all, fields(rpc = Rpc::RekeyCancel.as_str()))]
    async fn rekey_cancel(
        &self,
        req: Request<pb::RekeyCancelRequest>,
    ) -> Result<Response<pb::RekeyStatus>, Status> {
        handle!(self, req, Rpc::RekeyCancel, |caller, _msg| self
            .vault
            .cancel_rekey(&caller)
            .await
            .map(Into::into))
    }
}
