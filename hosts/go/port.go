package aemp

import (
	"context"
	"iter"
	"sync"
	"time"

	"github.com/fxamacker/cbor/v2"
)

// portMessageCost is what a message costs a port's byte bound on top of its encoding
// (as in the JS and Python hosts).
const portMessageCost = 32

// decMode decodes what peers send: bignums (tags 2, 3) as *big.Int, epoch times (tag 1)
// as time.Time, other tags as cbor.Tag; nesting and sizes as far as the engine allows.
var decMode = func() cbor.DecMode {
	m, err := cbor.DecOptions{BigIntDec: cbor.BigIntDecodePointer, MaxNestedLevels: 256,
		MaxArrayElements: 16 << 20, MaxMapPairs: 16 << 20}.DecMode()
	if err != nil {
		panic(err)
	}
	return m
}()

// encMode encodes what the application sends: time.Time as an epoch time (tag 1),
// *big.Int as the shortest integer or a bignum (tags 2, 3).
var encMode = func() cbor.EncMode {
	m, err := cbor.EncOptions{Time: cbor.TimeUnixDynamic, TimeTag: cbor.EncTagRequired}.EncMode()
	if err != nil {
		panic(err)
	}
	return m
}()

type held struct {
	args []any
	cost int
}

// inbox is a bounded queue of decoded messages between the node's loop (push) and a
// reader (recv): ports, database monitors and request handlers.
type inbox struct {
	n       *Node
	name    string // for log lines
	mu      sync.Mutex
	queue   []held
	bytes   int
	taken   uint64 // messages taken, for the stall check
	stalled bool
	closed  bool
	ready   chan struct{}
	stall   *time.Timer // loop only
}

func (n *Node) newInbox(name string) *inbox {
	return &inbox{n: n, name: name, ready: make(chan struct{}, 1)}
}

func (b *inbox) fullLocked() bool {
	return len(b.queue) >= b.n.lim.portCapacity || b.bytes >= b.n.lim.portBytes
}

func (b *inbox) full() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return !b.stalled && !b.closed && b.fullLocked()
}

// push decodes the CBOR items of data (lengths in sizes) into the queue; the loop calls
// it. A full inbox takes them anyway (the node reads no more until it has room), except
// a stalled one, which drops them.
func (b *inbox) push(data []byte, sizes []uint32) {
	b.mu.Lock()
	off := uint32(0)
	for _, s := range sizes {
		raw := data[off : off+s]
		off += s
		if b.closed || (b.stalled && b.fullLocked()) {
			continue
		}
		var args []any
		// The engine checked the CBOR; what Go cannot hold (a tag 1 around a string...)
		// drops that item only.
		if err := decMode.Unmarshal(raw, &args); err != nil {
			b.n.logf(1, "message for %s dropped: %v", b.name, err)
			continue
		}
		b.queue = append(b.queue, held{args, int(s) + portMessageCost})
		b.bytes += int(s) + portMessageCost
	}
	b.mu.Unlock()
	select {
	case b.ready <- struct{}{}:
	default:
	}
	b.n.checkFull(b)
}

// recv waits for the next message.
func (b *inbox) recv(ctx context.Context) ([]any, error) {
	for {
		b.mu.Lock()
		if len(b.queue) > 0 {
			was := b.stalled || b.fullLocked()
			m := b.queue[0]
			b.queue[0] = held{}
			b.queue = b.queue[1:]
			b.bytes -= m.cost
			b.taken++
			b.stalled = false // taking a message ends a stall
			b.mu.Unlock()
			if was {
				b.n.kick()
			}
			return m.args, nil
		}
		closed := b.closed
		b.mu.Unlock()
		if closed {
			return nil, ErrPortClosed
		}
		select {
		case <-b.ready:
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-b.n.done:
			return nil, b.n.stopErr()
		}
	}
}

func (b *inbox) pending() (int, int) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.queue), b.bytes
}

// close ends the inbox: what it holds can still be taken, then recv fails.
func (b *inbox) close() {
	b.mu.Lock()
	b.closed = true
	b.mu.Unlock()
	select {
	case b.ready <- struct{}{}:
	default:
	}
}

// stallCheck runs on the loop port-stall after the inbox became full: if it took nothing
// since (taken0), it is stalled, keeping the oldest messages within its bounds.
func (b *inbox) stallCheck(taken0 uint64) {
	b.mu.Lock()
	if b.taken != taken0 || b.stalled || b.closed || !b.fullLocked() {
		b.mu.Unlock()
		return
	}
	b.stalled = true
	keep, bytes := 0, 0
	for _, m := range b.queue {
		if keep >= b.n.lim.portCapacity || (keep > 0 && bytes+m.cost > b.n.lim.portBytes) {
			break
		}
		keep++
		bytes += m.cost
	}
	dropped := len(b.queue) - keep
	clear(b.queue[keep:])
	b.queue, b.bytes = b.queue[:keep], bytes
	b.mu.Unlock()
	b.n.logf(1, "port %s took no message for %d ms: dropped %d messages for it",
		b.name, b.n.lim.portStall.Milliseconds(), dropped)
}

// Port is a local port: messages sent to its ID arrive in Recv.
//
// It holds at most Config.PortCapacity messages and Config.PortBytes bytes not taken
// yet (plus what the engine delivered in the round that filled it; an empty port takes
// one message of any size). While one port is full no connection of the node reads on,
// so remote senders wait on TCP, and Send to it from this node waits. A full port that
// takes nothing for Config.PortStall is stalled: what it holds past its bounds is
// dropped with one warning, and messages that find it full are dropped until it takes
// one, so a port nobody reads cannot stop the node.
type Port struct {
	ID string
	in *inbox
}

// Recv waits for the next message (its arguments). It fails with ErrPortClosed once
// the port was killed and what it held is taken, and with the node's error once the
// node is closed.
func (p *Port) Recv(ctx context.Context) ([]any, error) { return p.in.recv(ctx) }

// Pending returns the messages received and not taken yet, and what they cost the byte
// bound (their encoded size and 32 bytes each).
func (p *Port) Pending() (messages, bytes int) { return p.in.pending() }

// Messages yields the port's messages until ctx ends, the port or node closes, or the
// loop body breaks.
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
