package abi

import (
	"encoding/binary"
	"fmt"
)

// TransportConfig is the WIT record transport.config (enums as their ordinal).
type TransportConfig struct {
	NodeID, Protocol       string
	Secret                 []byte // nil: none
	TLS                    bool
	AuthOffer, AuthAccept  []uint8
	Framings               []uint8
	Greeting               [][2]string
	PeerAddr               *string
	MonitorTimeoutMs       uint64
	KeepaliveIntervalMs    *uint64
	MaxMessageSize, MaxDep uint32
}

// NodeConfig is the WIT record node.node-config.
type NodeConfig struct {
	Transport         TransportConfig
	Binds, Seeds      []string
	ConnectIntervalMs uint64
	MaxQueueBytes     uint64
	WallClockOffsetMs int64
	MaxBufferedBytes  uint64
	MaxHandshakes     uint32
}

// Layout of node-config (size 168, align 8); offsets per the canonical ABI.
const nodeConfigSize = 168

func liftEnums(m Mem, p uint32) ([]uint8, error) {
	ptr, n, err := m.List(p, 1)
	if err != nil {
		return nil, err
	}
	b, _ := m.span(ptr, n)
	return append([]uint8(nil), b...), nil
}

func liftStrings(m Mem, p uint32) ([]string, error) {
	ptr, n, err := m.List(p, 8)
	if err != nil {
		return nil, err
	}
	out := make([]string, n)
	for i := range out {
		if out[i], err = m.String(ptr + uint32(i)*8); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// LiftNodeConfig reads a node-config record at p.
func LiftNodeConfig(m Mem, p uint32) (c NodeConfig, err error) {
	t := &c.Transport
	get := func(f func() error) {
		if err == nil {
			err = f()
		}
	}
	get(func() (e error) { t.NodeID, e = m.String(p); return })
	get(func() (e error) { t.Protocol, e = m.String(p + 8); return })
	get(func() error {
		d, e := m.U8(p + 16)
		if e == nil && d == 1 {
			t.Secret, e = m.Bytes(p + 20)
		}
		return e
	})
	get(func() error { b, e := m.U8(p + 28); t.TLS = b != 0; return e })
	get(func() (e error) { t.AuthOffer, e = liftEnums(m, p+32); return })
	get(func() (e error) { t.AuthAccept, e = liftEnums(m, p+40); return })
	get(func() (e error) { t.Framings, e = liftEnums(m, p+48); return })
	get(func() error {
		ptr, n, e := m.List(p+56, 16)
		for i := uint32(0); e == nil && i < n; i++ {
			var k, v string
			if k, e = m.String(ptr + i*16); e == nil {
				v, e = m.String(ptr + i*16 + 8)
			}
			t.Greeting = append(t.Greeting, [2]string{k, v})
		}
		return e
	})
	get(func() (e error) { t.PeerAddr, e = liftOption(m, p+64, 4, m.String); return })
	get(func() (e error) { t.MonitorTimeoutMs, e = m.U64(p + 80); return })
	get(func() (e error) { t.KeepaliveIntervalMs, e = liftOption(m, p+88, 8, m.U64); return })
	get(func() (e error) { t.MaxMessageSize, e = m.U32(p + 104); return })
	get(func() (e error) { t.MaxDep, e = m.U32(p + 108); return })
	get(func() (e error) { c.Binds, e = liftStrings(m, p+112); return })
	get(func() (e error) { c.Seeds, e = liftStrings(m, p+120); return })
	get(func() (e error) { c.ConnectIntervalMs, e = m.U64(p + 128); return })
	get(func() (e error) { c.MaxQueueBytes, e = m.U64(p + 136); return })
	get(func() error { v, e := m.U64(p + 144); c.WallClockOffsetMs = int64(v); return e })
	get(func() (e error) { c.MaxBufferedBytes, e = m.U64(p + 152); return })
	get(func() (e error) { c.MaxHandshakes, e = m.U32(p + 160); return })
	return c, err
}

// lowerCreateArgs writes c into guest memory (every list allocated for the callee).
// With more than 16 flat parameters the ABI passes all of them as one tuple in memory:
// (node-config, now-ms), now-ms at offset 168.
func (in *Instance) lowerCreateArgs(c NodeConfig, nowMs uint64) uint32 {
	buf := make([]byte, nodeConfigSize+8)
	le := binary.LittleEndian
	putList := func(off uint32, p, n uint32) { le.PutUint32(buf[off:], p); le.PutUint32(buf[off+4:], n) }
	putStr := func(off uint32, s string) { p, n := in.bytes([]byte(s)); putList(off, p, n) }
	putStrs := func(off uint32, ss []string) { p, n := in.strings(ss); putList(off, p, n) }
	t := c.Transport
	putStr(0, t.NodeID)
	putStr(8, t.Protocol)
	if t.Secret != nil {
		buf[16] = 1
		p, n := in.bytes(t.Secret)
		putList(20, p, n)
	}
	if t.TLS {
		buf[28] = 1
	}
	for off, e := range map[uint32][]uint8{32: t.AuthOffer, 40: t.AuthAccept, 48: t.Framings} {
		p, n := in.bytes(e)
		putList(off, p, n)
	}
	area := make([]byte, 16*len(t.Greeting))
	for i, kv := range t.Greeting {
		kp, kn := in.bytes([]byte(kv[0]))
		vp, vn := in.bytes([]byte(kv[1]))
		le.PutUint32(area[i*16:], kp)
		le.PutUint32(area[i*16+4:], kn)
		le.PutUint32(area[i*16+8:], vp)
		le.PutUint32(area[i*16+12:], vn)
	}
	gp := in.alignedCopy(area, 4)
	putList(56, gp, uint32(len(t.Greeting)))
	if t.PeerAddr != nil {
		buf[64] = 1
		putStr(68, *t.PeerAddr)
	}
	le.PutUint64(buf[80:], t.MonitorTimeoutMs)
	if t.KeepaliveIntervalMs != nil {
		buf[88] = 1
		le.PutUint64(buf[96:], *t.KeepaliveIntervalMs)
	}
	le.PutUint32(buf[104:], t.MaxMessageSize)
	le.PutUint32(buf[108:], t.MaxDep)
	putStrs(112, c.Binds)
	putStrs(120, c.Seeds)
	le.PutUint64(buf[128:], c.ConnectIntervalMs)
	le.PutUint64(buf[136:], c.MaxQueueBytes)
	le.PutUint64(buf[144:], uint64(c.WallClockOffsetMs))
	le.PutUint64(buf[152:], c.MaxBufferedBytes)
	le.PutUint32(buf[160:], c.MaxHandshakes)
	le.PutUint64(buf[nodeConfigSize:], nowMs)
	return in.alignedCopy(buf, 8)
}

// strings lowers a list<string>; returns ptr, len.
func (in *Instance) strings(ss []string) (uint32, uint32) {
	area := make([]byte, 8*len(ss))
	for i, s := range ss {
		p, n := in.bytes([]byte(s))
		binary.LittleEndian.PutUint32(area[i*8:], p)
		binary.LittleEndian.PutUint32(area[i*8+4:], n)
	}
	return in.alignedCopy(area, 4), uint32(len(ss))
}

// alignedCopy allocates with the given alignment and copies b there.
func (in *Instance) alignedCopy(b []byte, align uint32) uint32 {
	if len(b) == 0 {
		return align
	}
	p := in.malloc(align, uint32(len(b)))
	in.mem.Write(p, b)
	return p
}

// Refusal is the WIT record transport.refusal.
type Refusal struct {
	Kind    uint8
	Message string
}

func (r *Refusal) Error() string { return r.Message }

// SendError is the WIT record transport.send-error.
type SendError struct {
	Index   uint32
	Kind    uint8
	Message string
}

func (e *SendError) Error() string { return e.Message }

// liftRefusal reads a result<_, refusal> (or the err arm of any result) at p.
func liftResultUnit(m Mem, p uint32) error {
	d, err := m.U8(p)
	if err != nil || d == 0 {
		return err
	}
	return liftRefusalAt(m, p+4)
}

func liftRefusalAt(m Mem, p uint32) error {
	k, err := m.U8(p)
	if err != nil {
		return err
	}
	msg, err := m.String(p + 4)
	if err != nil {
		return err
	}
	return &Refusal{Kind: k, Message: msg}
}

// DefaultNodeConfig calls default-node-config.
func (in *Instance) DefaultNodeConfig(nodeID string) (c NodeConfig, err error) {
	p, n := in.str(nodeID)
	err = in.call("default-node-config", func(ret uint64) (e error) {
		c, e = LiftNodeConfig(in.view(), uint32(ret))
		return
	}, p, n)
	return c, err
}

// Node is the rep of a node resource in its instance.
type Node struct {
	in  *Instance
	rep uint64
}

// Create calls [static]node.create; a refusal comes back as *Refusal.
func (in *Instance) Create(c NodeConfig, nowMs uint64) (*Node, error) {
	var node *Node
	var refused error
	err := in.call("[static]node.create", func(ret uint64) error {
		m := in.view()
		d, e := m.U8(uint32(ret))
		if e != nil {
			return e
		}
		if d != 0 {
			refused = liftRefusalAt(m, uint32(ret)+4)
			return nil
		}
		h, e := m.U32(uint32(ret) + 4)
		if e != nil {
			return e
		}
		rep, ok := in.table.reps[int32(h)]
		if !ok {
			return fmt.Errorf("canonical ABI: unknown handle %d", h)
		}
		node = &Node{in: in, rep: uint64(uint32(rep))}
		return nil
	}, uint64(in.lowerCreateArgs(c, nowMs)))
	if err != nil {
		return nil, err
	}
	if refused != nil {
		return nil, refused
	}
	return node, nil
}

func (n *Node) method(name string) string { return "[method]node." + name }

func (n *Node) strResult(name string, args ...uint64) (s string, err error) {
	err = n.in.call(n.method(name), func(ret uint64) (e error) {
		s, e = n.in.view().String(uint32(ret))
		return
	}, append([]uint64{n.rep}, args...)...)
	return
}

// NodeID calls node-id.
func (n *Node) NodeID() (string, error) { return n.strResult("node-id") }

// NewPort calls new-port.
func (n *Node) NewPort() (string, error) { return n.strResult("new-port") }

// RegisterPort calls register-port.
func (n *Node) RegisterPort(name string) (id string, err error) {
	p, l := n.in.str(name)
	return n.strOrRefusal("register-port", p, l)
}

// strOrRefusal calls a method returning result<string, refusal>.
func (n *Node) strOrRefusal(name string, args ...uint64) (s string, err error) {
	var refused error
	err = n.in.call(n.method(name), func(ret uint64) error {
		m := n.in.view()
		d, e := m.U8(uint32(ret))
		if e != nil {
			return e
		}
		if d != 0 {
			refused = liftRefusalAt(m, uint32(ret)+4)
			return nil
		}
		s, e = m.String(uint32(ret) + 4)
		return e
	}, append([]uint64{n.rep}, args...)...)
	if err == nil {
		err = refused
	}
	return s, err
}

// DataConnect calls data-connect with init-args a CBOR array and returns the data
// connection's id.
func (n *Node) DataConnect(port, node string, timeoutMs uint64, handler string, args []byte, nowMs uint64) (string, error) {
	pp, pl := n.in.str(port)
	nd, nl := n.in.str(node)
	hp, hl := n.in.str(handler)
	ap, al := n.in.bytes(args)
	return n.strOrRefusal("data-connect", pp, pl, nd, nl, timeoutMs, hp, hl, uint64(ap), uint64(al), nowMs)
}

// RegisterDataHandler calls register-data-handler.
func (n *Node) RegisterDataHandler(name string) error {
	p, l := n.in.str(name)
	return n.plain("register-data-handler", p, l)
}

// unitResult calls a method returning result<_, refusal>.
func (n *Node) unitResult(name string, args ...uint64) error {
	var refused error
	err := n.in.call(n.method(name), func(ret uint64) (e error) {
		refused = liftResultUnit(n.in.view(), uint32(ret))
		if _, ok := refused.(*Refusal); !ok && refused != nil {
			return refused
		}
		return nil
	}, append([]uint64{n.rep}, args...)...)
	if err != nil {
		return err
	}
	return refused
}

// Kill calls kill with a CBOR array reason.
func (n *Node) Kill(port string, reason []byte, nowMs uint64) error {
	p, l := n.in.str(port)
	rp, rl := n.in.bytes(reason)
	return n.unitResult("kill", p, l, uint64(rp), uint64(rl), nowMs)
}

// Monitor calls monitor.
func (n *Node) Monitor(port string, nowMs uint64) error {
	p, l := n.in.str(port)
	return n.unitResult("monitor", p, l, nowMs)
}

// Send calls send with a batch: data holds port id and args per message, sizes two
// lengths per message.
func (n *Node) Send(data []byte, sizes []uint32, nowMs uint64) error {
	dp, dl := n.in.bytes(data)
	area := make([]byte, 4*len(sizes))
	for i, s := range sizes {
		binary.LittleEndian.PutUint32(area[i*4:], s)
	}
	sp := n.in.alignedCopy(area, 4)
	var refused error
	err := n.in.call(n.method("send"), func(ret uint64) error {
		m := n.in.view()
		d, e := m.U8(uint32(ret))
		if e != nil || d == 0 {
			return e
		}
		se := &SendError{}
		if se.Index, e = m.U32(uint32(ret) + 4); e != nil {
			return e
		}
		if se.Kind, e = m.U8(uint32(ret) + 8); e != nil {
			return e
		}
		if se.Message, e = m.String(uint32(ret) + 12); e != nil {
			return e
		}
		refused = se
		return nil
	}, n.rep, uint64(dp), uint64(dl), uint64(sp), uint64(len(sizes)), nowMs)
	if err != nil {
		return err
	}
	return refused
}

// HandleAccept calls handle-accept and returns the connection id.
func (n *Node) HandleAccept(peer string, nowMs uint64) (uint64, error) {
	p, l := n.in.str(peer)
	res, err := n.in.fn(n.method("handle-accept")).Call(n.in.ctx, n.rep, p, l, nowMs)
	if err != nil {
		return 0, fmt.Errorf("%w: handle-accept: %v", ErrTrap, err)
	}
	return res[0], nil
}

// ConnectAddr calls connect-addr.
func (n *Node) ConnectAddr(addr string, nowMs uint64) (uint64, error) {
	p, l := n.in.str(addr)
	res, err := n.in.fn(n.method("connect-addr")).Call(n.in.ctx, n.rep, p, l, nowMs)
	if err != nil {
		return 0, fmt.Errorf("%w: connect-addr: %v", ErrTrap, err)
	}
	return res[0], nil
}

// plain calls a method without results.
func (n *Node) plain(name string, args ...uint64) error {
	_, err := n.in.fn(n.method(name)).Call(n.in.ctx, append([]uint64{n.rep}, args...)...)
	if err != nil {
		return fmt.Errorf("%w: %s: %v", ErrTrap, name, err)
	}
	return nil
}

// HandleConnected calls handle-connected.
func (n *Node) HandleConnected(conn, nowMs uint64) error {
	return n.plain("handle-connected", conn, nowMs)
}

// HandleEOF calls handle-eof.
func (n *Node) HandleEOF(conn, nowMs uint64) error { return n.plain("handle-eof", conn, nowMs) }

// HandleTimeout calls handle-timeout.
func (n *Node) HandleTimeout(nowMs uint64) error { return n.plain("handle-timeout", nowMs) }

// HandleConnError calls handle-conn-error (or handle-connect-failed when failed is set).
func (n *Node) HandleConnError(conn uint64, reason string, failed bool, nowMs uint64) error {
	p, l := n.in.str(reason)
	name := "handle-conn-error"
	if failed {
		name = "handle-connect-failed"
	}
	return n.plain(name, conn, p, l, nowMs)
}

// Input is one connection's bytes for handle-inputs.
type Input struct {
	Conn uint64
	Data []byte
}

// HandleInputs calls handle-inputs with one round of reads.
func (n *Node) HandleInputs(inputs []Input, nowMs uint64) error {
	area := make([]byte, 16*len(inputs))
	for i, x := range inputs {
		p, l := n.in.bytes(x.Data)
		binary.LittleEndian.PutUint64(area[i*16:], x.Conn)
		binary.LittleEndian.PutUint32(area[i*16+8:], p)
		binary.LittleEndian.PutUint32(area[i*16+12:], l)
	}
	ap := n.in.alignedCopy(area, 8)
	return n.plain("handle-inputs", uint64(ap), uint64(len(inputs)), nowMs)
}

// PollTimeout calls poll-timeout.
func (n *Node) PollTimeout() (at uint64, ok bool, err error) {
	res, err := n.in.fn(n.method("poll-timeout")).Call(n.in.ctx, n.rep)
	if err != nil {
		return 0, false, fmt.Errorf("%w: poll-timeout: %v", ErrTrap, err)
	}
	m := n.in.view()
	d, err := m.U8(uint32(res[0]))
	if err != nil || d == 0 {
		return 0, false, err
	}
	at, err = m.U64(uint32(res[0]) + 8)
	return at, err == nil, err
}

// Output is one node-output variant case; Kind is its discriminant.
type Output struct {
	Kind  OutputKind
	Conn  uint64
	Role  uint8    // start-tls
	Level uint8    // log
	Str   string   // connect addr, close reason, port, node, tag, id, family, log message
	Str2  string   // node-down reason
	Bytes []byte   // transmit bytes, leftover, delivery data, port-down reason, message, result, change, data-connection setup
	Rest  []byte   // data-connection leftover
	Sizes []uint32 // delivery sizes
}

// OutputKind is the discriminant of node-output.
type OutputKind uint8

// The cases of node-output, in WIT order.
const (
	OutTransmit OutputKind = iota
	OutConnect
	OutStartTLS
	OutClose
	OutDeliver
	OutNodeUp
	OutNodeDown
	OutPortDown
	OutRequest
	OutDBReply
	OutDBChange
	OutLog
	OutDataConnection
)

// LiftOutputs reads list<node-output> whose (ptr, len) is at p.
func LiftOutputs(m Mem, p uint32) ([]Output, error) {
	ptr, n, err := m.List(p, 32)
	if err != nil {
		return nil, err
	}
	out := make([]Output, 0, n)
	for i := uint32(0); i < n; i++ {
		o, err := liftOutput(m, ptr+i*32)
		if err != nil {
			return nil, err
		}
		out = append(out, o)
	}
	return out, nil
}

func liftOutput(m Mem, e uint32) (o Output, err error) {
	d, err := m.U8(e)
	if err != nil {
		return o, err
	}
	o.Kind = OutputKind(d)
	q := e + 8
	switch o.Kind {
	case OutTransmit:
		if o.Conn, err = m.U64(q); err == nil {
			o.Bytes, err = m.Bytes(q + 8)
		}
	case OutConnect, OutClose:
		if o.Conn, err = m.U64(q); err == nil {
			o.Str, err = m.String(q + 8)
		}
	case OutStartTLS:
		if o.Conn, err = m.U64(q); err == nil {
			if o.Role, err = m.U8(q + 8); err == nil {
				o.Bytes, err = m.Bytes(q + 12)
			}
		}
	case OutDeliver:
		if o.Str, err = m.String(q); err == nil {
			if o.Bytes, err = m.Bytes(q + 8); err == nil {
				var sp, sn uint32
				if sp, sn, err = m.List(q+16, 4); err == nil {
					o.Sizes = make([]uint32, sn)
					for i := range o.Sizes {
						o.Sizes[i], _ = m.U32(sp + uint32(i)*4)
					}
				}
			}
		}
	case OutNodeUp:
		if o.Str, err = m.String(q); err == nil {
			o.Conn, err = m.U64(q + 8)
		}
	case OutNodeDown:
		if o.Str, err = m.String(q); err == nil {
			o.Str2, err = m.String(q + 8)
		}
	case OutPortDown, OutRequest, OutDBReply, OutDBChange:
		if o.Str, err = m.String(q); err == nil {
			o.Bytes, err = m.Bytes(q + 8)
		}
	case OutLog:
		if o.Level, err = m.U8(q); err == nil {
			o.Str, err = m.String(q + 4)
		}
	case OutDataConnection:
		if o.Conn, err = m.U64(q); err == nil {
			if o.Bytes, err = m.Bytes(q + 8); err == nil {
				o.Rest, err = m.Bytes(q + 16)
			}
		}
	default:
		err = fmt.Errorf("canonical ABI: node-output discriminant %d", d)
	}
	return o, err
}

// PollOutputs calls poll-outputs.
func (n *Node) PollOutputs() (out []Output, err error) {
	err = n.in.call(n.method("poll-outputs"), func(ret uint64) (e error) {
		out, e = LiftOutputs(n.in.view(), uint32(ret))
		return
	}, n.rep)
	return
}

// IsUp calls is-up.
func (n *Node) IsUp(node string) (bool, error) {
	p, l := n.in.str(node)
	res, err := n.in.fn(n.method("is-up")).Call(n.in.ctx, n.rep, p, l)
	if err != nil {
		return false, fmt.Errorf("%w: is-up: %v", ErrTrap, err)
	}
	return res[0] != 0, nil
}

// liftOption reads an option<T>: its discriminant at p, the value off bytes after it.
func liftOption[T any](m Mem, p, off uint32, lift func(uint32) (T, error)) (*T, error) {
	d, err := m.U8(p)
	if err != nil || d != 1 {
		return nil, err
	}
	v, err := lift(p + off)
	if err != nil {
		return nil, err
	}
	return &v, nil
}

// Unmonitor calls unmonitor.
func (n *Node) Unmonitor(port string, nowMs uint64) error {
	p, l := n.in.str(port)
	return n.unitResult("unmonitor", p, l, nowMs)
}

// QueuedBytes calls queued-bytes.
func (n *Node) QueuedBytes() (uint64, error) {
	res, err := n.in.fn(n.method("queued-bytes")).Call(n.in.ctx, n.rep)
	if err != nil {
		return 0, fmt.Errorf("%w: queued-bytes: %v", ErrTrap, err)
	}
	return res[0], nil
}

// RegisterHandler calls register-handler.
func (n *Node) RegisterHandler(tag string) error {
	p, l := n.in.str(tag)
	return n.plain("register-handler", p, l)
}

// DBSet calls db-set with a CBOR value.
func (n *Node) DBSet(family, key string, value []byte, nowMs uint64) error {
	fp, fl := n.in.str(family)
	kp, kl := n.in.str(key)
	vp, vl := n.in.bytes(value)
	return n.unitResult("db-set", fp, fl, kp, kl, uint64(vp), uint64(vl), nowMs)
}

// DBDel calls db-del.
func (n *Node) DBDel(family string, keys []string, nowMs uint64) error {
	fp, fl := n.in.str(family)
	kp, kl := n.in.strings(keys)
	return n.plain("db-del", fp, fl, uint64(kp), uint64(kl), nowMs)
}

// DBQuery calls db-family, db-keys or db-values (name) and returns the query id its
// db-reply output will carry.
func (n *Node) DBQuery(name, family string, nowMs uint64) (string, error) {
	fp, fl := n.in.str(family)
	return n.strResult(name, fp, fl, nowMs)
}

// DBMon calls db-mon, or db-unmon when off is set.
func (n *Node) DBMon(family string, off bool, nowMs uint64) error {
	fp, fl := n.in.str(family)
	name := "db-mon"
	if off {
		name = "db-unmon"
	}
	return n.plain(name, fp, fl, nowMs)
}
