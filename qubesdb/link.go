package qubesdb

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"
)

// Connect opens the next connection to the peer daemon: on the VM side a
// vchan client connecting to dom0 port 111, on dom0's side a vchan server
// waiting for the VM. It blocks until connected or ctx is done.
type Connect func(ctx context.Context) (io.ReadWriteCloser, error)

var errLinkClosed = errors.New("link closed")

// errQueueFull means the peer stopped reading while we had to answer it.
var errQueueFull = errors.New("peer is not reading: output queue full")

// link is one connection between two daemons. Messages are read by the
// caller; sends are queued and written by a goroutine of the link, so that
// a reader never blocks on a write (both peers answer every command, and
// two readers blocked writing to each other would deadlock; the reference
// daemon buffers its output for the same reason). The queue is bounded.
type link struct {
	rwc       io.ReadWriteCloser
	peer      string // who is on the other side, for errors
	maxQueued int    // bytes
	wake      chan struct{}
	done      chan struct{}

	mu       sync.Mutex
	out      []byte
	draining bool // closeAfterFlush: no more sends, close once written
	closed   bool
	err      error // why the link closed
}

func newLink(rwc io.ReadWriteCloser, peer string, maxQueued int) *link {
	l := &link{
		rwc:       rwc,
		peer:      peer,
		maxQueued: maxQueued,
		wake:      make(chan struct{}, 1),
		done:      make(chan struct{}),
	}
	go l.writeLoop()
	return l
}

// send queues one message. It never blocks.
func (l *link) send(t MsgType, path string, data []byte) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed || l.draining {
		return fmt.Errorf("sending %v %q to %s: %w", t, path, l.peer, cmp.Or(l.err, errLinkClosed))
	}
	if len(l.out)+HeaderLen+len(data) > l.maxQueued {
		return fmt.Errorf("sending %v %q to %s: %w (%d bytes)", t, path, l.peer, errQueueFull, len(l.out))
	}
	out, err := AppendMessage(l.out, t, path, data)
	if err != nil {
		return err
	}
	l.out = out
	l.signal()
	return nil
}

func (l *link) signal() {
	select {
	case l.wake <- struct{}{}:
	default:
	}
}

func (l *link) writeLoop() {
	var spare []byte
	for {
		l.mu.Lock()
		buf, draining := l.out, l.draining
		if len(buf) > 0 {
			l.out = spare[:0] // spare and buf never share an array
		}
		l.mu.Unlock()
		if len(buf) == 0 {
			if draining {
				l.close(nil)
				return
			}
			select {
			case <-l.wake:
			case <-l.done:
				return
			}
			continue
		}
		if _, err := l.rwc.Write(buf); err != nil {
			l.close(fmt.Errorf("writing to %s: %w", l.peer, err))
			return
		}
		spare = buf
	}
}

// recv reads the next message; only one goroutine may call it.
func (l *link) recv() (Message, error) {
	m, err := ReadMessage(l.rwc)
	if err != nil {
		return m, fmt.Errorf("reading from %s: %w", l.peer, err)
	}
	return m, nil
}

// close shuts the link down; the first error given is kept as the reason.
func (l *link) close(err error) {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return
	}
	l.closed, l.out = true, nil
	if l.err == nil {
		l.err = err
	}
	close(l.done)
	l.mu.Unlock()
	// Outside the lock: closing a vchan waits for a Write in progress,
	// and the writer takes the lock once its Write returns.
	l.rwc.Close()
}

// closeAfterFlush closes the link once what is queued has been written, or
// after linger at the latest, so that the answer a daemon sends just before
// it gives up on its peer (RESP_ERROR_NOENT to a failed RM) reaches it.
func (l *link) closeAfterFlush(err error, linger time.Duration) {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return
	}
	l.draining, l.err = true, err
	l.mu.Unlock()
	l.signal()
	t := time.AfterFunc(linger, func() { l.close(err) })
	defer t.Stop()
	<-l.done
}

// reason returns why the link closed, or err if it closed for no reason.
func (l *link) reason(err error) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.err != nil {
		return l.err
	}
	return err
}
