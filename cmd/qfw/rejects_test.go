package main

import (
	"bytes"
	"log/slog"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"

	"qfw/firewall"
)

func TestRejectReporterLogsNewRejectsOnly(t *testing.T) {
	var logs bytes.Buffer
	r := &rejectReporter{log: slog.New(slog.NewTextHandler(&logs, nil))}
	var c5Total, c7Total uint64
	snapshot := func(dropRule, policy uint64) firewall.Counters {
		return firewall.Counters{Clients: []firewall.ClientCounters{{
			Name: "c5", Rejected: c5Total,
			Rules4: []firewall.RuleCounter{
				{Number: 0, Text: "action=accept proto=tcp", Accepted: 9},
				{Number: 1, Text: "action=drop proto=icmp", Rejected: dropRule},
				{Number: -1, Text: "policy", Rejected: policy},
			},
		}, {Name: "c7", Rejected: c7Total}}}
	}

	c5Total = 3
	r.report(snapshot(2, 1))
	assert.Contains(t, logs.String(), `msg="flows rejected" client=c5 count=3 by="IPv4 0001 action=drop proto=icmp: 2, IPv4 policy: 1"`)
	assert.NotContains(t, logs.String(), "client=c7", "a client with no rejects is not logged")

	logs.Reset()
	r.report(snapshot(2, 1))
	assert.Empty(t, logs.String(), "nothing new, nothing logged")

	logs.Reset()
	c5Total, c7Total = 6, 2
	r.report(snapshot(2, 4))
	assert.Contains(t, logs.String(), `client=c7 count=2 by="no rules yet"`)
	assert.Contains(t, logs.String(), `count=3 by="IPv4 policy: 3"`)

	// A reload starts new rule counters: smaller values are all new.
	logs.Reset()
	c5Total = 7
	r.report(snapshot(1, 0))
	assert.Contains(t, logs.String(), `count=1 by="IPv4 0001 action=drop proto=icmp: 1"`)
}

func TestRejectReporterBoundsLine(t *testing.T) {
	var logs bytes.Buffer
	r := &rejectReporter{log: slog.New(slog.NewTextHandler(&logs, nil))}
	cc := firewall.ClientCounters{Name: "c5", Rejected: 50}
	for i := range 50 {
		cc.Rules4 = append(cc.Rules4, firewall.RuleCounter{Number: i, Text: "action=drop", Rejected: 1})
	}
	r.report(firewall.Counters{Clients: []firewall.ClientCounters{cc}})
	assert.Contains(t, logs.String(), "count=50")
	assert.Equal(t, maxRulesPerReport, strings.Count(logs.String(), "action=drop:"))
}
