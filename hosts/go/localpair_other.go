//go:build !unix

package aemp

import "net"

// localPair makes both ends of a data connection to the node itself: without Unix
// socket pairs, a net.Pipe, which cannot end one side only (CloseWrite is
// errors.ErrUnsupported) and whose writes wait for the reader.
func localPair() (net.Conn, net.Conn, error) {
	a, b := net.Pipe()
	return a, b, nil
}
