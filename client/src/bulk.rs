//! Many records in one request (`PutRecords`).

use khlang_proto::pb;

use crate::{Client, ClientError, Code, to_pb_fields};

/// One record to store: its subject and its fields.
#[derive(Debug, Clone)]
pub struct NewRecord {
    pub subject: String,
    pub fields: Vec<(String, String)>,
}

/// What happened to one record of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PutOutcome {
    Stored(String),
    /// The status code it would have had if put alone (`Aborted`: another record of an
    /// all-or-nothing batch was refused), and why; never a value.
    Refused(Code, String),
}

impl Client {
    /// Stores many records in one request (at most the vault's batch limit, 1,000 by default):
    /// one outcome per record, in order. `all_or_nothing`: none is stored unless every one is.
    pub async fn put_many(
        &mut self,
        records: &[NewRecord],
        all_or_nothing: bool,
    ) -> Result<Vec<PutOutcome>, ClientError> {
        let req = pb::PutRecordsRequest {
            records: records
                .iter()
                .map(|r| pb::PutRecordRequest {
                    subject_id: r.subject.clone(),
                    fields: to_pb_fields(r.fields.iter().cloned()),
                })
                .collect(),
            all_or_nothing,
        };
        let resp = self.records.put_records(req).await?.into_inner();
        Ok(resp
            .results
            .into_iter()
            .map(|r| {
                if r.code == 0 {
                    PutOutcome::Stored(r.record_id)
                } else {
                    PutOutcome::Refused(Code::from_i32(r.code), r.message)
                }
            })
            .collect())
    }
}
