//! The `aemp` binary driven as a user would: a node with `run --echo` in the background,
//! then `cal`, `mon` and `snd` against it.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

const AEMP: &str = env!("CARGO_BIN_EXE_aemp");

/// Kills the background node when the test ends, however it ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn aemp(rc: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(AEMP)
        .args(args)
        .env("PERL_ANYEVENT_MP_RC", rc)
        .output()
        .expect("run aemp");
    let text = |b: Vec<u8>| String::from_utf8(b).expect("utf-8");
    (
        out.status.code().unwrap_or(-1),
        text(out.stdout),
        text(out.stderr),
    )
}

/// `aemp run --echo` for profile `srv` (node `srv`) on loopback, with `extra`
/// arguments, in the background: the guard, its address and the rest of its output.
fn echo_server(
    rc: &std::path::Path,
    extra: &[&str],
) -> (
    Running,
    String,
    std::io::Lines<BufReader<std::process::ChildStdout>>,
) {
    let mut child = Command::new(AEMP)
        .args([
            "run",
            "--echo",
            "--profile",
            "srv",
            "--listen",
            "127.0.0.1:0",
        ])
        .args(extra)
        .env("PERL_ANYEVENT_MP_RC", rc)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let running = Running(child);
    let mut lines = BufReader::new(stdout).lines();
    let first = lines.next().unwrap().unwrap();
    let addr = first
        .strip_prefix("node srv listening on ")
        .unwrap_or_else(|| panic!("{first}"))
        .to_owned();
    (running, addr, lines)
}

#[test]
fn run_echo_then_cal_mon_snd() {
    let dir = tempfile::tempdir().unwrap();
    let rc = dir.path().join("rc");
    // The configuration file is AnyEvent::MP's: relaxed JSON, profiles.
    std::fs::write(&rc, "{ \"secret\": \"cli test\", # shared by both\n \"profile\": { \"srv\": { \"nodeid\": \"srv\" }, }, }").unwrap();
    let (code, _, err) = aemp(&rc, &["gensecret", "--profile", "other"]);
    assert_eq!(code, 0, "{err}");

    let (_running, addr, mut lines) = echo_server(&rc, &[]);
    assert_eq!(lines.next().unwrap().unwrap(), "echo port srv#echo");

    // The echo port sends the remaining arguments to the port in its first argument:
    // with cal, the reply port is the only argument, so the reply is empty. The reply's
    // values print as the reference prints them: JSON separated by commas.
    let (code, out, err) = aemp(&rc, &["cal", "srv#echo", "--connect", &addr]);
    assert_eq!((code, out.as_str()), (0, "\n"), "{err}");
    let (code, out, err) = aemp(&rc, &["cal", "srv#echo", "--connect", &addr, "--json"]);
    assert_eq!((code, out.as_str()), (0, "[]\n"), "{err}");
    // Through the node port: `can` answers with the extra arguments, then true/false.
    let (code, out, err) = aemp(&rc, &["cal", "srv#", "can", "snd", "--connect", &addr]);
    assert_eq!((code, out.as_str()), (0, "true\n"), "{err}");
    let (code, out, _) = aemp(
        &rc,
        &["cal", "srv#", "eval", "system 'true'", "--connect", &addr],
    );
    assert_eq!(
        (code, out.as_str()),
        (0, "\"remote execution not allowed\"\n")
    );
    // No reply: a non-zero exit and one clear line.
    let (code, out, err) = aemp(
        &rc,
        &["cal", "srv#nope", "--connect", &addr, "--timeout", "1"],
    );
    assert_eq!(
        (code, out.as_str(), err.as_str()),
        (1, "", "aemp: no reply from srv#nope within 1s\n")
    );
    // The reason's words joined by spaces, as the reference's `print join " ", ..., "\n"`.
    let (code, out, _) = aemp(&rc, &["mon", "srv#nope", "--connect", &addr]);
    assert_eq!(
        (code, out.as_str()),
        (
            0,
            "no_such_port cannot monitor nonexistent port srv#nope \n"
        )
    );
    let (code, out, _) = aemp(&rc, &["mon", "srv#nope", "--connect", &addr, "--json"]);
    assert_eq!(
        (code, out.as_str()),
        (
            0,
            "[\"no_such_port\",\"cannot monitor nonexistent port\",\"srv#nope\"]\n"
        )
    );
    let (code, _, err) = aemp(&rc, &["snd", "srv#echo", "[1,2]", "--connect", &addr]);
    assert_eq!(code, 0, "{err}");
    // The wrong secret is refused, and said at once with the handshake's reason (in the
    // reference's words), not after the timeout.
    let asked = std::time::Instant::now();
    let (code, _, err) = aemp(
        &rc,
        &[
            "snd",
            "srv#echo",
            "--connect",
            &addr,
            "--secret",
            "wrong",
            "--timeout",
            "20",
        ],
    );
    assert_eq!(
        (code, err.as_str()),
        (
            1,
            "aemp: connection failed: authentication failure/shared secret mismatch\n"
        )
    );
    assert!(asked.elapsed() < std::time::Duration::from_secs(10));
}

#[test]
fn dataconn_pipes_stdin_through_a_data_connection() {
    let dir = tempfile::tempdir().unwrap();
    let rc = dir.path().join("rc");
    std::fs::write(
        &rc,
        r#"{"secret": "dc", "profile": {"srv": {"nodeid": "srv"}}}"#,
    )
    .unwrap();
    let (_running, addr, mut lines) = echo_server(&rc, &[]);
    assert_eq!(lines.next().unwrap().unwrap(), "echo port srv#echo");
    // A file through `run --echo`'s data handler `echo` and back, as with netcat.
    let file = dir.path().join("data");
    let data: Vec<u8> = (0..8usize << 20)
        .map(|i| (i * 31 + i / 509) as u8)
        .collect();
    std::fs::write(&file, &data).unwrap();
    let out = Command::new(AEMP)
        .args(["dataconn", "srv", "echo", "--connect", &addr])
        .env("PERL_ANYEVENT_MP_RC", &rc)
        .stdin(std::fs::File::open(&file).unwrap())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout == data, "{} bytes came back", out.stdout.len());
    // A handler the node does not have: the reference's message, at once.
    let (code, out, err) = aemp(&rc, &["dataconn", "srv", "upload", "--connect", &addr]);
    assert_eq!(
        (code, out.as_str(), err.as_str()),
        (
            1,
            "",
            "aemp: data connection failed: upload: no such data connection handler\n"
        )
    );
}

#[test]
fn errors_are_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let rc = dir.path().join("rc");
    std::fs::write(&rc, "{ \"seeds\": 5 }").unwrap();
    let (code, _, err) = aemp(&rc, &["snd", "x#y"]);
    assert_eq!(code, 1);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("aemp: ") && err.contains("seeds"), "{err}");
    std::fs::write(&rc, "{}").unwrap();
    let (code, _, err) = aemp(&rc, &["run", "--listen", "256.0.0.1:1"]);
    assert_eq!(code, 1);
    assert!(
        err.starts_with("aemp: cannot listen on 256.0.0.1:1"),
        "{err}"
    );
}

/// The file read back as JSON.
fn read_rc(rc: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(rc).unwrap()).unwrap()
}

/// Runs `aemp` with `args` and asserts it succeeded.
fn ok(rc: &std::path::Path, args: &[&str]) -> String {
    let (code, out, err) = aemp(rc, args);
    assert_eq!(code, 0, "aemp {args:?}: {err}");
    out
}

/// Runs `aemp` with `args` and asserts it failed with one line on stderr.
fn refused(rc: &std::path::Path, args: &[&str]) -> String {
    let (code, out, err) = aemp(rc, args);
    assert_eq!((code, out.as_str()), (1, ""), "aemp {args:?}: {err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("aemp: "), "{err}");
    err
}

#[test]
fn chained_verbs_write_the_file_as_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let rc = dir.path().join("rc");
    let old = "{ \"seeds\": [\"old:1\"], # relaxed\n }";
    std::fs::write(&rc, old).unwrap();
    ok(
        &rc,
        &[
            "gensecret",
            "profile",
            "xyzzy",
            "binds",
            "4040,4041",
            "nodeid",
            "anon/",
        ],
    );
    let v = read_rc(&rc);
    let secret = v["secret"].as_str().unwrap();
    assert!(
        secret.len() >= 32 && secret.bytes().all(|b| b.is_ascii_alphanumeric()),
        "{secret}"
    );
    assert_eq!(v["seeds"], serde_json::json!(["old:1"]));
    assert_eq!(
        v["profile"]["xyzzy"],
        serde_json::json!({"binds": ["4040", "4041"], "nodeid": "anon/"})
    );
    // The old file is kept as `rc~`, untouched; no temporary file is left.
    assert_eq!(
        std::fs::read_to_string(dir.path().join("rc~")).unwrap(),
        old
    );
    assert!(!dir.path().join("rc~new~").exists());
    // JSON::XS's pretty style: three-space indent, `"key" : value`, final newline.
    let text = std::fs::read_to_string(&rc).unwrap();
    assert!(text.starts_with("{\n   \""), "{text}");
    assert!(text.contains("\"nodeid\" : \"anon/\""), "{text}");
    assert!(
        text.contains("\"binds\" : [\n            \"4040\",\n"),
        "{text}"
    );
    assert!(text.ends_with("}\n"), "{text}");

    // A new file starts as the reference starts one.
    let fresh = dir.path().join("fresh");
    ok(&fresh, &["setsecret", "s"]);
    assert_eq!(
        read_rc(&fresh),
        serde_json::json!({"version": 1, "secret": "s"})
    );
    assert!(!dir.path().join("fresh~").exists());

    // A bad verb anywhere in the chain: nothing is written.
    let before = std::fs::read_to_string(&rc).unwrap();
    let err = refused(&rc, &["setsecret", "changed", "frobnicate"]);
    assert_eq!(
        err,
        "aemp: frobnicate: no such aemp command (try aemp --help)\n"
    );
    assert_eq!(std::fs::read_to_string(&rc).unwrap(), before);
}

#[test]
fn each_verb_edits_the_file() {
    use serde_json::json;
    let dir = tempfile::tempdir().unwrap();
    let rc = dir.path().join("rc");
    let at = |path: &[&str]| {
        let mut v = read_rc(&rc);
        for key in path {
            v = v.get(*key).cloned().unwrap_or(serde_json::Value::Null);
        }
        v
    };

    // Node id and secret, top level and with --profile.
    ok(&rc, &["setnodeid", "n1", "secret", "s1"]);
    assert_eq!(
        (at(&["nodeid"]), at(&["secret"])),
        (json!("n1"), json!("s1"))
    );
    ok(&rc, &["delnodeid", "delsecret", "nodeid", "n2"]);
    assert_eq!(
        (at(&["nodeid"]), at(&["secret"])),
        (json!("n2"), json!(null))
    );
    ok(&rc, &["--profile", "p", "setsecret", "ps"]);
    assert_eq!(at(&["profile", "p", "secret"]), json!("ps"));
    assert_eq!(at(&["secret"]), json!(null));

    // Certificates: gencert stores PEM text, setcert reads a file, delcert removes it.
    ok(&rc, &["gencert"]);
    let pem = at(&["cert"]).as_str().unwrap().to_owned();
    assert!(pem.contains("-----BEGIN"), "{pem}");
    let file = dir.path().join("cert.pem");
    std::fs::write(&file, &pem).unwrap();
    ok(&rc, &["delcert"]);
    assert_eq!(at(&["cert"]), json!(null));
    ok(&rc, &["profile", "p", "setcert", file.to_str().unwrap()]);
    assert_eq!(at(&["profile", "p", "cert"]), json!(pem));
    ok(&rc, &["profile", "p", "delcert"]);
    assert_eq!(at(&["profile", "p", "cert"]), json!(null));
    refused(
        &rc,
        &["setcert", dir.path().join("missing").to_str().unwrap()],
    );

    // Seeds and binds: set (comma list or JSON array), add (once), del one, del all.
    ok(
        &rc,
        &["setseeds", "a:1,b:2", "addseed", "c:3", "addseed", "a:1"],
    );
    assert_eq!(at(&["seeds"]), json!(["b:2", "c:3", "a:1"]));
    ok(&rc, &["delseed", "c:3"]);
    assert_eq!(at(&["seeds"]), json!(["b:2", "a:1"]));
    ok(&rc, &["seeds", "x:1", "y:2,z:3"]);
    assert_eq!(at(&["seeds"]), json!(["x:1", "y:2", "z:3"]));
    ok(&rc, &["delseeds"]);
    assert_eq!(at(&["seeds"]), json!(null));
    ok(&rc, &["setbinds", "[\"*:4040\"]", "addbind", "*:4041"]);
    assert_eq!(at(&["binds"]), json!(["*:4040", "*:4041"]));
    ok(&rc, &["delbind", "*:4040"]);
    assert_eq!(at(&["binds"]), json!(["*:4041"]));
    ok(&rc, &["binds", "*", "delbinds", "addbind", "1.2.3.4:5"]);
    assert_eq!(at(&["binds"]), json!(["1.2.3.4:5"]));
    ok(&rc, &["setbinds", ""]);
    assert_eq!(at(&["binds"]), json!([]));

    // Profiles: parent, delete.
    ok(
        &rc,
        &[
            "profile",
            "q",
            "setparent",
            "p",
            "profile",
            "r",
            "parent",
            "q",
        ],
    );
    assert_eq!(at(&["profile", "q", "parent"]), json!("p"));
    assert_eq!(at(&["profile", "r", "parent"]), json!("q"));
    ok(&rc, &["profile", "q", "delparent"]);
    assert_eq!(at(&["profile", "q"]), json!({}));
    ok(&rc, &["delprofile", "r", "profile", "empty"]);
    assert_eq!(at(&["profile", "r"]), json!(null));
    assert_eq!(at(&["profile", "empty"]), json!({}));

    // Low-level settings: setX and X, typed as given, delX.
    for attr in [
        "monitor_timeout",
        "connect_interval",
        "framing_format",
        "auth_offer",
        "auth_accept",
        "autocork",
        "nodelay",
    ] {
        ok(&rc, &[&format!("set{attr}"), "1"]);
        assert_eq!(at(&[attr]), json!("1"), "{attr}");
        ok(&rc, &[attr, "[\"x\",2]"]);
        assert_eq!(at(&[attr]), json!(["x", 2]), "{attr}");
        ok(&rc, &[&format!("del{attr}")]);
        assert_eq!(at(&[attr]), json!(null), "{attr}");
    }

    // Missing arguments in the reference's words.
    assert_eq!(refused(&rc, &["addseed"]), "aemp: seed address missing\n");
    assert_eq!(
        refused(&rc, &["profile"]),
        "aemp: profile name is missing\n"
    );
    assert_eq!(
        refused(&rc, &["setmonitor_timeout"]),
        "aemp: monitor_timeout value is missing\n"
    );
}

#[test]
fn showprofile_and_showconfig() {
    let dir = tempfile::tempdir().unwrap();
    let rc = dir.path().join("rc");
    std::fs::write(
        &rc,
        r#"{"secret": "top", "profile": {"base": {"binds": ["*:4040"]},
            "p": {"parent": "base", "nodeid": "p/"}}}"#,
    )
    .unwrap();
    // Only the profile's own keys, in the file's order.
    let out = ok(&rc, &["showprofile", "p"]);
    assert_eq!(
        out,
        "{\n   \"parent\" : \"base\",\n   \"nodeid\" : \"p/\"\n}\n"
    );
    assert_eq!(ok(&rc, &["showprofile", "none"]), "{}\n");
    // The effective configuration: defaults, extra settings, file, parent chain.
    let out = ok(
        &rc,
        &["showconfig", "p", "seeds", "[\"s:1\"]", "secret", "arg"],
    );
    assert!(out.starts_with("{\n   \""), "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["secret"], "top");
    assert_eq!(v["seeds"], serde_json::json!(["s:1"]));
    assert_eq!(v["binds"], serde_json::json!(["*:4040"]));
    assert_eq!(v["nodeid"], "p/");
    assert_eq!(v["monitor_timeout"], 30);
    assert!(
        v.get("parent").is_none() && v.get("profile").is_none(),
        "{out}"
    );
    // Showing changes nothing.
    assert!(!dir.path().join("rc~").exists());
    // Edits earlier on the line are shown.
    let out = ok(
        &rc,
        &["profile", "p", "setsecret", "new", "showconfig", "p"],
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["secret"], "new");
}

#[test]
fn perl_entries_are_edited_and_never_run() {
    let dir = tempfile::tempdir().unwrap();
    let rc = dir.path().join("rc");
    std::fs::write(&rc, "{}").unwrap();
    // The reference's verbs for services and eval edit the file as it does: addservice
    // adds another instance, delservice removes one.
    ok(&rc, &["setservices", "A::,B::"]);
    assert_eq!(read_rc(&rc)["services"], serde_json::json!(["A::", "B::"]));
    ok(
        &rc,
        &[
            "addservice",
            "A::",
            "services",
            "[\"C::\"]",
            "addservice",
            "C::",
        ],
    );
    assert_eq!(read_rc(&rc)["services"], serde_json::json!(["C::", "C::"]));
    ok(&rc, &["delservice", "C::"]);
    assert_eq!(read_rc(&rc)["services"], serde_json::json!(["C::"]));
    ok(&rc, &["profile", "p", "seteval", "1+1", "setsecure", "1"]);
    assert_eq!(
        read_rc(&rc)["profile"]["p"],
        serde_json::json!({"eval": "1+1", "secure": "1"})
    );
    ok(&rc, &["profile", "p", "deleval", "delsecure"]);
    assert_eq!(read_rc(&rc)["profile"]["p"], serde_json::json!({}));
    let err = refused(&rc, &["seteval"]);
    assert_eq!(err, "aemp: eval string missing\n");
    let err = refused(&rc, &["addservice"]);
    assert_eq!(err, "aemp: service specification missing\n");

    // A file shared with Perl nodes: `run` runs the node without them and says so once;
    // the protocol verbs ignore them.
    std::fs::write(
        &rc,
        r#"{"secret": "perl", "services": ["AnyEvent::MP::LogCatcher::"], "eval": "1",
            "profile": {"srv": {"nodeid": "srv"}}}"#,
    )
    .unwrap();
    let (running, addr, stderr) = server_logged(&rc, Stdio::piped());
    let stderr = stderr.unwrap();
    let warning = BufReader::new(stderr).lines().next().unwrap().unwrap();
    assert_eq!(
        warning,
        "aemp: not running services AnyEvent::MP::LogCatcher:: and eval: they are Perl \
         code (services are Perl functions or modules), which aemp never runs"
    );
    assert_eq!(
        ok(&rc, &["cal", "srv", "can", "snd", "--connect", &addr]),
        "true\n"
    );

    // Verbs that ask a remote node to run code: sent as the reference sends them, and an
    // aemp node refuses, which the tool reports.
    for args in [&["eval", "srv", "$$"][..], &["restart", "srv#"]] {
        let args = [args, &["--connect", &addr]].concat();
        let err = refused(&rc, &args);
        assert_eq!(err, "aemp: remote execution not allowed\n", "{args:?}");
    }
    // shell: each line is an eval on the node (refused here); `=` asks for the nodes,
    // which needs a global node (none here); lines go to the history in $HOME.
    let mut shell = Command::new(AEMP)
        .args(["shell", "srv", "--connect", &addr, "--timeout", "1"])
        .env("PERL_ANYEVENT_MP_RC", &rc)
        .env("HOME", dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = shell.stdin.take().unwrap();
        stdin.write_all(b"1 + 1\n=\npackage Foo\n").unwrap();
    }
    let out = shell.wait_with_output().unwrap();
    let out = String::from_utf8(out.stdout).unwrap();
    assert!(out.contains("srv: 1 + 1\n"), "{out}");
    assert!(out.contains("\nremote execution not allowed\n"), "{out}");
    assert!(out.contains("nodes: no answer from a global node"), "{out}");
    let history = std::fs::read_to_string(dir.path().join(".aemp_history")).unwrap();
    assert!(
        history.contains("1 + 1") && history.contains("package Foo"),
        "{history}"
    );

    // trace: the node lists no neighbours, since it refuses to evaluate `up_nodes`.
    assert_eq!(
        ok(&rc, &["trace", "srv", "--connect", &addr]),
        "seed -> srv\nsrv -> \n"
    );
    drop(running);
}

#[test]
fn protocol_verbs_use_profile_aemp() {
    let dir = tempfile::tempdir().unwrap();
    let rc = dir.path().join("rc");
    // Set up the reference's way: `aemp profile aemp secret ...`.
    std::fs::write(
        &rc,
        r#"{"profile": {"aemp": {"secret": "for aemp"}, "srv": {"nodeid": "srv", "secret": "for aemp"}}}"#,
    )
    .unwrap();
    let (_server, addr) = server(&rc);
    assert_eq!(
        ok(&rc, &["cal", "srv", "can", "time", "--connect", &addr]),
        "true\n"
    );
    // --profile still chooses another one (here: no secret, so no handshake).
    let err = refused(
        &rc,
        &[
            "cal",
            "srv",
            "can",
            "time",
            "--connect",
            &addr,
            "--profile",
            "x",
            "--timeout",
            "20",
        ],
    );
    assert_eq!(
        err,
        "aemp: connection failed: unable to handshake TLS and no shared secret configured\n"
    );
}

#[test]
fn gensecret_makes_the_references_180_characters() {
    let dir = tempfile::tempdir().unwrap();
    let rc = dir.path().join("rc");
    ok(&rc, &["gensecret"]);
    let first = read_rc(&rc)["secret"].as_str().unwrap().to_owned();
    assert_eq!(first.len(), 180);
    assert!(first.bytes().all(|b| b.is_ascii_alphanumeric()), "{first}");
    ok(&rc, &["gensecret"]);
    assert_ne!(read_rc(&rc)["secret"].as_str().unwrap(), first);
}

/// `aemp run` for node `srv` in the background: the guard and its address.
fn server(rc: &std::path::Path) -> (Running, String) {
    let (running, addr, _) = server_logged(rc, Stdio::inherit());
    (running, addr)
}

/// [`server`] with its stderr going to `stderr` (piped: returned).
fn server_logged(
    rc: &std::path::Path,
    stderr: Stdio,
) -> (Running, String, Option<std::process::ChildStderr>) {
    let mut child = Command::new(AEMP)
        .args(["run", "srv", "--listen", "127.0.0.1:0"])
        .env("PERL_ANYEVENT_MP_RC", rc)
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take();
    let running = Running(child);
    let first = BufReader::new(stdout).lines().next().unwrap().unwrap();
    let addr = first
        .strip_prefix("node srv listening on ")
        .unwrap_or_else(|| panic!("{first}"))
        .to_owned();
    (running, addr, stderr)
}

#[test]
fn bare_node_ids_and_snd_confirmation() {
    let dir = tempfile::tempdir().unwrap();
    let rc = dir.path().join("rc");
    std::fs::write(
        &rc,
        r#"{"secret": "bare", "profile": {"srv": {"nodeid": "srv"}}}"#,
    )
    .unwrap();
    // `run PROFILE`, as the reference's `aemp run database-backend`.
    let (_server, addr) = server(&rc);

    // A bare node id is the node port: `time` answers with the node's clock.
    let out = ok(&rc, &["cal", "srv", "time", "--connect", &addr]);
    let time: f64 = out.trim_end().parse().unwrap();
    assert!(time > 1e9, "{out}");
    // The whole command line as one JSON array.
    let out = ok(&rc, &["[\"cal\",\"srv\",\"time\"]", "--connect", &addr]);
    assert!(out.trim_end().parse::<f64>().is_ok(), "{out}");

    // snd confirms delivery as the reference does, and prints the confirmation as it
    // does (`join " ", ..., "\n"`).
    let out = ok(&rc, &["snd", "srv", "devnull", "--connect", &addr]);
    assert_eq!(out, "message sent successfully \n");
    let out = ok(&rc, &["snd", "srv#", "devnull", "-1", "--connect", &addr]);
    assert_eq!(out, "message sent successfully \n");
    // A port that does not exist: the monitor says so.
    let err = refused(&rc, &["snd", "srv#nope", "x", "--connect", &addr]);
    assert!(err.contains("no_such_port"), "{err}");
    // A node that cannot be reached.
    let err = refused(
        &rc,
        &[
            "snd",
            "ghost",
            "devnull",
            "--connect",
            "127.0.0.1:1",
            "--timeout",
            "1",
        ],
    );
    assert!(err.starts_with("aemp: cannot reach ghost"), "{err}");
    // An empty node id is no port id.
    let err = refused(&rc, &["snd", "#x", "--connect", &addr]);
    assert!(err.contains("invalid port id '#x'"), "{err}");

    // `mon NODE` watches the node port: it fires when the node goes away.
    let mut mon = Command::new(AEMP)
        .args(["mon", "srv", "--connect", &addr, "-v"])
        .env("PERL_ANYEVENT_MP_RC", &rc)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = mon.stderr.take().unwrap();
    let stdout = mon.stdout.take().unwrap();
    let mon = Running(mon);
    // Wait for the connection (the -v log says so) before stopping the node. Its stderr is
    // closed after that line: logging must not stop it.
    let connected = BufReader::new(stderr)
        .lines()
        .map_while(Result::ok)
        .any(|line| line.contains("connected as srv"));
    assert!(connected);
    drop(_server);
    let line = BufReader::new(stdout).lines().next().unwrap().unwrap();
    assert!(line.starts_with("transport_error srv "), "{line}");
    drop(mon);
}

/// The next message on `port` (a panic after 10 s).
async fn next(port: &mut aemp_host::Port) -> Vec<aemp_host::Value> {
    tokio::time::timeout(std::time::Duration::from_secs(10), port.recv())
        .await
        .expect("message in time")
        .expect("port open")
}

/// Arguments arrive as the reference types them: checked by a node of our own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arguments_typed_as_the_reference() {
    use aemp_host::{Node, Value};
    let dir = tempfile::tempdir().unwrap();
    let rc = dir.path().join("rc");
    std::fs::write(&rc, r#"{"secret": "typed"}"#).unwrap();
    let node = Node::builder()
        .node_id("sink")
        .secret("typed")
        .bind("127.0.0.1:0")
        .start()
        .await
        .unwrap();
    let addr = node.listen_addrs()[0].to_string();
    let mut port = node.named_port("in").await.unwrap();
    let send = |args: Vec<String>| {
        let rc = rc.clone();
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            aemp(&rc, &args)
        })
    };
    let strings = |a: &[&str]| a.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    // Plain arguments are strings, `-1` and numbers included; `[`, `{`, `"` start JSON.
    let (code, out, err) = send(strings(&[
        "snd",
        "sink#in",
        "-1",
        "42",
        "--connect",
        &addr,
        "[1,\"a\"]",
        "{\"k\":null}",
        "\"quoted\"",
        "x[",
        "--",
        "--timeout",
    ]))
    .await
    .unwrap();
    assert_eq!(
        (code, out.as_str()),
        (0, "message sent successfully \n"),
        "{err}"
    );
    let got = next(&mut port).await;
    let text = |s: &str| Value::text(s);
    assert_eq!(
        got,
        [
            text("-1"),
            text("42"),
            Value::from(serde_json::json!([1, "a"])),
            Value::from(serde_json::json!({"k": null})),
            text("quoted"),
            text("x["),
            text("--timeout"),
        ]
    );
    // A lone leading `[` replaces all arguments, its values keep their JSON types.
    let (code, _, err) = send(strings(&[
        "[\"snd\",\"sink#in\",-1,true,\"s\"]",
        "--connect",
        &addr,
    ]))
    .await
    .unwrap();
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        next(&mut port).await,
        [
            Value::from(serde_json::json!(-1)),
            Value::Bool(true),
            text("s")
        ]
    );
    // Invalid JSON is an error, not a string.
    let (code, _, err) = send(strings(&["snd", "sink#in", "{oops", "--connect", &addr]))
        .await
        .unwrap();
    assert_eq!(code, 1);
    assert!(
        err.starts_with("aemp: argument '{oops' is not valid JSON"),
        "{err}"
    );
}

/// A node that stops on its own ends `aemp run` at once, with status 1 and the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_exits_when_its_node_stops() {
    use aemp_host::{Node, Value};
    let dir = tempfile::tempdir().unwrap();
    let rc = dir.path().join("rc");
    std::fs::write(&rc, r#"{"secret": "oom"}"#).unwrap();
    let mut child = Command::new(AEMP)
        .args(["run", "--nodeid", "tiny", "--listen", "127.0.0.1:0"])
        .args(["--max-memory", "3"])
        .env("PERL_ANYEVENT_MP_RC", &rc)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let first = tokio::task::spawn_blocking(move || {
        BufReader::new(stdout).lines().next().unwrap().unwrap()
    })
    .await
    .unwrap();
    let addr = first
        .strip_prefix("node tiny listening on ")
        .unwrap_or_else(|| panic!("{first}"))
        .to_owned();
    let big = Node::builder()
        .node_id("big")
        .secret("oom")
        .start()
        .await
        .unwrap();
    big.connect(&addr).await.unwrap();
    big.wait_up("tiny", std::time::Duration::from_secs(10))
        .await
        .unwrap();
    // 8 MiB cannot fit in 3 MiB of sandbox memory.
    big.send("tiny#nothing", vec![Value::Bytes(vec![7; 8 << 20])])
        .await
        .unwrap();
    let out = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                let mut err = String::new();
                std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
                return Some((status, err));
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                return None;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    })
    .await
    .unwrap();
    let (status, err) = out.expect("aemp run exits when its node stops");
    assert_eq!(status.code(), Some(1));
    assert!(
        err.contains("aemp: node stopped: the engine ran out of sandbox memory"),
        "{err}"
    );
}

/// An aemp seed (it finds itself among the seeds and becomes a global node), a node found
/// through it, and the network database read from the command line.
#[test]
fn a_seed_its_network_and_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let rc = dir.path().join("rc");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let seed = format!("127.0.0.1:{port}");
    std::fs::write(&rc, r#"{"secret": "net"}"#).unwrap();
    ok(&rc, &["setseeds", &seed]);
    let start = |args: &[&str]| {
        let mut child = Command::new(AEMP)
            .arg("run")
            .args(args)
            .env("PERL_ANYEVENT_MP_RC", &rc)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let first = BufReader::new(stdout).lines().next().unwrap().unwrap();
        (Running(child), first)
    };
    let (_seed, first) = start(&["--nodeid", "seed", "--listen", &seed]);
    assert_eq!(first, format!("node seed listening on {seed}"));
    let (_one, _) = start(&["--echo", "--nodeid", "one", "--listen", "127.0.0.1:0"]);
    // `one` registers its listener with the seed; nobody gives `cal` its address.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let keys = loop {
        let keys = ok(&rc, &["dbkeys", "'l"]);
        if keys.contains("\"one\"") || std::time::Instant::now() > deadline {
            break keys;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert!(
        keys.contains("\"one\"") && keys.contains("\"seed\""),
        "{keys}"
    );
    let family = ok(&rc, &["dbfamily", "'l"]);
    assert!(
        family.contains(&format!("\"seed\":[\"{seed}\"]")),
        "{family}"
    );
    assert_eq!(ok(&rc, &["cal", "one#echo"]), "\n");
    // A node the seed does not know: said at once, not after the timeout.
    let asked = std::time::Instant::now();
    let err = refused(&rc, &["cal", "ghost", "time", "--timeout", "20"]);
    assert_eq!(
        err,
        "aemp: cannot reach ghost: transport_error ghost no known address\n"
    );
    assert!(asked.elapsed() < std::time::Duration::from_secs(10));
    let (code, _, err) = aemp(
        &rc,
        &["dbfamily", "'l", "--timeout", "20", "--secret", "wrong"],
    );
    assert_eq!(
        (code, err.as_str()),
        (
            1,
            "aemp: connection failed: authentication failure/shared secret mismatch\n"
        )
    );
}

/// An HTTP GET of `path` from `addr`: the whole response, headers included.
fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

/// The value of the sample `name` (labels included) in a scrape, as a number.
fn sample(scrape: &str, name: &str) -> f64 {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {name} in\n{scrape}"))
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn info_and_metrics_show_what_a_node_does() {
    let dir = tempfile::tempdir().unwrap();
    let rc = dir.path().join("rc");
    std::fs::write(
        &rc,
        "{ \"secret\": \"info test\", \"profile\": { \"srv\": { \"nodeid\": \"srv\" } } }",
    )
    .unwrap();
    // A bad metrics address stops `run` before its node starts.
    let (code, out, err) = aemp(&rc, &["run", "srv", "--metrics", "nonsense"]);
    assert_eq!(
        (code, out.as_str(), err.as_str()),
        (1, "", "aemp: --metrics nonsense: invalid socket address\n")
    );
    let (_running, addr, mut lines) = echo_server(&rc, &["--metrics", "127.0.0.1:0"]);
    let mut line = || lines.next().unwrap().unwrap();
    let second = line();
    let metrics = second
        .strip_prefix("metrics on http://")
        .and_then(|m| m.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("{second}"))
        .to_owned();
    assert_eq!(line(), "echo port srv#echo");

    let (code, _, err) = aemp(&rc, &["snd", "srv#echo", "[1,2]", "--connect", &addr]);
    assert_eq!(code, 0, "{err}");

    // Readable: the node, its counters, the asking connection, its ports.
    let (code, out, err) = aemp(&rc, &["info", "srv", "--connect", &addr]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("node         srv\n"), "{out}");
    for expected in [
        "\nglobal       no\n",
        "\nconnections  1 (1 nodes up)\n",
        " (up)\n",
        "        auth hmac_sha3_512/hmac_sha3_512, framing cbor/cbor, no tls\n",
        "\nports        1\n  srv#echo  0 messages waiting, 0 B\n",
    ] {
        assert!(out.contains(expected), "{expected:?} not in\n{out}");
    }
    // The asking node is `aemp/...`, connected from loopback.
    assert!(out.contains("  #2    aemp/"), "{out}");
    assert!(out.contains(" from 127.0.0.1:"), "{out}");

    // Raw: the map other nodes get, as JSON.
    let (code, out, err) = aemp(&rc, &["info", "srv#", "--connect", &addr, "--json"]);
    assert_eq!(code, 0, "{err}");
    let info: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(info["node"], "srv");
    assert_eq!(info["global"], false);
    // snd, its confirmation, two infos with a `can` each: messages came in.
    assert!(info["messages_in"].as_u64().unwrap() >= 4, "{info}");
    assert!(info["handshakes"].as_u64().unwrap() >= 3, "{info}");
    assert!(info["uptime"].as_f64().unwrap() > 0.0, "{info}");
    assert_eq!(
        info["connection_ends"]["peer_closed"].as_u64(),
        Some(2),
        "{info}"
    );
    let conns = info["connections"].as_array().unwrap();
    assert_eq!(conns.len(), 1, "{info}");
    let conn = &conns[0];
    assert!(
        conn["node"].as_str().unwrap().starts_with("aemp/"),
        "{info}"
    );
    assert_eq!(conn["incoming"], true);
    assert_eq!(conn["working"], true);
    assert_eq!(conn["tls"], false);
    assert_eq!(conn["framing"], "cbor/cbor");
    // This connection so far: its `can` and this request in, the `can`'s answer out.
    assert_eq!(conn["messages_in"], 2, "{info}");
    assert_eq!(conn["messages_out"], 1, "{info}");
    assert!(conn["bytes_in"].as_u64().unwrap() > 0);
    assert_eq!(info["ports"][0]["port"], "srv#echo");

    // The Rust API reads the same figures, and its own: this node sent one message.
    let node = aemp_host::Node::builder()
        .node_id("api")
        .secret("info test")
        .start()
        .await
        .unwrap();
    node.connect(&addr).await.unwrap();
    node.wait_up("srv", std::time::Duration::from_secs(10))
        .await
        .unwrap();
    node.send("srv#echo", vec![]).await.unwrap();
    node.flush(std::time::Duration::from_secs(10))
        .await
        .unwrap();
    let mine = node.info().await.unwrap();
    assert_eq!(mine.node, "api");
    assert_eq!(mine.nodes_up, 1);
    let to_srv = &mine.connections[0];
    assert_eq!(to_srv.node.as_deref(), Some("srv"));
    assert!(!to_srv.incoming);
    assert_eq!(to_srv.messages_out, 1);
    assert_eq!(to_srv.addr, addr);

    // Prometheus text, every figure named, messages in counted.
    let response = http_get(&metrics, "/metrics");
    let (head, scrape) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text"),
        "{head}"
    );
    for name in [
        "# TYPE aemp_uptime_seconds gauge",
        "# TYPE aemp_connections gauge",
        "# TYPE aemp_nodes_up gauge",
        "# TYPE aemp_handshakes counter",
        "# TYPE aemp_messages_received counter",
        "# TYPE aemp_messages_sent counter",
        "# TYPE aemp_received_bytes counter",
        "# TYPE aemp_sent_bytes counter",
        "# TYPE aemp_connection_ends counter",
        "# TYPE aemp_limit_hits counter",
        "# TYPE aemp_queued_bytes gauge",
        "# TYPE aemp_write_queue_bytes gauge",
        "# TYPE aemp_inbox_messages gauge",
        "# TYPE aemp_db_entries gauge",
        "# EOF",
    ] {
        assert!(scrape.contains(name), "{name} not in\n{scrape}");
    }
    assert!(
        sample(scrape, "aemp_messages_received_total") >= 5.0,
        "{scrape}"
    );
    assert!(
        sample(scrape, "aemp_received_bytes_total") > 0.0,
        "{scrape}"
    );
    assert_eq!(sample(scrape, "aemp_nodes_up"), 1.0, "{scrape}");
    assert_eq!(sample(scrape, "aemp_ports"), 1.0, "{scrape}");
    assert_eq!(sample(scrape, "aemp_global"), 0.0, "{scrape}");
    assert_eq!(
        sample(scrape, "aemp_limit_hits_total{limit=\"max_handshakes\"}"),
        0.0,
        "{scrape}"
    );
    assert_eq!(
        sample(scrape, "aemp_connection_ends_total{reason=\"peer_closed\"}"),
        3.0,
        "{scrape}"
    );
    node.shutdown(std::time::Duration::from_secs(1))
        .await
        .unwrap();
}

#[test]
fn info_turned_off_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let rc = dir.path().join("rc");
    // The operator's switch, set with the configuration verbs (typed as given: "0").
    ok(
        &rc,
        &[
            "setsecret",
            "off test",
            "profile",
            "srv",
            "nodeid",
            "srv",
            "setnode_info",
            "0",
        ],
    );
    assert_eq!(read_rc(&rc)["profile"]["srv"]["node_info"], "0");
    let (_running, addr) = server(&rc);
    let asked = std::time::Instant::now();
    let (code, out, err) = aemp(&rc, &["info", "srv", "--connect", &addr, "--timeout", "20"]);
    assert_eq!(
        (code, out.as_str(), err.as_str()),
        (
            1,
            "",
            "aemp: srv does not answer info requests: not an aemp node, or its operator \
             turned them off (node_info)\n"
        )
    );
    // Said at once (the node's `can` answered false), not after the timeout.
    assert!(asked.elapsed() < std::time::Duration::from_secs(10));
    // The request itself, sent anyway, is one the node does not understand.
    let (code, _, err) = aemp(
        &rc,
        &[
            "cal",
            "srv#",
            "aemp_info",
            "--connect",
            &addr,
            "--timeout",
            "1",
        ],
    );
    assert_eq!(
        (code, err.as_str()),
        (1, "aemp: no reply from srv# within 1s\n")
    );
}
