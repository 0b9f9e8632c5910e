//! Deciding, pure: the cost of each candidate, the choice among them, and the load bookkeeping
//! the costs read. No I/O, no clocks: `now` and the RNG come from the caller.

pub mod active;
pub mod admission;
pub mod cost;
pub mod select;
