//! permessage-deflate (RFC 7692).

pub mod codec;
pub mod negotiate;

pub use codec::{Deflater, InflateError, Inflater};
pub use negotiate::{negotiate, Params, Policy};
