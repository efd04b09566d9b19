package qubesdb

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"
)

// Keys that dom0 writes for a network-providing VM (spec qubes.md section 4).
const (
	KeyIP           = "/qubes-ip"
	KeyNetmask      = "/qubes-netmask"
	KeyGateway      = "/qubes-gateway"
	KeyPrimaryDNS   = "/qubes-primary-dns"
	KeySecondaryDNS = "/qubes-secondary-dns"
	KeyIP6          = "/qubes-ip6"
	KeyGateway6     = "/qubes-gateway6"

	KeyNetVMGateway      = "/qubes-netvm-gateway"
	KeyNetVMNetmask      = "/qubes-netvm-netmask"
	KeyNetVMPrimaryDNS   = "/qubes-netvm-primary-dns"
	KeyNetVMSecondaryDNS = "/qubes-netvm-secondary-dns"
	KeyNetVMGateway6     = "/qubes-netvm-gateway6"

	KeyConnectedIPs  = "/connected-ips"
	KeyConnectedIPs6 = "/connected-ips6"

	// MappedIPPrefix holds /mapped-ip/<client-ip>/visible-ip and
	// /mapped-ip/<client-ip>/visible-gateway.
	MappedIPPrefix = "/mapped-ip/"
)

// Uplink is this VM's own side of its netvm link. Zero addresses are keys
// dom0 did not write (a VM without a netvm, or without the ipv6 feature).
type Uplink struct {
	IP           netip.Addr // /qubes-ip
	Netmask      netip.Addr // /qubes-netmask
	Gateway      netip.Addr // /qubes-gateway
	PrimaryDNS   netip.Addr // /qubes-primary-dns
	SecondaryDNS netip.Addr // /qubes-secondary-dns
	IP6          netip.Addr // /qubes-ip6
	Gateway6     netip.Addr // /qubes-gateway6
}

// NetVM is the network this VM provides to its clients.
type NetVM struct {
	Gateway      netip.Addr // /qubes-netvm-gateway: the clients' gateway
	Netmask      netip.Addr // /qubes-netvm-netmask
	PrimaryDNS   netip.Addr // /qubes-netvm-primary-dns: DNS IPs clients use
	SecondaryDNS netip.Addr // /qubes-netvm-secondary-dns
	Gateway6     netip.Addr // /qubes-netvm-gateway6
}

// MappedIP is what a client believes its address and gateway are; they
// differ from the real ones only with the net.fake-* features.
type MappedIP struct {
	VisibleIP      netip.Addr
	VisibleGateway netip.Addr
}

// Config is the network configuration a firewall VM reads from QubesDB.
type Config struct {
	Uplink        Uplink
	NetVM         NetVM
	ConnectedIPs  []netip.Addr // /connected-ips: IPv4 of every client
	ConnectedIPs6 []netip.Addr // /connected-ips6
	// Mapped is keyed by the client's real address.
	Mapped map[netip.Addr]MappedIP
}

type family int

const (
	ipv4 family = 4
	ipv6 family = 6
)

// parseAddr parses one address of the given family; zones are refused.
func parseAddr(s string, fam family) (netip.Addr, error) {
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Addr{}, fmt.Errorf("%q is not an IP address", s)
	}
	if a.Zone() != "" || fam == ipv4 && !a.Is4() || fam == ipv6 && (!a.Is6() || a.Is4In6()) {
		return netip.Addr{}, fmt.Errorf("%q is not an IPv%d address", s, fam)
	}
	return a, nil
}

// ReadConfig reads the network configuration. Missing keys stay zero. Keys
// that do not parse also stay zero and are all reported in the error, so a
// caller can log every problem and still decide what to do with the rest.
func ReadConfig(db *DB) (Config, error) {
	var errs []error
	addr := func(key string, fam family, dst *netip.Addr) {
		v, ok := db.Read(key)
		if !ok {
			return
		}
		a, err := parseAddr(v, fam)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", key, err))
			return
		}
		*dst = a
	}
	list := func(key string, fam family) []netip.Addr {
		v, _ := db.Read(key)
		var out []netip.Addr
		for _, f := range strings.Fields(v) {
			a, err := parseAddr(f, fam)
			if err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", key, err))
				continue
			}
			out = append(out, a)
		}
		return out
	}

	var c Config
	u := &c.Uplink
	addr(KeyIP, ipv4, &u.IP)
	addr(KeyNetmask, ipv4, &u.Netmask)
	addr(KeyGateway, ipv4, &u.Gateway)
	addr(KeyPrimaryDNS, ipv4, &u.PrimaryDNS)
	addr(KeySecondaryDNS, ipv4, &u.SecondaryDNS)
	addr(KeyIP6, ipv6, &u.IP6)
	addr(KeyGateway6, ipv6, &u.Gateway6)
	n := &c.NetVM
	addr(KeyNetVMGateway, ipv4, &n.Gateway)
	addr(KeyNetVMNetmask, ipv4, &n.Netmask)
	addr(KeyNetVMPrimaryDNS, ipv4, &n.PrimaryDNS)
	addr(KeyNetVMSecondaryDNS, ipv4, &n.SecondaryDNS)
	addr(KeyNetVMGateway6, ipv6, &n.Gateway6)
	c.ConnectedIPs = list(KeyConnectedIPs, ipv4)
	c.ConnectedIPs6 = list(KeyConnectedIPs6, ipv6)

	mapped, err := readMapped(db)
	c.Mapped = mapped
	errs = append(errs, err)
	return c, errors.Join(errs...)
}

// readMapped reads /mapped-ip/<client-ip>/{visible-ip,visible-gateway};
// other leaves are ignored.
func readMapped(db *DB) (map[netip.Addr]MappedIP, error) {
	var errs []error
	out := make(map[netip.Addr]MappedIP)
	for _, e := range db.Multiread(MappedIPPrefix) {
		client, leaf, ok := strings.Cut(strings.TrimPrefix(e.Path, MappedIPPrefix), "/")
		if !ok || (leaf != "visible-ip" && leaf != "visible-gateway") {
			continue
		}
		c, err := netip.ParseAddr(client)
		if err != nil || c.Zone() != "" {
			errs = append(errs, fmt.Errorf("%s: %q is not an IP address", e.Path, client))
			continue
		}
		fam := ipv4
		if c.Is6() {
			fam = ipv6
		}
		a, err := parseAddr(e.Value, fam)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", e.Path, err))
			continue
		}
		m := out[c]
		if leaf == "visible-ip" {
			m.VisibleIP = a
		} else {
			m.VisibleGateway = a
		}
		out[c] = m
	}
	return out, errors.Join(errs...)
}
