package aemp

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"
)

// DataConn is a data connection: AnyEvent::MP's raw byte stream between two nodes
// (AnyEvent::MP::DataConn), authenticated as the node's connections are and inside TLS
// when they use it, then nothing but bytes. It is a net.Conn over the TCP connection, the
// TLS session over it, or, to the node itself, one end of a Unix socket pair (a net.Pipe
// where there are none). The node no longer touches it: Close it when done.
type DataConn struct {
	net.Conn
	id, node, handler string
	args              []any

	mu  sync.Mutex
	pre []byte // the stream's first bytes, read by the engine or the node before the hand-over
}

// ID is the data connection's id ("b@NODE", as the reference makes them; "N@NODE" to
// the node itself).
func (d *DataConn) ID() string { return d.id }

// Node is the node at the other end.
func (d *DataConn) Node() string { return d.node }

// Handler is the name of the data handler that serves it on the node that was asked.
func (d *DataConn) Handler() string { return d.handler }

// Args are the arguments the asking node gave the handler (decoded as a port's
// messages are).
func (d *DataConn) Args() []any { return d.args }

// Read reads the bytes that came with the handshake first, then the connection.
func (d *DataConn) Read(b []byte) (int, error) {
	d.mu.Lock()
	if len(d.pre) > 0 {
		k := copy(b, d.pre)
		d.pre = d.pre[k:]
		d.mu.Unlock()
		return k, nil
	}
	d.mu.Unlock()
	return d.Conn.Read(b)
}

// CloseWrite ends the stream towards the other node, which reads EOF, while reading
// goes on: a TCP (or socket pair) half-close, or TLS's close_notify. A net.Pipe cannot:
// errors.ErrUnsupported.
func (d *DataConn) CloseWrite() error {
	if cw, ok := d.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return errors.ErrUnsupported
}

// DataConnError is a data connection that failed, with the reference's message:
// "NODE: unable to establish connection within N seconds", "HANDLER: no such data
// connection handler", or the handshake's reason ("authentication failure/shared
// secret mismatch").
type DataConnError struct{ Message string }

func (e *DataConnError) Error() string { return "aemp: data connection: " + e.Message }

// dataQueue is how many data connections wait for a DataListener's Accept (as the Rust
// host's).
const dataQueue = 64

// defaultDataTimeout bounds DataConnect when ctx has no deadline.
const defaultDataTimeout = 10 * time.Second

// DataConnect asks node for a data connection served there by its data handler handler
// (HandleDataConnections, or a Perl node's), which gets args. Whichever of the two nodes
// reached the other on its listener opens it. ctx's deadline (10 s without one) is the
// timeout, which both nodes apply: past it the error is a *DataConnError ("NODE: unable
// to establish connection within N seconds"). A failure is a *DataConnError, a call the
// engine refuses a *Refusal, cancelling ctx returns ctx.Err().
func (n *Node) DataConnect(ctx context.Context, node, handler string, args ...any) (*DataConn, error) {
	if args == nil {
		args = []any{}
	}
	enc, err := encMode.Marshal(args)
	if err != nil {
		return nil, err
	}
	timeout := defaultDataTimeout
	if dl, ok := ctx.Deadline(); ok {
		if timeout = time.Until(dl); timeout <= 0 {
			return nil, context.DeadlineExceeded
		}
	}
	ms := uint64((timeout + time.Millisecond - 1) / time.Millisecond)
	ready := make(chan *DataConn, 1)
	down := make(chan []any, 1)
	var port string
	var self *DataConn
	err = n.do(ctx, func() error {
		if nodeOf(node) == n.id {
			var err error
			self, err = n.dataConnectSelf(handler, enc)
			return err
		}
		// A port of its own, which the engine kills with the reason if the request
		// fails; monitored so that the kill is reported.
		var err error
		if port, err = n.eng.NewPort(); err != nil {
			return refusal(err)
		}
		if err = n.eng.Monitor(port, n.now()); err == nil {
			_, err = n.eng.DataConnect(port, node, ms, handler, enc, n.now())
		}
		if err != nil {
			n.freePort(port)
			return refusal(err)
		}
		n.mons[port] = append(n.mons[port], down)
		n.dataWaits[port] = ready
		return nil
	})
	if err != nil || self != nil {
		return self, err
	}
	stop := ctx.Done()
	var grace <-chan time.Time
	for {
		select {
		case dc := <-ready:
			// Done with the port: the stream does not depend on it.
			_ = n.do(context.Background(), func() error { n.freePort(port); return nil })
			return dc, nil
		case reason := <-down:
			_ = n.do(context.Background(), func() error { delete(n.dataWaits, port); return nil })
			return nil, dataFailure(reason)
		case <-stop:
			if errors.Is(ctx.Err(), context.DeadlineExceeded) {
				// The engine times the request out at this deadline too, with the
				// reference's message: prefer its word, which is due now.
				stop, grace = nil, time.After(time.Second)
				continue
			}
			return nil, n.giveUp(port, ready, ctx.Err())
		case <-grace:
			return nil, n.giveUp(port, ready, ctx.Err())
		case <-n.done:
			select {
			case dc := <-ready: // came as the node stopped: no one takes it
				dc.Close()
			default:
			}
			return nil, n.stopErr()
		}
	}
}

// giveUp ends a DataConnect whose caller stopped waiting: a stream that comes later is
// closed (no one waits for it), one that came meanwhile too.
func (n *Node) giveUp(port string, ready chan *DataConn, err error) error {
	_ = n.do(context.Background(), func() error {
		delete(n.dataWaits, port)
		n.freePort(port)
		return nil
	})
	select {
	case dc := <-ready:
		dc.Close()
	default:
	}
	return err
}

// freePort removes a port of the host's own without a word to monitors or peers.
func (n *Node) freePort(port string) {
	delete(n.mons, port)
	// Neither can be refused for a local port that exists; nothing to report if so.
	_ = n.eng.Unmonitor(port, n.now())
	_ = n.eng.Kill(port, []byte{0x80}, n.now())
}

// dataFailure is the error of a data connection from its port's kill reason,
// ["AnyEvent::MP::DataConn", MESSAGE] as the reference makes it.
func dataFailure(reason []any) error {
	if len(reason) == 2 {
		if msg, ok := reason[1].(string); ok {
			return &DataConnError{Message: msg}
		}
	}
	return &DataConnError{Message: fmt.Sprint(reason...)}
}

// dataConnectSelf makes a data connection to the node itself, which the engine leaves
// to the host: a socket pair to the handler (localPair).
func (n *Node) dataConnectSelf(handler string, enc []byte) (*DataConn, error) {
	var args []any
	if err := decMode.Unmarshal(enc, &args); err != nil {
		return nil, err
	}
	l := n.dataHandlers[handler]
	if l == nil {
		return nil, &DataConnError{Message: handler + ": no such data connection handler"}
	}
	n.localData++
	id := fmt.Sprintf("%d@%s", n.localData, n.id)
	a, b, err := localPair()
	if err != nil {
		return nil, err
	}
	ours := &DataConn{Conn: a, id: id, node: n.id, handler: handler, args: args}
	theirs := &DataConn{Conn: b, id: id, node: n.id, handler: handler, args: args}
	if !l.offer(theirs) {
		a.Close()
		b.Close()
		return nil, &DataConnError{Message: fmt.Sprintf("%s: %d data connections wait for it already", handler, dataQueue)}
	}
	return ours, nil
}

// DataListener receives the data connections other nodes ask for with a handler name
// (HandleDataConnections).
type DataListener struct {
	n    *Node
	name string
	q    chan *DataConn
	once sync.Once
	done chan struct{}
}

// HandleDataConnections lets other nodes open data connections served by name
// (their DataConnect, a Perl node's AnyEvent::MP::DataConn::connect_to); the name is
// never code. Up to 64 connections wait for Accept; past that, or once the listener is
// closed, a new one is closed with a log line (the asking side reads EOF). A second call
// for the same name takes the waiting connections and the next ones over; the first
// listener's Accept then returns net.ErrClosed.
func (n *Node) HandleDataConnections(name string) (*DataListener, error) {
	l := &DataListener{n: n, name: name, q: make(chan *DataConn, dataQueue), done: make(chan struct{})}
	err := n.do(context.Background(), func() error {
		if err := n.eng.RegisterDataHandler(name); err != nil {
			return refusal(err) // a trap: ErrStopped
		}
		if old := n.dataHandlers[name]; old != nil {
			for moved := false; !moved; {
				select {
				case dc := <-old.q:
					l.q <- dc // as many as the old queue held: there is room
				default:
					moved = true
				}
			}
			old.shut()
		}
		n.dataHandlers[name] = l
		return nil
	})
	if err != nil {
		return nil, err
	}
	return l, nil
}

// Accept waits for the next data connection. It returns net.ErrClosed once the listener
// is closed or taken over, the node's error once it stopped.
func (l *DataListener) Accept(ctx context.Context) (*DataConn, error) {
	select {
	case dc := <-l.q:
		return dc, nil
	case <-l.done:
		return nil, net.ErrClosed
	case <-l.n.done:
		return nil, l.n.stopErr()
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// Close stops serving the name: connections waiting for Accept, and the ones that come
// later, are closed.
func (l *DataListener) Close() error {
	_ = l.n.do(context.Background(), func() error {
		if l.n.dataHandlers[l.name] == l {
			delete(l.n.dataHandlers, l.name)
		}
		return nil
	})
	l.shut()
	return nil
}

// shut ends Accept and closes what waits; the listener is no longer the node's.
func (l *DataListener) shut() {
	l.once.Do(func() { close(l.done) })
	l.drain()
}

// drain closes the connections waiting for Accept.
func (l *DataListener) drain() {
	for {
		select {
		case dc := <-l.q:
			dc.Close()
		default:
			return
		}
	}
}

// offer queues a connection for Accept (on the loop); false when the queue is full.
func (l *DataListener) offer(dc *DataConn) bool {
	select {
	case l.q <- dc:
		return true
	default:
		return false
	}
}

// handover is a data connection's socket on its way from the node to the application:
// the writer still writes the handshake's last bytes, the reader may still be reading.
type handover struct {
	c        *conn
	stream   net.Conn // the socket, or TLS over it
	pre      []byte   // leftover, then what the reader read after the engine's last input
	settled  chan struct{}
	setup    dataSetup
	setupErr error
}

// dataSetup is the engine's setup array [ID, NODE, PORT, HANDLER, INIT-ARGS, REQUESTED].
type dataSetup struct {
	id, node, port, handler string
	args                    []any
	requested               bool
}

func decodeSetup(b []byte) (dataSetup, error) {
	var v []any
	var s dataSetup
	if err := decMode.Unmarshal(b, &v); err != nil {
		return s, err
	}
	bad := errors.New("not [ID, NODE, PORT, HANDLER, INIT-ARGS, REQUESTED]")
	if len(v) != 6 {
		return s, bad
	}
	strs := []*string{&s.id, &s.node, &s.port, &s.handler}
	for i, to := range strs {
		str, ok := v[i].(string)
		if !ok {
			return s, bad
		}
		*to = str
	}
	var ok1, ok2 bool
	s.args, ok1 = v[4].([]any)
	s.requested, ok2 = v[5].(bool)
	if !ok1 || !ok2 {
		return s, bad
	}
	return s, nil
}

// handOver takes a data connection's socket from the node (on the loop, on the
// engine's data-connection output): the writer writes what is queued (the peer waits for
// our last handshake bytes) and stops, the reader stops, keeping what it read, then
// finishHandOver gives the stream to its DataConnect or DataListener.
func (n *Node) handOver(c *conn, setup, leftover []byte) {
	h := &handover{c: c, stream: c.c, pre: append([]byte(nil), leftover...), settled: make(chan struct{})}
	h.setup, h.setupErr = decodeSetup(setup)
	delete(n.conns, c.id)
	if c.deadline != nil {
		c.deadline.Stop()
	}
	n.wakeSenders()
	c.mu.Lock()
	c.handed = make(chan struct{})
	c.ending = true
	c.mu.Unlock()
	wake(c.kick)
	if c.waiting {
		// The reader waits for the loop after its last read, which the engine had.
		c.next <- nil
		close(h.settled)
	} else {
		// The reader is reading, or its bytes are on their way to the loop: cut its
		// read short; its event settles the hand-over (handle, endConn).
		n.handing[c.id] = h
		_ = c.raw.SetReadDeadline(time.Unix(1, 0))
	}
	go n.finishHandOver(h)
}

// settle notes that the reader of a connection being handed over stopped, after data
// (kept for the stream) or its end.
func (n *Node) settle(h *handover, data []byte) {
	delete(n.handing, h.c.id)
	h.pre = append(h.pre, data...)
	if data != nil {
		h.c.next <- nil
	}
	_ = h.c.raw.SetReadDeadline(time.Time{})
	close(h.settled)
}

func (n *Node) finishHandOver(h *handover) {
	fail := func(why string) {
		h.c.raw.Close()
		_ = n.do(context.Background(), func() error {
			n.logf(1, "closing data connection %s: %s", h.setup.id, why)
			return nil
		})
	}
	select {
	case <-h.c.handed:
	case <-n.done:
		h.c.raw.Close()
		return
	case <-time.After(n.lim.writeTimeout):
		fail(fmt.Sprintf("its handshake not written within %d ms", n.lim.writeTimeout.Milliseconds()))
		return
	}
	h.c.mu.Lock()
	werr := h.c.werr
	h.c.mu.Unlock()
	switch {
	case werr != nil:
		fail(werr.Error())
		return
	case h.setupErr != nil:
		fail("undecodable setup: " + h.setupErr.Error())
		return
	}
	select {
	case <-h.settled:
	case <-n.done:
		h.c.raw.Close()
		return
	}
	s := h.setup
	dc := &DataConn{Conn: h.stream, id: s.id, node: s.node, handler: s.handler, args: s.args, pre: h.pre}
	delivered := false
	_ = n.do(context.Background(), func() error {
		delivered = true
		n.deliverData(dc, s)
		return nil
	})
	if !delivered {
		dc.Close()
	}
}

// deliverData gives a data connection to the DataConnect that asked for it, or to the
// handler's listener (on the loop).
func (n *Node) deliverData(dc *DataConn, s dataSetup) {
	if s.requested {
		if ch := n.dataWaits[s.port]; ch != nil {
			delete(n.dataWaits, s.port)
			ch <- dc
			return
		}
		n.logf(3, "data connection %s closed: its DataConnect gave up", s.id)
		dc.Close()
		return
	}
	l := n.dataHandlers[s.handler]
	switch {
	case l == nil:
		n.logf(1, "closing data connection %s: data handler %s is gone", s.id, s.handler)
	case !l.offer(dc):
		n.logf(1, "closing data connection %s: %d wait for data handler %s already", s.id, dataQueue, s.handler)
	default:
		return
	}
	dc.Close()
}
