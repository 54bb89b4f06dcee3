// Package aemp runs an AEMP node (the node-to-node protocol of Perl's AnyEvent::MP)
// in Go: the protocol engine is the project's WebAssembly core module, run by wazero;
// this package provides sockets, time and randomness and turns the engine's outputs
// into Go values.
package aemp

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"iter"
	"net"
	"os"
	"sync"
	"time"

	"github.com/aemp-project/aemp/hosts/go/engine"
	"github.com/aemp-project/aemp/hosts/go/internal/abi"
	"github.com/fxamacker/cbor/v2"
)

// Config says how a node starts. NodeID is required.
type Config struct {
	NodeID string
	// Secret is the network's shared secret (hmac-sha3512 authentication).
	Secret string
	// Binds are addresses to listen on, e.g. "127.0.0.1:4040".
	Binds []string
	// Seeds are addresses of seed nodes to keep connected.
	Seeds []string
	// Cert, when set, is the PEM text of an AnyEvent::MP certificate file (certificate(s)
	// and private key): connections then switch to TLS when the engine says so. Every
	// certificate in it is a trust anchor; peers must present one of them or a chain to one.
	Cert []byte
	// Log, when set, receives the engine's log lines (level 0 error .. 3 debug), such
	// as why a connection closed; it runs on the node's loop and must not block.
	Log func(level int, msg string)
}

// Errors a caller can match with errors.Is.
var (
	// ErrClosed: the node was closed.
	ErrClosed = errors.New("aemp: node closed")
	// ErrStopped: the engine failed (a trap) and the node stopped.
	ErrStopped = errors.New("aemp: node stopped")
)

// Refusal is the engine refusing a call; Kind is its refusal-kind.
type Refusal struct {
	Kind    RefusalKind
	Message string
}

func (r *Refusal) Error() string { return "aemp: " + r.Message }

// Is makes errors.Is(err, ErrPortExists) and the like work.
func (r *Refusal) Is(target error) bool {
	t, ok := target.(*Refusal)
	return ok && t.Message == "" && t.Kind == r.Kind
}

// RefusalKind is the WIT enum refusal-kind.
type RefusalKind uint8

// The refusal kinds, in WIT order.
const (
	InvalidConfig RefusalKind = iota
	InvalidPortID
	PortExists
	QueueFull
	BudgetExhausted
	NotConnected
	ClosedConn
	TooLarge
	TooDeep
	NotAnArray
	Malformed
	NotJSON
)

// Sentinels for errors.Is on refusals.
var (
	ErrInvalidConfig = &Refusal{Kind: InvalidConfig}
	ErrInvalidPortID = &Refusal{Kind: InvalidPortID}
	ErrPortExists    = &Refusal{Kind: PortExists}
	ErrQueueFull     = &Refusal{Kind: QueueFull}
)

var (
	runtimeOnce sync.Once
	runtime     *abi.Runtime
	runtimeErr  error
)

// sharedRuntime compiles the engine once per process; each node is an instance.
func sharedRuntime() (*abi.Runtime, error) {
	runtimeOnce.Do(func() { runtime, runtimeErr = abi.NewRuntime(context.Background(), engine.Wasm) })
	return runtime, runtimeErr
}

func refusal(err error) error {
	var r *abi.Refusal
	if errors.As(err, &r) {
		return &Refusal{Kind: RefusalKind(r.Kind), Message: r.Message}
	}
	var s *abi.SendError
	if errors.As(err, &s) {
		return &Refusal{Kind: RefusalKind(s.Kind), Message: s.Message}
	}
	if errors.Is(err, abi.ErrTrap) {
		return fmt.Errorf("%w: %v", ErrStopped, err)
	}
	return err
}

// Node is a running node. Its methods are safe for concurrent use.
type Node struct {
	id     string
	eng    *abi.Node
	inst   *abi.Instance
	start  time.Time
	ops    chan func()
	events chan event
	done   chan struct{}
	err    error
	conns  map[uint64]*conn
	ports  map[string]*Port
	lns    []net.Listener
	wg     sync.WaitGroup
	mu     sync.Mutex // guards ports for Port lookups outside the loop
	ups    map[string][]chan struct{}
	log    func(level int, msg string)
	mons   map[string][]chan []any
	closed bool
	tlsCli *tls.Config
	tlsSrv *tls.Config
	resume []uint64 // conns whose reader waits for the loop to take its bytes
}

type event struct {
	conn     uint64
	data     []byte
	eof      bool
	err      error
	accepted net.Conn
	dialed   net.Conn
}

type conn struct {
	c    net.Conn      // what the reader reads next: the socket, or TLS over it
	out  chan outMsg   // bounded: the writer applies TCP backpressure to the loop
	next chan net.Conn // the reader waits here after each read, so no TLS record is read as plain bytes
}

// outMsg is bytes to write, or (sw set) the switch of the writer to TLS.
type outMsg struct {
	b  []byte
	sw net.Conn
}

// CertFromFile reads an AnyEvent::MP certificate file for Config.Cert.
func CertFromFile(path string) ([]byte, error) { return os.ReadFile(path) }

// tlsConfigs builds the client and server configs from a certificate file: no host-name
// check, client certificates required, the file's certificates as the only roots.
func tlsConfigs(pemText []byte) (client, server *tls.Config, err error) {
	pair, err := tls.X509KeyPair(pemText, pemText)
	if err != nil {
		return nil, nil, fmt.Errorf("aemp: certificate: %w", err)
	}
	roots := x509.NewCertPool()
	for rest := pemText; ; {
		var b *pem.Block
		if b, rest = pem.Decode(rest); b == nil {
			break
		}
		if b.Type == "CERTIFICATE" {
			c, err := x509.ParseCertificate(b.Bytes)
			if err != nil {
				return nil, nil, fmt.Errorf("aemp: certificate: %w", err)
			}
			roots.AddCert(c)
		}
	}
	verify := func(cs tls.ConnectionState) error {
		if len(cs.PeerCertificates) == 0 {
			return errors.New("aemp: peer sent no certificate")
		}
		inter := x509.NewCertPool()
		for _, c := range cs.PeerCertificates[1:] {
			inter.AddCert(c)
		}
		_, err := cs.PeerCertificates[0].Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter,
			KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
		return err
	}
	base := &tls.Config{Certificates: []tls.Certificate{pair}, MinVersion: tls.VersionTLS12,
		InsecureSkipVerify: true, // the chain check is VerifyConnection's; there is no host name
		VerifyConnection:   verify}
	client, server = base.Clone(), base.Clone()
	server.ClientAuth = tls.RequireAnyClientCert
	return client, server, nil
}

// prefixConn reads leftover (bytes already taken from the socket) before the socket.
type prefixConn struct {
	net.Conn
	pre []byte
}

func (p *prefixConn) Read(b []byte) (int, error) {
	if len(p.pre) > 0 {
		k := copy(b, p.pre)
		p.pre = p.pre[k:]
		return k, nil
	}
	return p.Conn.Read(b)
}

func (n *Node) now() uint64 { return uint64(time.Since(n.start).Milliseconds()) }

// Start creates a node, binds its listeners and starts its loop.
func Start(ctx context.Context, cfg Config) (*Node, error) {
	rt, err := sharedRuntime()
	if err != nil {
		return nil, err
	}
	inst, err := rt.Instantiate(context.Background())
	if err != nil {
		return nil, err
	}
	c, err := inst.DefaultNodeConfig(cfg.NodeID)
	if err != nil {
		return nil, refusal(err)
	}
	if cfg.Secret != "" {
		c.Transport.Secret = []byte(cfg.Secret)
	}
	var tcli, tsrv *tls.Config
	if cfg.Cert != nil {
		if tcli, tsrv, err = tlsConfigs(cfg.Cert); err != nil {
			inst.Close()
			return nil, err
		}
		c.Transport.TLS = true
	}
	n := &Node{id: cfg.NodeID, inst: inst, start: time.Now(), ops: make(chan func()),
		events: make(chan event, 256), done: make(chan struct{}),
		conns: map[uint64]*conn{}, ports: map[string]*Port{}, ups: map[string][]chan struct{}{}, log: cfg.Log, mons: map[string][]chan []any{},
		tlsCli: tcli, tlsSrv: tsrv}
	var binds []string
	for _, b := range cfg.Binds {
		ln, err := net.Listen("tcp", b)
		if err != nil {
			n.closeListeners()
			inst.Close()
			return nil, err
		}
		n.lns = append(n.lns, ln)
		binds = append(binds, ln.Addr().String())
	}
	c.Binds, c.Seeds = binds, cfg.Seeds
	c.WallClockOffsetMs = time.Now().UnixMilli()
	if n.eng, err = inst.Create(c, 0); err != nil {
		n.closeListeners()
		inst.Close()
		return nil, refusal(err)
	}
	for _, ln := range n.lns {
		go n.accept(ln)
	}
	go n.loop()
	return n, nil
}

// Addrs are the node's listening addresses.
func (n *Node) Addrs() []string {
	var out []string
	for _, ln := range n.lns {
		out = append(out, ln.Addr().String())
	}
	return out
}

// ID is the node id.
func (n *Node) ID() string { return n.id }

// Done is closed when the node has stopped.
func (n *Node) Done() <-chan struct{} { return n.done }

func (n *Node) closeListeners() {
	for _, ln := range n.lns {
		ln.Close()
	}
}

func (n *Node) accept(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		select {
		case n.events <- event{accepted: c}:
		case <-n.done:
			c.Close()
			return
		}
	}
}

// do runs f on the loop goroutine, which owns the engine.
func (n *Node) do(ctx context.Context, f func() error) error {
	res := make(chan error, 1)
	select {
	case n.ops <- func() { res <- f() }:
	case <-n.done:
		return n.stopErr()
	case <-ctx.Done():
		return ctx.Err()
	}
	select {
	case err := <-res:
		return err
	case <-n.done:
		return n.stopErr()
	}
}

func (n *Node) stopErr() error {
	if n.err != nil {
		return n.err
	}
	return ErrClosed
}

func (n *Node) loop() {
	timer := time.NewTimer(time.Hour)
	defer func() {
		timer.Stop()
		n.closeListeners()
		for _, c := range n.conns {
			close(c.out)
		}
		n.inst.Close()
		close(n.done)
	}()
	for {
		n.arm(timer)
		var err error
		select {
		case f := <-n.ops:
			f()
		case ev := <-n.events:
			err = n.handle(ev)
		case <-timer.C:
			err = n.eng.HandleTimeout(n.now())
		}
		if err == nil {
			err = n.flush()
		}
		n.resumeReaders()
		if err != nil {
			n.err = fmt.Errorf("%w: %v", ErrStopped, err)
			return
		}
		if n.closed {
			return
		}
	}
}

func (n *Node) arm(t *time.Timer) {
	at, ok, err := n.eng.PollTimeout()
	d := time.Hour
	if err == nil && ok {
		d = max(time.Duration(int64(at)-int64(n.now()))*time.Millisecond, 0)
	}
	t.Reset(d)
}

// handle feeds an event and every other one already waiting as one handle-inputs round.
func (n *Node) handle(ev event) error {
	var inputs []abi.Input
	n.resume = n.resume[:0]
	for {
		var err error
		switch {
		case ev.accepted != nil:
			var id uint64
			if id, err = n.eng.HandleAccept(ev.accepted.RemoteAddr().String(), n.now()); err == nil {
				n.addConn(id, ev.accepted)
			}
		case ev.dialed != nil:
			n.addConn(ev.conn, ev.dialed)
			err = n.eng.HandleConnected(ev.conn, n.now())
		case ev.data != nil:
			inputs = append(inputs, abi.Input{Conn: ev.conn, Data: ev.data})
			n.resume = append(n.resume, ev.conn)
		case ev.eof || ev.err != nil:
			if len(inputs) > 0 { // keep the order of bytes and the end
				if err = n.eng.HandleInputs(inputs, n.now()); err != nil {
					return err
				}
				inputs = nil
			}
			err = n.endConn(ev)
		}
		if err != nil {
			return err
		}
		select {
		case ev = <-n.events:
			continue
		default:
		}
		break
	}
	if len(inputs) > 0 {
		return n.eng.HandleInputs(inputs, n.now())
	}
	return nil
}

func (n *Node) endConn(ev event) error {
	c, ok := n.conns[ev.conn]
	if ev.eof {
		return n.eng.HandleEOF(ev.conn, n.now())
	}
	if ok {
		delete(n.conns, ev.conn)
		close(c.out)
		close(c.next)
	}
	return n.eng.HandleConnError(ev.conn, ev.err.Error(), !ok, n.now())
}

func (n *Node) addConn(id uint64, nc net.Conn) {
	c := &conn{c: nc, out: make(chan outMsg, 64), next: make(chan net.Conn, 1)}
	n.conns[id] = c
	go func() { // writer
		w := nc
		for m := range c.out {
			if m.sw != nil {
				w = m.sw
				continue
			}
			if _, err := w.Write(m.b); err != nil {
				break
			}
		}
		w.Close()
	}()
	go func() { // reader
		r := nc
		for {
			buf := make([]byte, 64<<10)
			k, err := r.Read(buf)
			if k > 0 {
				select {
				case n.events <- event{conn: id, data: buf[:k]}:
				case <-n.done:
					return
				}
				var ok bool
				select {
				case r, ok = <-c.next:
					if !ok {
						return
					}
				case <-n.done:
					return
				}
			}
			if err != nil {
				ev := event{conn: id, eof: errors.Is(err, io.EOF), err: err}
				if ev.eof {
					ev.err = nil
				}
				select {
				case n.events <- ev:
				case <-n.done:
				}
				return
			}
		}
	}()
}

// flush acts on every output of the engine.
func (n *Node) flush() error {
	outs, err := n.eng.PollOutputs()
	if err != nil {
		return err
	}
	for _, o := range outs {
		switch o.Kind {
		case abi.OutTransmit:
			if c, ok := n.conns[o.Conn]; ok {
				c.out <- outMsg{b: o.Bytes}
			}
		case abi.OutStartTLS:
			if c, ok := n.conns[o.Conn]; ok {
				n.startTLS(c, o.Role, o.Bytes)
			}
		case abi.OutConnect:
			id, addr := o.Conn, o.Str
			go func() {
				c, err := net.DialTimeout("tcp", addr, 10*time.Second)
				ev := event{conn: id, dialed: c, err: err}
				select {
				case n.events <- ev:
				case <-n.done:
					if c != nil {
						c.Close()
					}
				}
			}()
		case abi.OutClose:
			if c, ok := n.conns[o.Conn]; ok {
				delete(n.conns, o.Conn)
				close(c.out) // the writer writes what was queued, then closes
				close(c.next)
			}
		case abi.OutDeliver:
			n.mu.Lock()
			p := n.ports[o.Str]
			n.mu.Unlock()
			if p != nil {
				p.push(o.Bytes, o.Sizes)
			}
		case abi.OutPortDown:
			var reason []any
			// A reason Go cannot decode still fires the monitor, with no reason.
			_ = cbor.Unmarshal(o.Bytes, &reason)
			for _, ch := range n.mons[o.Str] {
				ch <- reason
			}
			delete(n.mons, o.Str)
		case abi.OutLog:
			if n.log != nil {
				n.log(int(o.Level), o.Str)
			}
		case abi.OutNodeUp:
			for _, ch := range n.ups[o.Str] {
				close(ch)
			}
			delete(n.ups, o.Str)
		}
	}
	return nil
}

// resumeReaders lets readers whose bytes the engine took read on, through TLS if
// the engine started it meanwhile.
func (n *Node) resumeReaders() {
	for _, id := range n.resume {
		if c, ok := n.conns[id]; ok {
			c.next <- c.c
		}
	}
	n.resume = n.resume[:0]
}

// startTLS wraps the socket in TLS; the handshake runs on first read or write, and
// its failure ends as a read error, closing this connection only.
func (n *Node) startTLS(c *conn, role uint8, leftover []byte) {
	raw := &prefixConn{Conn: c.c, pre: append([]byte(nil), leftover...)}
	var t *tls.Conn
	switch {
	case n.tlsCli == nil: // the engine asks only when TLS is configured
		t = tls.Client(raw, &tls.Config{MinVersion: tls.VersionTLS13, InsecureSkipVerify: true,
			VerifyConnection: func(tls.ConnectionState) error { return errors.New("aemp: no certificate configured") }})
	case role == 0:
		t = tls.Client(raw, n.tlsCli)
	default:
		t = tls.Server(raw, n.tlsSrv)
	}
	c.c = t
	c.out <- outMsg{sw: t}
}

// Port is a local port: messages sent to its ID arrive in Recv.
type Port struct {
	ID    string
	mu    sync.Mutex
	queue [][]any
	ready chan struct{}
}

func (p *Port) push(data []byte, sizes []uint32) {
	p.mu.Lock()
	defer p.mu.Unlock()
	off := uint32(0)
	for _, s := range sizes {
		var args []any
		// The engine checked the CBOR; a value Go cannot hold is dropped, not fatal.
		if err := cbor.Unmarshal(data[off:off+s], &args); err == nil {
			p.queue = append(p.queue, args)
		}
		off += s
	}
	select {
	case p.ready <- struct{}{}:
	default:
	}
}

// Recv waits for the next message (its arguments).
func (p *Port) Recv(ctx context.Context) ([]any, error) {
	for {
		p.mu.Lock()
		if len(p.queue) > 0 {
			m := p.queue[0]
			p.queue = p.queue[1:]
			p.mu.Unlock()
			return m, nil
		}
		p.mu.Unlock()
		select {
		case <-p.ready:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

// Messages yields the port's messages until ctx ends or the loop body breaks.
func (p *Port) Messages(ctx context.Context) iter.Seq[[]any] {
	return func(yield func([]any) bool) {
		for {
			m, err := p.Recv(ctx)
			if err != nil || !yield(m) {
				return
			}
		}
	}
}

func (n *Node) addPort(id string) *Port {
	p := &Port{ID: id, ready: make(chan struct{}, 1)}
	n.mu.Lock()
	n.ports[id] = p
	n.mu.Unlock()
	return p
}

// Port makes a local port with a fresh name.
func (n *Node) Port(ctx context.Context) (*Port, error) {
	var p *Port
	err := n.do(ctx, func() error {
		id, err := n.eng.NewPort()
		if err == nil {
			p = n.addPort(id)
		}
		return refusal(err)
	})
	return p, err
}

// RegisterPort makes a local port with a chosen name (errors.Is(err, ErrPortExists)).
func (n *Node) RegisterPort(ctx context.Context, name string) (*Port, error) {
	var p *Port
	err := n.do(ctx, func() error {
		id, err := n.eng.RegisterPort(name)
		if err == nil {
			p = n.addPort(id)
		}
		return refusal(err)
	})
	return p, err
}

// Send sends args (CBOR-encodable values) to the port with this id.
func (n *Node) Send(ctx context.Context, portID string, args ...any) error {
	if args == nil {
		args = []any{}
	}
	enc, err := cbor.Marshal(args)
	if err != nil {
		return err
	}
	data := append([]byte(portID), enc...)
	return n.do(ctx, func() error {
		return refusal(n.eng.Send(data, []uint32{uint32(len(portID)), uint32(len(enc))}, n.now()))
	})
}

// WaitUp waits until the node with this id is connected.
func (n *Node) WaitUp(ctx context.Context, nodeID string) error {
	ch := make(chan struct{})
	err := n.do(ctx, func() error {
		up, err := n.isUp(nodeID)
		if up {
			close(ch)
		} else {
			n.ups[nodeID] = append(n.ups[nodeID], ch)
		}
		return err
	})
	if err != nil {
		return err
	}
	select {
	case <-ch:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-n.done:
		return n.stopErr()
	}
}

func (n *Node) isUp(nodeID string) (bool, error) { return n.eng.IsUp(nodeID) }

// Close stops the node after handing what is queued to its connections.
func (n *Node) Close(ctx context.Context) error {
	err := n.do(ctx, func() error { n.closed = true; return nil })
	if err != nil && !errors.Is(err, ErrClosed) {
		return err
	}
	select {
	case <-n.done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Kill kills a port (local or remote) with a reason; no reason is a normal exit.
func (n *Node) Kill(ctx context.Context, portID string, reason ...any) error {
	if reason == nil {
		reason = []any{}
	}
	enc, err := cbor.Marshal(reason)
	if err != nil {
		return err
	}
	return n.do(ctx, func() error { return refusal(n.eng.Kill(portID, enc, n.now())) })
}

// Monitor watches a port: the channel receives its kill reason once, when it dies.
func (n *Node) Monitor(ctx context.Context, portID string) (<-chan []any, error) {
	ch := make(chan []any, 1)
	err := n.do(ctx, func() error {
		if err := refusal(n.eng.Monitor(portID, n.now())); err != nil {
			return err
		}
		n.mons[portID] = append(n.mons[portID], ch)
		return nil
	})
	if err != nil {
		return nil, err
	}
	return ch, nil
}
