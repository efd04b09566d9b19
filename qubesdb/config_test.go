package qubesdb

import (
	"net/netip"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

var a = netip.MustParseAddr

// sysFirewallDB is what dom0 writes for a sys-firewall with the ipv6 feature
// and two clients, one of them with net.fake-ip (spec qubes.md section 4).
func sysFirewallDB(t *testing.T) *DB {
	db := NewDB(Limits{})
	mustWrite(t, db,
		"/name", "sys-firewall",
		"/qubes-ip", "10.137.0.6",
		"/qubes-netmask", "255.255.255.255",
		"/qubes-gateway", "10.137.0.5",
		"/qubes-primary-dns", "10.139.1.1",
		"/qubes-secondary-dns", "10.139.1.2",
		"/qubes-ip6", "fd09:24ef:4179::a89:6",
		"/qubes-gateway6", "fd09:24ef:4179::a89:5",
		"/qubes-netvm-gateway", "10.137.0.6",
		"/qubes-netvm-network", "10.137.0.6",
		"/qubes-netvm-netmask", "255.255.255.255",
		"/qubes-netvm-primary-dns", "10.139.1.1",
		"/qubes-netvm-secondary-dns", "10.139.1.2",
		"/qubes-netvm-gateway6", "fd09:24ef:4179::a89:6",
		"/connected-ips", "10.137.0.3 10.137.0.8",
		"/connected-ips6", "fd09:24ef:4179::a89:3",
		"/mapped-ip/10.137.0.3/visible-ip", "10.137.0.3",
		"/mapped-ip/10.137.0.3/visible-gateway", "10.137.0.6",
		"/mapped-ip/10.137.0.8/visible-ip", "192.168.1.8",
		"/mapped-ip/10.137.0.8/visible-gateway", "192.168.1.1",
		"/mapped-ip/10.137.0.8/something-new", "ignored",
		"/mapped-ip/fd09:24ef:4179::a89:3/visible-ip", "fd09:24ef:4179::a89:3",
	)
	return db
}

func TestReadConfig(t *testing.T) {
	c, err := ReadConfig(sysFirewallDB(t))
	require.NoError(t, err)
	assert.Equal(t, Uplink{
		IP:           a("10.137.0.6"),
		Netmask:      a("255.255.255.255"),
		Gateway:      a("10.137.0.5"),
		PrimaryDNS:   a("10.139.1.1"),
		SecondaryDNS: a("10.139.1.2"),
		IP6:          a("fd09:24ef:4179::a89:6"),
		Gateway6:     a("fd09:24ef:4179::a89:5"),
	}, c.Uplink)
	assert.Equal(t, NetVM{
		Gateway:      a("10.137.0.6"),
		Netmask:      a("255.255.255.255"),
		PrimaryDNS:   a("10.139.1.1"),
		SecondaryDNS: a("10.139.1.2"),
		Gateway6:     a("fd09:24ef:4179::a89:6"),
	}, c.NetVM)
	assert.Equal(t, []netip.Addr{a("10.137.0.3"), a("10.137.0.8")}, c.ConnectedIPs)
	assert.Equal(t, []netip.Addr{a("fd09:24ef:4179::a89:3")}, c.ConnectedIPs6)
	assert.Equal(t, map[netip.Addr]MappedIP{
		a("10.137.0.3"):            {VisibleIP: a("10.137.0.3"), VisibleGateway: a("10.137.0.6")},
		a("10.137.0.8"):            {VisibleIP: a("192.168.1.8"), VisibleGateway: a("192.168.1.1")},
		a("fd09:24ef:4179::a89:3"): {VisibleIP: a("fd09:24ef:4179::a89:3")},
	}, c.Mapped)
}

func TestReadConfigMissingKeysStayZero(t *testing.T) {
	db := NewDB(Limits{})
	mustWrite(t, db, "/qubes-ip", "10.137.0.6", "/connected-ips", "")
	c, err := ReadConfig(db)
	require.NoError(t, err)
	assert.Equal(t, a("10.137.0.6"), c.Uplink.IP)
	assert.False(t, c.Uplink.Gateway.IsValid())
	assert.False(t, c.NetVM.Gateway.IsValid())
	assert.Empty(t, c.ConnectedIPs)
	assert.Empty(t, c.Mapped)
}

func TestReadConfigReportsEveryBadKey(t *testing.T) {
	db := sysFirewallDB(t)
	mustWrite(t, db,
		"/qubes-ip", "10.137.0.600",
		"/qubes-gateway", "fd09::1", // wrong family
		"/qubes-ip6", "10.137.0.6", // wrong family
		"/qubes-gateway6", "fe80::1%eth0", // zone
		"/qubes-netvm-primary-dns", "::ffff:10.139.1.1",
		"/connected-ips", "10.137.0.3 garbage 10.137.0.9",
		"/connected-ips6", "10.137.0.3",
		"/mapped-ip/not-an-ip/visible-ip", "10.137.0.3",
		"/mapped-ip/10.137.0.3/visible-gateway", "fd09::1",
	)
	c, err := ReadConfig(db)
	require.Error(t, err)
	for _, key := range []string{
		"/qubes-ip:", "/qubes-gateway:", "/qubes-ip6:", "/qubes-gateway6:",
		"/qubes-netvm-primary-dns:", `/connected-ips: "garbage"`, "/connected-ips6:",
		"/mapped-ip/not-an-ip/visible-ip:", "/mapped-ip/10.137.0.3/visible-gateway:",
	} {
		assert.Contains(t, err.Error(), key)
	}
	assert.False(t, c.Uplink.IP.IsValid(), "bad keys stay zero")
	assert.False(t, c.Uplink.Gateway.IsValid())
	assert.Equal(t, a("10.139.1.2"), c.Uplink.SecondaryDNS, "good keys are still read")
	assert.Equal(t, []netip.Addr{a("10.137.0.3"), a("10.137.0.9")}, c.ConnectedIPs)
	assert.Empty(t, c.ConnectedIPs6)
	assert.Equal(t, MappedIP{VisibleIP: a("10.137.0.3")}, c.Mapped[a("10.137.0.3")])
}
