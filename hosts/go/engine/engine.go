// Package engine holds the AEMP engine's core WebAssembly module, built from guest/ in
// the repository and copied here by scripts/update-engine, so the Go module needs no
// Rust toolchain.
package engine

import _ "embed"

// Wasm is the core module (canonical ABI exports of aemp:engine/node and
// aemp:engine/transport, before component encoding).
//
//go:embed aemp_engine.core.wasm
var Wasm []byte
