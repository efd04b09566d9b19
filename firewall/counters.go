package firewall

import (
	"net/netip"
	"slices"

	"qfw/rules"
)

// Counters is a snapshot of the engine's counters.
type Counters struct {
	Flows      int // entries in the conntrack table
	FragTrains int // entries in the IPv4 fragment train table
	Uplink     UplinkCounters
	Clients    []ClientCounters // sorted by IPv4 address
}

// UplinkCounters count what arrived on the uplink and was not forwarded.
type UplinkCounters struct {
	Dropped       uint64 // not of a known flow, not for us, malformed
	FlowTableFull uint64 // new flows refused because the table (or a share) was full
	FragTableFull uint64 // first fragments dropped because the fragment train table was full
	WriteErrors   uint64 // batches the uplink failed to send
}

// ClientCounters count one client's traffic.
type ClientCounters struct {
	Name               string
	IP4, IP6           netip.Addr
	Flows              int
	FragTrains         int    // fragment trains of the client's flows, both directions
	TxPackets, TxBytes uint64 // forwarded from the client to the uplink
	RxPackets, RxBytes uint64 // forwarded from the uplink to the client
	Accepted, Rejected uint64 // new flows
	Dropped            uint64 // frames dropped without an answer (spoofed, broadcast, malformed, ...)
	Rules4, Rules6     []RuleCounter
}

// RuleCounter counts the flows one rule (or the policy, Number -1) decided
// and the bytes of the flows it accepted, both directions.
type RuleCounter struct {
	Number             int
	Text               string
	Accepted, Rejected uint64
	Bytes              uint64
}

// ruleTable is a client's rule set of one family with a counter per rule and
// one for the policy (last).
type ruleTable struct {
	rules  *rules.Ruleset // nil: no rules yet, everything is rejected
	counts []ruleCount
}

type ruleCount struct{ accepted, rejected, bytes uint64 }

// noRules is the verdict for a family whose rules were never set.
var noRules = rules.Verdict{Action: rules.Drop, Index: -1, Number: -1, Text: rules.PolicyText, Reason: "no rules received yet"}

func newRuleTable(rs *rules.Ruleset) *ruleTable {
	n := 1
	if rs != nil {
		n += len(rs.Rules())
	}
	return &ruleTable{rules: rs, counts: make([]ruleCount, n)}
}

// check evaluates a flow and returns the counter of the deciding rule.
func (t *ruleTable) check(f rules.Flow) (rules.Verdict, *ruleCount) {
	if t == nil {
		return noRules, nil
	}
	v := noRules
	if t.rules != nil {
		v = t.rules.Check(f)
	}
	i := v.Index
	if i < 0 || i >= len(t.counts) {
		i = len(t.counts) - 1
	}
	return v, &t.counts[i]
}

func (t *ruleTable) snapshot() []RuleCounter {
	if t == nil {
		return nil
	}
	out := make([]RuleCounter, len(t.counts))
	var rs []rules.Rule
	if t.rules != nil {
		rs = t.rules.Rules()
	}
	for i, n := range t.counts {
		rc := RuleCounter{Number: -1, Text: rules.PolicyText, Accepted: n.accepted, Rejected: n.rejected, Bytes: n.bytes}
		if i < len(rs) {
			rc.Number, rc.Text = rs[i].Number, rs[i].Text
		}
		out[i] = rc
	}
	return out
}

// Counters returns a snapshot of all counters.
func (e *Engine) Counters() Counters {
	e.mu.Lock()
	defer e.mu.Unlock()
	out := Counters{Flows: e.flows.used, FragTrains: e.frags.used, Uplink: e.uplinkCounters}
	for ip, c := range e.clients {
		if ip != c.ip4 {
			continue
		}
		cc := c.counters
		cc.Name, cc.IP4, cc.IP6, cc.Flows, cc.FragTrains = c.name, c.ip4, c.ip6, c.flowList.count, c.fragList.count
		cc.Rules4 = c.rules4.Load().snapshot()
		cc.Rules6 = c.rules6.Load().snapshot()
		out.Clients = append(out.Clients, cc)
	}
	slices.SortFunc(out.Clients, func(a, b ClientCounters) int { return a.IP4.Compare(b.IP4) })
	return out
}
