package tapnet_test

import (
	"bytes"
	"context"
	"net/netip"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestFragmentedPingAndUDP sends datagrams larger than the 1500-byte MTU
// through the engine: the client's kernel fragments them, the engine
// forwards the fragments of the accepted flows (no reassembly) and the
// upstream kernel's fragmented answers come back to the client.
func TestFragmentedPingAndUDP(t *testing.T) {
	tp := newTopology(t, client5)
	e := startEngine(t, tp)
	c5 := tp.client("c5")
	e.setRules(t, c5, "action=accept proto=icmp dst4="+serverA.String()+"/32",
		"action=accept proto=udp dst4="+serverA.String()+"/32")
	ctx := testContext(t)

	out, err := c5.Command(ctx, "ping", "-n", "-c", "1", "-W", "10", "-s", "3000", serverA.String()).CombinedOutput()
	require.NoError(t, err, "ping -s 3000 serverA: %s", out)
	assert.Contains(t, string(out), "1 received")

	exCtx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	payload := bytes.Repeat([]byte("fragmented udp "), 2000/15)
	reply, err := c5.udpExchange(exCtx, netip.AddrPortFrom(serverA, echoPort), payload)
	require.NoError(t, err)
	assert.Equal(t, payload, reply)

	counters := e.clientCounters(t, c5)
	assert.GreaterOrEqual(t, counters.TxPackets, uint64(5), "3 fragments of the ping, 2 of the datagram")
	assert.GreaterOrEqual(t, counters.RxPackets, uint64(5))
}
