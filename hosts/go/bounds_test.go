package aemp

import (
	"context"
	"errors"
	"fmt"
	"os/exec"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// logBook collects a node's log lines for a test to look for.
type logBook struct {
	mu    sync.Mutex
	lines []string
}

func (l *logBook) add(_ int, msg string) {
	l.mu.Lock()
	l.lines = append(l.lines, msg)
	l.mu.Unlock()
}

func (l *logBook) find(sub string) []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []string
	for _, s := range l.lines {
		if strings.Contains(s, sub) {
			out = append(out, s)
		}
	}
	return out
}

// stoppedAndLive connects two Rust echo nodes to n and stops NAME-stuck (SIGSTOP), so
// it reads nothing; NAME-live goes on.
func stoppedAndLive(t *testing.T, ctx context.Context, n *Node, name string) {
	t.Helper()
	var stuck *exec.Cmd
	for _, s := range []string{"stuck", "live"} {
		_, cmd := startRust(t, t.TempDir(), name+"-"+s, "s", "--connect", n.Addrs()[0])
		if err := n.WaitUp(ctx, name+"-"+s); err != nil {
			t.Fatal(err)
		}
		if stuck == nil {
			stuck = cmd
		}
	}
	if err := stuck.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { stuck.Process.Signal(syscall.SIGCONT) })
}

// floodUntil sends messages of size bytes to peer's echo port until the node goes
// down with the reason want.
func floodUntil(t *testing.T, ctx context.Context, n *Node, peer, want string, size int) {
	t.Helper()
	down := make(chan string, 1)
	go func() {
		r, err := n.WaitDown(ctx, peer)
		if err != nil {
			r = err.Error()
		}
		down <- r
	}()
	for registered := false; !registered; { // before the flood can cut it off
		if err := n.do(ctx, func() error { registered = len(n.downs[peer]) > 0; return nil }); err != nil {
			t.Fatal(err)
		}
	}
	blob := make([]byte, size)
	for {
		select {
		case r := <-down:
			if r != want {
				t.Fatalf("%s down: %q, want %q", peer, r, want)
			}
			return
		default:
		}
		err := n.Send(ctx, peer+"#echo", n.ID()+"#nobody", blob)
		if err != nil && !errors.Is(err, ErrQueueFull) { // once it is down, its queue fills
			t.Fatalf("no %q: %v", want, err)
		}
	}
}

func echoRoundTrip(t *testing.T, ctx context.Context, n *Node, peer, text string) {
	t.Helper()
	p, err := n.Port(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := n.Send(ctx, peer+"#echo", p.ID, text); err != nil {
		t.Fatal(err)
	}
	m, err := p.Recv(ctx)
	if err != nil || len(m) != 1 || m[0] != text {
		t.Fatalf("echo from %s: %v %v", peer, m, err)
	}
}

func boundedNode(t *testing.T, ctx context.Context, id string, logs *logBook, edit func(*Config)) *Node {
	t.Helper()
	cfg := Config{NodeID: id, Secret: "s", Binds: []string{"127.0.0.1:0"}, Log: logs.add}
	edit(&cfg)
	n, err := Start(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Close(context.Background()) })
	return n
}

// A stopped peer is cut off once more than MaxWriteQueue waits for it; the other peer
// is still served.
func TestStuckPeerCutPastWriteQueue(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	logs := &logBook{}
	limit := 512 << 10 // below the level where sends wait, so only the limit stops them
	n := boundedNode(t, ctx, "go-wq", logs, func(c *Config) { c.MaxWriteQueue = limit })
	stoppedAndLive(t, ctx, n, "wq")
	floodUntil(t, ctx, n, "wq-stuck", fmt.Sprintf("peer does not read: more than %d bytes waiting", limit), 64<<10)
	echoRoundTrip(t, ctx, n, "wq-live", "still served")
}

// A stopped peer holds sends to it back (Send waits) and is cut off after WriteTimeout
// without progress; then the waiting Send returns.
func TestStuckPeerCutAfterWriteTimeout(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	logs := &logBook{}
	n := boundedNode(t, ctx, "go-wt", logs, func(c *Config) { c.WriteTimeout = time.Second })
	stoppedAndLive(t, ctx, n, "wt")
	start := time.Now()
	floodUntil(t, ctx, n, "wt-stuck", "peer does not read: nothing written for 1000 ms", 64<<10)
	if d := time.Since(start); d < time.Second {
		t.Fatalf("cut off after %v, before the timeout", d)
	}
	echoRoundTrip(t, ctx, n, "wt-live", "still served")
}

// Past MaxWriteTotal the connection holding the most is cut off.
func TestStuckPeerCutPastWriteTotal(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	logs := &logBook{}
	total := 256 << 10
	n := boundedNode(t, ctx, "go-wtot", logs, func(c *Config) { c.MaxWriteTotal = total })
	stoppedAndLive(t, ctx, n, "wtot")
	// Sends wait past half the total, so one message must carry it past the whole, even
	// after the kernel's socket buffers (megabytes on loopback) took what they could: with
	// 300 KiB the rest could land between half and the whole, and then every send waited
	// and nothing was cut.
	floodUntil(t, ctx, n, "wtot-stuck", fmt.Sprintf("peer does not read: the node's connections have more than %d bytes waiting, this one the most", total), 8<<20)
	echoRoundTrip(t, ctx, n, "wtot-live", "still served")
}

// A connection that cannot write makes sends to its node wait and reads nothing more;
// once the peer reads again, the waiting send goes out and its answers are read.
func TestStuckPeerReadAgain(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	logs := &logBook{}
	n := boundedNode(t, ctx, "go-rs", logs, func(*Config) {})
	var stuck *exec.Cmd
	for _, s := range []string{"stuck", "live"} {
		_, cmd := startRust(t, t.TempDir(), "rs-"+s, "s", "--connect", n.Addrs()[0])
		if err := n.WaitUp(ctx, "rs-"+s); err != nil {
			t.Fatal(err)
		}
		if stuck == nil {
			stuck = cmd
		}
	}
	stuck.Process.Signal(syscall.SIGSTOP)
	defer stuck.Process.Signal(syscall.SIGCONT)
	blob := make([]byte, 64<<10)
	sent := 0
	var waiting chan error
	for waiting == nil {
		done := make(chan error, 1)
		go func() { done <- n.Send(ctx, "rs-stuck#echo", n.ID()+"#nobody", blob) }()
		select {
		case err := <-done:
			if err != nil {
				t.Fatal(err)
			}
			sent++
		case <-time.After(500 * time.Millisecond):
			waiting = done
		}
	}
	if sent == 0 {
		t.Fatal("the first send waited")
	}
	echoRoundTrip(t, ctx, n, "rs-live", "others go on")
	stuck.Process.Signal(syscall.SIGCONT)
	if err := <-waiting; err != nil {
		t.Fatal(err)
	}
	echoRoundTrip(t, ctx, n, "rs-stuck", "read again")
	if l := logs.find("peer does not read"); len(l) > 0 {
		t.Fatalf("cut off: %v", l)
	}
}

// Negative bounds are refused as invalid configuration.
func TestInvalidBoundsRefused(t *testing.T) {
	ctx := context.Background()
	for name, edit := range map[string]func(*Config){
		"PortCapacity": func(c *Config) { c.PortCapacity = -1 }, "PortBytes": func(c *Config) { c.PortBytes = -1 },
		"PortStall": func(c *Config) { c.PortStall = -1 }, "MaxWriteQueue": func(c *Config) { c.MaxWriteQueue = -1 },
		"MaxWriteTotal": func(c *Config) { c.MaxWriteTotal = -1 }, "WriteTimeout": func(c *Config) { c.WriteTimeout = -1 },
		"CloseTimeout": func(c *Config) { c.CloseTimeout = -1 },
	} {
		cfg := Config{NodeID: "go-bad"}
		edit(&cfg)
		n, err := Start(ctx, cfg)
		if !errors.Is(err, ErrInvalidConfig) || !strings.Contains(err.Error(), name) {
			if n != nil {
				n.Close(ctx)
			}
			t.Fatalf("%s: %v", name, err)
		}
	}
}

// A port nobody reads holds its sender back at PortBytes; then every message arrives,
// in order.
func TestPortBytesHoldSenderBack(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	portBytes := 64 << 10
	rx, err := Start(ctx, Config{NodeID: "go-bb-rx", Secret: "s", Binds: []string{"127.0.0.1:0"}, PortBytes: portBytes})
	if err != nil {
		t.Fatal(err)
	}
	defer rx.Close(ctx)
	tx, err := Start(ctx, Config{NodeID: "go-bb-tx", Secret: "s", Seeds: rx.Addrs()})
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Close(ctx)
	inbox, err := rx.RegisterPort(ctx, "inbox")
	if err != nil {
		t.Fatal(err)
	}
	if err := tx.WaitUp(ctx, "go-bb-rx"); err != nil {
		t.Fatal(err)
	}
	blob := make([]byte, 16<<10)
	const count = 1000 // 16 MiB, far below the default 1024 messages' worth of room
	produced := make(chan error, 1)
	go func() {
		for i := range count {
			if err := tx.Send(ctx, "go-bb-rx#inbox", i, blob); err != nil {
				produced <- err
				return
			}
		}
		produced <- nil
	}()
	time.Sleep(time.Second)
	// Nobody reads: the port stopped at its byte bound plus one round's read (64 KiB
	// and the message it completed), and the sender waits.
	if _, b := inbox.Pending(); b > portBytes+64<<10+2*(len(blob)+64) {
		t.Fatalf("port holds %d bytes", b)
	}
	select {
	case err := <-produced:
		t.Fatalf("the producer finished: %v", err)
	default:
	}
	for i := range count {
		m, err := inbox.Recv(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if toInt(m[0]) != int64(i) {
			t.Fatalf("message %d: %v", i, m[0])
		}
	}
	if err := <-produced; err != nil {
		t.Fatal(err)
	}
}

// A full port that takes nothing for PortStall drops what is past its bounds with one
// warning; the node reads on for another port, and the stalled port, once read, takes
// messages again.
func TestStalledPortDrops(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	logs := &logBook{}
	capacity, count := 8, 100
	n := boundedNode(t, ctx, "go-stall", logs, func(c *Config) { c.PortCapacity = capacity; c.PortStall = 500 * time.Millisecond })
	startRust(t, t.TempDir(), "stall-echo", "s", "--connect", n.Addrs()[0])
	if err := n.WaitUp(ctx, "stall-echo"); err != nil {
		t.Fatal(err)
	}
	stuck, _ := n.RegisterPort(ctx, "stuck")
	live, _ := n.RegisterPort(ctx, "live")
	for i := range count {
		if err := n.Send(ctx, "stall-echo#echo", stuck.ID, i); err != nil {
			t.Fatal(err)
		}
	}
	// The echoes come back in order over one connection: this one arrives only once
	// the node reads past the stuck port's flood.
	if err := n.Send(ctx, "stall-echo#echo", live.ID, "alive"); err != nil {
		t.Fatal(err)
	}
	if m, err := live.Recv(ctx); err != nil || m[0] != "alive" {
		t.Fatalf("%v %v", m, err)
	}
	warn := logs.find("port " + stuck.ID + " took no message")
	re := regexp.MustCompile(`^port go-stall#stuck took no message for 500 ms: dropped (\d+) messages for it$`)
	if len(warn) != 1 || !re.MatchString(warn[0]) {
		t.Fatalf("warnings %q", warn)
	}
	if k, _ := stuck.Pending(); k != capacity {
		t.Fatalf("kept %d", k)
	}
	for i := range capacity {
		if m, err := stuck.Recv(ctx); err != nil || toInt(m[0]) != int64(i) {
			t.Fatalf("kept %d: %v %v", i, m, err)
		}
	}
	if err := n.Send(ctx, "stall-echo#echo", stuck.ID, "again"); err != nil {
		t.Fatal(err)
	}
	if m, err := stuck.Recv(ctx); err != nil || m[0] != "again" {
		t.Fatalf("%v %v", m, err)
	}
}

// SendBatch to a full local port waits as Send does (a run of messages is checked before
// it goes, as Send checks each message): a context that ends first says none went, and
// once the reader makes room the batch goes.
func TestSendBatchWaitsForRoom(t *testing.T) {
	ctx := context.Background()
	n, err := Start(ctx, Config{NodeID: "batch-room", PortCapacity: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close(ctx)
	p, err := n.Port(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if sent, err := n.SendBatch(ctx, []Message{{Port: p.ID, Args: []any{1}}, {Port: p.ID, Args: []any{2}}}); sent != 2 || err != nil {
		t.Fatalf("sent %d: %v", sent, err)
	}
	more := []Message{{Port: p.ID, Args: []any{3}}, {Port: p.ID, Args: []any{4}}}
	short, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
	defer cancel()
	if sent, err := n.SendBatch(short, more); sent != 0 || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("sent %d into a full port: %v", sent, err)
	}
	done := make(chan error, 1)
	go func() {
		_, err := n.SendBatch(ctx, more)
		done <- err
	}()
	for want := int64(1); want <= 4; want++ {
		m, err := p.Recv(ctx)
		if err != nil || len(m) != 1 || toInt(m[0]) != want {
			t.Fatalf("message %d: %v %v", want, m, err)
		}
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}
