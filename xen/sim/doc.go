// Package sim is an in-memory Xen hypervisor for tests and the demo: any
// number of domains (dom0 plus others), each with a grant table, event
// channels and a xenstore connection, behind the same xen.Domain interface
// that xen/linux implements with /dev/xen. It enforces what Xen enforces and
// reports violations as errors: mapping or copying a grant not granted to
// you, writing through a read-only grant, notifying a closed or unbound port,
// xenstore access without permission, and per-domain limits (see Limits).
//
// # A vchan between dom0 and a VM (what QubesDB needs)
//
// This API is stable:
//
//	h := sim.New()                       // dom0 is h.Dom0()
//	defer h.Close()
//	vm, err := h.CreateDomain("sys-firewall")
//	// dom0's qubesdb-daemon: vchan server for the VM on port 111
//	srv, err := vchan.Listen(ctx, h.Dom0(), vm.ID(), 111, 4096, 4096)
//	// the VM side: vchan client to dom0 port 111
//	cli, err := vchan.Dial(ctx, vm, xen.Dom0, 111)
//
// srv and cli are *vchan.Conn, an io.ReadWriteCloser. Dial waits (bounded by
// ctx) until the server is listening, so the two calls may run in either
// order from different goroutines. Closing one end, or vm.Destroy(), makes
// the other end's Read return io.EOF after the buffered data and its Write
// fail with vchan.ErrPeerClosed. See Example_vchan.
//
// Shared pages are ordinary Go memory, so `go test -race` checks the ring
// protocols built on top. The simulator cannot trap a store through a
// read-only mapping: it refuses to map a read-only grant writable and to
// grant-copy into one, which is how correct code touches such pages.
package sim
