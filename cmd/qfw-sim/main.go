// Command qfw-sim answers "what would the firewall do?" offline: it reads a
// qube's firewall rules (as `qvm-firewall VM list --raw` prints them, or as a
// QubesDB dump of /qubes-firewall/) and evaluates flows, rule edits and
// packet captures with the same rule engine and the same semantics as the
// Linux sys-firewall.
package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"os"
	"strings"

	"qfw/rules"
)

const usage = `usage: qfw-sim COMMAND [flags] ARGS

Commands:
  check RULES                   validate rules; exit 1 if any rule is invalid
  eval RULES FLOW...            verdict for each flow (or -flows FILE)
  diff OLD NEW -flows FILE      flows whose verdict changes between two rule sets
  pcap RULES FILE.pcap          verdict for each outgoing packet of a capture

RULES is a file (or - for stdin) in 'qvm-firewall VM list --raw' form, one
rule a line, or a QubesDB dump ('qubesdb-multiread /qubes-firewall/' output,
"PATH = VALUE" lines) that may hold the rules of several client addresses.

A FLOW reads like
  tcp 10.137.0.5:40000 -> 93.184.216.34:443
  udp 10.137.0.5 -> 10.139.1.1:53
  icmp 10.137.0.5 -> 8.8.8.8 type 8
  tcp [fd09:24ef:4179::a89:5]:40000 -> [2001:db8::1]:443

Flags (before or after the arguments):
`

// Exit codes.
const (
	exitOK      = 0
	exitInvalid = 1 // check: some rule is invalid
	exitUsage   = 2 // bad flags, arguments or input
)

type options struct {
	json       bool
	useDNS     bool
	hostsFile  string
	flowsFile  string
	dnsServers string
	client     string
}

func main() {
	os.Exit(run(os.Args[1:], os.Stdin, os.Stdout, os.Stderr))
}

// run is the whole program; it never panics on bad input and returns the
// exit code.
func run(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("qfw-sim", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var o options
	fs.BoolVar(&o.json, "json", false, "print one JSON object per result line, and nothing else on stdout")
	fs.BoolVar(&o.useDNS, "dns", false, "resolve dsthost names with the system resolver")
	fs.StringVar(&o.hostsFile, "hosts", "", "hosts `FILE` (\"ADDRESS NAME...\" lines) to resolve dsthost offline")
	fs.StringVar(&o.flowsFile, "flows", "", "read flows from `FILE`, one a line")
	fs.StringVar(&o.dnsServers, "dns-servers", "10.139.1.1,10.139.1.2", "comma-separated `ADDRS` that specialtarget=dns means")
	fs.StringVar(&o.client, "client", "", "pcap: the client's `ADDRESS` (default: the dump's clients, or the Qubes client ranges)")
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), usage)
		fs.PrintDefaults()
	}
	if len(args) == 0 {
		fs.Usage()
		return exitUsage
	}
	cmd := args[0]
	if cmd == "-h" || cmd == "-help" || cmd == "--help" || cmd == "help" {
		fs.SetOutput(stdout)
		fs.Usage()
		return exitOK
	}
	fs.SetOutput(io.Discard) // a bad flag gets one line, not the whole usage
	pos, err := parseInterleaved(fs, args[1:])
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fs.SetOutput(stdout)
			fs.Usage()
			return exitOK
		}
		fmt.Fprintf(stderr, "qfw-sim: %v (qfw-sim -h for help)\n", err)
		return exitUsage
	}
	out := bufio.NewWriter(stdout)
	defer out.Flush()
	sim := &simulator{opts: o, stdin: stdin, out: out, warn: stderr}
	switch cmd {
	case "check":
		err = sim.check(pos)
	case "eval":
		err = sim.eval(pos)
	case "diff":
		err = sim.diff(pos)
	case "pcap":
		err = sim.pcap(pos)
	default:
		err = usageError{fmt.Sprintf("unknown command %q (want check, eval, diff or pcap; -h for help)", cmd)}
	}
	out.Flush()
	var invalid errInvalidRules
	switch {
	case err == nil:
		return exitOK
	case errors.As(err, &invalid):
		fmt.Fprintln(stderr, "qfw-sim:", err)
		return exitInvalid
	default:
		fmt.Fprintln(stderr, "qfw-sim:", err)
		return exitUsage
	}
}

type usageError struct{ msg string }

func (e usageError) Error() string { return e.msg }

type errInvalidRules struct{ msg string }

func (e errInvalidRules) Error() string { return e.msg }

// parseInterleaved parses flags that may stand before, between or after the
// positional arguments. "-" (stdin) and "->" (in flows) are positional.
func parseInterleaved(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for len(args) > 0 {
		a := args[0]
		if a == "--" {
			return append(pos, args[1:]...), nil
		}
		if !strings.HasPrefix(a, "-") || a == "-" || a == "->" {
			pos = append(pos, a)
			args = args[1:]
			continue
		}
		name := strings.TrimLeft(a, "-")
		name, _, hasValue := strings.Cut(name, "=")
		n := 1
		if f := fs.Lookup(name); f != nil && !hasValue && !isBoolFlag(f) && len(args) > 1 {
			n = 2
		}
		if err := fs.Parse(args[:n]); err != nil {
			return nil, err
		}
		args = args[n:]
	}
	return pos, nil
}

func isBoolFlag(f *flag.Flag) bool {
	b, ok := f.Value.(interface{ IsBoolFlag() bool })
	return ok && b.IsBoolFlag()
}

// simulator runs one command.
type simulator struct {
	opts  options
	stdin io.Reader
	out   *bufio.Writer
	warn  io.Writer // stderr: stdout carries only results
}

func (s *simulator) ruleOptions() (rules.Options, error) {
	opt := rules.Options{}
	for _, t := range strings.Split(s.opts.dnsServers, ",") {
		a, err := netip.ParseAddr(strings.TrimSpace(t))
		if err != nil {
			return opt, usageError{fmt.Sprintf("-dns-servers: %q is not an address", t)}
		}
		opt.DNSServers = append(opt.DNSServers, a)
	}
	res := &hostsResolver{useDNS: s.opts.useDNS, static: rules.StaticResolver{}}
	if s.opts.hostsFile != "" {
		h, err := loadHosts(s.opts.hostsFile, s.stdin)
		if err != nil {
			return opt, err
		}
		res.static = h
	}
	opt.Resolver = res
	return opt, nil
}

func (s *simulator) load(name string) (*ruleSource, error) {
	opt, err := s.ruleOptions()
	if err != nil {
		return nil, err
	}
	return loadRules(name, s.stdin, opt)
}

// warnBlocked tells on stderr which rule trees are invalid, so that a user
// reading "drop" knows it is the fail-closed fallback.
func (s *simulator) warnBlocked(src *ruleSource) {
	var blocked []string
	if src.clients == nil {
		for _, rs := range []*rules.Ruleset{src.raw4, src.raw6} {
			if rs.Blocked() {
				blocked = append(blocked, rs.Family().String())
			}
		}
	} else {
		for _, ip := range src.order {
			if src.clients[ip].Blocked() {
				blocked = append(blocked, ip.String())
			}
		}
	}
	if len(blocked) > 0 {
		fmt.Fprintf(s.warn, "qfw-sim: warning: %s: invalid rules block all traffic of %s (qfw-sim check %s says why)\n",
			displayName(src.name), strings.Join(blocked, ", "), src.name)
	}
}

// flows gathers the flows from -flows and the remaining arguments.
func (s *simulator) flows(args []string) ([]flowArg, error) {
	var all []flowArg
	if s.opts.flowsFile != "" {
		f, err := loadFlows(s.opts.flowsFile, s.stdin)
		if err != nil {
			return nil, err
		}
		all = f
	}
	if len(args) > 0 {
		f, err := flowsFromArgs(args)
		if err != nil {
			return nil, err
		}
		all = append(all, f...)
	}
	if len(all) == 0 {
		return nil, usageError{"no flows given (FLOW arguments or -flows FILE)"}
	}
	return all, nil
}

// Check is the firewall's verdict for a flow from a client: the rule set of
// the flow's source decides.
func (src *ruleSource) Check(f rules.Flow) rules.Verdict {
	rs, why := src.lookup(f.Src)
	if rs == nil {
		return rules.Verdict{Action: rules.Drop, Index: -1, Number: -1, Text: rules.PolicyText, Reason: why}
	}
	return rs.Check(f)
}

// verdictJSON is the stable machine-readable form of one verdict.
type verdictJSON struct {
	Flow    string `json:"flow,omitempty"`
	Verdict string `json:"verdict"`
	Rule    *int   `json:"rule"`
	Text    string `json:"text"`
	Reason  string `json:"reason"`
}

func toJSON(flow string, v rules.Verdict) verdictJSON {
	j := verdictJSON{Flow: flow, Verdict: v.Action.String(), Text: v.Text, Reason: v.Reason}
	if v.Number >= 0 {
		n := v.Number
		j.Rule = &n
	}
	return j
}

func ruleLabel(v rules.Verdict) string {
	if v.Number < 0 {
		return rules.PolicyText
	}
	return fmt.Sprintf("rule %04d: %s", v.Number, v.Text)
}

func (s *simulator) emitJSON(v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	s.out.Write(b)
	return s.out.WriteByte('\n')
}

func (s *simulator) eval(args []string) error {
	if len(args) < 1 {
		return usageError{"eval needs RULES and flows: qfw-sim eval RULES FLOW... (or -flows FILE)"}
	}
	src, err := s.load(args[0])
	if err != nil {
		return err
	}
	s.warnBlocked(src)
	flows, err := s.flows(args[1:])
	if err != nil {
		return err
	}
	for _, f := range flows {
		v := src.Check(f.flow)
		if s.opts.json {
			if err := s.emitJSON(toJSON(f.text, v)); err != nil {
				return err
			}
			continue
		}
		fmt.Fprintf(s.out, "%-6s  %s  [%s]  %s\n", v.Action, f.text, ruleLabel(v), v.Reason)
	}
	return nil
}

func (s *simulator) diff(args []string) error {
	if len(args) < 2 {
		return usageError{"diff needs two rule sets: qfw-sim diff OLD NEW -flows FILE"}
	}
	if args[0] == "-" && args[1] == "-" {
		return usageError{"diff: only one of OLD and NEW can be stdin"}
	}
	old, err := s.load(args[0])
	if err != nil {
		return err
	}
	cur, err := s.load(args[1])
	if err != nil {
		return err
	}
	s.warnBlocked(old)
	s.warnBlocked(cur)
	flows, err := s.flows(args[2:])
	if err != nil {
		return err
	}
	plain := make([]rules.Flow, len(flows))
	texts := make(map[rules.Flow]string, len(flows))
	for i, f := range flows {
		plain[i] = f.flow
		if _, dup := texts[f.flow]; !dup {
			texts[f.flow] = f.text
		}
	}
	changes := rules.Diff(old, cur, plain)
	for _, c := range changes {
		text := texts[c.Flow]
		if s.opts.json {
			if err := s.emitJSON(struct {
				Flow string      `json:"flow"`
				Old  verdictJSON `json:"old"`
				New  verdictJSON `json:"new"`
			}{text, toJSON("", c.Old), toJSON("", c.New)}); err != nil {
				return err
			}
			continue
		}
		fmt.Fprintf(s.out, "%s: %s -> %s\n  before: [%s] %s\n  after:  [%s] %s\n",
			text, c.Old.Action, c.New.Action, ruleLabel(c.Old), c.Old.Reason, ruleLabel(c.New), c.New.Reason)
	}
	if !s.opts.json {
		fmt.Fprintf(s.out, "%d of %d flows change their verdict\n", len(changes), len(flows))
	}
	return nil
}

// check validates rules and reports every problem with its line and token.
func (s *simulator) check(args []string) error {
	if len(args) != 1 {
		return usageError{"check needs exactly one RULES argument"}
	}
	src, err := s.load(args[0])
	if err != nil {
		return err
	}
	name := displayName(src.name)
	type tree struct {
		label string
		rs    *rules.Ruleset
		// optional: errors only block traffic the qube may not have
		// (the IPv6 tree of a raw list).
		optional bool
	}
	var trees []tree
	if src.clients == nil {
		trees = []tree{{"IPv4", src.raw4, false}, {"IPv6", src.raw6, true}}
	} else {
		for _, ip := range src.order {
			trees = append(trees, tree{ip.String(), src.clients[ip], false})
		}
	}
	var report []string
	seen := map[string]bool{}
	invalid := 0
	for _, t := range trees {
		for _, e := range t.rs.Errors() {
			msg := name + ":" + strings.TrimPrefix(e.Error(), "line ")
			var re *rules.RuleError
			if errors.As(e, &re) && re.Line == 0 {
				msg = name + ": " + e.Error()
			}
			if src.clients != nil {
				msg += " (" + t.label + ")"
			}
			if seen[msg] {
				continue
			}
			seen[msg] = true
			if t.optional && !errorIn(trees[0].rs, e) {
				report = append(report, "warning: "+msg+" (only if the qube has IPv6: its IPv6 traffic would be blocked)")
				continue
			}
			invalid++
			report = append(report, msg)
		}
		if more := t.rs.ErrorCount() - len(t.rs.Errors()); more > 0 {
			report = append(report, fmt.Sprintf("%s: ... and %d more errors", name, more))
		}
	}
	for _, line := range report {
		fmt.Fprintln(s.out, line)
	}
	for _, t := range trees {
		if src.clients == nil && t.optional {
			break // the raw list's rules are listed once
		}
		for _, r := range t.rs.Rules() {
			if r.Skipped != "" {
				fmt.Fprintf(s.out, "note: %s:%d: rule %04d never matches: %s\n", name, r.Line, r.Number, r.Skipped)
			}
		}
	}
	var blocked []string
	for _, t := range trees {
		switch {
		case t.optional && t.rs.Blocked():
			fmt.Fprintf(s.out, "%s: %s: BLOCKED if the qube has IPv6\n", name, t.label)
		case t.rs.Blocked():
			blocked = append(blocked, t.label)
			fmt.Fprintf(s.out, "%s: %s: BLOCKED: all its traffic would be rejected\n", name, t.label)
		default:
			fmt.Fprintf(s.out, "%s: %s: %d %s, policy %s: OK\n", name, t.label, len(t.rs.Rules()), plural(len(t.rs.Rules()), "rule"), t.rs.Policy())
		}
	}
	if invalid > 0 {
		what := "the client"
		if src.clients != nil {
			what = "client " + strings.Join(blocked, ", ")
		}
		return errInvalidRules{fmt.Sprintf("%s: %d invalid rule problem(s): %s would be blocked entirely (all traffic rejected)", name, invalid, what)}
	}
	return nil
}

func errorIn(rs *rules.Ruleset, e error) bool {
	for _, x := range rs.Errors() {
		if x.Error() == e.Error() {
			return true
		}
	}
	return false
}

func plural(n int, word string) string {
	if n == 1 {
		return word
	}
	return word + "s"
}
