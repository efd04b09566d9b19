package main

import (
	"bytes"
	"context"
	"log/slog"
	"net/netip"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"qfw/rules"
)

// recordingEngine remembers the rule sets it was given.
type recordingEngine map[netip.Addr]*rules.Ruleset

func (r recordingEngine) SetRules(ip netip.Addr, rs *rules.Ruleset) error {
	r[ip] = rs
	return nil
}

func newLoader(clients ...clientSpec) (*ruleLoader, recordingEngine, *bytes.Buffer) {
	var logs bytes.Buffer
	engine := recordingEngine{}
	return &ruleLoader{
		engine:  engine,
		options: func(f rules.Family, r rules.Resolver) rules.Options { return rules.Options{Family: f, Resolver: r} },
		clients: clients,
		log:     slog.New(slog.NewTextHandler(&logs, nil)),
	}, engine, &logs
}

var (
	client5 = clientSpec{tap: "c5", ip4: netip.MustParseAddr("10.137.0.5"), ip6: netip.MustParseAddr("fd09:24ef:4179::a89:5")}
	client7 = clientSpec{tap: "c7", ip4: netip.MustParseAddr("10.137.0.7")}
)

func TestApplyLoadsCommittedTreesOnly(t *testing.T) {
	loader, engine, logs := newLoader(client5, client7)
	loader.apply(map[string]string{
		"/qubes-firewall/10.137.0.5":                   "",
		"/qubes-firewall/10.137.0.5/policy":            "drop",
		"/qubes-firewall/10.137.0.5/0000":              "action=accept proto=tcp dstports=80-80",
		"/qubes-firewall/10.137.0.5/0002":              "action=accept proto=icmp",
		"/qubes-firewall/fd09:24ef:4179::a89:5":        "",
		"/qubes-firewall/fd09:24ef:4179::a89:5/0000":   "action=accept dst4=1.2.3.4/32", // dst4 in an IPv6 tree
		"/qubes-firewall/fd09:24ef:4179::a89:5/policy": "drop",
		"/qubes-firewall/10.137.0.7/policy":            "drop", // no commit key
		"/qubes-firewall/10.137.0.7/0000":              "action=accept",
		"/qubes-firewall/10.137.0.99":                  "", // not a client
	}, true)

	require.Contains(t, engine, client5.ip4)
	rs4 := engine[client5.ip4]
	assert.False(t, rs4.Blocked())
	assert.Len(t, rs4.Rules(), 2)
	assert.Equal(t, rules.Accept, rs4.Check(rules.Flow{Proto: rules.IPProtoTCP, Src: client5.ip4,
		Dst: netip.MustParseAddr("1.1.1.1"), DstPort: 80}).Action)

	require.Contains(t, engine, client5.ip6)
	assert.True(t, engine[client5.ip6].Blocked(), "dst4 in the IPv6 tree blocks the IPv6 family")
	assert.NotContains(t, engine, client7.ip4, "uncommitted tree must not be loaded")

	out := logs.String()
	assert.Contains(t, out, `result="ok, 2 rules"`)
	assert.Contains(t, out, "result=\"blocked: ")
	assert.Contains(t, out, "no rules committed, blocking all traffic")
	assert.Contains(t, out, "QubesDB has no /qubes-firewall/10.137.0.7")
	assert.Contains(t, out, "ip=10.137.0.99")
}

func TestApplyOnReloadSkipsUncommittedQuietly(t *testing.T) {
	loader, engine, logs := newLoader(client7)
	loader.apply(map[string]string{"/qubes-firewall/10.137.0.7/policy": "drop"}, false)
	assert.Empty(t, engine)
	assert.NotContains(t, logs.String(), "no rules committed")
}

func TestApplyBlocksUnparsableTree(t *testing.T) {
	loader, engine, logs := newLoader(client7)
	loader.apply(map[string]string{
		"/qubes-firewall/10.137.0.7":      "",
		"/qubes-firewall/10.137.0.7/0000": "action=accept",
		// no policy key: the agent refuses the tree
	}, false)
	require.Contains(t, engine, client7.ip4)
	assert.True(t, engine[client7.ip4].Blocked())
	assert.Contains(t, logs.String(), "blocked: ")
	assert.Contains(t, logs.String(), "policy")
}

// countingResolver answers every name with one address and counts lookups.
type countingResolver struct{ calls int }

func (r *countingResolver) lookup(_ context.Context, host string, _ rules.Family) ([]netip.Addr, error) {
	r.calls++
	return []netip.Addr{netip.MustParseAddr("192.0.2.9")}, nil
}

// orderEngine records the order of SetRules calls.
type orderEngine struct{ order []netip.Addr }

func (o *orderEngine) SetRules(ip netip.Addr, rs *rules.Ruleset) error {
	o.order = append(o.order, ip)
	return nil
}

func TestApplyResolvesDsthostOnceAndLast(t *testing.T) {
	loader, _, _ := newLoader(client5, client7)
	engine := &orderEngine{}
	hosts := &countingResolver{}
	loader.engine, loader.resolver = engine, hosts
	loader.apply(map[string]string{
		"/qubes-firewall/10.137.0.5":        "",
		"/qubes-firewall/10.137.0.5/policy": "drop",
		"/qubes-firewall/10.137.0.5/0000":   "action=accept proto=tcp dsthost=a.example",
		"/qubes-firewall/10.137.0.5/0001":   "action=accept proto=udp dsthost=a.example",
		"/qubes-firewall/10.137.0.7":        "",
		"/qubes-firewall/10.137.0.7/policy": "drop",
		"/qubes-firewall/10.137.0.7/0000":   "action=accept",
	}, true)
	assert.Equal(t, []netip.Addr{client7.ip4, client5.ip4}, engine.order, "the client waiting for DNS goes last")
	assert.Equal(t, 1, hosts.calls, "one lookup per name and load")
}

func TestApplyTakesAnySpellingOfTheAddress(t *testing.T) {
	loader, engine, logs := newLoader(client5)
	loader.apply(map[string]string{
		"/qubes-firewall/FD09:24EF:4179:0::A89:5":        "",
		"/qubes-firewall/FD09:24EF:4179:0::A89:5/policy": "drop",
		"/qubes-firewall/FD09:24EF:4179:0::A89:5/0000":   "action=accept",
		"/qubes-firewall/not-an-address":                 "",
	}, false)
	require.Contains(t, engine, client5.ip6)
	assert.False(t, engine[client5.ip6].Blocked())
	assert.Contains(t, logs.String(), "path=/qubes-firewall/not-an-address")
}

func TestApplyBlocksAmbiguousSpellings(t *testing.T) {
	loader, engine, logs := newLoader(client5)
	loader.apply(map[string]string{
		"/qubes-firewall/fd09:24ef:4179::a89:5":        "",
		"/qubes-firewall/fd09:24ef:4179::a89:5/policy": "drop",
		"/qubes-firewall/fd09:24ef:4179::a89:5/0000":   "action=accept",
		"/qubes-firewall/FD09:24EF:4179::A89:5":        "",
		"/qubes-firewall/FD09:24EF:4179::A89:5/policy": "drop",
	}, false)
	require.Contains(t, engine, client5.ip6)
	assert.True(t, engine[client5.ip6].Blocked())
	assert.Contains(t, logs.String(), "rules under several spellings of the address")
}

func TestReloadLeavesUncommittedClientsAlone(t *testing.T) {
	loader, engine, _ := newLoader(client5, client7)
	db := map[string]string{
		"/qubes-firewall/10.137.0.5":        "",
		"/qubes-firewall/10.137.0.5/policy": "drop",
		"/qubes-firewall/10.137.0.5/0000":   "action=accept",
		"/qubes-firewall/10.137.0.7":        "",
		"/qubes-firewall/10.137.0.7/policy": "drop",
		"/qubes-firewall/10.137.0.7/0000":   "action=accept",
	}
	loader.apply(db, true)
	first7 := engine[client7.ip4]

	// dom0 is midway through rewriting c7's tree: no commit key yet.
	delete(db, "/qubes-firewall/10.137.0.7")
	db["/qubes-firewall/10.137.0.7/0000"] = "action=drop"
	db["/qubes-firewall/10.137.0.5/0000"] = "action=drop proto=icmp"
	first5 := engine[client5.ip4]
	loader.apply(db, false)
	assert.Same(t, first7, engine[client7.ip4], "c7 keeps its rules until the commit key comes")
	assert.NotSame(t, first5, engine[client5.ip4], "c5 is reloaded")
	assert.Equal(t, "action=drop proto=icmp", engine[client5.ip4].Rules()[0].Text)
}
