//! The `audit` end-to-end tests again, every vault on PostgreSQL (see `khlang_tests::on_postgres`).
#[path = "audit.rs"]
mod audit;
