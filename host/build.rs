//! Builds the engine (`guest/`) for `wasm32-unknown-unknown` and encodes it as a
//! WebAssembly component, so the host can embed it.
//!
//! Toolchain: rustup's `wasm32-unknown-unknown` target when it is installed; otherwise
//! Debian 12's `rustc-web` + `rust-web-src` with `-Zbuild-std` (see README). The guest gets
//! its own target directory (`target/wasm-guest`) because it may be compiled by another
//! rustc than the host. Artifacts: the core module stays at
//! `target/wasm-guest/wasm32-unknown-unknown/release/aemp_engine.wasm`, the component is
//! copied to `target/wasm/aemp_engine.component.wasm` and `target/wasm/aemp_engine.core.wasm`.
//! The component is also compiled ahead to machine code for this host (embedded too).

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "wasm32-unknown-unknown";
const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
const DEBIAN_STD_SRC: &str = "/usr/lib/rustlib/src/rust/library";

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let root = manifest
        .parent()
        .expect("host/ lives in the workspace")
        .to_path_buf();
    for watched in ["guest/src", "guest/Cargo.toml", "wit", "Cargo.lock"] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }
    println!("cargo:rerun-if-env-changed=AEMP_GUEST_RUSTC");

    let guest_target = root.join("target").join("wasm-guest");
    let mut cargo = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    // Nothing of the outer build (wrappers, flags, target dir, profile) may leak in.
    for (key, _) in env::vars_os() {
        let key = key.to_string_lossy();
        if (key.starts_with("CARGO_") && key != "CARGO_HOME")
            || key.starts_with("RUSTC")
            || key.starts_with("RUSTDOC")
            || key == "RUSTFLAGS"
        {
            cargo.env_remove(key.as_ref());
        }
    }
    cargo
        .current_dir(&root)
        .args([
            "build",
            "--release",
            "--target",
            TARGET,
            "-p",
            "aemp-engine",
            "--target-dir",
        ])
        .arg(&guest_target)
        .env("CARGO_PROFILE_RELEASE_PANIC", "abort")
        .env("CARGO_PROFILE_RELEASE_LTO", "true")
        .env("CARGO_PROFILE_RELEASE_CODEGEN_UNITS", "1")
        .env("CARGO_PROFILE_RELEASE_STRIP", "debuginfo")
        // 128-bit SIMD (WebAssembly 2.0, which wasmtime, wazero, V8 and wasmtime-py run):
        // memchr's searches through the strings of a large JSON message go 16 bytes at
        // a time.
        .env("RUSTFLAGS", "-C target-feature=+simd128");
    match toolchain() {
        Toolchain::Rustup => {}
        Toolchain::Debian => {
            cargo
                .env("RUSTC", DEBIAN_RUSTC)
                .env("RUSTC_BOOTSTRAP", "1")
                .arg("-Zbuild-std=std,panic_abort");
        }
        Toolchain::None => panic!(
            "\n\ncannot build the engine for {TARGET}: no toolchain for it.\n\
             Either `rustup target add {TARGET}`, or on Debian 12 \
             `apt-get install rustc-web rust-web-src lld-22` (see README, \"Building the component\").\n"
        ),
    }
    let status = cargo.status().expect("run cargo for the guest");
    assert!(
        status.success(),
        "building the engine for {TARGET} failed (see the output above)"
    );

    let core_path = guest_target
        .join(TARGET)
        .join("release")
        .join("aemp_engine.wasm");
    let core =
        std::fs::read(&core_path).unwrap_or_else(|e| panic!("read {}: {e}", core_path.display()));
    let component = wit_component::ComponentEncoder::default()
        .module(&core)
        .and_then(|e| e.validate(true).encode())
        .unwrap_or_else(|e| panic!("encode {} as a component: {e:#}", core_path.display()));

    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo"));
    let out = out_dir.join("aemp_engine.component.wasm");
    write(&out, &component);

    // Compiled ahead, so starting a node only deserializes machine code. The engine
    // settings must match `Sandbox::with_limits` (which falls back to compiling the
    // component if they ever differ).
    let mut config = wasmtime::Config::new();
    config.epoch_interruption(true);
    let engine = wasmtime::Engine::new(&config).expect("wasmtime engine");
    let precompiled = engine
        .precompile_component(&component)
        .expect("precompile the component");
    let cwasm = out_dir.join("aemp_engine.cwasm");
    write(&cwasm, &precompiled);
    println!(
        "cargo:rustc-env=AEMP_ENGINE_PRECOMPILED={}",
        cwasm.display()
    );
    let artifacts = root.join("target").join("wasm");
    write(&artifacts.join("aemp_engine.component.wasm"), &component);
    write(&artifacts.join("aemp_engine.core.wasm"), &core);
    println!("cargo:rustc-env=AEMP_ENGINE_COMPONENT={}", out.display());
}

fn write(path: &Path, bytes: &[u8]) {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    }
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

enum Toolchain {
    Rustup,
    Debian,
    None,
}

/// rustup's target when installed for the toolchain in use, else Debian's rustc-web.
fn toolchain() -> Toolchain {
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let sysroot = Command::new(rustc)
        .args(["--print", "sysroot"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    if sysroot.is_some_and(|s| s.join("lib/rustlib").join(TARGET).join("lib").is_dir()) {
        Toolchain::Rustup
    } else if Path::new(DEBIAN_RUSTC).exists() && Path::new(DEBIAN_STD_SRC).is_dir() {
        Toolchain::Debian
    } else {
        Toolchain::None
    }
}
