//! permessage-deflate (RFC 7692).

pub mod negotiate;

pub use negotiate::{negotiate, Params, Policy};
