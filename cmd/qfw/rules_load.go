package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"time"

	"qfw/rules"
)

// firewallDir holds one rule tree per client address (specs/qubes.md 3.1):
// /qubes-firewall/<ip>/<key> entries, committed by writing /qubes-firewall/<ip>.
const firewallDir = "/qubes-firewall/"

// resolveBudget bounds the dsthost lookups of one rule load together, so a
// slow resolver cannot stall a reload for long.
const resolveBudget = 10 * time.Second

// ruleSetter is the part of the engine that takes rules.
type ruleSetter interface {
	SetRules(clientIP netip.Addr, rs *rules.Ruleset) error
}

// ruleLoader applies the rule trees of a QubesDB snapshot to the clients.
type ruleLoader struct {
	engine  ruleSetter
	options func(rules.Family, rules.Resolver) rules.Options
	clients []clientSpec
	log     *slog.Logger
}

// ruleTree is one /qubes-firewall/<ip>/ directory.
type ruleTree struct {
	committed bool              // /qubes-firewall/<ip> exists
	entries   map[string]string // keys relative to the directory
}

// ruleTrees groups the /qubes-firewall/ entries by the <ip> text.
func ruleTrees(db map[string]string) map[string]*ruleTree {
	trees := make(map[string]*ruleTree)
	tree := func(ip string) *ruleTree {
		if trees[ip] == nil {
			trees[ip] = &ruleTree{entries: make(map[string]string)}
		}
		return trees[ip]
	}
	for path, value := range db {
		rest, ok := strings.CutPrefix(path, firewallDir)
		if !ok || rest == "" {
			continue
		}
		ip, key, inDir := strings.Cut(rest, "/")
		if !inDir {
			tree(ip).committed = true
			continue
		}
		tree(ip).entries[key] = value
	}
	return trees
}

// apply loads the rules of every client address whose commit key is present,
// as a QubesDB watch on /qubes-firewall/<ip> would. At start-up (initial) an
// address without a commit key is reported: it stays blocked (fail closed).
func (l *ruleLoader) apply(db map[string]string, initial bool) {
	trees := ruleTrees(db)
	resolver := &systemResolver{deadline: time.Now().Add(resolveBudget)}
	for _, c := range l.clients {
		for _, ip := range c.addrs() {
			// dom0 writes the address as Python prints it: the canonical text.
			tree := trees[ip.String()]
			delete(trees, ip.String())
			if tree == nil || !tree.committed {
				if initial {
					l.log.Warn("no rules committed, blocking all traffic", "client", c.tap, "ip", ip,
						"reason", "QubesDB has no "+firewallDir+ip.String())
				}
				continue
			}
			l.load(c, ip, tree, resolver)
		}
	}
	for ip, tree := range trees {
		if tree.committed {
			l.log.Warn("rules for an address that is no client, ignored", "ip", ip)
		}
	}
}

func (l *ruleLoader) load(c clientSpec, ip netip.Addr, tree *ruleTree, resolver rules.Resolver) {
	family := rules.FamilyOf(ip)
	rs := rules.ParseQubesDB(tree.entries, l.options(family, resolver))
	if err := l.engine.SetRules(ip, rs); err != nil {
		l.log.Error("applying rules failed", "client", c.tap, "ip", ip, "err", err)
		return
	}
	if rs.Blocked() {
		l.log.Warn("rules loaded", "client", c.tap, "ip", ip,
			"result", "blocked: "+oneLine(errors.Join(rs.Errors()...)))
		return
	}
	l.log.Info("rules loaded", "client", c.tap, "ip", ip, "result", fmt.Sprintf("ok, %d rules", len(rs.Rules())))
}

// systemResolver resolves dsthost names through this machine's resolver, as
// the Linux agent's getaddrinfo does; all lookups share one deadline.
type systemResolver struct {
	deadline time.Time
}

func (r *systemResolver) LookupHost(host string, family rules.Family) ([]netip.Addr, error) {
	ctx, cancel := context.WithDeadline(context.Background(), r.deadline)
	defer cancel()
	network := "ip4"
	if family == rules.IPv6 {
		network = "ip6"
	}
	addrs, err := net.DefaultResolver.LookupNetIP(ctx, network, host)
	for i, a := range addrs {
		addrs[i] = a.Unmap()
	}
	return addrs, err
}
