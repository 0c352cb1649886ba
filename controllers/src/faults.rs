//! Disk fault rules (placeholder while the fault layer is built).

/// A rule.
pub struct DiskRule;
/// An effect.
pub enum Effect {}
/// The book.
pub struct FaultBook;
/// Ops.
pub struct OpSet;
/// Errors.
#[derive(Debug, thiserror::Error)]
#[error("fault book")]
pub struct FaultBookError;
