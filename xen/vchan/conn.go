package vchan

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"

	"qfw/xen"
)

var (
	// ErrClosed is returned by Read and Write after Close.
	ErrClosed = errors.New("vchan: connection closed")
	// ErrPeerClosed is returned by Write once the peer has gone (closed,
	// crashed, or its domain died). Read returns io.EOF instead, after
	// the data the peer wrote has been read.
	ErrPeerClosed = errors.New("vchan: peer closed")
	// ErrCorrupt reports a control page the peer filled with impossible
	// values. The connection is unusable; close it.
	ErrCorrupt = errors.New("vchan: peer corrupted the shared page")
)

// Conn is one end of a vchan: a reliable byte stream with io.Reader and
// io.Writer semantics. Read returns what is available (at least one byte);
// Write blocks until everything is in the ring, possibly in several pieces.
// One Read and one Write may run concurrently with each other and with Close.
type Conn struct {
	peer xen.DomID

	ctrl  []byte // the control page
	mem   []xen.Pages
	rd    ring // the ring we read
	wr    ring // the ring we write
	ev    xen.EventChannel
	flags uint32AtPage

	ownLive, peerLive     int // byte offsets in the control page
	ownNotify, peerNotify int // own: requests the peer made of us

	rmu, wmu  sync.Mutex
	readWake  chan struct{} // cap 1, kicked on every event
	writeWake chan struct{}
	done      chan struct{} // closed by Close
	evDone    chan struct{} // closed when the event loop exits

	// ctx lives until Close; the server's xenstore clean-up runs under it.
	ctx    context.Context
	cancel context.CancelFunc

	mu      sync.Mutex
	closed  bool
	err     error  // first fatal error (corruption, notify failure)
	onEvent func() // server: unpublish once the client is there
	onClose func() error
}

// newConn builds one end over a mapped control page; mem holds the control
// page first, then the ring pages.
func newConn(peer xen.DomID, server bool, ctrl []byte, mem []xen.Pages, ev xen.EventChannel, lo, ro int, left, right [][]byte) *Conn {
	c := &Conn{
		peer: peer, ctrl: ctrl, mem: mem, ev: ev,
		flags:     uint32AtPage{ctrl, offFlags},
		readWake:  make(chan struct{}, 1),
		writeWake: make(chan struct{}, 1),
		done:      make(chan struct{}),
		evDone:    make(chan struct{}),
	}
	c.ctx, c.cancel = context.WithCancel(context.Background())
	l := newRing(ctrl, offLeftCons, offLeftProd, lo, left)
	r := newRing(ctrl, offRightCons, offRightProd, ro, right)
	if server {
		c.rd, c.wr = l, r
		c.ownLive, c.peerLive = offSrvLive, offCliLive
		c.ownNotify, c.peerNotify = offSrvNotify, offCliNotify
	} else {
		c.rd, c.wr = r, l
		c.ownLive, c.peerLive = offCliLive, offSrvLive
		c.ownNotify, c.peerNotify = offCliNotify, offSrvNotify
	}
	return c
}

// start runs the event loop: every event wakes the reader and the writer,
// which re-check the shared state themselves.
func (c *Conn) start() {
	go func() {
		defer close(c.evDone)
		for {
			select {
			case <-c.ev.C():
				if c.onEvent != nil {
					c.onEvent()
				}
				kick(c.readWake)
				kick(c.writeWake)
			case <-c.done:
				return
			}
		}
	}()
}

func kick(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

// Peer returns the domain at the other end.
func (c *Conn) Peer() xen.DomID { return c.peer }

func (c *Conn) peerGone() bool { return xen.LoadByte(c.ctrl, c.peerLive) == liveGone }

// state returns ErrClosed after Close, or the first fatal error.
func (c *Conn) state() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return ErrClosed
	}
	return c.err
}

func (c *Conn) fail(err error) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err == nil {
		c.err = err
	}
	return c.err
}

// readable is the number of unread bytes; more than the ring holds means
// the peer corrupted the indices.
func (c *Conn) readable() (uint32, error) {
	n := c.rd.prod.load() - c.rd.cons.load()
	if n > c.rd.size {
		return 0, c.fail(fmt.Errorf("%w: %d bytes readable in a %d-byte ring from dom%d", ErrCorrupt, n, c.rd.size, c.peer))
	}
	return n, nil
}

func (c *Conn) writable() (uint32, error) {
	used := c.wr.prod.load() - c.wr.cons.load()
	if used > c.wr.size {
		return 0, c.fail(fmt.Errorf("%w: %d bytes pending in a %d-byte ring to dom%d", ErrCorrupt, used, c.wr.size, c.peer))
	}
	return c.wr.size - used, nil
}

// sendNotify sends an event if the peer asked to hear about bit.
func (c *Conn) sendNotify(bit uint32) error {
	mask := bit << (8 * (c.ownNotify - offFlags))
	if xen.Word(c.ctrl, offFlags).And(^mask)&mask == 0 {
		return nil
	}
	if err := c.ev.Notify(); err != nil && !errors.Is(err, xen.ErrPortUnbound) {
		// Unbound means the peer is gone; the live byte tells the rest.
		return c.fail(fmt.Errorf("vchan: notify dom%d: %w", c.peer, err))
	}
	return nil
}

// requestNotify asks the peer to send an event when it does bit.
func (c *Conn) requestNotify(bit uint32) {
	xen.Word(c.ctrl, offFlags).Or(bit << (8 * (c.peerNotify - offFlags)))
}

// wait blocks until an event or Close.
func (c *Conn) wait(wake chan struct{}) error {
	select {
	case <-wake:
		return nil
	case <-c.done:
		return ErrClosed
	}
}

// Read reads what is available, up to len(p), blocking until at least one
// byte is. It returns io.EOF once the peer has gone and its data is read.
func (c *Conn) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	c.rmu.Lock()
	defer c.rmu.Unlock()
	for {
		if err := c.state(); err != nil {
			return 0, err
		}
		// Look at liveness before the index: data pushed before the peer
		// left is still read.
		gone := c.peerGone()
		n, err := c.readable()
		if err != nil {
			return 0, err
		}
		if n > 0 {
			k := min(n, uint32(min(len(p), int(c.rd.size))))
			cons := c.rd.cons.load()
			c.rd.copyOut(p[:k], cons)
			c.rd.cons.store(cons + k)
			return int(k), c.sendNotify(notifyRead)
		}
		if gone {
			return 0, io.EOF
		}
		c.requestNotify(notifyWrite)
		if n, err := c.readable(); err != nil || n > 0 || c.peerGone() {
			continue
		}
		if err := c.wait(c.readWake); err != nil {
			return 0, err
		}
	}
}

// Write writes all of p, blocking while the ring is full. It fails with
// ErrPeerClosed once the peer has gone; n then says how much was written.
func (c *Conn) Write(p []byte) (int, error) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	written := 0
	for len(p) > 0 {
		if err := c.state(); err != nil {
			return written, err
		}
		if c.peerGone() {
			return written, ErrPeerClosed
		}
		n, err := c.writable()
		if err != nil {
			return written, err
		}
		if n > 0 {
			k := min(n, uint32(min(len(p), int(c.wr.size))))
			prod := c.wr.prod.load()
			c.wr.copyIn(prod, p[:k])
			c.wr.prod.store(prod + k)
			p = p[k:]
			written += int(k)
			if err := c.sendNotify(notifyWrite); err != nil {
				return written, err
			}
			continue
		}
		c.requestNotify(notifyRead)
		if n, err := c.writable(); err != nil || n > 0 || c.peerGone() {
			continue
		}
		if err := c.wait(c.writeWake); err != nil {
			return written, err
		}
	}
	return written, nil
}

// Close tells the peer we are gone, waits for a Read or Write in progress to
// return, and releases the pages and the event channel. Later calls return
// ErrClosed.
func (c *Conn) Close() error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return ErrClosed
	}
	c.closed = true
	c.mu.Unlock()

	xen.StoreByte(c.ctrl, c.ownLive, liveGone)
	// An event the peer cannot receive (it left first) is fine to lose.
	notifyErr := c.ev.Notify()
	if errors.Is(notifyErr, xen.ErrPortUnbound) {
		notifyErr = nil
	}
	close(c.done)
	c.cancel()
	<-c.evDone
	c.rmu.Lock() // no Read or Write touches the pages any more
	c.wmu.Lock()
	defer c.rmu.Unlock()
	defer c.wmu.Unlock()

	errs := []error{notifyErr}
	if c.onClose != nil {
		errs = append(errs, c.onClose())
	}
	for i := len(c.mem) - 1; i >= 0; i-- { // rings first, control page last
		errs = append(errs, c.mem[i].Close())
	}
	errs = append(errs, c.ev.Close())
	return errors.Join(errs...)
}
