package main

import (
	"fmt"
	"log/slog"
	"strings"
	"time"

	"qfw/firewall"
	"qfw/rules"
)

// rejectReportPeriod: rejected flows are logged as one summary line per
// client and period, so that a client cannot flood the log.
const rejectReportPeriod = 5 * time.Second

// maxRulesPerReport bounds the rules named in one summary line.
const maxRulesPerReport = 5

// rejectReporter logs the flows each client's rules rejected since the last
// report, from the engine's counters: the client's total, and which rules
// rejected them when the client has rules.
type rejectReporter struct {
	log       *slog.Logger
	lastTotal map[string]uint64
	lastRule  map[ruleKey]uint64
}

// ruleKey names one rule counter; a reload starts new counters.
type ruleKey struct {
	client string
	family rules.Family
	number int
	text   string
}

func (r *rejectReporter) report(counters firewall.Counters) {
	total := make(map[string]uint64)
	rule := make(map[ruleKey]uint64)
	for _, cc := range counters.Clients {
		total[cc.Name] = cc.Rejected
		var by []string
		for _, fam := range []struct {
			family rules.Family
			rules  []firewall.RuleCounter
		}{{rules.IPv4, cc.Rules4}, {rules.IPv6, cc.Rules6}} {
			for _, rc := range fam.rules {
				k := ruleKey{cc.Name, fam.family, rc.Number, rc.Text}
				rule[k] = rc.Rejected
				if d := since(r.lastRule[k], rc.Rejected); d > 0 && len(by) < maxRulesPerReport {
					by = append(by, fmt.Sprintf("%s %s: %d", fam.family, ruleLabel(rc), d))
				}
			}
		}
		if d := since(r.lastTotal[cc.Name], cc.Rejected); d > 0 {
			if len(by) == 0 {
				by = append(by, "no rules yet")
			}
			r.log.Warn("flows rejected", "client", cc.Name, "count", d, "by", strings.Join(by, ", "))
		}
	}
	r.lastTotal, r.lastRule = total, rule
}

// since is how much a counter grew; a counter smaller than before was
// restarted (rule reload, client re-added), so all of it is new.
func since(prev, now uint64) uint64 {
	if now < prev {
		return now
	}
	return now - prev
}

// ruleLabel is "policy" or the rule's number and text.
func ruleLabel(rc firewall.RuleCounter) string {
	if rc.Number < 0 {
		return "policy"
	}
	return fmt.Sprintf("%04d %s", rc.Number, rc.Text)
}
