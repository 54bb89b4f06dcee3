//! Requests to the node port, `["", TAG, ARGS...]`, parsed once into typed values, as a
//! transport parses frames: the kernel, the global client and the global service take a
//! [`Request`] and never look at tags or argument positions. What real nodes tolerate
//! (missing trailing arguments, extra ones) is tolerated here too; what a handler could
//! not act on (a port that is not a name) is a [`RequestError`].

use std::collections::BTreeMap;

use crate::value::{DecodeError, Value};

/// Items a node-port request may hold, all nested items counted: decoded, each takes at
/// least a `Value` (32 bytes), so this bounds a request's tree to about 64 MiB of the
/// sandbox, while a 16 MiB message of one-byte items would take 512 MiB. The largest
/// requests real nodes send, `g_set` with a whole database, stay well below it.
pub(crate) const MAX_REQUEST_ITEMS: usize = 1 << 21;

/// Key -> value of one family of the database, as requests carry it.
pub(crate) type Entries = BTreeMap<String, Value>;

/// Where to send a reply: a port id and the items the asker wants before the answer.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ReplyTo {
    pub port_id: String,
    pub extra: Vec<Value>,
}

/// Which of a family's parts a database query wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Query {
    /// `g_db_family`: the map of keys to values.
    Family,
    /// `g_db_keys`: the keys.
    Keys,
    /// `g_db_values`: the values.
    Values,
}

impl Query {
    /// The query's tag on the wire.
    pub(crate) fn tag(self) -> &'static str {
        match self {
            Query::Family => "g_db_family",
            Query::Keys => "g_db_keys",
            Query::Values => "g_db_values",
        }
    }
}

/// A request to the node port.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Request {
    /// `""`, `devnull`: nothing to do.
    Nothing,
    /// `mon1 PORT`: the sender monitors our port.
    Monitor { port: String },
    /// `mon0 PORT`: the sender stops monitoring our port.
    Unmonitor { port: String },
    /// `kil0 PORT REASON...`: a port of the sender's that we monitor is gone.
    PortDown { port: String, reason: Vec<Value> },
    /// `kil1 PORT REASON...`: kill our port.
    Kill { port: String, reason: Vec<Value> },
    /// `snd PORT_ID ARGS...`: relay `[PORT, ARGS...]` to the node of `PORT_ID`.
    Relay { port_id: String, args: Vec<Value> },
    /// `can TAG [PORT_ID EXTRA...]`: whether we understand `TAG`.
    Can {
        query: String,
        reply: Option<ReplyTo>,
    },
    /// `time [PORT_ID EXTRA...]`: our wall clock.
    Time { reply: Option<ReplyTo> },
    /// `eval EXPR [PORT_ID EXTRA...]`: never executed.
    Eval { reply: Option<ReplyTo> },
    /// A request of the global protocol.
    Global(GlobalRequest),
    /// A request about a data connection (`AnyEvent::MP::DataConn::*`).
    Data(DataRequest),
    /// Any other tag: an application handler's (which gets the arguments as they came),
    /// or refused.
    Other { tag: String },
}

/// A request of the global protocol: answers a global node sends its slaves, and the
/// requests a global node serves.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum GlobalRequest {
    /// `g_global`: the sender is a global node.
    IsGlobal,
    /// `g_reply ID RESULT`: the answer to our database query `ID`.
    Reply { id: String, result: Value },
    /// `g_found NODE ADDRS`: where `NODE` listens.
    Found { node: String, addrs: Vec<String> },
    /// `g_chg1 FAMILY ENTRIES`: a monitored family, whole.
    Whole { family: String, entries: Entries },
    /// `g_chg2 FAMILY SET DEL`: a change of a monitored family.
    Changed {
        family: String,
        set: Entries,
        del: Vec<String>,
    },
    /// `g_slave [DB]`: the sender slaves to us (the empty form only starts the service).
    Slave {
        db: Option<BTreeMap<String, Entries>>,
    },
    /// `g_set DB`: another global node's slaves' entries, whole.
    Set { db: BTreeMap<String, Entries> },
    /// `g_upd FAMILY SET DEL`: a change of the sender's entries.
    Update {
        family: String,
        set: Entries,
        del: Vec<String>,
    },
    /// `g_find NODE`: where `NODE` listens.
    Find { node: String },
    /// `g_db_* FAMILY ID`: part of a family, answered with `g_reply ID ...`.
    Query {
        query: Query,
        family: String,
        id: Value,
    },
    /// `g_mon1 FAMILY`: the sender monitors a family.
    Watch { family: String },
    /// `g_mon0 FAMILY`: the sender stops monitoring a family.
    Unwatch { family: String },
}

impl GlobalRequest {
    /// The request's tag on the wire.
    pub(crate) fn tag(&self) -> &'static str {
        match self {
            GlobalRequest::IsGlobal => "g_global",
            GlobalRequest::Reply { .. } => "g_reply",
            GlobalRequest::Found { .. } => "g_found",
            GlobalRequest::Whole { .. } => "g_chg1",
            GlobalRequest::Changed { .. } => "g_chg2",
            GlobalRequest::Slave { .. } => "g_slave",
            GlobalRequest::Set { .. } => "g_set",
            GlobalRequest::Update { .. } => "g_upd",
            GlobalRequest::Find { .. } => "g_find",
            GlobalRequest::Query { query, .. } => query.tag(),
            GlobalRequest::Watch { .. } => "g_mon1",
            GlobalRequest::Unwatch { .. } => "g_mon0",
        }
    }

    /// Whether a global node serves this request (the rest are answers to a slave).
    pub(crate) fn is_service(&self) -> bool {
        !matches!(
            self,
            GlobalRequest::Reply { .. }
                | GlobalRequest::Found { .. }
                | GlobalRequest::Whole { .. }
                | GlobalRequest::Changed { .. }
        )
    }
}

/// The tag of [`DataRequest::Expect`]: in the reference a function name, here only a tag.
pub(crate) const DATA_EXPECT: &str = "AnyEvent::MP::DataConn::_expect";
/// The tag of [`DataRequest::Connect`].
pub(crate) const DATA_CONNECT: &str = "AnyEvent::MP::DataConn::_connect";

/// A request about a data connection, as AnyEvent::MP::DataConn sends them.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum DataRequest {
    /// `_expect ID PORT TIMEOUT INITFUNC INITDATA...`: the sender will open data
    /// connection `id` to us (or ask us to open it, [`DataRequest::Connect`]) within
    /// `timeout_ms`; once it is up, the handler named `handler` gets it with `init_args`;
    /// on failure `port` (the sender's) is killed.
    Expect {
        id: String,
        port: String,
        timeout_ms: u64,
        handler: String,
        init_args: Vec<Value>,
    },
    /// `_connect ID NODE`: open the data connection `id` we expect to `node` ourselves.
    Connect { id: String, node: String },
}

/// Why a node-port request was dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum RequestError {
    /// Not a CBOR array, or more than [`MAX_REQUEST_ITEMS`] items.
    #[error("{0}")]
    Decode(#[from] DecodeError),
    /// The request is not an array.
    #[error("not an array")]
    NotAnArray,
    /// The first item is missing or not a name.
    #[error("without a tag")]
    NoTag,
    /// An argument the request cannot do without is missing or not a name.
    #[error("{tag} without a {what}")]
    Missing {
        tag: &'static str,
        what: &'static str,
    },
}

/// Every tag [`parse`] understands (the fuzz target sends each of them; a test checks
/// that none of them falls through to [`Request::Other`]).
pub const REQUEST_TAGS: &[&str] = &[
    "",
    "devnull",
    "mon1",
    "mon0",
    "kil0",
    "kil1",
    "snd",
    "can",
    "time",
    "eval",
    "g_global",
    "g_reply",
    "g_found",
    "g_chg1",
    "g_chg2",
    "g_slave",
    "g_set",
    "g_upd",
    "g_find",
    "g_db_family",
    "g_db_keys",
    "g_db_values",
    "g_mon1",
    "g_mon0",
    DATA_EXPECT,
    DATA_CONNECT,
];

/// Parses `[TAG, ARGS...]`, the node-port message without its port.
pub(crate) fn parse(args: &[u8]) -> Result<Request, RequestError> {
    let Value::Array(items) = Value::decode_within(args, MAX_REQUEST_ITEMS)? else {
        return Err(RequestError::NotAnArray);
    };
    let mut items = items.into_iter();
    let tag = items
        .next()
        .as_ref()
        .and_then(name)
        .ok_or(RequestError::NoTag)?;
    let mut args = Args(items);
    let global = |g| Ok(Request::Global(g));
    match tag.as_str() {
        "" | "devnull" => Ok(Request::Nothing),
        "mon1" => Ok(Request::Monitor {
            port: args.name("mon1", "port")?,
        }),
        "mon0" => Ok(Request::Unmonitor {
            port: args.name("mon0", "port")?,
        }),
        "kil0" => Ok(Request::PortDown {
            port: args.name("kil0", "port")?,
            reason: args.rest(),
        }),
        "kil1" => Ok(Request::Kill {
            port: args.name("kil1", "port")?,
            reason: args.rest(),
        }),
        "snd" => Ok(Request::Relay {
            port_id: args.name("snd", "port id")?,
            args: args.rest(),
        }),
        "can" => Ok(Request::Can {
            query: args.name("can", "tag")?,
            reply: args.reply_to(),
        }),
        "time" => Ok(Request::Time {
            reply: args.reply_to(),
        }),
        "eval" => {
            args.0.next();
            Ok(Request::Eval {
                reply: args.reply_to(),
            })
        }
        "g_global" => global(GlobalRequest::IsGlobal),
        "g_reply" => global(GlobalRequest::Reply {
            id: args.name("g_reply", "request id")?,
            result: args.value(),
        }),
        "g_found" => global(GlobalRequest::Found {
            node: args.name("g_found", "node id")?,
            addrs: names(&args.value()),
        }),
        "g_chg1" => global(GlobalRequest::Whole {
            family: args.name("g_chg1", "family")?,
            entries: entries(&args.value()),
        }),
        "g_chg2" => global(GlobalRequest::Changed {
            family: args.name("g_chg2", "family")?,
            set: entries(&args.value()),
            del: names(&args.value()),
        }),
        "g_slave" => global(GlobalRequest::Slave {
            db: args.0.next().map(|db| database(&db)),
        }),
        "g_set" => {
            let db = args.0.next().ok_or(RequestError::Missing {
                tag: "g_set",
                what: "database",
            })?;
            global(GlobalRequest::Set { db: database(&db) })
        }
        "g_upd" => global(GlobalRequest::Update {
            family: args.name("g_upd", "family")?,
            set: entries(&args.value()),
            del: names(&args.value()),
        }),
        "g_find" => global(GlobalRequest::Find {
            node: args.name("g_find", "node id")?,
        }),
        "g_db_family" | "g_db_keys" | "g_db_values" => {
            let query = match tag.as_str() {
                "g_db_family" => Query::Family,
                "g_db_keys" => Query::Keys,
                _ => Query::Values,
            };
            global(GlobalRequest::Query {
                query,
                family: args.name("g_db_*", "family")?,
                id: args.value(),
            })
        }
        "g_mon1" => global(GlobalRequest::Watch {
            family: args.name("g_mon1", "family")?,
        }),
        "g_mon0" => global(GlobalRequest::Unwatch {
            family: args.name("g_mon0", "family")?,
        }),
        DATA_EXPECT => Ok(Request::Data(DataRequest::Expect {
            id: args.name("_expect", "data connection id")?,
            port: args.name("_expect", "port")?,
            timeout_ms: args.seconds("_expect", "timeout")?,
            handler: args.name("_expect", "handler")?,
            init_args: args.rest(),
        })),
        DATA_CONNECT => Ok(Request::Data(DataRequest::Connect {
            id: args.name("_connect", "data connection id")?,
            node: args.name("_connect", "node id")?,
        })),
        _ => Ok(Request::Other { tag }),
    }
}

/// The arguments after the tag, taken in order.
struct Args(std::vec::IntoIter<Value>);

impl Args {
    /// The next argument as a name.
    fn name(&mut self, tag: &'static str, what: &'static str) -> Result<String, RequestError> {
        self.0
            .next()
            .as_ref()
            .and_then(name)
            .ok_or(RequestError::Missing { tag, what })
    }

    /// The next argument as a duration in seconds (a number, or a text that is one, as
    /// Perl reads it), in milliseconds; negative, NaN and missing durations are errors,
    /// and one beyond what milliseconds can hold is the longest.
    fn seconds(&mut self, tag: &'static str, what: &'static str) -> Result<u64, RequestError> {
        let seconds = match self.0.next() {
            Some(Value::Int(n)) => n as f64,
            Some(Value::Float(f)) => f,
            Some(v) => v
                .as_name()
                .and_then(|t| t.trim().parse::<f64>().ok())
                .unwrap_or(f64::NAN),
            None => f64::NAN,
        };
        if seconds.is_nan() || seconds < 0.0 {
            return Err(RequestError::Missing { tag, what });
        }
        // `as` saturates: past u64::MAX milliseconds is u64::MAX.
        Ok((seconds * 1000.0).round() as u64)
    }

    /// The next argument, null when there is none.
    fn value(&mut self) -> Value {
        self.0.next().unwrap_or(Value::Null)
    }

    /// The arguments left.
    fn rest(self) -> Vec<Value> {
        self.0.collect()
    }

    /// `[PORT_ID EXTRA...]`: where to reply, if the next argument is a name.
    fn reply_to(mut self) -> Option<ReplyTo> {
        let port_id = name(&self.0.next()?)?;
        Some(ReplyTo {
            port_id,
            extra: self.rest(),
        })
    }
}

fn name(value: &Value) -> Option<String> {
    value.as_name().map(|n| n.into_owned())
}

/// The names in an array (other items, or anything but an array, give none).
fn names(value: &Value) -> Vec<String> {
    match value {
        Value::Array(items) => items.iter().filter_map(name).collect(),
        _ => Vec::new(),
    }
}

/// A map with name keys (pairs whose key is not a name are skipped; anything but a map
/// is empty).
fn entries(value: &Value) -> Entries {
    match value {
        Value::Map(pairs) => pairs
            .iter()
            .filter_map(|(k, v)| Some((name(k)?, v.clone())))
            .collect(),
        _ => Entries::new(),
    }
}

/// A map of families to maps of entries.
fn database(value: &Value) -> BTreeMap<String, Entries> {
    entries(value)
        .into_iter()
        .map(|(family, set)| (family, entries(&set)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_tag_is_parsed_and_no_other() {
        // Arguments enough for every tag that needs some.
        let args = || (0..4).map(|_| Value::Text("x#y".into()));
        for tag in REQUEST_TAGS {
            let items = std::iter::once(Value::Text((*tag).into())).chain(args());
            let parsed = parse(&Value::Array(items.collect()).encode());
            assert!(
                !matches!(parsed, Ok(Request::Other { .. })),
                "{tag:?} is listed but not parsed: {parsed:?}"
            );
        }
        let other = Value::Array(vec![Value::Text("handled".into())]).encode();
        assert!(matches!(parse(&other), Ok(Request::Other { .. })));
    }

    fn t(s: &str) -> Value {
        Value::text(s)
    }

    fn parse_items(items: Vec<Value>) -> Result<Request, RequestError> {
        parse(&Value::Array(items).encode())
    }

    #[test]
    fn kernel_requests() {
        assert_eq!(parse_items(vec![t("")]), Ok(Request::Nothing));
        assert_eq!(
            parse_items(vec![t("kil1"), t("p"), t("die"), Value::Int(1)]),
            Ok(Request::Kill {
                port: "p".into(),
                reason: vec![t("die"), Value::Int(1)]
            })
        );
        // Byte-string names are names (Latin-1), as everywhere.
        assert_eq!(
            parse_items(vec![
                Value::Bytes(b"mon1".to_vec()),
                Value::Bytes(vec![0xe9])
            ]),
            Ok(Request::Monitor {
                port: "\u{e9}".into()
            })
        );
        assert_eq!(
            parse_items(vec![t("can"), t("snd"), t("n#r"), Value::Int(7)]),
            Ok(Request::Can {
                query: "snd".into(),
                reply: Some(ReplyTo {
                    port_id: "n#r".into(),
                    extra: vec![Value::Int(7)]
                })
            })
        );
        // No reply port: nothing to answer, as the reference does.
        assert_eq!(
            parse_items(vec![t("time")]),
            Ok(Request::Time { reply: None })
        );
        assert_eq!(
            parse_items(vec![t("eval"), t("1+1"), t("n#r")]),
            Ok(Request::Eval {
                reply: Some(ReplyTo {
                    port_id: "n#r".into(),
                    extra: vec![]
                })
            })
        );
        assert_eq!(
            parse_items(vec![t("whatever"), Value::Int(1)]),
            Ok(Request::Other {
                tag: "whatever".into()
            })
        );
    }

    #[test]
    fn global_requests() {
        let map = |pairs: Vec<(&str, Value)>| {
            Value::Map(pairs.into_iter().map(|(k, v)| (t(k), v)).collect())
        };
        assert_eq!(
            parse_items(vec![
                t("g_upd"),
                t("f"),
                map(vec![("k", Value::Int(1))]),
                Value::Array(vec![t("gone"), Value::Int(5)])
            ]),
            Ok(Request::Global(GlobalRequest::Update {
                family: "f".into(),
                set: Entries::from([("k".into(), Value::Int(1))]),
                del: vec!["gone".into()],
            }))
        );
        // Missing trailing arguments are empty, as Perl reads them.
        assert_eq!(
            parse_items(vec![t("g_chg2"), t("f")]),
            Ok(Request::Global(GlobalRequest::Changed {
                family: "f".into(),
                set: Entries::new(),
                del: vec![],
            }))
        );
        assert_eq!(
            parse_items(vec![t("g_slave")]),
            Ok(Request::Global(GlobalRequest::Slave { db: None }))
        );
        let db = map(vec![("'l", map(vec![("n", Value::Array(vec![t("n:1")]))]))]);
        let Ok(Request::Global(GlobalRequest::Set { db })) = parse_items(vec![t("g_set"), db])
        else {
            panic!("g_set parses");
        };
        assert_eq!(db["'l"]["n"], Value::Array(vec![t("n:1")]));
        let query = parse_items(vec![t("g_db_keys"), t("f"), t("id")]);
        assert_eq!(
            query,
            Ok(Request::Global(GlobalRequest::Query {
                query: Query::Keys,
                family: "f".into(),
                id: t("id"),
            }))
        );
        let Ok(Request::Global(g)) = query else {
            unreachable!()
        };
        assert_eq!((g.tag(), g.is_service()), ("g_db_keys", true));
    }

    #[test]
    fn data_connection_requests() {
        // As connect_to sends it: id, the requesting port, seconds, the init function and
        // its arguments.
        assert_eq!(
            parse_items(vec![
                t(DATA_EXPECT),
                t("b@one"),
                t("one#p"),
                Value::Int(5),
                t("pkg::receiver"),
                Value::Int(1),
                t("x"),
            ]),
            Ok(Request::Data(DataRequest::Expect {
                id: "b@one".into(),
                port: "one#p".into(),
                timeout_ms: 5000,
                handler: "pkg::receiver".into(),
                init_args: vec![Value::Int(1), t("x")],
            }))
        );
        // Fractional seconds, and a number Perl would read from a text.
        for (timeout, ms) in [(Value::Float(2.5), 2500), (t(" 0.25"), 250)] {
            let Ok(Request::Data(DataRequest::Expect { timeout_ms, .. })) = parse_items(vec![
                t(DATA_EXPECT),
                t("b@one"),
                t("one#p"),
                timeout,
                t("h"),
            ]) else {
                panic!("_expect parses");
            };
            assert_eq!(timeout_ms, ms);
        }
        // A timeout beyond what milliseconds hold is the longest, not an overflow.
        let Ok(Request::Data(DataRequest::Expect { timeout_ms, .. })) = parse_items(vec![
            t(DATA_EXPECT),
            t("i"),
            t("p"),
            Value::Float(1e300),
            t("h"),
        ]) else {
            panic!("_expect parses");
        };
        assert_eq!(timeout_ms, u64::MAX);
        assert_eq!(
            parse_items(vec![
                t(DATA_CONNECT),
                t("b@one"),
                Value::Bytes(b"one".to_vec())
            ]),
            Ok(Request::Data(DataRequest::Connect {
                id: "b@one".into(),
                node: "one".into(),
            }))
        );
    }

    #[test]
    fn malformed_data_connection_requests_are_errors() {
        let err = |items: Vec<Value>| parse_items(items).map_err(|e| e.to_string());
        assert_eq!(
            err(vec![t(DATA_EXPECT)]),
            Err("_expect without a data connection id".into())
        );
        assert_eq!(
            err(vec![t(DATA_EXPECT), t("i"), Value::Null]),
            Err("_expect without a port".into())
        );
        for timeout in [
            Value::Float(-1.0),
            Value::Float(f64::NAN),
            t("soon"),
            Value::Null,
        ] {
            assert_eq!(
                err(vec![t(DATA_EXPECT), t("i"), t("p"), timeout, t("h")]),
                Err("_expect without a timeout".into())
            );
        }
        assert_eq!(
            err(vec![t(DATA_EXPECT), t("i"), t("p"), Value::Int(1)]),
            Err("_expect without a handler".into())
        );
        assert_eq!(
            err(vec![t(DATA_CONNECT), t("i"), Value::Array(vec![])]),
            Err("_connect without a node id".into())
        );
        assert_eq!(
            err(vec![t(DATA_CONNECT)]),
            Err("_connect without a data connection id".into())
        );
    }

    #[test]
    fn what_cannot_be_acted_on_is_an_error() {
        assert_eq!(parse_items(vec![]), Err(RequestError::NoTag));
        assert_eq!(parse_items(vec![Value::Int(1)]), Err(RequestError::NoTag));
        assert_eq!(parse(&t("mon1").encode()), Err(RequestError::NotAnArray));
        assert_eq!(
            parse_items(vec![t("mon1"), Value::Int(1)]).map_err(|e| e.to_string()),
            Err("mon1 without a port".into())
        );
        assert_eq!(
            parse_items(vec![t("g_set")]).map_err(|e| e.to_string()),
            Err("g_set without a database".into())
        );
        let many = [
            &[0x9a][..],
            &(MAX_REQUEST_ITEMS as u32).to_be_bytes(),
            b"\x60",
        ]
        .concat();
        let mut many = many;
        many.resize(many.len() + MAX_REQUEST_ITEMS, 0x01);
        assert_eq!(
            parse(&many).map_err(|e| e.to_string()),
            Err(format!("decode error: more than {MAX_REQUEST_ITEMS} items"))
        );
    }
}
