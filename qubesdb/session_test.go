package qubesdb

import (
	"context"
	"io"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// session is a Server and a Client linked by pipes, as dom0 and the
// firewall VM are by the vchan.
type session struct {
	dom0DB, vmDB *DB
	server       *Server
	client       *Client
	pipes        *pipes
	last         atomic.Pointer[io.ReadWriteCloser] // dom0's end of the current link
}

func startSession(t *testing.T, ctx context.Context, dom0DB, vmDB *DB) *session {
	s := &session{
		dom0DB: dom0DB,
		vmDB:   vmDB,
		server: NewServer(dom0DB, ServerConfig{Peer: "sys-firewall", Logger: discardLogger}),
		pipes:  newPipes(1),
	}
	s.client = NewClient(vmDB, s.pipes.connect, ClientConfig{Logger: discardLogger, MinBackoff: time.Millisecond})
	accept := func(ctx context.Context) (io.ReadWriteCloser, error) {
		c, err := s.pipes.accept(ctx)
		if err == nil {
			s.last.Store(&c)
		}
		return c, err
	}
	runCtx, cancel := context.WithCancel(ctx)
	serverDone := runAsync(func() error { return s.server.Run(runCtx, accept) })
	clientDone := runAsync(func() error { return s.client.Run(runCtx) })
	t.Cleanup(func() {
		cancel()
		assert.ErrorIs(t, wait(t, ctx, serverDone), context.Canceled)
		assert.ErrorIs(t, wait(t, ctx, clientDone), context.Canceled)
	})
	return s
}

func assertNoFirewallEvent(t *testing.T, ctx context.Context, fw *FirewallWatch) {
	t.Helper()
	short, cancel := context.WithCancel(ctx)
	cancel()
	ev, err := fw.Next(short)
	assert.ErrorIs(t, err, context.Canceled, "unexpected %+v", ev)
}

func TestSessionEndToEnd(t *testing.T) {
	ctx := testContext(t)
	dom0DB := sysFirewallDB(t)
	mustWrite(t, dom0DB,
		"/qubes-firewall/10.137.0.3", "",
		"/qubes-firewall/10.137.0.3/policy", "drop",
		"/qubes-firewall/10.137.0.3/0000", "action=accept")
	vmDB := NewDB(Limits{})
	fw, err := WatchFirewall(vmDB)
	require.NoError(t, err)
	s := startSession(t, ctx, dom0DB, vmDB)

	// Sync: the mirror is dom0's database, and the firewall learns about
	// every client and the connected IPs.
	waitSynced(t, ctx, s.client)
	assert.Equal(t, dom0DB.Multiread(""), vmDB.Multiread(""))
	assert.Equal(t, FirewallEvent{Kind: RulesCommitted, ClientIP: "10.137.0.3"}, nextFirewall(t, ctx, fw))
	assert.Equal(t, FirewallEvent{Kind: ConnectedIPsChanged, Family: 6}, nextFirewall(t, ctx, fw))
	assert.Equal(t, FirewallEvent{Kind: ConnectedIPsChanged, Family: 4}, nextFirewall(t, ctx, fw))
	assertNoFirewallEvent(t, ctx, fw)
	cfg, err := ReadConfig(vmDB)
	require.NoError(t, err)
	assert.Equal(t, a("10.137.0.6"), cfg.Uplink.IP)

	// A rule edit as qubesd does it: one reload, after the whole rule set.
	rules := map[string]string{"0000": "action=drop proto=icmp", "0002": "action=accept"}
	require.NoError(t, s.server.ScriptRuleEdit("10.137.0.3", "drop", rules))
	require.NoError(t, s.server.Flush(ctx))
	assert.Equal(t, FirewallEvent{Kind: RulesCommitted, ClientIP: "10.137.0.3"}, nextFirewall(t, ctx, fw))
	assertNoFirewallEvent(t, ctx, fw)
	assert.Equal(t, map[string]string{"policy": "drop", "0000": "action=drop proto=icmp", "0002": "action=accept"},
		FirewallRules(vmDB, "10.137.0.3"))

	// The VM writes back to dom0.
	handled, err := dom0DB.Watch("/qubes-firewall-handled/")
	require.NoError(t, err)
	require.NoError(t, s.client.Write(ctx, "/qubes-firewall-handled/10.137.0.3", "1"))
	assert.Equal(t, Event{OpWrite, "/qubes-firewall-handled/10.137.0.3"}, nextEvent(t, ctx, handled))
	v, _ := dom0DB.Read("/qubes-firewall-handled/10.137.0.3")
	assert.Equal(t, "1", v)
	assert.Equal(t, dom0DB.Multiread(""), vmDB.Multiread(""))

	// The link drops. While the VM cannot reconnect, dom0 changes things.
	(*s.last.Load()).Close()
	require.NoError(t, s.server.ScriptRuleEdit("10.137.0.9", "drop", map[string]string{"0000": "action=accept"}))
	require.NoError(t, s.server.Write(KeyConnectedIPs, "10.137.0.3 10.137.0.9"))
	require.NoError(t, s.server.Rm("/qubes-firewall-handled/"))
	require.NoError(t, s.server.Rm("/qubes-firewall/10.137.0.3/"))

	// It reconnects and syncs again: the mirror matches dom0 exactly,
	// including what dom0 removed meanwhile, and every client is reported.
	s.pipes.allow(1)
	var committed []string
	for len(committed) < 2 {
		ev := nextFirewall(t, ctx, fw)
		if ev.Kind == RulesCommitted {
			committed = append(committed, ev.ClientIP)
		}
	}
	assert.ElementsMatch(t, []string{"10.137.0.3", "10.137.0.9"}, committed)
	assert.Equal(t, dom0DB.Multiread(""), vmDB.Multiread(""))
	assert.Nil(t, FirewallRules(vmDB, "10.137.0.3"))
	_, ok := vmDB.Read("/qubes-firewall-handled/10.137.0.3")
	assert.False(t, ok)

	// And the new link carries changes both ways.
	require.NoError(t, s.server.ScriptRuleEdit("10.137.0.9", "drop", nil))
	require.NoError(t, s.server.Flush(ctx))
	assert.Equal(t, map[string]string{"policy": "drop"}, FirewallRules(vmDB, "10.137.0.9"))
	require.NoError(t, s.client.Write(ctx, "/qubes-firewall-handled/10.137.0.9", "1"))
	assert.Equal(t, dom0DB.Multiread(""), vmDB.Multiread(""))
}

func BenchmarkSessionWrite(b *testing.B) {
	ctx := testContext(b)
	dom0DB, vmDB := NewDB(Limits{}), NewDB(Limits{})
	p := newPipes(1)
	server := NewServer(dom0DB, ServerConfig{Logger: discardLogger})
	client := NewClient(vmDB, p.connect, ClientConfig{Logger: discardLogger})
	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	go server.Run(runCtx, p.accept)
	go client.Run(runCtx)
	select {
	case <-client.Synced():
	case <-ctx.Done():
		b.Fatal("no sync")
	}
	b.ReportAllocs()
	for b.Loop() {
		if err := server.Write("/qubes-firewall/10.137.0.3/0000", "action=accept proto=tcp dstports=443-443"); err != nil {
			b.Fatal(err)
		}
		if err := server.Flush(ctx); err != nil {
			b.Fatal(err)
		}
	}
}
