package aemp

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"math"
	"math/big"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/fxamacker/cbor/v2"
)

// aempBin is the Rust CLI: $AEMP_BIN, else the workspace's debug build. A missing
// binary fails the tests: interop is what they are for.
func aempBin(t testing.TB) string {
	t.Helper()
	bin := os.Getenv("AEMP_BIN")
	if bin == "" {
		bin, _ = filepath.Abs("../../target/debug/aemp")
	}
	if _, err := os.Stat(bin); err != nil {
		t.Fatalf("the Rust aemp binary is needed (cargo build -p aemp-host, or set AEMP_BIN): %v", err)
	}
	return bin
}

// rustNode starts `aemp run --echo` and returns its listening address.
func rustNode(t *testing.T, id, secret, framing string) string {
	t.Helper()
	addr, _ := rustNodeCert(t, id, secret, framing, false)
	return addr
}

// rustNodeCert is rustNode; with withCert, `aemp gencert` first makes the node's
// certificate (a fresh CA of its own), returned as PEM for a Go node to share.
func rustNodeCert(t *testing.T, id, secret, framing string, withCert bool) (string, []byte) {
	t.Helper()
	dir := t.TempDir()
	var cert []byte
	if withCert {
		writeRC(t, dir, secret)
		cert = genCert(t, dir)
	}
	addr, _ := startRust(t, dir, id, secret, "--framing", framing)
	return addr, cert
}

func writeRC(t *testing.T, dir, secret string) {
	t.Helper()
	if _, err := os.Stat(filepath.Join(dir, "rc")); err == nil {
		return
	}
	rc, _ := json.Marshal(map[string]string{"secret": secret})
	if err := os.WriteFile(filepath.Join(dir, "rc"), rc, 0o600); err != nil {
		t.Fatal(err)
	}
}

// startRust runs `aemp run --echo` with its configuration in dir and extra arguments;
// it returns once the node listens and its echo port exists.
func startRust(t *testing.T, dir, id, secret string, extra ...string) (string, *exec.Cmd) {
	t.Helper()
	writeRC(t, dir, secret)
	args := append([]string{"run", "--echo", "--nodeid", id, "--listen", "127.0.0.1:0"}, extra...)
	cmd := exec.Command(aempBin(t), args...)
	cmd.Env = append(os.Environ(), "PERL_ANYEVENT_MP_RC="+filepath.Join(dir, "rc"))
	return startEcho(t, cmd), cmd
}

// startEcho starts cmd, a node with an echo port that prints "node ID listening on
// ADDR" and then "echo port ID" (`aemp run --echo`, cmd/aemp-echo), and returns ADDR
// once both lines came. The node is killed when the test ends.
func startEcho(t *testing.T, cmd *exec.Cmd) string {
	t.Helper()
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	re := regexp.MustCompile(`^node \S+ listening on (\S+)$`)
	sc := bufio.NewScanner(out)
	addr := ""
	for sc.Scan() {
		if m := re.FindStringSubmatch(sc.Text()); m != nil {
			addr = m[1]
		} else if strings.HasPrefix(sc.Text(), "echo port ") && addr != "" {
			go func() {
				for sc.Scan() {
				}
			}()
			return addr
		}
	}
	t.Fatalf("%s printed no address and echo port", cmd.Path)
	return ""
}

// genCert runs `aemp gencert` on dir/rc and returns the certificate file it stored.
func genCert(t testing.TB, dir string) []byte {
	t.Helper()
	rcPath := filepath.Join(dir, "rc")
	cmd := exec.Command(aempBin(t), "gencert")
	cmd.Env = append(os.Environ(), "PERL_ANYEVENT_MP_RC="+rcPath)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("aemp gencert: %v: %s", err, out)
	}
	raw, err := os.ReadFile(rcPath)
	if err != nil {
		t.Fatal(err)
	}
	var rc struct{ Cert string }
	if err := json.Unmarshal(raw, &rc); err != nil || rc.Cert == "" {
		t.Fatalf("aemp gencert stored no cert: %v %s", err, raw)
	}
	return []byte(rc.Cert)
}

// A Go node reaches a Rust node's echo port with hmac authentication, in both framings;
// the echo comes back over the same link, so messages go both ways.
func TestHMACEchoWithRust(t *testing.T) {
	for _, framing := range []string{"json", "cbor"} {
		t.Run(framing, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			addr := rustNode(t, "rust-"+framing, "shared", framing)
			n, err := Start(ctx, Config{NodeID: "go-" + framing, Secret: "shared", Seeds: []string{addr}})
			if err != nil {
				t.Fatal(err)
			}
			defer n.Close(ctx)
			if err := n.WaitUp(ctx, "rust-"+framing); err != nil {
				t.Fatal(err)
			}
			p, err := n.Port(ctx)
			if err != nil {
				t.Fatal(err)
			}
			for i := range 3 {
				if err := n.Send(ctx, "rust-"+framing+"#echo", p.ID, "hello", int64(i), []byte{1, 2}); err != nil {
					t.Fatal(err)
				}
			}
			for i := range 3 {
				m, err := p.Recv(ctx)
				if err != nil {
					t.Fatal(err)
				}
				if len(m) != 3 || m[0] != "hello" || toInt(m[1]) != int64(i) {
					t.Fatalf("message %d: %#v", i, m)
				}
			}
		})
	}
}

func toInt(v any) int64 {
	switch x := v.(type) {
	case uint64:
		return int64(x)
	case int64:
		return x
	case float64:
		return int64(x)
	}
	return -1
}

// A wrong secret is refused with the reference implementation's text, and the node is
// never up.
func TestWrongSecretRefused(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	addr := rustNode(t, "rust-secret", "shared", "cbor")
	logs := make(chan string, 100)
	n, err := Start(ctx, Config{NodeID: "go-wrong", Secret: "other", Seeds: []string{addr},
		Log: func(_ int, msg string) {
			select {
			case logs <- msg:
			default:
			}
		}})
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close(ctx)
	for {
		select {
		case msg := <-logs:
			if strings.Contains(msg, "authentication failure/shared secret mismatch") {
				wctx, wcancel := context.WithTimeout(ctx, 300*time.Millisecond)
				defer wcancel()
				if err := n.WaitUp(wctx, "rust-secret"); !errors.Is(err, context.DeadlineExceeded) {
					t.Fatalf("node up with a wrong secret: %v", err)
				}
				return
			}
		case <-ctx.Done():
			t.Fatal("no authentication failure logged")
		}
	}
}

// A Rust node connects to the Go node's listener (the Go node as the server side).
func TestRustConnectsToGo(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	n, err := Start(ctx, Config{NodeID: "go-server", Secret: "shared", Binds: []string{"127.0.0.1:0"}})
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close(ctx)
	p, err := n.RegisterPort(ctx, "inbox")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	rc, _ := json.Marshal(map[string]string{"secret": "shared"})
	os.WriteFile(filepath.Join(dir, "rc"), rc, 0o600)
	cmd := exec.CommandContext(ctx, aempBin(t), "snd", "go-server#inbox", `"from rust"`, "7", "--connect", n.Addrs()[0])
	cmd.Env = append(os.Environ(), "PERL_ANYEVENT_MP_RC="+filepath.Join(dir, "rc"))
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("aemp snd: %v\n%s", err, out)
	}
	m, err := p.Recv(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// A bare CLI argument is a string, a JSON-quoted one its JSON value.
	if len(m) != 2 || m[0] != "from rust" || m[1] != "7" {
		t.Fatalf("got %#v", m)
	}
}

// A monitor on the Rust node's echo port fires with the reason the Go node killed it with.
func TestMonitorFiresOnKill(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	addr := rustNode(t, "rust-mon", "shared", "cbor")
	n, err := Start(ctx, Config{NodeID: "go-mon", Secret: "shared", Seeds: []string{addr}})
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close(ctx)
	if err := n.WaitUp(ctx, "rust-mon"); err != nil {
		t.Fatal(err)
	}
	down, err := n.Monitor(ctx, "rust-mon#echo")
	if err != nil {
		t.Fatal(err)
	}
	if err := n.Kill(ctx, "rust-mon#echo", "die", "now"); err != nil {
		t.Fatal(err)
	}
	select {
	case reason := <-down:
		if len(reason) != 2 || reason[0] != "die" || reason[1] != "now" {
			t.Fatalf("reason %#v", reason)
		}
	case <-ctx.Done():
		t.Fatal("monitor did not fire")
	}
}

// A Go node and a Rust node sharing one certificate file talk over TLS: the Go node
// dials, and the echoes come back over the same link, so messages go both ways.
func TestTLSEchoWithRust(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	addr, cert := rustNodeCert(t, "rust-tls", "shared", "cbor", true)
	n, err := Start(ctx, Config{NodeID: "go-tls", Secret: "shared", Cert: cert, Seeds: []string{addr}})
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close(ctx)
	if err := n.WaitUp(ctx, "rust-tls"); err != nil {
		t.Fatal(err)
	}
	p, err := n.Port(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		if err := n.Send(ctx, "rust-tls#echo", p.ID, "tls", int64(i)); err != nil {
			t.Fatal(err)
		}
	}
	for i := range 3 {
		m, err := p.Recv(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if len(m) != 2 || m[0] != "tls" || toInt(m[1]) != int64(i) {
			t.Fatalf("message %d: %#v", i, m)
		}
	}
}

// A peer whose certificate comes from another CA is refused: the node never comes up.
func TestTLSOtherCARefused(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	addr, _ := rustNodeCert(t, "rust-tls-other", "shared", "cbor", true)
	other := genCert(t, t.TempDir())
	n, err := Start(ctx, Config{NodeID: "go-tls-other", Secret: "shared", Cert: other, Seeds: []string{addr}})
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close(ctx)
	wctx, wcancel := context.WithTimeout(ctx, 3*time.Second)
	defer wcancel()
	if err := n.WaitUp(wctx, "rust-tls-other"); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("node came up across CAs: %v", err)
	}
}

// A Rust node with the same certificate file connects to the Go listener: the Go node
// is the TLS server and requires the client's certificate.
func TestTLSRustConnectsToGo(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	dir := t.TempDir()
	cert := genCert(t, dir)
	n, err := Start(ctx, Config{NodeID: "go-tls-server", Secret: "shared", Cert: cert, Binds: []string{"127.0.0.1:0"}})
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close(ctx)
	p, err := n.RegisterPort(ctx, "inbox")
	if err != nil {
		t.Fatal(err)
	}
	certFile := filepath.Join(dir, "cert.pem")
	if err := os.WriteFile(certFile, cert, 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.CommandContext(ctx, aempBin(t), "snd", "go-tls-server#inbox", `"over tls"`, "--secret", "shared",
		"--cert", certFile, "--connect", n.Addrs()[0])
	cmd.Env = append(os.Environ(), "PERL_ANYEVENT_MP_RC="+filepath.Join(dir, "rc"))
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("aemp snd: %v\n%s", err, out)
	}
	m, err := p.Recv(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(m) != 1 || m[0] != "over tls" {
		t.Fatalf("got %#v", m)
	}
}

// A Rust peer echoes unusual CBOR: bignums come back as *big.Int, epoch times as
// time.Time, integer keys as map keys, unknown tags as cbor.Tag; a tag 1 around text,
// which a time.Time cannot hold, drops that message with a log line and the node goes on.
func TestUnusualCBORSurvives(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	addr := rustNode(t, "rust-cbor", "shared", "cbor")
	logs := &logBook{}
	n, err := Start(ctx, Config{NodeID: "go-cbor", Secret: "shared", Seeds: []string{addr}, Log: logs.add})
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close(ctx)
	if err := n.WaitUp(ctx, "rust-cbor"); err != nil {
		t.Fatal(err)
	}
	p, err := n.Port(ctx)
	if err != nil {
		t.Fatal(err)
	}
	big80 := new(big.Int).Neg(new(big.Int).Lsh(big.NewInt(1), 80))
	when := time.Unix(1700000000, 0)
	odd := []any{big80, when, map[any]any{uint64(1): "int key"}, cbor.Tag{Number: 4711, Content: "x"},
		[]byte{}, math.Inf(1), "é😀", []any{[]any{[]any{}}}}
	if err := n.Send(ctx, "rust-cbor#echo", append([]any{p.ID}, odd...)...); err != nil {
		t.Fatal(err)
	}
	m, err := p.Recv(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if b, ok := m[0].(*big.Int); !ok || b.Cmp(big80) != 0 {
		t.Fatalf("bignum %#v", m[0])
	}
	if tm, ok := m[1].(time.Time); !ok || !tm.Equal(when) {
		t.Fatalf("time %#v", m[1])
	}
	if !reflect.DeepEqual(m[2:], odd[2:]) {
		t.Fatalf("got %#v", m[2:])
	}
	if err := n.Send(ctx, "rust-cbor#echo", p.ID, cbor.Tag{Number: 1, Content: "not a time"}); err != nil {
		t.Fatal(err)
	}
	if err := n.Send(ctx, "rust-cbor#echo", p.ID, "after"); err != nil {
		t.Fatal(err)
	}
	if m, err := p.Recv(ctx); err != nil || !reflect.DeepEqual(m, []any{"after"}) {
		t.Fatalf("%#v %v", m, err)
	}
	if len(logs.find("message for "+p.ID+" dropped")) != 1 {
		t.Fatalf("no log line for the dropped message: %q", logs.find("dropped"))
	}
	if !isUp(t, ctx, n, "rust-cbor") {
		t.Fatal("the link went down")
	}
}

// isUp asks the engine on the node's loop, which owns it.
func isUp(t *testing.T, ctx context.Context, n *Node, node string) bool {
	t.Helper()
	var up bool
	if err := n.do(ctx, func() (err error) { up, err = n.eng.IsUp(node); return }); err != nil {
		t.Fatal(err)
	}
	return up
}

// Connect reaches a Rust node that is no seed; the echo comes back over that link.
func TestConnectWithoutSeeds(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	addr := rustNode(t, "rust-direct", "shared", "cbor")
	n, err := Start(ctx, Config{NodeID: "go-direct", Secret: "shared"})
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close(ctx)
	if err := n.Connect(ctx, addr); err != nil {
		t.Fatal(err)
	}
	if err := n.WaitUp(ctx, "rust-direct"); err != nil {
		t.Fatal(err)
	}
	echoRoundTrip(t, ctx, n, "rust-direct", "direct")
}

// SendBatch takes a batch to a Rust node in as few engine calls as its destinations
// allow; every echo comes back in order.
func TestSendBatchEchoWithRust(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	addr := rustNode(t, "rust-batch", "shared", "cbor")
	n, err := Start(ctx, Config{NodeID: "go-batch", Secret: "shared", Seeds: []string{addr}})
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close(ctx)
	if err := n.WaitUp(ctx, "rust-batch"); err != nil {
		t.Fatal(err)
	}
	p, err := n.Port(ctx)
	if err != nil {
		t.Fatal(err)
	}
	const total = 5000
	msgs := make([]Message, total)
	for i := range msgs {
		msgs[i] = Message{Port: "rust-batch#echo", Args: []any{p.ID, int64(i)}}
	}
	if sent, err := n.SendBatch(ctx, msgs); sent != total || err != nil {
		t.Fatalf("sent %d of %d: %v", sent, total, err)
	}
	for i := range total {
		m, err := p.Recv(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if len(m) != 1 || toInt(m[0]) != int64(i) {
			t.Fatalf("echo %d: %#v", i, m)
		}
	}
}
