// Package abi lifts and lowers the canonical ABI of the engine's core module by hand:
// wazero runs core modules only, and our WIT uses a small set of types (strings,
// list<u8>, lists of records, options, results, variants, enums, tuples, one resource).
package abi

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"sync"

	"github.com/tetratelabs/wazero"
	"github.com/tetratelabs/wazero/api"
)

const nodeIface = "aemp:engine/node@0.1.0"

// Runtime is a compiled engine shared by every node of a process.
type Runtime struct {
	rt       wazero.Runtime
	compiled wazero.CompiledModule
	mu       sync.Mutex
	seq      int
}

// tableKey finds the handle table of the instance that calls a host import.
type tableKey struct{}

// handles is one instance's resource table: handle -> the guest's rep.
type handles struct {
	next int32
	reps map[int32]int32
	dtor api.Function
}

// NewRuntime compiles the core module and provides its imports.
func NewRuntime(ctx context.Context, wasm []byte) (*Runtime, error) {
	rt := wazero.NewRuntime(ctx)
	_, err := rt.NewHostModuleBuilder("wasi:random/random@0.2.0").
		NewFunctionBuilder().WithGoModuleFunction(api.GoModuleFunc(getRandomBytes),
		[]api.ValueType{api.ValueTypeI64, api.ValueTypeI32}, nil).Export("get-random-bytes").
		Instantiate(ctx)
	if err != nil {
		return nil, err
	}
	for _, res := range []struct{ module, name string }{
		{"[export]" + nodeIface, "node"},
		{"[export]aemp:engine/transport@0.1.0", "connection"},
	} {
		_, err = rt.NewHostModuleBuilder(res.module).
			NewFunctionBuilder().WithGoModuleFunction(api.GoModuleFunc(resourceNew),
			[]api.ValueType{api.ValueTypeI32}, []api.ValueType{api.ValueTypeI32}).Export("[resource-new]"+res.name).
			NewFunctionBuilder().WithGoModuleFunction(api.GoModuleFunc(resourceDrop),
			[]api.ValueType{api.ValueTypeI32}, nil).Export("[resource-drop]" + res.name).
			Instantiate(ctx)
		if err != nil {
			return nil, err
		}
	}
	compiled, err := rt.CompileModule(ctx, wasm)
	if err != nil {
		return nil, err
	}
	return &Runtime{rt: rt, compiled: compiled}, nil
}

// Close releases the runtime and every instance.
func (r *Runtime) Close(ctx context.Context) error { return r.rt.Close(ctx) }

func tableOf(ctx context.Context) *handles {
	h, _ := ctx.Value(tableKey{}).(*handles)
	return h
}

func resourceNew(ctx context.Context, _ api.Module, stack []uint64) {
	h := tableOf(ctx)
	h.next++
	h.reps[h.next] = int32(stack[0])
	stack[0] = uint64(uint32(h.next))
}

func resourceDrop(ctx context.Context, _ api.Module, stack []uint64) {
	h := tableOf(ctx)
	rep, ok := h.reps[int32(stack[0])]
	if !ok {
		return
	}
	delete(h.reps, int32(stack[0]))
	if h.dtor != nil {
		h.dtor.Call(ctx, uint64(uint32(rep)))
	}
}

func getRandomBytes(ctx context.Context, m api.Module, stack []uint64) {
	n, retptr := uint32(stack[0]), uint32(stack[1])
	buf := make([]byte, n)
	_, _ = rand.Read(buf)
	res, err := m.ExportedFunction("cabi_realloc").Call(ctx, 0, 0, 1, uint64(n))
	if err != nil {
		panic(err) // a trap in the guest's allocator: the instance is unusable anyway
	}
	ptr := uint32(res[0])
	m.Memory().Write(ptr, buf)
	m.Memory().WriteUint32Le(retptr, ptr)
	m.Memory().WriteUint32Le(retptr+4, n)
}

// Instance is one engine instance (one node). Not safe for concurrent use.
type Instance struct {
	ctx   context.Context
	mod   api.Module
	mem   api.Memory
	alloc api.Function
	table *handles
	fns   map[string]api.Function
}

// Instantiate makes a fresh instance of the compiled engine.
func (r *Runtime) Instantiate(ctx context.Context) (*Instance, error) {
	r.mu.Lock()
	r.seq++
	name := fmt.Sprintf("aemp-engine-%d", r.seq)
	r.mu.Unlock()
	table := &handles{reps: map[int32]int32{}}
	ctx = context.WithValue(ctx, tableKey{}, table)
	mod, err := r.rt.InstantiateModule(ctx, r.compiled, wazero.NewModuleConfig().WithName(name))
	if err != nil {
		return nil, err
	}
	table.dtor = mod.ExportedFunction(nodeIface + "#[dtor]node")
	return &Instance{ctx: ctx, mod: mod, mem: mod.Memory(), alloc: mod.ExportedFunction("cabi_realloc"),
		table: table, fns: map[string]api.Function{}}, nil
}

// Close drops the instance.
func (in *Instance) Close() error { return in.mod.Close(in.ctx) }

// ErrTrap wraps a trap in the guest: the instance must not be used afterwards.
var ErrTrap = errors.New("aemp engine trapped")

func (in *Instance) fn(name string) api.Function {
	f, ok := in.fns[name]
	if !ok {
		f = in.mod.ExportedFunction(nodeIface + "#" + name)
		in.fns[name] = f
	}
	return f
}

// call runs an export; lift reads its results before cabi_post frees them.
func (in *Instance) call(name string, lift func(ret uint64) error, args ...uint64) error {
	res, err := in.fn(name).Call(in.ctx, args...)
	if err != nil {
		return fmt.Errorf("%w: %s: %v", ErrTrap, name, err)
	}
	if lift != nil {
		if err := lift(res[0]); err != nil {
			return err
		}
	}
	if post := in.mod.ExportedFunction("cabi_post_" + nodeIface + "#" + name); post != nil {
		if _, err := post.Call(in.ctx, res[0]); err != nil {
			return fmt.Errorf("%w: post %s: %v", ErrTrap, name, err)
		}
	}
	return nil
}

// malloc allocates guest memory the callee will own.
func (in *Instance) malloc(align, size uint32) uint32 {
	res, err := in.alloc.Call(in.ctx, 0, 0, uint64(align), uint64(size))
	if err != nil {
		panic(fmt.Errorf("%w: cabi_realloc: %v", ErrTrap, err))
	}
	return uint32(res[0])
}

// bytes lowers a list<u8> or string; returns ptr, len.
func (in *Instance) bytes(b []byte) (uint32, uint32) {
	if len(b) == 0 {
		return 1, 0 // any aligned pointer does for an empty list
	}
	p := in.malloc(1, uint32(len(b)))
	in.mem.Write(p, b)
	return p, uint32(len(b))
}

func (in *Instance) str(s string) (uint64, uint64) {
	p, n := in.bytes([]byte(s))
	return uint64(p), uint64(n)
}

// Mem reads guest memory with bounds checks: a bad pointer is an error, not a panic.
type Mem struct{ B []byte }

// ErrBounds reports a pointer or length outside guest memory.
var ErrBounds = errors.New("canonical ABI: out of bounds")

func (m Mem) span(p, n uint32) ([]byte, error) {
	end := uint64(p) + uint64(n)
	if end > uint64(len(m.B)) {
		return nil, ErrBounds
	}
	return m.B[p:end], nil
}

// U8 reads one byte.
func (m Mem) U8(p uint32) (uint8, error) {
	b, err := m.span(p, 1)
	if err != nil {
		return 0, err
	}
	return b[0], nil
}

// U32 reads a little-endian u32.
func (m Mem) U32(p uint32) (uint32, error) {
	b, err := m.span(p, 4)
	if err != nil {
		return 0, err
	}
	return binary.LittleEndian.Uint32(b), nil
}

// U64 reads a little-endian u64.
func (m Mem) U64(p uint32) (uint64, error) {
	b, err := m.span(p, 8)
	if err != nil {
		return 0, err
	}
	return binary.LittleEndian.Uint64(b), nil
}

// List reads a (ptr, len) pair at p and returns the element area of n elements of size.
func (m Mem) List(p, size uint32) (uint32, uint32, error) {
	ptr, err := m.U32(p)
	if err != nil {
		return 0, 0, err
	}
	n, err := m.U32(p + 4)
	if err != nil {
		return 0, 0, err
	}
	if _, err := m.span(ptr, uint32(min(uint64(n)*uint64(size), 1<<32-1))); err != nil {
		return 0, 0, err
	}
	return ptr, n, nil
}

// Bytes copies a list<u8> whose (ptr, len) is at p.
func (m Mem) Bytes(p uint32) ([]byte, error) {
	ptr, n, err := m.List(p, 1)
	if err != nil {
		return nil, err
	}
	b, _ := m.span(ptr, n)
	return append([]byte(nil), b...), nil
}

// String copies a string whose (ptr, len) is at p.
func (m Mem) String(p uint32) (string, error) {
	b, err := m.Bytes(p)
	return string(b), err
}

func (in *Instance) view() Mem {
	b, _ := in.mem.Read(0, in.mem.Size())
	return Mem{B: b}
}
