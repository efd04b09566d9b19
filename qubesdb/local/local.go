// Package local is a client of a QubesDB daemon's unix socket, what a
// program inside an ordinary Linux qube uses (the daemon itself keeps the
// vchan to dom0). It speaks the local-socket commands (READ, WRITE,
// MULTIREAD, LIST, RM, WATCH, UNWATCH) and can mirror the daemon's database
// into a qubesdb.DB, so that the typed readers of package qubesdb work the
// same on both data planes.
package local

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"

	"qfw/qubesdb"
	"qfw/qubesdb/internal/evq"
)

// DefaultPath is the read-write socket of the VM's QubesDB daemon.
const DefaultPath = "/var/run/qubes/qubesdb.sock"

var (
	// ErrEventsLost is returned by NextEvent when watch events were
	// dropped because they were not read fast enough; re-read what the
	// watches cover.
	ErrEventsLost = errors.New("QubesDB watch events lost")
	// ErrRefused is wrapped by errors for commands the daemon answered
	// with RESP_ERROR.
	ErrRefused = errors.New("QubesDB daemon refused the command")
	errClosed  = errors.New("QubesDB client closed")
)

// Client is one connection to the daemon. Commands run one at a time;
// watch events arrive between them and are queued (bounded) for NextEvent.
// Any answer that breaks the protocol, and any command abandoned through
// its context, closes the client: the stream would be out of step.
type Client struct {
	conn   io.ReadWriteCloser
	limits qubesdb.Limits
	events *evq.Queue[string]
	done   chan struct{}

	cmd sync.Mutex // one command at a time

	mu  sync.Mutex
	cur *command // the command waiting for answers
	err error    // why the client closed
}

// command is a command in flight. Its answers are handled on the reading
// goroutine, which so knows, before it reads on, whether more are due.
type command struct {
	handle func(qubesdb.Message) (done bool, err error)
	result chan error // buffered
}

// Dial connects to the daemon's socket at path (usually DefaultPath).
func Dial(ctx context.Context, path string) (*Client, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, fmt.Errorf("connecting to QubesDB: %w", err)
	}
	return New(conn, qubesdb.DefaultLimits), nil
}

// New runs the protocol over conn. limits bounds the answers to MULTIREAD
// and LIST.
func New(conn io.ReadWriteCloser, limits qubesdb.Limits) *Client {
	c := &Client{
		conn:   conn,
		limits: limits,
		events: evq.New[string](qubesdb.WatchQueueLen),
		done:   make(chan struct{}),
	}
	go c.readLoop()
	return c
}

// Close closes the connection; the daemon drops its watches.
func (c *Client) Close() error {
	c.fail(errClosed)
	return nil
}

// fail closes the client; the first error is kept as the reason.
func (c *Client) fail(err error) {
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		return
	}
	c.err = err
	close(c.done)
	c.mu.Unlock()
	c.conn.Close()
	c.events.Close()
}

func (c *Client) reason() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

func (c *Client) readLoop() {
	for {
		m, err := qubesdb.ReadMessage(c.conn)
		if err != nil {
			c.fail(fmt.Errorf("reading from the QubesDB daemon: %w", err))
			return
		}
		if m.Type == qubesdb.RespWatch {
			if err := checkEvent(m); err != nil {
				c.fail(err)
				return
			}
			c.events.Push(m.Path)
			continue
		}
		c.mu.Lock()
		cmd := c.cur
		c.mu.Unlock()
		if cmd == nil {
			c.fail(fmt.Errorf("%w: daemon sent %v with no command outstanding", qubesdb.ErrInvalid, m))
			return
		}
		done, err := cmd.handle(m)
		if errors.Is(err, qubesdb.ErrInvalid) {
			c.fail(fmt.Errorf("answer from the QubesDB daemon: %w", err))
			return
		}
		if done || err != nil {
			c.mu.Lock()
			c.cur = nil
			c.mu.Unlock()
			cmd.result <- err
		}
	}
}

func checkEvent(m qubesdb.Message) error {
	if len(m.Data) != 0 || m.Path == "" {
		return fmt.Errorf("%w: watch event %v", qubesdb.ErrInvalid, m)
	}
	if err := qubesdb.CheckPath(m.Path); err != nil {
		return fmt.Errorf("watch event: %w", err)
	}
	return nil
}

// NextEvent waits for the next watch event and returns the path that
// changed, or ErrEventsLost.
func (c *Client) NextEvent(ctx context.Context) (string, error) {
	path, lost, err := c.events.Pop(ctx)
	switch {
	case lost:
		return "", ErrEventsLost
	case errors.Is(err, evq.ErrClosed):
		return "", c.reason()
	}
	return path, err
}

// roundTrip sends one command and feeds the answers to handle until it
// reports the command complete.
func (c *Client) roundTrip(ctx context.Context, t qubesdb.MsgType, path string, data []byte,
	handle func(qubesdb.Message) (done bool, err error)) error {
	c.cmd.Lock()
	defer c.cmd.Unlock()
	stop := context.AfterFunc(ctx, func() { c.fail(fmt.Errorf("%v %q abandoned: %w", t, path, ctx.Err())) })
	defer stop()

	cmd := &command{handle: handle, result: make(chan error, 1)}
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		return c.err
	}
	c.cur = cmd
	c.mu.Unlock()
	if err := qubesdb.WriteMessage(c.conn, qubesdb.Message{Type: t, Path: path, Data: data}); err != nil {
		c.fail(fmt.Errorf("sending %v %q: %w", t, path, err))
	}
	select {
	case err := <-cmd.result:
		return err
	case <-c.done:
		select {
		case err := <-cmd.result: // completed just before the close
			return err
		default:
			return c.reason()
		}
	}
}

// simple runs a command answered by a single header echoing its path.
func (c *Client) simple(ctx context.Context, t qubesdb.MsgType, path string, data []byte, ok ...qubesdb.MsgType) (qubesdb.Message, error) {
	var answer qubesdb.Message
	err := c.roundTrip(ctx, t, path, data, func(m qubesdb.Message) (bool, error) {
		switch {
		case m.Path != path:
			return true, fmt.Errorf("%w: %v", qubesdb.ErrInvalid, m)
		case m.Type == qubesdb.RespError && len(m.Data) == 0:
			return true, fmt.Errorf("%v %q: %w", t, path, ErrRefused)
		case m.Type == qubesdb.RespErrorNoent && len(m.Data) == 0:
			return true, fmt.Errorf("%v %q: %w", t, path, qubesdb.ErrNotFound)
		}
		for _, want := range ok {
			if m.Type == want {
				answer = m
				return true, nil
			}
		}
		return true, fmt.Errorf("%w: %v", qubesdb.ErrInvalid, m)
	})
	return answer, err
}

// Read returns the value at path, or an error wrapping qubesdb.ErrNotFound.
func (c *Client) Read(ctx context.Context, path string) (string, error) {
	if err := qubesdb.CheckKey(path); err != nil {
		return "", err
	}
	m, err := c.simple(ctx, qubesdb.CmdRead, path, nil, qubesdb.RespRead)
	if err != nil {
		return "", err
	}
	if err := qubesdb.CheckValue(m.Data); err != nil {
		c.fail(fmt.Errorf("answer to READ %q: %w", path, err))
		return "", c.reason()
	}
	return string(m.Data), nil
}

// Write stores value at path.
func (c *Client) Write(ctx context.Context, path, value string) error {
	if err := qubesdb.CheckKey(path); err != nil {
		return err
	}
	if err := qubesdb.CheckValue(value); err != nil {
		return fmt.Errorf("write %q: %w", path, err)
	}
	_, err := c.simple(ctx, qubesdb.CmdWrite, path, []byte(value), qubesdb.RespOK)
	return err
}

// Rm removes path, or the subtree if it ends with '/'; an error wraps
// qubesdb.ErrNotFound if nothing was there.
func (c *Client) Rm(ctx context.Context, path string) error {
	if err := qubesdb.CheckRmPath(path); err != nil {
		return err
	}
	_, err := c.simple(ctx, qubesdb.CmdRm, path, nil, qubesdb.RespOK)
	return err
}

// Watch asks for an event whenever path changes, or anything under it if
// it ends with '/'.
func (c *Client) Watch(ctx context.Context, path string) error {
	if err := checkPrefix(path); err != nil {
		return err
	}
	_, err := c.simple(ctx, qubesdb.CmdWatch, path, nil, qubesdb.RespOK)
	return err
}

// Unwatch removes one registration of Watch(path).
func (c *Client) Unwatch(ctx context.Context, path string) error {
	if err := checkPrefix(path); err != nil {
		return err
	}
	_, err := c.simple(ctx, qubesdb.CmdUnwatch, path, nil, qubesdb.RespOK)
	return err
}

// checkPrefix checks what the client library accepts for MULTIREAD, LIST
// and WATCH: a path starting with '/'.
func checkPrefix(p string) error {
	if err := qubesdb.CheckPath(p); err != nil {
		return err
	}
	if !strings.HasPrefix(p, "/") {
		return fmt.Errorf("%w: %q must start with '/'", qubesdb.ErrInvalid, p)
	}
	return nil
}

// stream runs MULTIREAD or LIST: answers of type want, each under prefix,
// until the terminator (empty path), at most limits.MaxEntries of them.
func (c *Client) stream(ctx context.Context, t, want qubesdb.MsgType, prefix string, add func(qubesdb.Message)) error {
	if err := checkPrefix(prefix); err != nil {
		return err
	}
	n, size := 0, 0
	return c.roundTrip(ctx, t, prefix, nil, func(m qubesdb.Message) (bool, error) {
		if m.Type == qubesdb.RespError && n == 0 && m.Path == prefix && len(m.Data) == 0 {
			return true, fmt.Errorf("%v %q: %w", t, prefix, ErrRefused)
		}
		if m.Type != want {
			return true, fmt.Errorf("%w: %v", qubesdb.ErrInvalid, m)
		}
		if m.Path == "" {
			if len(m.Data) != 0 {
				return true, fmt.Errorf("%w: terminator %v", qubesdb.ErrInvalid, m)
			}
			return true, nil
		}
		if err := qubesdb.CheckKey(m.Path); err != nil {
			return true, err
		}
		if !strings.HasPrefix(m.Path, prefix) {
			return true, fmt.Errorf("%w: %q is not under %q", qubesdb.ErrInvalid, m.Path, prefix)
		}
		if err := qubesdb.CheckValue(m.Data); err != nil {
			return true, fmt.Errorf("%q: %w", m.Path, err)
		}
		n++
		size += len(m.Path) + len(m.Data)
		if n > c.limits.MaxEntries || size > c.limits.MaxBytes {
			return true, fmt.Errorf("%w: answer over %d entries or %d bytes: %w",
				qubesdb.ErrInvalid, c.limits.MaxEntries, c.limits.MaxBytes, qubesdb.ErrFull)
		}
		add(m)
		return false, nil
	})
}

// Multiread returns the entries whose path starts with prefix.
func (c *Client) Multiread(ctx context.Context, prefix string) ([]qubesdb.Entry, error) {
	var entries []qubesdb.Entry
	err := c.stream(ctx, qubesdb.CmdMultiread, qubesdb.RespMultiread, prefix, func(m qubesdb.Message) {
		entries = append(entries, qubesdb.Entry{Path: m.Path, Value: string(m.Data)})
	})
	return entries, err
}

// List returns the paths that start with prefix.
func (c *Client) List(ctx context.Context, prefix string) ([]string, error) {
	var paths []string
	err := c.stream(ctx, qubesdb.CmdList, qubesdb.RespList, prefix, func(m qubesdb.Message) {
		paths = append(paths, m.Path)
	})
	return paths, err
}

// Follow mirrors the daemon's whole database into db until ctx is done or
// something fails: it watches "/", loads everything, then applies each
// change as its watch event arrives (re-reading the path), and loads
// everything again if events were lost. The typed readers and watches of
// package qubesdb then work on db as they do behind a vchan Client.
func (c *Client) Follow(ctx context.Context, db *qubesdb.DB) error {
	if err := c.Watch(ctx, "/"); err != nil {
		return err
	}
	for lost := true; ; {
		if lost {
			entries, err := c.Multiread(ctx, "/")
			if err != nil {
				return err
			}
			if err := db.Replace(entries); err != nil {
				return fmt.Errorf("mirroring QubesDB: %w", err)
			}
		}
		path, err := c.NextEvent(ctx)
		if lost = errors.Is(err, ErrEventsLost); lost {
			continue
		}
		if err != nil {
			return err
		}
		if err := c.apply(ctx, db, path); err != nil {
			return fmt.Errorf("mirroring QubesDB: %w", err)
		}
	}
}

// apply brings one changed path of db up to date with the daemon.
func (c *Client) apply(ctx context.Context, db *qubesdb.DB, path string) error {
	if strings.HasSuffix(path, "/") { // only an RM names a subtree
		_, err := db.Rm(path)
		return err
	}
	v, err := c.Read(ctx, path)
	switch {
	case err == nil:
		return db.Write(path, v)
	case errors.Is(err, qubesdb.ErrNotFound):
		_, err = db.Rm(path)
		return err
	}
	return err
}
