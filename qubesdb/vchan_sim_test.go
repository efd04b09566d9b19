package qubesdb_test

import (
	"context"
	"io"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"qfw/qubesdb"
	"qfw/xen/sim"
	"qfw/xen/vchan"
)

// simLink is dom0's side of a VM's QubesDB vchan on the simulated
// hypervisor. Each Listen waits for a token, so that a test can keep the VM
// from reconnecting for a while; the current connection can be dropped.
type simLink struct {
	listen qubesdb.Connect
	tokens chan struct{}

	mu   sync.Mutex
	conn io.ReadWriteCloser
}

func (s *simLink) accept(ctx context.Context) (io.ReadWriteCloser, error) {
	select {
	case <-s.tokens:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	c, err := s.listen(ctx)
	if err == nil {
		s.mu.Lock()
		s.conn = c
		s.mu.Unlock()
	}
	return c, err
}

func (s *simLink) drop() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.conn.Close()
}

func mustNext[T any](t *testing.T, ctx context.Context, next func(context.Context) (T, error)) T {
	t.Helper()
	v, err := next(ctx)
	require.NoError(t, err)
	return v
}

func noMoreEvents(t *testing.T, ctx context.Context, fw *qubesdb.FirewallWatch) {
	t.Helper()
	short, cancel := context.WithCancel(ctx)
	cancel()
	ev, err := fw.Next(short)
	assert.ErrorIs(t, err, context.Canceled, "unexpected %+v", ev)
}

// TestVchanOnSim runs dom0's Server and the VM's Client over a real vchan
// on xen/sim: sync, watches, a scripted rule edit, a write back to dom0,
// and a dropped link followed by a reconnect and a fresh sync.
func TestVchanOnSim(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	h := sim.New()
	defer h.Close()
	vm, err := h.CreateDomain("sys-firewall")
	require.NoError(t, err)
	quiet := slog.New(slog.DiscardHandler)

	dom0DB := qubesdb.NewDB(qubesdb.Limits{})
	for _, kv := range [][2]string{
		{qubesdb.KeyIP, "10.137.0.6"},
		{qubesdb.KeyGateway, "10.137.0.5"},
		{qubesdb.KeyPrimaryDNS, "10.139.1.1"},
		{qubesdb.KeySecondaryDNS, "10.139.1.2"},
		{qubesdb.KeyNetVMGateway, "10.137.0.6"},
		{qubesdb.KeyConnectedIPs, "10.137.0.3"},
		{"/qubes-firewall/10.137.0.3", ""},
		{"/qubes-firewall/10.137.0.3/policy", "drop"},
		{"/qubes-firewall/10.137.0.3/0000", "action=accept"},
	} {
		require.NoError(t, dom0DB.Write(kv[0], kv[1]))
	}
	server := qubesdb.NewServer(dom0DB, qubesdb.ServerConfig{Peer: vm.Name(), Logger: quiet})
	link := &simLink{listen: qubesdb.ListenVM(h.Dom0(), vm.ID()), tokens: make(chan struct{}, 4)}
	link.tokens <- struct{}{}

	vmDB := qubesdb.NewDB(qubesdb.Limits{})
	fw, err := qubesdb.WatchFirewall(vmDB)
	require.NoError(t, err)
	client := qubesdb.NewClient(vmDB, qubesdb.DialDom0(vm), qubesdb.ClientConfig{Logger: quiet, MinBackoff: time.Millisecond})

	runCtx, stop := context.WithCancel(ctx)
	var wg sync.WaitGroup
	errs := make(chan error, 2)
	for _, run := range []func(context.Context) error{
		func(ctx context.Context) error { return server.Run(ctx, link.accept) },
		client.Run,
	} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- run(runCtx)
		}()
	}
	defer func() {
		stop()
		wg.Wait()
		close(errs)
		for err := range errs {
			assert.ErrorIs(t, err, context.Canceled)
		}
	}()

	// Sync.
	select {
	case <-client.Synced():
	case <-ctx.Done():
		t.Fatal("no sync over the vchan")
	}
	assert.Equal(t, dom0DB.Multiread(""), vmDB.Multiread(""))
	assert.Equal(t, qubesdb.FirewallEvent{Kind: qubesdb.RulesCommitted, ClientIP: "10.137.0.3"}, mustNext(t, ctx, fw.Next))
	assert.Equal(t, qubesdb.FirewallEvent{Kind: qubesdb.ConnectedIPsChanged, Family: 4}, mustNext(t, ctx, fw.Next))
	noMoreEvents(t, ctx, fw)
	cfg, err := qubesdb.ReadConfig(vmDB)
	require.NoError(t, err)
	assert.Equal(t, "10.137.0.5", cfg.Uplink.Gateway.String())

	// Watch + scripted rule edit: one reload, with the whole new rule set.
	require.NoError(t, server.ScriptRuleEdit("10.137.0.3", "drop", map[string]string{
		"0000": "action=accept proto=tcp dstports=443-443",
		"0001": "action=accept specialtarget=dns",
	}))
	require.NoError(t, server.Flush(ctx))
	assert.Equal(t, qubesdb.FirewallEvent{Kind: qubesdb.RulesCommitted, ClientIP: "10.137.0.3"}, mustNext(t, ctx, fw.Next))
	noMoreEvents(t, ctx, fw)
	assert.Equal(t, map[string]string{
		"policy": "drop",
		"0000":   "action=accept proto=tcp dstports=443-443",
		"0001":   "action=accept specialtarget=dns",
	}, qubesdb.FirewallRules(vmDB, "10.137.0.3"))

	// Write back to dom0.
	require.NoError(t, client.Write(ctx, "/qubes-firewall-handled/10.137.0.3", "1"))
	v, ok := dom0DB.Read("/qubes-firewall-handled/10.137.0.3")
	assert.True(t, ok)
	assert.Equal(t, "1", v)

	// Link drop. dom0 does not listen again until the test allows it, and
	// changes the database meanwhile.
	link.drop()
	require.NoError(t, server.ScriptRuleEdit("10.137.0.9", "drop", map[string]string{"0000": "action=drop"}))
	require.NoError(t, server.Write(qubesdb.KeyConnectedIPs, "10.137.0.3 10.137.0.9"))
	require.NoError(t, server.Rm("/qubes-firewall-handled/"))
	link.tokens <- struct{}{}

	var reloaded []string
	for len(reloaded) < 2 {
		if ev := mustNext(t, ctx, fw.Next); ev.Kind == qubesdb.RulesCommitted {
			reloaded = append(reloaded, ev.ClientIP)
		}
	}
	assert.ElementsMatch(t, []string{"10.137.0.3", "10.137.0.9"}, reloaded)
	assert.Equal(t, dom0DB.Multiread(""), vmDB.Multiread(""))

	// The new link works both ways.
	require.NoError(t, server.ScriptRuleEdit("10.137.0.9", "drop", nil))
	require.NoError(t, server.Flush(ctx))
	assert.Equal(t, map[string]string{"policy": "drop"}, qubesdb.FirewallRules(vmDB, "10.137.0.9"))
	require.NoError(t, client.Write(ctx, "/qubes-firewall-handled/10.137.0.9", "1"))
	assert.Equal(t, dom0DB.Multiread(""), vmDB.Multiread(""))
}

// TestVchanOnSimHostileDom0: a dom0 that breaks the protocol on a real
// vchan gets its link reset, and the VM dials again.
func TestVchanOnSimHostileDom0(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	h := sim.New()
	defer h.Close()
	vm, err := h.CreateDomain("sys-firewall")
	require.NoError(t, err)

	vmDB := qubesdb.NewDB(qubesdb.Limits{})
	client := qubesdb.NewClient(vmDB, qubesdb.DialDom0(vm), qubesdb.ClientConfig{
		Logger: slog.New(slog.DiscardHandler), MinBackoff: time.Millisecond,
	})
	runCtx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- client.Run(runCtx) }()
	defer func() {
		stop()
		assert.ErrorIs(t, <-done, context.Canceled)
	}()

	srv, err := vchan.Listen(ctx, h.Dom0(), vm.ID(), qubesdb.VchanPort, 4096, 4096)
	require.NoError(t, err)
	m, err := qubesdb.ReadMessage(srv)
	require.NoError(t, err)
	assert.Equal(t, qubesdb.Message{Type: qubesdb.CmdMultiread}, m)
	for _, m := range []qubesdb.Message{
		{Type: qubesdb.RespMultiread, Path: "/qubes-ip", Data: []byte("10.137.0.6")},
		{Type: qubesdb.RespMultiread},
		{Type: qubesdb.RespErrorNoent, Path: "/qubes-ip"}, // never valid on the vchan
	} {
		require.NoError(t, qubesdb.WriteMessage(srv, m))
	}
	_, err = qubesdb.ReadMessage(srv)
	assert.ErrorIs(t, err, io.EOF, "the VM hangs up")
	srv.Close()

	again, err := vchan.Listen(ctx, h.Dom0(), vm.ID(), qubesdb.VchanPort, 4096, 4096)
	require.NoError(t, err)
	defer again.Close()
	m, err = qubesdb.ReadMessage(again)
	require.NoError(t, err)
	assert.Equal(t, qubesdb.Message{Type: qubesdb.CmdMultiread}, m, "and syncs again")
	v, _ := vmDB.Read("/qubes-ip")
	assert.Equal(t, "10.137.0.6", v, "keeping its mirror meanwhile")
}
