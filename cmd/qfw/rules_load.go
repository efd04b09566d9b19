package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
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
	engine   ruleSetter
	options  func(rules.Family, rules.Resolver) rules.Options
	resolver hostResolver // for dsthost; nil makes dsthost rules fail
	clients  []clientSpec
	log      *slog.Logger
}

// hostResolver looks up the addresses of one family of a dsthost name.
type hostResolver interface {
	lookup(ctx context.Context, host string, family rules.Family) ([]netip.Addr, error)
}

// ruleTree is one /qubes-firewall/<ip>/ directory.
type ruleTree struct {
	text      string            // <ip> as written
	committed bool              // /qubes-firewall/<ip> exists
	entries   map[string]string // keys relative to the directory
}

// ruleTrees groups the /qubes-firewall/ entries by address. dom0 writes the
// address's canonical text, but like the Linux agent (which hands the text
// to nft) any spelling of it is taken. Texts that are no address are
// reported and left out.
func ruleTrees(db map[string]string, log *slog.Logger) map[netip.Addr][]*ruleTree {
	byText := make(map[string]*ruleTree)
	for path, value := range db {
		rest, ok := strings.CutPrefix(path, firewallDir)
		if !ok || rest == "" {
			continue
		}
		text, key, inDir := strings.Cut(rest, "/")
		tree := byText[text]
		if tree == nil {
			tree = &ruleTree{text: text, entries: make(map[string]string)}
			byText[text] = tree
		}
		if inDir {
			tree.entries[key] = value
		} else {
			tree.committed = true
		}
	}
	trees := make(map[netip.Addr][]*ruleTree)
	for text, tree := range byText {
		ip, err := netip.ParseAddr(text)
		if err != nil || ip.Zone() != "" {
			log.Warn("rules under a path that names no address, ignored", "path", firewallDir+text)
			continue
		}
		trees[ip.Unmap()] = append(trees[ip.Unmap()], tree)
	}
	return trees
}

// apply loads the rules of every client address whose commit key is present,
// as a QubesDB watch on /qubes-firewall/<ip> would. At start-up (initial) an
// address without a commit key is reported: it stays blocked (fail closed).
// Trees without dsthost go first, so that waiting for DNS delays no one else.
func (l *ruleLoader) apply(db map[string]string, initial bool) {
	trees := ruleTrees(db, l.log)
	ctx, cancel := context.WithTimeout(context.Background(), resolveBudget)
	defer cancel()
	resolver := l.loadResolver(ctx)
	type job struct {
		client clientSpec
		ip     netip.Addr
		tree   *ruleTree
	}
	var now, later []job
	for _, c := range l.clients {
		for _, ip := range c.addrs() {
			spellings := trees[ip]
			delete(trees, ip)
			if len(spellings) > 1 && slices.ContainsFunc(spellings, func(t *ruleTree) bool { return t.committed }) {
				l.block(c, ip, spellings)
				continue
			}
			switch {
			case len(spellings) != 1 || !spellings[0].committed:
				if initial {
					l.log.Warn("no rules committed, blocking all traffic", "client", c.tap, "ip", ip,
						"reason", "QubesDB has no "+firewallDir+ip.String())
				}
			case spellings[0].needsDNS():
				later = append(later, job{c, ip, spellings[0]})
			default:
				now = append(now, job{c, ip, spellings[0]})
			}
		}
	}
	for _, j := range append(now, later...) {
		l.load(j.client, j.ip, j.tree, resolver)
	}
	for ip, spellings := range trees {
		for _, tree := range spellings {
			if tree.committed {
				l.log.Warn("rules for an address that is no client, ignored", "ip", ip, "path", firewallDir+tree.text)
			}
		}
	}
}

// block fails a client address closed when its rules are written under
// several spellings of the address: which one dom0 meant is unknown.
func (l *ruleLoader) block(c clientSpec, ip netip.Addr, spellings []*ruleTree) {
	texts := make([]string, len(spellings))
	for i, t := range spellings {
		texts[i] = firewallDir + t.text
	}
	slices.Sort(texts)
	why := "rules under several spellings of the address: " + strings.Join(texts, ", ")
	if err := l.engine.SetRules(ip, rules.BlockAll(rules.FamilyOf(ip), why)); err != nil {
		l.log.Error("applying rules failed", "client", c.tap, "ip", ip, "err", err)
		return
	}
	l.log.Warn("rules loaded", "client", c.tap, "ip", ip, "result", "blocked: "+why)
}

// needsDNS reports whether a tree names hosts to resolve.
func (t *ruleTree) needsDNS() bool {
	for _, v := range t.entries {
		if strings.Contains(v, "dsthost=") {
			return true
		}
	}
	return false
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

// loadResolver is the rules.Resolver of one load: its lookups share ctx and
// each name is asked once.
func (l *ruleLoader) loadResolver(ctx context.Context) rules.Resolver {
	if l.resolver == nil {
		return nil
	}
	return &cachingResolver{ctx: ctx, hosts: l.resolver, cache: make(map[cacheKey]cached)}
}

type cacheKey struct {
	host   string
	family rules.Family
}

type cached struct {
	addrs []netip.Addr
	err   error
}

type cachingResolver struct {
	ctx   context.Context
	hosts hostResolver
	cache map[cacheKey]cached
}

func (r *cachingResolver) LookupHost(host string, family rules.Family) ([]netip.Addr, error) {
	k := cacheKey{host, family}
	if c, ok := r.cache[k]; ok {
		return c.addrs, c.err
	}
	addrs, err := r.hosts.lookup(r.ctx, host, family)
	r.cache[k] = cached{addrs, err}
	return addrs, err
}
