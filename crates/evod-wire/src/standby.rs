//! The link between the supervisor and a warm standby worker: a socket pair
//! carrying two bytes in all (the mechanism: `evod-supervisor`'s
//! `standby.rs`).
//!
//! standby → supervisor [`READY`] once it has mapped the model; supervisor →
//! standby [`GO`] to promote it. End of file on the link means "leave".
//! The link stays open after the promotion: it is the worker's crash-notice
//! channel ([`crate::notice`]) for the rest of its life.

/// The byte a standby writes once it is ready to be promoted.
pub const READY: u8 = b'R';
/// The byte that promotes a standby.
pub const GO: u8 = b'G';
