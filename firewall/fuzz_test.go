package firewall

import (
	"testing"

	"github.com/stretchr/testify/require"
	"gvisor.dev/gvisor/pkg/tcpip/header"

	"qfw/rules"
)

// fuzzBed is a fresh engine with two clients and four open flows of client
// a (TCP and UDP over IPv4, ping, TCP over IPv6), and a fragment train of
// the UDP flow in each direction (IP ID fuzzFragID). The NAT ports are the
// same every time (the test random source is fixed), so that seeds can hit
// the flows and each input runs deterministically.
func fuzzBed(tb testing.TB) (b *bed, sentByA [][]byte) {
	cfg := testConfig()
	cfg.MaxFlows, cfg.MaxFlowsPerClient = 64, 16
	b = newBed(tb, cfg)
	b.addClient("a", clientAIP, clientA6, "action=accept")
	b.addClient("b", clientBIP, addr("fd09:24ef:4179::a89:b"), "action=drop proto=tcp dstports=22-22", "action=accept")
	b.fromClient(clientAIP,
		clientTCP(clientAIP, 40000, header.TCPFlagSyn, 1, 0, ""),
		ipPacket{srcMAC: clientMAC, dstMAC: GatewayMAC, src: clientAIP, dst: dnsIP, proto: protoUDP, sport: 5000, dport: 53, payload: []byte("q")}.frame(),
		ipPacket{srcMAC: clientMAC, dstMAC: GatewayMAC, src: clientAIP, dst: remoteIP, proto: protoICMPv4, icmpType: uint8(header.ICMPv4Echo), id: 3}.frame(),
		clientTCP(clientA6, 40000, header.TCPFlagSyn, 1, 0, ""))
	sentByA = b.toUplink()
	require.Len(tb, sentByA, 4)
	query, answer := fuzzFragmented(decode(tb, sentByA[1]).srcPort)
	b.fromClient(clientAIP, query[0])
	b.fromUplink(answer[0])
	require.Len(tb, b.toUplink(), 1)
	require.Len(tb, b.toClient(clientAIP), 1)
	require.Equal(tb, 2, b.e.Counters().FragTrains)
	return b, sentByA
}

const fuzzFragID = 0x77

// fuzzFragmented are the fragments of a large query of fuzzBed's UDP flow
// and of its answer (to NAT port nat).
func fuzzFragmented(nat uint16) (query, answer [][]byte) {
	query = fragmentFrame(ipPacket{srcMAC: clientMAC, dstMAC: GatewayMAC, src: clientAIP, dst: dnsIP, proto: protoUDP, sport: 5000, dport: 53, payload: make([]byte, 1600)}.frame(), fuzzFragID, 1480)
	answer = fragmentFrame(ipPacket{srcMAC: sysnetMAC, dstMAC: uplinkMAC, src: dnsIP, dst: uplinkIP, proto: protoUDP, sport: 53, dport: nat, payload: make([]byte, 1600)}.frame(), fuzzFragID, 1480)
	return query, answer
}

// fuzzSeeds are frames of every kind the engine handles, from both sides;
// the uplink's are replies and ICMP errors for fuzzBed's flows.
func fuzzSeeds(tb testing.TB) (fromClient, fromUplink [][]byte) {
	_, sent := fuzzBed(tb)
	var nat [4]uint16
	for i, f := range sent {
		nat[i] = decode(tb, f).srcPort
	}
	query, answer := fuzzFragmented(nat[1])
	fromClient = [][]byte{
		clientTCP(clientAIP, 40000, header.TCPFlagAck, 2, 2, "data"),
		clientTCP(clientAIP, 40001, header.TCPFlagSyn, 1, 0, ""),
		clientTCP(clientA6, 40000, header.TCPFlagAck|header.TCPFlagFin, 1, 1, "x"),
		ipPacket{srcMAC: clientMAC, dstMAC: GatewayMAC, src: clientAIP, dst: remoteIP, ttl: 1, proto: protoUDP, sport: 1, dport: 2}.frame(),
		ipPacket{srcMAC: clientMAC, dstMAC: GatewayMAC, src: clientAIP, dst: remoteIP, moreFragments: true, proto: protoUDP, sport: 1, dport: 2}.frame(),
		query[0], query[1],
		fragmentFrame(clientTCP(clientAIP, 40000, header.TCPFlagAck, 2, 2, string(make([]byte, 64))), 9, 24)[0],
		ipPacket{srcMAC: clientMAC, dstMAC: GatewayMAC, src: clientAIP, dst: uplinkIP, proto: protoICMPv4, icmpType: uint8(header.ICMPv4Echo), id: 1}.frame(),
		arpFrame(header.ARPRequest, broadcast, clientMAC, clientAIP, uplinkIP),
		ndpFrame(header.ICMPv6NeighborSolicit, clientMAC, clientA6, addr("ff02::1:ffa8:6"), uplinkIP6, clientMAC),
	}
	fromUplink = [][]byte{
		remoteTCP(uplinkIP, nat[0], header.TCPFlagSyn|header.TCPFlagAck, 1, 2, ""),
		ipPacket{srcMAC: sysnetMAC, dstMAC: uplinkMAC, src: dnsIP, dst: uplinkIP, proto: protoUDP, sport: 53, dport: nat[1], payload: []byte("a")}.frame(),
		ipPacket{srcMAC: sysnetMAC, dstMAC: uplinkMAC, src: remoteIP, dst: uplinkIP, proto: protoICMPv4, icmpType: uint8(header.ICMPv4EchoReply), id: nat[2]}.frame(),
		remoteTCP(uplinkIP6, nat[3], header.TCPFlagSyn|header.TCPFlagAck, 1, 2, ""),
		ipPacket{srcMAC: sysnetMAC, dstMAC: uplinkMAC, src: remoteIP, dst: uplinkIP, proto: protoICMPv4,
			icmpType: uint8(header.ICMPv4TimeExceeded), rawICMP: sent[1][header.EthernetMinimumSize:]}.frame(),
		ipPacket{srcMAC: sysnetMAC, dstMAC: uplinkMAC, src: remoteIP, dst: uplinkIP, proto: protoICMPv4,
			icmpType: uint8(header.ICMPv4DstUnreachable), icmpCode: 4, mtu: 1400, rawICMP: sent[0][header.EthernetMinimumSize:][:28]}.frame(),
		ipPacket{srcMAC: sysnetMAC, dstMAC: uplinkMAC, src: remoteIP6, dst: uplinkIP6, proto: protoICMPv6,
			icmpType: uint8(header.ICMPv6PacketTooBig), mtu: 1280, rawICMP: sent[3][header.EthernetMinimumSize:][:48]}.frame(),
		answer[0], answer[1],
		arpFrame(header.ARPRequest, broadcast, sysnetMAC, sysnetIP, uplinkIP),
		ndpFrame(header.ICMPv6NeighborAdvert, sysnetMAC, sysnetIP6, uplinkIP6, sysnetIP6, sysnetMAC),
		ndpFrame(header.ICMPv6NeighborSolicit, sysnetMAC, sysnetIP6, addr("ff02::1:ffa8:6"), uplinkIP6, sysnetMAC),
	}
	return fromClient, fromUplink
}

// fuzzFrames feeds an arbitrary frame to fuzzBed's engine from one side, a
// few times with time passing, and checks that it neither panics nor
// outgrows its bounds (flows, fragment trains), and that every IP frame it
// sends parses, with a valid IPv4 header checksum, and every later
// fragment goes out translated: from our address towards the uplink, or
// to a client.
func fuzzFrames(f *testing.F, fromUplink bool) {
	seedsClient, seedsUplink := fuzzSeeds(f)
	seeds := seedsClient
	if fromUplink {
		seeds = seedsUplink
	}
	for _, seed := range seeds {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, frame []byte) {
		b, _ := fuzzBed(t)
		frame = frame[:min(len(frame), header.EthernetMinimumSize+DefaultMTU)]
		for range 3 {
			if fromUplink {
				b.fromUplink(frame)
			} else {
				b.fromClient(clientAIP, frame)
				b.fromClient(clientBIP, frame)
			}
			b.advance(flowTimeouts[udpUnreplied])
		}
		sent := append(b.toUplink(), b.toClient(clientAIP)...)
		sent = append(sent, b.toClient(clientBIP)...)
		for _, out := range sent {
			require.GreaterOrEqual(t, len(out), header.EthernetMinimumSize)
			if header.Ethernet(out).Type() == header.ARPProtocolNumber {
				continue
			}
			var p packet
			require.True(t, p.parse(out), "the engine sent a frame it would not accept: % x", out)
			if p.family == rules.IPv4 {
				require.True(t, p.ip4.IsChecksumValid())
			}
			if p.frag == fragLater {
				toUplink := p.src == tcpipOf(uplinkIP) && p.dst != tcpipOf(uplinkIP)
				toClient := p.dst == tcpipOf(clientAIP) || p.dst == tcpipOf(clientBIP)
				require.True(t, toUplink || toClient, "fragment from %v to %v", p.src, p.dst)
			}
		}
		counters := b.e.Counters()
		require.LessOrEqual(t, counters.Flows, b.e.cfg.MaxFlows)
		for _, c := range counters.Clients {
			require.LessOrEqual(t, c.Flows, b.e.cfg.MaxFlowsPerClient)
		}
		require.Equal(t, counters.Flows, len(b.e.flows.orig))
		require.Equal(t, counters.Flows, len(b.e.flows.reply))
		require.LessOrEqual(t, counters.FragTrains, b.e.cfg.MaxFragTrains)
		require.Equal(t, counters.FragTrains, len(b.e.frags.index))
		for _, c := range counters.Clients {
			require.LessOrEqual(t, c.FragTrains, b.e.frags.perClient)
		}
		require.LessOrEqual(t, b.e.neighbours[0].queued, neighbourQueueLen)
	})
}

func FuzzClientFrame(f *testing.F) { fuzzFrames(f, false) }

func FuzzUplinkFrame(f *testing.F) { fuzzFrames(f, true) }
