//! Resolving a profile: the built-in defaults, the top level, then the `parent` chain.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::{ConfigError, Object};

/// Framing formats AnyEvent::MP knows but this implementation cannot speak; dropped from
/// [`Profile::framing_format`] so they are never offered.
const UNSUPPORTED_FRAMINGS: &[&str] = &["storable"];

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
    /// Whether other nodes may ask for this node's info (`aemp info`); ours, not the
    /// reference's. Default true; Perl's false (`false`, `0`, `""`, `"0"`) turns it off.
    pub node_info: bool,
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
    let mut all = reference_defaults();
    if let Value::Object(all) = &mut all {
        all.insert("binds".into(), json!(["*"]));
        all.insert("seeds".into(), json!([]));
        all.insert("secure".into(), json!(false));
    }
    all
}

/// The defaults the reference's `find_profile` layers below the file (what its `aemp
/// showconfig` shows); the other [`defaults`] are applied later there, by `configure`.
fn reference_defaults() -> Value {
    json!({
        "monitor_timeout": 30,
        "connect_interval": 2,
        "framing_format": ["cbor", "json", "storable"],
        "auth_offer": ["tls_sha3_512", "hmac_sha3_512"],
        "auth_accept": ["tls_sha3_512", "hmac_sha3_512", "tls_anon", "cleartext"],
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
        node_info: get("node_info").is_none_or(|(value, _)| perl_true(value)),
        name,
    })
}

/// The effective configuration of profile `name` (None: the host name) as plain JSON, the
/// way `aemp showconfig` shows it: the same layers as [`resolve_with`] over the
/// reference's defaults only, without the `profile` and `parent` keys and with the node id
/// not yet expanded.
pub fn effective(rc: &Value, name: Option<&str>, extra: &Object) -> Result<Object, ConfigError> {
    let name = profile_name(name, &mut None)?;
    let builtin = reference_defaults();
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

#[cfg(test)]
mod tests {
    use super::*;

    use crate::config::load_rc;

    fn is_alnum10(s: &str) -> bool {
        s.len() == 10 && s.bytes().all(|b| b.is_ascii_alphanumeric())
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
        // Only the keys the reference's showconfig shows: its defaults and what is set.
        let got = effective(&json!({}), Some("x"), &Object::new()).unwrap();
        let mut keys: Vec<&str> = got.keys().map(String::as_str).collect();
        keys.sort_unstable();
        let reference = [
            "auth_accept",
            "auth_offer",
            "connect_interval",
            "framing_format",
            "monitor_timeout",
        ];
        assert_eq!(keys, reference);
        // resolve_with layers the same way.
        let p = resolve_with(&rc, Some("p"), extra).unwrap();
        assert_eq!(p.secret.as_deref(), Some("mine"));
        assert_eq!(p.seeds, ["s:1"]);
        let p = resolve_with(&json!({}), Some("x"), extra).unwrap();
        assert_eq!(p.secret.as_deref(), Some("arg"));
    }
}
