// Package rules turns the Qubes firewall rules that dom0 writes for a client
// qube into a typed, immutable Ruleset and evaluates flows against it with the
// semantics of the Linux sys-firewall agent (qubes-core-agent-linux
// qubesagent/firewall.py compiled to nftables): first matching rule wins, then
// the policy; "drop" means reject with ICMP admin-prohibited; a rule set with
// any error drops everything from that client.
//
// The package does no I/O: dsthost names are resolved through a Resolver that
// the caller supplies.
package rules

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"time"
)

// Action is what a rule (or the policy) does with a matching flow.
// The zero value is Drop so that an unset verdict fails closed.
type Action uint8

const (
	// Drop rejects the flow; the firewall answers with ICMP
	// administratively-prohibited, as the Linux agent's nft rules do.
	Drop Action = iota
	// Accept lets the flow through.
	Accept
)

func (a Action) String() string {
	if a == Accept {
		return "accept"
	}
	return "drop"
}

// Proto is the protocol a rule is limited to.
type Proto uint8

const (
	ProtoAny Proto = iota
	ProtoTCP
	ProtoUDP
	// ProtoICMP is ICMP in an IPv4 rule set and ICMPv6 in an IPv6 one,
	// exactly as the agent maps "proto=icmp" to "ip6 nexthdr icmpv6".
	ProtoICMP
)

func (p Proto) String() string {
	switch p {
	case ProtoTCP:
		return "tcp"
	case ProtoUDP:
		return "udp"
	case ProtoICMP:
		return "icmp"
	}
	return "any"
}

// IP protocol numbers used by flows.
const (
	IPProtoICMP   = 1
	IPProtoTCP    = 6
	IPProtoUDP    = 17
	IPProtoICMPv6 = 58
)

// Family selects one of the two per-client rule trees that dom0 writes
// (/qubes-firewall/<ipv4>/ and /qubes-firewall/<ipv6>/).
type Family uint8

const (
	IPv4 Family = 4
	IPv6 Family = 6
)

func (f Family) String() string {
	if f == IPv6 {
		return "IPv6"
	}
	return "IPv4"
}

// FamilyOf returns the family of an address (IPv4-mapped IPv6 counts as IPv6,
// as it does on the wire).
func FamilyOf(a netip.Addr) Family {
	if a.Is4() {
		return IPv4
	}
	return IPv6
}

// PortRange is an inclusive destination port range.
type PortRange struct{ Lo, Hi uint16 }

func (p PortRange) String() string {
	if p.Lo == p.Hi {
		return strconv.Itoa(int(p.Lo))
	}
	return fmt.Sprintf("%d-%d", p.Lo, p.Hi)
}

// Rule is one parsed rule. Its match fields are already compiled for one
// address family.
type Rule struct {
	Number int    // NNNN key in QubesDB, or the rule's position in a raw list
	Line   int    // source line (1-based) when parsed from text, else 0
	Text   string // the rule as written

	Action  Action
	Proto   Proto
	DstHost string         // the dsthost name, if the destination came from one
	Dst     []netip.Prefix // destination networks; nil means any destination
	DNS     bool           // specialtarget=dns
	Ports   PortRange      // valid when HasPorts
	// HasPorts limits the rule to TCP and UDP ports in Ports.
	HasPorts bool
	ICMPType int // -1 means any type

	Expire  time.Time // zero if none (raw-list form only)
	Comment string    // raw-list form only

	// Skipped is set for rules that never match, with the reason: a
	// specialtarget=dns rule with other dstports (the agent skips it), an
	// expired rule, or a destination of the other family (raw lists hold both).
	Skipped string
}

// RuleError is a problem with one rule; any RuleError blocks the client.
type RuleError struct {
	Number int    // rule number, -1 when the error is not about a numbered rule
	Line   int    // 1-based source line, 0 if unknown
	Token  string // the offending token or key, may be empty
	Reason string
}

func (e *RuleError) Error() string {
	var b strings.Builder
	if e.Line > 0 {
		fmt.Fprintf(&b, "line %d: ", e.Line)
	}
	if e.Number >= 0 {
		fmt.Fprintf(&b, "rule %04d: ", e.Number)
	}
	if e.Token != "" {
		fmt.Fprintf(&b, "%q: ", e.Token)
	}
	b.WriteString(e.Reason)
	return b.String()
}

// Resolver resolves a dsthost name to the addresses of one family. An error or
// an empty answer makes that family's rule set fail closed, as in the agent.
type Resolver interface {
	LookupHost(host string, family Family) ([]netip.Addr, error)
}

// StaticResolver resolves from a fixed table (hosts files, tests).
type StaticResolver map[string][]netip.Addr

// LookupHost returns the table's addresses of the given family.
func (s StaticResolver) LookupHost(host string, family Family) ([]netip.Addr, error) {
	var out []netip.Addr
	for _, a := range s[host] {
		if FamilyOf(a) == family {
			out = append(out, a)
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("no %s address known for %s", family, host)
	}
	return out, nil
}

// Limits on input that dom0 or a file controls.
const (
	MaxRules      = 10000 // four-digit keys allow 0000..9999
	maxErrors     = 64    // errors kept for display; the rest are counted
	maxRuleLength = 3071  // largest QubesDB value
	maxDstAddrs   = 256   // addresses kept from one dsthost answer
)

// ruleKeys are the options the Linux agent accepts in a QubesDB rule.
var ruleKeys = map[string]bool{
	"action": true, "proto": true, "dst4": true, "dst6": true, "dsthost": true,
	"dstports": true, "specialtarget": true, "icmptype": true,
}

// parseTokens splits a rule into its key=value tokens. QubesDB values are
// split on single spaces, like the agent does (so a doubled or trailing space
// is an empty token, an error); raw lists (qvm-firewall --raw) may also carry
// expire= and a trailing comment= that takes the rest of the line.
func parseTokens(text string, raw bool, errf func(tok, why string)) map[string]string {
	opts := make(map[string]string, 4)
	var toks []string
	if raw {
		if i := commentStart(text); i >= 0 {
			opts["comment"] = strings.TrimSpace(text[i+len("comment="):])
			text = text[:i]
		}
		toks = strings.Fields(text)
	} else {
		toks = strings.Split(text, " ")
	}
	for _, tok := range toks {
		if tok == "" {
			errf("", "empty token (a doubled, leading or trailing space)")
			continue
		}
		key, value, ok := strings.Cut(tok, "=")
		switch {
		case !ok:
			errf(tok, "not a key=value token")
			continue
		case strings.Contains(value, "="):
			errf(tok, "more than one '=' in a token")
			continue
		case !ruleKeys[key] && !(raw && key == "expire"):
			errf(tok, "unknown option "+strconv.Quote(key))
			continue
		}
		if _, dup := opts[key]; dup {
			errf(tok, "duplicate option "+strconv.Quote(key))
			continue
		}
		opts[key] = value
	}
	return opts
}

// commentStart is where a comment= token starts in a raw rule, or -1.
func commentStart(text string) int {
	for i := 0; ; {
		j := strings.Index(text[i:], "comment=")
		if j < 0 {
			return -1
		}
		if i+j == 0 || text[i+j-1] == ' ' || text[i+j-1] == '\t' {
			return i + j
		}
		i += j + 1
	}
}
