//! The organisation's rules, as plain Rust: the regulations file (`regulations`), the field
//! catalogue and its validators (`catalogue`), and the pure decide step with masking (`decide`).
//! Depends on nothing else in the server.

pub mod catalogue;
mod decide;
mod operation;
pub mod regulations;

pub use decide::*;
pub use operation::Operation;

/// Who is calling, established by authentication: what the rules apply to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub name: String,
    pub role: String,
}
