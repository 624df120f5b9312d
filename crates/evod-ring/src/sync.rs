//! The one module through which every atomic of the ring is imported, so a
//! model checker (loom) can be swapped in here without touching the protocol
//! code. Orderings are chosen at each use site, with a comment naming the
//! access in the other process that the ordering pairs with.

pub(crate) use std::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};
