//! The archived-log authority tests again, every vault on PostgreSQL (see `khlang_tests::on_postgres`).
#[path = "archived_authority.rs"]
mod archived_authority;
