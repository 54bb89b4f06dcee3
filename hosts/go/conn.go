package aemp

import (
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"
)

// highWater is how many bytes may wait to be written to a node's connection before
// sends to that node wait and the connection reads no more (as the Rust host's
// HIGH_WATER): far more than a socket buffer, so a fast peer's pipe stays full.
const highWater = 1 << 20

// writeChunk bounds one Write, so that progress on a slow peer shows.
const writeChunk = 64 << 10

// linger is how long a connection the engine closes may take to write what is queued.
const linger = time.Second

// conn is one socket. The loop queues writes (never blocking on the peer); the writer
// goroutine writes them; the reader goroutine reads and waits for the loop after each
// read, so no TLS record is fed as plain bytes and a connection can be held back.
type conn struct {
	id   uint64
	raw  net.Conn      // the socket: closing it cuts the peer off
	c    net.Conn      // what the reader reads next: the socket, or TLS over it
	next chan net.Conn // the loop lets the reader read on; closed when the connection is gone, nil when handed over

	mu      sync.Mutex
	q       []outMsg
	pending int           // bytes queued and not written yet
	written int64         // bytes written so far
	ending  bool          // write what is queued, then close
	handed  chan struct{} // set for a data connection's stream: closed when what is queued is written, the socket left open
	dead    bool          // the writer stopped
	werr    error         // why, when a write failed
	kick    chan struct{}
	gone    chan struct{} // closed when the writer stops

	// loop only
	waiting  bool // the reader waits for next
	behind   bool // more than highWater waiting: reads nothing, sends to its node wait
	checkAt  int64
	deadline *time.Timer
}

// outMsg is bytes to write, or (sw set) the switch of the writer to TLS, after which
// flushed is closed.
type outMsg struct {
	b       []byte
	sw      net.Conn
	flushed chan struct{}
}

// queue hands bytes to the writer; it returns what is waiting for this connection.
func (n *Node) queue(c *conn, m outMsg) int {
	c.mu.Lock()
	if c.dead {
		c.mu.Unlock()
		return 0
	}
	c.q = append(c.q, m)
	c.pending += len(m.b)
	p := c.pending
	c.mu.Unlock()
	n.total.Add(int64(len(m.b)))
	wake(c.kick)
	return p
}

// end makes the writer write what is queued, then close.
func (c *conn) end() {
	c.mu.Lock()
	c.ending = true
	c.mu.Unlock()
	wake(c.kick)
}

func wake(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

func (n *Node) addConn(id uint64, nc net.Conn) {
	c := &conn{id: id, raw: nc, c: nc, next: make(chan net.Conn, 1), kick: make(chan struct{}, 1),
		gone: make(chan struct{})}
	n.conns[id] = c
	n.writers.Add(1)
	go n.writer(c)
	go n.reader(c)
}

func (n *Node) writer(c *conn) {
	defer n.writers.Done()
	defer close(c.gone)
	w := c.raw
	var err error
	for err == nil {
		c.mu.Lock()
		for len(c.q) == 0 && !c.ending {
			c.mu.Unlock()
			<-c.kick
			c.mu.Lock()
		}
		q := c.q
		c.q = nil
		c.mu.Unlock()
		if len(q) == 0 {
			break
		}
		for _, m := range q {
			if m.sw != nil {
				w = m.sw
				close(m.flushed)
				continue
			}
			for b := m.b; len(b) > 0 && err == nil; {
				k := min(len(b), writeChunk)
				if _, err = w.Write(b[:k]); err == nil {
					n.wrote(c, k)
					b = b[k:]
				}
			}
			if err != nil {
				break
			}
		}
	}
	c.mu.Lock()
	c.dead, c.werr = true, err
	rest := c.pending
	c.pending, c.q = 0, nil
	handed := c.handed
	c.mu.Unlock()
	n.total.Add(-int64(rest))
	if handed != nil { // the socket is the application's now; the hand-over sees werr
		close(handed)
		return
	}
	if err == nil {
		w.Close() // TLS sends its close_notify
	}
	c.raw.Close()
	n.kick()
}

// wrote accounts k bytes written and wakes the loop when the connection, or all of
// them, fall back under the level where sends wait.
func (n *Node) wrote(c *conn, k int) {
	c.mu.Lock()
	before := c.pending
	c.pending -= k
	c.written += int64(k)
	c.mu.Unlock()
	t := n.total.Add(-int64(k))
	half := int64(n.lim.maxWriteTotal / 2)
	if (before > highWater && before-k <= highWater) || (t+int64(k) > half && t <= half) {
		n.kick()
	}
}

func (n *Node) reader(c *conn) {
	r := c.raw
	for {
		buf := make([]byte, 64<<10)
		k, err := r.Read(buf)
		if k > 0 {
			select {
			case n.events <- event{conn: c.id, data: buf[:k]}:
			case <-n.done:
				return
			}
			var ok bool
			select {
			case r, ok = <-c.next:
				if !ok || r == nil { // gone, or handed over as a data connection
					return
				}
			case <-n.done:
				return
			}
		}
		if err != nil {
			ev := event{conn: c.id, eof: errors.Is(err, io.EOF), err: err}
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
}

// limitDelay is how long after queueing past a write bound the bound is checked, so
// that what a reading peer's socket takes at once is not counted (the Rust host checks
// after writing what the socket takes).
const limitDelay = 10 * time.Millisecond

// transmit queues bytes for a connection and applies the write bounds.
func (n *Node) transmit(c *conn, b []byte) {
	p := n.queue(c, outMsg{b: b})
	if p > highWater && !c.behind {
		c.behind = true
		n.armWriteCheck(c)
	}
	if (p > n.lim.maxWriteQueue || n.total.Load() > int64(n.lim.maxWriteTotal)) && !n.checking {
		n.checking = true
		time.AfterFunc(limitDelay, func() { n.post(n.checkLimits) })
	}
}

// checkLimits cuts off connections with more than MaxWriteQueue waiting, then, while
// all together have more than MaxWriteTotal, the one holding the most.
func (n *Node) checkLimits() error {
	n.checking = false
	for _, c := range n.conns {
		c.mu.Lock()
		p := c.pending
		c.mu.Unlock()
		if p > n.lim.maxWriteQueue {
			if err := n.drop(c, fmt.Sprintf("peer does not read: more than %d bytes waiting", n.lim.maxWriteQueue)); err != nil {
				return err
			}
		}
	}
	for limit := int64(n.lim.maxWriteTotal); n.total.Load() > limit; {
		var most *conn
		mostP := 0
		for _, o := range n.conns {
			o.mu.Lock()
			if o.pending > mostP {
				most, mostP = o, o.pending
			}
			o.mu.Unlock()
		}
		if most == nil {
			break
		}
		if err := n.drop(most, fmt.Sprintf("peer does not read: the node's connections have more than %d bytes waiting, this one the most", limit)); err != nil {
			return err
		}
	}
	return nil
}

// armWriteCheck makes a connection that is behind show progress every write timeout.
func (n *Node) armWriteCheck(c *conn) {
	c.mu.Lock()
	c.checkAt = c.written
	c.mu.Unlock()
	c.deadline = time.AfterFunc(n.lim.writeTimeout, func() { n.post(func() error { return n.writeCheck(c) }) })
}

func (n *Node) writeCheck(c *conn) error {
	c.deadline = nil
	if n.conns[c.id] != c || !c.behind {
		return nil
	}
	c.mu.Lock()
	progress := c.written > c.checkAt
	c.mu.Unlock()
	if progress {
		n.armWriteCheck(c)
		return nil
	}
	return n.drop(c, fmt.Sprintf("peer does not read: nothing written for %d ms", n.lim.writeTimeout.Milliseconds()))
}

// forget ends a connection for the host: no more reads, writes finish or are cut.
func (n *Node) forget(c *conn) {
	delete(n.conns, c.id)
	close(c.next)
	if c.deadline != nil {
		c.deadline.Stop()
	}
	c.end()
	n.wakeSenders()
}

// drop cuts a connection the host gives up on and tells the engine why.
func (n *Node) drop(c *conn, reason string) error {
	n.forget(c)
	c.raw.Close()
	return n.eng.HandleConnError(c.id, reason, false, n.now())
}

// unblock runs when a writer or a reader kicked the loop: connections back under the
// high-water mark, failed writers, ports with room again.
func (n *Node) unblock() error {
	for _, c := range n.conns {
		c.mu.Lock()
		dead, werr, p := c.dead, c.werr, c.pending
		c.mu.Unlock()
		switch {
		case dead && werr != nil:
			if err := n.drop(c, werr.Error()); err != nil {
				return err
			}
		case c.behind && p <= highWater:
			c.behind = false
			if c.deadline != nil {
				c.deadline.Stop()
			}
		}
	}
	for b := range n.fullPorts {
		if !b.full() {
			delete(n.fullPorts, b)
			b.stall.Stop()
		}
	}
	n.wakeSenders()
	return nil
}

// checkFull notes an inbox that became full: no connection reads on until it has room
// or stalls.
func (n *Node) checkFull(b *inbox) {
	if _, ok := n.fullPorts[b]; ok || !b.full() {
		return
	}
	n.fullPorts[b] = struct{}{}
	b.mu.Lock()
	taken := b.taken
	b.mu.Unlock()
	b.stall = time.AfterFunc(n.lim.portStall, func() {
		n.post(func() error {
			if _, ok := n.fullPorts[b]; ok {
				delete(n.fullPorts, b)
				b.stallCheck(taken)
				n.checkFull(b) // it took one meanwhile and is full again: a new stall clock
			}
			return nil
		})
	})
}

// resumeReaders lets readers whose bytes the engine took read on (through TLS if the
// engine started it meanwhile), unless their connection is behind or a port is full.
func (n *Node) resumeReaders() {
	if len(n.fullPorts) > 0 {
		return
	}
	for _, c := range n.conns {
		if c.waiting && !c.behind {
			c.waiting = false
			c.next <- c.c
		}
	}
}

// mustWait says whether a send to portID waits: its node's connection is behind, all
// connections together hold more than half of MaxWriteTotal, or it is a full local port.
func (n *Node) mustWait(portID string) bool {
	node := nodeOf(portID)
	if node == n.id {
		p := n.ports[portID]
		return p != nil && p.in.full()
	}
	if n.total.Load() > int64(n.lim.maxWriteTotal/2) {
		return true
	}
	if id, ok := n.upConn[node]; ok {
		if c := n.conns[id]; c != nil && c.behind {
			return true
		}
	}
	return false
}

func (n *Node) wakeSenders() {
	for _, ch := range n.senders {
		close(ch)
	}
	n.senders = n.senders[:0]
}

func nodeOf(portID string) string {
	for i := range len(portID) {
		if portID[i] == '#' {
			return portID[:i]
		}
	}
	return portID
}
