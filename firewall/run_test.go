package firewall

import (
	"context"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"gvisor.dev/gvisor/pkg/tcpip/header"

	"qfw/rules"
)

// waitFrame returns the next frame the engine wrote to l's pipe, failing
// the test after a generous bound.
func waitFrame(t *testing.T, l *MemLink) []byte {
	t.Helper()
	select {
	case f := <-l.rx:
		return f
	case <-time.After(10 * time.Second):
		t.Fatal("no frame from the engine")
		return nil
	}
}

// waitIPFrame is waitFrame for an IP frame: ARP requests before it are
// skipped. The engine asks for the gateway's MAC again when a frame for
// the uplink is processed before the ARP reply that sys-net sent (the two
// links have their own goroutines), so such a request may come first.
func waitIPFrame(t *testing.T, l *MemLink) []byte {
	t.Helper()
	for {
		f := waitFrame(t, l)
		if header.Ethernet(f).Type() != header.ARPProtocolNumber {
			return f
		}
	}
}

func TestRunForwardsUntilCancelledAndDropsFailedClients(t *testing.T) {
	cfg := testConfig()
	cfg.UplinkIP6, cfg.UplinkGateway6, cfg.ClientGateway6 = netip.Addr{}, netip.Addr{}, netip.Addr{}
	engineEnd, sysnet := Pipe(uplinkMAC, sysnetMAC, DefaultMTU)
	e, err := New(cfg, engineEnd)
	require.NoError(t, err)
	clientEnd, clientPeer := Pipe(GatewayMAC, clientMAC, DefaultMTU)
	require.NoError(t, e.AddClient(ClientConfig{Name: "a", IP4: clientAIP, MAC: clientMAC, Link: clientEnd}))
	require.NoError(t, e.SetRules(clientAIP, rules.ParseQubesDB(map[string]string{"policy": "drop", "0000": "action=accept proto=icmp"}, cfg.RuleOptions(rules.IPv4, nil))))

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- e.Run(ctx) }()

	// The engine asks for sys-net's MAC first.
	arp := header.ARP(waitFrame(t, sysnet)[header.EthernetMinimumSize:])
	require.Equal(t, header.ARPRequest, arp.Op())
	_, err = sysnet.Write([][]byte{arpFrame(header.ARPReply, uplinkMAC, sysnetMAC, sysnetIP, uplinkIP)})
	require.NoError(t, err)

	ping := ipPacket{srcMAC: clientMAC, dstMAC: GatewayMAC, src: clientAIP, dst: remoteIP, proto: protoICMPv4, icmpType: uint8(header.ICMPv4Echo), id: 77, payload: []byte("hello")}
	_, err = clientPeer.Write([][]byte{ping.frame()})
	require.NoError(t, err)
	out := decode(t, waitIPFrame(t, sysnet))
	require.Equal(t, uplinkIP, out.srcAddr)
	pong := ipPacket{srcMAC: sysnetMAC, dstMAC: uplinkMAC, src: remoteIP, dst: uplinkIP, proto: protoICMPv4, icmpType: uint8(header.ICMPv4EchoReply), id: out.srcPort, payload: []byte("hello")}
	_, err = sysnet.Write([][]byte{pong.frame()})
	require.NoError(t, err)
	in := decode(t, waitFrame(t, clientPeer))
	assert.Equal(t, clientAIP, in.dstAddr)
	assert.Equal(t, uint16(77), header.ICMPv4(in.l4).Ident())

	// A client added while running is served too.
	clientEndB, clientPeerB := Pipe(GatewayMAC, clientMAC, DefaultMTU)
	require.NoError(t, e.AddClient(ClientConfig{Name: "b", IP4: clientBIP, MAC: clientMAC, Link: clientEndB}))
	_, err = clientPeerB.Write([][]byte{arpFrame(header.ARPRequest, broadcast, clientMAC, clientBIP, uplinkIP)})
	require.NoError(t, err)
	reply := waitFrame(t, clientPeerB)
	assert.Equal(t, GatewayMAC, net.HardwareAddr(header.ARP(reply[header.EthernetMinimumSize:]).HardwareAddressSender()))

	// Unplugging client b's cable removes b only; a still works.
	require.NoError(t, clientPeerB.Close())
	require.Eventually(t, func() bool { return len(e.Counters().Clients) == 1 }, 10*time.Second, time.Millisecond)
	_, err = clientPeer.Write([][]byte{ping.frame()})
	require.NoError(t, err)
	assert.Equal(t, uplinkIP, decode(t, waitIPFrame(t, sysnet)).srcAddr)

	cancel()
	select {
	case err := <-done:
		require.NoError(t, err)
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return")
	}
	_, err = clientEnd.Write(nil)
	assert.ErrorIs(t, err, net.ErrClosed, "Run closed the links")
	assert.Error(t, e.Run(context.Background()), "Run only once")
	late, _ := Pipe(GatewayMAC, clientMAC, DefaultMTU)
	assert.Error(t, e.AddClient(ClientConfig{Name: "late", IP4: clientBIP, MAC: clientMAC, Link: late}),
		"a client added after Run would have no reader and its link would never be closed")
}

func TestRunReturnsWhenTheUplinkFails(t *testing.T) {
	engineEnd, sysnet := Pipe(uplinkMAC, sysnetMAC, DefaultMTU)
	e, err := New(testConfig(), engineEnd)
	require.NoError(t, err)
	done := make(chan error, 1)
	go func() { done <- e.Run(context.Background()) }()
	require.NoError(t, sysnet.Close())
	select {
	case err := <-done:
		require.Error(t, err)
		assert.Contains(t, err.Error(), "uplink")
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return")
	}
}

func TestRuleOptionsMatchClientDNS(t *testing.T) {
	cfg := Config{ClientDNS: []netip.Addr{dnsIP}}
	assert.Equal(t, []netip.Addr{dnsIP}, cfg.RuleOptions(rules.IPv4, nil).DNSServers)
	cfg.ClientDNS = nil
	assert.Equal(t, rules.DefaultDNSServers, cfg.RuleOptions(rules.IPv4, nil).DNSServers,
		"no client DNS given: Qubes' 10.139.1.1 and .2")
}
