package rules

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"time"
)

// compileRule turns the options of one rule into a Rule for one family. It
// follows the checks of the agent's prepare_rules and adds the ones that nft
// would otherwise reject at load time (which the agent also turns into
// block-all). Every problem is reported through errf.
func compileRule(r *Rule, opts map[string]string, raw bool, opt *Options, errf func(tok, why string)) {
	tok := func(key string) string { return key + "=" + opts[key] }
	r.ICMPType = -1
	r.Comment = opts["comment"]

	switch v, ok := opts["action"]; {
	case !ok:
		errf("", "missing action=")
	case v == "accept":
		r.Action = Accept
	case v == "drop":
		r.Action = Drop
	default:
		errf(tok("action"), "action must be accept or drop")
	}

	if v, ok := opts["proto"]; ok {
		switch v {
		case "tcp":
			r.Proto = ProtoTCP
		case "udp":
			r.Proto = ProtoUDP
		case "icmp":
			r.Proto = ProtoICMP
		default:
			errf(tok("proto"), "proto must be tcp, udp or icmp")
		}
	}

	compileDestination(r, opts, raw, opt, errf)

	dnsPortsOK := true
	if v, ok := opts["dstports"]; ok {
		pr, err := parsePorts(v)
		if err != nil {
			errf(tok("dstports"), err.Error())
		} else {
			r.Ports, r.HasPorts = pr, true
			dnsPortsOK = pr.Lo == 53 && pr.Hi == 53
		}
	}

	if v, ok := opts["specialtarget"]; ok {
		if v != "dns" {
			errf(tok("specialtarget"), "the only special target is dns")
		} else {
			r.DNS = true
			if !dnsPortsOK {
				// The agent drops such a rule before it reaches nft.
				r.Skipped = "specialtarget=dns with dstports other than 53 never matches (the Linux agent skips it)"
				return
			}
			r.Ports, r.HasPorts = PortRange{53, 53}, true
		}
	}

	if v, ok := opts["icmptype"]; ok {
		n, err := strconv.ParseUint(v, 10, 8)
		if err != nil || len(v) > 3 {
			errf(tok("icmptype"), "icmptype must be a number from 0 to 255")
		} else {
			r.ICMPType = int(n)
		}
	}

	// Combinations nft cannot express; the agent then blocks the client.
	switch {
	case r.HasPorts && r.Proto == ProtoICMP:
		errf(portsToken(opts), "ports need proto=tcp or proto=udp, not icmp")
	case r.ICMPType >= 0 && (r.Proto == ProtoTCP || r.Proto == ProtoUDP):
		errf(tok("icmptype"), "icmptype needs proto=icmp, not "+r.Proto.String())
	case r.ICMPType >= 0 && r.HasPorts:
		errf(tok("icmptype"), "icmptype cannot be combined with ports")
	}
	if r.ICMPType >= 0 {
		r.Proto = ProtoICMP // nft adds the protocol dependency itself
	}

	if v, ok := opts["expire"]; ok {
		ts, err := strconv.ParseInt(v, 10, 64)
		if err != nil || ts < 0 {
			errf(tok("expire"), "expire must be a Unix time in seconds")
		} else {
			r.Expire = time.Unix(ts, 0).UTC()
			if !r.Expire.After(opt.now()) && r.Skipped == "" {
				r.Skipped = "expired at " + r.Expire.Format(time.RFC3339) + " (dom0 no longer sends it)"
			}
		}
	}
}

func portsToken(opts map[string]string) string {
	if v, ok := opts["dstports"]; ok {
		return "dstports=" + v
	}
	return "specialtarget=dns"
}

// compileDestination handles dst4, dst6 and dsthost.
func compileDestination(r *Rule, opts map[string]string, raw bool, opt *Options, errf func(tok, why string)) {
	var keys []string
	for _, k := range [...]string{"dst4", "dst6", "dsthost"} {
		if _, ok := opts[k]; ok {
			keys = append(keys, k)
		}
	}
	if len(keys) == 0 {
		return
	}
	if len(keys) > 1 {
		errf(keys[1]+"="+opts[keys[1]], "a rule has at most one destination, it already has "+keys[0])
		return
	}
	key, v := keys[0], opts[keys[0]]
	token := key + "=" + v
	switch key {
	case "dst4", "dst6":
		fam := IPv4
		if key == "dst6" {
			fam = IPv6
		}
		p, err := parsePrefix(v, fam)
		if err != nil {
			errf(token, err.Error())
			return
		}
		if fam != opt.Family {
			if raw {
				// dom0 leaves such a rule out of this family's tree.
				r.Skipped = "destination is " + fam.String() + ", not part of the " + opt.Family.String() + " rules"
				return
			}
			errf(token, fam.String()+" destination in the "+opt.Family.String()+" rule set")
			return
		}
		r.Dst = []netip.Prefix{p}
	case "dsthost":
		r.DstHost = v
		if !validHostname(v) {
			errf(token, "host name may contain only a-z, 0-9, '-', '.' and '_'")
			return
		}
		if opt.Resolver == nil {
			errf(token, "cannot resolve host names here (no resolver)")
			return
		}
		addrs, err := opt.Resolver.LookupHost(v, opt.Family)
		if err == nil && len(addrs) == 0 {
			err = fmt.Errorf("no %s address", opt.Family)
		}
		if err != nil {
			errf(token, "cannot resolve: "+err.Error())
			return
		}
		seen := make(map[netip.Addr]bool, len(addrs))
		for _, a := range addrs {
			if opt.Family == IPv4 {
				a = a.Unmap()
			}
			if a.IsValid() && FamilyOf(a) == opt.Family && !seen[a] && len(r.Dst) < maxDstAddrs {
				seen[a] = true
				r.Dst = append(r.Dst, netip.PrefixFrom(a, a.BitLen()))
			}
		}
		if len(r.Dst) == 0 {
			errf(token, "cannot resolve: no "+opt.Family.String()+" address")
		}
	}
}

func validHostname(s string) bool {
	if s == "" || len(s) > 253 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '.' || c == '_') {
			return false
		}
	}
	return true
}

// parsePrefix parses a dst4/dst6 value: an address with an optional prefix
// length. Host bits are masked, as nft does.
func parsePrefix(s string, fam Family) (netip.Prefix, error) {
	addrText, lenText, hasLen := strings.Cut(s, "/")
	a, err := netip.ParseAddr(addrText)
	if err != nil || a.Zone() != "" {
		return netip.Prefix{}, fmt.Errorf("not an %s address", fam)
	}
	if FamilyOf(a) != fam || (fam == IPv6 && a.Is4()) {
		return netip.Prefix{}, fmt.Errorf("not an %s address", fam)
	}
	bits := a.BitLen()
	if hasLen {
		n, err := strconv.ParseUint(lenText, 10, 8)
		if err != nil || int(n) > a.BitLen() || len(lenText) > 3 {
			return netip.Prefix{}, fmt.Errorf("prefix length must be 0 to %d", a.BitLen())
		}
		bits = int(n)
	}
	return a.Prefix(bits)
}

// parsePorts parses "N-M" (or "N") with 0 <= N <= M <= 65535.
func parsePorts(s string) (PortRange, error) {
	lo, hi, isRange := strings.Cut(s, "-")
	if !isRange {
		hi = lo
	}
	l, err1 := parsePort(lo)
	h, err2 := parsePort(hi)
	if err1 != nil || err2 != nil {
		return PortRange{}, fmt.Errorf("ports must be N-M with 0 <= N <= M <= 65535")
	}
	if l > h {
		return PortRange{}, fmt.Errorf("port range %d-%d is backwards", l, h)
	}
	return PortRange{l, h}, nil
}

func parsePort(s string) (uint16, error) {
	if s == "" || len(s) > 5 {
		return 0, strconv.ErrSyntax
	}
	n, err := strconv.ParseUint(s, 10, 16)
	return uint16(n), err
}

// describe is a short human description of what a rule matches.
func describe(r *Rule) string {
	var b strings.Builder
	b.WriteString(r.Action.String())
	b.WriteString(" ")
	switch {
	case r.Proto != ProtoAny:
		b.WriteString(r.Proto.String())
	case r.HasPorts:
		b.WriteString("tcp/udp")
	default:
		b.WriteString("all traffic")
	}
	switch {
	case r.DNS:
		b.WriteString(" to the DNS servers")
	case r.DstHost != "":
		b.WriteString(" to " + r.DstHost)
	case len(r.Dst) == 1:
		b.WriteString(" to " + r.Dst[0].String())
	}
	if r.HasPorts {
		if r.Ports.Lo == r.Ports.Hi {
			b.WriteString(" port " + r.Ports.String())
		} else {
			b.WriteString(" ports " + r.Ports.String())
		}
	}
	if r.ICMPType >= 0 {
		b.WriteString(" type " + strconv.Itoa(r.ICMPType))
	}
	return b.String()
}
