package local

import (
	"context"
	"errors"
	"net"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"qfw/qubesdb"
)

// testDaemon is a QubesDB daemon's local socket side written from the spec
// (qubes.md 1.4-1.6), for testing the client: one lock serialises every
// command as the single-threaded daemon does, and watch events go to the
// connections that registered them, once per registration.
type testDaemon struct {
	db *qubesdb.DB

	mu      sync.Mutex
	watches map[net.Conn][]string
}

func newTestDaemon() *testDaemon {
	return &testDaemon{db: qubesdb.NewDB(qubesdb.Limits{}), watches: make(map[net.Conn][]string)}
}

// listen serves a unix socket in a temporary directory until the test ends.
func (d *testDaemon) listen(t *testing.T) string {
	path := filepath.Join(t.TempDir(), "qubesdb.sock")
	ln, err := net.Listen("unix", path)
	require.NoError(t, err)
	var wg sync.WaitGroup
	conns := make(map[net.Conn]bool)
	var connMu sync.Mutex
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			connMu.Lock()
			conns[c] = true
			connMu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				d.serve(c)
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		connMu.Lock()
		for c := range conns {
			c.Close()
		}
		connMu.Unlock()
		wg.Wait()
	})
	return path
}

func (d *testDaemon) serve(c net.Conn) {
	defer func() {
		d.mu.Lock()
		delete(d.watches, c)
		d.mu.Unlock()
		c.Close()
	}()
	for {
		m, err := qubesdb.ReadMessage(c)
		if err != nil {
			return
		}
		d.mu.Lock()
		err = d.handle(c, m)
		d.mu.Unlock()
		if err != nil {
			return
		}
	}
}

func reply(c net.Conn, t qubesdb.MsgType, path string, data string) error {
	return qubesdb.WriteMessage(c, qubesdb.Message{Type: t, Path: path, Data: []byte(data)})
}

// handle runs one command; d.mu is held.
func (d *testDaemon) handle(c net.Conn, m qubesdb.Message) error {
	if qubesdb.CheckPath(m.Path) != nil || m.Type > qubesdb.CmdUnwatch {
		return reply(c, qubesdb.RespError, m.Path, "")
	}
	if len(m.Data) > 0 && m.Type != qubesdb.CmdWrite {
		return reply(c, qubesdb.RespError, m.Path, "")
	}
	switch m.Type {
	case qubesdb.CmdRead:
		v, ok := d.db.Read(m.Path)
		if !ok {
			return reply(c, qubesdb.RespErrorNoent, m.Path, "")
		}
		return reply(c, qubesdb.RespRead, m.Path, v)
	case qubesdb.CmdWrite:
		if d.db.Write(m.Path, string(m.Data)) != nil {
			return reply(c, qubesdb.RespError, m.Path, "")
		}
		if err := reply(c, qubesdb.RespOK, m.Path, ""); err != nil {
			return err
		}
		d.fireLocked(m.Path)
		return nil
	case qubesdb.CmdRm:
		if removed, err := d.db.Rm(m.Path); err != nil || !removed {
			return reply(c, qubesdb.RespErrorNoent, m.Path, "")
		}
		if err := reply(c, qubesdb.RespOK, m.Path, ""); err != nil {
			return err
		}
		d.fireLocked(m.Path)
		return nil
	case qubesdb.CmdMultiread, qubesdb.CmdList:
		entries := d.db.Multiread(m.Path)
		if m.Path == "" {
			slices.Reverse(entries)
		}
		for _, e := range entries {
			var err error
			if m.Type == qubesdb.CmdList {
				err = reply(c, qubesdb.RespList, e.Path, "")
			} else {
				err = reply(c, qubesdb.RespMultiread, e.Path, e.Value)
			}
			if err != nil {
				return err
			}
		}
		if m.Type == qubesdb.CmdList {
			return reply(c, qubesdb.RespList, "", "")
		}
		return reply(c, qubesdb.RespMultiread, "", "")
	case qubesdb.CmdWatch:
		d.watches[c] = append(d.watches[c], m.Path)
		return reply(c, qubesdb.RespOK, m.Path, "")
	case qubesdb.CmdUnwatch:
		i := slices.Index(d.watches[c], m.Path)
		if i < 0 {
			return reply(c, qubesdb.RespErrorNoent, m.Path, "")
		}
		d.watches[c] = slices.Delete(d.watches[c], i, i+1)
		return reply(c, qubesdb.RespOK, m.Path, "")
	}
	return errors.New("unreachable")
}

// fireLocked sends RESP_WATCH for path to every matching registration.
func (d *testDaemon) fireLocked(path string) {
	for c, patterns := range d.watches {
		for _, p := range patterns {
			if path == p || strings.HasSuffix(p, "/") && strings.HasPrefix(path, p) {
				_ = reply(c, qubesdb.RespWatch, path, "")
			}
		}
	}
}

func testContext(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func dial(t *testing.T, ctx context.Context, path string) *Client {
	c, err := Dial(ctx, path)
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	return c
}

// pipeClient connects a client to the test playing the daemon by hand.
func pipeClient(t *testing.T, ctx context.Context, limits qubesdb.Limits) (*Client, net.Conn) {
	cli, daemon := net.Pipe()
	deadline, _ := ctx.Deadline()
	require.NoError(t, daemon.SetDeadline(deadline))
	c := New(cli, limits)
	t.Cleanup(func() {
		c.Close()
		daemon.Close()
	})
	return c, daemon
}
