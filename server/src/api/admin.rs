//! The Admin service: identities, their requests and tokens, the regulations in force.

use super::*;

#[tonic::async_trait]
impl Admin for Api {
    #[tracing::instrument(skip_all, fields(rpc = Rpc::CreateIdentity.as_str()))]
    async fn create_identity(
        &self,
        req: Request<pb::CreateIdentityRequest>,
    ) -> Result<Response<pb::CreateIdentityResponse>, Status> {
        handle!(self, req, Rpc::CreateIdentity, |caller, msg| {
            let created = self.vault.create_identity(&caller, &msg.name, &msg.role).await;
            created.map(|c| match c {
                IdentityCreation::Created(t) => pb::CreateIdentityResponse {
                    token: t.expose_secret().to_owned(),
                    name: msg.name.clone(),
                    pending: None,
                },
                IdentityCreation::Pending(r) => pb::CreateIdentityResponse {
                    token: String::new(),
                    name: msg.name.clone(),
                    pending: Some(r.into()),
                },
            })
        })
    }

    #[tracing::instrument(skip_all, fields(rpc = Rpc::ApproveIdentity.as_str()))]
    async fn approve_identity(
        &self,
        req: Request<pb::ApproveIdentityRequest>,
    ) -> Result<Response<pb::CreateIdentityResponse>, Status> {
        handle!(self, req, Rpc::ApproveIdentity, |caller, msg| {
            let token = self.vault.approve_identity(&caller, &msg.request_id).await;
            token.map(|t| pb::CreateIdentityResponse {
                token: t.expose_secret().to_owned(),
                name: String::new(),
                pending: None,
            })
        })
    }

    #[tracing::instrument(skip_all, fields(rpc = Rpc::RefuseIdentity.as_str()))]
    async fn refuse_identity(
        &self,
        req: Request<pb::RefuseIdentityRequest>,
    ) -> Result<Response<pb::RefuseIdentityResponse>, Status> {
        handle!(self, req, Rpc::RefuseIdentity, |caller, msg| {
            self.vault
                .refuse_identity(&caller, &msg.request_id, &msg.reason)
                .await
                .map(|()| pb::RefuseIdentityResponse {})
        })
    }

    #[tracing::instrument(skip_all, fields(rpc = Rpc::ListIdentityRequests.as_str()))]
    async fn list_identity_requests(
        &self,
        req: Request<pb::ListIdentityRequestsRequest>,
    ) -> Result<Response<pb::ListIdentityRequestsResponse>, Status> {
        handle!(self, req, Rpc::ListIdentityRequests, |caller, _msg| {
            self.vault.identity_requests(&caller).await.map(|list| pb::ListIdentityRequestsResponse {
                requests: list.into_iter().map(Into::into).collect(),
            })
        })
    }

    #[tracing::instrument(skip_all, fields(rpc = Rpc::ListIdentities.as_str()))]
    async fn list_identities(
        &self,
        req: Request<pb::ListIdentitiesRequest>,
    ) -> Result<Response<pb::ListIdentitiesResponse>, Status> {
        handle!(self, req, Rpc::ListIdentities, |caller, _msg| {
            self.vault.list_identities(&caller).await.map(|ids| pb::ListIdentitiesResponse {
                identities: ids
                    .into_iter()
                    .map(|i| pb::IdentityInfo {
                        name: i.name,
                        role: i.role,
                        created_ms: i.created_ms,
                        created_by: i.created_by,
                        revoked_ms: i.revoked_ms.unwrap_or(0),
                    })
                    .collect(),
            })
        })
    }

    #[tracing::instrument(skip_all, fields(rpc = Rpc::RevokeIdentity.as_str()))]
    async fn revoke_identity(
        &self,
        req: Request<pb::RevokeIdentityRequest>,
    ) -> Result<Response<pb::RevokeIdentityResponse>, Status> {
        handle!(self, req, Rpc::RevokeIdentity, |caller, msg| {
            self.vault.revoke_identity(&caller, &msg.name).await.map(|()| pb::RevokeIdentityResponse {})
        })
    }

    #[tracing::instrument(skip_all, fields(rpc = Rpc::ReloadRegulations.as_str()))]
    async fn reload_regulations(
        &self,
        req: Request<pb::ReloadRegulationsRequest>,
    ) -> Result<Response<pb::RegulationsInfo>, Status> {
        handle!(self, req, Rpc::ReloadRegulations, |caller, _msg| self
            .vault
            .reload_regulations(Some(&caller))
            .await
            .map(Into::into))
    }

    #[tracing::instrument(skip_all, fields(rpc = Rpc::GetRegulations.as_str()))]
    async fn get_regulations(
        &self,
        req: Request<pb::GetRegulationsRequest>,
    ) -> Result<Response<pb::RegulationsInfo>, Status> {
        handle!(self, req, Rpc::GetRegulations, |caller, _msg| self
            .vault
            .regulations_info(&caller)
            .await
            .map(Into::into))
    }
}
