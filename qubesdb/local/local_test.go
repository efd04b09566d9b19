package local

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"qfw/qubesdb"
)

func TestCommands(t *testing.T) {
	ctx := testContext(t)
	c := dial(t, ctx, newTestDaemon().listen(t))

	require.NoError(t, c.Write(ctx, "/qubes-ip", "10.137.0.6"))
	require.NoError(t, c.Write(ctx, "/qubes-firewall/10.137.0.3", ""))
	require.NoError(t, c.Write(ctx, "/qubes-firewall/10.137.0.3/policy", "drop"))
	require.NoError(t, c.Write(ctx, "/qubes-firewall/10.137.0.3/0000", "action=accept"))
	require.NoError(t, c.Write(ctx, "/qubes-firewall/10.137.0.30/policy", "drop"))

	v, err := c.Read(ctx, "/qubes-ip")
	require.NoError(t, err)
	assert.Equal(t, "10.137.0.6", v)
	v, err = c.Read(ctx, "/qubes-firewall/10.137.0.3")
	require.NoError(t, err)
	assert.Equal(t, "", v)
	_, err = c.Read(ctx, "/missing")
	assert.ErrorIs(t, err, qubesdb.ErrNotFound)

	entries, err := c.Multiread(ctx, "/qubes-firewall/10.137.0.3/")
	require.NoError(t, err)
	assert.Equal(t, []qubesdb.Entry{
		{Path: "/qubes-firewall/10.137.0.3/0000", Value: "action=accept"},
		{Path: "/qubes-firewall/10.137.0.3/policy", Value: "drop"},
	}, entries)
	paths, err := c.List(ctx, "/qubes-firewall/")
	require.NoError(t, err)
	assert.Equal(t, []string{
		"/qubes-firewall/10.137.0.3", "/qubes-firewall/10.137.0.3/0000",
		"/qubes-firewall/10.137.0.3/policy", "/qubes-firewall/10.137.0.30/policy",
	}, paths)
	entries, err = c.Multiread(ctx, "/none/")
	require.NoError(t, err)
	assert.Empty(t, entries)

	require.NoError(t, c.Rm(ctx, "/qubes-firewall/10.137.0.3/"))
	assert.ErrorIs(t, c.Rm(ctx, "/qubes-firewall/10.137.0.3/"), qubesdb.ErrNotFound)
	require.NoError(t, c.Rm(ctx, "/qubes-ip"))
	assert.ErrorIs(t, c.Rm(ctx, "/qubes-ip"), qubesdb.ErrNotFound)
	paths, err = c.List(ctx, "/")
	require.NoError(t, err)
	assert.Equal(t, []string{"/qubes-firewall/10.137.0.3", "/qubes-firewall/10.137.0.30/policy"}, paths)

	require.NoError(t, c.Watch(ctx, "/x"))
	require.NoError(t, c.Unwatch(ctx, "/x"))
	assert.ErrorIs(t, c.Unwatch(ctx, "/x"), qubesdb.ErrNotFound)

	// Refused locally, as the client library does; nothing is sent.
	for _, err := range []error{
		c.Write(ctx, "/a/", ""), c.Write(ctx, "a", ""), c.Write(ctx, "/a", "\x00"),
		c.Write(ctx, "/a", strings.Repeat("v", qubesdb.MaxValueLen+1)),
		func() error { _, err := c.Read(ctx, "/a/"); return err }(),
		func() error { _, err := c.Multiread(ctx, ""); return err }(),
		func() error { _, err := c.List(ctx, "x"); return err }(),
		c.Rm(ctx, ""), c.Watch(ctx, ""), c.Unwatch(ctx, "/a b"),
	} {
		assert.ErrorIs(t, err, qubesdb.ErrInvalid)
	}
	// The connection is still in step.
	v, err = c.Read(ctx, "/qubes-firewall/10.137.0.30/policy")
	require.NoError(t, err)
	assert.Equal(t, "drop", v)
}

func nextEvent(t *testing.T, ctx context.Context, c *Client) string {
	t.Helper()
	p, err := c.NextEvent(ctx)
	require.NoError(t, err)
	return p
}

func TestWatchEvents(t *testing.T) {
	ctx := testContext(t)
	path := newTestDaemon().listen(t)
	watcher, writer := dial(t, ctx, path), dial(t, ctx, path)
	require.NoError(t, watcher.Watch(ctx, "/qubes-firewall/"))
	require.NoError(t, watcher.Watch(ctx, "/connected-ips"))
	require.NoError(t, watcher.Watch(ctx, "/connected-ips")) // twice: two events

	require.NoError(t, writer.Write(ctx, "/qubes-firewall/10.137.0.3/0000", "action=accept"))
	require.NoError(t, writer.Write(ctx, "/connected-ips6", "")) // not watched
	require.NoError(t, writer.Write(ctx, "/connected-ips", "10.137.0.3"))
	require.NoError(t, writer.Rm(ctx, "/qubes-firewall/10.137.0.3/"))
	assert.Equal(t, "/qubes-firewall/10.137.0.3/0000", nextEvent(t, ctx, watcher))
	assert.Equal(t, "/connected-ips", nextEvent(t, ctx, watcher))
	assert.Equal(t, "/connected-ips", nextEvent(t, ctx, watcher))
	assert.Equal(t, "/qubes-firewall/10.137.0.3/", nextEvent(t, ctx, watcher))

	require.NoError(t, watcher.Unwatch(ctx, "/connected-ips"))
	require.NoError(t, writer.Write(ctx, "/connected-ips", ""))
	assert.Equal(t, "/connected-ips", nextEvent(t, ctx, watcher))
	// The watcher's own command answers after the event: nothing else queued.
	_, err := watcher.Read(ctx, "/connected-ips")
	require.NoError(t, err)
	short, cancel := context.WithCancel(ctx)
	cancel()
	_, err = watcher.NextEvent(short)
	assert.ErrorIs(t, err, context.Canceled)
}

// TestFollow mirrors a daemon into a qubesdb.DB and checks that the typed
// firewall watch works on it as behind the vchan.
func TestFollow(t *testing.T) {
	ctx := testContext(t)
	d := newTestDaemon()
	for _, kv := range [][2]string{
		{"/qubes-ip", "10.137.0.6"},
		{"/connected-ips", "10.137.0.3"},
		{"/qubes-firewall/10.137.0.3", ""},
		{"/qubes-firewall/10.137.0.3/policy", "drop"},
		{"/qubes-firewall/10.137.0.3/0000", "action=accept"},
	} {
		require.NoError(t, d.db.Write(kv[0], kv[1]))
	}
	path := d.listen(t)
	follower, admin := dial(t, ctx, path), dial(t, ctx, path)
	db := qubesdb.NewDB(qubesdb.Limits{})
	fw, err := qubesdb.WatchFirewall(db)
	require.NoError(t, err)
	followed := make(chan error, 1)
	followCtx, stop := context.WithCancel(ctx)
	go func() { followed <- follower.Follow(followCtx, db) }()

	next := func() qubesdb.FirewallEvent {
		ev, err := fw.Next(ctx)
		require.NoError(t, err)
		return ev
	}
	assert.Equal(t, qubesdb.FirewallEvent{Kind: qubesdb.RulesCommitted, ClientIP: "10.137.0.3"}, next())
	assert.Equal(t, qubesdb.FirewallEvent{Kind: qubesdb.ConnectedIPsChanged, Family: 4}, next())

	// A rule edit as qubesd does it.
	require.NoError(t, admin.Rm(ctx, "/qubes-firewall/10.137.0.3/"))
	require.NoError(t, admin.Write(ctx, "/qubes-firewall/10.137.0.3/policy", "drop"))
	require.NoError(t, admin.Write(ctx, "/qubes-firewall/10.137.0.3/0000", "action=drop proto=icmp"))
	require.NoError(t, admin.Write(ctx, "/qubes-firewall/10.137.0.3", ""))
	assert.Equal(t, qubesdb.FirewallEvent{Kind: qubesdb.RulesCommitted, ClientIP: "10.137.0.3"}, next())
	assert.Equal(t, map[string]string{"policy": "drop", "0000": "action=drop proto=icmp"},
		qubesdb.FirewallRules(db, "10.137.0.3"))

	require.NoError(t, admin.Rm(ctx, "/connected-ips"))
	assert.Equal(t, qubesdb.FirewallEvent{Kind: qubesdb.ConnectedIPsChanged, Family: 4}, next())
	_, ok := db.Read("/connected-ips")
	assert.False(t, ok)
	assert.Equal(t, d.db.Multiread(""), db.Multiread(""))

	stop()
	assert.ErrorIs(t, <-followed, context.Canceled)
}

// TestFollowResyncsAfterLostEvents: while the follower is stuck waiting
// for an answer, more events arrive than its queue holds; it must reload
// the whole database, which brings in a change that fired no event.
func TestFollowResyncsAfterLostEvents(t *testing.T) {
	ctx := testContext(t)
	d := newTestDaemon()
	require.NoError(t, d.db.Write("/a", "0"))
	path := d.listen(t)
	follower, admin := dial(t, ctx, path), dial(t, ctx, path)
	db := qubesdb.NewDB(qubesdb.Limits{})
	w, err := db.Watch("/")
	require.NoError(t, err)
	followCtx, stop := context.WithCancel(ctx)
	followed := make(chan error, 1)
	go func() { followed <- follower.Follow(followCtx, db) }()
	ev, err := w.Next(ctx)
	require.NoError(t, err)
	require.Equal(t, qubesdb.Event{Op: qubesdb.OpWrite, Path: "/a"}, ev, "initial load")

	// Holding the daemon's lock: the follower's READ for the first event
	// cannot be answered, so it stops consuming while events pile up.
	d.mu.Lock()
	for i := range qubesdb.WatchQueueLen + 10 {
		require.NoError(t, d.db.Write("/a", fmt.Sprint(i)))
		d.fireLocked("/a")
	}
	require.NoError(t, d.db.Write("/silent", "no event for this"))
	d.mu.Unlock()
	require.NoError(t, admin.Write(ctx, "/sentinel", "")) // after everything above

	for {
		ev, err := w.Next(ctx)
		require.NoError(t, err)
		if ev.Path == "/sentinel" {
			break
		}
	}
	assert.Equal(t, d.db.Multiread(""), db.Multiread(""))
	stop()
	assert.ErrorIs(t, <-followed, context.Canceled)
}

func TestNextEventReportsLoss(t *testing.T) {
	ctx := testContext(t)
	c, daemon := pipeClient(t, ctx, qubesdb.DefaultLimits)
	done := make(chan error, 1)
	go func() {
		for range qubesdb.WatchQueueLen + 2 {
			if err := reply(daemon, qubesdb.RespWatch, "/a", ""); err != nil {
				done <- err
				return
			}
		}
		m, err := qubesdb.ReadMessage(daemon)
		if err == nil {
			err = reply(daemon, qubesdb.RespOK, m.Path, "")
		}
		done <- err
	}()
	// Events are handled in order before this answer.
	require.NoError(t, c.Write(ctx, "/b", ""))
	require.NoError(t, <-done)
	_, err := c.NextEvent(ctx)
	assert.ErrorIs(t, err, ErrEventsLost)
	assert.Equal(t, "/a", nextEvent(t, ctx, c))
}

// TestHostileDaemon: an answer that breaks the protocol closes the client
// with an error that says what was wrong; no panic, no hang.
func TestHostileDaemon(t *testing.T) {
	msg := func(ty qubesdb.MsgType, path, data string) []byte {
		var b bytes.Buffer
		require.NoError(t, qubesdb.WriteMessage(&b, qubesdb.Message{Type: ty, Path: path, Data: []byte(data)}))
		return b.Bytes()
	}
	hdr := func(ty qubesdb.MsgType, path string, n uint32) []byte {
		b := msg(ty, path, "")
		b[68], b[69], b[70], b[71] = byte(n), byte(n>>8), byte(n>>16), byte(n>>24)
		return b
	}
	read := func(c *Client, ctx context.Context) error { _, err := c.Read(ctx, "/a"); return err }
	write := func(c *Client, ctx context.Context) error { return c.Write(ctx, "/a", "v") }
	multiread := func(c *Client, ctx context.Context) error { _, err := c.Multiread(ctx, "/a/"); return err }
	list := func(c *Client, ctx context.Context) error { _, err := c.List(ctx, "/a/"); return err }
	cases := []struct {
		name   string
		run    func(*Client, context.Context) error
		answer []byte
		want   string
	}{
		{"READ answered OK", read, msg(qubesdb.RespOK, "/a", ""), "RESP_OK"},
		{"READ other path", read, msg(qubesdb.RespRead, "/b", "v"), `RESP_READ "/b"`},
		{"READ NUL value", read, msg(qubesdb.RespRead, "/a", "v\x00"), "NUL byte"},
		{"NOENT with data", read, msg(qubesdb.RespErrorNoent, "/a", "x"), "RESP_ERROR_NOENT"},
		{"WRITE answered READ", write, msg(qubesdb.RespRead, "/a", "v"), "RESP_READ"},
		{"WRITE answered LIST", write, msg(qubesdb.RespList, "/a", ""), "RESP_LIST"},
		{"MULTIREAD answered LIST", multiread, msg(qubesdb.RespList, "/a/b", ""), "RESP_LIST"},
		{"MULTIREAD outside prefix", multiread, msg(qubesdb.RespMultiread, "/b", "v"), "is not under"},
		{"MULTIREAD bad key", multiread, msg(qubesdb.RespMultiread, "/a/b/", "v"), "must not end"},
		{"MULTIREAD NUL", multiread, msg(qubesdb.RespMultiread, "/a/b", "\x00"), "NUL byte"},
		{"MULTIREAD error mid-stream", multiread,
			append(msg(qubesdb.RespMultiread, "/a/b", ""), msg(qubesdb.RespError, "/a/", "")...), "RESP_ERROR"},
		{"MULTIREAD terminator with data", multiread, msg(qubesdb.RespMultiread, "", "x"), "terminator"},
		{"MULTIREAD too many", multiread, bytes.Repeat(msg(qubesdb.RespMultiread, "/a/b", "v"), 3), "limits exceeded"},
		{"LIST answered MULTIREAD", list, msg(qubesdb.RespMultiread, "/a/b", "v"), "RESP_MULTIREAD"},
		{"event with data", write, msg(qubesdb.RespWatch, "/a", "x"), "watch event"},
		{"event without path", write, msg(qubesdb.RespWatch, "", ""), "watch event"},
		{"event bad path", write, msg(qubesdb.RespWatch, "/a b", ""), "has byte"},
		{"unterminated path", write, bytes.Repeat([]byte{'/'}, 72), "not NUL-terminated"},
		{"data_len too big", read, hdr(qubesdb.RespRead, "/a", 1<<20), "data_len 1048576"},
		{"hang up", read, nil, "EOF"},
	}
	for _, tt := range cases {
		t.Run(tt.name, func(t *testing.T) {
			ctx := testContext(t)
			c, daemon := pipeClient(t, ctx, qubesdb.Limits{MaxEntries: 2, MaxBytes: 100})
			go func() {
				if _, err := qubesdb.ReadMessage(daemon); err != nil {
					return
				}
				if tt.answer == nil {
					daemon.Close()
					return
				}
				_, _ = daemon.Write(tt.answer)
			}()
			err := tt.run(c, ctx)
			require.Error(t, err)
			assert.Contains(t, err.Error(), tt.want)
			// The client is closed: later commands and NextEvent fail at once.
			assert.Error(t, c.Write(ctx, "/b", ""))
			_, err = c.NextEvent(ctx)
			assert.Error(t, err)
		})
	}
}

func TestRecoverableAnswers(t *testing.T) {
	ctx := testContext(t)
	c, daemon := pipeClient(t, ctx, qubesdb.DefaultLimits)
	go func() {
		for _, answer := range []struct {
			ty   qubesdb.MsgType
			path string
		}{
			{qubesdb.RespError, "/a"},       // WRITE refused
			{qubesdb.RespWatch, "/ev"},      // an event between answers...
			{qubesdb.RespErrorNoent, "/a"},  // READ: not found
			{qubesdb.RespMultiread, "/m/1"}, // MULTIREAD with an event inside
			{qubesdb.RespWatch, "/ev2"},
			{qubesdb.RespMultiread, ""},
			{qubesdb.RespError, "/m/"}, // MULTIREAD refused outright
		} {
			if answer.ty != qubesdb.RespWatch && answer.path != "" {
				if _, err := qubesdb.ReadMessage(daemon); err != nil {
					return
				}
			}
			if reply(daemon, answer.ty, answer.path, "") != nil {
				return
			}
		}
	}()
	assert.ErrorIs(t, c.Write(ctx, "/a", "v"), ErrRefused)
	_, err := c.Read(ctx, "/a")
	assert.ErrorIs(t, err, qubesdb.ErrNotFound)
	entries, err := c.Multiread(ctx, "/m/")
	require.NoError(t, err)
	assert.Equal(t, []qubesdb.Entry{{Path: "/m/1"}}, entries)
	_, err = c.Multiread(ctx, "/m/")
	assert.ErrorIs(t, err, ErrRefused)
	assert.Equal(t, "/ev", nextEvent(t, ctx, c))
	assert.Equal(t, "/ev2", nextEvent(t, ctx, c))
}

func TestUnsolicitedAnswerCloses(t *testing.T) {
	ctx := testContext(t)
	c, daemon := pipeClient(t, ctx, qubesdb.DefaultLimits)
	require.NoError(t, reply(daemon, qubesdb.RespOK, "/x", ""))
	_, err := c.NextEvent(ctx)
	assert.ErrorContains(t, err, "no command outstanding")
}

func TestAbandonedCommandCloses(t *testing.T) {
	ctx := testContext(t)
	c, daemon := pipeClient(t, ctx, qubesdb.DefaultLimits)
	read := make(chan error, 1)
	go func() {
		_, err := qubesdb.ReadMessage(daemon) // and never answer
		read <- err
	}()
	short, cancel := context.WithCancel(ctx)
	got := make(chan error, 1)
	go func() {
		_, err := c.Read(short, "/a")
		got <- err
	}()
	require.NoError(t, <-read)
	cancel()
	select {
	case err := <-got:
		assert.ErrorIs(t, err, context.Canceled)
	case <-ctx.Done():
		t.Fatal("an abandoned command must return")
	}
	assert.Error(t, c.Write(ctx, "/b", ""), "the stream is out of step: closed")
	assert.NoError(t, c.Close())
}

func TestDialErrors(t *testing.T) {
	ctx := testContext(t)
	_, err := Dial(ctx, t.TempDir()+"/none.sock")
	assert.ErrorContains(t, err, "connecting to QubesDB")
}

// fuzzDaemon answers from a fixed byte stream and discards what it gets.
type fuzzDaemon struct{ r io.Reader }

func (f fuzzDaemon) Read(p []byte) (int, error)  { return f.r.Read(p) }
func (f fuzzDaemon) Write(p []byte) (int, error) { return len(p), nil }
func (f fuzzDaemon) Close() error                { return nil }

// FuzzClient feeds arbitrary daemon output to every command and to Follow:
// no panic, no hang, the mirror stays within its limits.
func FuzzClient(f *testing.F) {
	enc := func(msgs ...qubesdb.Message) []byte {
		var b bytes.Buffer
		for _, m := range msgs {
			if err := qubesdb.WriteMessage(&b, m); err != nil {
				panic(err)
			}
		}
		return b.Bytes()
	}
	f.Add(enc(
		qubesdb.Message{Type: qubesdb.RespOK, Path: "/"},
		qubesdb.Message{Type: qubesdb.RespMultiread, Path: "/a", Data: []byte("1")},
		qubesdb.Message{Type: qubesdb.RespWatch, Path: "/a"},
		qubesdb.Message{Type: qubesdb.RespMultiread},
		qubesdb.Message{Type: qubesdb.RespRead, Path: "/a", Data: []byte("2")},
		qubesdb.Message{Type: qubesdb.RespWatch, Path: "/b/"},
	))
	f.Add(enc(qubesdb.Message{Type: qubesdb.RespRead, Path: "/a", Data: []byte("x")},
		qubesdb.Message{Type: qubesdb.RespList, Path: "/a/b"}, qubesdb.Message{Type: qubesdb.RespList}))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, in []byte) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		c := New(fuzzDaemon{bytes.NewReader(in)}, qubesdb.Limits{MaxEntries: 8, MaxBytes: 256})
		db := qubesdb.NewDB(qubesdb.Limits{MaxEntries: 8, MaxBytes: 256})
		err := c.Follow(ctx, db)
		if err == nil || errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("Follow did not end with the stream: %v", err)
		}
		if db.Len() > 8 {
			t.Fatalf("mirror grew to %d entries", db.Len())
		}
		c2 := New(fuzzDaemon{bytes.NewReader(in)}, qubesdb.Limits{MaxEntries: 8, MaxBytes: 256})
		_, _ = c2.Read(ctx, "/a")
		_, _ = c2.List(ctx, "/a/")
		_ = c2.Rm(ctx, "/a")
		c2.Close()
	})
}
