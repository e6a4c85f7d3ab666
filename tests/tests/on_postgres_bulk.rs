//! The bulk tests again, every vault on PostgreSQL (see `khlang_tests::on_postgres`).
#[path = "bulk.rs"]
mod bulk;
