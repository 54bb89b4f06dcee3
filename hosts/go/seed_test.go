package aemp

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"testing"
	"time"
)

func startGo(t testing.TB, ctx context.Context, cfg Config) *Node {
	t.Helper()
	n, err := Start(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Close(context.Background()) })
	return n
}

// waitKnown waits until the master's 'l family (listeners) has node: then other nodes
// can be told where it listens.
func waitKnown(t *testing.T, ctx context.Context, n *Node, node string) {
	t.Helper()
	for {
		keys, err := n.DBKeys(ctx, "'l")
		if err != nil {
			t.Fatal(err)
		}
		if slices.Contains(keys, node) {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Two Go nodes that know only a Rust seed find each other through it and share the
// database it keeps as their master: set, monitor, family, keys, values, delete.
func TestFoundAndDatabaseThroughRustSeed(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	seed := rustNode(t, "rust-seed", "shared", "cbor")
	cfg := func(id string) Config {
		return Config{NodeID: id, Secret: "shared", Binds: []string{"127.0.0.1:0"}, Seeds: []string{seed}}
	}
	a, b := startGo(t, ctx, cfg("go-a")), startGo(t, ctx, cfg("go-b"))
	inbox, err := b.RegisterPort(ctx, "inbox")
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range []*Node{a, b} {
		if err := n.WaitUp(ctx, "rust-seed"); err != nil {
			t.Fatal(err)
		}
	}
	waitKnown(t, ctx, a, "go-b")
	// a knows nothing of b but its id: the seed tells it where b listens.
	if err := a.Send(ctx, inbox.ID, "through the seed"); err != nil {
		t.Fatal(err)
	}
	if m, err := inbox.Recv(ctx); err != nil || !reflect.DeepEqual(m, []any{"through the seed"}) {
		t.Fatalf("%v %v", m, err)
	}

	mon, err := b.DBMonitor(ctx, "fam")
	if err != nil {
		t.Fatal(err)
	}
	if first, err := mon.Recv(ctx); err != nil || len(first.Set) != 0 || len(first.Del) != 0 {
		t.Fatalf("the family's contents first: %+v %v", first, err)
	}
	if err := a.DBSet(ctx, "fam", "k", map[string]any{"x": 1}); err != nil {
		t.Fatal(err)
	}
	want := map[any]any{"x": uint64(1)} // nested maps decode with any keys
	ch, err := mon.Recv(ctx)
	if err != nil || !reflect.DeepEqual(ch.Set, map[string]any{"k": want}) {
		t.Fatalf("change %+v %v", ch, err)
	}
	if fam, err := b.DBFamily(ctx, "fam"); err != nil || !reflect.DeepEqual(fam, map[string]any{"k": want}) {
		t.Fatalf("family %v %v", fam, err)
	}
	if keys, err := b.DBKeys(ctx, "fam"); err != nil || !reflect.DeepEqual(keys, []string{"k"}) {
		t.Fatalf("keys %v %v", keys, err)
	}
	if vals, err := b.DBValues(ctx, "fam"); err != nil || !reflect.DeepEqual(vals, []any{want}) {
		t.Fatalf("values %v %v", vals, err)
	}
	if keys, err := b.DBKeys(ctx, "go-unknown-family"); err != nil || len(keys) != 0 {
		t.Fatalf("unknown family %v %v", keys, err)
	}
	if err := a.DBDel(ctx, "fam", "k"); err != nil {
		t.Fatal(err)
	}
	if ch, err := mon.Recv(ctx); err != nil || !reflect.DeepEqual(ch.Del, []string{"k"}) {
		t.Fatalf("delete %+v %v", ch, err)
	}
	if err := mon.Close(ctx); err != nil {
		t.Fatal(err)
	}
}

// A Go node is the seed (the global role runs in its engine): a Rust node and another
// Go node that know only it find each other through it, both ways.
func TestRustFoundThroughGoSeed(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	seed := startGo(t, ctx, Config{NodeID: "go-seed", Secret: "shared", Binds: []string{"127.0.0.1:0"}})
	c := startGo(t, ctx, Config{NodeID: "go-c", Secret: "shared", Binds: []string{"127.0.0.1:0"}, Seeds: seed.Addrs()})
	dir := t.TempDir()
	rc, _ := json.Marshal(map[string]any{"secret": "shared", "seeds": seed.Addrs()})
	if err := os.WriteFile(filepath.Join(dir, "rc"), rc, 0o600); err != nil {
		t.Fatal(err)
	}
	startRust(t, dir, "rust-r", "shared")
	if err := c.WaitUp(ctx, "go-seed"); err != nil {
		t.Fatal(err)
	}
	waitKnown(t, ctx, c, "rust-r")
	waitKnown(t, ctx, c, "go-c")
	// c knows only the seed, yet reaches the Rust node; its echo comes back to c, so the
	// Rust node found c too.
	p, err := c.Port(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Send(ctx, "rust-r#echo", p.ID, "via the go seed"); err != nil {
		t.Fatal(err)
	}
	if m, err := p.Recv(ctx); err != nil || !reflect.DeepEqual(m, []any{"via the go seed"}) {
		t.Fatalf("%v %v", m, err)
	}
}

// A node closed with messages still queued (sent before its connection was up)
// delivers them before closing: a Go node sends 100 messages to a Rust node's echo port
// and closes at once; the echoes reach another Go node in order.
func TestCloseDeliversQueued(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	addr := rustNode(t, "rust-close", "shared", "cbor")
	rx := startGo(t, ctx, Config{NodeID: "go-close-rx", Secret: "shared", Binds: []string{"127.0.0.1:0"}, Seeds: []string{addr}})
	inbox, err := rx.RegisterPort(ctx, "inbox")
	if err != nil {
		t.Fatal(err)
	}
	if err := rx.WaitUp(ctx, "rust-close"); err != nil {
		t.Fatal(err)
	}
	tx, err := Start(ctx, Config{NodeID: "go-close-tx", Secret: "shared", Seeds: []string{addr}})
	if err != nil {
		t.Fatal(err)
	}
	for i := range 100 {
		if err := tx.Send(ctx, "rust-close#echo", inbox.ID, i); err != nil {
			t.Fatal(err)
		}
	}
	if err := tx.Close(ctx); err != nil {
		t.Fatal(err)
	}
	for i := range 100 {
		m, err := inbox.Recv(ctx)
		if err != nil || toInt(m[0]) != int64(i) {
			t.Fatalf("message %d: %v %v", i, m, err)
		}
	}
}

// Node-port requests with a handled tag come to Requests: a Rust node sends
// [greet, hello] to the Go node's node port.
func TestRequestsFromRust(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	n := startGo(t, ctx, Config{NodeID: "go-req", Secret: "shared", Binds: []string{"127.0.0.1:0"}})
	reqs, err := n.HandleRequests(ctx, "greet")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := n.HandleRequests(ctx, "greet"); !errors.Is(err, ErrPortExists) {
		t.Fatalf("a second handler: %v", err)
	}
	dir := t.TempDir()
	writeRC(t, dir, "shared")
	cmd := exec.CommandContext(ctx, aempBin(t), "snd", "go-req", "greet", "hello", "--nodeid", "rust-req", "--connect", n.Addrs()[0])
	cmd.Env = append(os.Environ(), "PERL_ANYEVENT_MP_RC="+filepath.Join(dir, "rc"))
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("aemp snd: %v\n%s", err, out)
	}
	r, err := reqs.Recv(ctx)
	if err != nil || r.From != "rust-req" || !reflect.DeepEqual(r.Args, []any{"hello"}) {
		t.Fatalf("%+v %v", r, err)
	}
}
