package main

import (
	"bytes"
	"net/netip"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestParseArgsFlagsAnywhere(t *testing.T) {
	opts, err := parseArgs([]string{
		"-platform", "tap", "-uplink", "up0",
		"-client", "c1=10.137.0.5", "-client=c2=10.137.0.7,fd09:24ef:4179::a89:7",
		"-qubesdb", "db.json",
	})
	require.NoError(t, err)
	assert.Equal(t, "tap", opts.platform)
	assert.Equal(t, "up0", opts.uplink)
	assert.Equal(t, "db.json", opts.qubesdb)
	require.Len(t, opts.clients, 2)
	assert.Equal(t, clientSpec{tap: "c1", ip4: netip.MustParseAddr("10.137.0.5")}, opts.clients[0])
	assert.Equal(t, []netip.Addr{netip.MustParseAddr("10.137.0.7"), netip.MustParseAddr("fd09:24ef:4179::a89:7")},
		opts.clients[1].addrs())
}

func TestParseArgsErrors(t *testing.T) {
	base := []string{"-platform", "tap", "-uplink", "up0", "-qubesdb", "db.json"}
	cases := map[string]struct {
		args []string
		want string
	}{
		"default platform":    {[]string{"-uplink", "up0"}, `platform "xen" is not available`},
		"unknown platform":    {[]string{"-platform", "vmware"}, `platform "vmware"`},
		"unknown flag":        {append(base, "-bogus"), "-bogus"},
		"positional":          {append(base, "extra"), `unexpected argument "extra"`},
		"after double dash":   {append(base, "--", "-client"), `unexpected argument "-client"`},
		"no uplink":           {[]string{"-platform", "tap", "-qubesdb", "db.json"}, "-uplink TAP is required"},
		"no qubesdb":          {[]string{"-platform", "tap", "-uplink", "up0"}, "-qubesdb FILE is required"},
		"client without IP":   {append(base, "-client", "c1"), `"c1" is not TAP=IPv4`},
		"client bad IPv4":     {append(base, "-client", "c1=fd09::1"), `"fd09::1" is not an IPv4`},
		"client bad IPv6":     {append(base, "-client", "c1=10.0.0.1,10.0.0.2"), `"10.0.0.2" is not an IPv6`},
		"client TAP twice":    {append(base, "-client", "c1=10.0.0.1", "-client", "c1=10.0.0.2"), `"c1" given twice`},
		"client IP twice":     {append(base, "-client", "c1=10.0.0.1", "-client", "c2=10.0.0.1"), "both have address 10.0.0.1"},
		"uplink is a client":  {append(base, "-client", "up0=10.0.0.1"), `"up0" is both the uplink and a client`},
		"missing flag value":  {append(base, "-client"), "-client"},
		"empty TAP in client": {append(base, "-client", "=10.0.0.1"), "is not TAP=IPv4"},
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			_, err := parseArgs(c.args)
			require.Error(t, err)
			assert.Contains(t, err.Error(), c.want)
		})
	}
}

func TestParseArgsBoundsClients(t *testing.T) {
	args := []string{"-platform", "tap", "-uplink", "up0", "-qubesdb", "db.json"}
	for i := range maxClients + 1 {
		args = append(args, "-client", netip.AddrFrom4([4]byte{10, 137, byte(i >> 8), byte(i)}).String())
		args[len(args)-1] = "c" + args[len(args)-1] + "=" + args[len(args)-1]
	}
	_, err := parseArgs(args)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "more than 256 clients")
}

func TestRunExitStatusAndMessages(t *testing.T) {
	var out bytes.Buffer
	assert.Equal(t, 0, run([]string{"-h"}, &out))
	assert.Contains(t, out.String(), "usage: qfw -platform tap")

	out.Reset()
	assert.Equal(t, 2, run([]string{"-platform", "tap"}, &out))
	assert.Equal(t, "qfw: -uplink TAP is required (qfw -h for usage)\n", out.String())

	out.Reset()
	missing := filepath.Join(t.TempDir(), "absent.json")
	assert.Equal(t, 1, run([]string{"-platform", "tap", "-uplink", "u", "-qubesdb", missing}, &out))
	assert.Equal(t, "qfw: QubesDB file: open "+missing+": no such file or directory\n", out.String())
}
