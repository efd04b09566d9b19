package main

import (
	"bytes"
	"log/slog"
	"net/netip"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestEngineConfig(t *testing.T) {
	var logs bytes.Buffer
	log := slog.New(slog.NewTextHandler(&logs, nil))
	db := map[string]string{
		"/qubes-ip": "10.137.0.6", "/qubes-gateway": "10.137.0.5", "/qubes-netvm-gateway": "10.137.0.6",
		"/qubes-ip6": "fd09:24ef:4179::a89:6", "/qubes-gateway6": "fd09:24ef:4179::a89:5",
		"/qubes-netvm-gateway6":    "fd09:24ef:4179::a89:6",
		"/qubes-netvm-primary-dns": "10.139.1.1", "/qubes-netvm-secondary-dns": "10.139.1.2",
		"/qubes-primary-dns": "192.0.2.53",
	}
	cfg, err := engineConfig(db, log)
	require.NoError(t, err)
	assert.Equal(t, netip.MustParseAddr("10.137.0.6"), cfg.UplinkIP4)
	assert.Equal(t, netip.MustParseAddr("10.137.0.5"), cfg.UplinkGateway4)
	assert.Equal(t, netip.MustParseAddr("10.137.0.6"), cfg.ClientGateway4)
	assert.Equal(t, netip.MustParseAddr("fd09:24ef:4179::a89:6"), cfg.UplinkIP6)
	assert.Equal(t, netip.MustParseAddr("fd09:24ef:4179::a89:5"), cfg.UplinkGateway6)
	assert.Equal(t, netip.MustParseAddr("fd09:24ef:4179::a89:6"), cfg.ClientGateway6)
	assert.Equal(t, []netip.Addr{netip.MustParseAddr("10.139.1.1"), netip.MustParseAddr("10.139.1.2")}, cfg.ClientDNS)
	assert.Equal(t, []netip.Addr{netip.MustParseAddr("192.0.2.53")}, cfg.UplinkDNS)
	assert.Same(t, log, cfg.Logger)
	assert.Empty(t, logs.String())

	// An optional key that does not parse is logged and left out.
	db["/qubes-gateway6"] = "bogus"
	cfg, err = engineConfig(db, log)
	require.NoError(t, err)
	assert.False(t, cfg.UplinkGateway6.IsValid())
	assert.Contains(t, logs.String(), "/qubes-gateway6")

	// The three addresses the engine needs are required.
	_, err = engineConfig(map[string]string{"/qubes-ip": "not-an-ip", "/qubes-netvm-gateway": "10.137.0.6"}, log)
	require.Error(t, err)
	assert.Contains(t, err.Error(), `QubesDB /qubes-ip: "not-an-ip" is not an IPv4 address`)
	assert.Contains(t, err.Error(), "QubesDB /qubes-gateway: missing")
	assert.NotContains(t, err.Error(), "/qubes-netvm-gateway")
}
