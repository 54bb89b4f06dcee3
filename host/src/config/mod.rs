//! Node configuration, compatible with AnyEvent::MP 2.x's rc file.
//!
//! The file ([`rc_path`]: `$PERL_ANYEVENT_MP_RC`, else `~/.perl-anyevent-mp`) is JSON read in
//! JSON::XS *relaxed* mode, so `#` comments and trailing commas are allowed:
//!
//! ```text
//! {
//!    "secret" : "shared network secret",   # defaults for every profile
//!    "seeds"  : ["seed1.example:4040"],
//!    "profile" : {
//!       "seed"  : { "binds" : ["*:4040"] },
//!       "web"   : { "parent" : "seed", "nodeid" : "web/%n" },
//!    },
//! }
//! ```
//!
//! A profile is resolved by layering the built-in [`defaults`], the top-level keys, then the
//! `parent` chain from the farthest ancestor down to the profile itself ([`resolve`]).

//!
//! Three parts: `file` (finding, reading and writing the file), `profile` (resolving a
//! profile into what a node needs), `edit` (the changes the configuration verbs make).

mod edit;
mod file;
mod profile;

use std::io;

use serde_json::{Map, Value};

pub use edit::{
    add_profile, del_key, del_profile, list_add, list_push, list_remove, list_remove_first,
    own_profile, set_key,
};
pub use file::{load_rc, pretty, rc_path, save_rc};
pub use profile::{Profile, defaults, effective, resolve, resolve_with};

/// A JSON object (the file's top level, a profile).
type Object = Map<String, Value>;

/// Why the configuration could not be read, written or resolved.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Reading or writing the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file, with the home directory shown as `~`.
        path: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The file is not (relaxed) JSON.
    #[error("{path}: invalid JSON at line {line} column {column}: {message}")]
    Json {
        /// The file, with the home directory shown as `~`.
        path: String,
        /// 1-based line of the error.
        line: usize,
        /// Column of the error on that line.
        column: usize,
        /// What the parser disliked.
        message: String,
    },
    /// The file's top level is JSON but not an object.
    #[error("{path}: the top level must be a JSON object")]
    NotAnObject {
        /// The file, with the home directory shown as `~`.
        path: String,
    },
    /// A key has a value of the wrong type.
    #[error("configuration key `{key}`: expected {expected}")]
    Type {
        /// Where the key is, e.g. `seeds` or `profile.web.seeds`.
        key: String,
        /// What the value should have been.
        expected: &'static str,
    },
    /// Following `parent` links came back to a profile already visited.
    #[error("configuration profiles have a parent cycle: {chain}")]
    ParentCycle {
        /// The profiles followed, e.g. `a -> b -> a`.
        chain: String,
    },
    /// The host name (default profile name, `%n`) is unavailable.
    #[error("cannot determine the host name: {0}")]
    Hostname(#[source] io::Error),
    /// The operating system's random source failed (needed for `%u`).
    #[error("cannot get random bytes for the node id: {0}")]
    Random(String),
}
