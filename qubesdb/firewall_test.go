package qubesdb

import (
	"context"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestFirewallCommitIP(t *testing.T) {
	for path, want := range map[string]string{
		"/qubes-firewall/10.137.0.3":            "10.137.0.3",
		"/qubes-firewall/fd09:24ef:4179::a89:3": "fd09:24ef:4179::a89:3",
	} {
		ip, ok := FirewallCommitIP(path)
		assert.True(t, ok, path)
		assert.Equal(t, want, ip)
	}
	for _, path := range []string{
		"/qubes-firewall/", "/qubes-firewall", "/qubes-firewall/10.137.0.3/",
		"/qubes-firewall/10.137.0.3/0000", "/qubes-firewall-handled/10.137.0.3", "/other/10.137.0.3",
	} {
		_, ok := FirewallCommitIP(path)
		assert.False(t, ok, path)
	}
	assert.Equal(t, "/qubes-firewall/10.137.0.3", FirewallCommitPath("10.137.0.3"))
}

func TestFirewallRulesAndClients(t *testing.T) {
	db := NewDB(Limits{})
	mustWrite(t, db,
		"/qubes-firewall/10.137.0.3", "",
		"/qubes-firewall/10.137.0.3/policy", "drop",
		"/qubes-firewall/10.137.0.3/0000", "action=drop proto=icmp",
		"/qubes-firewall/10.137.0.3/0002", "action=accept",
		"/qubes-firewall/10.137.0.3/odd/key", "kept for the parser to refuse",
		"/qubes-firewall/10.137.0.30/policy", "drop",
		"/qubes-firewall/10.137.0.3-x/policy", "drop",
		"/qubes-firewall/fd09:24ef:4179::a89:3", "",
		"/qubes-firewall-handled/10.137.0.9", "1",
	)
	assert.Equal(t, map[string]string{
		"policy":  "drop",
		"0000":    "action=drop proto=icmp",
		"0002":    "action=accept",
		"odd/key": "kept for the parser to refuse",
	}, FirewallRules(db, "10.137.0.3"))
	assert.Equal(t, map[string]string{"policy": "drop"}, FirewallRules(db, "10.137.0.30"))
	assert.Nil(t, FirewallRules(db, "10.137.0.9"))
	assert.Nil(t, FirewallRules(db, "fd09:24ef:4179::a89:3"), "commit key alone has no rules")
	assert.Equal(t, []string{"10.137.0.3", "10.137.0.3-x", "10.137.0.30", "fd09:24ef:4179::a89:3"}, FirewallClients(db))
}

func nextFirewall(t *testing.T, ctx context.Context, fw *FirewallWatch) FirewallEvent {
	t.Helper()
	ev, err := fw.Next(ctx)
	require.NoError(t, err)
	return ev
}

func TestWatchFirewallOnlyCommits(t *testing.T) {
	ctx := testContext(t)
	db := NewDB(Limits{})
	fw, err := WatchFirewall(db)
	require.NoError(t, err)
	defer fw.Close()

	// A rule edit exactly as qubesd does it, for two clients.
	for _, ip := range []string{"10.137.0.3", "fd09:24ef:4179::a89:3"} {
		_, err = db.Rm("/qubes-firewall/" + ip + "/")
		require.NoError(t, err)
		mustWrite(t, db,
			"/qubes-firewall/"+ip+"/policy", "drop",
			"/qubes-firewall/"+ip+"/0000", "action=accept")
		_, err = db.Rm("/qubes-firewall/" + ip + "/") // subtree RM: no event
		require.NoError(t, err)
		mustWrite(t, db, "/qubes-firewall/"+ip, "")
	}
	mustWrite(t, db, "/connected-ips", "10.137.0.3", "/qubes-ip", "10.137.0.6", "/qubes-firewall-handled/10.137.0.3", "1")
	mustWrite(t, db, "/connected-ips6", "")
	_, err = db.Rm("/connected-ips6")
	require.NoError(t, err)
	_, err = db.Rm("/qubes-firewall/10.137.0.3") // RM of the commit key: no reload
	require.NoError(t, err)

	assert.Equal(t, FirewallEvent{Kind: RulesCommitted, ClientIP: "10.137.0.3"}, nextFirewall(t, ctx, fw))
	assert.Equal(t, FirewallEvent{Kind: RulesCommitted, ClientIP: "fd09:24ef:4179::a89:3"}, nextFirewall(t, ctx, fw))
	assert.Equal(t, FirewallEvent{Kind: ConnectedIPsChanged, Family: 4}, nextFirewall(t, ctx, fw))
	assert.Equal(t, FirewallEvent{Kind: ConnectedIPsChanged, Family: 6}, nextFirewall(t, ctx, fw))
	assert.Equal(t, FirewallEvent{Kind: ConnectedIPsChanged, Family: 6}, nextFirewall(t, ctx, fw), "removal")

	short, cancel := context.WithCancel(ctx)
	cancel()
	_, err = fw.Next(short)
	assert.ErrorIs(t, err, context.Canceled, "nothing else may be reported")
}

func TestWatchFirewallResyncAndClose(t *testing.T) {
	ctx := testContext(t)
	db := NewDB(Limits{})
	fw, err := WatchFirewall(db)
	require.NoError(t, err)
	for range WatchQueueLen + 1 {
		mustWrite(t, db, "/qubes-firewall/10.137.0.3/0000", "action=accept")
	}
	assert.Equal(t, FirewallEvent{Kind: FirewallResync}, nextFirewall(t, ctx, fw))
	fw.Close()
	_, err = fw.Next(ctx)
	assert.ErrorIs(t, err, ErrClosed)
}
