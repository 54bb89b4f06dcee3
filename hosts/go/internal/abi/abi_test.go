package abi

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"sync"
	"testing"

	"github.com/aemp-project/aemp/hosts/go/engine"
)

// testRuntime compiles the module once for all tests, as a host process does.
var testRuntime = sync.OnceValues(func() (*Runtime, error) {
	return NewRuntime(context.Background(), engine.Wasm)
})

func newNode(t *testing.T, id string, edit func(*NodeConfig)) *Node {
	t.Helper()
	ctx := context.Background()
	rt, err := testRuntime()
	if err != nil {
		t.Fatal(err)
	}
	in, err := rt.Instantiate(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { in.Close() })
	c, err := in.DefaultNodeConfig(id)
	if err != nil {
		t.Fatal(err)
	}
	if edit != nil {
		edit(&c)
	}
	n, err := in.Create(c, 0)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// The default config lifts with the engine's defaults, lowers back and creates a node.
func TestNodeConfigRoundTrip(t *testing.T) {
	ctx := context.Background()
	rt, err := testRuntime()
	if err != nil {
		t.Fatal(err)
	}
	in, err := rt.Instantiate(ctx)
	if err != nil {
		t.Fatal(err)
	}
	c, err := in.DefaultNodeConfig("gonode")
	if err != nil {
		t.Fatal(err)
	}
	if c.Transport.NodeID != "gonode" || c.Transport.Protocol != "aemp" || c.ConnectIntervalMs != 2000 ||
		c.MaxQueueBytes != 16<<20 || c.MaxBufferedBytes != 64<<20 || c.MaxHandshakes != 256 ||
		c.Transport.MaxMessageSize != 16<<20 || c.Transport.MaxDep != 128 || len(c.Transport.Framings) == 0 {
		t.Fatalf("defaults: %+v", c)
	}
	c.Transport.Secret = []byte("shared")
	c.Binds = []string{"127.0.0.1:1", "127.0.0.1:2"}
	c.Transport.Greeting = [][2]string{{"k", "v"}}
	n, err := in.Create(c, 0)
	if err != nil {
		t.Fatal(err)
	}
	id, err := n.NodeID()
	if err != nil || id != "gonode" {
		t.Fatalf("node-id %q %v", id, err)
	}
}

// An invalid config comes back as a refusal (result err arm), not a trap.
func TestCreateRefused(t *testing.T) {
	ctx := context.Background()
	rt, err := testRuntime()
	if err != nil {
		t.Fatal(err)
	}
	in, _ := rt.Instantiate(ctx)
	c, _ := in.DefaultNodeConfig("x")
	c.Transport.NodeID = ""
	_, err = in.Create(c, 0)
	var r *Refusal
	if !errors.As(err, &r) || r.Kind != 0 || r.Message == "" {
		t.Fatalf("want invalid-config refusal, got %v", err)
	}
}

// register-port: ok arm a string, err arm port-exists (kind 2).
func TestRegisterPort(t *testing.T) {
	n := newNode(t, "a", nil)
	id, err := n.RegisterPort("echo")
	if err != nil || id != "a#echo" {
		t.Fatalf("%q %v", id, err)
	}
	_, err = n.RegisterPort("echo")
	var r *Refusal
	if !errors.As(err, &r) || r.Kind != 2 {
		t.Fatalf("want port-exists, got %v", err)
	}
}

// data-connect: ok arm the new id, err arm invalid-port-id (kind 1) for the node
// itself; register-data-handler returns without a trap.
func TestDataConnectLowered(t *testing.T) {
	n := newNode(t, "a", nil)
	if err := n.RegisterDataHandler("echo"); err != nil {
		t.Fatal(err)
	}
	port, _ := n.NewPort()
	id, err := n.DataConnect(port, "b", 1000, "echo", []byte{0x81, 0x61, 'x'}, 0)
	if err != nil || !strings.HasSuffix(id, "@a") {
		t.Fatalf("%q %v", id, err)
	}
	_, err = n.DataConnect(port, "a", 1000, "echo", []byte{0x80}, 0)
	var r *Refusal
	if !errors.As(err, &r) || r.Kind != 1 {
		t.Fatalf("want invalid-port-id, got %v", err)
	}
}

// A local send comes back as a delivery variant with the bytes and sizes as sent.
func TestSendDeliver(t *testing.T) {
	n := newNode(t, "a", nil)
	port, err := n.NewPort()
	if err != nil {
		t.Fatal(err)
	}
	args1, args2 := []byte{0x82, 0x01, 0x02}, []byte{0x81, 0x63, 'a', 'b', 'c'}
	data := append(append(append([]byte(port), args1...), port...), args2...)
	if err := n.Send(data, []uint32{uint32(len(port)), 3, uint32(len(port)), 5}, 0); err != nil {
		t.Fatal(err)
	}
	out, err := n.PollOutputs()
	if err != nil {
		t.Fatal(err)
	}
	var got *Output
	for i := range out {
		if out[i].Kind == OutDeliver {
			got = &out[i]
		}
	}
	if got == nil || got.Str != port || !bytes.Equal(got.Bytes, append(args1, args2...)) ||
		len(got.Sizes) != 2 || got.Sizes[0] != 3 || got.Sizes[1] != 5 {
		t.Fatalf("outputs %+v", out)
	}
	// A malformed batch is refused with its index.
	err = n.Send(append([]byte(port), 0xff), []uint32{uint32(len(port)), 1}, 0)
	var se *SendError
	if !errors.As(err, &se) || se.Index != 0 {
		t.Fatalf("want send-error, got %v", err)
	}
}

// Two instances of one compiled module, wired to each other in memory: connect,
// transmit, handle-inputs and node-up all cross the ABI.
func TestTwoNodesInMemory(t *testing.T) {
	secret := func(c *NodeConfig) { c.Transport.Secret = []byte("s") }
	a, b := newNode(t, "a", secret), newNode(t, "b", secret)
	ca, err := a.ConnectAddr("b-addr", 0)
	if err != nil {
		t.Fatal(err)
	}
	cb, _ := b.HandleAccept("a-addr", 0)
	// The accepted connection's handshake has a deadline (option<u64> some arm).
	if at, ok, err := b.PollTimeout(); err != nil || !ok || at == 0 {
		t.Fatalf("poll-timeout %v %v %v", at, ok, err)
	}
	var up [2]bool
	step := func(from *Node, fromConn uint64, to *Node, toConn uint64, i int) {
		out, err := from.PollOutputs()
		if err != nil {
			t.Fatal(err)
		}
		var in []Input
		for _, o := range out {
			switch o.Kind {
			case OutConnect:
				if err := from.HandleConnected(o.Conn, 0); err != nil {
					t.Fatal(err)
				}
			case OutTransmit:
				if o.Conn == fromConn {
					in = append(in, Input{toConn, o.Bytes})
				}
			case OutNodeUp:
				up[i] = true
			}
		}
		if len(in) > 0 {
			if err := to.HandleInputs(in, 0); err != nil {
				t.Fatal(err)
			}
		}
	}
	for range 20 {
		step(a, ca, b, cb, 0)
		step(b, cb, a, ca, 1)
	}
	if !up[0] || !up[1] {
		t.Fatalf("nodes not up: %v", up)
	}
}

// Random bytes as guest memory never make the lifting panic.
func FuzzLiftOutputs(f *testing.F) {
	f.Add([]byte{8, 0, 0, 0, 1, 0, 0, 0}, uint32(0))
	f.Fuzz(func(t *testing.T, mem []byte, p uint32) {
		_, _ = LiftOutputs(Mem{B: mem}, p)
		_, _ = LiftNodeConfig(Mem{B: mem}, p)
	})
}

// result<_, refusal>: ok for a well-formed call, malformed (kind 10) for a reason that
// is not one CBOR item.
func TestMonitorKillResults(t *testing.T) {
	n := newNode(t, "a", nil)
	port, _ := n.NewPort()
	if err := n.Monitor(port, 0); err != nil {
		t.Fatal(err)
	}
	var r *Refusal
	if err := n.Kill(port, []byte{0x82, 0x01}, 0); !errors.As(err, &r) || r.Kind != 10 {
		t.Fatalf("want malformed, got %v", err)
	}
	if err := n.Kill(port, []byte{0x81, 0x61, 'x'}, 0); err != nil {
		t.Fatal(err)
	}
	out, err := n.PollOutputs()
	if err != nil {
		t.Fatal(err)
	}
	for _, o := range out {
		if o.Kind == OutPortDown && o.Str == port && bytes.Equal(o.Bytes, []byte{0x81, 0x61, 'x'}) {
			return
		}
	}
	t.Fatalf("no port-down in %+v", out)
}

// The database calls lower their arguments: a query returns an id, a value that is not
// CBOR is refused (the result's err arm), the rest return without a trap.
func TestDatabaseCalls(t *testing.T) {
	n := newNode(t, "db", nil)
	if err := n.DBSet("fam", "k", []byte{0x01}, 1); err != nil {
		t.Fatal(err)
	}
	var r *Refusal
	if err := n.DBSet("fam", "k", []byte{0xff, 0xff}, 1); !errors.As(err, &r) {
		t.Fatalf("malformed value: %v", err)
	}
	if err := n.DBDel("fam", []string{"k", "other"}, 2); err != nil {
		t.Fatal(err)
	}
	ids := map[string]bool{}
	for _, q := range []string{"db-family", "db-keys", "db-values"} {
		id, err := n.DBQuery(q, "fam", 3)
		if err != nil || id == "" || ids[id] {
			t.Fatalf("%s: %q %v", q, id, err)
		}
		ids[id] = true
	}
	for _, off := range []bool{false, true} {
		if err := n.DBMon("fam", off, 4); err != nil {
			t.Fatal(err)
		}
	}
	if err := n.RegisterHandler("tag"); err != nil {
		t.Fatal(err)
	}
	if q, err := n.QueuedBytes(); err != nil || q != 0 {
		t.Fatalf("queued-bytes %d %v", q, err)
	}
	if err := n.Unmonitor("db#nothing", 5); err != nil {
		t.Fatal(err)
	}
	if _, err := n.PollOutputs(); err != nil {
		t.Fatal(err)
	}
}
