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

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value, json};

/// Framing formats AnyEvent::MP knows but this implementation cannot speak; dropped from
/// [`Profile::framing_format`] so they are never offered.
const UNSUPPORTED_FRAMINGS: &[&str] = &["storable"];

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

/// A fully resolved profile: everything a node needs to start.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    /// The profile name that was resolved (the host name by default).
    pub name: String,
    /// This node's id, with `%n`, `%u` and a trailing `/` already expanded.
    pub nodeid: String,
    /// Shared secret for HMAC authentication, if any.
    pub secret: Option<String>,
    /// PEM text (certificate and key) for TLS, if any; AnyEvent::MP stores the text, not a path.
    pub cert: Option<String>,
    /// Listen addresses as configured (`host:port`, `*` host = all interfaces, `*` or missing
    /// port = dynamic, bare number = `<hostname>:<port>`).
    pub binds: Vec<String>,
    /// Seed addresses (`host:port`) to keep connected to.
    pub seeds: Vec<String>,
    /// Framing formats in order of preference, unsupported ones (`storable`) removed.
    pub framing_format: Vec<String>,
    /// Authentication methods we offer.
    pub auth_offer: Vec<String>,
    /// Authentication methods we accept.
    pub auth_accept: Vec<String>,
    /// Seconds without a reply before a monitored node counts as down.
    pub monitor_timeout: f64,
    /// Seconds between connection attempts to one node's addresses.
    pub connect_interval: f64,
    /// Secure mode: refuse remote code execution requests from other nodes.
    pub secure: bool,
}

/// The rc file's path: `$PERL_ANYEVENT_MP_RC` if set, else `$HOME/.perl-anyevent-mp`
/// (or `$APPDATA/perl-anyevent-mp` without `HOME`, as Perl does); `None` if none is set.
pub fn rc_path() -> Option<PathBuf> {
    rc_path_from(|name| std::env::var_os(name))
}

/// [`rc_path`] over an arbitrary environment, so it can be tested without touching the real one.
fn rc_path_from(var: impl Fn(&str) -> Option<OsString>) -> Option<PathBuf> {
    // Perl tests `exists`, so even an empty variable counts as set.
    if let Some(rc) = var("PERL_ANYEVENT_MP_RC") {
        return Some(PathBuf::from(rc));
    }
    if let Some(home) = var("HOME") {
        return Some(PathBuf::from(home).join(".perl-anyevent-mp"));
    }
    var("APPDATA").map(|dir| PathBuf::from(dir).join("perl-anyevent-mp"))
}

/// The whole file as JSON (relaxed parsing); `{}` if missing.
///
/// An empty (or comment-only) file also reads as `{}`. The top level must be an object.
pub fn load_rc(path: &Path) -> Result<Value, ConfigError> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Value::Object(Map::new())),
        Err(source) => {
            return Err(ConfigError::Io {
                path: show(path),
                source,
            });
        }
    };
    parse_relaxed(&bytes, path)
}

/// Parses relaxed JSON text read from `path` (used only for error messages).
fn parse_relaxed(bytes: &[u8], path: &Path) -> Result<Value, ConfigError> {
    let strict = strip_relaxed(bytes);
    if strict.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Object(Map::new()));
    }
    let value: Value = serde_json::from_slice(&strict).map_err(|e| {
        // serde_json appends the position to its message; we report it separately.
        let full = e.to_string();
        let suffix = format!(" at line {} column {}", e.line(), e.column());
        ConfigError::Json {
            path: show(path),
            line: e.line(),
            column: e.column(),
            message: full.strip_suffix(&suffix).unwrap_or(&full).to_owned(),
        }
    })?;
    if !value.is_object() {
        return Err(ConfigError::NotAnObject { path: show(path) });
    }
    Ok(value)
}

/// Turns JSON::XS relaxed text into strict JSON: `#` comments (outside strings, to the end of
/// the line) and one trailing comma before `]`/`}` become spaces, literal tabs in strings
/// become `\t`. Blanking rather than deleting keeps serde_json's line/column numbers right.
fn strip_relaxed(input: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(input.len());
    let mut in_string = false;
    let mut escaped = false;
    let mut in_comment = false;
    // Index in `out` of the last comma, while only whitespace/comments followed it.
    let mut comma: Option<usize> = None;
    // Last significant byte outside strings; JSON::XS rejects `[,]`, `[1,,]` and `{"a":,}`,
    // so a comma right after `[`, `{`, `,` or `:` is never treated as trailing.
    let mut last = 0u8;
    for &b in input {
        if in_comment {
            if b == b'\n' || b == b'\r' {
                in_comment = false;
                out.push(b);
            } else {
                out.push(b' ');
            }
            continue;
        }
        if in_string {
            match b {
                _ if escaped => {
                    escaped = false;
                    out.push(b);
                }
                b'\\' => {
                    escaped = true;
                    out.push(b);
                }
                b'"' => {
                    in_string = false;
                    out.push(b);
                }
                // JSON::XS relaxed accepts literal tabs in strings; serde_json does not.
                b'\t' => out.extend_from_slice(b"\\t"),
                _ => out.push(b),
            }
            continue;
        }
        match b {
            b'#' => {
                in_comment = true;
                out.push(b' ');
            }
            b' ' | b'\t' | b'\n' | b'\r' => out.push(b),
            _ => {
                if let Some(at) = comma.take()
                    && (b == b']' || b == b'}')
                {
                    out[at] = b' ';
                }
                if b == b',' && !matches!(last, 0 | b'[' | b'{' | b',' | b':') {
                    comma = Some(out.len());
                }
                in_string = b == b'"';
                last = b;
                out.push(b);
            }
        }
    }
    out
}

/// Writes the file back the way AnyEvent::MP does, so both tools can share it: [`pretty`]
/// JSON written to `<path>~new~`, the old file kept as `<path>~` (a hard link, else a copy),
/// then the new one renamed over `<path>`.
///
/// An existing file's permissions are kept; a new file is created readable by its owner
/// only, since it may hold the secret.
pub fn save_rc(path: &Path, rc: &Value) -> Result<(), ConfigError> {
    let text = pretty(rc);
    let with_suffix = |suffix: &str| {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        PathBuf::from(name)
    };
    let (tmp, backup) = (with_suffix("~new~"), with_suffix("~"));
    let io_err = |at: &Path| {
        let path = show(at);
        move |source| ConfigError::Io { path, source }
    };
    write_new(&tmp, path, text.as_bytes()).map_err(|e| {
        // Best effort: a half-written temporary file is useless.
        let _ = fs::remove_file(&tmp);
        io_err(&tmp)(e)
    })?;
    keep_backup(path, &backup).map_err(io_err(&backup))?;
    fs::rename(&tmp, path).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        io_err(path)(e)
    })
}

/// Replaces `backup` by the current `path` (nothing to keep if `path` does not exist).
fn keep_backup(path: &Path, backup: &Path) -> io::Result<()> {
    match fs::remove_file(backup) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    match fs::hard_link(path, backup) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        // Some file systems have no hard links.
        Err(_) => fs::copy(path, backup).map(drop),
    }
}

/// `value` as JSON::XS's pretty output, which AnyEvent::MP writes and `aemp showconfig`
/// prints: three-space indent, `"key" : value`, one item per line, a final newline.
pub fn pretty(value: &Value) -> String {
    let mut out = String::new();
    write_pretty(&mut out, value, 0);
    out.push('\n');
    out
}

/// Appends `value` at nesting `depth` (bounded: serde_json parses at most 128 levels).
fn write_pretty(out: &mut String, value: &Value, depth: usize) {
    let indent = |out: &mut String, depth: usize| out.extend(std::iter::repeat_n("   ", depth));
    match value {
        Value::Array(items) if !items.is_empty() => {
            out.push_str("[\n");
            for (i, item) in items.iter().enumerate() {
                indent(out, depth + 1);
                write_pretty(out, item, depth + 1);
                out.push_str(if i + 1 < items.len() { ",\n" } else { "\n" });
            }
            indent(out, depth);
            out.push(']');
        }
        Value::Object(map) if !map.is_empty() => {
            out.push_str("{\n");
            for (i, (key, item)) in map.iter().enumerate() {
                indent(out, depth + 1);
                out.push_str(&Value::from(key.as_str()).to_string());
                out.push_str(" : ");
                write_pretty(out, item, depth + 1);
                out.push_str(if i + 1 < map.len() { ",\n" } else { "\n" });
            }
            indent(out, depth);
            out.push('}');
        }
        // Scalars, `[]` and `{}` print as compact JSON.
        _ => out.push_str(&value.to_string()),
    }
}

/// Creates `tmp` afresh with `text`, taking `original`'s permissions if it exists.
fn write_new(tmp: &Path, original: &Path, text: &[u8]) -> io::Result<()> {
    // A leftover from an interrupted save would make `create_new` fail.
    match fs::remove_file(tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(tmp)?;
    if let Ok(meta) = fs::metadata(original) {
        file.set_permissions(meta.permissions())?;
    }
    file.write_all(text)?;
    file.sync_all()
}

/// Sets a top-level key (profile None) or a key of a profile (created if missing).
///
/// Anything in the way that is not an object (the top level, `profile`, the profile entry)
/// is replaced by an empty object first.
pub fn set_key(rc: &mut Value, profile: Option<&str>, key: &str, value: Value) {
    if let Some(map) = section(rc, profile) {
        map.insert(key.to_owned(), value);
    }
}

/// Removes a top-level key (profile None) or a key of a profile, so it is inherited again.
/// The other keys keep their order.
pub fn del_key(rc: &mut Value, profile: Option<&str>, key: &str) {
    if let Some(map) = section(rc, profile) {
        map.shift_remove(key);
    }
}

/// Appends `item` to the list at `key` (a missing or `null` list counts as empty), first
/// dropping equal items so it is listed once, as `aemp addseed`/`addbind` do.
pub fn list_add(
    rc: &mut Value,
    profile: Option<&str>,
    key: &str,
    item: Value,
) -> Result<(), ConfigError> {
    let list = list_at(rc, profile, key)?;
    list.retain(|x| *x != item);
    list.push(item);
    Ok(())
}

/// Removes every item equal to `item` from the list at `key` (`aemp delseed`/`delbind`).
pub fn list_remove(
    rc: &mut Value,
    profile: Option<&str>,
    key: &str,
    item: &Value,
) -> Result<(), ConfigError> {
    list_at(rc, profile, key)?.retain(|x| x != item);
    Ok(())
}

/// The list at `key` of the section, created empty if missing or `null`.
fn list_at<'a>(
    rc: &'a mut Value,
    profile: Option<&str>,
    key: &str,
) -> Result<&'a mut Vec<Value>, ConfigError> {
    let at = match profile {
        Some(name) => format!("profile.{name}.{key}"),
        None => key.to_owned(),
    };
    let err = || ConfigError::Type {
        key: at.clone(),
        expected: "a list",
    };
    let slot = section(rc, profile)
        .ok_or_else(err)?
        .entry(key)
        .or_insert(Value::Null);
    if slot.is_null() {
        *slot = Value::Array(Vec::new());
    }
    slot.as_array_mut().ok_or_else(err)
}

/// Creates profile `name` (empty) unless it exists, as the reference's `aemp profile` does.
pub fn add_profile(rc: &mut Value, name: &str) {
    section(rc, Some(name));
}

/// Removes profile `name` altogether.
pub fn del_profile(rc: &mut Value, name: &str) {
    if let Some(Value::Object(profiles)) = rc.get_mut("profile") {
        profiles.shift_remove(name);
    }
}

/// The keys set in profile `name` itself, nothing inherited (`{}` if it does not exist).
pub fn own_profile(rc: &Value, name: &str) -> Value {
    rc.get("profile")
        .and_then(|p| p.get(name))
        .cloned()
        .unwrap_or_else(|| Value::Object(Map::new()))
}

/// The object holding the keys of `profile` (the top level for None), created (or
/// replacing a non-object in the way) as needed; `None` never happens in practice, it only
/// spares a panic path.
fn section<'a>(rc: &'a mut Value, profile: Option<&str>) -> Option<&'a mut Object> {
    let mut target = object(rc)?;
    if let Some(name) = profile {
        target = object(target.entry("profile").or_insert(Value::Null))?;
        target = object(target.entry(name).or_insert(Value::Null))?;
    }
    Some(target)
}

/// `value` as an object, replacing it by an empty one if it is something else.
fn object(value: &mut Value) -> Option<&mut Object> {
    if !value.is_object() {
        *value = Value::Object(Map::new());
    }
    value.as_object_mut()
}

/// The embedded default configuration used when there is no file: just the built-in defaults.
///
/// Resolving a profile from these alone gives a node with id `<hostname>/<10 random
/// characters>` (the default `nodeid` is `<profile>/` and the profile is the host name),
/// `binds` `["*"]` (a dynamic port on every interface), no seeds, no secret and no
/// certificate, `framing_format` `["cbor","json","storable"]` (`storable` is then dropped),
/// `auth_offer` `["tls_sha3_512","hmac_sha3_512"]`, `auth_accept`
/// `["tls_sha3_512","hmac_sha3_512","tls_anon","cleartext"]`, `monitor_timeout` 30 s,
/// `connect_interval` 2 s and `secure` false.
pub fn defaults() -> Value {
    json!({
        "monitor_timeout": 30,
        "connect_interval": 2,
        "framing_format": ["cbor", "json", "storable"],
        "auth_offer": ["tls_sha3_512", "hmac_sha3_512"],
        "auth_accept": ["tls_sha3_512", "hmac_sha3_512", "tls_anon", "cleartext"],
        "binds": ["*"],
        "seeds": [],
        "secure": false,
    })
}

/// Resolves profile `name` (None: the host name) from `rc`.
///
/// Layers, each overriding the previous: [`defaults`], the top-level keys, then the profile's
/// `parent` chain from the farthest ancestor down to the profile itself. A missing profile
/// (or missing parent) contributes nothing, as in Perl. A `null` value means "not set": the
/// built-in default applies (or no secret/cert).
pub fn resolve(rc: &Value, name: Option<&str>) -> Result<Profile, ConfigError> {
    resolve_with(rc, name, &Object::new())
}

/// [`resolve`] with `extra` settings layered just above the built-in defaults, below the file:
/// AnyEvent::MP's `configure` arguments (`aemp run KEY VALUE...`), which the file overrides.
pub fn resolve_with(
    rc: &Value,
    name: Option<&str>,
    extra: &Object,
) -> Result<Profile, ConfigError> {
    let mut hostname = None;
    let name = profile_name(name, &mut hostname)?;
    let builtin = defaults();
    let builtin_map = builtin.as_object();
    let merged = merge(&layers(rc, builtin_map, extra, &name)?);

    // The value of `key`, falling back to the built-in default when unset or null.
    let get = |key: &'static str| -> Option<(&Value, String)> {
        match merged.get(key) {
            Some((value, at)) if !value.is_null() => Some((*value, at.clone())),
            _ => builtin_map
                .and_then(|m| m.get(key))
                .map(|value| (value, key.to_owned())),
        }
    };
    let list = |key: &'static str| -> Result<Vec<String>, ConfigError> {
        match get(key) {
            Some((value, at)) => string_list(value, at),
            None => Ok(Vec::new()),
        }
    };
    let secs = |key: &'static str| -> Result<f64, ConfigError> {
        match get(key) {
            Some((value, at)) => seconds(value, at),
            None => Ok(0.0),
        }
    };
    let text = |key: &'static str| -> Result<Option<String>, ConfigError> {
        get(key)
            .map(|(value, at)| scalar_string(value, at))
            .transpose()
    };

    let template = text("nodeid")?
        .filter(|id| !id.is_empty())
        .unwrap_or_else(|| format!("{name}/"));
    let host = if template.contains("%n") {
        host_name(&mut hostname)?.to_owned()
    } else {
        String::new()
    };
    let nodeid = expand(&template, &host)?;

    let mut framing_format = list("framing_format")?;
    framing_format.retain(|f| !UNSUPPORTED_FRAMINGS.contains(&f.as_str()));

    Ok(Profile {
        nodeid,
        secret: text("secret")?,
        cert: text("cert")?,
        binds: list("binds")?,
        seeds: list("seeds")?,
        framing_format,
        auth_offer: list("auth_offer")?,
        auth_accept: list("auth_accept")?,
        monitor_timeout: secs("monitor_timeout")?,
        connect_interval: secs("connect_interval")?,
        secure: get("secure").is_some_and(|(value, _)| perl_true(value)),
        name,
    })
}

/// The effective configuration of profile `name` (None: the host name) as plain JSON, the
/// way `aemp showconfig` shows it: the same layers as [`resolve_with`], without the
/// `profile` and `parent` keys and with the node id not yet expanded.
pub fn effective(rc: &Value, name: Option<&str>, extra: &Object) -> Result<Object, ConfigError> {
    let name = profile_name(name, &mut None)?;
    let builtin = defaults();
    let mut out: Object = merge(&layers(rc, builtin.as_object(), extra, &name)?)
        .into_iter()
        .map(|(key, (value, _))| (key.to_owned(), value.clone()))
        .collect();
    out.shift_remove("profile");
    out.shift_remove("parent");
    Ok(out)
}

/// `name`, or the host name (looked up into `cache`) without one.
fn profile_name(name: Option<&str>, cache: &mut Option<String>) -> Result<String, ConfigError> {
    match name {
        Some(name) => Ok(name.to_owned()),
        None => host_name(cache).map(str::to_owned),
    }
}

/// The layers making up profile `name`, lowest priority first, each with the key prefix used
/// in error messages: `builtin`, `extra`, the top level, then the `parent` chain from the
/// farthest ancestor down to the profile itself.
fn layers<'a>(
    rc: &'a Value,
    builtin: Option<&'a Object>,
    extra: &'a Object,
    name: &'a str,
) -> Result<Vec<(&'a Object, String)>, ConfigError> {
    let top = match rc {
        Value::Object(map) => Some(map),
        Value::Null => None,
        _ => {
            return Err(ConfigError::Type {
                key: "(top level)".into(),
                expected: "a JSON object",
            });
        }
    };
    let mut layers: Vec<(&Object, String)> = Vec::new();
    layers.extend(builtin.map(|m| (m, String::new())));
    layers.push((extra, String::new()));
    layers.extend(top.map(|m| (m, String::new())));
    for (pname, map) in profile_chain(top, name)?.into_iter().rev() {
        layers.push((map, format!("profile.{pname}.")));
    }
    Ok(layers)
}

/// Key -> (value, where it came from), later layers winning.
fn merge<'a>(layers: &[(&'a Object, String)]) -> BTreeMap<&'a str, (&'a Value, String)> {
    let mut merged = BTreeMap::new();
    for (map, prefix) in layers {
        for (key, value) in *map {
            merged.insert(key.as_str(), (value, format!("{prefix}{key}")));
        }
    }
    merged
}

/// The profiles named by `name` and its `parent` links, nearest first.
fn profile_chain<'a>(
    top: Option<&'a Object>,
    name: &'a str,
) -> Result<Vec<(&'a str, &'a Object)>, ConfigError> {
    let profiles = match top.and_then(|t| t.get("profile")) {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Object(profiles)) => profiles,
        Some(_) => {
            return Err(ConfigError::Type {
                key: "profile".into(),
                expected: "an object mapping profile names to objects",
            });
        }
    };
    let mut chain: Vec<(&str, &Object)> = Vec::new();
    let mut next = Some(name);
    while let Some(pname) = next {
        if chain.iter().any(|(seen, _)| *seen == pname) {
            let mut names: Vec<&str> = chain.iter().map(|(n, _)| *n).collect();
            names.push(pname);
            return Err(ConfigError::ParentCycle {
                chain: names.join(" -> "),
            });
        }
        let profile = match profiles.get(pname) {
            // Perl silently treats an unknown profile as empty.
            None | Some(Value::Null) => break,
            Some(Value::Object(profile)) => profile,
            Some(_) => {
                return Err(ConfigError::Type {
                    key: format!("profile.{pname}"),
                    expected: "an object",
                });
            }
        };
        chain.push((pname, profile));
        next = match profile.get("parent") {
            None | Some(Value::Null) => None,
            Some(Value::String(parent)) => Some(parent.as_str()),
            Some(_) => {
                return Err(ConfigError::Type {
                    key: format!("profile.{pname}.parent"),
                    expected: "a profile name (string)",
                });
            }
        };
    }
    Ok(chain)
}

/// The host name, looked up once and cached in `cache`.
fn host_name(cache: &mut Option<String>) -> Result<&str, ConfigError> {
    if cache.is_none() {
        let name = hostname::get().map_err(ConfigError::Hostname)?;
        *cache = Some(name.to_string_lossy().into_owned());
    }
    Ok(cache.as_deref().unwrap_or_default())
}

/// Expands a node id template with bytes from the OS random source.
fn expand(template: &str, host: &str) -> Result<String, ConfigError> {
    // Ten characters (one byte each) per `%u`, plus ten for a trailing `/`.
    let mut bytes = vec![0u8; 10 * (template.matches("%u").count() + 1)];
    getrandom::fill(&mut bytes).map_err(|e| ConfigError::Random(e.to_string()))?;
    let mut bytes = bytes.into_iter();
    let mut random = || bytes.next().unwrap_or(0);
    Ok(aemp_engine::node::expand_node_id(
        template,
        host,
        &mut random,
    ))
}

/// A list of strings; numbers are accepted and stringified, as Perl would.
fn string_list(value: &Value, key: String) -> Result<Vec<String>, ConfigError> {
    let err = || ConfigError::Type {
        key: key.clone(),
        expected: "a list of strings",
    };
    let Value::Array(items) = value else {
        return Err(err());
    };
    items
        .iter()
        .map(|item| match item {
            Value::String(s) => Ok(s.clone()),
            Value::Number(n) => Ok(n.to_string()),
            _ => Err(err()),
        })
        .collect()
}

/// A string; numbers are accepted and stringified, as Perl would.
fn scalar_string(value: &Value, key: String) -> Result<String, ConfigError> {
    match value {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        _ => Err(ConfigError::Type {
            key,
            expected: "a string",
        }),
    }
}

/// A non-negative duration in seconds; numeric strings count, as Perl numifies them.
fn seconds(value: &Value, key: String) -> Result<f64, ConfigError> {
    let number = match value {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    };
    number
        .filter(|n| n.is_finite() && *n >= 0.0)
        .ok_or(ConfigError::Type {
            key,
            expected: "a non-negative number of seconds",
        })
}

/// Perl truthiness of a JSON value: null, false, 0, "" and "0" are false.
fn perl_true(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|n| n != 0.0),
        Value::String(s) => !(s.is_empty() || s == "0"),
        Value::Array(_) | Value::Object(_) => true,
    }
}

/// `path` for messages, with the home directory shown as `~`.
fn show(path: &Path) -> String {
    show_with(path, std::env::var_os("HOME"))
}

/// [`show`] with an explicit home directory.
fn show_with(path: &Path, home: Option<OsString>) -> String {
    if let Some(home) = home.filter(|h| !h.is_empty())
        && let Ok(rest) = path.strip_prefix(&home)
    {
        return if rest.as_os_str().is_empty() {
            "~".to_owned()
        } else {
            format!("~/{}", rest.display())
        };
    }
    path.display().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Value, ConfigError> {
        parse_relaxed(text.as_bytes(), Path::new("/rc"))
    }

    fn is_alnum10(s: &str) -> bool {
        s.len() == 10 && s.bytes().all(|b| b.is_ascii_alphanumeric())
    }

    #[test]
    fn relaxed_json() {
        let text = "# leading comment\n{\n  \"a\": [1, 2, ], # trailing comma\n  \"b\": \"x # not a comment\",\n  \"c\": \"q\\\" # still string\",\n  \"d\": {\"e\": true,\n  # comment between comma and brace\n  },\n  \"t\": \"tab\there\",\n}\n";
        let v = parse(text).unwrap();
        assert_eq!(
            v,
            json!({
                "a": [1, 2],
                "b": "x # not a comment",
                "c": "q\" # still string",
                "d": {"e": true},
                "t": "tab\there",
            })
        );
        // Only one trailing comma, and never right after an opening bracket.
        assert!(parse("{\"a\": [1,,]}").is_err());
        assert!(parse("{\"a\": [,]}").is_err());
        assert!(parse("{\"a\": ,}").is_err());
        assert!(parse("[1]").is_err_and(|e| matches!(e, ConfigError::NotAnObject { .. })));
        assert_eq!(parse("  # nothing\n").unwrap(), json!({}));
    }

    #[test]
    fn json_error_position() {
        let err = parse("{\n  # comment\n  \"a\": ,\n}").unwrap_err();
        let ConfigError::Json { line, column, .. } = &err else {
            panic!("{err}");
        };
        assert_eq!((*line, *column), (3, 8));
        let msg = err.to_string();
        assert!(
            msg.starts_with("/rc: invalid JSON at line 3 column 8: "),
            "{msg}"
        );
        assert!(!msg.ends_with("column 8"), "{msg}");
        assert_eq!(
            show_with(
                Path::new("/home/u/.perl-anyevent-mp"),
                Some("/home/u".into())
            ),
            "~/.perl-anyevent-mp"
        );
        assert_eq!(
            show_with(Path::new("/etc/rc"), Some("/home/u".into())),
            "/etc/rc"
        );
    }

    #[test]
    fn rc_path_lookup() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                vars.iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| OsString::from(v))
            }
        };
        assert_eq!(
            rc_path_from(env(&[("PERL_ANYEVENT_MP_RC", "/x/rc"), ("HOME", "/h")])),
            Some(PathBuf::from("/x/rc"))
        );
        assert_eq!(
            rc_path_from(env(&[("HOME", "/h")])),
            Some(PathBuf::from("/h/.perl-anyevent-mp"))
        );
        assert_eq!(
            rc_path_from(env(&[("APPDATA", "/a")])),
            Some(PathBuf::from("/a/perl-anyevent-mp"))
        );
        assert_eq!(rc_path_from(env(&[])), None);
    }

    #[test]
    fn defaults_only() {
        let p = resolve(&json!({}), Some("box")).unwrap();
        assert_eq!(p.name, "box");
        let rand = p.nodeid.strip_prefix("box/").unwrap();
        assert!(is_alnum10(rand), "{}", p.nodeid);
        assert_eq!(p.secret, None);
        assert_eq!(p.cert, None);
        assert_eq!(p.binds, ["*"]);
        assert!(p.seeds.is_empty());
        assert_eq!(p.framing_format, ["cbor", "json"]);
        assert_eq!(p.auth_offer, ["tls_sha3_512", "hmac_sha3_512"]);
        assert_eq!(
            p.auth_accept,
            ["tls_sha3_512", "hmac_sha3_512", "tls_anon", "cleartext"]
        );
        assert_eq!(p.monitor_timeout, 30.0);
        assert_eq!(p.connect_interval, 2.0);
        assert!(!p.secure);

        // No name: the host name is the profile.
        let host = hostname::get().unwrap().to_string_lossy().into_owned();
        let p = resolve(&defaults(), None).unwrap();
        assert_eq!(p.name, host);
        assert!(p.nodeid.starts_with(&format!("{host}/")));
    }

    #[test]
    fn missing_file_gives_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let rc = load_rc(&dir.path().join("nope")).unwrap();
        assert_eq!(rc, json!({}));
        let p = resolve(&rc, Some("x")).unwrap();
        assert_eq!(p.binds, ["*"]);
        assert!(p.nodeid.starts_with("x/"));
    }

    #[test]
    fn resolution_order() {
        let rc = json!({
            "seeds": ["top:1"],
            "secret": "top",
            "monitor_timeout": 5,
            "connect_interval": 1,
            "secure": 1,
            "profile": {
                "grand": { "secret": "grand", "binds": ["*:4040"], "monitor_timeout": 7.5 },
                "parent": { "parent": "grand", "secret": "parent", "cert": "PEM" },
                "child": { "parent": "parent", "secret": "child", "connect_interval": "0.5",
                           "nodeid": "fixed", "unknown": [1] },
                "orphan": { "parent": "does-not-exist", "seeds": ["o:1"] },
            },
        });
        let p = resolve(&rc, Some("child")).unwrap();
        assert_eq!(p.secret.as_deref(), Some("child"));
        assert_eq!(p.cert.as_deref(), Some("PEM"));
        assert_eq!(p.binds, ["*:4040"]);
        assert_eq!(p.seeds, ["top:1"]);
        assert_eq!(p.monitor_timeout, 7.5);
        assert_eq!(p.connect_interval, 0.5);
        assert_eq!(p.nodeid, "fixed");
        assert!(p.secure);

        let p = resolve(&rc, Some("parent")).unwrap();
        assert_eq!(p.secret.as_deref(), Some("parent"));
        assert_eq!(p.connect_interval, 1.0);

        // Missing profile: defaults plus top level.
        let p = resolve(&rc, Some("nobody")).unwrap();
        assert_eq!(p.secret.as_deref(), Some("top"));
        assert_eq!(p.binds, ["*"]);
        assert_eq!(p.monitor_timeout, 5.0);
        assert!(p.nodeid.starts_with("nobody/"));

        let p = resolve(&rc, Some("orphan")).unwrap();
        assert_eq!(p.seeds, ["o:1"]);

        // null unsets: back to the built-in default / no secret.
        let rc = json!({"secret": "s", "binds": ["b:1"],
                        "profile": {"p": {"secret": null, "binds": null}}});
        let p = resolve(&rc, Some("p")).unwrap();
        assert_eq!(p.secret, None);
        assert_eq!(p.binds, ["*"]);
    }

    #[test]
    fn parent_cycle() {
        let rc = json!({"profile": {
            "a": {"parent": "b"}, "b": {"parent": "c"}, "c": {"parent": "a"},
            "self": {"parent": "self"},
        }});
        let err = resolve(&rc, Some("a")).unwrap_err();
        assert!(matches!(&err, ConfigError::ParentCycle { chain } if chain == "a -> b -> c -> a"));
        assert!(err.to_string().contains("a -> b -> c -> a"));
        assert!(matches!(
            resolve(&rc, Some("self")),
            Err(ConfigError::ParentCycle { .. })
        ));
    }

    #[test]
    fn type_errors_name_the_key() {
        let key_of = |rc: Value, name: &str| match resolve(&rc, Some(name)) {
            Err(ConfigError::Type { key, .. }) => key,
            other => panic!("{other:?}"),
        };
        assert_eq!(key_of(json!({"seeds": "a:1"}), "x"), "seeds");
        assert_eq!(key_of(json!({"seeds": [true]}), "x"), "seeds");
        assert_eq!(
            key_of(json!({"monitor_timeout": "soon"}), "x"),
            "monitor_timeout"
        );
        assert_eq!(
            key_of(json!({"connect_interval": -1}), "x"),
            "connect_interval"
        );
        assert_eq!(key_of(json!({"secret": ["s"]}), "x"), "secret");
        assert_eq!(
            key_of(json!({"profile": {"x": {"binds": {}}}}), "x"),
            "profile.x.binds"
        );
        assert_eq!(
            key_of(json!({"profile": {"x": {"parent": 3}}}), "x"),
            "profile.x.parent"
        );
        assert_eq!(key_of(json!({"profile": {"x": 3}}), "x"), "profile.x");
        assert_eq!(key_of(json!({"profile": []}), "x"), "profile");
        let err = resolve(&json!({"seeds": 1}), Some("x")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "configuration key `seeds`: expected a list of strings"
        );
        // Numbers in lists are stringified, as Perl does.
        let p = resolve(&json!({"binds": [4040]}), Some("x")).unwrap();
        assert_eq!(p.binds, ["4040"]);
    }

    #[test]
    fn secure_is_perl_truth() {
        let secure = |v: Value| resolve(&json!({ "secure": v }), Some("x")).unwrap().secure;
        for v in [
            json!(0),
            json!(""),
            json!("0"),
            json!(null),
            json!(false),
            json!(0.0),
        ] {
            assert!(!secure(v.clone()), "{v}");
        }
        for v in [json!(1), json!("yes"), json!(true), json!("0.0"), json!([])] {
            assert!(secure(v.clone()), "{v}");
        }
    }

    #[test]
    fn nodeid_expansion() {
        let host = hostname::get().unwrap().to_string_lossy().into_owned();
        let id = |tpl: &str| {
            resolve(&json!({"profile": {"p": {"nodeid": tpl}}}), Some("p"))
                .unwrap()
                .nodeid
        };
        assert_eq!(id("explicit"), "explicit");
        assert_eq!(id("%n/x"), format!("{host}/x"));
        let named = id("name/");
        assert!(is_alnum10(named.strip_prefix("name/").unwrap()), "{named}");
        let uniq = id("a/%u/b");
        let mid = uniq.strip_prefix("a/").unwrap().strip_suffix("/b").unwrap();
        assert!(is_alnum10(mid), "{uniq}");
        // Empty means unset: the default "<profile>/".
        assert!(is_alnum10(id("").strip_prefix("p/").unwrap()));
    }

    #[test]
    fn save_load_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rc");
        let rc = json!({
            "secret": "s # not a comment",
            "profile": {"seed": {"binds": ["*:4040"], "parent": "base"}},
            "monitor_timeout": 2.5,
        });
        save_rc(&path, &rc).unwrap();
        assert_eq!(load_rc(&path).unwrap(), rc);
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.ends_with("}\n"));
        assert!(text.contains("\n   \""), "three-space indent: {text}");

        // Overwrite; no temporary file left behind, the old file kept as `rc~` (as
        // AnyEvent::MP keeps it).
        let mut rc2 = rc.clone();
        set_key(&mut rc2, None, "secret", json!("new"));
        save_rc(&path, &rc2).unwrap();
        assert_eq!(load_rc(&path).unwrap(), rc2);
        let mut names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names, [OsString::from("rc"), OsString::from("rc~")]);
        assert_eq!(load_rc(&dir.path().join("rc~")).unwrap(), rc);
        // The next save replaces the backup.
        save_rc(&path, &json!({})).unwrap();
        assert_eq!(load_rc(&dir.path().join("rc~")).unwrap(), rc2);

        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }

        // Writing into a missing directory names the temporary file.
        let bad = dir.path().join("missing").join("rc");
        let err = save_rc(&bad, &rc).unwrap_err();
        assert!(err.to_string().contains("rc~new~"), "{err}");
    }

    #[test]
    fn set_key_creates_as_needed() {
        let mut rc = json!({});
        set_key(&mut rc, None, "secret", json!("s"));
        set_key(&mut rc, Some("seed"), "binds", json!(["*:4040"]));
        set_key(&mut rc, Some("seed"), "nodeid", json!("seed1"));
        set_key(&mut rc, Some("other"), "cert", json!("PEM"));
        assert_eq!(
            rc,
            json!({
                "secret": "s",
                "profile": {
                    "seed": {"binds": ["*:4040"], "nodeid": "seed1"},
                    "other": {"cert": "PEM"},
                },
            })
        );
        set_key(&mut rc, None, "secret", json!("t"));
        assert_eq!(rc["secret"], "t");

        // Non-objects in the way are replaced.
        let mut rc = json!({"profile": 3});
        set_key(&mut rc, Some("p"), "k", json!(1));
        assert_eq!(rc, json!({"profile": {"p": {"k": 1}}}));
        let mut rc = json!(null);
        set_key(&mut rc, None, "k", json!(1));
        assert_eq!(rc, json!({"k": 1}));
    }

    #[test]
    fn pretty_is_json_xs_style() {
        let v = json!({"a": [1, "x"], "b": {}, "c": [], "d": {"e": null}, "s": "q\"/é"});
        assert_eq!(
            pretty(&v),
            "{\n   \"a\" : [\n      1,\n      \"x\"\n   ],\n   \"b\" : {},\n   \"c\" : [],\n   \"d\" : {\n      \"e\" : null\n   },\n   \"s\" : \"q\\\"/é\"\n}\n"
        );
        assert_eq!(pretty(&json!({})), "{}\n");
        // What it writes reads back the same.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rc");
        save_rc(&path, &v).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), pretty(&v));
        assert_eq!(load_rc(&path).unwrap(), v);
    }

    #[test]
    fn editing_keys_lists_and_profiles() {
        let mut rc = json!({"version": 1});
        set_key(&mut rc, None, "seeds", json!(["a:1"]));
        list_add(&mut rc, None, "seeds", json!("b:2")).unwrap();
        list_add(&mut rc, None, "seeds", json!("a:1")).unwrap();
        assert_eq!(rc["seeds"], json!(["b:2", "a:1"]));
        list_remove(&mut rc, None, "seeds", &json!("b:2")).unwrap();
        list_remove(&mut rc, None, "seeds", &json!("nope")).unwrap();
        assert_eq!(rc["seeds"], json!(["a:1"]));
        // A missing (or null) list starts empty; in a profile, created as needed.
        list_add(&mut rc, Some("p"), "binds", json!("*:4040")).unwrap();
        assert_eq!(rc["profile"]["p"]["binds"], json!(["*:4040"]));
        set_key(&mut rc, Some("p"), "seeds", Value::Null);
        list_remove(&mut rc, Some("p"), "seeds", &json!("x")).unwrap();
        assert_eq!(rc["profile"]["p"]["seeds"], json!([]));
        // Not a list: an error naming the key.
        set_key(&mut rc, Some("p"), "binds", json!("*:1"));
        let err = list_add(&mut rc, Some("p"), "binds", json!("x")).unwrap_err();
        assert!(
            matches!(&err, ConfigError::Type { key, .. } if key == "profile.p.binds"),
            "{err}"
        );

        // Deleting keeps the order of the others.
        let mut ordered = json!({"a": 1, "b": 2, "c": 3});
        del_key(&mut ordered, None, "a");
        assert_eq!(pretty(&ordered), "{\n   \"b\" : 2,\n   \"c\" : 3\n}\n");

        del_key(&mut rc, Some("p"), "binds");
        del_key(&mut rc, None, "seeds");
        del_key(&mut rc, None, "absent");
        assert_eq!(rc, json!({"version": 1, "profile": {"p": {"seeds": []}}}));
        assert_eq!(own_profile(&rc, "p"), json!({"seeds": []}));
        assert_eq!(own_profile(&rc, "q"), json!({}));
        add_profile(&mut rc, "q");
        add_profile(&mut rc, "p");
        assert_eq!(rc["profile"], json!({"p": {"seeds": []}, "q": {}}));
        del_profile(&mut rc, "p");
        del_profile(&mut rc, "absent");
        assert_eq!(rc["profile"], json!({"q": {}}));
    }

    #[test]
    fn effective_configuration() {
        let rc = json!({
            "version": 1,
            "secret": "top",
            "profile": {
                "base": {"binds": ["*:4040"], "nodeid": "b/"},
                "p": {"parent": "base", "secret": "mine"},
            },
        });
        let extra = json!({"secret": "arg", "seeds": ["s:1"], "autocork": 1});
        let extra = extra.as_object().unwrap();
        let got = effective(&rc, Some("p"), extra).unwrap();
        // The file overrides the extra settings, which override the built-in defaults.
        assert_eq!(got["secret"], "mine");
        assert_eq!(got["seeds"], json!(["s:1"]));
        assert_eq!(got["autocork"], 1);
        assert_eq!(got["binds"], json!(["*:4040"]));
        assert_eq!(got["nodeid"], "b/");
        assert_eq!(got["monitor_timeout"], 30);
        assert_eq!(got["version"], 1);
        assert!(!got.contains_key("profile") && !got.contains_key("parent"));
        // resolve_with layers the same way.
        let p = resolve_with(&rc, Some("p"), extra).unwrap();
        assert_eq!(p.secret.as_deref(), Some("mine"));
        assert_eq!(p.seeds, ["s:1"]);
        let p = resolve_with(&json!({}), Some("x"), extra).unwrap();
        assert_eq!(p.secret.as_deref(), Some("arg"));
    }
}
