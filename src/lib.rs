//! dynamo-epp: an Envoy ext_proc endpoint picker for NVIDIA Dynamo fleets.
//!
//! See ARCHITECTURE.md for the map. The routing core (`router`, and later `kv`, `sched`) is pure
//! and synchronous; `server` and the fleet sources are the I/O edges.

pub mod config;
pub mod kv;
pub mod kv_plane;
pub mod nats;
pub mod request;
pub mod router;
pub mod sched;
pub mod secret;
pub mod server;
pub mod sim;
pub mod slab;
pub mod workers;
