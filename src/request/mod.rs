//! OpenAI request bodies: which API a path is, and whether a body has the shape that API needs.
//! This module never sees workers.

pub mod openai;
