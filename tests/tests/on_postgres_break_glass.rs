//! The break-glass test again, every vault on PostgreSQL (see `khlang_tests::on_postgres`).
#[path = "break_glass.rs"]
mod break_glass;
