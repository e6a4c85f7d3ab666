//! The `rekey` end-to-end tests again, every vault on PostgreSQL (see `khlang_tests::on_postgres`).
#[path = "rekey.rs"]
mod rekey;
