//! What this engine announces about itself in its greeting. A module of its own, with no
//! imports, so that the greeting, the connection and the errors can all name it without
//! depending on each other.

/// The AEMP protocol version this engine speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// What we announce as `provider` in the greeting.
pub const PROVIDER: &str = concat!("aemp-", env!("CARGO_PKG_VERSION"));
