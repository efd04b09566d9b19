package qubesdb

import (
	"context"
	"slices"
	"strings"
)

// FirewallPrefix is the subtree where dom0 writes the rules of each client
// (spec qubes.md section 3.1): /qubes-firewall/<ip>/policy and
// /qubes-firewall/<ip>/NNNN, then the empty commit key /qubes-firewall/<ip>.
const FirewallPrefix = "/qubes-firewall/"

// FirewallCommitPath returns the commit key of a client's rules.
func FirewallCommitPath(clientIP string) string { return FirewallPrefix + clientIP }

// FirewallCommitIP returns the client address named by a commit key, a path
// under FirewallPrefix with exactly two slashes (how the Linux agent tells
// the commit from the rule keys and the subtree RM).
func FirewallCommitIP(path string) (string, bool) {
	ip, ok := strings.CutPrefix(path, FirewallPrefix)
	if !ok || ip == "" || strings.Contains(ip, "/") {
		return "", false
	}
	return ip, true
}

// FirewallRules returns the rule entries of a client keyed relative to
// /qubes-firewall/<ip>/ ("policy" -> "drop", "0000" -> "action=accept"),
// or nil if there are none. Keys and values are returned as stored, odd ones
// included, so that the rule parser can refuse them (fail closed).
func FirewallRules(db *DB, clientIP string) map[string]string {
	prefix := FirewallCommitPath(clientIP) + "/"
	entries := db.Multiread(prefix)
	if len(entries) == 0 {
		return nil
	}
	rules := make(map[string]string, len(entries))
	for _, e := range entries {
		rules[e.Path[len(prefix):]] = e.Value
	}
	return rules
}

// FirewallClients returns, sorted, every client address that has anything
// under FirewallPrefix (the third path component, as the Linux agent lists
// them at startup).
func FirewallClients(db *DB) []string {
	var ips []string
	for _, e := range db.Multiread(FirewallPrefix) {
		ip, _, _ := strings.Cut(e.Path[len(FirewallPrefix):], "/")
		if ip != "" {
			ips = append(ips, ip)
		}
	}
	// Sorted by full path, one address's entries need not be adjacent:
	// "a" < "a-b" < "a/0000".
	slices.Sort(ips)
	return slices.Compact(ips)
}

// FirewallEventKind says what a FirewallEvent is about.
type FirewallEventKind uint8

const (
	// RulesCommitted: the commit key of ClientIP was written; reload its
	// rules with FirewallRules.
	RulesCommitted FirewallEventKind = iota + 1
	// ConnectedIPsChanged: /connected-ips (Family 4) or /connected-ips6
	// (Family 6) was written or removed.
	ConnectedIPsChanged
	// FirewallResync: events were lost; reload every client and both
	// connected-ips lists.
	FirewallResync
)

// FirewallEvent is one thing a firewall must react to.
type FirewallEvent struct {
	Kind     FirewallEventKind
	ClientIP string // RulesCommitted
	Family   int    // ConnectedIPsChanged: 4 or 6
}

// FirewallWatch reports rule commits and connected-ips changes. Rule writes
// and subtree RMs are not reported: a client's rules are reloaded only when
// its commit key is written, after dom0 wrote the whole new rule set.
type FirewallWatch struct{ w *Watch }

// WatchFirewall starts a FirewallWatch. Started before a Client syncs, it
// also reports every client and connected-ips list in the synced database.
func WatchFirewall(db *DB) (*FirewallWatch, error) {
	w, err := db.Watch(FirewallPrefix, KeyConnectedIPs, KeyConnectedIPs6)
	if err != nil {
		return nil, err
	}
	return &FirewallWatch{w: w}, nil
}

// Next waits for the next firewall event.
func (fw *FirewallWatch) Next(ctx context.Context) (FirewallEvent, error) {
	for {
		ev, err := fw.w.Next(ctx)
		if err != nil {
			return FirewallEvent{}, err
		}
		switch {
		case ev.Op == OpOverflow:
			return FirewallEvent{Kind: FirewallResync}, nil
		case ev.Path == KeyConnectedIPs:
			return FirewallEvent{Kind: ConnectedIPsChanged, Family: 4}, nil
		case ev.Path == KeyConnectedIPs6:
			return FirewallEvent{Kind: ConnectedIPsChanged, Family: 6}, nil
		case ev.Op == OpWrite:
			if ip, ok := FirewallCommitIP(ev.Path); ok {
				return FirewallEvent{Kind: RulesCommitted, ClientIP: ip}, nil
			}
		}
	}
}

// Close stops the watch.
func (fw *FirewallWatch) Close() { fw.w.Close() }
