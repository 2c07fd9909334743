//! permessage-deflate (RFC 7692).

pub mod codec;
pub mod conn;
pub mod negotiate;

pub use codec::{Deflater, InflateError, Inflater};
pub use conn::{ConnDeflate, Inflated, Tuning};
pub use negotiate::{negotiate, Params, Policy};
