// Command aemp-echo runs a Go node with an "echo" port: each message's remaining
// arguments are sent to the port id in its first argument, like `aemp run --echo`, and
// serves the data handler "echo", which sends back what a data connection brings and
// ends its side at the end of it.
//
//	go run ./cmd/aemp-echo -nodeid go -secret shared -listen 127.0.0.1:4041
//
// With -cert FILE (an AnyEvent::MP certificate file, e.g. from `aemp gencert`) it
// joins a TLS network.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log"
	"os"
	"os/signal"
	"strings"

	"github.com/aemp-project/aemp/hosts/go"
)

func main() {
	nodeID := flag.String("nodeid", "go", "node id")
	secret := flag.String("secret", "", "the network's shared secret")
	listen := flag.String("listen", "127.0.0.1:4041", "address to listen on")
	seeds := flag.String("seeds", "", "comma-separated seed addresses")
	certFile := flag.String("cert", "", "PEM file with the certificate, its key and the CA certificates (TLS)")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	cfg := aemp.Config{NodeID: *nodeID, Secret: *secret, Binds: []string{*listen},
		Log: func(level int, msg string) {
			if level <= 1 {
				log.Print(msg)
			}
		}}
	if *seeds != "" {
		cfg.Seeds = strings.Split(*seeds, ",")
	}
	if *certFile != "" {
		cert, err := aemp.CertFromFile(*certFile)
		if err != nil {
			log.Fatal(err)
		}
		cfg.Cert = cert
	}
	node, err := aemp.Start(ctx, cfg)
	if err != nil {
		log.Fatal(err)
	}
	port, err := node.RegisterPort(ctx, "echo")
	if err != nil {
		log.Fatal(err)
	}
	streams, err := node.HandleDataConnections("echo")
	if err != nil {
		log.Fatal(err)
	}
	go func() {
		for {
			s, err := streams.Accept(ctx)
			if err != nil {
				return
			}
			go func() {
				defer s.Close()
				if _, err := io.Copy(s, s); err == nil {
					_ = s.CloseWrite()
				}
			}()
		}
	}()
	fmt.Printf("node %s listening on %s\necho port %s\n", node.ID(), node.Addrs()[0], port.ID)
	for {
		m, err := port.Recv(ctx)
		if err != nil {
			break
		}
		if len(m) == 0 {
			continue
		}
		if to, ok := m[0].(string); ok {
			if err := node.Send(ctx, to, m[1:]...); err != nil {
				log.Print(err)
			}
		}
	}
	node.Close(context.Background())
}
