package main

import (
	"io"
	"log/slog"
	"net/netip"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The README's example database must stay loadable: a valid engine
// configuration and a committed rule tree for each of its two clients.
func TestExampleQubesDB(t *testing.T) {
	db, err := readQubesDBFile("../../examples/tap-qubesdb.json")
	require.NoError(t, err)
	cfg, err := engineConfig(db, slog.New(slog.NewTextHandler(io.Discard, nil)))
	require.NoError(t, err)
	assert.Equal(t, netip.MustParseAddr("10.137.0.6"), cfg.UplinkIP4)
	trees := ruleTrees(db, slog.New(slog.NewTextHandler(io.Discard, nil)))
	for _, ip := range []string{"10.137.0.10", "10.137.0.11"} {
		spellings := trees[netip.MustParseAddr(ip)]
		require.Len(t, spellings, 1, ip)
		assert.True(t, spellings[0].committed, ip)
		assert.Equal(t, "drop", spellings[0].entries["policy"], ip)
	}
}
