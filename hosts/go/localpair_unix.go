//go:build unix

package aemp

import (
	"net"
	"os"
	"syscall"
)

// localPair makes both ends of a data connection to the node itself: a socket pair, as
// the reference makes one, so that each end can end its side (CloseWrite) and writes
// are buffered as a socket's are.
func localPair() (net.Conn, net.Conn, error) {
	syscall.ForkLock.RLock() // no child inherits the pair before it is close-on-exec
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM, 0)
	if err == nil {
		syscall.CloseOnExec(fds[0])
		syscall.CloseOnExec(fds[1])
	}
	syscall.ForkLock.RUnlock()
	if err != nil {
		return nil, nil, os.NewSyscallError("socketpair", err)
	}
	var ends [2]net.Conn
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), "aemp-dataconn")
		ends[i], err = net.FileConn(f) // a copy of fd, non-blocking in the runtime's poller
		f.Close()
		if err != nil {
			if i == 1 {
				ends[0].Close()
			} else {
				syscall.Close(fds[1])
			}
			return nil, nil, err
		}
	}
	return ends[0], ends[1], nil
}
