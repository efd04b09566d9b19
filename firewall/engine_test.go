package firewall

import (
	"net"
	"net/netip"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

func TestClientARPForGatewayIsAnsweredButNotForItself(t *testing.T) {
	b := newBed(t, testConfig())
	b.addClient("a", clientAIP, clientA6, "action=accept")

	b.fromClient(clientAIP, arpFrame(header.ARPRequest, broadcast, clientMAC, clientAIP, uplinkIP))
	replies := b.toClient(clientAIP)
	require.Len(t, replies, 1)
	eth := header.Ethernet(replies[0])
	assert.Equal(t, clientMAC, net.HardwareAddr(eth.DestinationAddress()))
	assert.Equal(t, GatewayMAC, net.HardwareAddr(eth.SourceAddress()))
	arp := header.ARP(replies[0][header.EthernetMinimumSize:])
	assert.Equal(t, header.ARPReply, arp.Op())
	assert.Equal(t, GatewayMAC, net.HardwareAddr(arp.HardwareAddressSender()))
	assert.Equal(t, uplinkIP.AsSlice(), arp.ProtocolAddressSender())
	assert.Equal(t, clientMAC, net.HardwareAddr(arp.HardwareAddressTarget()))
	assert.Equal(t, clientAIP.AsSlice(), arp.ProtocolAddressTarget())

	// Its own address (duplicate address detection) and spoofed senders get nothing.
	b.fromClient(clientAIP,
		arpFrame(header.ARPRequest, broadcast, clientMAC, clientAIP, clientAIP),
		arpFrame(header.ARPRequest, broadcast, clientMAC, clientBIP, uplinkIP))
	assert.Empty(t, b.toClient(clientAIP))
	assert.Empty(t, b.toUplink())
}

func TestClientNeighborSolicitationForGatewayIsAnswered(t *testing.T) {
	b := newBed(t, testConfig())
	b.addClient("a", clientAIP, clientA6, "action=accept")
	group := addr("ff02::1:ffa8:6") // solicited-node group of ...a89:6
	b.fromClient(clientAIP, ndpFrame(header.ICMPv6NeighborSolicit, clientMAC, clientA6, group, uplinkIP6, clientMAC))
	d := one(t, b.toClient(clientAIP))
	require.Equal(t, protoICMPv6, d.proto)
	assert.Equal(t, header.ICMPv6NeighborAdvert, header.ICMPv6Type(d.icmpType))
	assert.Equal(t, clientA6, d.dstAddr)
	na := header.NDPNeighborAdvert(header.ICMPv6(d.l4).MessageBody())
	assert.Equal(t, tcpipOf(uplinkIP6), na.TargetAddress())
	assert.True(t, na.SolicitedFlag())
	mac, ok := ndpLinkAddress(na.Options())
	require.True(t, ok)
	assert.Equal(t, GatewayMAC, net.HardwareAddr(mac))

	// Solicitations for its own address get nothing.
	b.fromClient(clientAIP, ndpFrame(header.ICMPv6NeighborSolicit, clientMAC, clientA6, group, clientA6, clientMAC))
	assert.Empty(t, b.toClient(clientAIP))
}

// onlyFlow returns the single flow in the table.
func (b *bed) onlyFlow() *flow {
	b.t.Helper()
	var found *flow
	for i := range b.e.flows.flows {
		if f := &b.e.flows.flows[i]; f.inUse {
			require.Nil(b.t, found, "more than one flow")
			found = f
		}
	}
	require.NotNil(b.t, found, "no flow")
	return found
}

func TestTCPConnectionIsNATedBothWaysWithValidChecksums(t *testing.T) {
	for _, tc := range []struct {
		name                string
		client, nat, remote netip.Addr
	}{
		{"IPv4", clientAIP, uplinkIP, remoteIP},
		{"IPv6", clientA6, uplinkIP6, remoteIP6},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := newBed(t, testConfig())
			b.addClient("a", clientAIP, clientA6, "action=accept proto=tcp dstports=443-443")

			b.fromClient(clientAIP, clientTCP(tc.client, 40000, header.TCPFlagSyn, 100, 0, ""))
			out := one(t, b.toUplink())
			assert.Equal(t, tc.nat, out.srcAddr)
			assert.Equal(t, tc.remote, out.dstAddr)
			assert.GreaterOrEqual(t, out.srcPort, uint16(natPortMin))
			assert.Equal(t, uint16(443), out.dstPort)
			assert.Equal(t, uint8(63), out.ttl(), "TTL decremented")
			assert.Equal(t, sysnetMAC, net.HardwareAddr(out.eth.DestinationAddress()))
			assert.Equal(t, uplinkMAC, net.HardwareAddr(out.eth.SourceAddress()))
			nat := out.srcPort
			assert.Equal(t, tcpSynSent, b.onlyFlow().state)

			b.fromUplink(remoteTCP(tc.nat, nat, header.TCPFlagSyn|header.TCPFlagAck, 5000, 101, ""))
			in := one(t, b.toClient(clientAIP))
			assert.Equal(t, tc.remote, in.srcAddr)
			assert.Equal(t, tc.client, in.dstAddr)
			assert.Equal(t, uint16(443), in.srcPort)
			assert.Equal(t, uint16(40000), in.dstPort)
			assert.Equal(t, uint8(63), in.ttl())
			assert.Equal(t, clientMAC, net.HardwareAddr(in.eth.DestinationAddress()))
			assert.Equal(t, GatewayMAC, net.HardwareAddr(in.eth.SourceAddress()))
			assert.Equal(t, tcpSynRecv, b.onlyFlow().state)

			request := "GET / HTTP/1.1\r\n\r\n"
			b.fromClient(clientAIP, clientTCP(tc.client, 40000, header.TCPFlagAck|header.TCPFlagPsh, 101, 5001, request))
			data := one(t, b.toUplink())
			assert.Equal(t, nat, data.srcPort)
			assert.Equal(t, request, string(header.TCP(data.l4).Payload()))
			assert.Equal(t, tcpEstablished, b.onlyFlow().state)

			counters := b.e.Counters()
			require.Len(t, counters.Clients, 1)
			cc := counters.Clients[0]
			assert.Equal(t, uint64(2), cc.TxPackets)
			assert.Equal(t, uint64(1), cc.RxPackets)
			assert.Equal(t, uint64(1), cc.Accepted)
			assert.Equal(t, 1, cc.Flows)
			rulesOfFamily := cc.Rules4
			if tc.client.Is6() {
				rulesOfFamily = cc.Rules6
			}
			require.Len(t, rulesOfFamily, 2) // the rule and the policy
			assert.Equal(t, uint64(1), rulesOfFamily[0].Accepted)
			assert.Equal(t, uint64(len(data.network)+len(in.network)+len(out.network)), rulesOfFamily[0].Bytes)
		})
	}
}
