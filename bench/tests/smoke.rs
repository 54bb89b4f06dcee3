//! A cheap run of the benchmark (tiny counts) so it cannot rot: every figure is there and
//! is a sensible number.

use std::process::Command;

const FIGURES: &[&str] = &[
    "engine_native_handshakes_per_s",
    "engine_wasm_handshakes_per_s",
    "engine_native_small_msgs_per_s_cbor",
    "engine_wasm_small_msgs_per_s_cbor",
    "engine_native_small_msgs_per_s_json",
    "engine_wasm_small_msgs_per_s_json",
    "wasm_native_time_ratio_small_cbor",
    "wasm_native_time_ratio_small_json",
    "engine_native_64k_mb_per_s_cbor",
    "engine_wasm_64k_mb_per_s_cbor",
    "engine_native_64k_mb_per_s_json",
    "engine_wasm_64k_mb_per_s_json",
    "engine_native_node_msgs_per_s",
    "engine_wasm_node_msgs_per_s",
    "boundary_ns_per_call",
    "boundary_ns_per_message",
    "dataconn_mb_per_s_plain",
    "dataconn_mb_per_s_tls",
    "e2e_handshake_ms",
    "e2e_msgs_per_s_1k_plain",
    "e2e_msgs_per_s_8_senders_plain",
    "e2e_msgs_per_s_values_plain",
    "e2e_msgs_per_s_plain",
    "e2e_rtt_p50_us_plain",
    "e2e_rtt_p99_us_plain",
    "e2e_msgs_per_s_tls",
    "e2e_rtt_p50_us_tls",
    "e2e_rtt_p99_us_tls",
    "tcp_rtt_p50_us",
    "tcp_rtt_p99_us",
    "idle_conn_engine_bytes",
    "idle_conn_rss_bytes",
    "sandbox_memory_bytes",
    "idle_handshakes_per_s",
    // The scaling group's points under --quick (the full run's are in the README).
    "scaling_msgs_per_s_size_16",
    "scaling_mb_per_s_size_16",
    "scaling_msgs_per_s_size_1048576",
    "scaling_mb_per_s_size_1048576",
    "scaling_msgs_per_s_senders_1",
    "scaling_rtt_p50_us_senders_1",
    "scaling_rtt_p99_us_senders_1",
    "scaling_msgs_per_s_senders_10",
    "scaling_rtt_p50_us_senders_10",
    "scaling_rtt_p99_us_senders_10",
    "scaling_idle_rss_bytes_per_conn_10",
    "scaling_idle_engine_bytes_per_conn_10",
    "scaling_handshakes_per_s_10",
    "scaling_idle_rss_bytes_per_conn_50",
    "scaling_idle_engine_bytes_per_conn_50",
    "scaling_handshakes_per_s_50",
];

#[test]
fn quick_run_prints_every_figure() {
    let out = Command::new(env!("CARGO_BIN_EXE_aemp-bench"))
        .args(["--quick", "--json"])
        .output()
        .expect("run aemp-bench");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let figures: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let figures = figures.as_object().expect("an object");
    for name in FIGURES {
        let value = figures
            .get(*name)
            .and_then(serde_json::Value::as_f64)
            .unwrap_or_else(|| panic!("{name} missing"));
        // A difference of two timings: with --quick's tiny counts, noise can make the wasm
        // run the faster one, so only its sign is not checked.
        let difference = *name == "boundary_ns_per_message";
        assert!(
            value.is_finite() && (difference || value >= 0.0),
            "{name} = {value}"
        );
    }
    assert_eq!(figures.len(), FIGURES.len(), "{figures:?}");
    for name in [
        "dataconn_mb_per_s_plain",
        "dataconn_mb_per_s_tls",
        "e2e_msgs_per_s_1k_plain",
        "e2e_msgs_per_s_8_senders_plain",
        "e2e_msgs_per_s_values_plain",
        "e2e_msgs_per_s_plain",
        "engine_native_small_msgs_per_s_cbor",
        "engine_native_node_msgs_per_s",
        "engine_wasm_node_msgs_per_s",
        "sandbox_memory_bytes",
        "scaling_msgs_per_s_senders_10",
        "scaling_mb_per_s_size_1048576",
        "scaling_handshakes_per_s_50",
    ] {
        assert!(figures[name].as_f64().unwrap_or(0.0) > 0.0, "{name}");
    }
}
