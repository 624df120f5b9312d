//! The link between the supervisor and a warm standby worker: a socket pair
//! carrying single bytes (the mechanism: `evod-supervisor`'s `standby.rs`).
//!
//! standby → supervisor [`READY`] once it has mapped the model; supervisor →
//! standby [`REFRESH`] when a new model file is live (the standby maps it
//! now, so that its promotion finds it mapped, and stays ready), and
//! [`GO`] to promote it. End of file on the link means "leave". The link
//! stays open after the promotion: it is the worker's crash-notice channel
//! ([`crate::notice`]) for the rest of its life.

/// The byte a standby writes once it is ready to be promoted.
pub const READY: u8 = b'R';
/// The byte that promotes a standby.
pub const GO: u8 = b'G';
/// The byte that tells a standby a new model file is live: it maps the
/// file at its model path again if that is no longer the file it mapped.
pub const REFRESH: u8 = b'L';
