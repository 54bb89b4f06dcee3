//! The soak run (`aemp-soak`) in its short form: a few seconds of restarts (the seed's
//! too), bad peers, flapping members, a database flood and a slow reader, with every
//! message, monitor and the seed's view checked.

/// The number after `label` in the summary.
fn figure(stdout: &str, label: &str) -> u64 {
    stdout
        .split(label)
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no `{label}` in {stdout}"))
}

#[test]
fn soak_briefly() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_aemp-soak"))
        .args(["--seconds", "8", "--seed", "12345"])
        .output()
        .expect("run aemp-soak");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("aemp-soak: ok"), "{stdout}");
    // The short form must include the global-node faults it exists to cover.
    assert!(figure(&stdout, "seed restarts ") >= 1, "{stdout}");
    assert!(figure(&stdout, "flood sets ") > 0, "{stdout}");
    assert!(figure(&stdout, "members flapped ") > 0, "{stdout}");
}
