// Package vchan implements libxenvchan, the shared-memory byte stream Qubes
// uses between domains (QubesDB, qrexec): a control page granted by the
// server, two rings, an event channel, and a rendezvous in xenstore. It is
// built only on the xen interfaces, so it runs over /dev/xen and over the
// simulator alike.
package vchan

import (
	"encoding/binary"
	"fmt"

	"qfw/xen"
)

// Control page layout (struct vchan_interface). LEFT carries client to
// server, RIGHT server to client; each ring_shared is {cons, prod}.
const (
	offLeftCons   = 0
	offLeftProd   = 4
	offRightCons  = 8
	offRightProd  = 12
	offLeftOrder  = 16 // u16
	offRightOrder = 18 // u16
	offCliLive    = 20
	offSrvLive    = 21
	offCliNotify  = 22 // bits the client must honour, set by the server
	offSrvNotify  = 23 // bits the server must honour, set by the client
	offGrants     = 24 // u32 grant refs: LEFT ring's pages, then RIGHT's
	offFlags      = 20 // the 32-bit word holding the four bytes above
)

// Live byte values.
const (
	liveGone      = 0
	liveConnected = 1
	liveWaiting   = 2 // server side: no client yet
)

// Notify request bits.
const (
	notifyWrite = 1 // tell me when you wrote
	notifyRead  = 2 // tell me when you consumed
)

// Ring orders: 10 and 11 live inside the control page, 12..20 in
// 2^(order-12) pages of their own.
const (
	minOrder      = 10
	maxOrder      = 20
	firstExtOrder = 12
	// MaxRingSize is the largest ring, 1 MiB.
	MaxRingSize = 1 << maxOrder
)

// inPageOffset is where an in-page ring of the order starts.
func inPageOffset(order int) int {
	if order == 10 {
		return 1024
	}
	return 2048
}

// ringPages is the number of granted pages a ring of the order needs.
func ringPages(order int) int {
	if order < firstExtOrder {
		return 0
	}
	return 1 << (order - firstExtOrder)
}

// ringOrders picks the orders of LEFT (left bytes at least) and RIGHT as
// libxenvchan's server does: in-page rings when they fit.
func ringOrders(left, right int) (lo, ro int) {
	lo, ro = extOrder(left), extOrder(right)
	switch {
	case left <= 1024 && right <= 2048:
		return 10, 11
	case left <= 2048 && right <= 1024:
		return 11, 10
	case left <= 2048:
		lo = 11
	case right <= 2048:
		ro = 11
	}
	return lo, ro
}

func extOrder(size int) int {
	o := firstExtOrder
	for 1<<o < size {
		o++
	}
	return o
}

// checkOrders validates orders read from a server's page: both within
// range, in-page rings not overlapping each other or the grant list.
func checkOrders(lo, ro int) error {
	if lo < minOrder || lo > maxOrder || ro < minOrder || ro > maxOrder {
		return fmt.Errorf("%w: ring orders %d/%d outside %d..%d", ErrCorrupt, lo, ro, minOrder, maxOrder)
	}
	if lo == ro && lo < firstExtOrder {
		return fmt.Errorf("%w: both rings at the same in-page slot (order %d)", ErrCorrupt, lo)
	}
	end := offGrants + 4*(ringPages(lo)+ringPages(ro))
	limit := xen.PageSize
	for _, o := range []int{lo, ro} {
		if o < firstExtOrder {
			limit = min(limit, inPageOffset(o))
		}
	}
	if end > limit {
		return fmt.Errorf("%w: grant list of orders %d/%d overlaps a ring", ErrCorrupt, lo, ro)
	}
	return nil
}

// readOrders copies the two orders out of the control page.
func readOrders(ctrl []byte) (lo, ro int) {
	return int(binary.LittleEndian.Uint16(ctrl[offLeftOrder:])), int(binary.LittleEndian.Uint16(ctrl[offRightOrder:]))
}

// ring is one direction: its indices in the control page and its data pages.
type ring struct {
	cons, prod uint32AtPage
	data       [][]byte // equal-sized chunks, together size bytes
	size       uint32
}

// uint32AtPage locates a shared index word.
type uint32AtPage struct {
	page []byte
	off  int
}

func (w uint32AtPage) load() uint32   { return xen.Word(w.page, w.off).Load() }
func (w uint32AtPage) store(v uint32) { xen.Word(w.page, w.off).Store(v) }

func newRing(ctrl []byte, consOff, prodOff, order int, pages [][]byte) ring {
	r := ring{cons: uint32AtPage{ctrl, consOff}, prod: uint32AtPage{ctrl, prodOff}, size: 1 << order}
	if order < firstExtOrder {
		start := inPageOffset(order)
		r.data = [][]byte{ctrl[start : start+1<<order]}
	} else {
		r.data = pages
	}
	return r
}

// copyOut copies len(dst) bytes starting at free-running index pos.
func (r *ring) copyOut(dst []byte, pos uint32) {
	for len(dst) > 0 {
		chunk, off := r.locate(pos)
		n := copy(dst, chunk[off:])
		dst = dst[n:]
		pos += uint32(n)
	}
}

// copyIn copies src into the ring starting at free-running index pos.
func (r *ring) copyIn(pos uint32, src []byte) {
	for len(src) > 0 {
		chunk, off := r.locate(pos)
		n := copy(chunk[off:], src)
		src = src[n:]
		pos += uint32(n)
	}
}

func (r *ring) locate(pos uint32) ([]byte, uint32) {
	off := pos & (r.size - 1)
	cl := uint32(len(r.data[0]))
	return r.data[off/cl], off % cl
}
