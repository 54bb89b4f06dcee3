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
	"math"
	"net"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/aemp-project/aemp/hosts/go/engine"
	"github.com/aemp-project/aemp/hosts/go/internal/abi"
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
	// Framings are the wire framings offered, in order of preference ("cbor", "json");
	// empty: the engine's default, cbor then json.
	Framings []string
	// AuthOffer and AuthAccept are the authentication methods offered and accepted, in
	// order of preference, named as AnyEvent::MP's auth_offer and auth_accept name them
	// ("tls_sha3_512", "hmac_sha3_512", "tls_anon", "cleartext"); empty: the engine's
	// defaults, the reference's.
	AuthOffer, AuthAccept []string
	// MonitorTimeout is how long a node may take to connect, and be silent, before it
	// counts as down (30 s); ConnectInterval spaces the attempts at one node's addresses
	// (2 s). Zero: the default.
	MonitorTimeout, ConnectInterval time.Duration
	// The engine's bounds; zero: the default. MaxQueueBytes is what may wait for one node
	// that is not connected yet (16 MiB), MaxBufferedBytes what the engine holds for all
	// peers together (64 MiB), MaxHandshakes how many accepted connections may be in
	// their handshake at once (256).
	MaxQueueBytes, MaxBufferedBytes, MaxHandshakes int
	// Log, when set, receives the engine's log lines (level 0 error .. 3 debug), such
	// as why a connection closed, and the host's warnings; it runs on the node's loop
	// and must not block.
	Log func(level int, msg string)

	// The host's bounds, as in the Rust, JS and Python hosts; zero means the default,
	// a negative value is refused (ErrInvalidConfig).

	// PortCapacity is how many messages a port holds not taken yet (1024), PortBytes
	// how many bytes (16 MiB); see Port.
	PortCapacity, PortBytes int
	// PortStall is how long a full port may take nothing before it is stalled (10 s).
	PortStall time.Duration
	// MaxWriteQueue is how many bytes may wait to be written to one connection before
	// it is closed (64 MiB): "peer does not read: more than N bytes waiting".
	MaxWriteQueue int
	// MaxWriteTotal is how many bytes may wait for all connections together (128 MiB):
	// past half, sends to every node wait; past it, the connection holding the most is
	// closed ("peer does not read: the node's connections have more than N bytes
	// waiting, this one the most").
	MaxWriteTotal int
	// WriteTimeout closes a connection that has more than 1 MiB waiting and writes
	// nothing for this long (the engine's monitor timeout, 30 s): "peer does not read:
	// nothing written for N ms".
	WriteTimeout time.Duration
	// CloseTimeout is how long Close lets queued messages go out at most (1 s).
	CloseTimeout time.Duration
}

// framingNames and authNames are the WIT enums' cases, in order: a name's index is its
// value on the boundary.
var (
	framingNames = []string{"cbor", "json"}
	authNames    = []string{"tls_sha3_512", "hmac_sha3_512", "tls_anon", "cleartext"}
)

// engineConfig puts the Config's engine settings into c, leaving c's defaults where a
// setting is zero.
func (cfg *Config) engineConfig(c *abi.NodeConfig) error {
	enums := func(field string, names, known []string) ([]uint8, error) {
		out := make([]uint8, 0, len(names))
		for _, name := range names {
			i := slices.Index(known, name)
			if i < 0 {
				msg := fmt.Sprintf("%s: unknown name %q (one of %s)", field, name, strings.Join(known, ", "))
				return nil, &Refusal{Kind: InvalidConfig, Message: msg}
			}
			out = append(out, uint8(i))
		}
		return out, nil
	}
	lists := []struct {
		field string
		names []string
		known []string
		to    *[]uint8
	}{{"Framings", cfg.Framings, framingNames, &c.Transport.Framings},
		{"AuthOffer", cfg.AuthOffer, authNames, &c.Transport.AuthOffer},
		{"AuthAccept", cfg.AuthAccept, authNames, &c.Transport.AuthAccept}}
	for _, l := range lists {
		if len(l.names) == 0 {
			continue
		}
		v, err := enums(l.field, l.names, l.known)
		if err != nil {
			return err
		}
		*l.to = v
	}
	durations := []struct {
		field string
		d     time.Duration
		to    *uint64
	}{{"MonitorTimeout", cfg.MonitorTimeout, &c.Transport.MonitorTimeoutMs},
		{"ConnectInterval", cfg.ConnectInterval, &c.ConnectIntervalMs}}
	for _, d := range durations {
		if d.d < 0 {
			return &Refusal{Kind: InvalidConfig, Message: d.field + " must not be negative"}
		}
		if d.d > 0 {
			*d.to = uint64(max(d.d.Milliseconds(), 1))
		}
	}
	sizes := []struct {
		field string
		v     int
		to    *uint64
	}{{"MaxQueueBytes", cfg.MaxQueueBytes, &c.MaxQueueBytes},
		{"MaxBufferedBytes", cfg.MaxBufferedBytes, &c.MaxBufferedBytes}}
	for _, s := range sizes {
		if s.v < 0 {
			return &Refusal{Kind: InvalidConfig, Message: s.field + " must not be negative"}
		}
		if s.v > 0 {
			*s.to = uint64(s.v)
		}
	}
	switch {
	case cfg.MaxHandshakes < 0 || cfg.MaxHandshakes > math.MaxUint32:
		return &Refusal{Kind: InvalidConfig, Message: "MaxHandshakes must be from 0 to 2^32-1"}
	case cfg.MaxHandshakes > 0:
		c.MaxHandshakes = uint32(cfg.MaxHandshakes)
	}
	return nil
}

// limits are a Config's bounds with the defaults filled in.
type limits struct {
	portCapacity, portBytes, maxWriteQueue, maxWriteTotal int
	portStall, writeTimeout, closeTimeout                 time.Duration
}

func (cfg *Config) limits(monitorTimeout time.Duration) (limits, error) {
	l := limits{cfg.PortCapacity, cfg.PortBytes, cfg.MaxWriteQueue, cfg.MaxWriteTotal,
		cfg.PortStall, cfg.WriteTimeout, cfg.CloseTimeout}
	ints := []struct {
		name string
		v    *int
		def  int
	}{{"PortCapacity", &l.portCapacity, 1024}, {"PortBytes", &l.portBytes, 16 << 20},
		{"MaxWriteQueue", &l.maxWriteQueue, 64 << 20}, {"MaxWriteTotal", &l.maxWriteTotal, 128 << 20}}
	for _, f := range ints {
		if *f.v < 0 {
			return l, &Refusal{Kind: InvalidConfig, Message: f.name + " must not be negative"}
		}
		if *f.v == 0 {
			*f.v = f.def
		}
	}
	durs := []struct {
		name string
		v    *time.Duration
		def  time.Duration
	}{{"PortStall", &l.portStall, 10 * time.Second}, {"WriteTimeout", &l.writeTimeout, monitorTimeout},
		{"CloseTimeout", &l.closeTimeout, time.Second}}
	for _, f := range durs {
		if *f.v < 0 {
			return l, &Refusal{Kind: InvalidConfig, Message: f.name + " must not be negative"}
		}
		if *f.v == 0 {
			*f.v = f.def
		}
	}
	return l, nil
}

// Errors a caller can match with errors.Is.
var (
	// ErrClosed: the node was closed.
	ErrClosed = errors.New("aemp: node closed")
	// ErrStopped: the engine failed (a trap) and the node stopped.
	ErrStopped = errors.New("aemp: node stopped")
	// ErrPortClosed: the port was killed and what it held has been taken.
	ErrPortClosed = errors.New("aemp: port closed")
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
	id      string
	eng     *abi.Node
	inst    *abi.Instance
	start   time.Time
	lim     limits
	ops     chan func() error
	events  chan event
	wake    chan struct{} // a writer or a port reader has news for the loop
	done    chan struct{}
	err     error
	lns     []net.Listener
	writers sync.WaitGroup
	total   atomic.Int64 // bytes waiting to be written over all connections
	log     func(level int, msg string)
	tlsCli  *tls.Config
	tlsSrv  *tls.Config

	// owned by the loop
	conns     map[uint64]*conn
	upConn    map[string]uint64 // node id -> its working connection
	ports     map[string]*Port
	fullPorts map[*inbox]struct{}
	senders   []chan struct{} // sends waiting for room
	ups       map[string][]chan struct{}
	downs     map[string][]chan string
	mons      map[string][]chan []any
	dbWait    map[string]chan dbReply
	dbMons    map[string]*inbox
	handlers  map[string]*inbox
	// data connections: DataConnect calls waiting (by their port), the listeners (by
	// handler name), the sockets whose reader has not stopped yet, the count of
	// connections to the node itself (their ids)
	dataWaits    map[string]chan *DataConn
	dataHandlers map[string]*DataListener
	handing      map[uint64]*handover
	localData    uint64
	checking     bool // a check of the write bounds is due
	closing      bool
	closeBy      time.Time
}

type event struct {
	conn     uint64
	data     []byte
	eof      bool
	err      error
	accepted net.Conn
	dial     bool // the outcome of a connect output: dialed or err
	dialed   net.Conn
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

// prefixConn is the socket under TLS: it reads leftover (bytes already taken from the
// socket) first, and writes only once the writer has written what was queued before
// TLS started (flushed), so that a handshake the reader drives cannot overtake our
// greeting or our last plain bytes.
type prefixConn struct {
	net.Conn
	pre     []byte
	flushed <-chan struct{}
	gone    <-chan struct{} // the writer stopped: flushed may never come
}

func (p *prefixConn) Write(b []byte) (int, error) {
	select {
	case <-p.flushed:
	case <-p.gone:
		select {
		case <-p.flushed:
		default:
			return 0, net.ErrClosed
		}
	}
	return p.Conn.Write(b)
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
	if err := cfg.engineConfig(&c); err != nil {
		inst.Close()
		return nil, err
	}
	var tcli, tsrv *tls.Config
	if cfg.Cert != nil {
		if tcli, tsrv, err = tlsConfigs(cfg.Cert); err != nil {
			inst.Close()
			return nil, err
		}
		c.Transport.TLS = true
	}
	lim, err := cfg.limits(time.Duration(c.Transport.MonitorTimeoutMs) * time.Millisecond)
	if err != nil {
		inst.Close()
		return nil, err
	}
	n := &Node{id: cfg.NodeID, inst: inst, start: time.Now(), lim: lim, ops: make(chan func() error),
		events: make(chan event, 256), wake: make(chan struct{}, 1), done: make(chan struct{}),
		log: cfg.Log, tlsCli: tcli, tlsSrv: tsrv,
		conns: map[uint64]*conn{}, upConn: map[string]uint64{}, ports: map[string]*Port{},
		fullPorts: map[*inbox]struct{}{}, ups: map[string][]chan struct{}{}, downs: map[string][]chan string{}, mons: map[string][]chan []any{},
		dbWait: map[string]chan dbReply{}, dbMons: map[string]*inbox{}, handlers: map[string]*inbox{},
		dataWaits: map[string]chan *DataConn{}, dataHandlers: map[string]*DataListener{}, handing: map[uint64]*handover{}}
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
	case n.ops <- func() error { err := f(); res <- err; return err }:
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

// post runs f on the loop; timers call it from their own goroutine, which may wait.
func (n *Node) post(f func() error) { _ = n.do(context.Background(), f) }

// kick wakes the loop to look at writers and ports again (never blocks).
func (n *Node) kick() { wake(n.wake) }

func (n *Node) logf(level int, format string, args ...any) {
	if n.log != nil {
		n.log(level, fmt.Sprintf(format, args...))
	}
}

func (n *Node) loop() {
	timer := time.NewTimer(time.Hour)
	defer n.stop(timer)
	for {
		n.arm(timer)
		var err error
		select {
		case f := <-n.ops:
			// A trap in a call for the application stops the node too.
			if e := f(); errors.Is(e, abi.ErrTrap) || errors.Is(e, ErrStopped) {
				err = e
			}
		case ev := <-n.events:
			err = n.handle(ev)
		case <-n.wake:
			err = n.unblock()
		case <-timer.C:
			err = n.eng.HandleTimeout(n.now())
		}
		if err == nil {
			err = n.flush()
		}
		if err != nil {
			if n.err = err; !errors.Is(err, ErrStopped) {
				n.err = fmt.Errorf("%w: %v", ErrStopped, err)
			}
			return
		}
		n.resumeReaders()
		if n.closing && n.flushed() {
			return
		}
	}
}

// flushed says whether a closing node may stop: nothing queued in the engine for nodes
// coming up, nothing waiting to be written, or the close timeout is over.
func (n *Node) flushed() bool {
	if !time.Now().Before(n.closeBy) {
		return true
	}
	q, err := n.eng.QueuedBytes()
	return err != nil || (q == 0 && n.total.Load() == 0)
}

// stop ends every connection after what is queued for it (within the close timeout),
// fails what waits and frees the engine.
func (n *Node) stop(timer *time.Timer) {
	timer.Stop()
	n.closeListeners()
	for _, c := range n.conns {
		c.end()
	}
	for _, l := range n.dataHandlers {
		l.drain()
	}
	finished := make(chan struct{})
	go func() { n.writers.Wait(); close(finished) }()
	select {
	case <-finished:
	case <-time.After(max(time.Until(n.closeBy), 0)):
		for _, c := range n.conns {
			c.raw.Close()
		}
	}
	n.inst.Close()
	close(n.done)
}

func (n *Node) arm(t *time.Timer) {
	at, ok, err := n.eng.PollTimeout()
	d := time.Hour
	if err == nil && ok {
		d = max(time.Duration(int64(at)-int64(n.now()))*time.Millisecond, 0)
	}
	if n.closing {
		d = min(d, 10*time.Millisecond) // look at the queues again
	}
	t.Reset(d)
}

// handle feeds an event and every other one already waiting as one handle-inputs round.
func (n *Node) handle(ev event) error {
	var inputs []abi.Input
	for {
		var err error
		switch {
		case ev.accepted != nil:
			if n.closing {
				ev.accepted.Close()
				break
			}
			var id uint64
			if id, err = n.eng.HandleAccept(ev.accepted.RemoteAddr().String(), n.now()); err == nil {
				n.addConn(id, ev.accepted)
			}
		case ev.dial && ev.dialed != nil:
			n.addConn(ev.conn, ev.dialed)
			err = n.eng.HandleConnected(ev.conn, n.now())
		case ev.dial:
			err = n.eng.HandleConnError(ev.conn, ev.err.Error(), true, n.now())
		case ev.data != nil:
			if c, ok := n.conns[ev.conn]; ok {
				inputs = append(inputs, abi.Input{Conn: ev.conn, Data: ev.data})
				c.waiting = true
			} else if h := n.handing[ev.conn]; h != nil {
				n.settle(h, ev.data) // read after the engine's last input: the stream's
			}
		default: // the end of a connection
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
	if !ok {
		if h := n.handing[ev.conn]; h != nil {
			n.settle(h, nil) // the read cut short, or the end that came with the handshake
		}
		return nil // the host or the engine ended it already
	}
	if ev.eof {
		return n.eng.HandleEOF(ev.conn, n.now())
	}
	return n.drop(c, ev.err.Error())
}

// flush acts on every output of the engine; acting may call the engine again (a
// connection cut off), so it polls until there is nothing more.
func (n *Node) flush() error {
	for {
		outs, err := n.eng.PollOutputs()
		if err != nil || len(outs) == 0 {
			return err
		}
		for _, o := range outs {
			if err := n.output(o); err != nil {
				return err
			}
		}
	}
}

func (n *Node) output(o abi.Output) error {
	switch o.Kind {
	case abi.OutTransmit:
		if c, ok := n.conns[o.Conn]; ok {
			n.transmit(c, o.Bytes)
		}
	case abi.OutStartTLS:
		if c, ok := n.conns[o.Conn]; ok {
			n.startTLS(c, o.Role, o.Bytes)
		}
	case abi.OutConnect:
		id, addr := o.Conn, o.Str
		go func() {
			c, err := net.DialTimeout("tcp", addr, 10*time.Second)
			select {
			case n.events <- event{conn: id, dial: true, dialed: c, err: err}:
			case <-n.done:
				if c != nil {
					c.Close()
				}
			}
		}()
	case abi.OutClose:
		if c, ok := n.conns[o.Conn]; ok {
			n.forget(c) // the writer writes what was queued, then closes
			time.AfterFunc(linger, func() { c.raw.Close() })
		}
	case abi.OutDataConnection:
		if c, ok := n.conns[o.Conn]; ok {
			n.handOver(c, o.Bytes, o.Rest)
		}
	case abi.OutDeliver:
		if p := n.ports[o.Str]; p != nil {
			p.in.push(o.Bytes, o.Sizes)
		}
	case abi.OutPortDown:
		var reason []any
		// A reason Go cannot decode still fires the monitor, with no reason.
		_ = decMode.Unmarshal(o.Bytes, &reason)
		for _, ch := range n.mons[o.Str] {
			ch <- reason
		}
		delete(n.mons, o.Str)
		n.closePort(o.Str)
	case abi.OutLog:
		if n.log != nil {
			n.log(int(o.Level), o.Str)
		}
	case abi.OutNodeUp:
		n.upConn[o.Str] = o.Conn
		for _, ch := range n.ups[o.Str] {
			close(ch)
		}
		delete(n.ups, o.Str)
	case abi.OutNodeDown:
		delete(n.upConn, o.Str)
		for _, ch := range n.downs[o.Str] {
			ch <- o.Str2
		}
		delete(n.downs, o.Str)
		n.wakeSenders()
	case abi.OutRequest:
		if b := n.handlers[o.Str]; b != nil {
			b.push(o.Bytes, []uint32{uint32(len(o.Bytes))})
		}
	case abi.OutDBReply:
		if ch, ok := n.dbWait[o.Str]; ok {
			delete(n.dbWait, o.Str)
			ch <- dbReply{o.Bytes}
		}
	case abi.OutDBChange:
		if b := n.dbMons[o.Str]; b != nil {
			b.push(o.Bytes, []uint32{uint32(len(o.Bytes))})
		}
	}
	return nil
}

// startTLS wraps the socket in TLS; the handshake runs on first read or write, and
// its failure ends as a read error, closing this connection only.
func (n *Node) startTLS(c *conn, role uint8, leftover []byte) {
	flushed := make(chan struct{})
	raw := &prefixConn{Conn: c.c, pre: append([]byte(nil), leftover...), flushed: flushed, gone: c.gone}
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
	n.queue(c, outMsg{sw: t, flushed: flushed})
}

func (n *Node) addPort(id string) *Port {
	p := &Port{ID: id, in: n.newInbox(id)}
	n.ports[id] = p
	return p
}

// closePort ends a local port that was killed.
func (n *Node) closePort(id string) {
	if p := n.ports[id]; p != nil {
		delete(n.ports, id)
		delete(n.fullPorts, p.in)
		p.in.close()
		n.wakeSenders()
	}
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

// Send sends args (CBOR-encodable values) to the port with this id. It returns once
// the engine queued the message, and waits first while the peer is slow: while the
// destination node's connection has more than 1 MiB waiting to be written, while all
// connections together hold more than half of Config.MaxWriteTotal, or while the
// destination is a full local port. Sends to other nodes go on meanwhile. A refusal of
// the engine is a *Refusal (errors.Is(err, ErrQueueFull) and the like).
func (n *Node) Send(ctx context.Context, portID string, args ...any) error {
	if args == nil {
		args = []any{}
	}
	enc, err := encMode.Marshal(args)
	if err != nil {
		return err
	}
	data := append([]byte(portID), enc...)
	for {
		var wait chan struct{}
		err := n.do(ctx, func() error {
			if n.mustWait(portID) {
				wait = make(chan struct{})
				n.senders = append(n.senders, wait)
				return nil
			}
			return refusal(n.eng.Send(data, []uint32{uint32(len(portID)), uint32(len(enc))}, n.now()))
		})
		if err != nil || wait == nil {
			return err
		}
		select {
		case <-wait:
		case <-ctx.Done():
			return ctx.Err()
		case <-n.done:
			return n.stopErr()
		}
	}
}

// Message is one message of a SendBatch: the port id it goes to and its arguments.
type Message struct {
	Port string
	Args []any
}

// SendBatch sends msgs in order, as many at once as can go in one call into the engine
// (with Send, each message costs a call and a turn of the node's loop). It waits as Send
// does while the next message's destination is behind or full; the destinations of a run
// are checked before it goes, so a run may fill a local port past its capacity by what
// it holds, as the application's own messages. It returns how many messages
// were sent: on an error, the messages before that count went out and none after. A
// message the engine refuses gives a *Refusal; one whose arguments cannot be encoded
// stops the batch before anything is sent.
func (n *Node) SendBatch(ctx context.Context, msgs []Message) (int, error) {
	var data []byte
	sizes := make([]uint32, 0, 2*len(msgs))
	ends := make([]int, len(msgs)) // where each message ends in data
	for i, m := range msgs {
		args := m.Args
		if args == nil {
			args = []any{}
		}
		enc, err := encMode.Marshal(args)
		if err != nil {
			return 0, fmt.Errorf("message %d: %w", i, err)
		}
		data = append(append(data, m.Port...), enc...)
		sizes = append(sizes, uint32(len(m.Port)), uint32(len(enc)))
		ends[i] = len(data)
	}
	sent := 0
	for sent < len(msgs) {
		var wait chan struct{}
		err := n.do(ctx, func() error {
			// The run of messages whose destinations need not wait goes in one call.
			end := sent
			for end < len(msgs) && !n.mustWait(msgs[end].Port) {
				end++
			}
			if end == sent {
				wait = make(chan struct{})
				n.senders = append(n.senders, wait)
				return nil
			}
			start := 0
			if sent > 0 {
				start = ends[sent-1]
			}
			err := n.eng.Send(data[start:ends[end-1]], sizes[2*sent:2*end], n.now())
			var se *abi.SendError
			if errors.As(err, &se) {
				sent += int(se.Index)
			} else if err == nil {
				sent = end
			}
			return refusal(err)
		})
		if err != nil {
			return sent, err
		}
		if wait == nil {
			continue
		}
		select {
		case <-wait:
		case <-ctx.Done():
			return sent, ctx.Err()
		case <-n.done:
			return sent, n.stopErr()
		}
	}
	return sent, nil
}

// Connect dials the node listening at addr (host:port) without it being a seed: once
// connected, it is up under its node id (WaitUp).
func (n *Node) Connect(ctx context.Context, addr string) error {
	return n.do(ctx, func() error { _, err := n.eng.ConnectAddr(addr, n.now()); return err })
}

// WaitUp waits until the node with this id is connected.
func (n *Node) WaitUp(ctx context.Context, nodeID string) error {
	ch := make(chan struct{})
	err := n.do(ctx, func() error {
		up, err := n.eng.IsUp(nodeID)
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

// WaitDown waits for the next time the node with this id goes down (its connection
// lost or cut off, or the attempts to reach it given up) and returns the reason.
func (n *Node) WaitDown(ctx context.Context, nodeID string) (string, error) {
	ch := make(chan string, 1)
	err := n.do(ctx, func() error { n.downs[nodeID] = append(n.downs[nodeID], ch); return nil })
	if err != nil {
		return "", err
	}
	select {
	case r := <-ch:
		return r, nil
	case <-ctx.Done():
		return "", ctx.Err()
	case <-n.done:
		return "", n.stopErr()
	}
}

// Close stops the node. First it lets what is queued go out (messages for nodes still
// coming up included) for at most Config.CloseTimeout, until ctx ends, then it stops
// listening and ends every connection after writing what it holds (within the same
// time). Calling it again waits for the same end.
func (n *Node) Close(ctx context.Context) error {
	err := n.do(ctx, func() error {
		if !n.closing {
			n.closing = true
			n.closeBy = time.Now().Add(n.lim.closeTimeout)
			n.closeListeners()
		}
		return nil
	})
	if err != nil && !errors.Is(err, ErrClosed) && !errors.Is(err, ErrStopped) {
		return err
	}
	select {
	case <-n.done:
		return nil
	case <-ctx.Done():
		// Stop at once: what is still queued is dropped.
		_ = n.do(context.Background(), func() error { n.closeBy = time.Now(); return nil })
		<-n.done
		return ctx.Err()
	}
}

// Kill kills a port (local or remote) with a reason; no reason is a normal exit.
func (n *Node) Kill(ctx context.Context, portID string, reason ...any) error {
	if reason == nil {
		reason = []any{}
	}
	enc, err := encMode.Marshal(reason)
	if err != nil {
		return err
	}
	return n.do(ctx, func() error {
		if err := refusal(n.eng.Kill(portID, enc, n.now())); err != nil {
			return err
		}
		n.closePort(portID)
		return nil
	})
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

// Unmonitor stops watching a port: the channels Monitor returned for it receive
// nothing.
func (n *Node) Unmonitor(ctx context.Context, portID string) error {
	return n.do(ctx, func() error {
		if err := refusal(n.eng.Unmonitor(portID, n.now())); err != nil {
			return err
		}
		delete(n.mons, portID)
		return nil
	})
}
