package main

import (
	"fmt"
	"net/netip"
	"strings"
)

// maxClients bounds -client: far more than a firewall VM serves.
const maxClients = 256

// clientSpec is one -client TAP=IPv4[,IPv6].
type clientSpec struct {
	tap      string
	ip4, ip6 netip.Addr
}

// addrs are the client's addresses, IPv4 first.
func (c clientSpec) addrs() []netip.Addr {
	if c.ip6.IsValid() {
		return []netip.Addr{c.ip4, c.ip6}
	}
	return []netip.Addr{c.ip4}
}

// clientList is the repeatable -client flag.
type clientList []clientSpec

func (l *clientList) String() string {
	parts := make([]string, len(*l))
	for i, c := range *l {
		parts[i] = c.tap + "=" + c.ip4.String()
		if c.ip6.IsValid() {
			parts[i] += "," + c.ip6.String()
		}
	}
	return strings.Join(parts, " ")
}

// Set parses TAP=IPv4[,IPv6] and refuses a TAP or address given twice.
func (l *clientList) Set(s string) error {
	if len(*l) >= maxClients {
		return fmt.Errorf("more than %d clients", maxClients)
	}
	tap, addrs, ok := strings.Cut(s, "=")
	if !ok || tap == "" || addrs == "" {
		return fmt.Errorf("%q is not TAP=IPv4[,IPv6]", s)
	}
	c := clientSpec{tap: tap}
	v4, v6, hasV6 := strings.Cut(addrs, ",")
	var err error
	if c.ip4, err = netip.ParseAddr(v4); err != nil || !c.ip4.Is4() {
		return fmt.Errorf("client %s: %q is not an IPv4 address", tap, v4)
	}
	if hasV6 {
		if c.ip6, err = netip.ParseAddr(v6); err != nil || !c.ip6.Is6() || c.ip6.Is4In6() || c.ip6.Zone() != "" {
			return fmt.Errorf("client %s: %q is not an IPv6 address", tap, v6)
		}
	}
	for _, o := range *l {
		if o.tap == tap {
			return fmt.Errorf("client TAP %q given twice", tap)
		}
		for _, a := range c.addrs() {
			for _, b := range o.addrs() {
				if a == b {
					return fmt.Errorf("clients %s and %s both have address %v", o.tap, tap, a)
				}
			}
		}
	}
	*l = append(*l, c)
	return nil
}
