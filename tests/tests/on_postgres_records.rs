//! The `records` end-to-end tests again, every vault on PostgreSQL (see `khlang_tests::on_postgres`).
#[path = "records.rs"]
mod records;
