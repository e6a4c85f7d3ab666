//! The Subjects service: a data subject's records, export, erasure and consent.

use super::*;

#[tonic::async_trait]
impl Subjects for Api {
    #[tracing::instrument(skip_all, fields(rpc = Rpc::SetConsent.as_str()))]
    async fn set_consent(
        &self,
        req: Request<pb::SetConsentRequest>,
    ) -> Result<Response<pb::ConsentEntry>, Status> {
        handle!(self, req, Rpc::SetConsent, |caller, msg| {
            self.vault.set_consent(&caller, &msg.subject_id, &msg.purpose, msg.granted).await.map(Into::into)
        })
    }

    #[tracing::instrument(skip_all, fields(rpc = Rpc::GetConsent.as_str()))]
    async fn get_consent(
        &self,
        req: Request<pb::GetConsentRequest>,
    ) -> Result<Response<pb::GetConsentResponse>, Status> {
        handle!(self, req, Rpc::GetConsent, |caller, msg| {
            self.vault.consent(&caller, &msg.subject_id).await.map(|r| pb::GetConsentResponse {
                current: r.current.into_iter().map(Into::into).collect(),
                history: r.history.into_iter().map(Into::into).collect(),
            })
        })
    }

    #[tracing::instrument(skip_all, fields(rpc = Rpc::ExportSubject.as_str()))]
    async fn export_subject(
        &self,
        req: Request<pb::ExportSubjectRequest>,
    ) -> Result<Response<pb::ExportSubjectResponse>, Status> {
        handle!(self, req, Rpc::ExportSubject, |caller, msg| {
            self.vault.export_subject(&caller, &msg.subject_id).await.map(|records| {
                pb::ExportSubjectResponse {
                    records: records
                        .into_iter()
                        .map(|r| pb::ExportedRecord { fields: fields_out(&r.fields), record_id: r.record_id })
                        .collect(),
                    subject_id: msg.subject_id.clone(),
                }
            })
        })
    }

    #[tracing::instrument(skip_all, fields(rpc = Rpc::EraseSubject.as_str()))]
    async fn erase_subject(
        &self,
        req: Request<pb::EraseSubjectRequest>,
    ) -> Result<Response<pb::EraseSubjectResponse>, Status> {
        handle!(self, req, Rpc::EraseSubject, |caller, msg| {
            let n = self.vault.erase_subject(&caller, &msg.subject_id).await;
            n.map(|n| pb::EraseSubjectResponse { records_erased: u32::try_from(n).unwrap_or(u32::MAX) })
        })
    }
}
