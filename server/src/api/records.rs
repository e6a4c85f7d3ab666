//! The Records service: put, get, update, delete.

use super::*;
use crate::vault::bulk::NewRecord;

#[tonic::async_trait]
impl Records for Api {
    #[tracing::instrument(skip_all, fields(rpc = Rpc::PutRecord.as_str()))]
    async fn put_record(
        &self,
        req: Request<pb::PutRecordRequest>,
    ) -> Result<Response<pb::PutRecordResponse>, Status> {
        handle!(self, req, Rpc::PutRecord, |caller, msg| {
            let record_id = self.vault.put(&caller, &msg.subject_id, fields_in(msg.fields)).await;
            record_id.map(|record_id| pb::PutRecordResponse { record_id })
        })
    }

    #[tracing::instrument(skip_all, fields(rpc = Rpc::PutRecords.as_str()))]
    async fn put_records(
        &self,
        req: Request<pb::PutRecordsRequest>,
    ) -> Result<Response<pb::PutRecordsResponse>, Status> {
        handle!(self, req, Rpc::PutRecords, |caller, msg| {
            let records = msg
                .records
                .into_iter()
                .map(|r| NewRecord { subject: r.subject_id, fields: fields_in(r.fields) })
                .collect();
            let results = self.vault.put_many(&caller, records, msg.all_or_nothing).await;
            results.map(|results| {
                let stored = results.iter().filter(|r| r.is_ok()).count();
                pb::PutRecordsResponse {
                    results: results
                        .into_iter()
                        .map(|r| match r {
                            Ok(record_id) => {
                                pb::PutRecordResult { record_id, code: 0, message: String::new() }
                            }
                            Err(e) => {
                                let s = status(e, &caller.request_id);
                                pb::PutRecordResult {
                                    record_id: String::new(),
                                    code: s.code() as i32,
                                    message: s.message().to_owned(),
                                }
                            }
                        })
                        .collect(),
                    stored: u32::try_from(stored).unwrap_or(u32::MAX),
                }
            })
        })
    }

    #[tracing::instrument(skip_all, fields(rpc = Rpc::GetRecord.as_str()))]
    async fn get_record(
        &self,
        req: Request<pb::GetRecordRequest>,
    ) -> Result<Response<pb::GetRecordResponse>, Status> {
        handle!(self, req, Rpc::GetRecord, |caller, msg| {
            let purpose = Some(msg.purpose.as_str()).filter(|p| !p.is_empty());
            self.vault.get(&caller, &msg.record_id, &msg.fields, purpose).await.map(Into::into)
        })
    }

    #[tracing::instrument(skip_all, fields(rpc = Rpc::UpdateRecord.as_str()))]
    async fn update_record(
        &self,
        req: Request<pb::UpdateRecordRequest>,
    ) -> Result<Response<pb::UpdateRecordResponse>, Status> {
        handle!(self, req, Rpc::UpdateRecord, |caller, msg| {
            let names = self.vault.update(&caller, &msg.record_id, fields_in(msg.set), &msg.remove).await;
            names.map(|field_names| pb::UpdateRecordResponse { field_names })
        })
    }

    #[tracing::instrument(skip_all, fields(rpc = Rpc::DeleteRecord.as_str()))]
    async fn delete_record(
        &self,
        req: Request<pb::DeleteRecordRequest>,
    ) -> Result<Response<pb::DeleteRecordResponse>, Status> {
        handle!(self, req, Rpc::DeleteRecord, |caller, msg| {
            self.vault.delete(&caller, &msg.record_id).await.map(|()| pb::DeleteRecordResponse {})
        })
    }

    #[tracing::instrument(skip_all, fields(rpc = Rpc::ListRecords.as_str()))]
    async fn list_records(
        &self,
        req: Request<pb::ListRecordsRequest>,
    ) -> Result<Response<pb::ListRecordsResponse>, Status> {
        handle!(self, req, Rpc::ListRecords, |caller, msg| {
            self.vault.list(&caller, &msg.subject_id).await.map(|records| pb::ListRecordsResponse {
                records: records
                    .into_iter()
                    .map(|r| pb::RecordSummary { record_id: r.record_id, field_names: r.field_names })
                    .collect(),
            })
        })
    }
}
