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

#[test]
fn run_echo_then_cal_mon_snd() {
    let dir = tempfile::tempdir().unwrap();
    let rc = dir.path().join("rc");
    // The configuration file is AnyEvent::MP's: relaxed JSON, profiles.
    std::fs::write(&rc, "{ \"secret\": \"cli test\", # shared by both\n \"profile\": { \"srv\": { \"nodeid\": \"srv\" }, }, }").unwrap();
    let (code, _, err) = aemp(&rc, &["gensecret", "--profile", "other"]);
    assert_eq!(code, 0, "{err}");

    let mut child = Command::new(AEMP)
        .args([
            "run",
            "--echo",
            "--profile",
            "srv",
            "--listen",
            "127.0.0.1:0",
        ])
        .env("PERL_ANYEVENT_MP_RC", &rc)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let _running = Running(child);
    let mut lines = BufReader::new(stdout).lines();
    let first = lines.next().unwrap().unwrap();
    let addr = first
        .strip_prefix("node srv listening on ")
        .unwrap_or_else(|| panic!("{first}"))
        .to_owned();
    assert_eq!(lines.next().unwrap().unwrap(), "echo port srv#echo");

    // The echo port sends the remaining arguments to the port in its first argument:
    // with cal, the reply port is the only argument, so the reply is empty.
    let (code, out, err) = aemp(&rc, &["cal", "srv#echo", "--connect", &addr]);
    assert_eq!((code, out.as_str()), (0, "[]\n"), "{err}");
    // Through the node port: `can` answers with the extra arguments, then true/false.
    let (code, out, err) = aemp(&rc, &["cal", "srv#", "can", "snd", "--connect", &addr]);
    assert_eq!((code, out.as_str()), (0, "[true]\n"), "{err}");
    let (code, out, _) = aemp(
        &rc,
        &["cal", "srv#", "eval", "system 'true'", "--connect", &addr],
    );
    assert_eq!(
        (code, out.as_str()),
        (0, "[\"remote execution not allowed\"]\n")
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
    let (code, out, _) = aemp(&rc, &["mon", "srv#nope", "--connect", &addr]);
    assert_eq!(
        (code, out.as_str()),
        (
            0,
            "[\"no_such_port\",\"cannot monitor nonexistent port\",\"srv#nope\"]\n"
        )
    );
    let (code, _, err) = aemp(&rc, &["snd", "srv#echo", "[1,2]", "--connect", &addr]);
    assert_eq!(code, 0, "{err}");
    // The wrong secret is refused.
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
            "2",
        ],
    );
    assert_eq!(code, 1);
    assert!(err.starts_with("aemp: cannot reach srv"), "{err}");
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
