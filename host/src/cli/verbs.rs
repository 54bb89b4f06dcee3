//! The verbs of the reference's `aemp`, read from the typed arguments: a verb takes the
//! arguments it needs and the rest is the next verb, so verbs chain
//! (`aemp gensecret profile xyzzy binds 4040,4041 nodeid anon/`).

use std::collections::VecDeque;
use std::path::PathBuf;

use serde_json::{Map, Value};

/// The low-level transport settings, each with `setX`/`X` and `delX` verbs.
pub const ATTRS: &[&str] = &[
    "monitor_timeout",
    "connect_interval",
    "framing_format",
    "auth_offer",
    "auth_accept",
    "autocork",
    "nodelay",
    "secure",
    "node_info",
];

/// One verb with its arguments.
#[derive(Debug, Clone, PartialEq)]
pub enum Verb {
    /// `run [PROFILE] [KEY VALUE]...`: run a node; the settings sit below the file's, as the
    /// reference's `configure` arguments do.
    Run {
        /// The profile to use, if named.
        profile: Option<String>,
        /// The other `KEY VALUE` pairs.
        settings: Map<String, Value>,
    },
    /// `snd PORT ARGS...`: send, then confirm delivery.
    Snd {
        /// Where to.
        port: String,
        /// The message.
        args: Vec<Value>,
    },
    /// `cal PORT ARGS...`: send with a reply port appended, print the reply.
    Cal {
        /// Where to.
        port: String,
        /// The message, without the reply port.
        args: Vec<Value>,
    },
    /// `mon PORT`: wait until the port dies.
    Mon {
        /// The port (a bare node id: its node port).
        port: String,
    },
    /// `eval NODE EXPR...`: ask a node to evaluate an expression (aemp nodes refuse).
    Eval {
        /// The node (the node part of a port id).
        node: String,
        /// The arguments joined by spaces.
        expr: String,
    },
    /// `restart NODE`: ask a node running under a watchdog to restart (an `eval`).
    Restart {
        /// The node.
        node: String,
    },
    /// `shell [NODE]`: an interactive loop of `eval`s on a node (default: our own).
    Shell {
        /// The node to start with.
        node: Option<String>,
    },
    /// `trace NODE`: ask a node for the nodes it is connected to, then those, and so on.
    Trace {
        /// Where to start.
        node: String,
    },
    /// `info NODE` (ours): ask an aemp node what it is doing.
    Info {
        /// The node.
        node: String,
    },
    /// `dataconn NODE HANDLER ARGS...` (ours): a data connection to `NODE` served there by
    /// its data handler `HANDLER` with `ARGS`; standard input goes to it, what comes
    /// back to standard output.
    DataConn {
        /// The node.
        node: String,
        /// The data handler's name there.
        handler: String,
        /// Its arguments.
        args: Vec<Value>,
    },
    /// `dbfamily`/`dbkeys`/`dbvalues FAMILY`: read the network database (through the
    /// configured seeds).
    Db {
        /// Which read.
        query: DbQuery,
        /// The family.
        family: String,
    },
    /// `setX VALUE` / `X VALUE`: set a key of the current profile.
    Set {
        /// The configuration key.
        key: &'static str,
        /// Its new value, typed as given.
        value: Value,
    },
    /// `delX`: remove a key, so it is inherited again.
    Del {
        /// The configuration key.
        key: &'static str,
    },
    /// `gensecret`: a random shared secret.
    GenSecret,
    /// `gencert`: a new network certificate.
    GenCert,
    /// `setcert FILE`: the certificate PEM text read from a file.
    SetCert {
        /// The PEM file.
        file: PathBuf,
    },
    /// `setseeds`/`setbinds` (and `seeds`/`binds`): replace a list.
    SetList {
        /// `seeds` or `binds`.
        key: &'static str,
        /// The new list.
        items: Vec<Value>,
    },
    /// `addseed`/`addbind`: add one item (once).
    AddItem {
        /// `seeds` or `binds`.
        key: &'static str,
        /// The item.
        item: Value,
    },
    /// `delseed`/`delbind`: remove one item.
    DelItem {
        /// `seeds` or `binds`.
        key: &'static str,
        /// The item.
        item: Value,
    },
    /// `addservice`: append one service (another instance if it is there already).
    PushItem {
        /// `services`.
        key: &'static str,
        /// The service specification.
        item: Value,
    },
    /// `delservice`: remove the first instance of a service.
    RemoveFirst {
        /// `services`.
        key: &'static str,
        /// The service specification.
        item: Value,
    },
    /// `profile NAME`: the following verbs edit this profile (created if needed).
    Profile {
        /// The profile.
        name: String,
    },
    /// `delprofile NAME`: remove a profile.
    DelProfile {
        /// The profile.
        name: String,
    },
    /// `showprofile NAME`: print a profile's own keys.
    ShowProfile {
        /// The profile.
        name: String,
    },
    /// `showconfig [NAME [KEY VALUE]...]`: print the effective configuration.
    ShowConfig {
        /// The profile (default: `--profile`, else the host name).
        name: Option<String>,
        /// Settings below the file's, as for `run`.
        settings: Map<String, Value>,
    },
}

/// What `dbfamily`, `dbkeys` and `dbvalues` read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbQuery {
    /// The whole family, key to value.
    Family,
    /// Its keys.
    Keys,
    /// Its values.
    Values,
}

/// Why the verbs could not be read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum VerbError {
    /// No verb at all.
    #[error("Usage: aemp subcommand ... (try aemp --help)")]
    Usage,
    /// Not a verb.
    #[error("{0}: no such aemp command (try aemp --help)")]
    Unknown(String),
    /// A required argument is missing (the reference's wording, e.g. "seed address missing").
    #[error("{0}")]
    Missing(String),
    /// A verb name, port id, profile name, key or file name that is not a string.
    #[error("{what} must be a string, not {value}")]
    NotText {
        /// What the argument is.
        what: &'static str,
        /// The JSON value given.
        value: String,
    },
    /// A list argument that is neither a comma-separated string nor a JSON array.
    #[error("{verb}: expected a comma-separated list or a JSON array, not {value}")]
    NotList {
        /// The verb.
        verb: String,
        /// The JSON value given.
        value: String,
    },
    /// `KEY VALUE` arguments with a key alone at the end.
    #[error("{verb}: value missing for key {key}")]
    Unpaired {
        /// The verb.
        verb: String,
        /// The key without a value.
        key: String,
    },
}

/// Why `run` does not run a configuration's services and `eval`.
pub const PERL_ONLY: &str = "they are Perl code (services are Perl functions or modules), \
     which aemp never runs";

/// Reads all verbs from the typed arguments.
pub fn parse(args: Vec<Value>) -> Result<Vec<Verb>, VerbError> {
    if args.is_empty() {
        return Err(VerbError::Usage);
    }
    let mut args = VecDeque::from(args);
    let mut verbs = Vec::new();
    while let Some(name) = args.pop_front() {
        let name = text("a command", name)?;
        verbs.push(parse_one(&name, &mut args)?);
    }
    Ok(verbs)
}

/// Whether `value` names a verb (it ends `seeds`/`binds` address lists).
fn is_verb(value: &Value) -> bool {
    value.as_str().is_some_and(|name| {
        !matches!(
            parse_one(name, &mut VecDeque::new()),
            Err(VerbError::Unknown(_))
        )
    })
}

/// Reads verb `name`, taking its arguments from the front of `args`.
fn parse_one(name: &str, args: &mut VecDeque<Value>) -> Result<Verb, VerbError> {
    let need = |args: &mut VecDeque<Value>, missing: &str| {
        args.pop_front()
            .ok_or_else(|| VerbError::Missing(missing.to_owned()))
    };
    // `setX` has the alias `X`.
    let set = name.strip_prefix("set").unwrap_or(name);
    let verb = match (name, set) {
        ("run", _) => {
            let mut rest: Vec<Value> = args.drain(..).collect();
            // As the reference's `configure`: an odd count starts with the profile.
            let mut profile = None;
            if rest.len() % 2 == 1 {
                profile = Some(text("a profile name", rest.remove(0))?);
            }
            let mut settings = pairs(name, rest)?;
            if let Some(named) = settings.remove("profile") {
                profile = Some(text("a profile name", named)?);
            }
            Verb::Run { profile, settings }
        }
        ("snd" | "cal", _) => {
            let port = text("a port id", need(args, "port id missing")?)?;
            let args = args.drain(..).collect();
            if name == "snd" {
                Verb::Snd { port, args }
            } else {
                Verb::Cal { port, args }
            }
        }
        ("dataconn", _) => Verb::DataConn {
            node: node_of(&text("a node id", need(args, "node id missing")?)?),
            handler: text("a handler name", need(args, "handler name missing")?)?,
            args: args.drain(..).collect(),
        },
        ("mon", _) => Verb::Mon {
            port: text("a port id", need(args, "port id missing")?)?,
        },
        ("dbfamily" | "dbkeys" | "dbvalues", _) => Verb::Db {
            query: match name {
                "dbfamily" => DbQuery::Family,
                "dbkeys" => DbQuery::Keys,
                _ => DbQuery::Values,
            },
            family: text("a family name", need(args, "family name missing")?)?,
        },
        ("eval", _) => {
            let node = text("a node id", need(args, "node id missing")?)?;
            let expr: Vec<String> = args
                .drain(..)
                .map(|v| text("an expression", v))
                .collect::<Result<_, _>>()?;
            Verb::Eval {
                node: node_of(&node),
                expr: expr.join(" "),
            }
        }
        ("restart" | "trace" | "info", _) => {
            let node = node_of(&text("a node id", need(args, "node id missing")?)?);
            match name {
                "trace" => Verb::Trace { node },
                "info" => Verb::Info { node },
                _ => Verb::Restart { node },
            }
        }
        // As the reference: the next argument, whatever it is, is the node.
        ("shell", _) => Verb::Shell {
            node: args
                .pop_front()
                .map(|n| text("a node id", n))
                .transpose()?
                .map(|n| node_of(&n)),
        },
        (_, "eval") => Verb::Set {
            key: "eval",
            value: need(args, "eval string missing")?,
        },
        (_, "services") => Verb::SetList {
            key: "services",
            items: list(name, need(args, "service specifications missing")?)?,
        },
        ("addservice" | "delservice", _) => {
            let item = need(args, "service specification missing")?;
            if name == "addservice" {
                Verb::PushItem {
                    key: "services",
                    item,
                }
            } else {
                Verb::RemoveFirst {
                    key: "services",
                    item,
                }
            }
        }
        (_, "nodeid") => Verb::Set {
            key: "nodeid",
            value: need(args, "node id missing")?,
        },
        (_, "secret") => Verb::Set {
            key: "secret",
            value: need(args, "shared secret missing")?,
        },
        (_, "parent") => Verb::Set {
            key: "parent",
            value: need(args, "profile name is missing")?,
        },
        (_, "cert") => Verb::SetCert {
            file: PathBuf::from(text(
                "a file name",
                need(args, "key+certificate pem filename missing")?,
            )?),
        },
        ("setseeds" | "setbinds", key) => {
            let key = list_key(key);
            let missing = format!("{} addresses missing", singular(key));
            Verb::SetList {
                key,
                items: list(name, need(args, &missing)?)?,
            }
        }
        // Our older spelling: any number of addresses, up to the next verb.
        ("seeds" | "binds", key) => {
            let mut items = Vec::new();
            while let Some(arg) = args.front()
                && !is_verb(arg)
            {
                if let Some(arg) = args.pop_front() {
                    items.extend(list(name, arg)?);
                }
            }
            Verb::SetList {
                key: list_key(key),
                items,
            }
        }
        ("addseed" | "addbind" | "delseed" | "delbind", _) => {
            let key = list_key(&name[3..]);
            let item = need(args, &format!("{} address missing", singular(key)))?;
            if name.starts_with("add") {
                Verb::AddItem { key, item }
            } else {
                Verb::DelItem { key, item }
            }
        }
        ("gensecret", _) => Verb::GenSecret,
        ("gencert", _) => Verb::GenCert,
        ("profile" | "delprofile" | "showprofile", _) => {
            let name_arg = text("a profile name", need(args, "profile name is missing")?)?;
            match name {
                "profile" => Verb::Profile { name: name_arg },
                "delprofile" => Verb::DelProfile { name: name_arg },
                _ => Verb::ShowProfile { name: name_arg },
            }
        }
        ("showconfig", _) => {
            let mut rest: Vec<Value> = args.drain(..).collect();
            let profile = if rest.is_empty() {
                None
            } else {
                Some(text("a profile name", rest.remove(0))?)
            };
            Verb::ShowConfig {
                name: profile,
                settings: pairs(name, rest)?,
            }
        }
        _ => {
            if let Some(key) = ATTRS.iter().find(|a| **a == set) {
                Verb::Set {
                    key,
                    value: need(args, &format!("{key} value is missing"))?,
                }
            } else if let Some(key) = name.strip_prefix("del").and_then(del_key) {
                Verb::Del { key }
            } else {
                return Err(VerbError::Unknown(name.to_owned()));
            }
        }
    };
    Ok(verb)
}

/// The key a `delX` verb removes.
fn del_key(x: &str) -> Option<&'static str> {
    const KEYS: &[&str] = &[
        "nodeid", "secret", "cert", "seeds", "binds", "parent", "services", "eval",
    ];
    KEYS.iter().chain(ATTRS).find(|k| **k == x).copied()
}

/// `seeds` or `binds` from a verb's suffix (`seed`, `seeds`, `bind`, `binds`).
fn list_key(suffix: &str) -> &'static str {
    if suffix.starts_with("seed") {
        "seeds"
    } else {
        "binds"
    }
}

/// `seed` for `seeds`, `bind` for `binds`, for messages.
fn singular(key: &str) -> &str {
    key.strip_suffix('s').unwrap_or(key)
}

/// The node of a port id (all of a bare node id), as the reference's `node_of`.
fn node_of(port: &str) -> String {
    port.split_once('#')
        .map_or(port, |(node, _)| node)
        .to_owned()
}

/// A list argument: a JSON array as is, or a string split at commas (trailing empty fields
/// dropped, as Perl's `split` does, so an empty string is an empty list).
fn list(verb: &str, value: Value) -> Result<Vec<Value>, VerbError> {
    match value {
        Value::Array(items) => Ok(items),
        Value::String(s) => {
            let mut items: Vec<&str> = s.split(',').collect();
            while items.last().is_some_and(|i| i.is_empty()) {
                items.pop();
            }
            Ok(items.into_iter().map(Value::from).collect())
        }
        other => Err(VerbError::NotList {
            verb: verb.to_owned(),
            value: other.to_string(),
        }),
    }
}

/// `KEY VALUE...` arguments as an object (a later key wins).
fn pairs(verb: &str, args: Vec<Value>) -> Result<Map<String, Value>, VerbError> {
    let mut map = Map::new();
    let mut args = args.into_iter();
    while let Some(key) = args.next() {
        let key = text("a configuration key", key)?;
        let value = args.next().ok_or_else(|| VerbError::Unpaired {
            verb: verb.to_owned(),
            key: key.clone(),
        })?;
        map.insert(key, value);
    }
    Ok(map)
}

/// A string argument; numbers are written out, as Perl would use them.
fn text(what: &'static str, value: Value) -> Result<String, VerbError> {
    match value {
        Value::String(s) => Ok(s),
        Value::Number(n) => Ok(n.to_string()),
        other => Err(VerbError::NotText {
            what,
            value: other.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn verbs(args: &[Value]) -> Result<Vec<Verb>, VerbError> {
        parse(args.to_vec())
    }

    #[test]
    fn chained_configuration() {
        let got = verbs(&[
            json!("gensecret"),
            json!("profile"),
            json!("xyzzy"),
            json!("binds"),
            json!("4040,4041"),
            json!("nodeid"),
            json!("anon/"),
        ])
        .unwrap();
        assert_eq!(
            got,
            [
                Verb::GenSecret,
                Verb::Profile {
                    name: "xyzzy".into()
                },
                Verb::SetList {
                    key: "binds",
                    items: vec![json!("4040"), json!("4041")]
                },
                Verb::Set {
                    key: "nodeid",
                    value: json!("anon/")
                },
            ]
        );
    }

    #[test]
    fn set_aliases_del_and_lists() {
        let one = |args: &[Value]| {
            let mut v = verbs(args).unwrap();
            assert_eq!(v.len(), 1, "{v:?}");
            v.remove(0)
        };
        for name in ["setmonitor_timeout", "monitor_timeout"] {
            assert_eq!(
                one(&[json!(name), json!("5")]),
                Verb::Set {
                    key: "monitor_timeout",
                    value: json!("5")
                }
            );
        }
        assert_eq!(
            one(&[json!("framing_format"), json!(["json"])]),
            Verb::Set {
                key: "framing_format",
                value: json!(["json"])
            }
        );
        for (name, key) in [
            ("delnodeid", "nodeid"),
            ("delsecret", "secret"),
            ("delcert", "cert"),
            ("delseeds", "seeds"),
            ("delbinds", "binds"),
            ("delparent", "parent"),
            ("delservices", "services"),
            ("delautocork", "autocork"),
            ("delnodelay", "nodelay"),
        ] {
            assert_eq!(one(&[json!(name)]), Verb::Del { key });
        }
        assert_eq!(
            one(&[json!("setparent"), json!("base")]),
            Verb::Set {
                key: "parent",
                value: json!("base")
            }
        );
        assert_eq!(
            one(&[json!("cert"), json!("/x.pem")]),
            Verb::SetCert {
                file: "/x.pem".into()
            }
        );
        // setseeds takes exactly one list: a string split at commas, or a JSON array.
        assert_eq!(
            verbs(&[json!("setseeds"), json!("a:1,,b:2,"), json!("delsecret")]).unwrap(),
            [
                Verb::SetList {
                    key: "seeds",
                    items: vec![json!("a:1"), json!(""), json!("b:2")]
                },
                Verb::Del { key: "secret" }
            ]
        );
        assert_eq!(
            one(&[json!("setbinds"), json!("")]),
            Verb::SetList {
                key: "binds",
                items: vec![]
            }
        );
        assert_eq!(
            one(&[json!("setbinds"), json!(["*:4040"])]),
            Verb::SetList {
                key: "binds",
                items: vec![json!("*:4040")]
            }
        );
        // `seeds` (our older spelling) takes addresses up to the next verb.
        assert_eq!(
            verbs(&[
                json!("seeds"),
                json!("a:1"),
                json!("b:2,c:3"),
                json!("gensecret")
            ])
            .unwrap(),
            [
                Verb::SetList {
                    key: "seeds",
                    items: vec![json!("a:1"), json!("b:2"), json!("c:3")]
                },
                Verb::GenSecret
            ]
        );
        assert_eq!(
            one(&[json!("seeds")]),
            Verb::SetList {
                key: "seeds",
                items: vec![]
            }
        );
        assert_eq!(
            one(&[json!("addbind"), json!("*:1")]),
            Verb::AddItem {
                key: "binds",
                item: json!("*:1")
            }
        );
        assert_eq!(
            one(&[json!("delseed"), json!("a:1")]),
            Verb::DelItem {
                key: "seeds",
                item: json!("a:1")
            }
        );
    }

    #[test]
    fn protocol_verbs_take_the_rest() {
        assert_eq!(
            verbs(&[
                json!("snd"),
                json!("n"),
                json!("-1"),
                json!("profile"),
                json!([1])
            ])
            .unwrap(),
            [Verb::Snd {
                port: "n".into(),
                args: vec![json!("-1"), json!("profile"), json!([1])]
            }]
        );
        assert_eq!(
            verbs(&[json!("mon"), json!("n#p"), json!("delsecret")]).unwrap(),
            [
                Verb::Mon { port: "n#p".into() },
                Verb::Del { key: "secret" }
            ]
        );
        assert_eq!(
            verbs(&[json!("dbkeys"), json!("'l"), json!("dbfamily"), json!("f")]).unwrap(),
            [
                Verb::Db {
                    query: DbQuery::Keys,
                    family: "'l".into()
                },
                Verb::Db {
                    query: DbQuery::Family,
                    family: "f".into()
                }
            ]
        );
        assert_eq!(
            verbs(&[json!("dbvalues")]),
            Err(VerbError::Missing("family name missing".into()))
        );
        assert_eq!(
            verbs(&[json!("run"), json!("seed"), json!("nodeid"), json!("x")]).unwrap(),
            [Verb::Run {
                profile: Some("seed".into()),
                settings: Map::from_iter([("nodeid".to_owned(), json!("x"))])
            }]
        );
        assert_eq!(
            verbs(&[
                json!("run"),
                json!("profile"),
                json!("p"),
                json!("binds"),
                json!(["*"])
            ])
            .unwrap(),
            [Verb::Run {
                profile: Some("p".into()),
                settings: Map::from_iter([("binds".to_owned(), json!(["*"]))])
            }]
        );
        assert_eq!(
            verbs(&[json!("showconfig"), json!("p"), json!("secret"), json!("s")]).unwrap(),
            [Verb::ShowConfig {
                name: Some("p".into()),
                settings: Map::from_iter([("secret".to_owned(), json!("s"))])
            }]
        );
    }

    #[test]
    fn errors_in_the_references_words() {
        assert_eq!(verbs(&[]), Err(VerbError::Usage));
        assert_eq!(
            verbs(&[json!("frobnicate")]).unwrap_err().to_string(),
            "frobnicate: no such aemp command (try aemp --help)"
        );
        let missing = |args: &[Value]| verbs(args).unwrap_err().to_string();
        assert_eq!(missing(&[json!("addseed")]), "seed address missing");
        assert_eq!(missing(&[json!("setbinds")]), "bind addresses missing");
        assert_eq!(missing(&[json!("profile")]), "profile name is missing");
        assert_eq!(missing(&[json!("setsecret")]), "shared secret missing");
        assert_eq!(
            missing(&[json!("setcert")]),
            "key+certificate pem filename missing"
        );
        assert_eq!(
            missing(&[json!("connect_interval")]),
            "connect_interval value is missing"
        );
        assert_eq!(missing(&[json!("snd")]), "port id missing");
        assert!(matches!(
            verbs(&[json!("setseeds"), json!({"a": 1})]),
            Err(VerbError::NotList { .. })
        ));
        assert!(matches!(
            verbs(&[json!("snd"), json!(["x"])]),
            Err(VerbError::NotText { .. })
        ));
        assert!(matches!(
            verbs(&[json!("showconfig"), json!("p"), json!("secret")]),
            Err(VerbError::Unpaired { .. })
        ));
        // The verbs about Perl code edit the file or ask the remote node; only `shell`
        // is refused.
        assert_eq!(
            verbs(&[json!("eval"), json!("n#p"), json!("1"), json!("+ 1")]),
            Ok(vec![Verb::Eval {
                node: "n".into(),
                expr: "1 + 1".into()
            }])
        );
        assert_eq!(
            verbs(&[
                json!("trace"),
                json!("n"),
                json!("restart"),
                json!("m#"),
                json!("info"),
                json!("o#")
            ]),
            Ok(vec![
                Verb::Trace { node: "n".into() },
                Verb::Restart { node: "m".into() },
                Verb::Info { node: "o".into() }
            ])
        );
        // `dataconn NODE HANDLER ARGS...`: every argument after the handler is its.
        assert_eq!(
            verbs(&[
                json!("dataconn"),
                json!("n#"),
                json!("echo"),
                json!("a"),
                json!(1)
            ]),
            Ok(vec![Verb::DataConn {
                node: "n".into(),
                handler: "echo".into(),
                args: vec![json!("a"), json!(1)],
            }])
        );
        assert_eq!(
            missing(&[json!("dataconn"), json!("n")]),
            "handler name missing"
        );
        assert_eq!(
            verbs(&[
                json!("services"),
                json!("A::,B::"),
                json!("seteval"),
                json!("1")
            ]),
            Ok(vec![
                Verb::SetList {
                    key: "services",
                    items: vec![json!("A::"), json!("B::")]
                },
                Verb::Set {
                    key: "eval",
                    value: json!("1")
                }
            ])
        );
        assert_eq!(missing(&[json!("eval")]), "node id missing");
        assert_eq!(
            missing(&[json!("delservice")]),
            "service specification missing"
        );
        assert_eq!(
            verbs(&[json!("shell")]),
            Ok(vec![Verb::Shell { node: None }])
        );
        assert_eq!(
            verbs(&[json!("shell"), json!("n#")]),
            Ok(vec![Verb::Shell {
                node: Some("n".into())
            }])
        );
        let run = verbs(&[json!("run"), json!("services"), json!(["Foo::"])]).unwrap();
        assert!(
            matches!(&run[..], [Verb::Run { settings, .. }] if settings.contains_key("services"))
        );
    }
}
