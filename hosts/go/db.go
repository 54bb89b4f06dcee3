package aemp

import (
	"context"
	"fmt"
)

type dbReply struct{ raw []byte }

// DBSet sets this node's entry key of the database family to value (any
// CBOR-encodable value); the global nodes spread it.
func (n *Node) DBSet(ctx context.Context, family, key string, value any) error {
	enc, err := encMode.Marshal(value)
	if err != nil {
		return err
	}
	return n.do(ctx, func() error { return refusal(n.eng.DBSet(family, key, enc, n.now())) })
}

// DBDel deletes this node's entries keys of family.
func (n *Node) DBDel(ctx context.Context, family string, keys ...string) error {
	return n.do(ctx, func() error { return refusal(n.eng.DBDel(family, keys, n.now())) })
}

// query asks the master a database question and decodes its answer into out. The
// question is kept until a master answers (sent again to a new one), so ctx bounds it.
func (n *Node) query(ctx context.Context, name, family string, out any) error {
	ch := make(chan dbReply, 1)
	var id string
	err := n.do(ctx, func() error {
		var err error
		if id, err = n.eng.DBQuery(name, family, n.now()); err == nil {
			n.dbWait[id] = ch
		}
		return refusal(err)
	})
	if err != nil {
		return err
	}
	select {
	case r := <-ch:
		if err := decMode.Unmarshal(r.raw, out); err != nil {
			return fmt.Errorf("aemp: %s %s: answer not decodable: %w", name, family, err)
		}
		return nil
	case <-ctx.Done():
		_ = n.do(context.Background(), func() error { delete(n.dbWait, id); return nil })
		return ctx.Err()
	case <-n.done:
		return n.stopErr()
	}
}

// DBFamily returns the whole family (key to value) as the master knows it.
func (n *Node) DBFamily(ctx context.Context, family string) (map[string]any, error) {
	var m map[string]any
	err := n.query(ctx, "db-family", family, &m)
	return m, err
}

// DBKeys returns the keys of family.
func (n *Node) DBKeys(ctx context.Context, family string) ([]string, error) {
	var k []string
	err := n.query(ctx, "db-keys", family, &k)
	return k, err
}

// DBValues returns the values of family.
func (n *Node) DBValues(ctx context.Context, family string) ([]any, error) {
	var v []any
	err := n.query(ctx, "db-values", family, &v)
	return v, err
}

// DBChange is one report of a monitored family: Set holds new or changed keys with
// their values, Del the deleted keys. The first report holds the whole family.
type DBChange struct {
	Set map[string]any
	Del []string
}

// DBMonitor receives the changes of one database family, bounded as a Port is.
type DBMonitor struct {
	Family string
	n      *Node
	in     *inbox
}

// DBMonitor monitors family: Recv returns its contents, then every change.
func (n *Node) DBMonitor(ctx context.Context, family string) (*DBMonitor, error) {
	m := &DBMonitor{Family: family, n: n, in: n.newInbox("database monitor " + family)}
	err := n.do(ctx, func() error {
		if _, ok := n.dbMons[family]; ok {
			return &Refusal{Kind: PortExists, Message: "family " + family + " is monitored already"}
		}
		n.dbMons[family] = m.in
		return n.eng.DBMon(family, false, n.now())
	})
	if err != nil {
		return nil, refusal(err)
	}
	return m, nil
}

// Recv waits for the next change.
func (m *DBMonitor) Recv(ctx context.Context) (DBChange, error) {
	item, err := m.in.recv(ctx)
	if err != nil {
		return DBChange{}, err
	}
	var ch struct {
		_   struct{} `cbor:",toarray"`
		Set map[string]any
		Del []string
	}
	// The inbox decoded the change as an array; its two parts get their types here.
	raw, err := encMode.Marshal(item)
	if err == nil {
		err = decMode.Unmarshal(raw, &ch)
	}
	if err != nil {
		return DBChange{}, fmt.Errorf("aemp: database change of %s: %w", m.Family, err)
	}
	return DBChange{Set: ch.Set, Del: ch.Del}, nil
}

// Close stops monitoring.
func (m *DBMonitor) Close(ctx context.Context) error {
	return m.n.do(ctx, func() error {
		if m.n.dbMons[m.Family] != m.in {
			return nil
		}
		delete(m.n.dbMons, m.Family)
		delete(m.n.fullPorts, m.in)
		m.in.close()
		return m.n.eng.DBMon(m.Family, true, m.n.now())
	})
}

// Request is a node-port request ([TAG, ARGS...] sent to NODE#) from node From.
type Request struct {
	From string
	Args []any
}

// Requests receives the node-port requests of one tag, bounded as a Port is.
type Requests struct {
	Tag string
	in  *inbox
}

// HandleRequests makes node-port requests tagged tag come to the returned Requests
// instead of being refused ("remote execution not allowed").
func (n *Node) HandleRequests(ctx context.Context, tag string) (*Requests, error) {
	r := &Requests{Tag: tag, in: n.newInbox("requests " + tag)}
	err := n.do(ctx, func() error {
		if _, ok := n.handlers[tag]; ok {
			return &Refusal{Kind: PortExists, Message: "requests " + tag + " are handled already"}
		}
		n.handlers[tag] = r.in
		return n.eng.RegisterHandler(tag)
	})
	if err != nil {
		return nil, refusal(err)
	}
	return r, nil
}

// Recv waits for the next request.
func (r *Requests) Recv(ctx context.Context) (Request, error) {
	for {
		m, err := r.in.recv(ctx)
		if err != nil {
			return Request{}, err
		}
		if len(m) > 0 {
			if from, ok := m[0].(string); ok {
				return Request{From: from, Args: m[1:]}, nil
			}
		}
	}
}
