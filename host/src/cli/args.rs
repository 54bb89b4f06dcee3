//! The command line before the verbs: our options (recognised anywhere, so the reference's
//! arguments pass untouched, `-1` included) and the reference's JSON typing of arguments.

use std::path::PathBuf;

use serde_json::Value;

/// Default seconds to wait for connections and replies.
pub const DEFAULT_TIMEOUT: f64 = 10.0;

/// The options, which override the configuration file.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    /// `--profile NAME`: the profile nodes use, and which config verbs edit at first.
    pub profile: Option<String>,
    /// `--connect HOST:PORT` (repeatable): reach a node directly, without seeds.
    pub connect: Vec<String>,
    /// `--secret S`: the shared secret.
    pub secret: Option<String>,
    /// `--cert FILE`: PEM file with certificate, key and CA certificate.
    pub cert: Option<PathBuf>,
    /// `--framing json|cbor`: the only framing to ask for.
    pub framing: Option<String>,
    /// `--listen HOST:PORT` (repeatable): replaces the configured binds.
    pub listen: Vec<String>,
    /// `--nodeid ID`: this node's id.
    pub nodeid: Option<String>,
    /// `--timeout SECONDS`: how long to wait for connections and replies.
    pub timeout: f64,
    /// `--max-memory MIB`: the node's sandbox memory limit (default: the sandbox's).
    pub max_memory_mib: Option<usize>,
    /// `-v` (repeatable, or `--verbose`): more log output.
    pub verbose: u8,
    /// `--echo`: `run` adds the `echo` port.
    pub echo: bool,
    /// `--metrics HOST:PORT`: `run` serves its metrics there (Prometheus text over HTTP).
    pub metrics: Option<String>,
    /// `--json`: `snd`, `cal`, `mon`, `eval` print JSON arrays instead of the reference's
    /// output.
    pub json: bool,
    /// `-h`/`--help`.
    pub help: bool,
    /// `-V`/`--version`.
    pub version: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            profile: None,
            connect: Vec::new(),
            secret: None,
            cert: None,
            framing: None,
            listen: Vec::new(),
            nodeid: None,
            timeout: DEFAULT_TIMEOUT,
            max_memory_mib: None,
            verbose: 0,
            echo: false,
            metrics: None,
            json: false,
            help: false,
            version: false,
        }
    }
}

/// Why the command line could not be read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ArgError {
    /// An option that takes a value came last.
    #[error("option {0} needs a value")]
    MissingValue(String),
    /// `--timeout` is not a non-negative number.
    #[error("--timeout: '{0}' is not a number of seconds")]
    Timeout(String),
    /// `--max-memory` is not a whole number of MiB between 1 and 65536.
    #[error("--max-memory: '{0}' is not a number of MiB from 1 to 65536")]
    MaxMemory(String),
    /// A flag was given a value (`--echo=x`).
    #[error("option {0} takes no value")]
    UnexpectedValue(String),
    /// An argument starting with `[`, `{` or `"` is not JSON.
    #[error("argument '{arg}' is not valid JSON: {message}")]
    Json {
        /// The argument as typed.
        arg: String,
        /// What the parser disliked.
        message: String,
    },
}

/// Takes our options out of `argv` (program name excluded), wherever they are, up to a `--`
/// (dropped; everything after it is an argument); returns the options and the arguments in
/// their order. Anything not exactly one of our options is an argument, as typed.
pub fn split_options(argv: Vec<String>) -> Result<(Options, Vec<String>), ArgError> {
    let mut opts = Options::default();
    let mut rest = Vec::new();
    let mut argv = argv.into_iter();
    while let Some(arg) = argv.next() {
        if arg == "--" {
            rest.extend(argv.by_ref());
            break;
        }
        // `-v`, `-vv`, ...
        if arg.len() > 1 && arg.starts_with('-') && arg[1..].bytes().all(|b| b == b'v') {
            let count = u8::try_from(arg.len() - 1).unwrap_or(u8::MAX);
            opts.verbose = opts.verbose.saturating_add(count);
            continue;
        }
        let (name, inline) = match arg.split_once('=') {
            Some((name, value)) if name.starts_with("--") => (name, Some(value.to_owned())),
            _ => (arg.as_str(), None),
        };
        if name == "--verbose" {
            if inline.is_some() {
                return Err(ArgError::UnexpectedValue(name.to_owned()));
            }
            opts.verbose = opts.verbose.saturating_add(1);
            continue;
        }
        let switch = match name {
            "--echo" => Some(&mut opts.echo),
            "--json" => Some(&mut opts.json),
            "-h" | "--help" => Some(&mut opts.help),
            "-V" | "--version" => Some(&mut opts.version),
            _ => None,
        };
        if let Some(switch) = switch {
            if inline.is_some() {
                return Err(ArgError::UnexpectedValue(name.to_owned()));
            }
            *switch = true;
            continue;
        }
        if !matches!(
            name,
            "--profile"
                | "--connect"
                | "--secret"
                | "--cert"
                | "--framing"
                | "--listen"
                | "--nodeid"
                | "--timeout"
                | "--max-memory"
                | "--metrics"
        ) {
            rest.push(arg);
            continue;
        }
        let value = match inline {
            Some(value) => value,
            None => argv
                .next()
                .ok_or_else(|| ArgError::MissingValue(name.to_owned()))?,
        };
        match name {
            "--profile" => opts.profile = Some(value),
            "--connect" => opts.connect.push(value),
            "--secret" => opts.secret = Some(value),
            "--cert" => opts.cert = Some(PathBuf::from(value)),
            "--framing" => opts.framing = Some(value),
            "--listen" => opts.listen.push(value),
            "--nodeid" => opts.nodeid = Some(value),
            "--metrics" => opts.metrics = Some(value),
            "--max-memory" => {
                opts.max_memory_mib = Some(
                    value
                        .trim()
                        .parse::<usize>()
                        .ok()
                        .filter(|m| (1..=65536).contains(m))
                        .ok_or(ArgError::MaxMemory(value))?,
                );
            }
            _ => {
                opts.timeout = value
                    .trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|t| t.is_finite() && *t >= 0.0)
                    .ok_or(ArgError::Timeout(value))?;
            }
        }
    }
    Ok((opts, rest))
}

/// Types the arguments as the reference's `aemp` does: a lone argument starting with `[` is
/// a JSON array that replaces all arguments; otherwise each argument starting with `[`, `{`
/// or `"` is one JSON value, and every other argument is a string as typed.
pub fn type_args(args: Vec<String>) -> Result<Vec<Value>, ArgError> {
    if let [only] = args.as_slice()
        && only.starts_with('[')
    {
        return match json(only)? {
            Value::Array(items) => Ok(items),
            // Starts with `[`, so it can only be an array.
            other => Ok(vec![other]),
        };
    }
    args.into_iter()
        .map(|arg| {
            if arg.starts_with(['[', '{', '"']) {
                json(&arg)
            } else {
                Ok(Value::String(arg))
            }
        })
        .collect()
}

/// One argument parsed as JSON.
fn json(arg: &str) -> Result<Value, ArgError> {
    serde_json::from_str(arg).map_err(|e| ArgError::Json {
        arg: arg.to_owned(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn options_anywhere_arguments_as_typed() {
        let (opts, rest) = split_options(strings(&[
            "snd",
            "--connect",
            "h:1",
            "n#p",
            "-1",
            "-x",
            "--timeout=2.5",
            "-vv",
            "--profile",
            "p",
            "--connect=h:2",
            "--",
            "--secret",
            "-v",
        ]))
        .unwrap();
        assert_eq!(rest, ["snd", "n#p", "-1", "-x", "--secret", "-v"]);
        assert_eq!(opts.connect, ["h:1", "h:2"]);
        assert_eq!(opts.timeout, 2.5);
        assert_eq!(opts.verbose, 2);
        assert_eq!(opts.profile.as_deref(), Some("p"));
        assert_eq!(opts.secret, None);

        let (opts, rest) = split_options(strings(&["run", "--echo", "-v", "--verbose"])).unwrap();
        assert_eq!(rest, ["run"]);
        assert!(opts.echo);
        assert_eq!(opts.verbose, 2);
        let (opts, _) = split_options(Vec::new()).unwrap();
        assert_eq!(opts, Options::default());
    }

    #[test]
    fn option_errors() {
        assert_eq!(
            split_options(strings(&["snd", "--secret"])),
            Err(ArgError::MissingValue("--secret".into()))
        );
        assert_eq!(
            split_options(strings(&["--timeout", "soon"])),
            Err(ArgError::Timeout("soon".into()))
        );
        assert_eq!(
            split_options(strings(&["--timeout", "-1"])),
            Err(ArgError::Timeout("-1".into()))
        );
        assert_eq!(
            split_options(strings(&["--max-memory", "0"])),
            Err(ArgError::MaxMemory("0".into()))
        );
        assert_eq!(
            split_options(strings(&["--max-memory=64"])).map(|(o, _)| o.max_memory_mib),
            Ok(Some(64))
        );
        assert_eq!(
            split_options(strings(&["--echo=1"])),
            Err(ArgError::UnexpectedValue("--echo".into()))
        );
    }

    #[test]
    fn json_typing_as_the_reference() {
        // A lone leading `[` replaces everything.
        assert_eq!(
            type_args(strings(&[r#"["snd","n",1,{"a":null}]"#])).unwrap(),
            [json!("snd"), json!("n"), json!(1), json!({"a": null})]
        );
        // Otherwise argument by argument; numbers and `-1` stay strings.
        assert_eq!(
            type_args(strings(&[
                "snd",
                "n#p",
                "-1",
                "42",
                "[1,2]",
                "{\"k\":true}",
                "\"q\"",
                "x[",
                "null"
            ]))
            .unwrap(),
            [
                json!("snd"),
                json!("n#p"),
                json!("-1"),
                json!("42"),
                json!([1, 2]),
                json!({"k": true}),
                json!("q"),
                json!("x["),
                json!("null"),
            ]
        );
        // A leading `[` that is not alone is one JSON argument.
        assert_eq!(
            type_args(strings(&["[1]", "x"])).unwrap(),
            [json!([1]), json!("x")]
        );
        let err = type_args(strings(&["snd", "{oops"])).unwrap_err();
        assert!(
            matches!(&err, ArgError::Json { arg, .. } if arg == "{oops"),
            "{err}"
        );
        assert!(type_args(strings(&["[1,"])).is_err());
    }
}
