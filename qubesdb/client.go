package qubesdb

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"sync"
	"time"
)

// Errors of Client and Server operations.
var (
	ErrNotConnected = errors.New("QubesDB peer not connected")
	ErrNotFound     = errors.New("QubesDB entry not found")
)

const (
	// clientQueueBytes bounds what the VM side queues for dom0: answers to
	// dom0's commands and our own few writes.
	clientQueueBytes = 64 << 10
	// maxPending bounds our commands waiting for dom0's answer.
	maxPending = 64

	defaultMinBackoff = 50 * time.Millisecond
	defaultMaxBackoff = 5 * time.Second
)

// ClientConfig tunes a Client; the zero value is usable.
type ClientConfig struct {
	Logger *slog.Logger // nil: slog.Default()
	// Delay before reconnecting, doubled after each failed attempt up to
	// MaxBackoff (defaults 50ms and 5s).
	MinBackoff, MaxBackoff time.Duration
}

// Client is the VM side of the QubesDB vchan link, what the VM's
// qubesdb-daemon does (spec qubes.md 1.7): it connects to dom0, asks once
// per connection for the whole database (MULTIREAD), mirrors it into a DB,
// applies and acknowledges dom0's WRITE and RM, and sends the VM's own
// writes. A message from dom0 that breaks the protocol is logged and the
// link is reset; so is a dropped link. Every reconnection syncs again.
type Client struct {
	db      *DB
	connect Connect
	log     *slog.Logger
	minWait time.Duration
	maxWait time.Duration
	synced  chan struct{}
	once    sync.Once

	mu      sync.Mutex
	link    *link      // the synchronised link, nil otherwise
	pending []*request // our commands in the order sent, until dom0 answers
}

// request is a WRITE or RM of ours waiting for dom0's answer.
type request struct {
	op    MsgType
	path  string
	value string
	done  chan error // buffered: the answer never waits for the caller
}

// NewClient returns a client that mirrors dom0's database into db, using
// connect for every (re)connection. Call Run to start it.
func NewClient(db *DB, connect Connect, cfg ClientConfig) *Client {
	c := &Client{
		db:      db,
		connect: connect,
		log:     cfg.Logger,
		minWait: cfg.MinBackoff,
		maxWait: cfg.MaxBackoff,
		synced:  make(chan struct{}),
	}
	if c.log == nil {
		c.log = slog.Default()
	}
	if c.minWait <= 0 {
		c.minWait = defaultMinBackoff
	}
	if c.maxWait < c.minWait {
		c.maxWait = max(defaultMaxBackoff, c.minWait)
	}
	return c
}

// Synced is closed once the first sync with dom0 has completed.
func (c *Client) Synced() <-chan struct{} { return c.synced }

// Run connects, syncs and serves the link until ctx is done, reconnecting
// whenever the link fails. It returns ctx's error.
func (c *Client) Run(ctx context.Context) error {
	wait := c.minWait
	for {
		rwc, err := c.connect(ctx)
		if err == nil {
			var synced bool
			synced, err = c.serve(ctx, rwc)
			if synced {
				wait = c.minWait
			}
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		c.log.Warn("qubesdb: link to dom0 reset", "err", err, "retry_in", wait)
		t := time.NewTimer(wait)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		}
		wait = min(2*wait, c.maxWait)
	}
}

// serve runs one connection; synced reports whether it got past the sync.
func (c *Client) serve(ctx context.Context, rwc io.ReadWriteCloser) (synced bool, err error) {
	l := newLink(rwc, "dom0", clientQueueBytes)
	stop := context.AfterFunc(ctx, func() { l.close(ctx.Err()) })
	defer func() {
		stop()
		l.close(err)
		err = l.reason(err)
	}()

	if err := l.send(CmdMultiread, "", nil); err != nil {
		return false, err
	}
	entries, err := c.readSync(l)
	if err != nil {
		return false, err
	}
	if err := c.db.Replace(entries); err != nil {
		return false, fmt.Errorf("applying the sync from dom0: %w", err)
	}
	c.mu.Lock()
	c.link = l
	c.mu.Unlock()
	defer c.disconnect(l)
	c.once.Do(func() { close(c.synced) })
	c.log.Info("qubesdb: synchronised with dom0", "entries", len(entries))

	for {
		m, err := l.recv()
		if err != nil {
			return true, err
		}
		if err := c.handle(l, m); err != nil {
			return true, err
		}
	}
}

// readSync collects dom0's answer to our MULTIREAD, up to its terminator.
func (c *Client) readSync(l *link) ([]Entry, error) {
	var entries []Entry
	size := 0
	for {
		m, err := l.recv()
		if err != nil {
			return nil, err
		}
		if m.Type != RespMultiread {
			return nil, fmt.Errorf("%w: dom0 sent %v during the sync", ErrInvalid, m)
		}
		if err := CheckVchan(m); err != nil {
			return nil, fmt.Errorf("sync from dom0: %w", err)
		}
		if m.Path == "" {
			return entries, nil
		}
		size += len(m.Path) + len(m.Data)
		if len(entries) == c.db.limits.MaxEntries || size > c.db.limits.MaxBytes {
			return nil, fmt.Errorf("sync from dom0: %w: over %d entries or %d bytes",
				ErrFull, c.db.limits.MaxEntries, c.db.limits.MaxBytes)
		}
		entries = append(entries, Entry{Path: m.Path, Value: string(m.Data)})
	}
}

// handle processes one message from dom0 after the sync.
func (c *Client) handle(l *link, m Message) error {
	if err := CheckVchan(m); err != nil {
		return fmt.Errorf("from dom0: %w", err)
	}
	switch m.Type {
	case CmdWrite:
		if err := c.db.Write(m.Path, string(m.Data)); err != nil {
			return fmt.Errorf("applying WRITE from dom0: %w", err)
		}
		return l.send(RespOK, m.Path, nil)
	case CmdRm:
		if removed, _ := c.db.Rm(m.Path); !removed {
			// dom0 forwards only RMs that removed something, so the mirror
			// diverged; answer OK anyway, as dom0 treats NOENT as fatal.
			c.log.Warn("qubesdb: dom0 removed a path missing from the mirror", "path", m.Path)
		}
		return l.send(RespOK, m.Path, nil)
	case RespOK, RespError:
		return c.answer(m)
	default: // MULTIREAD, RESP_MULTIREAD
		return fmt.Errorf("%w: dom0 sent %v after the sync", ErrInvalid, m)
	}
}

// answer completes the oldest of our commands: dom0 answers in order.
func (c *Client) answer(m Message) error {
	c.mu.Lock()
	if len(c.pending) == 0 {
		c.mu.Unlock()
		return fmt.Errorf("%w: dom0 sent %v with no command outstanding", ErrInvalid, m)
	}
	req := c.pending[0]
	if req.path != m.Path {
		c.mu.Unlock()
		return fmt.Errorf("%w: dom0 answered %v to %v %q", ErrInvalid, m, req.op, req.path)
	}
	c.pending[0] = nil
	c.pending = c.pending[1:]
	c.mu.Unlock()

	if m.Type == RespError {
		req.done <- fmt.Errorf("dom0 refused %v %q", req.op, req.path)
		return nil
	}
	// Applied now, not when sent: what dom0 sent before this answer
	// happened before our command on dom0's side.
	var err error
	if req.op == CmdWrite {
		err = c.db.Write(req.path, req.value)
	} else {
		_, err = c.db.Rm(req.path)
	}
	req.done <- err
	return nil
}

// disconnect detaches a link that is going away and fails the commands
// still waiting on it.
func (c *Client) disconnect(l *link) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.link != l {
		return
	}
	for _, req := range c.pending {
		req.done <- fmt.Errorf("%v %q: %w: link reset before dom0 answered", req.op, req.path, ErrNotConnected)
	}
	c.link, c.pending = nil, nil
}

// Write stores value at path in dom0's database (for example
// /qubes-firewall-handled/<ip>) and, once dom0 accepted it, in the mirror.
func (c *Client) Write(ctx context.Context, path, value string) error {
	if err := CheckKey(path); err != nil {
		return err
	}
	if err := CheckValue(value); err != nil {
		return fmt.Errorf("write %q: %w", path, err)
	}
	return c.do(ctx, &request{op: CmdWrite, path: path, value: value})
}

// Rm removes path (a subtree if it ends with '/') from dom0's database and
// the mirror. dom0 treats an RM that removes nothing as fatal, so nothing is
// sent, and ErrNotFound returned, if the mirror has nothing there.
func (c *Client) Rm(ctx context.Context, path string) error {
	if err := CheckRmPath(path); err != nil {
		return err
	}
	exists := false
	if strings.HasSuffix(path, "/") {
		exists = len(c.db.Multiread(path)) > 0
	} else {
		_, exists = c.db.Read(path)
	}
	if !exists {
		return fmt.Errorf("rm %q: %w", path, ErrNotFound)
	}
	return c.do(ctx, &request{op: CmdRm, path: path})
}

// do sends a command and waits for dom0's answer.
func (c *Client) do(ctx context.Context, req *request) error {
	req.done = make(chan error, 1)
	c.mu.Lock()
	switch {
	case c.link == nil:
		c.mu.Unlock()
		return fmt.Errorf("%v %q: %w", req.op, req.path, ErrNotConnected)
	case len(c.pending) >= maxPending:
		c.mu.Unlock()
		return fmt.Errorf("%v %q: %d commands already wait for dom0", req.op, req.path, len(c.pending))
	}
	if err := c.link.send(req.op, req.path, []byte(req.value)); err != nil {
		c.mu.Unlock()
		return err
	}
	c.pending = append(c.pending, req)
	c.mu.Unlock()

	select {
	case err := <-req.done:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}
