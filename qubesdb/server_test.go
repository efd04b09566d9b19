package qubesdb

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// fakeVM is the test playing the VM's daemon against a Server.
type fakeVM struct {
	t    *testing.T
	conn net.Conn
}

func serveFake(t *testing.T, ctx context.Context, s *Server) (*fakeVM, <-chan error) {
	vm, dom0 := net.Pipe()
	deadline, _ := ctx.Deadline()
	require.NoError(t, vm.SetDeadline(deadline))
	t.Cleanup(func() { vm.Close() })
	return &fakeVM{t: t, conn: vm}, runAsync(func() error { return s.Serve(ctx, dom0) })
}

func (v *fakeVM) send(msgs ...Message) {
	v.t.Helper()
	for _, m := range msgs {
		require.NoError(v.t, WriteMessage(v.conn, m))
	}
}

func (v *fakeVM) expect(want ...Message) {
	v.t.Helper()
	for _, w := range want {
		got, err := ReadMessage(v.conn)
		require.NoError(v.t, err)
		require.Equal(v.t, w, got)
	}
}

func (v *fakeVM) expectClosed() {
	v.t.Helper()
	_, err := ReadMessage(v.conn)
	require.ErrorIs(v.t, err, io.EOF)
}

func newTestServer(t *testing.T, limits Limits, kv ...string) (*Server, *DB, *logBuffer) {
	db := NewDB(limits)
	mustWrite(t, db, kv...)
	log, logs := testLogger()
	return NewServer(db, ServerConfig{Peer: "sys-firewall", Logger: log}), db, logs
}

func TestServerSyncAndForward(t *testing.T) {
	ctx := testContext(t)
	s, db, _ := newTestServer(t, Limits{},
		"/qubes-ip", "10.137.0.6",
		"/qubes-firewall/10.137.0.3", "",
		"/qubes-firewall/10.137.0.3/policy", "drop",
		"/qubes-firewall/10.137.0.3/0000", "action=accept")
	assert.ErrorIs(t, s.Flush(ctx), ErrNotConnected)
	vm, done := serveFake(t, ctx, s)

	// Written before the VM synced: stored, not forwarded, part of the sync.
	require.NoError(t, s.Write("/connected-ips", ""))
	vm.send(Message{Type: CmdMultiread})
	vm.expect(
		Message{Type: RespMultiread, Path: "/qubes-ip", Data: []byte("10.137.0.6")},
		Message{Type: RespMultiread, Path: "/qubes-firewall/10.137.0.3/policy", Data: []byte("drop")},
		Message{Type: RespMultiread, Path: "/qubes-firewall/10.137.0.3/0000", Data: []byte("action=accept")},
		Message{Type: RespMultiread, Path: "/qubes-firewall/10.137.0.3"},
		Message{Type: RespMultiread, Path: "/connected-ips"},
		Message{Type: RespMultiread},
	)

	require.NoError(t, s.Write("/connected-ips", "10.137.0.3"))
	require.NoError(t, s.Rm("/qubes-firewall/10.137.0.3/"))
	assert.ErrorIs(t, s.Rm("/qubes-firewall/10.137.0.3/"), ErrNotFound, "nothing left: not forwarded")
	assert.ErrorIs(t, s.Write("/bad/", ""), ErrInvalid)
	vm.expect(
		Message{Type: CmdWrite, Path: "/connected-ips", Data: []byte("10.137.0.3")},
		Message{Type: CmdRm, Path: "/qubes-firewall/10.137.0.3/"},
	)

	cancelled, cancel := context.WithCancel(ctx)
	cancel()
	assert.ErrorIs(t, s.Flush(cancelled), context.Canceled, "two commands unanswered")
	flushed := runAsync(func() error { return s.Flush(ctx) })
	vm.send(Message{Type: RespOK, Path: "/connected-ips"}, Message{Type: RespOK, Path: "/qubes-firewall/10.137.0.3/"})
	require.NoError(t, wait(t, ctx, flushed))

	// The VM's own writes are stored, fire dom0's watches, get RESP_OK,
	// and are not echoed back.
	w, err := db.Watch("/qubes-firewall-handled/")
	require.NoError(t, err)
	vm.send(Message{Type: CmdWrite, Path: "/qubes-firewall-handled/10.137.0.3", Data: []byte("1")})
	vm.expect(Message{Type: RespOK, Path: "/qubes-firewall-handled/10.137.0.3"})
	assert.Equal(t, Event{OpWrite, "/qubes-firewall-handled/10.137.0.3"}, nextEvent(t, ctx, w))
	vm.send(Message{Type: CmdRm, Path: "/qubes-firewall-handled/"})
	vm.expect(Message{Type: RespOK, Path: "/qubes-firewall-handled/"})
	assert.Equal(t, Event{OpRm, "/qubes-firewall-handled/"}, nextEvent(t, ctx, w))
	require.NoError(t, s.Write("/after", "x"))
	vm.expect(Message{Type: CmdWrite, Path: "/after", Data: []byte("x")})

	vm.conn.Close()
	assert.ErrorIs(t, wait(t, ctx, done), io.EOF)
	assert.ErrorIs(t, s.Flush(ctx), ErrNotConnected)
	require.NoError(t, s.Write("/offline", "x"), "writes still work without a VM")
}

func TestServerMultireadPrefixAscending(t *testing.T) {
	ctx := testContext(t)
	s, _, _ := newTestServer(t, Limits{}, "/a/2", "", "/a/1", "y", "/b", "")
	vm, done := serveFake(t, ctx, s)
	vm.send(Message{Type: CmdMultiread, Path: "/a/"})
	vm.expect(
		Message{Type: RespMultiread, Path: "/a/1", Data: []byte("y")},
		Message{Type: RespMultiread, Path: "/a/2"},
		Message{Type: RespMultiread},
	)
	vm.send(Message{Type: CmdMultiread})
	vm.expectClosed()
	assert.ErrorContains(t, wait(t, ctx, done), "second MULTIREAD")
}

func TestServerRecoverableErrors(t *testing.T) {
	ctx := testContext(t)
	s, db, logs := newTestServer(t, Limits{}, "/a", "1")
	vm, _ := serveFake(t, ctx, s)
	vm.send(Message{Type: CmdWrite, Path: "/a", Data: []byte("x\x00y")})
	vm.expect(Message{Type: RespError, Path: "/a"})
	vm.send(Message{Type: CmdRm, Path: "/a", Data: []byte("z")})
	vm.expect(Message{Type: RespError, Path: "/a"})
	vm.send(Message{Type: CmdWrite, Path: "/a", Data: []byte("2")})
	vm.expect(Message{Type: RespOK, Path: "/a"})
	v, _ := db.Read("/a")
	assert.Equal(t, "2", v)
	assert.Contains(t, logs.String(), "VM wrote a value with NUL")
	assert.Contains(t, logs.String(), "VM sent RM with data")
}

// TestServerFatal: what makes the dom0 daemon give up on its VM.
func TestServerFatal(t *testing.T) {
	m := func(ty MsgType, path, data string) []byte {
		return encode(Message{Type: ty, Path: path, Data: []byte(data)})
	}
	cases := []struct {
		name  string
		in    []byte
		reply *Message
		err   string
	}{
		{"RESP_MULTIREAD", m(RespMultiread, "/x", "v"), nil, "never asks for a sync"},
		{"READ", m(CmdRead, "/a", ""), nil, "READ is not allowed"},
		{"LIST", m(CmdList, "/", ""), nil, "LIST is not allowed"},
		{"WATCH", m(CmdWatch, "/", ""), nil, "WATCH is not allowed"},
		{"RESP_ERROR_NOENT", m(RespErrorNoent, "/a", ""), nil, "RESP_ERROR_NOENT is not allowed"},
		{"RESP_READ", m(RespRead, "/a", "v"), nil, "RESP_READ is not allowed"},
		{"unknown type", m(MsgType(200), "/a", ""), nil, "type(200)"},
		{"failed RM", m(CmdRm, "/missing", ""), &Message{Type: RespErrorNoent, Path: "/missing"}, "databases diverged"},
		{"failed subtree RM", m(CmdRm, "/missing/", ""), &Message{Type: RespErrorNoent, Path: "/missing/"}, "databases diverged"},
		{"RM empty path", m(CmdRm, "", ""), nil, "must start with"},
		{"WRITE trailing slash", m(CmdWrite, "/a/", "v"), &Message{Type: RespError, Path: "/a/"}, "must start and must not end"},
		{"WRITE relative", m(CmdWrite, "a", "v"), &Message{Type: RespError, Path: "a"}, "must start and must not end"},
		{"WRITE bad char", m(CmdWrite, "/a*", "v"), nil, "has byte 0x2a"},
		{"WRITE over limits", m(CmdWrite, "/new", "v"), &Message{Type: RespError, Path: "/new"}, "limits exceeded"},
		{"MULTIREAD with data", m(CmdMultiread, "", "x"), nil, "carries 1 data bytes"},
		{"RESP_OK with data", m(RespOK, "/a", "x"), nil, "carries 1 data bytes"},
		{"RESP_ERROR with data", m(RespError, "/a", "x"), nil, "carries 1 data bytes"},
		{"unterminated path", rawHeader(CmdWrite, strings.Repeat("b", 64), 0), nil, "not NUL-terminated"},
		{"data_len too big", rawHeader(CmdWrite, "/a", 5000), nil, "data_len 5000"},
	}
	for _, tt := range cases {
		t.Run(tt.name, func(t *testing.T) {
			ctx := testContext(t)
			s, db, _ := newTestServer(t, Limits{MaxEntries: 1}, "/a", "1")
			vm, done := serveFake(t, ctx, s)
			_, err := vm.conn.Write(tt.in)
			require.NoError(t, err)
			if tt.reply != nil {
				vm.expect(*tt.reply)
			}
			vm.expectClosed()
			err = wait(t, ctx, done)
			assert.ErrorContains(t, err, tt.err)
			assert.Contains(t, err.Error(), "sys-firewall", "errors name the VM")
			assert.Equal(t, []Entry{{"/a", "1"}}, db.Multiread(""))
		})
	}
}

func TestServerAnswersWithoutCommands(t *testing.T) {
	ctx := testContext(t)
	s, _, logs := newTestServer(t, Limits{})
	vm, _ := serveFake(t, ctx, s)
	vm.send(Message{Type: CmdMultiread})
	vm.expect(Message{Type: RespMultiread})
	vm.send(Message{Type: RespOK, Path: "/x"}, Message{Type: RespError, Path: "/y"})
	// The server handles messages in order: once this is answered, the
	// two above have been handled.
	vm.send(Message{Type: CmdWrite, Path: "/barrier"})
	vm.expect(Message{Type: RespOK, Path: "/barrier"})
	require.NoError(t, s.Write("/z", ""))
	vm.expect(Message{Type: CmdWrite, Path: "/z"})
	assert.Contains(t, logs.String(), "no command outstanding")
	assert.Contains(t, logs.String(), "VM refused a forwarded command")
}

func TestServerScriptRuleEdit(t *testing.T) {
	ctx := testContext(t)
	s, db, _ := newTestServer(t, Limits{})
	vm, _ := serveFake(t, ctx, s)
	vm.send(Message{Type: CmdMultiread})
	vm.expect(Message{Type: RespMultiread})

	// First edit: nothing to remove, so no RM reaches the VM.
	require.NoError(t, s.ScriptRuleEdit("10.137.0.3", "drop", map[string]string{
		"0002": "action=accept proto=udp",
		"0000": "action=drop proto=icmp",
	}))
	vm.expect(
		Message{Type: CmdWrite, Path: "/qubes-firewall/10.137.0.3/policy", Data: []byte("drop")},
		Message{Type: CmdWrite, Path: "/qubes-firewall/10.137.0.3/0000", Data: []byte("action=drop proto=icmp")},
		Message{Type: CmdWrite, Path: "/qubes-firewall/10.137.0.3/0002", Data: []byte("action=accept proto=udp")},
		Message{Type: CmdWrite, Path: "/qubes-firewall/10.137.0.3"},
	)
	require.NoError(t, s.ScriptRuleEdit("fd09:24ef:4179::a89:3", "drop", map[string]string{"0000": "action=accept"}))
	vm.expect(
		Message{Type: CmdWrite, Path: "/qubes-firewall/fd09:24ef:4179::a89:3/policy", Data: []byte("drop")},
		Message{Type: CmdWrite, Path: "/qubes-firewall/fd09:24ef:4179::a89:3/0000", Data: []byte("action=accept")},
		Message{Type: CmdWrite, Path: "/qubes-firewall/fd09:24ef:4179::a89:3"},
	)
	// Second edit: the old subtree goes first, the commit key stays.
	require.NoError(t, s.ScriptRuleEdit("10.137.0.3", "drop", nil))
	vm.expect(
		Message{Type: CmdRm, Path: "/qubes-firewall/10.137.0.3/"},
		Message{Type: CmdWrite, Path: "/qubes-firewall/10.137.0.3/policy", Data: []byte("drop")},
		Message{Type: CmdWrite, Path: "/qubes-firewall/10.137.0.3"},
	)
	assert.Equal(t, map[string]string{"policy": "drop"}, FirewallRules(db, "10.137.0.3"))

	for _, ip := range []string{"", "10.137.0.3/x", "10.137.0.3 x", strings.Repeat("1", 60)} {
		assert.ErrorIs(t, s.ScriptRuleEdit(ip, "drop", nil), ErrInvalid, "%q", ip)
	}
	assert.ErrorIs(t, s.ScriptRuleEdit("10.137.0.4", "drop", map[string]string{"bad key": "x"}), ErrInvalid)
	assert.ErrorIs(t, s.ScriptRuleEdit("10.137.0.4", "nul\x00", nil), ErrInvalid)
}

func TestServerFlushSeesDrop(t *testing.T) {
	ctx := testContext(t)
	s, _, _ := newTestServer(t, Limits{})
	vm, done := serveFake(t, ctx, s)
	vm.send(Message{Type: CmdMultiread})
	vm.expect(Message{Type: RespMultiread})
	require.NoError(t, s.Write("/x", ""))
	vm.expect(Message{Type: CmdWrite, Path: "/x"})
	flushed := runAsync(func() error { return s.Flush(ctx) })
	vm.conn.Close()
	assert.Error(t, wait(t, ctx, flushed))
	wait(t, ctx, done)
}

func TestServerRun(t *testing.T) {
	ctx := testContext(t)
	s, _, logs := newTestServer(t, Limits{}, "/a", "1")
	conns := make(chan io.ReadWriteCloser)
	failAccept := errors.New("hypervisor gone")
	accept := func(ctx context.Context) (io.ReadWriteCloser, error) {
		select {
		case c, ok := <-conns:
			if !ok {
				return nil, failAccept
			}
			return c, nil
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	done := runAsync(func() error { return s.Run(ctx, accept) })
	for range 2 { // the second connection shows Run listens again
		vm, dom0 := net.Pipe()
		conns <- dom0
		v := &fakeVM{t: t, conn: vm}
		v.send(Message{Type: CmdMultiread})
		v.expect(Message{Type: RespMultiread, Path: "/a", Data: []byte("1")}, Message{Type: RespMultiread})
		vm.Close()
	}
	close(conns)
	assert.ErrorIs(t, wait(t, ctx, done), failAccept)
	assert.Contains(t, logs.String(), "listening again")

	cancelled, cancel := context.WithCancel(ctx)
	cancel()
	assert.ErrorIs(t, s.Run(cancelled, accept), context.Canceled)
}

// FuzzServer feeds arbitrary bytes from "the VM" to a Server connection: no
// panic, the database stays within its limits, and dom0 only ever answers.
func FuzzServer(f *testing.F) {
	f.Add(encode(Message{Type: CmdMultiread}))
	f.Add(encode(Message{Type: CmdMultiread},
		Message{Type: CmdWrite, Path: "/qubes-firewall-handled/10.137.0.3", Data: []byte("1")},
		Message{Type: CmdRm, Path: "/a"},
		Message{Type: RespOK, Path: "/x"},
		Message{Type: CmdWrite, Path: "/a", Data: []byte("\x00")},
		Message{Type: CmdMultiread}))
	f.Add(encode(Message{Type: CmdRm, Path: "/nope/"}))
	f.Add(rawHeader(CmdWrite, "/a", 0xfffffff0))
	f.Fuzz(func(t *testing.T, in []byte) {
		db := NewDB(Limits{MaxEntries: 8, MaxBytes: 512})
		mustWrite(t, db, "/a", "1", "/b/c", "2")
		s := NewServer(db, ServerConfig{Logger: discardLogger})
		conn := &fuzzConn{r: bytes.NewReader(in)}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if s.Serve(ctx, conn) == nil {
			t.Fatal("Serve returned without a reason")
		}
		if db.Len() > 8 {
			t.Fatalf("database grew to %d entries", db.Len())
		}
		out := bytes.NewReader(conn.written())
		for {
			m, err := ReadMessage(out)
			if err != nil {
				break
			}
			switch m.Type {
			case RespOK, RespError, RespErrorNoent, RespMultiread:
			default:
				t.Fatalf("dom0 sent %v unprompted", m)
			}
		}
	})
}
