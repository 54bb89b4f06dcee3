package aemp

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"
)

// The engine's settings reach it: a node that offers only json talks json to a Rust node
// that offers both.
func TestFramingsAreOffered(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	addr, _ := startRust(t, t.TempDir(), "rust-any", "shared")
	logs := &logBook{}
	n := startGo(t, ctx, Config{NodeID: "go-json", Secret: "shared", Seeds: []string{addr},
		Framings: []string{"json"}, AuthOffer: []string{"hmac_sha3_512"}, Log: logs.add})
	if err := n.WaitUp(ctx, "rust-any"); err != nil {
		t.Fatal(err)
	}
	if got := logs.find("connected as rust-any (hmac_sha3_512/hmac_sha3_512 json/json)"); len(got) == 0 {
		t.Fatalf("no json session in the log: %q", logs.find("connected as"))
	}
}

// A short MonitorTimeout gives up on a node nobody knows an address of that soon.
func TestMonitorTimeoutApplies(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	n := startGo(t, ctx, Config{NodeID: "go-impatient", MonitorTimeout: 300 * time.Millisecond})
	down, err := n.Monitor(ctx, "ghost#")
	if err != nil {
		t.Fatal(err)
	}
	asked := time.Now()
	if err := n.Send(ctx, "ghost#p", "hi"); err != nil {
		t.Fatal(err)
	}
	select {
	case reason := <-down:
		if len(reason) < 3 || reason[2] != "no known address" {
			t.Fatalf("reason %v", reason)
		}
		if waited := time.Since(asked); waited > 5*time.Second {
			t.Fatalf("took %v with a 300 ms monitor timeout", waited)
		}
	case <-ctx.Done():
		t.Fatal("the monitor did not fire")
	}
}

// Unknown names and negative settings are refused with the field's name.
func TestEngineSettingsChecked(t *testing.T) {
	ctx := context.Background()
	for name, cfg := range map[string]Config{
		"Framings":        {Framings: []string{"storable"}},
		"AuthAccept":      {AuthAccept: []string{"md6"}},
		"ConnectInterval": {ConnectInterval: -time.Second},
		"MaxQueueBytes":   {MaxQueueBytes: -1},
		"MaxHandshakes":   {MaxHandshakes: -1},
	} {
		cfg.NodeID = "go-bad"
		_, err := Start(ctx, cfg)
		if !errors.Is(err, ErrInvalidConfig) || !strings.Contains(err.Error(), name) {
			t.Errorf("%s: %v", name, err)
		}
	}
}
