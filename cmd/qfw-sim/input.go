package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strings"
	"time"
	"unicode/utf8"

	"qfw/rules"
)

// maxInputFile bounds what is read from a rules, flows or hosts file.
const maxInputFile = 16 << 20

// readInput reads a text file (or stdin for "-") and refuses binary data.
func readInput(name string, stdin io.Reader) (string, error) {
	var r io.Reader = stdin
	if name != "-" {
		f, err := os.Open(name)
		if err != nil {
			return "", fmt.Errorf("cannot read %s: %v", name, unwrapPathError(err))
		}
		defer f.Close()
		r = f
	}
	data, err := io.ReadAll(io.LimitReader(r, maxInputFile+1))
	if err != nil {
		return "", fmt.Errorf("cannot read %s: %v", displayName(name), unwrapPathError(err))
	}
	if len(data) > maxInputFile {
		return "", fmt.Errorf("%s: larger than %d MiB", displayName(name), maxInputFile>>20)
	}
	if bytes.IndexByte(data, 0) >= 0 || !utf8.Valid(data) {
		return "", fmt.Errorf("%s: not a text file", displayName(name))
	}
	return string(data), nil
}

func displayName(name string) string {
	if name == "-" {
		return "stdin"
	}
	return name
}

func unwrapPathError(err error) error {
	if pe, ok := err.(*os.PathError); ok {
		return pe.Err
	}
	return err
}

// ruleSource is what a RULES argument holds: either one qube's rules in
// `qvm-firewall --raw` form, or a QubesDB dump with the trees of any number
// of client addresses.
type ruleSource struct {
	name string
	// raw form: one tree per family, for whatever the client's address is.
	raw4, raw6 *rules.Ruleset
	// QubesDB dump: a tree per client address.
	clients map[netip.Addr]*rules.Ruleset
	order   []netip.Addr // client addresses in file order
}

// lookup returns the tree that decides flows from src; nil with a reason
// when a dump has no rules for that address.
func (s *ruleSource) lookup(src netip.Addr) (*rules.Ruleset, string) {
	if s.clients == nil {
		if src.Is4() {
			return s.raw4, ""
		}
		return s.raw6, ""
	}
	if rs := s.clients[src]; rs != nil {
		return rs, ""
	}
	return nil, fmt.Sprintf("no rules for %s in %s: the firewall drops traffic from addresses it has no rules for", src, displayName(s.name))
}

// loadRules reads and compiles a RULES argument.
func loadRules(name string, stdin io.Reader, opt rules.Options) (*ruleSource, error) {
	text, err := readInput(name, stdin)
	if err != nil {
		return nil, err
	}
	src := &ruleSource{name: name}
	if !isQubesDBDump(text) {
		opt.Family = rules.IPv4
		src.raw4 = rules.ParseRaw(text, opt)
		opt.Family = rules.IPv6
		src.raw6 = rules.ParseRaw(text, opt)
		return src, nil
	}
	trees, order, err := parseDump(name, text)
	if err != nil {
		return nil, err
	}
	if tree, ok := trees[netip.Addr{}]; ok {
		if len(trees) > 1 {
			return nil, fmt.Errorf("%s: mixes a bare rule tree (policy, NNNN keys) with client addresses", displayName(name))
		}
		opt.Family = rules.IPv4
		src.raw4 = rules.ParseEntries(tree, opt)
		opt.Family = rules.IPv6
		src.raw6 = rules.ParseEntries(tree, opt)
		return src, nil
	}
	src.clients = make(map[netip.Addr]*rules.Ruleset, len(trees))
	src.order = order
	for _, ip := range order {
		opt.Family = rules.FamilyOf(ip)
		src.clients[ip] = rules.ParseEntries(trees[ip], opt)
	}
	return src, nil
}

// isQubesDBDump tells a dump ("path = value" lines) from a raw rule list,
// whose lines start with a key=value token.
func isQubesDBDump(text string) bool {
	for _, line := range strings.Split(text, "\n") {
		fields := strings.Fields(line)
		if len(fields) == 0 || strings.HasPrefix(fields[0], "#") {
			continue
		}
		return !strings.Contains(fields[0], "=") && len(fields) >= 2 && fields[1] == "="
	}
	return false
}

// parseDump reads what `qubesdb-multiread /qubes-firewall/` prints (paths
// relative to that directory) or the same with full paths (-f). Entries
// outside /qubes-firewall/ are ignored, so a dump of the whole database works.
// A dump of a single tree ("policy = drop", "0000 = ...") is returned under
// the zero address.
func parseDump(name, text string) (map[netip.Addr][]rules.Entry, []netip.Addr, error) {
	trees := map[netip.Addr][]rules.Entry{}
	var order []netip.Addr
	sc := bufio.NewScanner(strings.NewReader(text))
	sc.Buffer(make([]byte, 0, 4096), 64<<10)
	for line := 1; sc.Scan(); line++ {
		s := strings.TrimSpace(sc.Text())
		if s == "" || strings.HasPrefix(s, "#") {
			continue
		}
		path, value, ok := strings.Cut(s, " =")
		if !ok {
			return nil, nil, fmt.Errorf("%s:%d: want \"PATH = VALUE\", got %q", displayName(name), line, s)
		}
		value = strings.TrimPrefix(value, " ")
		if strings.HasPrefix(path, "/") {
			var under bool
			if path, under = strings.CutPrefix(path, "/qubes-firewall/"); !under {
				continue
			}
		}
		ipText, key, _ := strings.Cut(path, "/")
		ip, err := netip.ParseAddr(ipText)
		switch {
		case err == nil && ip.Zone() == "":
		case !strings.Contains(path, "/") && (path == "policy" || len(path) == 4):
			// One client's tree dumped on its own
			// (qubesdb-multiread /qubes-firewall/<ip>/): whoever sends.
			ip, key = netip.Addr{}, path
		default:
			return nil, nil, fmt.Errorf("%s:%d: %q is not a client address", displayName(name), line, ipText)
		}
		if _, seen := trees[ip]; !seen {
			order = append(order, ip)
			trees[ip] = []rules.Entry{}
		}
		if key == "" {
			continue // the commit key /qubes-firewall/<ip>
		}
		trees[ip] = append(trees[ip], rules.Entry{Key: key, Value: value, Line: line})
	}
	if err := sc.Err(); err != nil {
		return nil, nil, fmt.Errorf("%s: %v", displayName(name), err)
	}
	if len(order) == 0 {
		return nil, nil, fmt.Errorf("%s: no /qubes-firewall/ entries", displayName(name))
	}
	return trees, order, nil
}

// hostsResolver answers from a hosts file first, then (with -dns) from the
// system resolver.
type hostsResolver struct {
	static rules.StaticResolver
	useDNS bool
}

func (h *hostsResolver) LookupHost(host string, family rules.Family) ([]netip.Addr, error) {
	if addrs, err := h.static.LookupHost(host, family); err == nil {
		return addrs, nil
	}
	if !h.useDNS {
		if len(h.static[host]) > 0 {
			return nil, fmt.Errorf("the hosts file has no %s address for %s", family, host)
		}
		return nil, fmt.Errorf("%s is not in the hosts file (use -hosts FILE, or -dns to resolve it)", host)
	}
	network := "ip4"
	if family == rules.IPv6 {
		network = "ip6"
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	addrs, err := net.DefaultResolver.LookupNetIP(ctx, network, host)
	if err != nil {
		return nil, err
	}
	return addrs, nil
}

// loadHosts reads a name table for dsthost rules. Accepted forms, one entry
// a line with '#' comments: /etc/hosts style "ADDRESS NAME...", or
// "NAME ADDRESS..." (also "NAME: ADDR, ADDR" or "NAME = ADDR"); or a JSON
// object mapping a name to an address or a list of addresses.
func loadHosts(name string, stdin io.Reader) (rules.StaticResolver, error) {
	text, err := readInput(name, stdin)
	if err != nil {
		return nil, err
	}
	out := rules.StaticResolver{}
	add := func(host, addr string) error {
		a, err := netip.ParseAddr(addr)
		if err != nil {
			return fmt.Errorf("%q is not an address", addr)
		}
		host = strings.ToLower(strings.TrimSuffix(host, "."))
		out[host] = append(out[host], a.Unmap())
		return nil
	}
	if strings.HasPrefix(strings.TrimSpace(text), "{") {
		var table map[string]json.RawMessage
		if err := json.Unmarshal([]byte(text), &table); err != nil {
			return nil, fmt.Errorf("%s: %v", displayName(name), err)
		}
		for host, raw := range table {
			var list []string
			if json.Unmarshal(raw, &list) != nil {
				var one string
				if err := json.Unmarshal(raw, &one); err != nil {
					return nil, fmt.Errorf("%s: %q: want an address or a list of addresses", displayName(name), host)
				}
				list = []string{one}
			}
			for _, a := range list {
				if err := add(host, a); err != nil {
					return nil, fmt.Errorf("%s: %q: %v", displayName(name), host, err)
				}
			}
		}
		return out, nil
	}
	for i, line := range strings.Split(text, "\n") {
		line, _, _ = strings.Cut(line, "#")
		fields := strings.FieldsFunc(line, func(r rune) bool { return r == ' ' || r == '\t' || r == ',' || r == '=' })
		if len(fields) == 0 {
			continue
		}
		if len(fields) < 2 {
			return nil, fmt.Errorf("%s:%d: want \"ADDRESS NAME...\" or \"NAME ADDRESS...\"", displayName(name), i+1)
		}
		first := strings.TrimSuffix(fields[0], ":")
		if _, err := netip.ParseAddr(first); err == nil {
			for _, host := range fields[1:] {
				if err := add(host, first); err != nil {
					return nil, fmt.Errorf("%s:%d: %v", displayName(name), i+1, err)
				}
			}
			continue
		}
		for _, a := range fields[1:] {
			if err := add(first, a); err != nil {
				return nil, fmt.Errorf("%s:%d: %v", displayName(name), i+1, err)
			}
		}
	}
	return out, nil
}

// loadFlows reads a flows file: one flow a line, '#' comments.
func loadFlows(name string, stdin io.Reader) ([]flowArg, error) {
	text, err := readInput(name, stdin)
	if err != nil {
		return nil, err
	}
	var out []flowArg
	for i, line := range strings.Split(text, "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		f, err := rules.ParseFlow(line)
		if err != nil {
			return nil, fmt.Errorf("%s:%d: %v", displayName(name), i+1, err)
		}
		out = append(out, flowArg{text: line, flow: f})
	}
	return out, nil
}

// flowArg is a flow with the text the user gave for it.
type flowArg struct {
	text string
	flow rules.Flow
}

// flowsFromArgs reads flows given on the command line. Each flow may be one
// argument ("tcp A -> B:443") or spread over several unquoted ones; a new
// flow starts at a protocol name once the previous one is complete.
func flowsFromArgs(args []string) ([]flowArg, error) {
	whole := make([]flowArg, 0, len(args))
	for _, arg := range args {
		f, err := rules.ParseFlow(arg)
		if err != nil {
			break
		}
		whole = append(whole, flowArg{text: strings.TrimSpace(arg), flow: f})
	}
	if len(whole) == len(args) {
		return whole, nil
	}
	var groups [][]string
	for _, arg := range args {
		for _, tok := range strings.Fields(arg) {
			n := len(groups)
			if n == 0 || (len(groups[n-1]) >= 4 && isProtoWord(tok) && groups[n-1][len(groups[n-1])-1] != "type") {
				groups = append(groups, nil)
				n++
			}
			groups[n-1] = append(groups[n-1], tok)
		}
	}
	out := make([]flowArg, 0, len(groups))
	for _, g := range groups {
		text := strings.Join(g, " ")
		f, err := rules.ParseFlow(text)
		if err != nil {
			return nil, err
		}
		out = append(out, flowArg{text: text, flow: f})
	}
	return out, nil
}

func isProtoWord(s string) bool {
	switch strings.ToLower(s) {
	case "tcp", "udp", "icmp", "icmpv6", "icmp6":
		return true
	}
	return false
}
