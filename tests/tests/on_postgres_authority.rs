//! The `authority` attack tests again, every vault on PostgreSQL (see `khlang_tests::on_postgres`).
#[path = "authority.rs"]
mod authority;
