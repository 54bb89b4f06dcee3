// Command aemp-bench measures the Go host end to end against a node running an echo
// port (e.g. `aemp run --echo --nodeid one --secret shared --listen 127.0.0.1:4040`):
// messages/s with a window of messages in flight (sent one Send each, or with -batch N in
// SendBatch calls of up to N), and the round-trip p50 one at a time.
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"slices"
	"time"

	"github.com/aemp-project/aemp/hosts/go"
)

func main() {
	addr := flag.String("connect", "127.0.0.1:4040", "address of the echo node")
	remote := flag.String("node", "one", "its node id")
	secret := flag.String("secret", "shared", "the shared secret")
	count := flag.Int("n", 100000, "messages for the throughput run")
	window := flag.Int("window", 1000, "messages in flight")
	batch := flag.Int("batch", 1, "messages per SendBatch (1: one Send per message)")
	flag.Parse()
	ctx := context.Background()
	node, err := aemp.Start(ctx, aemp.Config{NodeID: "go-bench", Secret: *secret, Seeds: []string{*addr}})
	if err != nil {
		log.Fatal(err)
	}
	defer node.Close(ctx)
	wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := node.WaitUp(wctx, *remote); err != nil {
		log.Fatal(err)
	}
	port, _ := node.Port(ctx)
	echo := *remote + "#echo"
	start := time.Now()
	sent, got := 0, 0
	for got < *count {
		if *batch > 1 {
			var msgs []aemp.Message
			for sent+len(msgs) < *count && sent+len(msgs)-got < *window && len(msgs) < *batch {
				msgs = append(msgs, aemp.Message{Port: echo, Args: []any{port.ID, "ping", sent + len(msgs)}})
			}
			if n, err := node.SendBatch(ctx, msgs); err != nil {
				log.Fatal(err)
			} else {
				sent += n
			}
		} else {
			for sent < *count && sent-got < *window {
				if err := node.Send(ctx, echo, port.ID, "ping", sent); err != nil {
					log.Fatal(err)
				}
				sent++
			}
		}
		if _, err := port.Recv(ctx); err != nil {
			log.Fatal(err)
		}
		got++
	}
	rate := float64(*count) / time.Since(start).Seconds()
	rtts := make([]time.Duration, 0, 2000)
	for i := range 2000 {
		t := time.Now()
		_ = node.Send(ctx, echo, port.ID, "ping", i)
		if _, err := port.Recv(ctx); err != nil {
			log.Fatal(err)
		}
		rtts = append(rtts, time.Since(t))
	}
	slices.Sort(rtts)
	fmt.Printf("go_host_msgs_per_s %.0f\ngo_host_rtt_p50_us %.1f\n", rate, float64(rtts[len(rtts)/2].Microseconds()))
}
