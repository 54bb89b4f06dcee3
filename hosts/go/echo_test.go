package aemp

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

// cmd/aemp-echo with -cert serves its echo port and its echo data handler over TLS to a
// node with the same certificate file and refuses one with another.
func TestEchoCommandWithCert(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	dir := t.TempDir()
	writeRC(t, dir, "shared")
	cert := genCert(t, dir)
	certFile := filepath.Join(dir, "cert.pem")
	if err := os.WriteFile(certFile, cert, 0o600); err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "aemp-echo")
	if out, err := exec.CommandContext(ctx, "go", "build", "-o", bin, "./cmd/aemp-echo").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	cmd := exec.CommandContext(ctx, bin, "-nodeid", "go-echo-tls", "-secret", "shared", "-listen", "127.0.0.1:0", "-cert", certFile)
	addr := startEcho(t, cmd)
	n := startGo(t, ctx, Config{NodeID: "go-echo-client", Secret: "shared", Cert: cert, Seeds: []string{addr}})
	if err := n.WaitUp(ctx, "go-echo-tls"); err != nil {
		t.Fatal(err)
	}
	echoRoundTrip(t, ctx, n, "go-echo-tls", "over tls")
	dc, err := n.DataConnect(ctx, "go-echo-tls", "echo")
	if err != nil {
		t.Fatal(err)
	}
	roundTrip(t, dc, 1<<20)
	dc.Close()
	// Another network's certificate is refused, so the echo node really runs TLS.
	other := startGo(t, ctx, Config{NodeID: "go-echo-other", Secret: "shared", Cert: genCert(t, t.TempDir()), Seeds: []string{addr}})
	wctx, wcancel := context.WithTimeout(ctx, 3*time.Second)
	defer wcancel()
	if err := other.WaitUp(wctx, "go-echo-tls"); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("up with another CA's certificate: %v", err)
	}
}
