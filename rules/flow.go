package rules

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"
)

// ParseFlow reads a flow written the way qfw-sim takes it:
//
//	tcp 10.137.0.5:40000 -> 93.184.216.34:443
//	udp 10.137.0.5 -> 10.139.1.1:53
//	icmp 10.137.0.5 -> 8.8.8.8 type 8
//	tcp [fd09:24ef:4179::a89:5]:40000 -> [2001:db8::1]:443
//	icmp fd09:24ef:4179::a89:5 -> 2001:db8::1 type 128
//
// The source port is optional. ICMP without a type means an echo request
// (type 8, or 128 for ICMPv6). "icmp" between IPv6 addresses is ICMPv6;
// a protocol may also be given as a number (e.g. "47").
func ParseFlow(s string) (Flow, error) {
	var f Flow
	fields := strings.Fields(s)
	if len(fields) < 4 || fields[2] != "->" {
		return f, fmt.Errorf("flow %q: want PROTO SRC -> DST[:PORT] [type N]", s)
	}
	proto := strings.ToLower(fields[0])
	var err error
	var srcPort, dstPort int
	if f.Src, srcPort, err = parseEndpoint(fields[1]); err != nil {
		return f, fmt.Errorf("flow %q: source: %v", s, err)
	}
	if f.Dst, dstPort, err = parseEndpoint(fields[3]); err != nil {
		return f, fmt.Errorf("flow %q: destination: %v", s, err)
	}
	if f.Src.Is4() != f.Dst.Is4() {
		return f, fmt.Errorf("flow %q: source and destination are of different families", s)
	}
	rest := fields[4:]
	switch proto {
	case "tcp", "udp":
		f.Proto = IPProtoTCP
		if proto == "udp" {
			f.Proto = IPProtoUDP
		}
		if dstPort < 0 {
			return f, fmt.Errorf("flow %q: %s needs a destination port (ADDR:PORT or [ADDR6]:PORT)", s, proto)
		}
		f.DstPort = uint16(dstPort)
		if srcPort >= 0 {
			f.SrcPort = uint16(srcPort)
		}
	case "icmp", "icmpv6", "icmp6":
		f.Proto = IPProtoICMP
		f.ICMPType = 8
		if f.Dst.Is6() {
			f.Proto, f.ICMPType = IPProtoICMPv6, 128
		} else if proto != "icmp" {
			return f, fmt.Errorf("flow %q: %s needs IPv6 addresses", s, proto)
		}
		if srcPort >= 0 || dstPort >= 0 {
			return f, fmt.Errorf("flow %q: icmp has no ports", s)
		}
		if len(rest) > 0 {
			if len(rest) < 2 || rest[0] != "type" {
				return f, fmt.Errorf("flow %q: after the addresses only \"type N\" may follow", s)
			}
			n, err := strconv.ParseUint(rest[1], 10, 8)
			if err != nil {
				return f, fmt.Errorf("flow %q: icmp type must be 0-255", s)
			}
			f.ICMPType = uint8(n)
			rest = rest[2:]
		}
	default:
		n, err := strconv.ParseUint(proto, 10, 8)
		if err != nil {
			return f, fmt.Errorf("flow %q: unknown protocol %q (want tcp, udp, icmp or a number)", s, fields[0])
		}
		f.Proto = uint8(n)
		if srcPort >= 0 || dstPort >= 0 {
			return f, fmt.Errorf("flow %q: only tcp and udp have ports", s)
		}
	}
	if len(rest) > 0 {
		return f, fmt.Errorf("flow %q: unexpected %q", s, strings.Join(rest, " "))
	}
	return f, nil
}

// parseEndpoint parses ADDR, ADDR:PORT, IPV6 or [IPV6]:PORT; port is -1 when
// absent.
func parseEndpoint(s string) (netip.Addr, int, error) {
	if ap, err := netip.ParseAddrPort(s); err == nil {
		if ap.Addr().Zone() != "" {
			return netip.Addr{}, 0, fmt.Errorf("%q: zones are not allowed", s)
		}
		return ap.Addr().Unmap(), int(ap.Port()), nil
	}
	a, err := netip.ParseAddr(strings.TrimSuffix(strings.TrimPrefix(s, "["), "]"))
	if err != nil || a.Zone() != "" {
		return netip.Addr{}, 0, fmt.Errorf("%q is not an address or address:port", s)
	}
	return a.Unmap(), -1, nil
}

// String writes the flow in the form ParseFlow reads.
func (f Flow) String() string {
	ep := func(a netip.Addr, port uint16, withPort bool) string {
		if !withPort {
			return a.String()
		}
		return netip.AddrPortFrom(a, port).String()
	}
	switch f.Proto {
	case IPProtoTCP, IPProtoUDP:
		name := "tcp"
		if f.Proto == IPProtoUDP {
			name = "udp"
		}
		return name + " " + ep(f.Src, f.SrcPort, f.SrcPort != 0) + " -> " + ep(f.Dst, f.DstPort, true)
	case IPProtoICMP, IPProtoICMPv6:
		return fmt.Sprintf("icmp %s -> %s type %d", f.Src, f.Dst, f.ICMPType)
	}
	return fmt.Sprintf("%d %s -> %s", f.Proto, f.Src, f.Dst)
}

// Change is a flow whose verdict differs between two rule sets.
type Change struct {
	Flow     Flow
	Old, New Verdict
}

// Checker decides flows: a Ruleset, or anything that picks one per flow
// (such as a table of clients' rule sets keyed by source address).
type Checker interface {
	Check(Flow) Verdict
}

// Diff lists, in the order given, the flows whose verdict (accept or drop)
// differs between old and new.
func Diff(old, new Checker, flows []Flow) []Change {
	var out []Change
	for _, f := range flows {
		o, n := old.Check(f), new.Check(f)
		if o.Action != n.Action {
			out = append(out, Change{Flow: f, Old: o, New: n})
		}
	}
	return out
}
