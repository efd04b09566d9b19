package firewall

import (
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// fragmentFrame splits the IPv4 packet in frame into fragments with IP ID
// id and at most chunk bytes (a multiple of 8) of payload each, as a
// sender's kernel would.
func fragmentFrame(frame []byte, id uint16, chunk int) [][]byte {
	const eth = header.EthernetMinimumSize
	ip := header.IPv4(frame[eth:])
	hl := int(ip.HeaderLength())
	payload := ip.Payload()
	var out [][]byte
	for off := 0; off < len(payload); off += chunk {
		end := min(off+chunk, len(payload))
		f := make([]byte, eth+hl+end-off)
		copy(f, frame[:eth+hl])
		copy(f[eth+hl:], payload[off:end])
		fip := header.IPv4(f[eth:])
		flags := ip.Flags() &^ header.IPv4FlagMoreFragments
		if end < len(payload) {
			flags |= header.IPv4FlagMoreFragments
		}
		fip.SetFlagsFragmentOffset(flags, uint16(off))
		fip.SetID(id)
		fip.SetTotalLength(uint16(hl + end - off))
		fip.SetChecksum(0)
		fip.SetChecksum(^fip.CalculateChecksum())
		out = append(out, f)
	}
	return out
}

// reassemble checks the fragments the engine sent (each with a valid
// header checksum, one train, contiguous, the last without MF), joins them
// and decodes the datagram, checking its transport checksum from scratch.
func reassemble(t *testing.T, frames [][]byte) decoded {
	t.Helper()
	require.NotEmpty(t, frames)
	const eth = header.EthernetMinimumSize
	frames = slices.Clone(frames)
	slices.SortFunc(frames, func(a, b []byte) int {
		return int(header.IPv4(a[eth:]).FragmentOffset()) - int(header.IPv4(b[eth:]).FragmentOffset())
	})
	first := header.IPv4(frames[0][eth:])
	hl := int(first.HeaderLength())
	out := slices.Clone(frames[0][:eth+hl])
	for i, f := range frames {
		ip := header.IPv4(f[eth:])
		require.True(t, ip.IsChecksumValid(), "fragment %d: IPv4 header checksum", i)
		require.Equal(t, first.ID(), ip.ID(), "fragment %d: IP ID", i)
		require.Equal(t, first.SourceAddress(), ip.SourceAddress(), "fragment %d: source", i)
		require.Equal(t, first.DestinationAddress(), ip.DestinationAddress(), "fragment %d: destination", i)
		require.Equal(t, first.TTL(), ip.TTL(), "fragment %d: TTL", i)
		require.Equal(t, len(out)-eth-hl, int(ip.FragmentOffset()), "fragment %d: offset", i)
		require.Equal(t, i < len(frames)-1, ip.More(), "fragment %d: more fragments", i)
		out = append(out, ip.Payload()...)
	}
	ip := header.IPv4(out[eth:])
	ip.SetFlagsFragmentOffset(0, 0)
	ip.SetTotalLength(uint16(len(out) - eth))
	ip.SetChecksum(0)
	ip.SetChecksum(^ip.CalculateChecksum())
	return decode(t, out)
}

func bigPayload(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7 + 3)
	}
	return b
}

// clientUDP is a UDP datagram from client a to the remote's port 9999.
func clientUDP(sport uint16, payload []byte) ipPacket {
	return ipPacket{srcMAC: clientMAC, dstMAC: GatewayMAC, src: clientAIP, dst: remoteIP, proto: protoUDP, sport: sport, dport: 9999, payload: payload}
}

// remoteUDP is a UDP datagram from the remote's port 9999 to our NAT port.
func remoteUDP(natPort uint16, payload []byte) ipPacket {
	return ipPacket{srcMAC: sysnetMAC, dstMAC: uplinkMAC, src: remoteIP, dst: uplinkIP, proto: protoUDP, sport: 9999, dport: natPort, payload: payload}
}

func TestFragmentedUDPAndPingAreNATedBothWays(t *testing.T) {
	b := newBed(t, testConfig())
	b.addClient("a", clientAIP, netip.Addr{}, "action=accept")

	// UDP: 3000 bytes, fragmented at MTU 1500 by the client's kernel.
	query := bigPayload(3000)
	b.fromClient(clientAIP, fragmentFrame(clientUDP(5000, query).frame(), 0x1234, 1480)...)
	sent := b.toUplink()
	require.Len(t, sent, 3)
	d := reassemble(t, sent)
	assert.Equal(t, uplinkIP, d.srcAddr)
	assert.Equal(t, remoteIP, d.dstAddr)
	assert.Equal(t, uint8(63), d.ip4.TTL())
	assert.Equal(t, uint16(9999), d.dstPort)
	assert.Equal(t, query, []byte(d.l4[header.UDPMinimumSize:]))
	nat := d.srcPort
	assert.Equal(t, 1, b.e.Counters().FragTrains)

	answer := bigPayload(4000)[1000:] // not the query's bytes
	b.fromUplink(fragmentFrame(remoteUDP(nat, answer).frame(), 0x9876, 1480)...)
	got := b.toClient(clientAIP)
	require.Len(t, got, 3)
	d = reassemble(t, got)
	assert.Equal(t, remoteIP, d.srcAddr)
	assert.Equal(t, clientAIP, d.dstAddr)
	assert.Equal(t, uint16(5000), d.dstPort)
	assert.Equal(t, answer, []byte(d.l4[header.UDPMinimumSize:]))

	// Ping with 2000 bytes of data (ping -s 2000).
	echo := ipPacket{srcMAC: clientMAC, dstMAC: GatewayMAC, src: clientAIP, dst: remoteIP, proto: protoICMPv4, icmpType: uint8(header.ICMPv4Echo), id: 77, payload: bigPayload(2000)}
	b.fromClient(clientAIP, fragmentFrame(echo.frame(), 0x4321, 1480)...)
	sent = b.toUplink()
	require.Len(t, sent, 2)
	d = reassemble(t, sent)
	assert.Equal(t, uplinkIP, d.srcAddr)
	assert.True(t, d.isEcho(true))
	assert.Equal(t, echo.payload, []byte(header.ICMPv4(d.l4).Payload()))
	natID := d.srcPort

	reply := ipPacket{srcMAC: sysnetMAC, dstMAC: uplinkMAC, src: remoteIP, dst: uplinkIP, proto: protoICMPv4, icmpType: uint8(header.ICMPv4EchoReply), id: natID, payload: echo.payload}
	b.fromUplink(fragmentFrame(reply.frame(), 0x4321, 1480)...) // the same IP ID as the request's: another train
	got = b.toClient(clientAIP)
	require.Len(t, got, 2)
	d = reassemble(t, got)
	assert.Equal(t, clientAIP, d.dstAddr)
	assert.True(t, d.isEcho(false))
	assert.Equal(t, uint16(77), d.srcPort)
	assert.Equal(t, echo.payload, []byte(header.ICMPv4(d.l4).Payload()))

	c := b.e.Counters().Clients[0]
	assert.Equal(t, uint64(5), c.TxPackets)
	assert.Equal(t, uint64(5), c.RxPackets)
	assert.Zero(t, c.Dropped)
	assert.Zero(t, b.e.Counters().Uplink.Dropped)
	assert.Equal(t, 4, b.e.Counters().FragTrains)
}

func TestFragmentsWithoutAKnownTrainAreDropped(t *testing.T) {
	b := newBed(t, testConfig())
	b.addClient("a", clientAIP, netip.Addr{}, "action=accept")
	frags := fragmentFrame(clientUDP(5000, bigPayload(3000)).frame(), 1, 1480)

	b.fromClient(clientAIP, frags[1], frags[2]) // the first fragment never came
	assert.Empty(t, b.toUplink())
	assert.Equal(t, uint64(2), b.e.Counters().Clients[0].Dropped)

	b.fromClient(clientAIP, frags[0])
	nat := reassembleFirst(t, b.toUplink())
	other := fragmentFrame(clientUDP(5000, bigPayload(3000)).frame(), 2, 1480) // another IP ID
	b.fromClient(clientAIP, other[1])
	assert.Empty(t, b.toUplink())

	// From the uplink: a later fragment for our address, of no train.
	reply := fragmentFrame(remoteUDP(nat, bigPayload(3000)).frame(), 5, 1480)
	b.fromUplink(reply[1], reply[2])
	assert.Empty(t, b.toClient(clientAIP))
	assert.Equal(t, uint64(2), b.e.Counters().Uplink.Dropped)

	// Fragmented pings to the firewall itself are not reassembled, hence
	// not answered, from either side.
	toGW := ipPacket{srcMAC: clientMAC, dstMAC: GatewayMAC, src: clientAIP, dst: uplinkIP, proto: protoICMPv4, icmpType: uint8(header.ICMPv4Echo), id: 1, payload: bigPayload(2000)}
	b.fromClient(clientAIP, fragmentFrame(toGW.frame(), 3, 1480)...)
	assert.Empty(t, b.toClient(clientAIP))
	fromNet := ipPacket{srcMAC: sysnetMAC, dstMAC: uplinkMAC, src: remoteIP, dst: uplinkIP, proto: protoICMPv4, icmpType: uint8(header.ICMPv4Echo), id: 1, payload: bigPayload(2000)}
	b.fromUplink(fragmentFrame(fromNet.frame(), 3, 1480)...)
	assert.Empty(t, b.toUplink())

	// A fragmented ICMP error is dropped, even about a known flow.
	sentFrame := clientUDP(5001, []byte("q")).frame()
	b.fromClient(clientAIP, sentFrame)
	quote := b.toUplink()[0][header.EthernetMinimumSize:]
	icmpErr := ipPacket{srcMAC: sysnetMAC, dstMAC: uplinkMAC, src: remoteIP, dst: uplinkIP, proto: protoICMPv4,
		icmpType: uint8(header.ICMPv4DstUnreachable), icmpCode: 3, rawICMP: append(slices.Clone(quote), bigPayload(40)...)}
	b.fromUplink(fragmentFrame(icmpErr.frame(), 9, 48)...)
	assert.Empty(t, b.toClient(clientAIP))
	b.fromUplink(icmpErr.frame())
	one(t, b.toClient(clientAIP)) // whole, it is relayed
}

// reassembleFirst returns the NAT port of the one first fragment sent.
func reassembleFirst(t *testing.T, sent [][]byte) uint16 {
	t.Helper()
	require.Len(t, sent, 1)
	var p packet
	require.True(t, p.parse(sent[0]))
	require.Equal(t, fragFirst, p.frag)
	return p.srcPort
}

func TestFragmentsOfARejectedFlowAreNotForwarded(t *testing.T) {
	b := newBed(t, testConfig())
	b.addClient("a", clientAIP, netip.Addr{}, "action=accept proto=tcp")
	frags := fragmentFrame(clientUDP(5000, bigPayload(3000)).frame(), 1, 1480)
	b.fromClient(clientAIP, frags...)
	assert.Empty(t, b.toUplink())
	reject := one(t, b.toClient(clientAIP)) // about the first fragment only
	assert.Equal(t, header.ICMPv4DstUnreachable, header.ICMPv4(reject.l4).Type())
	c := b.e.Counters().Clients[0]
	assert.Equal(t, uint64(1), c.Rejected)
	assert.Equal(t, uint64(2), c.Dropped)
	assert.Zero(t, b.e.Counters().FragTrains)
}

func TestFragmentTrainsEndWithTheirFlow(t *testing.T) {
	b := newBed(t, testConfig())
	b.addClient("a", clientAIP, netip.Addr{}, "action=accept")
	frags := fragmentFrame(clientUDP(5000, bigPayload(3000)).frame(), 1, 1480)
	b.fromClient(clientAIP, frags[0])
	require.Len(t, b.toUplink(), 1)
	b.setRules(clientAIP, "action=accept proto=tcp") // cuts the UDP flow
	b.fromClient(clientAIP, frags[1])
	assert.Empty(t, b.toUplink())
	assert.Zero(t, b.e.Counters().FragTrains)
}

func TestFragmentTrainTableIsBoundedPerClient(t *testing.T) {
	cfg := testConfig()
	cfg.MaxFlows, cfg.MaxFlowsPerClient, cfg.MaxFragTrains = 100, 50, 8 // a share of 4 trains
	b := newBed(t, cfg)
	b.addClient("a", clientAIP, netip.Addr{}, "action=accept")
	b.addClient("b", clientBIP, netip.Addr{}, "action=accept")

	fromB := ipPacket{srcMAC: clientMAC, dstMAC: GatewayMAC, src: clientBIP, dst: remoteIP, proto: protoUDP, sport: 6000, dport: 9999, payload: bigPayload(3000)}
	var bTrains [][][]byte
	for id := range uint16(4) {
		frags := fragmentFrame(fromB.frame(), 100+id, 1480)
		b.fromClient(clientBIP, frags[0])
		bTrains = append(bTrains, frags)
	}
	require.Len(t, b.toUplink(), 4)

	// Client a floods first fragments with distinct IP IDs.
	for id := range uint16(1000) {
		b.fromClient(clientAIP, fragmentFrame(clientUDP(5000, bigPayload(3000)).frame(), id, 1480)[0])
		counters := b.e.Counters()
		require.LessOrEqual(t, counters.FragTrains, cfg.MaxFragTrains)
		require.LessOrEqual(t, counters.Clients[0].FragTrains, 4)
	}
	assert.Len(t, b.toUplink(), 1000, "a's own oldest trains make room")
	assert.Zero(t, b.e.Counters().Uplink.FragTableFull)

	// b's trains survived; of a's, the newest do.
	for _, frags := range bTrains {
		b.fromClient(clientBIP, frags[1:]...)
	}
	assert.Len(t, b.toUplink(), 8)
	last := fragmentFrame(clientUDP(5000, bigPayload(3000)).frame(), 999, 1480)
	oldest := fragmentFrame(clientUDP(5000, bigPayload(3000)).frame(), 0, 1480)
	b.fromClient(clientAIP, last[1], oldest[1])
	assert.Len(t, b.toUplink(), 1)

	// Removing a client frees its trains.
	b.e.RemoveClient(clientAIP)
	assert.Equal(t, 4, b.e.Counters().FragTrains)
}

func TestFragmentTrainsExpireAfter30Seconds(t *testing.T) {
	b := newBed(t, testConfig())
	b.addClient("a", clientAIP, netip.Addr{}, "action=accept")
	b.fromClient(clientAIP, clientUDP(5000, []byte("q")).frame())
	nat := decode(t, one(t, b.toUplink()).frame).srcPort
	b.fromUplink(remoteUDP(nat, []byte("a")).frame()) // replied: the flow lives 120 s
	one(t, b.toClient(clientAIP))

	frags := fragmentFrame(clientUDP(5000, bigPayload(5000)).frame(), 1, 1480)
	require.Len(t, frags, 4)
	b.fromClient(clientAIP, frags[0])
	b.advance(fragTrainTimeout - time.Second)
	b.fromClient(clientAIP, frags[1])
	assert.Len(t, b.toUplink(), 2)
	b.advance(2 * time.Second)
	b.fromClient(clientAIP, frags[2])
	assert.Empty(t, b.toUplink(), "the train has expired")
	assert.Zero(t, b.e.Counters().FragTrains)

	// Housekeeping expires trains nobody asks for.
	b.fromClient(clientAIP, fragmentFrame(clientUDP(5000, bigPayload(3000)).frame(), 2, 1480)[0])
	assert.Equal(t, 1, b.e.Counters().FragTrains)
	b.advance(fragTrainTimeout + time.Second)
	b.e.housekeeping()
	assert.Zero(t, b.e.Counters().FragTrains)
}

func TestTinyAndOverlappingTCPFragmentsAreDropped(t *testing.T) {
	b := newBed(t, testConfig())
	b.addClient("a", clientAIP, netip.Addr{}, "action=accept")
	b.fromClient(clientAIP, clientTCP(clientAIP, 40000, header.TCPFlagSyn, 1, 0, ""))
	require.Len(t, b.toUplink(), 1)
	segment := clientTCP(clientAIP, 40000, header.TCPFlagAck, 2, 1, string(bigPayload(64)))

	// RFC 1858: a first fragment without the whole TCP header...
	tiny := fragmentFrame(segment, 1, 16)
	b.fromClient(clientAIP, tiny[0])
	assert.Empty(t, b.toUplink())
	// ... and a fragment at offset 8, which could rewrite the flags.
	frags := fragmentFrame(segment, 2, 24)
	b.fromClient(clientAIP, frags[0])
	sent := b.toUplink()
	require.Len(t, sent, 1)
	overlap := fragmentFrame(segment, 2, 8)[1]
	require.Equal(t, uint16(8), header.IPv4(overlap[header.EthernetMinimumSize:]).FragmentOffset())
	b.fromClient(clientAIP, overlap)
	assert.Empty(t, b.toUplink())
	// The honest rest of the train goes through.
	b.fromClient(clientAIP, frags[1:]...)
	sent = append(sent, b.toUplink()...)
	require.Len(t, sent, len(frags))
	d := reassemble(t, sent)
	assert.Equal(t, uplinkIP, d.srcAddr)
	assert.Equal(t, uint16(443), d.dstPort)
	assert.Equal(t, uint64(2), b.e.Counters().Clients[0].Dropped)
}
