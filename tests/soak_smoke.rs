//! The soak run (`aemp-soak`) in its short form: a few seconds of restarts, bad peers and
//! a slow reader, with every message and monitor checked.

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
}
