package firewall

import (
	"net"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"

	"qfw/rules"
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

func TestDroppedFlowIsRejectedWithAdminProhibited(t *testing.T) {
	for _, tc := range []struct {
		name               string
		client, gw         netip.Addr
		wantType, wantCode uint8
	}{
		{"IPv4", clientAIP, uplinkIP, uint8(header.ICMPv4DstUnreachable), uint8(header.ICMPv4AdminProhibited)},
		{"IPv6", clientA6, uplinkIP6, uint8(header.ICMPv6DstUnreachable), uint8(header.ICMPv6Prohibited)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := newBed(t, testConfig())
			b.addClient("a", clientAIP, clientA6, "action=accept proto=udp", "action=drop proto=tcp dstports=443-443")
			syn := clientTCP(tc.client, 40000, header.TCPFlagSyn, 100, 0, "")
			b.fromClient(clientAIP, syn)
			assert.Empty(t, b.toUplink())
			d := one(t, b.toClient(clientAIP))
			assert.Equal(t, tc.gw, d.srcAddr, "rejects come from the client's gateway")
			assert.Equal(t, tc.client, d.dstAddr)
			assert.Equal(t, tc.wantType, d.icmpType)
			assert.Equal(t, tc.wantCode, d.icmpCode)
			q := quoted(t, d)
			assert.Equal(t, uint16(40000), q.srcPort)
			assert.Equal(t, uint16(443), q.dstPort)
			assert.Equal(t, syn[header.EthernetMinimumSize:], []byte(q.network), "the whole small packet is quoted")

			cc := b.e.Counters().Clients[0]
			assert.Equal(t, uint64(1), cc.Rejected)
			assert.Equal(t, 0, cc.Flows)
			rs := cc.Rules4
			if tc.client.Is6() {
				rs = cc.Rules6
			}
			assert.Equal(t, uint64(1), rs[1].Rejected, "counted on the drop rule")
			assert.Equal(t, 1, rs[1].Number)
			assert.Equal(t, "action=drop proto=tcp dstports=443-443", rs[1].Text)
		})
	}
}

func TestRejectsAreRateLimited(t *testing.T) {
	b := newBed(t, testConfig())
	b.addClient("a", clientAIP, netip.Addr{}, "action=drop")
	sent := 0
	for range 3 * replyBurst / DefaultBatchSize * 2 {
		batch := make([][]byte, DefaultBatchSize)
		for i := range batch {
			batch[i] = clientTCP(clientAIP, uint16(1000+i), header.TCPFlagSyn, 1, 0, "")
		}
		b.fromClient(clientAIP, batch...)
		sent += len(b.toClient(clientAIP))
	}
	assert.Equal(t, replyBurst, sent, "a burst, then nothing while time stands still")
	b.advance(time.Second)
	b.fromClient(clientAIP, clientTCP(clientAIP, 999, header.TCPFlagSyn, 1, 0, ""))
	assert.Len(t, b.toClient(clientAIP), 1, "tokens come back with time")
}

func TestClientWithoutRulesIsBlocked(t *testing.T) {
	b := newBed(t, testConfig())
	b.addClient("a", clientAIP, clientA6)
	b.fromClient(clientAIP, clientTCP(clientAIP, 40000, header.TCPFlagSyn, 1, 0, ""))
	b.fromClient(clientAIP, clientTCP(clientA6, 40000, header.TCPFlagSyn, 1, 0, ""))
	assert.Empty(t, b.toUplink())
	assert.Len(t, b.toClient(clientAIP), 2, "both families rejected")

	rs := rules.ParseQubesDB(map[string]string{"policy": "drop", "0000": "action=accept dsthost=example.com"}, rules.Options{Family: rules.IPv4})
	require.True(t, rs.Blocked())
	require.NoError(t, b.e.SetRules(clientAIP, rs))
	b.fromClient(clientAIP, clientTCP(clientAIP, 40001, header.TCPFlagSyn, 1, 0, ""))
	assert.Empty(t, b.toUplink(), "rules that fail to parse block everything")
	assert.Equal(t, uint64(3), b.e.Counters().Clients[0].Rejected)
	require.Error(t, b.e.SetRules(clientBIP, rs), "unknown client")
}

func TestSpoofedBroadcastAndClientToClientAreDropped(t *testing.T) {
	b := newBed(t, testConfig())
	b.addClient("a", clientAIP, netip.Addr{}, "action=accept")
	b.addClient("b", clientBIP, netip.Addr{}, "action=accept")
	spoofed := clientTCP(clientBIP, 40000, header.TCPFlagSyn, 1, 0, "")
	dhcp := ipPacket{srcMAC: clientMAC, dstMAC: broadcast, src: addr("0.0.0.0"), dst: addr("255.255.255.255"), proto: protoUDP, sport: 68, dport: 67, payload: make([]byte, 300)}.frame()
	bcastIP := ipPacket{srcMAC: clientMAC, dstMAC: GatewayMAC, src: clientAIP, dst: addr("255.255.255.255"), proto: protoUDP, sport: 5000, dport: 5000}.frame()
	mdns := ipPacket{srcMAC: clientMAC, dstMAC: net.HardwareAddr{0x01, 0, 0x5e, 0, 0, 0xfb}, src: clientAIP, dst: addr("224.0.0.251"), proto: protoUDP, sport: 5353, dport: 5353}.frame()
	toB := ipPacket{srcMAC: clientMAC, dstMAC: GatewayMAC, src: clientAIP, dst: clientBIP, proto: protoUDP, sport: 5000, dport: 5000}.frame()
	ipv6WithoutAddress := clientTCP(clientA6, 40000, header.TCPFlagSyn, 1, 0, "")
	b.fromClient(clientAIP, spoofed, dhcp, bcastIP, mdns, toB, ipv6WithoutAddress)
	assert.Empty(t, b.toUplink())
	assert.Empty(t, b.toClient(clientAIP))
	assert.Empty(t, b.toClient(clientBIP))
	assert.Equal(t, uint64(6), b.e.Counters().Clients[0].Dropped)
}

func TestPingsToTheFirewallAreAnswered(t *testing.T) {
	b := newBed(t, testConfig())
	b.addClient("a", clientAIP, clientA6)
	b.fromClient(clientAIP, ipPacket{srcMAC: clientMAC, dstMAC: GatewayMAC, src: clientAIP, dst: uplinkIP, proto: protoICMPv4, icmpType: uint8(header.ICMPv4Echo), id: 7, payload: []byte("ping")}.frame())
	d := one(t, b.toClient(clientAIP))
	assert.Equal(t, uint8(header.ICMPv4EchoReply), d.icmpType)
	assert.Equal(t, uplinkIP, d.srcAddr)
	assert.Equal(t, clientAIP, d.dstAddr)
	assert.Equal(t, "ping", string(header.ICMPv4(d.l4).Payload()))

	b.fromClient(clientAIP, ipPacket{srcMAC: clientMAC, dstMAC: GatewayMAC, src: clientA6, dst: uplinkIP6, proto: protoICMPv6, icmpType: uint8(header.ICMPv6EchoRequest), id: 7, payload: []byte("ping6")}.frame())
	d = one(t, b.toClient(clientAIP))
	assert.Equal(t, uint8(header.ICMPv6EchoReply), d.icmpType)

	// IPv4 UDP to port 68 of the gateway is dropped silently, other
	// traffic (DHCP to the server port too) is rejected with
	// host-prohibited, IPv6 with admin-prohibited.
	b.fromClient(clientAIP, ipPacket{srcMAC: clientMAC, dstMAC: GatewayMAC, src: clientAIP, dst: uplinkIP, proto: protoUDP, sport: 67, dport: 68}.frame())
	assert.Empty(t, b.toClient(clientAIP))
	b.fromClient(clientAIP, ipPacket{srcMAC: clientMAC, dstMAC: GatewayMAC, src: clientAIP, dst: uplinkIP, proto: protoUDP, sport: 68, dport: 67}.frame())
	assert.Equal(t, uint8(header.ICMPv4HostProhibited), one(t, b.toClient(clientAIP)).icmpCode)
	b.fromClient(clientAIP, ipPacket{srcMAC: clientMAC, dstMAC: GatewayMAC, src: clientA6, dst: uplinkIP6, proto: protoUDP, sport: 67, dport: 68}.frame())
	assert.Equal(t, uint8(header.ICMPv6Prohibited), one(t, b.toClient(clientAIP)).icmpCode)
	b.fromClient(clientAIP, ipPacket{srcMAC: clientMAC, dstMAC: GatewayMAC, src: clientAIP, dst: uplinkIP, proto: protoTCP, sport: 1, dport: 22, flags: header.TCPFlagSyn}.frame())
	d = one(t, b.toClient(clientAIP))
	assert.Equal(t, uint8(header.ICMPv4HostProhibited), d.icmpCode)

	// From the uplink, both families, also when the identifier is that of
	// a client's ping flow to the same host: answered by us, never passed
	// to the client.
	b.fromUplink(ipPacket{srcMAC: sysnetMAC, dstMAC: uplinkMAC, src: sysnetIP6, dst: uplinkIP6, proto: protoICMPv6, icmpType: uint8(header.ICMPv6EchoRequest), id: 9}.frame())
	d = one(t, b.toUplink())
	assert.Equal(t, uint8(header.ICMPv6EchoReply), d.icmpType)
	assert.Equal(t, sysnetIP6, d.dstAddr)
	assert.Equal(t, sysnetMAC, net.HardwareAddr(d.eth.DestinationAddress()))
	b.setRules(clientAIP, "action=accept")
	b.fromClient(clientAIP, ipPacket{srcMAC: clientMAC, dstMAC: GatewayMAC, src: clientAIP, dst: sysnetIP, proto: protoICMPv4, icmpType: uint8(header.ICMPv4Echo), id: 9}.frame())
	natID := header.ICMPv4(one(t, b.toUplink()).l4).Ident()
	for _, id := range []uint16{9, natID} {
		b.fromUplink(ipPacket{srcMAC: sysnetMAC, dstMAC: uplinkMAC, src: sysnetIP, dst: uplinkIP, proto: protoICMPv4, icmpType: uint8(header.ICMPv4Echo), id: id}.frame())
		d = one(t, b.toUplink())
		assert.Equal(t, uint8(header.ICMPv4EchoReply), d.icmpType)
		assert.Equal(t, sysnetIP, d.dstAddr)
		assert.Equal(t, id, header.ICMPv4(d.l4).Ident())
	}
	assert.Empty(t, b.toClient(clientAIP))
}

func TestUplinkTrafficOutsideFlowsIsDropped(t *testing.T) {
	b := newBed(t, testConfig())
	b.addClient("a", clientAIP, netip.Addr{}, "action=accept")
	b.fromUplink(
		remoteTCP(uplinkIP, 40000, header.TCPFlagSyn, 1, 0, ""), // inbound connection
		ipPacket{srcMAC: sysnetMAC, dstMAC: uplinkMAC, src: remoteIP, dst: clientAIP, proto: protoUDP, sport: 53, dport: 5000}.frame(),
		ipPacket{srcMAC: sysnetMAC, dstMAC: broadcast, src: remoteIP, dst: addr("255.255.255.255"), proto: protoUDP, sport: 67, dport: 68}.frame(),
	)
	assert.Empty(t, b.toClient(clientAIP))
	assert.Empty(t, b.toUplink())
	assert.Equal(t, uint64(3), b.e.Counters().Uplink.Dropped)
}

func TestTTLExpiryAndOversizedPacketsGetICMPErrors(t *testing.T) {
	b := newBed(t, testConfig())
	b.addClient("a", clientAIP, clientA6, "action=accept")
	probe := ipPacket{srcMAC: clientMAC, dstMAC: GatewayMAC, src: clientAIP, dst: remoteIP, ttl: 1, proto: protoUDP, sport: 33434, dport: 33434}.frame()
	b.fromClient(clientAIP, probe)
	d := one(t, b.toClient(clientAIP))
	assert.Equal(t, uint8(header.ICMPv4TimeExceeded), d.icmpType)
	assert.Equal(t, uplinkIP, d.srcAddr, "traceroute shows the firewall")
	assert.Empty(t, b.toUplink())

	big := ipPacket{srcMAC: clientMAC, dstMAC: GatewayMAC, src: clientAIP, dst: remoteIP, df: true, proto: protoUDP, sport: 5000, dport: 5000, payload: make([]byte, 1600)}
	bigFrame := big.frame()
	w := b.clients[clientAIP].w
	w.bufs[0] = make([]byte, 2048) // a link with a larger MTU than the uplink's
	b.fromClient(clientAIP, bigFrame)
	d = one(t, b.toClient(clientAIP))
	assert.Equal(t, uint8(header.ICMPv4DstUnreachable), d.icmpType)
	assert.Equal(t, uint8(header.ICMPv4FragmentationNeeded), d.icmpCode)
	assert.Equal(t, uint16(DefaultMTU), header.ICMPv4(d.l4).MTU())
	assert.Len(t, d.network, icmpv4ErrorMax, "quotes up to 576 bytes")

	big.df = false
	b.fromClient(clientAIP, big.frame())
	assert.Empty(t, b.toClient(clientAIP), "oversized without DF: dropped (no fragmentation)")
	assert.Empty(t, b.toUplink())

	big6 := ipPacket{srcMAC: clientMAC, dstMAC: GatewayMAC, src: clientA6, dst: remoteIP6, proto: protoUDP, sport: 5000, dport: 5000, payload: make([]byte, 1600)}
	b.fromClient(clientAIP, big6.frame())
	d = one(t, b.toClient(clientAIP))
	assert.Equal(t, uint8(header.ICMPv6PacketTooBig), d.icmpType)
	assert.Equal(t, uint32(DefaultMTU), header.ICMPv6(d.l4).MTU())
	assert.Len(t, d.network, header.IPv6MinimumMTU)
}

func TestNoICMPErrorsAboutICMPErrorMessages(t *testing.T) {
	b := newBed(t, testConfig())
	b.addClient("a", clientAIP, clientA6, "action=accept")
	icmp := func(src, dst netip.Addr, proto, typ uint8, ttl uint8, size int) []byte {
		return ipPacket{srcMAC: clientMAC, dstMAC: GatewayMAC, src: src, dst: dst, ttl: ttl, df: true, proto: proto,
			icmpType: typ, rawICMP: make([]byte, size)}.frame()
	}
	for i, w := 0, b.clients[clientAIP].w; i < 2; i++ {
		w.bufs[i] = make([]byte, 2048) // a link with a larger MTU than the uplink's
	}
	// Errors, router advertisements and solicitations, and types Linux
	// does not know, from traceroute-like TTLs or too large: never an
	// error about them. IPv6: every error type.
	for _, typ := range []uint8{1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 19, 42, 255} {
		b.fromClient(clientAIP, icmp(clientAIP, remoteIP, protoICMPv4, typ, 1, 8), icmp(clientAIP, remoteIP, protoICMPv4, typ, 64, 1600))
		assert.Empty(t, b.toClient(clientAIP), "ICMPv4 type %d", typ)
	}
	for _, typ := range []header.ICMPv6Type{header.ICMPv6DstUnreachable, header.ICMPv6PacketTooBig, header.ICMPv6TimeExceeded, header.ICMPv6ParamProblem, 100} {
		b.fromClient(clientAIP, icmp(clientA6, remoteIP6, protoICMPv6, uint8(typ), 1, 8), icmp(clientA6, remoteIP6, protoICMPv6, uint8(typ), 64, 1600))
		assert.Empty(t, b.toClient(clientAIP), "ICMPv6 type %d", typ)
	}
	// Informational messages get them.
	for _, typ := range []header.ICMPv4Type{header.ICMPv4Echo, header.ICMPv4EchoReply, header.ICMPv4Timestamp, header.ICMPv4InfoRequest, 17, 18} {
		b.fromClient(clientAIP, icmp(clientAIP, remoteIP, protoICMPv4, uint8(typ), 1, 8), icmp(clientAIP, remoteIP, protoICMPv4, uint8(typ), 64, 1600))
		assert.Len(t, b.toClient(clientAIP), 2, "ICMPv4 type %d", typ)
	}
	for _, typ := range []header.ICMPv6Type{header.ICMPv6EchoRequest, header.ICMPv6EchoReply} {
		b.fromClient(clientAIP, icmp(clientA6, remoteIP6, protoICMPv6, uint8(typ), 1, 8), icmp(clientA6, remoteIP6, protoICMPv6, uint8(typ), 64, 1600))
		assert.Len(t, b.toClient(clientAIP), 2, "ICMPv6 type %d", typ)
	}
	assert.Empty(t, b.toUplink())
}

// withIPv4Options inserts options (a multiple of 4 bytes) after the IPv4
// header of frame.
func withIPv4Options(frame []byte, opts ...byte) []byte {
	const ipStart = header.EthernetMinimumSize
	out := append(append(append([]byte(nil), frame[:ipStart+header.IPv4MinimumSize]...), opts...), frame[ipStart+header.IPv4MinimumSize:]...)
	ip := header.IPv4(out[ipStart:])
	ip.SetHeaderLength(uint8(header.IPv4MinimumSize + len(opts)))
	ip.SetTotalLength(uint16(len(out) - ipStart))
	ip.SetChecksum(0)
	ip.SetChecksum(^ip.CalculateChecksum())
	return out
}

func TestSourceRoutedAndMalformedIPv4OptionsAreDropped(t *testing.T) {
	b := newBed(t, testConfig())
	b.addClient("a", clientAIP, netip.Addr{}, "action=accept")
	udp := ipPacket{srcMAC: clientMAC, dstMAC: GatewayMAC, src: clientAIP, dst: remoteIP, proto: protoUDP, sport: 5000, dport: 53, payload: []byte("q")}.frame()
	bad := map[string][]byte{
		"loose source route":  {131, 7, 4, 192, 0, 2, 99, 0},
		"strict source route": {137, 7, 4, 192, 0, 2, 99, 0},
		"after a NOP":         {1, 131, 7, 4, 192, 0, 2, 99},
		"length 1":            {68, 1, 0, 0},
		"longer than header":  {7, 40, 4, 0},
		"no length":           {1, 1, 1, 7},
	}
	for what, opts := range bad {
		b.fromClient(clientAIP, withIPv4Options(udp, opts...))
		assert.Empty(t, b.toUplink(), what)
		assert.Empty(t, b.toClient(clientAIP), what)
	}
	assert.Equal(t, uint64(len(bad)), b.e.Counters().Clients[0].Dropped)
	assert.Equal(t, 0, b.e.Counters().Flows)

	// Other options pass.
	b.fromClient(clientAIP, withIPv4Options(udp, 1, 1, 1, 1), withIPv4Options(udp, 7, 7, 4, 0, 0, 0, 0, 0))
	sent := b.toUplink()
	require.Len(t, sent, 2)
	nat := decode(t, sent[0]).srcPort
	reply := ipPacket{srcMAC: sysnetMAC, dstMAC: uplinkMAC, src: remoteIP, dst: uplinkIP, proto: protoUDP, sport: 53, dport: nat, payload: []byte("a")}.frame()
	b.fromUplink(withIPv4Options(reply, 131, 7, 4, 10, 137, 0, 11, 0))
	assert.Empty(t, b.toClient(clientAIP), "nor from the uplink")
	b.fromUplink(reply)
	one(t, b.toClient(clientAIP))
}

func TestUDPAndDNSFlowsAndTheirTimeouts(t *testing.T) {
	b := newBed(t, testConfig())
	b.addClient("a", clientAIP, netip.Addr{}, "action=accept specialtarget=dns")
	query := ipPacket{srcMAC: clientMAC, dstMAC: GatewayMAC, src: clientAIP, dst: dnsIP, proto: protoUDP, sport: 5353, dport: 53, payload: []byte("query")}
	b.fromClient(clientAIP, query.frame())
	out := one(t, b.toUplink())
	assert.Equal(t, dnsIP, out.dstAddr, "DNS goes to the uplink unchanged; sys-net redirects it")
	answer := ipPacket{srcMAC: sysnetMAC, dstMAC: uplinkMAC, src: dnsIP, dst: uplinkIP, proto: protoUDP, sport: 53, dport: out.srcPort, payload: []byte("answer")}
	b.fromUplink(answer.frame())
	in := one(t, b.toClient(clientAIP))
	assert.Equal(t, uint16(5353), in.dstPort)
	assert.Equal(t, "answer", string(header.UDP(in.l4).Payload()))
	assert.Equal(t, udpReplied, b.onlyFlow().state)

	// Other UDP is rejected by the rules.
	other := query
	other.dst = remoteIP
	b.fromClient(clientAIP, other.frame())
	assert.Empty(t, b.toUplink())
	assert.Len(t, b.toClient(clientAIP), 1)

	b.advance(flowTimeouts[udpReplied] - time.Second)
	b.fromUplink(answer.frame())
	assert.Len(t, b.toClient(clientAIP), 1, "still alive before the timeout")
	b.advance(flowTimeouts[udpReplied] + time.Second)
	b.fromUplink(answer.frame())
	assert.Empty(t, b.toClient(clientAIP), "expired")
	assert.Equal(t, 0, b.e.Counters().Flows)
}

func TestUnrepliedUDPExpiresAfter30Seconds(t *testing.T) {
	b := newBed(t, testConfig())
	b.addClient("a", clientAIP, netip.Addr{}, "action=accept")
	b.fromClient(clientAIP, ipPacket{srcMAC: clientMAC, dstMAC: GatewayMAC, src: clientAIP, dst: remoteIP, proto: protoUDP, sport: 5000, dport: 9}.frame())
	require.Len(t, b.toUplink(), 1)
	b.advance(31 * time.Second)
	b.e.housekeeping()
	assert.Equal(t, 0, b.e.Counters().Flows)
}

func TestTCPTeardownShortensTheTimeout(t *testing.T) {
	b := newBed(t, testConfig())
	b.addClient("a", clientAIP, netip.Addr{}, "action=accept")
	b.fromClient(clientAIP, clientTCP(clientAIP, 40000, header.TCPFlagSyn, 100, 0, ""))
	nat := one(t, b.toUplink()).srcPort
	b.fromUplink(remoteTCP(uplinkIP, nat, header.TCPFlagSyn|header.TCPFlagAck, 5000, 101, ""))
	b.fromClient(clientAIP, clientTCP(clientAIP, 40000, header.TCPFlagAck, 101, 5001, ""))
	f := b.onlyFlow()
	require.Equal(t, tcpEstablished, f.state)
	assert.Equal(t, b.now.Load()+int64(432000*time.Second), f.expires, "Linux's five days")

	b.fromClient(clientAIP, clientTCP(clientAIP, 40000, header.TCPFlagFin|header.TCPFlagAck, 101, 5001, ""))
	assert.Equal(t, tcpFinWait, f.state)
	b.fromUplink(remoteTCP(uplinkIP, nat, header.TCPFlagFin|header.TCPFlagAck, 5001, 102, ""))
	assert.Equal(t, tcpTimeWait, f.state)
	b.fromClient(clientAIP, clientTCP(clientAIP, 40000, header.TCPFlagAck, 102, 5002, ""))
	assert.Len(t, b.toUplink(), 3)
	assert.Len(t, b.toClient(clientAIP), 2)

	// A new SYN on the same ports starts a new flow with a new NAT port.
	b.fromClient(clientAIP, clientTCP(clientAIP, 40000, header.TCPFlagSyn, 9000, 0, ""))
	assert.Equal(t, tcpSynSent, b.onlyFlow().state)
	require.Len(t, b.toUplink(), 1)

	b.advance(flowTimeouts[tcpSynSent] + time.Second)
	b.e.housekeeping()
	assert.Equal(t, 0, b.e.Counters().Flows)
}

func TestMidConnectionSegmentWithoutFlowIsReset(t *testing.T) {
	for _, tc := range []struct {
		name   string
		client netip.Addr
	}{{"IPv4", clientAIP}, {"IPv6", clientA6}} {
		t.Run(tc.name, func(t *testing.T) {
			b := newBed(t, testConfig())
			b.addClient("a", clientAIP, clientA6, "action=accept")
			b.fromClient(clientAIP, clientTCP(tc.client, 40000, header.TCPFlagAck, 1, 777, "data"))
			assert.Empty(t, b.toUplink())
			rst := one(t, b.toClient(clientAIP))
			assert.Equal(t, tc.client, rst.dstAddr)
			assert.Equal(t, uint16(40000), rst.dstPort)
			assert.Equal(t, header.TCPFlagRst, header.TCP(rst.l4).Flags())
			assert.Equal(t, uint32(777), header.TCP(rst.l4).SequenceNumber(), "the segment's ACK")

			// So is a late FIN or SYN-ACK; a RST is never answered.
			b.fromClient(clientAIP, clientTCP(tc.client, 40000, header.TCPFlagFin|header.TCPFlagAck, 10, 778, "ab"))
			rst = one(t, b.toClient(clientAIP))
			assert.Equal(t, header.TCPFlagRst, header.TCP(rst.l4).Flags())
			assert.Equal(t, uint32(778), header.TCP(rst.l4).SequenceNumber())
			b.fromClient(clientAIP, clientTCP(tc.client, 40000, header.TCPFlagSyn|header.TCPFlagAck, 10, 779, ""))
			assert.Equal(t, uint32(779), header.TCP(one(t, b.toClient(clientAIP)).l4).SequenceNumber())
			b.fromClient(clientAIP, clientTCP(tc.client, 40000, header.TCPFlagRst, 10, 0, ""))
			assert.Empty(t, b.toClient(clientAIP))
			assert.Equal(t, 0, b.e.Counters().Flows)
		})
	}
}

func TestInvalidTCPFlagCombinationsAreDropped(t *testing.T) {
	const (
		syn, fin, rst = header.TCPFlagSyn, header.TCPFlagFin, header.TCPFlagRst
		ack, urg, psh = header.TCPFlagAck, header.TCPFlagUrg, header.TCPFlagPsh
	)
	b := newBed(t, testConfig())
	b.addClient("a", clientAIP, clientA6, "action=accept")
	// No TCP sends these; Linux conntrack calls them invalid and
	// sys-firewall drops them without an answer, new flow or not.
	invalid := []header.TCPFlags{syn | fin, syn | fin | psh | urg, syn | rst, fin, 0, fin | psh | urg, syn | fin | rst | ack | urg | psh, rst | fin | ack}
	for _, flags := range invalid {
		b.fromClient(clientAIP, clientTCP(clientAIP, 40000, flags, 1, 1, "x"), clientTCP(clientA6, 40000, flags, 1, 1, "x"))
	}
	assert.Empty(t, b.toUplink())
	assert.Empty(t, b.toClient(clientAIP))
	counters := b.e.Counters()
	assert.Equal(t, 0, counters.Flows)
	assert.Equal(t, uint64(2*len(invalid)), counters.Clients[0].Dropped)

	// An open connection does not carry them either, in either direction.
	b.fromClient(clientAIP, clientTCP(clientAIP, 40000, syn|header.TCPFlagEce|header.TCPFlagCwr, 1, 0, ""))
	nat := one(t, b.toUplink()).srcPort
	b.fromUplink(remoteTCP(uplinkIP, nat, syn|ack|header.TCPFlagEce, 1, 2, ""))
	one(t, b.toClient(clientAIP))
	for _, flags := range invalid {
		b.fromClient(clientAIP, clientTCP(clientAIP, 40000, flags, 2, 2, "x"))
		b.fromUplink(remoteTCP(uplinkIP, nat, flags, 2, 2, "x"))
	}
	assert.Empty(t, b.toUplink())
	assert.Empty(t, b.toClient(clientAIP))
	assert.Equal(t, tcpSynRecv, b.onlyFlow().state, "nothing moved the flow's state")
	for _, flags := range []header.TCPFlags{ack, ack | psh, ack | urg, fin | ack, fin | ack | psh, rst | ack, rst} {
		b.fromClient(clientAIP, clientTCP(clientAIP, 40000, flags, 2, 2, ""))
	}
	assert.Len(t, b.toUplink(), 7, "valid combinations pass")
}

func TestICMPErrorsFromUplinkAreTranslatedForTheClient(t *testing.T) {
	for _, tc := range []struct {
		name                string
		client, nat, remote netip.Addr
		errType, errCode    uint8
		proto               uint8
	}{
		{"IPv4 time exceeded, UDP", clientAIP, uplinkIP, remoteIP, uint8(header.ICMPv4TimeExceeded), 0, protoICMPv4},
		{"IPv4 fragmentation needed", clientAIP, uplinkIP, remoteIP, uint8(header.ICMPv4DstUnreachable), uint8(header.ICMPv4FragmentationNeeded), protoICMPv4},
		{"IPv6 packet too big", clientA6, uplinkIP6, remoteIP6, uint8(header.ICMPv6PacketTooBig), 0, protoICMPv6},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := newBed(t, testConfig())
			b.addClient("a", clientAIP, clientA6, "action=accept")
			probe := ipPacket{srcMAC: clientMAC, dstMAC: GatewayMAC, src: tc.client, dst: tc.remote, ttl: 2, proto: protoUDP, sport: 33434, dport: 33435, payload: []byte("probe")}
			b.fromClient(clientAIP, probe.frame())
			sent := one(t, b.toUplink())
			// A router behind sys-net answers, quoting what we sent.
			router := addr("192.0.2.1")
			if tc.client.Is6() {
				router = addr("2001:db8:ffff::1")
			}
			icmpErr := ipPacket{srcMAC: sysnetMAC, dstMAC: uplinkMAC, src: router, dst: tc.nat, proto: tc.proto,
				icmpType: tc.errType, icmpCode: tc.errCode, mtu: 1400, rawICMP: sent.network}
			b.fromUplink(icmpErr.frame())
			d := one(t, b.toClient(clientAIP))
			assert.Equal(t, router, d.srcAddr)
			assert.Equal(t, tc.client, d.dstAddr)
			assert.Equal(t, tc.errType, d.icmpType)
			q := quoted(t, d)
			assert.Equal(t, tc.client, addrFromTCPIP(q.src), "quoted source is the client again")
			assert.Equal(t, uint16(33434), q.srcPort)
			assert.Equal(t, uint16(33435), q.dstPort)
			if tc.client.Is4() {
				assert.True(t, q.ip4.IsChecksumValid(), "quoted IPv4 header checksum")
			}
			udp := header.UDP(q.l4)
			xsum := header.PseudoHeaderChecksum(header.UDPProtocolNumber, q.src, q.dst, udp.Length())
			assert.Equal(t, uint16(0xffff), udp.CalculateChecksum(checksum.Checksum(udp.Payload(), xsum)), "quoted UDP checksum")
			if tc.errType == uint8(header.ICMPv4DstUnreachable) {
				assert.Equal(t, uint16(1400), header.ICMPv4(d.l4).MTU())
			}

			// An error quoting an unknown flow is dropped.
			icmpErr.rawICMP = remoteTCP(tc.nat, 1, header.TCPFlagSyn, 1, 0, "")[header.EthernetMinimumSize:]
			b.fromUplink(icmpErr.frame())
			assert.Empty(t, b.toClient(clientAIP))
		})
	}
}

func TestOneClientCannotEvictAnothersFlows(t *testing.T) {
	cfg := testConfig()
	cfg.MaxFlows, cfg.MaxFlowsPerClient = 20, 10
	b := newBed(t, cfg)
	b.addClient("a", clientAIP, netip.Addr{}, "action=accept")
	b.addClient("b", clientBIP, netip.Addr{}, "action=accept")
	b.fromClient(clientBIP, clientTCP(clientBIP, 40000, header.TCPFlagSyn, 1, 0, ""))
	natB := one(t, b.toUplink()).srcPort
	b.fromUplink(remoteTCP(uplinkIP, natB, header.TCPFlagSyn|header.TCPFlagAck, 1, 2, ""))
	b.fromClient(clientBIP, clientTCP(clientBIP, 40000, header.TCPFlagAck, 2, 2, ""))
	require.Len(t, b.toClient(clientBIP), 1)
	require.Len(t, b.toUplink(), 1)

	// Client A floods with established connections: it gets its share, no more.
	for port := range uint16(15) {
		b.fromClient(clientAIP, clientTCP(clientAIP, 1000+port, header.TCPFlagSyn, 1, 0, ""))
		for _, f := range b.toUplink() {
			nat := decode(t, f).srcPort
			b.fromUplink(remoteTCP(uplinkIP, nat, header.TCPFlagSyn|header.TCPFlagAck, 1, 2, ""))
			b.fromClient(clientAIP, clientTCP(clientAIP, 1000+port, header.TCPFlagAck, 2, 2, ""))
			b.toUplink()
		}
	}
	counters := b.e.Counters()
	assert.Equal(t, 10, counters.Clients[0].Flows)
	assert.Equal(t, 1, counters.Clients[1].Flows)
	assert.Equal(t, uint64(5), counters.Uplink.FlowTableFull)

	// B's connection still works.
	b.fromUplink(remoteTCP(uplinkIP, natB, header.TCPFlagAck, 2, 2, "still here"))
	assert.Len(t, b.toClient(clientBIP), 1)

	// An unanswered flow of A gives way to A's next new flow.
	b.e.RemoveClient(clientAIP)
	b.addClient("a", clientAIP, netip.Addr{}, "action=accept")
	for port := range uint16(12) {
		b.fromClient(clientAIP, clientTCP(clientAIP, 2000+port, header.TCPFlagSyn, 1, 0, ""))
	}
	assert.Len(t, b.toUplink(), 12)
	assert.Equal(t, 10, b.e.Counters().Clients[0].Flows)
}

func TestSetRulesCutsRejectedFlowsWithReset(t *testing.T) {
	b := newBed(t, testConfig())
	b.addClient("a", clientAIP, clientA6, "action=accept")
	b.fromClient(clientAIP, clientTCP(clientAIP, 40000, header.TCPFlagSyn, 100, 0, ""))
	nat := one(t, b.toUplink()).srcPort
	b.fromUplink(remoteTCP(uplinkIP, nat, header.TCPFlagSyn|header.TCPFlagAck, 5000, 101, ""))
	b.fromClient(clientAIP, clientTCP(clientAIP, 40000, header.TCPFlagAck, 101, 5001, ""))
	b.fromClient(clientAIP, ipPacket{srcMAC: clientMAC, dstMAC: GatewayMAC, src: clientAIP, dst: dnsIP, proto: protoUDP, sport: 5000, dport: 53}.frame())
	b.fromClient(clientAIP, clientTCP(clientA6, 40000, header.TCPFlagSyn, 100, 0, ""))
	b.toUplink()
	b.toClient(clientAIP)
	require.Equal(t, 3, b.e.Counters().Flows)

	// Data from the remote is in flight when the rules change: the client
	// has not acknowledged it yet.
	b.fromUplink(remoteTCP(uplinkIP, nat, header.TCPFlagAck|header.TCPFlagPsh, 5001, 101, "hello"))
	require.Len(t, b.toClient(clientAIP), 1)

	// New IPv4 rules allow only DNS: the TCP flow is cut, the IPv6 one stays.
	b.setRules(clientAIP, "action=accept specialtarget=dns")
	assert.Equal(t, 2, b.e.Counters().Flows)
	rst := one(t, b.toClient(clientAIP))
	tcp := header.TCP(rst.l4)
	assert.Equal(t, remoteIP, rst.srcAddr)
	assert.Equal(t, clientAIP, rst.dstAddr)
	assert.Equal(t, uint16(443), rst.srcPort)
	assert.Equal(t, uint16(40000), rst.dstPort)
	assert.Equal(t, header.TCPFlagRst, tcp.Flags())
	assert.Equal(t, uint32(5006), tcp.SequenceNumber(), "right after the remote's last byte: what the client expects next")

	b.fromUplink(remoteTCP(uplinkIP, nat, header.TCPFlagAck, 5006, 101, "late"))
	assert.Empty(t, b.toClient(clientAIP), "replies of the cut flow are dropped")
	b.fromClient(clientAIP, clientTCP(clientAIP, 40000, header.TCPFlagAck, 101, 5006, "more"))
	assert.Empty(t, b.toUplink())
	rst = one(t, b.toClient(clientAIP))
	assert.Equal(t, header.TCPFlagRst, header.TCP(rst.l4).Flags(), "and the client's next segment is answered with a RST")
	assert.Equal(t, uint32(5006), header.TCP(rst.l4).SequenceNumber())
	assert.Equal(t, uint64(1), b.e.Counters().Clients[0].Rejected)
}

func TestFramesWaitForTheGatewayMAC(t *testing.T) {
	cfg := testConfig()
	cfg.UplinkIP6, cfg.UplinkGateway6, cfg.ClientGateway6 = netip.Addr{}, netip.Addr{}, netip.Addr{}
	b := newBedUnresolved(t, cfg)
	b.addClient("a", clientAIP, clientA6, "action=accept")

	b.e.resolveGateways()
	req := b.toUplink()
	require.Len(t, req, 1)
	arp := header.ARP(req[0][header.EthernetMinimumSize:])
	require.True(t, arp.IsValid())
	assert.Equal(t, header.ARPRequest, arp.Op())
	assert.Equal(t, sysnetIP.AsSlice(), arp.ProtocolAddressTarget())
	assert.Equal(t, uplinkIP.AsSlice(), arp.ProtocolAddressSender())

	for port := range uint16(neighbourQueueLen + 2) {
		b.fromClient(clientAIP, clientTCP(clientAIP, 1000+port, header.TCPFlagSyn, 1, 0, ""))
	}
	asked := b.toUplink()
	require.Len(t, asked, 1, "the first waiting frame asks for the gateway at once, the others wait quietly")
	assert.Equal(t, header.ARPRequest, header.ARP(asked[0][header.EthernetMinimumSize:]).Op())
	b.fromUplink(arpFrame(header.ARPReply, uplinkMAC, sysnetMAC, sysnetIP, uplinkIP))
	queued := b.toUplink()
	require.Len(t, queued, neighbourQueueLen, "a bounded queue")
	for _, f := range queued {
		d := decode(t, f)
		assert.Equal(t, sysnetMAC, net.HardwareAddr(d.eth.DestinationAddress()))
		assert.Equal(t, uplinkMAC, net.HardwareAddr(d.eth.SourceAddress()))
		assert.Equal(t, uplinkIP, d.srcAddr)
	}

	// IPv6 with no uplink IPv6 is rejected; we answer ARP for our address.
	b.fromClient(clientAIP, clientTCP(clientA6, 1, header.TCPFlagSyn, 1, 0, ""))
	d := one(t, b.toClient(clientAIP))
	assert.Equal(t, uint8(header.ICMPv6Prohibited), d.icmpCode)
	b.fromUplink(arpFrame(header.ARPRequest, broadcast, sysnetMAC, sysnetIP, uplinkIP))
	reply := b.toUplink()
	require.Len(t, reply, 1)
	assert.Equal(t, header.ARPReply, header.ARP(reply[0][header.EthernetMinimumSize:]).Op())
	assert.Equal(t, []byte(uplinkMAC), header.ARP(reply[0][header.EthernetMinimumSize:]).HardwareAddressSender())
}

func TestUplinkNeighborDiscovery(t *testing.T) {
	cfg := testConfig()
	b := newBedUnresolved(t, cfg)
	e := b.e
	e.resolveGateways()
	frames := b.toUplink()
	require.Len(t, frames, 2)
	ns := decode(t, frames[1])
	assert.Equal(t, header.ICMPv6NeighborSolicit, header.ICMPv6Type(ns.icmpType))
	assert.Equal(t, tcpipOf(sysnetIP6), header.NDPNeighborSolicit(header.ICMPv6(ns.l4).MessageBody()).TargetAddress())

	b.fromUplink(ndpFrame(header.ICMPv6NeighborSolicit, sysnetMAC, sysnetIP6, addr("ff02::1:ffa8:6"), uplinkIP6, sysnetMAC))
	na := one(t, b.toUplink())
	assert.Equal(t, header.ICMPv6NeighborAdvert, header.ICMPv6Type(na.icmpType))
	assert.True(t, e.neighbours[1].resolved, "learned from the solicitation's source option")
	assert.Equal(t, [6]byte(sysnetMAC), e.neighbours[1].mac)
}

func TestLinkLocalAndLoopbackDestinationsAreNotForwarded(t *testing.T) {
	b := newBed(t, testConfig())
	b.addClient("a", clientAIP, clientA6, "action=accept")
	for _, dst := range []string{"fe80::1", "::1", "ff02::1", "127.0.0.1", "0.0.0.0", "0.1.2.3", "239.1.2.3"} {
		src := clientAIP
		if addr(dst).Is6() {
			src = clientA6
		}
		b.fromClient(clientAIP, ipPacket{srcMAC: clientMAC, dstMAC: GatewayMAC, src: src, dst: addr(dst), ttl: 1, proto: protoUDP, sport: 1, dport: 2}.frame())
		b.fromClient(clientAIP, ipPacket{srcMAC: clientMAC, dstMAC: GatewayMAC, src: src, dst: addr(dst), proto: protoUDP, sport: 1, dport: 2}.frame())
	}
	assert.Empty(t, b.toUplink())
	assert.Empty(t, b.toClient(clientAIP), "no ICMP errors about them either")
	assert.Equal(t, 0, b.e.Counters().Flows)
}

func TestClientsAreValidatedAndRemovedByIdentity(t *testing.T) {
	b := newBed(t, testConfig())
	link, _ := Pipe(GatewayMAC, clientMAC, DefaultMTU)
	require.Error(t, b.e.AddClient(ClientConfig{Name: "x", IP4: clientA6, MAC: clientMAC, Link: link}), "IPv4 required")
	require.Error(t, b.e.AddClient(ClientConfig{Name: "x", IP4: clientAIP, IP6: clientBIP, MAC: clientMAC, Link: link}))
	require.Error(t, b.e.AddClient(ClientConfig{Name: "x", IP4: clientAIP, MAC: clientMAC[:3], Link: link}))

	b.addClient("a", clientAIP, netip.Addr{}, "action=accept")
	require.Error(t, b.e.AddClient(ClientConfig{Name: "dup", IP4: clientAIP, MAC: clientMAC, Link: link}), "address in use")
	old := b.e.clients[clientAIP]
	b.fromClient(clientAIP, clientTCP(clientAIP, 1, header.TCPFlagSyn, 1, 0, ""))
	require.Len(t, b.toUplink(), 1)
	b.e.RemoveClient(clientAIP)
	assert.Equal(t, 0, b.e.Counters().Flows, "its flows are gone")
	b.addClient("a again", clientAIP, netip.Addr{}, "action=accept")
	b.e.removeClient(old) // e.g. a late write failure on the old link
	require.Len(t, b.e.Counters().Clients, 1)
	assert.Equal(t, "a again", b.e.Counters().Clients[0].Name)
	b.e.RemoveClient(remoteIP) // unknown: no-op
}

func TestFullTableRefusesNewFlowsUntilSomeExpire(t *testing.T) {
	cfg := testConfig()
	cfg.MaxFlows, cfg.MaxFlowsPerClient = 20, 15
	b := newBed(t, cfg)
	b.addClient("a", clientAIP, netip.Addr{}, "action=accept")
	b.addClient("b", clientBIP, netip.Addr{}, "action=accept")
	established := func(ip netip.Addr, port uint16) bool {
		b.fromClient(ip, clientTCP(ip, port, header.TCPFlagSyn, 1, 0, ""))
		out := b.toUplink()
		if len(out) == 0 {
			return false
		}
		b.fromUplink(remoteTCP(uplinkIP, decode(t, out[0]).srcPort, header.TCPFlagSyn|header.TCPFlagAck, 1, 2, ""))
		b.fromClient(ip, clientTCP(ip, port, header.TCPFlagAck, 2, 2, ""))
		b.toUplink()
		b.toClient(ip)
		return true
	}
	for port := range uint16(15) {
		require.True(t, established(clientAIP, 1000+port))
	}
	for port := range uint16(5) {
		require.True(t, established(clientBIP, 1000+port))
	}
	assert.False(t, established(clientBIP, 2000), "the table is full of live flows")
	assert.Equal(t, 20, b.e.Counters().Flows)

	// Two days later a's flows are still established (five days), but a
	// closed one of a's has expired and gives its slot to b.
	b.fromClient(clientAIP, clientTCP(clientAIP, 1000, header.TCPFlagRst, 2, 0, ""))
	require.Len(t, b.toUplink(), 1)
	b.advance(2 * 24 * time.Hour)
	assert.True(t, established(clientBIP, 2001))
	counters := b.e.Counters()
	assert.Equal(t, 14, counters.Clients[0].Flows)
	assert.Equal(t, 6, counters.Clients[1].Flows)
}

func TestPingAndUDPWithoutChecksumThroughNAT(t *testing.T) {
	b := newBed(t, testConfig())
	b.addClient("a", clientAIP, clientA6, "action=accept")
	b.fromClient(clientAIP, ipPacket{srcMAC: clientMAC, dstMAC: GatewayMAC, src: clientA6, dst: remoteIP6, proto: protoICMPv6, icmpType: uint8(header.ICMPv6EchoRequest), id: 42, payload: []byte("ping")}.frame())
	out := one(t, b.toUplink())
	assert.Equal(t, uplinkIP6, out.srcAddr)
	natID := header.ICMPv6(out.l4).Ident()
	b.fromUplink(ipPacket{srcMAC: sysnetMAC, dstMAC: uplinkMAC, src: remoteIP6, dst: uplinkIP6, proto: protoICMPv6, icmpType: uint8(header.ICMPv6EchoReply), id: natID, payload: []byte("ping")}.frame())
	in := one(t, b.toClient(clientAIP))
	assert.Equal(t, uint16(42), header.ICMPv6(in.l4).Ident())
	assert.Equal(t, clientA6, in.dstAddr)

	noChecksum := ipPacket{srcMAC: clientMAC, dstMAC: GatewayMAC, src: clientAIP, dst: remoteIP, proto: protoUDP, sport: 7000, dport: 7000, payload: []byte("x")}.frame()
	header.UDP(noChecksum[header.EthernetMinimumSize+header.IPv4MinimumSize:]).SetChecksum(0)
	b.fromClient(clientAIP, noChecksum)
	out = one(t, b.toUplink())
	assert.Zero(t, header.UDP(out.l4).Checksum(), "no checksum stays no checksum")
	assert.Equal(t, uplinkIP, out.srcAddr)
}

func TestShortQuotesAndSmallClientMTU(t *testing.T) {
	b := newBed(t, testConfig())
	engineEnd, peer := Pipe(GatewayMAC, clientMAC, 1400)
	require.NoError(t, b.e.AddClient(ClientConfig{Name: "a", IP4: clientAIP, MAC: clientMAC, Link: engineEnd}))
	b.clients[clientAIP] = &bedClient{peer: peer, w: newWorker(b.e, b.e.clients[clientAIP].port)}
	b.setRules(clientAIP, "action=accept")
	b.fromClient(clientAIP, clientTCP(clientAIP, 40000, header.TCPFlagSyn, 1, 0, ""))
	sent := one(t, b.toUplink())

	// A router quoting only the IP header and 8 bytes (RFC 792).
	b.fromUplink(ipPacket{srcMAC: sysnetMAC, dstMAC: uplinkMAC, src: addr("192.0.2.1"), dst: uplinkIP, proto: protoICMPv4,
		icmpType: uint8(header.ICMPv4DstUnreachable), icmpCode: uint8(header.ICMPv4HostUnreachable),
		rawICMP: sent.network[:header.IPv4MinimumSize+8]}.frame())
	q := quoted(t, one(t, b.toClient(clientAIP)))
	assert.Equal(t, clientAIP, addrFromTCPIP(q.src))
	assert.Equal(t, uint16(40000), q.srcPort)
	assert.True(t, q.ip4.IsChecksumValid())

	// A reply larger than the client's link with DF: "fragmentation needed"
	// goes back to the remote, from our uplink address.
	big := remoteTCP(uplinkIP, sent.srcPort, header.TCPFlagAck, 2, 2, string(make([]byte, 1420)))
	b.fromUplink(big)
	assert.Empty(t, b.toClient(clientAIP))
	d := one(t, b.toUplink())
	assert.Equal(t, uplinkIP, d.srcAddr)
	assert.Equal(t, remoteIP, d.dstAddr)
	assert.Equal(t, uint8(header.ICMPv4FragmentationNeeded), d.icmpCode)
	assert.Equal(t, uint16(1400), header.ICMPv4(d.l4).MTU())
	assert.Equal(t, big[header.EthernetMinimumSize:][:icmpv4ErrorMax-header.IPv4MinimumSize-header.ICMPv4MinimumSize], []byte(header.ICMPv4(d.l4).Payload()), "quotes the packet as received")

	// An ICMP error (from sys-net, which may be hostile) too large for the
	// client's link is not relayed.
	quote := append(append([]byte(nil), sent.network...), make([]byte, 1400-len(sent.network))...)
	b.fromUplink(ipPacket{srcMAC: sysnetMAC, dstMAC: uplinkMAC, src: addr("192.0.2.1"), dst: uplinkIP, proto: protoICMPv4,
		icmpType: uint8(header.ICMPv4DstUnreachable), icmpCode: uint8(header.ICMPv4HostUnreachable), rawICMP: quote}.frame())
	assert.Empty(t, b.toClient(clientAIP))
}

func TestICMPErrorsFromUplinkAreRelayedOnlyFromUnicastNonClientSources(t *testing.T) {
	b := newBed(t, testConfig())
	clientB6 := addr("fd09:24ef:4179::a89:b")
	b.addClient("a", clientAIP, clientA6, "action=accept")
	b.addClient("b", clientBIP, clientB6, "action=accept")
	for _, tc := range []struct {
		client, remote, nat, router netip.Addr
		errType                     uint8
		proto                       uint8
		bad                         []string
	}{
		{clientAIP, remoteIP, uplinkIP, addr("192.0.2.1"), uint8(header.ICMPv4TimeExceeded), protoICMPv4,
			[]string{clientBIP.String(), clientAIP.String(), "224.0.0.1", "255.255.255.255", "127.0.0.1", "0.0.0.0"}},
		{clientA6, remoteIP6, uplinkIP6, addr("2001:db8:ffff::1"), uint8(header.ICMPv6TimeExceeded), protoICMPv6,
			[]string{clientB6.String(), "fe80::1", "ff02::1", "::1", "::"}},
	} {
		probe := ipPacket{srcMAC: clientMAC, dstMAC: GatewayMAC, src: tc.client, dst: tc.remote, ttl: 2, proto: protoUDP, sport: 33434, dport: 33435, payload: []byte("probe")}
		b.fromClient(clientAIP, probe.frame())
		sent := one(t, b.toUplink())
		for _, src := range tc.bad {
			b.fromUplink(ipPacket{srcMAC: sysnetMAC, dstMAC: uplinkMAC, src: addr(src), dst: tc.nat, proto: tc.proto,
				icmpType: tc.errType, rawICMP: sent.network}.frame())
			assert.Empty(t, b.toClient(clientAIP), "ICMP error from %s", src)
			assert.Empty(t, b.toClient(clientBIP), "ICMP error from %s", src)
		}
		b.fromUplink(ipPacket{srcMAC: sysnetMAC, dstMAC: uplinkMAC, src: tc.router, dst: tc.nat, proto: tc.proto,
			icmpType: tc.errType, rawICMP: sent.network}.frame())
		assert.Equal(t, tc.router, one(t, b.toClient(clientAIP)).srcAddr)
	}
}

// lockProbe is a Link that notes a Write made while the engine's mutex is
// held: a link may block in Write, and it must not stall every other link.
type lockProbe struct {
	Link
	e              *Engine
	writeUnderLock atomic.Bool
}

func (l *lockProbe) Write(bufs [][]byte) (int, error) {
	if l.e.mu.TryLock() {
		l.e.mu.Unlock()
	} else {
		l.writeUnderLock.Store(true)
	}
	return l.Link.Write(bufs)
}

func TestFramesWaitingForTheGatewayAreNotWrittenUnderTheEngineLock(t *testing.T) {
	cfg := testConfig()
	cfg.UplinkIP6, cfg.UplinkGateway6, cfg.ClientGateway6 = netip.Addr{}, netip.Addr{}, netip.Addr{}
	b := &bed{t: t, clients: map[netip.Addr]*bedClient{}}
	cfg.Clock = func() time.Time { return time.Unix(0, b.now.Load()) }
	engineEnd, sysnet := Pipe(uplinkMAC, sysnetMAC, DefaultMTU)
	probe := &lockProbe{Link: engineEnd}
	e, err := New(cfg, probe)
	require.NoError(t, err)
	probe.e = e
	b.e, b.sysnet, b.uplink = e, sysnet, newWorker(e, e.uplink)
	b.addClient("a", clientAIP, netip.Addr{}, "action=accept")

	b.fromClient(clientAIP, clientTCP(clientAIP, 1000, header.TCPFlagSyn, 1, 0, ""))
	require.Len(t, b.toUplink(), 1, "the ARP request")
	b.fromUplink(arpFrame(header.ARPReply, uplinkMAC, sysnetMAC, sysnetIP, uplinkIP))
	d := one(t, b.toUplink())
	assert.Equal(t, sysnetMAC, net.HardwareAddr(d.eth.DestinationAddress()))
	assert.False(t, probe.writeUnderLock.Load(), "the waiting frame was written while holding Engine.mu")
}

func TestFlowsToAnAddressEndWhenAClientGetsIt(t *testing.T) {
	b := newBed(t, testConfig())
	clientB6 := addr("fd09:24ef:4179::a89:b")
	b.addClient("a", clientAIP, clientA6, "action=accept")
	var nat []uint16
	for _, dst := range []netip.Addr{clientBIP, clientB6, remoteIP} {
		src := clientAIP
		if dst.Is6() {
			src = clientA6
		}
		b.fromClient(clientAIP, ipPacket{srcMAC: clientMAC, dstMAC: GatewayMAC, src: src, dst: dst, proto: protoUDP, sport: 5000, dport: 53}.frame())
		nat = append(nat, one(t, b.toUplink()).srcPort)
	}
	require.Equal(t, 3, b.e.Counters().Flows)

	b.addClient("b", clientBIP, clientB6, "action=accept")
	assert.Equal(t, 1, b.e.Counters().Flows, "only the flow to the remote is left")
	b.fromUplink(
		ipPacket{srcMAC: sysnetMAC, dstMAC: uplinkMAC, src: clientBIP, dst: uplinkIP, proto: protoUDP, sport: 53, dport: nat[0]}.frame(),
		ipPacket{srcMAC: sysnetMAC, dstMAC: uplinkMAC, src: clientB6, dst: uplinkIP6, proto: protoUDP, sport: 53, dport: nat[1]}.frame(),
	)
	assert.Empty(t, b.toClient(clientAIP), "sys-net cannot answer as client b")
	b.fromUplink(ipPacket{srcMAC: sysnetMAC, dstMAC: uplinkMAC, src: remoteIP, dst: uplinkIP, proto: protoUDP, sport: 53, dport: nat[2]}.frame())
	assert.Equal(t, clientAIP, one(t, b.toClient(clientAIP)).dstAddr)
}

func TestMonotonicClockFollowsElapsedTime(t *testing.T) {
	clock := monotonicClock()
	before := time.Now()
	a := clock()
	b := clock()
	after := time.Now()
	assert.False(t, b.Before(a), "never goes back")
	assert.WithinDuration(t, before, a, after.Sub(before)+time.Millisecond)
}
