package aemp_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/aemp-project/aemp/hosts/go"
)

// A node sends to one of its own ports and receives the message.
func ExampleStart() {
	ctx := context.Background()
	node, err := aemp.Start(ctx, aemp.Config{NodeID: "example", Secret: "shared"})
	if err != nil {
		panic(err)
	}
	defer node.Close(ctx)
	port, _ := node.RegisterPort(ctx, "inbox")
	_ = node.Send(ctx, port.ID, "hello", 42)
	msg, _ := port.Recv(ctx)
	fmt.Println(port.ID, msg)
	// Output: example#inbox [hello 42]
}

// Refusals match with errors.Is.
func ExampleNode_RegisterPort() {
	ctx := context.Background()
	node, _ := aemp.Start(ctx, aemp.Config{NodeID: "example2"})
	defer node.Close(ctx)
	_, _ = node.RegisterPort(ctx, "echo")
	_, err := node.RegisterPort(ctx, "echo")
	fmt.Println(errors.Is(err, aemp.ErrPortExists))
	// Output: true
}

// Messages is the iterator form of Recv.
func ExamplePort_Messages() {
	ctx := context.Background()
	node, _ := aemp.Start(ctx, aemp.Config{NodeID: "example3"})
	defer node.Close(ctx)
	port, _ := node.Port(ctx)
	for i := range 3 {
		_ = node.Send(ctx, port.ID, i)
	}
	got := 0
	for msg := range port.Messages(ctx) {
		fmt.Println(msg)
		if got++; got == 3 {
			break
		}
	}
	// Output:
	// [0]
	// [1]
	// [2]
}

// A monitor receives the reason a port was killed with; the killed port's Recv fails
// with ErrPortClosed.
func ExampleNode_Monitor() {
	ctx := context.Background()
	node, _ := aemp.Start(ctx, aemp.Config{NodeID: "example4"})
	defer node.Close(ctx)
	port, _ := node.Port(ctx)
	down, _ := node.Monitor(ctx, port.ID)
	_ = node.Kill(ctx, port.ID, "done", 7)
	fmt.Println(<-down)
	_, err := port.Recv(ctx)
	fmt.Println(errors.Is(err, aemp.ErrPortClosed))
	// Output:
	// [done 7]
	// true
}

// Send to a full local port waits until its reader takes a message (here: until the
// context ends, as nobody reads).
func ExampleNode_Send() {
	ctx := context.Background()
	node, _ := aemp.Start(ctx, aemp.Config{NodeID: "example5", PortCapacity: 2})
	defer node.Close(ctx)
	port, _ := node.Port(ctx)
	_ = node.Send(ctx, port.ID, 1)
	_ = node.Send(ctx, port.ID, 2)
	short, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel()
	fmt.Println(node.Send(short, port.ID, 3))
	msg, _ := port.Recv(ctx)
	fmt.Println(msg, node.Send(ctx, port.ID, 3))
	// Output:
	// context deadline exceeded
	// [1] <nil>
}

// After Unmonitor the channel receives nothing, even when the port dies.
func ExampleNode_Unmonitor() {
	ctx := context.Background()
	node, _ := aemp.Start(ctx, aemp.Config{NodeID: "example6"})
	defer node.Close(ctx)
	port, _ := node.Port(ctx)
	down, _ := node.Monitor(ctx, port.ID)
	_ = node.Unmonitor(ctx, port.ID)
	_ = node.Kill(ctx, port.ID, "gone")
	select {
	case reason := <-down:
		fmt.Println("fired", reason)
	case <-time.After(100 * time.Millisecond):
		fmt.Println("not fired")
	}
	// Output: not fired
}

// SendBatch sends in order and stops at the first refusal: the count says how many went.
func ExampleNode_SendBatch() {
	ctx := context.Background()
	node, _ := aemp.Start(ctx, aemp.Config{NodeID: "example7"})
	defer node.Close(ctx)
	port, _ := node.Port(ctx)
	sent, err := node.SendBatch(ctx, []aemp.Message{
		{Port: port.ID, Args: []any{"one"}},
		{Port: port.ID, Args: []any{"two"}},
		{Port: "#no-node", Args: []any{"three"}},
		{Port: port.ID, Args: []any{"four"}},
	})
	fmt.Println(sent, errors.Is(err, aemp.ErrInvalidPortID))
	one, _ := port.Recv(ctx)
	two, _ := port.Recv(ctx)
	fmt.Println(one, two)
	// Output:
	// 2 true
	// [one] [two]
}

// A data connection carries raw bytes between two nodes: the node that serves names a
// data handler, the other asks for it with arguments, writes and ends its side.
func ExampleNode_DataConnect() {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	server, _ := aemp.Start(ctx, aemp.Config{NodeID: "files", Secret: "shared", Binds: []string{"127.0.0.1:0"}})
	defer server.Close(ctx)
	uploads, _ := server.HandleDataConnections("upload")
	client, _ := aemp.Start(ctx, aemp.Config{NodeID: "laptop", Secret: "shared"})
	defer client.Close(ctx)
	_ = client.Connect(ctx, server.Addrs()[0])

	go func() {
		stream, err := client.DataConnect(ctx, "files", "upload", "notes.txt")
		if err != nil {
			panic(err)
		}
		defer stream.Close()
		_, _ = stream.Write([]byte("some bytes, as many as there are"))
		_ = stream.CloseWrite() // the other side reads EOF
		_, _ = io.Copy(io.Discard, stream)
	}()

	stream, _ := uploads.Accept(ctx)
	defer stream.Close()
	body, _ := io.ReadAll(stream)
	fmt.Println(stream.Node(), stream.Handler(), stream.Args(), len(body))
	// Output: laptop upload [notes.txt] 32
}
