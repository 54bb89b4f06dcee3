package aemp

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

// serveEcho accepts l's data connections and sends back what each receives, ending its
// side at EOF, as `aemp run --echo`'s data handler does.
func serveEcho(t testing.TB, l *DataListener, seen chan<- *DataConn) {
	t.Helper()
	go func() {
		for {
			dc, err := l.Accept(context.Background())
			if err != nil {
				return
			}
			if seen != nil {
				seen <- dc
			}
			go func() {
				defer dc.Close()
				if _, err := io.Copy(dc, dc); err == nil {
					dc.CloseWrite()
				}
			}()
		}
	}()
}

// roundTrip sends size random bytes through dc, ends its side, reads everything back
// and checks it byte for byte.
func roundTrip(t *testing.T, dc *DataConn, size int) {
	t.Helper()
	want := make([]byte, size)
	rand.Read(want)
	werr := make(chan error, 1)
	go func() {
		_, err := dc.Write(want)
		if err == nil {
			err = dc.CloseWrite()
		}
		werr <- err
	}()
	dc.SetReadDeadline(time.Now().Add(20 * time.Second))
	got, err := io.ReadAll(dc)
	if err != nil {
		t.Fatalf("read after %d bytes: %v", len(got), err)
	}
	if err := <-werr; err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("got %d bytes back, want %d, equal prefix %d", len(got), len(want), commonPrefix(got, want))
	}
}

func commonPrefix(a, b []byte) int {
	i := 0
	for i < len(a) && i < len(b) && a[i] == b[i] {
		i++
	}
	return i
}

// goPair starts node "srv" listening and node "cli" connected to it, both serving the
// data handler echo, and waits until they are up.
func goPair(t testing.TB, ctx context.Context, cert []byte, seen chan<- *DataConn) (srv, cli *Node) {
	t.Helper()
	logs := &logBook{}
	logTo := func(id string) func(int, string) {
		return func(level int, msg string) { logs.add(level, id+": "+msg) }
	}
	srv = startGo(t, ctx, Config{NodeID: "srv", Secret: "s", Cert: cert, Binds: []string{"127.0.0.1:0"}, Log: logTo("srv")})
	cli = startGo(t, ctx, Config{NodeID: "cli", Secret: "s", Cert: cert, Log: logTo("cli")})
	for _, n := range []*Node{srv, cli} {
		l, err := n.HandleDataConnections("echo")
		if err != nil {
			t.Fatal(err)
		}
		serveEcho(t, l, seen)
	}
	if err := cli.Connect(ctx, srv.Addrs()[0]); err != nil {
		t.Fatal(err)
	}
	if err := cli.WaitUp(ctx, "srv"); err != nil {
		t.Fatalf("%v; the nodes' logs:\n%s", err, strings.Join(logs.find(""), "\n"))
	}
	return srv, cli
}

// Between two Go nodes, plain and inside TLS, each asks the other: the asker that
// dialled the other opens the stream itself, the one that was dialled has the other
// open it. 1 MiB goes there and back; both ends see the id, nodes, handler and
// arguments.
func TestDataConnGoToGo(t *testing.T) {
	for _, tlsOn := range []bool{false, true} {
		name := "plain"
		var cert []byte
		if tlsOn {
			name, cert = "tls", genCert(t, t.TempDir())
		}
		t.Run(name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			seen := make(chan *DataConn, 2)
			srv, cli := goPair(t, ctx, cert, seen)
			for _, c := range []struct{ asker, other *Node }{{cli, srv}, {srv, cli}} {
				dc, err := c.asker.DataConnect(ctx, c.other.ID(), "echo", "file.txt", 7)
				if err != nil {
					t.Fatalf("%s asks %s: %v", c.asker.ID(), c.other.ID(), err)
				}
				theirs := <-seen
				wantArgs := []any{"file.txt", uint64(7)}
				if dc.Node() != c.other.ID() || theirs.Node() != c.asker.ID() || dc.ID() != theirs.ID() ||
					!strings.HasSuffix(dc.ID(), "@"+c.asker.ID()) || dc.Handler() != "echo" || theirs.Handler() != "echo" ||
					!reflect.DeepEqual(theirs.Args(), wantArgs) || !reflect.DeepEqual(dc.Args(), wantArgs) {
					t.Fatalf("ours %s %s %s %v, theirs %s %s %s %v", dc.ID(), dc.Node(), dc.Handler(), dc.Args(),
						theirs.ID(), theirs.Node(), theirs.Handler(), theirs.Args())
				}
				roundTrip(t, dc, 1<<20)
				dc.Close()
			}
		})
	}
}

// A handler the other node does not serve fails with the reference's message.
func TestDataConnUnknownHandler(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	_, cli := goPair(t, ctx, nil, nil)
	_, err := cli.DataConnect(ctx, "srv", "nope")
	var de *DataConnError
	if !errors.As(err, &de) || de.Message != "nope: no such data connection handler" {
		t.Fatalf("got %v", err)
	}
	// The node goes on: the next request works.
	dc, err := cli.DataConnect(ctx, "srv", "echo")
	if err != nil {
		t.Fatal(err)
	}
	roundTrip(t, dc, 10)
	dc.Close()
}

// A node that cannot be reached fails at ctx's deadline with the engine's message.
func TestDataConnTimeout(t *testing.T) {
	n := startGo(t, context.Background(), Config{NodeID: "lonely", Secret: "s"})
	ctx, cancel := context.WithTimeout(context.Background(), 1500*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := n.DataConnect(ctx, "ghost", "echo")
	var de *DataConnError
	if !errors.As(err, &de) || !strings.HasPrefix(de.Message, "ghost: unable to establish connection within 1.5") {
		t.Fatalf("got %v", err)
	}
	t.Logf("failed after %v: %v", time.Since(start), err)
	if d := time.Since(start); d < time.Second || d > 5*time.Second {
		t.Fatalf("failed after %v", d)
	}
	// Cancelling gives ctx's error.
	cctx, ccancel := context.WithCancel(context.Background())
	time.AfterFunc(100*time.Millisecond, ccancel)
	if _, err := n.DataConnect(cctx, "ghost", "echo"); !errors.Is(err, context.Canceled) {
		t.Fatalf("got %v", err)
	}
}

// A data connection to the node itself is a socket pair to its own handler, which ends
// its side as a remote stream's.
func TestDataConnOwnNode(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	n := startGo(t, ctx, Config{NodeID: "me", Secret: "s"})
	if _, err := n.DataConnect(ctx, "me", "echo"); err == nil || !strings.Contains(err.Error(), "echo: no such data connection handler") {
		t.Fatalf("got %v", err)
	}
	l, err := n.HandleDataConnections("echo")
	if err != nil {
		t.Fatal(err)
	}
	seen := make(chan *DataConn, 1)
	serveEcho(t, l, seen)
	dc, err := n.DataConnect(ctx, "me#anything", "echo", "x")
	if err != nil {
		t.Fatal(err)
	}
	defer dc.Close()
	theirs := <-seen
	if dc.ID() != "1@me" || theirs.ID() != dc.ID() || dc.Node() != "me" || !reflect.DeepEqual(theirs.Args(), []any{"x"}) {
		t.Fatalf("%s %s %v", dc.ID(), dc.Node(), theirs.Args())
	}
	roundTrip(t, dc, 1<<20)
}

// A second listener for a name takes over: the first one's Accept ends with
// net.ErrClosed, the next connection goes to the second; a closed listener's
// connections are closed, the asker reading EOF.
func TestDataConnListenerTakeover(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	srv, cli := goPair(t, ctx, nil, nil)
	first, err := srv.HandleDataConnections("up")
	if err != nil {
		t.Fatal(err)
	}
	ended := make(chan error, 1)
	go func() { _, err := first.Accept(ctx); ended <- err }()
	second, err := srv.HandleDataConnections("up")
	if err != nil {
		t.Fatal(err)
	}
	if err := <-ended; !errors.Is(err, net.ErrClosed) {
		t.Fatalf("first Accept: %v", err)
	}
	dc, err := cli.DataConnect(ctx, "srv", "up", "a")
	if err != nil {
		t.Fatal(err)
	}
	defer dc.Close()
	theirs, err := second.Accept(ctx)
	if err != nil || !reflect.DeepEqual(theirs.Args(), []any{"a"}) {
		t.Fatalf("%v", err)
	}
	theirs.Close()
	second.Close()
	dc2, err := cli.DataConnect(ctx, "srv", "up")
	if err != nil {
		t.Fatal(err)
	}
	defer dc2.Close()
	dc2.SetReadDeadline(time.Now().Add(10 * time.Second))
	if b, err := io.ReadAll(dc2); err != nil || len(b) != 0 {
		t.Fatalf("closed handler's connection: %q %v", b, err)
	}
}

// Past 64 connections waiting for Accept, the next one is closed with a log line: the
// asker reads EOF; the waiting ones are still there.
func TestDataConnQueueFull(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	logs := &logBook{}
	srv := startGo(t, ctx, Config{NodeID: "full", Secret: "s", Binds: []string{"127.0.0.1:0"}, Log: logs.add})
	cli := startGo(t, ctx, Config{NodeID: "asker", Secret: "s", Seeds: []string{srv.Addrs()[0]}})
	l, err := srv.HandleDataConnections("slow")
	if err != nil {
		t.Fatal(err)
	}
	var conns []*DataConn
	defer func() {
		for _, dc := range conns {
			dc.Close()
		}
	}()
	for i := range dataQueue + 1 {
		dc, err := cli.DataConnect(ctx, "full", "slow", i)
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, dc)
	}
	// The hand-overs finish in no set order: find the one that found the queue full.
	for len(logs.find("64 wait for data handler slow already")) == 0 {
		if ctx.Err() != nil {
			t.Fatalf("no log line of a full queue: %q", logs.find(""))
		}
		time.Sleep(10 * time.Millisecond)
	}
	waiting := map[string]bool{}
	for range dataQueue {
		actx, acancel := context.WithTimeout(ctx, time.Second)
		in, err := l.Accept(actx)
		acancel()
		if err != nil {
			t.Fatalf("after %d accepted: %v", len(waiting), err)
		}
		waiting[in.ID()] = true
		in.Close()
	}
	var closed []*DataConn
	for _, dc := range conns {
		if !waiting[dc.ID()] {
			closed = append(closed, dc)
		}
	}
	if len(closed) != 1 || len(logs.find("64 wait for data handler slow already")) != 1 {
		t.Fatalf("%d not accepted, logs %q", len(closed), logs.find(""))
	}
	closed[0].SetReadDeadline(time.Now().Add(10 * time.Second))
	if b, err := io.ReadAll(closed[0]); err != nil || len(b) != 0 {
		t.Fatalf("the connection past the queue: %q %v", b, err)
	}
}

// A Go node asks a Rust node's echo data handler (`aemp run --echo`), plain and inside
// TLS: 1 MiB goes there and back.
func TestDataConnToRust(t *testing.T) {
	for _, tlsOn := range []bool{false, true} {
		name := "plain"
		if tlsOn {
			name = "tls"
		}
		t.Run(name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			addr, cert := rustNodeCert(t, "rust-data-"+name, "shared", "cbor", tlsOn)
			n := startGo(t, ctx, Config{NodeID: "go-data-" + name, Secret: "shared", Cert: cert, Seeds: []string{addr}})
			if err := n.WaitUp(ctx, "rust-data-"+name); err != nil {
				t.Fatal(err)
			}
			dc, err := n.DataConnect(ctx, "rust-data-"+name, "echo")
			if err != nil {
				t.Fatal(err)
			}
			defer dc.Close()
			if dc.Node() != "rust-data-"+name {
				t.Fatalf("node %s", dc.Node())
			}
			roundTrip(t, dc, 1<<20)
		})
	}
}

// The Rust CLI's `aemp dataconn` (stdin through a data connection, what comes back to
// stdout) against a Go node's handler, plain and inside TLS, with 1 MiB and with 5 bytes
// (which may come with the handshake and the end of the stream in one read).
func TestRustDataconnToGo(t *testing.T) {
	for _, c := range []struct {
		tlsOn bool
		size  int
	}{{false, 1 << 20}, {true, 1 << 20}, {false, 5}, {true, 5}} {
		tlsOn := c.tlsOn
		name := fmt.Sprintf("plain-%d", c.size)
		if tlsOn {
			name = fmt.Sprintf("tls-%d", c.size)
		}
		t.Run(name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			dir := t.TempDir()
			writeRC(t, dir, "shared")
			var cert []byte
			args := []string{"dataconn", "go-served-" + name, "echo", "--secret", "shared"}
			if tlsOn {
				cert = genCert(t, dir)
				certFile := filepath.Join(dir, "cert.pem")
				if err := os.WriteFile(certFile, cert, 0o600); err != nil {
					t.Fatal(err)
				}
				args = append(args, "--cert", certFile)
			}
			n := startGo(t, ctx, Config{NodeID: "go-served-" + name, Secret: "shared", Cert: cert, Binds: []string{"127.0.0.1:0"}})
			l, err := n.HandleDataConnections("echo")
			if err != nil {
				t.Fatal(err)
			}
			serveEcho(t, l, nil)
			want := make([]byte, c.size)
			rand.Read(want)
			cmd := exec.CommandContext(ctx, aempBin(t), append(args, "--connect", n.Addrs()[0])...)
			cmd.Env = append(os.Environ(), "PERL_ANYEVENT_MP_RC="+filepath.Join(dir, "rc"))
			cmd.Stdin = bytes.NewReader(want)
			var stderr bytes.Buffer
			cmd.Stderr = &stderr
			got, err := cmd.Output()
			if err != nil {
				t.Fatalf("aemp dataconn: %v\n%s", err, stderr.Bytes())
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("got %d bytes back, want %d, equal prefix %d", len(got), len(want), commonPrefix(got, want))
			}
		})
	}
}

// The hand-over of a socket whose reader is still reading (the engine hands a stream
// over after that connection's input, so the reader usually waits for the loop): the
// read is cut short, and what the peer sends after the engine's leftover, and its end,
// are the stream's.
func TestHandOverWhileReading(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	n := startGo(t, ctx, Config{NodeID: "w", Secret: "s"})
	l, err := n.HandleDataConnections("h")
	if err != nil {
		t.Fatal(err)
	}
	ours, peer := net.Pipe()
	defer peer.Close()
	setup, _ := encMode.Marshal([]any{"b@x", "x", "x#p", "h", []any{"arg"}, false})
	const id = 1 << 40 // not one of the engine's
	err = n.do(ctx, func() error {
		n.addConn(id, ours)
		n.handOver(n.conns[id], setup, []byte("left"))
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		peer.Write([]byte("over"))
		b := make([]byte, 4)
		io.ReadFull(peer, b)
		peer.Write(b)
		peer.Close()
	}()
	dc, err := l.Accept(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer dc.Close()
	if dc.ID() != "b@x" || dc.Node() != "x" || !reflect.DeepEqual(dc.Args(), []any{"arg"}) {
		t.Fatalf("%s %s %v", dc.ID(), dc.Node(), dc.Args())
	}
	got := make([]byte, 8)
	if _, err := io.ReadFull(dc, got); err != nil || string(got) != "leftover" {
		t.Fatalf("%q %v", got, err)
	}
	if _, err := dc.Write([]byte("back")); err != nil {
		t.Fatal(err)
	}
	rest, err := io.ReadAll(dc)
	if err != nil || string(rest) != "back" {
		t.Fatalf("%q %v", rest, err)
	}
}

// A handler that writes at once and closes: its bytes and its end may reach the asker
// with the handshake's last bytes, and the asker reads them all the same, whichever
// node opened the stream.
func TestDataConnDataWithHandshake(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	srv, cli := goPair(t, ctx, nil, nil)
	for _, n := range []*Node{srv, cli} {
		l, err := n.HandleDataConnections("hello")
		if err != nil {
			t.Fatal(err)
		}
		go func() {
			for {
				dc, err := l.Accept(context.Background())
				if err != nil {
					return
				}
				dc.Write([]byte("hello from " + n.ID()))
				dc.Close()
			}
		}()
	}
	for i := range 20 {
		asker, other := cli, srv
		if i%2 == 1 {
			asker, other = srv, cli
		}
		dc, err := asker.DataConnect(ctx, other.ID(), "hello")
		if err != nil {
			t.Fatal(err)
		}
		dc.SetReadDeadline(time.Now().Add(10 * time.Second))
		b, err := io.ReadAll(dc)
		dc.Close()
		if err != nil || string(b) != "hello from "+other.ID() {
			t.Fatalf("round %d: %q %v", i, b, err)
		}
	}
}

// BenchmarkDataConn: bytes one way through a data connection between two Go nodes over
// loopback, plain and inside TLS (go test -run '^$' -bench DataConn).
func BenchmarkDataConn(b *testing.B) {
	for _, tlsOn := range []bool{false, true} {
		name := "plain"
		var cert []byte
		if tlsOn {
			name, cert = "tls", genCert(b, b.TempDir())
		}
		b.Run(name, func(b *testing.B) {
			ctx := context.Background()
			srv, cli := goPair(b, ctx, cert, nil)
			sink, err := srv.HandleDataConnections("sink")
			if err != nil {
				b.Fatal(err)
			}
			go func() {
				in, err := sink.Accept(ctx)
				if err == nil {
					io.Copy(io.Discard, in)
					in.Close() // the asker reads EOF once everything arrived
				}
			}()
			dc, err := cli.DataConnect(ctx, "srv", "sink")
			if err != nil {
				b.Fatal(err)
			}
			defer dc.Close()
			chunk := make([]byte, 1<<20)
			b.SetBytes(int64(len(chunk)))
			b.ResetTimer()
			for range b.N {
				if _, err := dc.Write(chunk); err != nil {
					b.Fatal(err)
				}
			}
			if err := dc.CloseWrite(); err != nil {
				b.Fatal(err)
			}
			io.Copy(io.Discard, dc)
		})
	}
}
