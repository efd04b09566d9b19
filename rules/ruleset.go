package rules

import (
	"bufio"
	"fmt"
	"net/netip"
	"sort"
	"strconv"
	"strings"
	"time"
)

// DefaultDNSServers are the addresses every Qubes client is told to use for
// DNS (/qubes-primary-dns and /qubes-secondary-dns).
var DefaultDNSServers = []netip.Addr{
	netip.AddrFrom4([4]byte{10, 139, 1, 1}),
	netip.AddrFrom4([4]byte{10, 139, 1, 2}),
}

// Options say how to compile a rule tree.
type Options struct {
	// Family of the tree: IPv4 for /qubes-firewall/<ipv4>/, IPv6 for
	// /qubes-firewall/<ipv6>/.
	Family Family
	// DNSServers are what specialtarget=dns matches (only those of Family
	// are used, as the agent's per-family dns-addr set). Nil means
	// DefaultDNSServers.
	DNSServers []netip.Addr
	// Resolver resolves dsthost; nil makes any dsthost rule an error.
	Resolver Resolver
	// Now decides which raw-list rules have expired; zero means time.Now().
	Now time.Time
}

func (o *Options) now() time.Time {
	if o.Now.IsZero() {
		return time.Now()
	}
	return o.Now
}

// Flow is what a rule set is asked about: the first packet of a connection
// from a client.
type Flow struct {
	Proto    uint8 // IP protocol number (IPProtoTCP, ...)
	Src, Dst netip.Addr
	SrcPort  uint16 // TCP and UDP
	DstPort  uint16 // TCP and UDP
	ICMPType uint8  // ICMP and ICMPv6
}

// Verdict is the answer for a flow.
type Verdict struct {
	Action Action
	// Index is the deciding rule's position in Rules(), or -1 when the
	// policy (or the block-all fallback) decided.
	Index int
	// Number is the deciding rule's number as in QubesDB (NNNN), or -1.
	Number int
	// Text is the deciding rule's text, or "policy".
	Text string
	// Reason explains the verdict in one line.
	Reason string
}

// PolicyText is Verdict.Text when no rule decided.
const PolicyText = "policy"

// Ruleset is the immutable, compiled rule tree of one client address. The
// zero value is not useful; build one with ParseQubesDB, ParseRaw or BlockAll.
type Ruleset struct {
	family   Family
	rules    []Rule
	verdicts []Verdict // verdicts[i] is returned when rules[i] matches
	dns      []netip.Addr
	policy   Verdict
	errs     []error
	dropped  int // errors beyond maxErrors
}

// Family is the address family of the tree.
func (rs *Ruleset) Family() Family { return rs.family }

// Rules returns the compiled rules in evaluation order. Do not modify them.
func (rs *Ruleset) Rules() []Rule { return rs.rules }

// Policy is what happens when no rule matches.
func (rs *Ruleset) Policy() Action { return rs.policy.Action }

// Blocked reports whether the rule set failed to parse, so that all traffic
// of the client is dropped.
func (rs *Ruleset) Blocked() bool { return len(rs.errs) > 0 }

// Errors lists the problems found (at most a bounded number of them).
func (rs *Ruleset) Errors() []error { return rs.errs }

// ErrorCount is the number of problems found, including those not kept.
func (rs *Ruleset) ErrorCount() int { return len(rs.errs) + rs.dropped }

// Check evaluates a flow: the first matching rule decides, else the policy.
// It does not allocate.
func (rs *Ruleset) Check(f Flow) Verdict {
	if len(rs.errs) > 0 {
		return rs.policy // the block-all verdict
	}
	icmp := uint8(IPProtoICMP)
	if rs.family == IPv6 {
		icmp = IPProtoICMPv6
	}
	for i := range rs.rules {
		if rs.rules[i].matches(&f, icmp, rs.dns) {
			return rs.verdicts[i]
		}
	}
	return rs.policy
}

func (r *Rule) matches(f *Flow, icmp uint8, dns []netip.Addr) bool {
	if r.Skipped != "" {
		return false
	}
	switch r.Proto {
	case ProtoTCP:
		if f.Proto != IPProtoTCP {
			return false
		}
	case ProtoUDP:
		if f.Proto != IPProtoUDP {
			return false
		}
	case ProtoICMP:
		if f.Proto != icmp {
			return false
		}
	}
	if r.HasPorts {
		if f.Proto != IPProtoTCP && f.Proto != IPProtoUDP {
			return false
		}
		if f.DstPort < r.Ports.Lo || f.DstPort > r.Ports.Hi {
			return false
		}
	}
	if r.ICMPType >= 0 && int(f.ICMPType) != r.ICMPType {
		return false
	}
	if r.Dst != nil && !containsAddr(r.Dst, f.Dst) {
		return false
	}
	if r.DNS && !isOneOf(dns, f.Dst) {
		return false
	}
	return true
}

func containsAddr(ps []netip.Prefix, a netip.Addr) bool {
	for _, p := range ps {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

func isOneOf(as []netip.Addr, a netip.Addr) bool {
	for _, x := range as {
		if x == a {
			return true
		}
	}
	return false
}

// builder collects rules and errors while a tree is parsed.
type builder struct {
	opt     Options
	raw     bool
	rules   []Rule
	errs    []error
	dropped int
	policy  Action
}

func (b *builder) fail(number, line int, tok, why string) {
	if len(b.errs) >= maxErrors {
		b.dropped++
		return
	}
	b.errs = append(b.errs, &RuleError{Number: number, Line: line, Token: tok, Reason: why})
}

func (b *builder) add(number, line int, text string) {
	if len(b.rules) >= MaxRules {
		b.fail(number, line, "", fmt.Sprintf("more than %d rules", MaxRules))
		return
	}
	errf := func(tok, why string) { b.fail(number, line, tok, why) }
	if len(text) > maxRuleLength {
		errf("", fmt.Sprintf("rule longer than %d bytes", maxRuleLength))
		return
	}
	r := Rule{Number: number, Line: line, Text: text}
	compileRule(&r, parseTokens(text, b.raw, errf), b.raw, &b.opt, errf)
	b.rules = append(b.rules, r)
}

func (b *builder) finish() *Ruleset {
	rs := &Ruleset{family: b.opt.Family, rules: b.rules, errs: b.errs, dropped: b.dropped}
	servers := b.opt.DNSServers
	if servers == nil {
		servers = DefaultDNSServers
	}
	for _, a := range servers {
		if FamilyOf(a) == rs.family {
			rs.dns = append(rs.dns, a)
		}
	}
	if len(rs.errs) > 0 {
		rs.policy = Verdict{Action: Drop, Index: -1, Number: -1, Text: PolicyText,
			Reason: fmt.Sprintf("the %s rules are invalid, so all %s traffic of this client is blocked (%v)",
				rs.family, rs.family, rs.errs[0])}
		return rs
	}
	rs.verdicts = make([]Verdict, len(rs.rules))
	for i := range rs.rules {
		r := &rs.rules[i]
		rs.verdicts[i] = Verdict{Action: r.Action, Index: i, Number: r.Number, Text: r.Text,
			Reason: fmt.Sprintf("rule %04d matched: %s", r.Number, describe(r))}
	}
	how := "accept"
	if b.policy == Drop {
		how = "drop (reject with ICMP admin-prohibited)"
	}
	rs.policy = Verdict{Action: b.policy, Index: -1, Number: -1, Text: PolicyText,
		Reason: "no rule matched, policy is " + how}
	return rs
}

// Entry is one QubesDB entry of a client's rule tree, with its key relative
// to /qubes-firewall/<ip>/ ("policy", "0000", ...).
type Entry struct {
	Key, Value string
	Line       int // source line, 0 if none
}

// ParseQubesDB compiles the entries of /qubes-firewall/<ip>/ (keys relative
// to that directory) as the Linux agent does: the policy key is required, all
// other keys are four-digit rule numbers taken in order (gaps allowed).
func ParseQubesDB(entries map[string]string, opt Options) *Ruleset {
	list := make([]Entry, 0, len(entries))
	for k, v := range entries {
		list = append(list, Entry{Key: k, Value: v})
	}
	return ParseEntries(list, opt)
}

// ParseEntries is ParseQubesDB for entries that carry source lines.
// A key given twice is an error.
func ParseEntries(entries []Entry, opt Options) *Ruleset {
	b := &builder{opt: opt}
	sorted := append([]Entry(nil), entries...)
	sort.SliceStable(sorted, func(i, j int) bool { return sorted[i].Key < sorted[j].Key })
	hasPolicy := false
	for i, e := range sorted {
		if i > 0 && sorted[i-1].Key == e.Key {
			b.fail(-1, e.Line, e.Key, "key given twice")
			continue
		}
		if e.Key == "policy" {
			hasPolicy = true
			switch e.Value {
			case "accept":
				b.policy = Accept
			case "drop":
				b.policy = Drop
			default:
				b.fail(-1, e.Line, "policy="+e.Value, "policy must be accept or drop")
			}
			continue
		}
		n, err := strconv.Atoi(e.Key)
		if len(e.Key) != 4 || err != nil || n < 0 || strings.ContainsAny(e.Key, "+-") {
			b.fail(-1, e.Line, e.Key, "unexpected key: rule keys are four digits (0000-9999)")
			continue
		}
		b.add(n, e.Line, e.Value)
	}
	if !hasPolicy {
		b.fail(-1, 0, "", "no policy defined")
	}
	return b.finish()
}

// ParseRaw compiles rules in the form `qvm-firewall VM list --raw` prints:
// one rule per line, numbered from 0 in order. Empty lines and lines starting
// with '#' are ignored. expire= and comment= (the rest of the line) are
// allowed; expired rules and rules for the other family never match, exactly
// as dom0 leaves them out of the tree it writes. The policy is drop.
func ParseRaw(text string, opt Options) *Ruleset {
	b := &builder{opt: opt, raw: true, policy: Drop}
	sc := bufio.NewScanner(strings.NewReader(text))
	sc.Buffer(make([]byte, 0, 4096), maxRuleLength+1)
	line, number := 0, 0
	for sc.Scan() {
		line++
		s := strings.TrimSpace(sc.Text())
		if s == "" || strings.HasPrefix(s, "#") {
			continue
		}
		b.add(number, line, s)
		number++
	}
	if err := sc.Err(); err != nil {
		b.fail(-1, line+1, "", "cannot read rules: "+err.Error())
	}
	return b.finish()
}

// BlockAll is a rule set that drops everything, e.g. for a client whose rules
// could not be read at all.
func BlockAll(family Family, why string) *Ruleset {
	b := &builder{opt: Options{Family: family}}
	b.fail(-1, 0, "", why)
	return b.finish()
}
