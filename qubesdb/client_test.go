package qubesdb

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// startClient runs a Client on p until the test ends.
func startClient(t *testing.T, ctx context.Context, db *DB, p *pipes) (*Client, *logBuffer) {
	t.Helper()
	log, buf := testLogger()
	c := NewClient(db, p.connect, ClientConfig{Logger: log, MinBackoff: time.Millisecond})
	runCtx, cancel := context.WithCancel(ctx)
	done := runAsync(func() error { return c.Run(runCtx) })
	t.Cleanup(func() {
		cancel()
		assert.ErrorIs(t, wait(t, ctx, done), context.Canceled)
	})
	return c, buf
}

// fakeDom0 is the test playing dom0 on one connection.
type fakeDom0 struct {
	t    *testing.T
	conn net.Conn
}

func dom0Conn(t *testing.T, ctx context.Context, p *pipes) *fakeDom0 {
	conn := p.nextConn(t, ctx)
	deadline, _ := ctx.Deadline()
	require.NoError(t, conn.SetDeadline(deadline))
	return &fakeDom0{t: t, conn: conn}
}

func (d *fakeDom0) send(msgs ...Message) {
	d.t.Helper()
	for _, m := range msgs {
		require.NoError(d.t, WriteMessage(d.conn, m))
	}
}

func (d *fakeDom0) expect(want Message) {
	d.t.Helper()
	got, err := ReadMessage(d.conn)
	require.NoError(d.t, err)
	require.Equal(d.t, want, got)
}

// sync expects the VM's MULTIREAD and answers it with entries.
func (d *fakeDom0) sync(entries ...Entry) {
	d.t.Helper()
	d.expect(Message{Type: CmdMultiread})
	for _, e := range entries {
		d.send(Message{Type: RespMultiread, Path: e.Path, Data: []byte(e.Value)})
	}
	d.send(Message{Type: RespMultiread})
}

// drain reads what the VM sends until it closes the link.
func (d *fakeDom0) drain() []Message {
	var msgs []Message
	for {
		m, err := ReadMessage(d.conn)
		if err != nil {
			require.ErrorIs(d.t, err, io.EOF, "the VM must close the link, not let it time out")
			return msgs
		}
		msgs = append(msgs, m)
	}
}

func waitSynced(t *testing.T, ctx context.Context, c *Client) {
	t.Helper()
	select {
	case <-c.Synced():
	case <-ctx.Done():
		require.FailNow(t, "client never synced")
	}
}

var firstSync = []Entry{
	{"/qubes-ip", "10.137.0.6"},
	{"/qubes-firewall/10.137.0.3/policy", "drop"},
	{"/qubes-firewall/10.137.0.3/0000", "action=accept"},
	{"/qubes-firewall/10.137.0.3", ""},
	{"/connected-ips", "10.137.0.3"},
}

func TestClientSyncAndDom0Commands(t *testing.T) {
	ctx := testContext(t)
	db := NewDB(Limits{})
	fw, err := WatchFirewall(db)
	require.NoError(t, err)
	p := newPipes(1)
	c, logs := startClient(t, ctx, db, p)
	d := dom0Conn(t, ctx, p)

	d.sync(firstSync...)
	waitSynced(t, ctx, c)
	assert.Equal(t, []Entry{
		{"/connected-ips", "10.137.0.3"},
		{"/qubes-firewall/10.137.0.3", ""},
		{"/qubes-firewall/10.137.0.3/0000", "action=accept"},
		{"/qubes-firewall/10.137.0.3/policy", "drop"},
		{"/qubes-ip", "10.137.0.6"},
	}, db.Multiread(""))
	assert.Equal(t, FirewallEvent{Kind: RulesCommitted, ClientIP: "10.137.0.3"}, nextFirewall(t, ctx, fw), "sync reports the rules")
	assert.Equal(t, FirewallEvent{Kind: ConnectedIPsChanged, Family: 4}, nextFirewall(t, ctx, fw))

	d.send(Message{Type: CmdWrite, Path: "/connected-ips", Data: []byte("10.137.0.3 10.137.0.9")})
	d.expect(Message{Type: RespOK, Path: "/connected-ips"})
	v, _ := db.Read("/connected-ips")
	assert.Equal(t, "10.137.0.3 10.137.0.9", v)

	d.send(Message{Type: CmdRm, Path: "/qubes-firewall/10.137.0.3/"})
	d.expect(Message{Type: RespOK, Path: "/qubes-firewall/10.137.0.3/"})
	assert.Nil(t, FirewallRules(db, "10.137.0.3"))

	// Never RESP_ERROR_NOENT on the vchan: dom0 would kill its daemon.
	d.send(Message{Type: CmdRm, Path: "/not/there"})
	d.expect(Message{Type: RespOK, Path: "/not/there"})
	assert.Contains(t, logs.String(), "dom0 removed a path missing from the mirror")

	d.send(Message{Type: CmdWrite, Path: "/qubes-firewall/10.137.0.3", Data: nil})
	d.expect(Message{Type: RespOK, Path: "/qubes-firewall/10.137.0.3"})
	assert.Equal(t, FirewallEvent{Kind: ConnectedIPsChanged, Family: 4}, nextFirewall(t, ctx, fw))
	assert.Equal(t, FirewallEvent{Kind: RulesCommitted, ClientIP: "10.137.0.3"}, nextFirewall(t, ctx, fw))
}

func TestClientOwnWritesAndRms(t *testing.T) {
	ctx := testContext(t)
	db := NewDB(Limits{})
	p := newPipes(1)
	c, _ := startClient(t, ctx, db, p)
	d := dom0Conn(t, ctx, p)
	d.sync(firstSync...)
	waitSynced(t, ctx, c)

	// Accepted write: the mirror changes only once dom0 said OK.
	done := runAsync(func() error { return c.Write(ctx, "/qubes-firewall-handled/10.137.0.3", "1") })
	d.expect(Message{Type: CmdWrite, Path: "/qubes-firewall-handled/10.137.0.3", Data: []byte("1")})
	_, ok := db.Read("/qubes-firewall-handled/10.137.0.3")
	assert.False(t, ok)
	// A dom0 command that crosses our write is applied first.
	d.send(Message{Type: CmdWrite, Path: "/qubes-firewall-handled/10.137.0.3", Data: []byte("0")})
	d.send(Message{Type: RespOK, Path: "/qubes-firewall-handled/10.137.0.3"})
	d.expect(Message{Type: RespOK, Path: "/qubes-firewall-handled/10.137.0.3"})
	require.NoError(t, wait(t, ctx, done))
	v, _ := db.Read("/qubes-firewall-handled/10.137.0.3")
	assert.Equal(t, "1", v)

	// Refused write: error, mirror unchanged.
	done = runAsync(func() error { return c.Write(ctx, "/qubes-iptables-error", "x") })
	d.expect(Message{Type: CmdWrite, Path: "/qubes-iptables-error", Data: []byte("x")})
	d.send(Message{Type: RespError, Path: "/qubes-iptables-error"})
	assert.ErrorContains(t, wait(t, ctx, done), `dom0 refused WRITE "/qubes-iptables-error"`)
	_, ok = db.Read("/qubes-iptables-error")
	assert.False(t, ok)

	// RM of a subtree the mirror has.
	done = runAsync(func() error { return c.Rm(ctx, "/qubes-firewall/10.137.0.3/") })
	d.expect(Message{Type: CmdRm, Path: "/qubes-firewall/10.137.0.3/"})
	d.send(Message{Type: RespOK, Path: "/qubes-firewall/10.137.0.3/"})
	require.NoError(t, wait(t, ctx, done))
	assert.Nil(t, FirewallRules(db, "10.137.0.3"))

	// RMs of what the mirror lacks are not sent: the next message dom0
	// sees is the write that follows them.
	assert.ErrorIs(t, c.Rm(ctx, "/qubes-firewall/10.137.0.3/"), ErrNotFound)
	assert.ErrorIs(t, c.Rm(ctx, "/nothing"), ErrNotFound)
	done = runAsync(func() error { return c.Write(ctx, "/dns/10.137.0.3/example.com", "93.184.215.14") })
	d.expect(Message{Type: CmdWrite, Path: "/dns/10.137.0.3/example.com", Data: []byte("93.184.215.14")})
	d.send(Message{Type: RespOK, Path: "/dns/10.137.0.3/example.com"})
	require.NoError(t, wait(t, ctx, done))

	// Invalid input never reaches dom0.
	assert.ErrorIs(t, c.Write(ctx, "/a/", ""), ErrInvalid)
	assert.ErrorIs(t, c.Write(ctx, "/"+strings.Repeat("h", 64), ""), ErrInvalid)
	assert.ErrorIs(t, c.Write(ctx, "/a", "nul\x00"), ErrInvalid)
	assert.ErrorIs(t, c.Write(ctx, "/a", strings.Repeat("v", MaxValueLen+1)), ErrInvalid)
	assert.ErrorIs(t, c.Rm(ctx, "relative"), ErrInvalid)
}

func TestClientCommandsWithoutLink(t *testing.T) {
	ctx := testContext(t)
	db := NewDB(Limits{})
	mustWrite(t, db, "/a", "1")
	c := NewClient(db, newPipes(0).connect, ClientConfig{})
	assert.ErrorIs(t, c.Write(ctx, "/a", "2"), ErrNotConnected)
	assert.ErrorIs(t, c.Rm(ctx, "/a"), ErrNotConnected)
	select {
	case <-c.Synced():
		t.Fatal("Synced closed without a sync")
	default:
	}
}

func TestClientPendingBound(t *testing.T) {
	ctx := testContext(t)
	p := newPipes(1)
	c, _ := startClient(t, ctx, NewDB(Limits{}), p)
	d := dom0Conn(t, ctx, p)
	d.sync()
	waitSynced(t, ctx, c)

	// dom0 reads but never answers: callers give up, their commands stay
	// outstanding, and the number outstanding is bounded.
	go func() {
		for {
			if _, err := ReadMessage(d.conn); err != nil {
				return
			}
		}
	}()
	gaveUp, cancel := context.WithCancel(ctx)
	cancel()
	for i := range maxPending {
		assert.ErrorIs(t, c.Write(gaveUp, fmt.Sprintf("/k%d", i), ""), context.Canceled)
	}
	assert.ErrorContains(t, c.Write(ctx, "/one-more", ""), "already wait for dom0")
}

func TestClientWriteFailsWhenLinkDrops(t *testing.T) {
	ctx := testContext(t)
	p := newPipes(1)
	c, _ := startClient(t, ctx, NewDB(Limits{}), p)
	d := dom0Conn(t, ctx, p)
	d.sync()
	waitSynced(t, ctx, c)
	done := runAsync(func() error { return c.Write(ctx, "/waiting", "") })
	// The command is recorded as outstanding under the same lock that
	// queues it, so once dom0 has read it a drop must fail it.
	d.expect(Message{Type: CmdWrite, Path: "/waiting"})
	d.conn.Close()
	assert.ErrorIs(t, wait(t, ctx, done), ErrNotConnected)
}

// TestClientHostileDom0 sends one bad thing per case and checks that the
// client logs it, drops the link, keeps its mirror, and reconnects; and
// that it never sent anything but one MULTIREAD and RESP_OKs.
func TestClientHostileDom0(t *testing.T) {
	hdr := func(ty MsgType, path string, n uint32) []byte { return rawHeader(ty, path, n) }
	type tc struct {
		name     string
		inSync   bool     // sent instead of the sync's terminator
		msg      *Message // or raw bytes
		raw      []byte
		logMatch string
	}
	m := func(ty MsgType, path, data string) *Message {
		return &Message{Type: ty, Path: path, Data: []byte(data)}
	}
	cases := []tc{
		{name: "RESP_ERROR_NOENT", msg: m(RespErrorNoent, "/a", ""), logMatch: "not allowed on the vchan"},
		{name: "READ", msg: m(CmdRead, "/qubes-ip", ""), logMatch: "READ is not allowed"},
		{name: "LIST", msg: m(CmdList, "/", ""), logMatch: "LIST is not allowed"},
		{name: "WATCH", msg: m(CmdWatch, "/", ""), logMatch: "WATCH is not allowed"},
		{name: "UNWATCH", msg: m(CmdUnwatch, "/", ""), logMatch: "UNWATCH is not allowed"},
		{name: "RESP_READ", msg: m(RespRead, "/a", "x"), logMatch: "RESP_READ is not allowed"},
		{name: "RESP_LIST", msg: m(RespList, "/a", ""), logMatch: "RESP_LIST is not allowed"},
		{name: "RESP_WATCH", msg: m(RespWatch, "/a", ""), logMatch: "RESP_WATCH is not allowed"},
		{name: "unknown type", msg: m(MsgType(0x42), "/a", ""), logMatch: "type(66) is not allowed"},
		{name: "MULTIREAD from dom0", msg: m(CmdMultiread, "", ""), logMatch: "dom0 sent MULTIREAD"},
		{name: "RESP_MULTIREAD after sync", msg: m(RespMultiread, "/x", "v"), logMatch: "dom0 sent RESP_MULTIREAD"},
		{name: "RESP_OK unasked", msg: m(RespOK, "/a", ""), logMatch: "no command outstanding"},
		{name: "RESP_ERROR unasked", msg: m(RespError, "/a", ""), logMatch: "no command outstanding"},
		{name: "RESP_OK with data", msg: m(RespOK, "/a", "x"), logMatch: "carries 1 data bytes"},
		{name: "WRITE trailing slash", msg: m(CmdWrite, "/qubes-ip/", "x"), logMatch: "must start and must not end"},
		{name: "WRITE relative", msg: m(CmdWrite, "qubes-ip", "x"), logMatch: "must start and must not end"},
		{name: "WRITE bad char", msg: m(CmdWrite, "/qubes ip", "x"), logMatch: "has byte 0x20"},
		{name: "WRITE leading dash", msg: m(CmdWrite, "-x", ""), logMatch: "has byte 0x2d"},
		{name: "WRITE NUL value", msg: m(CmdWrite, "/qubes-ip", "10.0.0.1\x00evil"), logMatch: "NUL byte"},
		{name: "RM with data", msg: m(CmdRm, "/qubes-ip", "x"), logMatch: "carries 1 data bytes"},
		{name: "RM empty path", msg: m(CmdRm, "", ""), logMatch: "must start with"},
		{name: "unterminated path", raw: hdr(CmdWrite, strings.Repeat("a", 64), 0), logMatch: "not NUL-terminated"},
		{name: "data_len 3072", raw: hdr(CmdWrite, "/a", 3072), logMatch: "data_len 3072"},
		{name: "data_len 4G", raw: hdr(CmdWrite, "/a", 0xffffffff), logMatch: "data_len 4294967295"},
		{name: "WRITE during sync", inSync: true, msg: m(CmdWrite, "/a", "x"), logMatch: "during the sync"},
		{name: "RESP_OK during sync", inSync: true, msg: m(RespOK, "/a", ""), logMatch: "during the sync"},
		{name: "sync entry NUL", inSync: true, msg: m(RespMultiread, "/a", "\x00"), logMatch: "NUL byte"},
		{name: "sync entry bad key", inSync: true, msg: m(RespMultiread, "/a/", "x"), logMatch: "must start and must not end"},
		{name: "sync terminator with data", inSync: true, msg: m(RespMultiread, "", "x"), logMatch: "carries 1 data bytes"},
		{name: "sync duplicate", inSync: true, msg: m(RespMultiread, "/qubes-ip", "10.0.0.66"), logMatch: "appears twice"},
	}
	for _, tt := range cases {
		t.Run(tt.name, func(t *testing.T) {
			ctx := testContext(t)
			db := NewDB(Limits{})
			mustWrite(t, db, "/kept", "from before") // a sync that fails must not touch it
			p := newPipes(2)
			c, logs := startClient(t, ctx, db, p)
			d := dom0Conn(t, ctx, p)

			d.expect(Message{Type: CmdMultiread})
			for _, e := range firstSync {
				d.send(Message{Type: RespMultiread, Path: e.Path, Data: []byte(e.Value)})
			}
			if !tt.inSync {
				d.send(Message{Type: RespMultiread})
				waitSynced(t, ctx, c)
			}
			before := db.Multiread("")
			if tt.msg != nil {
				require.NoError(t, WriteMessage(d.conn, *tt.msg))
			} else {
				_, err := d.conn.Write(tt.raw)
				require.NoError(t, err)
			}
			if tt.inSync {
				// Ends the sync if the client is still listening; a
				// duplicate shows only when the sync is applied.
				_ = WriteMessage(d.conn, Message{Type: RespMultiread})
			}
			for _, got := range d.drain() {
				assert.Equal(t, RespOK, got.Type, "the VM may only answer OK: %v", got)
			}

			again := dom0Conn(t, ctx, p) // the client reconnects...
			again.expect(Message{Type: CmdMultiread})
			assert.Equal(t, before, db.Multiread(""), "...with its mirror as it was")
			if tt.inSync {
				assert.Equal(t, []Entry{{"/kept", "from before"}}, before)
			}
			assert.Contains(t, logs.String(), "link to dom0 reset")
			assert.Contains(t, logs.String(), tt.logMatch)
		})
	}
}

func TestClientSyncOverLimits(t *testing.T) {
	for name, entries := range map[string][]Entry{
		"entries": {{"/a", ""}, {"/b", ""}, {"/c", ""}},
		"bytes":   {{"/a", strings.Repeat("x", 40)}},
	} {
		t.Run(name, func(t *testing.T) {
			ctx := testContext(t)
			db := NewDB(Limits{MaxEntries: 2, MaxBytes: 32})
			p := newPipes(2)
			_, logs := startClient(t, ctx, db, p)
			d := dom0Conn(t, ctx, p)
			d.expect(Message{Type: CmdMultiread})
			for _, e := range entries {
				if WriteMessage(d.conn, Message{Type: RespMultiread, Path: e.Path, Data: []byte(e.Value)}) != nil {
					break // the client may hang up before the end
				}
			}
			d.drain()
			dom0Conn(t, ctx, p).expect(Message{Type: CmdMultiread})
			assert.Equal(t, 0, db.Len())
			assert.Contains(t, logs.String(), ErrFull.Error())
		})
	}
}

func TestClientWriteOverLimitsResets(t *testing.T) {
	ctx := testContext(t)
	db := NewDB(Limits{MaxEntries: 1})
	p := newPipes(2)
	c, logs := startClient(t, ctx, db, p)
	d := dom0Conn(t, ctx, p)
	d.sync(Entry{"/a", ""})
	waitSynced(t, ctx, c)
	d.send(Message{Type: CmdWrite, Path: "/b", Data: nil})
	assert.Empty(t, d.drain())
	dom0Conn(t, ctx, p).expect(Message{Type: CmdMultiread})
	assert.Contains(t, logs.String(), "applying WRITE from dom0")
}

func TestClientAnswerPathMismatchResets(t *testing.T) {
	ctx := testContext(t)
	db := NewDB(Limits{})
	p := newPipes(2)
	c, logs := startClient(t, ctx, db, p)
	d := dom0Conn(t, ctx, p)
	d.sync()
	waitSynced(t, ctx, c)
	done := runAsync(func() error { return c.Write(ctx, "/mine", "1") })
	d.expect(Message{Type: CmdWrite, Path: "/mine", Data: []byte("1")})
	d.send(Message{Type: RespOK, Path: "/other"})
	assert.ErrorIs(t, wait(t, ctx, done), ErrNotConnected)
	d.drain()
	dom0Conn(t, ctx, p).expect(Message{Type: CmdMultiread})
	assert.Contains(t, logs.String(), `dom0 answered RESP_OK`)
	_, ok := db.Read("/mine")
	assert.False(t, ok)
}

// TestClientFloodResets: dom0 sends commands but never reads the answers.
// The client's output queue is bounded, so it drops the link rather than
// queueing answers without end.
func TestClientFloodResets(t *testing.T) {
	ctx := testContext(t)
	db := NewDB(Limits{})
	p := newPipes(2)
	c, logs := startClient(t, ctx, db, p)
	d := dom0Conn(t, ctx, p)
	d.sync()
	waitSynced(t, ctx, c)
	var err error
	sent := 0
	for ; sent < 100000 && err == nil; sent++ {
		err = WriteMessage(d.conn, Message{Type: CmdWrite, Path: "/flood", Data: []byte("x")})
	}
	require.Error(t, err, "the client must hang up")
	assert.Less(t, sent, 2*clientQueueBytes/HeaderLen)
	dom0Conn(t, ctx, p).expect(Message{Type: CmdMultiread})
	assert.Contains(t, logs.String(), "output queue full")
}

// TestClientBackoff: failing connects are retried, not fatal.
func TestClientBackoff(t *testing.T) {
	ctx := testContext(t)
	var mu sync.Mutex
	calls := 0
	p := newPipes(1)
	connect := func(ctx context.Context) (io.ReadWriteCloser, error) {
		mu.Lock()
		calls++
		n := calls
		mu.Unlock()
		if n <= 3 {
			return nil, errors.New("no vchan yet")
		}
		return p.connect(ctx)
	}
	log, logs := testLogger()
	c := NewClient(NewDB(Limits{}), connect, ClientConfig{Logger: log, MinBackoff: time.Microsecond, MaxBackoff: time.Millisecond})
	runCtx, cancel := context.WithCancel(ctx)
	done := runAsync(func() error { return c.Run(runCtx) })
	dom0Conn(t, ctx, p).sync()
	waitSynced(t, ctx, c)
	cancel()
	assert.ErrorIs(t, wait(t, ctx, done), context.Canceled)
	assert.Equal(t, 3, strings.Count(logs.String(), "no vchan yet"))
}

// fuzzConn plays dom0 from a fixed byte stream and records what the VM
// writes.
type fuzzConn struct {
	r      *bytes.Reader
	mu     sync.Mutex
	w      bytes.Buffer
	closed bool
}

func (f *fuzzConn) Read(p []byte) (int, error) { return f.r.Read(p) }

func (f *fuzzConn) Write(p []byte) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return 0, io.ErrClosedPipe
	}
	return f.w.Write(p)
}

func (f *fuzzConn) Close() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.closed = true
	return nil
}

func (f *fuzzConn) written() []byte {
	f.mu.Lock()
	defer f.mu.Unlock()
	return bytes.Clone(f.w.Bytes())
}

func encode(msgs ...Message) []byte {
	var b bytes.Buffer
	for _, m := range msgs {
		if err := WriteMessage(&b, m); err != nil {
			panic(err)
		}
	}
	return b.Bytes()
}

// FuzzClient feeds arbitrary bytes from "dom0" to a client connection. It
// must never panic, must end when the stream does, must keep its mirror
// within limits, and may only have sent one MULTIREAD followed by RESP_OKs.
func FuzzClient(f *testing.F) {
	syncMsgs := []Message{
		{Type: RespMultiread, Path: "/qubes-firewall/10.137.0.3/policy", Data: []byte("drop")},
		{Type: RespMultiread, Path: "/qubes-firewall/10.137.0.3", Data: nil},
		{Type: RespMultiread},
	}
	f.Add(encode(syncMsgs...))
	f.Add(encode(append(syncMsgs,
		Message{Type: CmdWrite, Path: "/qubes-ip", Data: []byte("10.137.0.6")},
		Message{Type: CmdRm, Path: "/qubes-firewall/10.137.0.3/"},
		Message{Type: CmdRm, Path: "/missing"},
		Message{Type: RespOK, Path: "/x"})...))
	f.Add(append(encode(syncMsgs...), rawHeader(CmdWrite, "/a", 0xffff)...))
	f.Add(encode(Message{Type: CmdWrite, Path: "/a"}))
	f.Fuzz(func(t *testing.T, in []byte) {
		db := NewDB(Limits{MaxEntries: 16, MaxBytes: 1024})
		c := NewClient(db, nil, ClientConfig{Logger: discardLogger})
		conn := &fuzzConn{r: bytes.NewReader(in)}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_, err := c.serve(ctx, conn)
		if err == nil {
			t.Fatal("serve returned without a reason")
		}
		if db.Len() > 16 {
			t.Fatalf("mirror grew to %d entries", db.Len())
		}
		out := bytes.NewReader(conn.written())
		for i := 0; ; i++ {
			m, err := ReadMessage(out)
			if err != nil {
				break
			}
			if i == 0 && m.Type != CmdMultiread || i > 0 && m.Type != RespOK {
				t.Fatalf("message %d from the VM: %v", i, m)
			}
		}
	})
}
