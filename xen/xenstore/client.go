package xenstore

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strconv"
	"sync"
)

// Error is a failed request: the operation, the path (if any) and the cause,
// which is an Errno when the server answered with ERROR.
type Error struct {
	Op   Op
	Path string
	Err  error
}

func (e *Error) Error() string {
	if e.Path == "" {
		return fmt.Sprintf("xenstore %s: %v", e.Op, e.Err)
	}
	return fmt.Sprintf("xenstore %s %s: %v", e.Op, e.Path, e.Err)
}

func (e *Error) Unwrap() error { return e.Err }

// ErrClosed is returned by requests on a closed client.
var ErrClosed = errors.New("xenstore: client closed")

// maxTxAttempts bounds how often Transaction reruns its function on EAGAIN.
const maxTxAttempts = 32

type reply struct {
	op      Op
	payload []byte
}

// Client is a xenstore connection. Requests may be issued concurrently; each
// waits for its own reply (matched on req_id). A background goroutine reads
// replies and watch events until the transport fails or Close is called.
type Client struct {
	ops
	rw io.ReadWriteCloser

	wmu  sync.Mutex // one whole message per Write, as /dev/xen/xenbus wants
	wbuf []byte

	mu        sync.Mutex
	nextReq   uint32
	pending   map[uint32]chan reply
	watches   map[string]*Watch // by token
	nextToken uint64
	err       error // why the connection ended; nil while it is up
	done      chan struct{}
}

// NewClient starts a client over rw, which must deliver the server's messages
// in order and accept one whole message per Write.
func NewClient(rw io.ReadWriteCloser) *Client {
	c := &Client{
		rw:      rw,
		pending: make(map[uint32]chan reply),
		watches: make(map[string]*Watch),
		done:    make(chan struct{}),
	}
	c.ops = ops{c: c}
	go c.readLoop()
	return c
}

// Close ends the connection; pending and later requests fail with ErrClosed
// and watch channels are closed.
func (c *Client) Close() error {
	c.fail(ErrClosed)
	err := c.rw.Close()
	<-c.done
	return err
}

// Done is closed when the connection has ended; Err then says why.
func (c *Client) Done() <-chan struct{} { return c.done }

// Err returns why the connection ended, or nil while it is up.
func (c *Client) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

func (c *Client) fail(err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err == nil {
		c.err = err
	}
}

func (c *Client) readLoop() {
	buf := make([]byte, HeaderLen+MaxPayload)
	for {
		m, err := ReadMsg(c.rw, buf)
		if err != nil {
			c.fail(fmt.Errorf("xenstore: connection lost: %w", err))
			break
		}
		if m.Op == OpWatchEvent {
			// req_id of events is garbage on /dev/xen/xenbus: dispatch on type.
			c.dispatchEvent(m.Payload)
			continue
		}
		c.mu.Lock()
		ch := c.pending[m.ReqID]
		delete(c.pending, m.ReqID)
		c.mu.Unlock()
		if ch != nil { // else the caller gave up waiting
			ch <- reply{op: m.Op, payload: append([]byte(nil), m.Payload...)}
		}
	}
	c.rw.Close()
	c.mu.Lock()
	for id, ch := range c.pending {
		close(ch)
		delete(c.pending, id)
	}
	ws := c.watches
	c.watches = nil
	c.mu.Unlock()
	for _, w := range ws {
		w.stop()
	}
	close(c.done)
}

func (c *Client) dispatchEvent(p []byte) {
	path, token, err := ParseWatchEvent(p)
	if err != nil {
		return // a malformed event names no watch we could tell
	}
	c.mu.Lock()
	w := c.watches[token]
	c.mu.Unlock()
	if w != nil {
		w.deliver(path)
	}
}

// request sends one message and waits for its reply. An ERROR reply becomes
// an Errno; a reply of another type than the request is a protocol error.
func (c *Client) request(ctx context.Context, op Op, tx uint32, path string, payload []byte) ([]byte, error) {
	ch := make(chan reply, 1)
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return nil, &Error{op, path, err}
	}
	c.nextReq++
	id := c.nextReq
	c.pending[id] = ch
	c.mu.Unlock()

	c.wmu.Lock()
	var err error
	c.wbuf, err = AppendMsg(c.wbuf[:0], Msg{Op: op, ReqID: id, TxID: tx, Payload: payload})
	if err == nil {
		_, err = c.rw.Write(c.wbuf)
	}
	c.wmu.Unlock()
	if err != nil {
		c.forget(id)
		return nil, &Error{op, path, err}
	}

	select {
	case r, ok := <-ch:
		if !ok {
			return nil, &Error{op, path, c.Err()}
		}
		if r.op == OpError {
			errno, err := ParseError(r.payload)
			if err != nil {
				return nil, &Error{op, path, err}
			}
			return nil, &Error{op, path, errno}
		}
		if r.op != op {
			return nil, &Error{op, path, fmt.Errorf("%w: reply of type %s", ErrMalformed, r.op)}
		}
		return r.payload, nil
	case <-ctx.Done():
		c.forget(id)
		return nil, &Error{op, path, ctx.Err()}
	}
}

func (c *Client) forget(id uint32) {
	c.mu.Lock()
	delete(c.pending, id)
	c.mu.Unlock()
}

// ops holds the requests that may run inside a transaction (tx != 0) or
// outside one (tx == 0).
type ops struct {
	c  *Client
	tx uint32
}

func (o ops) pathReq(ctx context.Context, op Op, path string) ([]byte, error) {
	return o.c.request(ctx, op, o.tx, path, AppendStrings(nil, path))
}

func (o ops) expectOK(ctx context.Context, op Op, path string, payload []byte) error {
	_, err := o.c.request(ctx, op, o.tx, path, payload)
	return err
}

// Read returns the value of path.
func (o ops) Read(ctx context.Context, path string) ([]byte, error) {
	return o.pathReq(ctx, OpRead, path)
}

// Write sets the value of path, creating it and missing parents.
func (o ops) Write(ctx context.Context, path string, value []byte) error {
	return o.expectOK(ctx, OpWrite, path, append(AppendStrings(nil, path), value...))
}

// Mkdir creates path (with an empty value) if it does not exist.
func (o ops) Mkdir(ctx context.Context, path string) error {
	return o.expectOK(ctx, OpMkdir, path, AppendStrings(nil, path))
}

// Rm removes path and everything below it. A missing path is not an error
// as long as its parent exists.
func (o ops) Rm(ctx context.Context, path string) error {
	return o.expectOK(ctx, OpRm, path, AppendStrings(nil, path))
}

// Directory lists the names of the children of path.
func (o ops) Directory(ctx context.Context, path string) ([]string, error) {
	p, err := o.pathReq(ctx, OpDirectory, path)
	if err != nil {
		return nil, err
	}
	ss, err := Strings(p)
	if err != nil {
		return nil, &Error{OpDirectory, path, err}
	}
	return ss, nil
}

// GetPerms returns the permission list of path; the first entry is the owner.
func (o ops) GetPerms(ctx context.Context, path string) ([]Perm, error) {
	p, err := o.pathReq(ctx, OpGetPerms, path)
	if err != nil {
		return nil, err
	}
	ss, err := Strings(p)
	if err == nil {
		var ps []Perm
		if ps, err = ParsePerms(ss); err == nil {
			return ps, nil
		}
	}
	return nil, &Error{OpGetPerms, path, err}
}

// SetPerms replaces the permission list of path; perms[0] is the owner and
// the default for domains not listed.
func (o ops) SetPerms(ctx context.Context, path string, perms ...Perm) error {
	p := AppendStrings(nil, path)
	for _, pm := range perms {
		p = AppendStrings(p, pm.String())
	}
	return o.expectOK(ctx, OpSetPerms, path, p)
}

// Tx is an open transaction: its requests see a snapshot and take effect
// together when Transaction commits them.
type Tx struct{ ops }

// Transaction runs fn inside a transaction and commits it. When the commit
// (or a request inside fn) fails with EAGAIN because another connection
// changed what fn touched, fn runs again in a new transaction, at most 32
// times. Any other error from fn aborts the transaction and is returned.
func (c *Client) Transaction(ctx context.Context, fn func(tx *Tx) error) error {
	var err error
	for range maxTxAttempts {
		var p []byte
		p, err = c.request(ctx, OpTransactionStart, 0, "", AppendStrings(nil, ""))
		if err != nil {
			return err
		}
		id, perr := FirstString(p)
		n, nerr := strconv.ParseUint(id, 10, 32)
		if perr != nil || nerr != nil || n == 0 {
			return &Error{OpTransactionStart, "", fmt.Errorf("%w: transaction id %q", ErrMalformed, id)}
		}
		tx := &Tx{ops{c: c, tx: uint32(n)}}
		if err = fn(tx); err != nil {
			// Abort; its error adds nothing to fn's, and a lost abort only
			// leaves a transaction the server reaps with the connection.
			_, _ = c.request(ctx, OpTransactionEnd, tx.tx, "", AppendStrings(nil, "F"))
			if errors.Is(err, EAGAIN) {
				continue
			}
			return err
		}
		_, err = c.request(ctx, OpTransactionEnd, tx.tx, "", AppendStrings(nil, "T"))
		if !errors.Is(err, EAGAIN) {
			return err
		}
	}
	return fmt.Errorf("xenstore: transaction still conflicting after %d attempts: %w", maxTxAttempts, err)
}

// GetDomainPath returns the home path of domain d, "/local/domain/<d>".
func (c *Client) GetDomainPath(ctx context.Context, d DomID) (string, error) {
	p, err := c.request(ctx, OpGetDomainPath, 0, "", AppendStrings(nil, strconv.Itoa(int(d))))
	if err != nil {
		return "", err
	}
	s, err := FirstString(p)
	if err != nil {
		return "", &Error{OpGetDomainPath, "", err}
	}
	return s, nil
}

// IsDomainIntroduced reports whether domain d exists.
func (c *Client) IsDomainIntroduced(ctx context.Context, d DomID) (bool, error) {
	p, err := c.request(ctx, OpIsDomainIntroduced, 0, "", AppendStrings(nil, strconv.Itoa(int(d))))
	if err != nil {
		return false, err
	}
	s, err := FirstString(p)
	if err != nil || (s != "T" && s != "F") {
		return false, &Error{OpIsDomainIntroduced, "", fmt.Errorf("%w: answer %q", ErrMalformed, s)}
	}
	return s == "T", nil
}
