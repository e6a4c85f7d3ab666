//! The Keys service: rotation, retirement, re-encryption and key status.

use super::*;

#[tonic::async_trait]
impl Keys for Api {
    #[tracing::instrument(skip_all, fields(rpc = Rpc::RotateKey.as_str()))]
    async fn rotate_key(
        &self,
        req: Request<pb::RotateKeyRequest>,
    ) -> Result<Response<pb::KeysStatus>, Status> {
        handle!(self, req, Rpc::RotateKey, |caller, _msg| self.vault.rotate(&caller).await.map(Into::into))
    }

    #[tracing::instrument(skip_all, fields(rpc = Rpc::KeyStatus.as_str()))]
    async fn key_status(
        &self,
        req: Request<pb::KeyStatusRequest>,
    ) -> Result<Response<pb::KeysStatus>, Status> {
        handle!(self, req, Rpc::KeyStatus, |caller, msg| self
            .vault
            .key_status(&caller, msg.count_data_keys)
            .await
            .map(Into::into))
    }

    #[tracing::instrument(skip_all, fields(rpc = Rpc::RetireKey.as_str()))]
    async fn retire_key(
        &self,
        req: Request<pb::RetireKeyRequest>,
    ) -> Result<Response<pb::RetireKeyResponse>, Status> {
        handle!(self, req, Rpc::RetireKey, |caller, msg| self
            .vault
            .retire(&caller, msg.version)
            .await
            .map(|()| pb::RetireKeyResponse {}))
    }

    #[tracing::instrument(skip_all, fields(rpc = Rpc::Reencrypt.as_str()))]
    async fn reencrypt(
        &self,
        req: Request<pb::ReencryptRequest>,
    ) -> Result<Response<pb::ReencryptResponse>, Status> {
        use pb::reencrypt_request::Target;
        handle!(self, req, Rpc::Reencrypt, |caller, msg| {
            let target = match msg.target {
                Some(Target::RecordId(id)) => Ok(ReencryptTarget::Record(id)),
                Some(Target::SubjectId(s)) => Ok(ReencryptTarget::Subject(s)),
                Some(Target::All(true)) => Ok(ReencryptTarget::All),
                _ => Err(VaultError::InvalidArgument("name a record_id, a subject_id, or all = true".into())),
            };
            match target {
                Ok(t) => {
                    self.vault.reencrypt(&caller, t).await.map(|records| pb::ReencryptResponse { records })
                }
                Err(e) => Err(e),
            }
        })
    }
}
