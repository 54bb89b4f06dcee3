//! Finding, reading and writing the configuration file.

use std::ffi::OsString;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::ConfigError;

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
    use serde_json::json;

    use crate::config::set_key;

    fn parse(text: &str) -> Result<Value, ConfigError> {
        parse_relaxed(text.as_bytes(), Path::new("/rc"))
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
}
