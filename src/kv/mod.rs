//! What the fleet has cached: block hashing, the event decoders, the index, and the
//! approximate (predicted) state. Pure and synchronous: the transports feeding it live in
//! `crate::kv_plane`.

pub mod events;
mod ext_map;
pub mod hash;
pub mod index;
mod lru;
pub mod predicted;
