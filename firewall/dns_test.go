package firewall

import (
	"net/netip"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"

	"qfw/rules"
)

// The DNS redirection of qubes-setup-dnat-to-ns (Config.UplinkDNS).

var (
	dns2IP     = addr("10.139.1.2")
	upstreamNS = addr("192.0.2.53")
	upstreamN2 = addr("192.0.2.54")
)

func dnsConfig(uplinkDNS ...netip.Addr) Config {
	cfg := testConfig()
	cfg.UplinkDNS = uplinkDNS
	return cfg
}

// dnsQuery is a query from client a to dst port 53 (UDP, or a TCP SYN).
func dnsQuery(proto uint8, dst netip.Addr, sport uint16) ipPacket {
	q := ipPacket{srcMAC: clientMAC, dstMAC: GatewayMAC, src: clientAIP, dst: dst, proto: proto, sport: sport, dport: 53, payload: []byte("query")}
	if proto == protoTCP {
		q.flags, q.seq, q.payload = header.TCPFlagSyn, 100, nil
	}
	return q
}

// dnsAnswer is the server's answer from src port 53 to our NAT port (UDP,
// or the SYN-ACK).
func dnsAnswer(proto uint8, src netip.Addr, natPort uint16) ipPacket {
	a := ipPacket{srcMAC: sysnetMAC, dstMAC: uplinkMAC, src: src, dst: uplinkIP, proto: proto, sport: 53, dport: natPort, payload: []byte("answer")}
	if proto == protoTCP {
		a.flags, a.seq, a.ack, a.payload = header.TCPFlagSyn|header.TCPFlagAck, 5000, 101, nil
	}
	return a
}

func TestDNSToClientDNSIsRedirectedToUplinkDNS(t *testing.T) {
	for _, tc := range []struct {
		name  string
		proto uint8
	}{{"UDP", protoUDP}, {"TCP", protoTCP}} {
		t.Run(tc.name, func(t *testing.T) {
			b := newBed(t, dnsConfig(upstreamNS))
			b.addClient("a", clientAIP, netip.Addr{}, "action=accept specialtarget=dns")
			for i, q := range []netip.Addr{dnsIP, dns2IP} { // .2 goes to U[1 % 1]
				sport := uint16(5353 + i)
				b.fromClient(clientAIP, dnsQuery(tc.proto, q, sport).frame())
				out := one(t, b.toUplink()) // checksums checked from scratch
				assert.Equal(t, upstreamNS, out.dstAddr, "query to %v", q)
				assert.Equal(t, uint16(53), out.dstPort)
				assert.Equal(t, uplinkIP, out.srcAddr, "source NAT as for any flow")
				assert.GreaterOrEqual(t, out.srcPort, uint16(natPortMin))
				assert.Equal(t, uint8(63), out.ttl())

				b.fromUplink(dnsAnswer(tc.proto, upstreamNS, out.srcPort).frame())
				in := one(t, b.toClient(clientAIP))
				assert.Equal(t, q, in.srcAddr, "the answer comes from the address the client asked")
				assert.Equal(t, uint16(53), in.srcPort)
				assert.Equal(t, clientAIP, in.dstAddr)
				assert.Equal(t, sport, in.dstPort)
				if tc.proto == protoUDP {
					assert.Equal(t, "answer", string(header.UDP(in.l4).Payload()))
				} else {
					assert.Equal(t, header.TCPFlagSyn|header.TCPFlagAck, in.tcpFlags)
					// The handshake's end and a query in the established flow.
					seg := dnsQuery(tc.proto, q, sport)
					seg.flags, seg.seq, seg.ack, seg.payload = header.TCPFlagAck|header.TCPFlagPsh, 101, 5001, []byte("\x00\x05query")
					b.fromClient(clientAIP, seg.frame())
					data := one(t, b.toUplink())
					assert.Equal(t, upstreamNS, data.dstAddr)
					assert.Equal(t, out.srcPort, data.srcPort)
					assert.Equal(t, "\x00\x05query", string(header.TCP(data.l4).Payload()))
				}
			}
			// The answer from the client DNS address itself belongs to no flow.
			b.fromUplink(dnsAnswer(tc.proto, dnsIP, natPortMin).frame())
			assert.Empty(t, b.toClient(clientAIP))
		})
	}
}

func TestDNSRedirectionPairsClientDNSWithUplinkDNSInTurn(t *testing.T) {
	b := newBed(t, dnsConfig(upstreamNS, upstreamN2))
	b.addClient("a", clientAIP, netip.Addr{}, "action=accept specialtarget=dns")
	for i, tc := range []struct{ q, u netip.Addr }{{dnsIP, upstreamNS}, {dns2IP, upstreamN2}} {
		b.fromClient(clientAIP, dnsQuery(protoUDP, tc.q, uint16(6000+i)).frame())
		assert.Equal(t, tc.u, one(t, b.toUplink()).dstAddr, "query to %v", tc.q)
	}
}

func TestDNSRedirectionIsTheIdentityWhenUplinkDNSAgrees(t *testing.T) {
	for _, tc := range []struct {
		name   string
		uplink []netip.Addr
		want   [2]netip.Addr // where queries to .1 and .2 go
	}{
		{"U empty", nil, [2]netip.Addr{dnsIP, dns2IP}},
		{"U == Q", []netip.Addr{dnsIP, dns2IP}, [2]netip.Addr{dnsIP, dns2IP}},
		{"U IPv6 only", []netip.Addr{addr("2001:db8::53")}, [2]netip.Addr{dnsIP, dns2IP}},
		// qubes-setup-dnat-to-ns cycles U: .2 goes to U[1 % 1] = .1.
		{"U = [.1]", []netip.Addr{dnsIP}, [2]netip.Addr{dnsIP, dnsIP}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := newBed(t, dnsConfig(tc.uplink...))
			b.addClient("a", clientAIP, netip.Addr{}, "action=accept specialtarget=dns")
			for i, q := range []netip.Addr{dnsIP, dns2IP} {
				b.fromClient(clientAIP, dnsQuery(protoUDP, q, uint16(7000+i)).frame())
				out := one(t, b.toUplink())
				assert.Equal(t, tc.want[i], out.dstAddr, "query to %v", q)
				b.fromUplink(dnsAnswer(protoUDP, tc.want[i], out.srcPort).frame())
				assert.Equal(t, q, one(t, b.toClient(clientAIP)).srcAddr)
			}
		})
	}
}

func TestOnlyDNSPortAndProtocolsAreRedirected(t *testing.T) {
	b := newBed(t, dnsConfig(upstreamNS))
	b.addClient("a", clientAIP, netip.Addr{}, "action=accept")
	other := dnsQuery(protoUDP, dnsIP, 5000)
	other.dport = 5353
	b.fromClient(clientAIP, other.frame())
	assert.Equal(t, dnsIP, one(t, b.toUplink()).dstAddr, "UDP to another port")
	ping := ipPacket{srcMAC: clientMAC, dstMAC: GatewayMAC, src: clientAIP, dst: dnsIP, proto: protoICMPv4, icmpType: uint8(header.ICMPv4Echo), id: 9}
	b.fromClient(clientAIP, ping.frame())
	assert.Equal(t, dnsIP, one(t, b.toUplink()).dstAddr, "ping")
}

func TestSpecialTargetDNSMatchesClientAndUplinkDNS(t *testing.T) {
	cfg := dnsConfig(upstreamNS)
	assert.Equal(t, []netip.Addr{dnsIP, dns2IP, upstreamNS}, cfg.RuleOptions(rules.IPv4, nil).DNSServers)
	b := newBed(t, cfg)
	b.addClient("a", clientAIP, netip.Addr{}, "action=accept specialtarget=dns")

	// Straight to U: accepted, and not translated.
	b.fromClient(clientAIP, dnsQuery(protoUDP, upstreamNS, 5000).frame())
	out := one(t, b.toUplink())
	assert.Equal(t, upstreamNS, out.dstAddr)
	b.fromUplink(dnsAnswer(protoUDP, upstreamNS, out.srcPort).frame())
	assert.Equal(t, upstreamNS, one(t, b.toClient(clientAIP)).srcAddr)

	// Another server's port 53 is not specialtarget=dns.
	b.fromClient(clientAIP, dnsQuery(protoUDP, remoteIP, 5001).frame())
	assert.Empty(t, b.toUplink())
	assert.Equal(t, uint8(header.ICMPv4DstUnreachable), one(t, b.toClient(clientAIP)).icmpType)
}

func TestRulesSeeTheRedirectedDestination(t *testing.T) {
	// Linux filters in the forward hook, after the prerouting DNAT: a
	// rule naming U accepts a query to Q, and one naming Q does not.
	b := newBed(t, dnsConfig(upstreamNS))
	b.addClient("a", clientAIP, netip.Addr{}, "action=accept dst4=192.0.2.53/32")
	b.fromClient(clientAIP, dnsQuery(protoUDP, dnsIP, 5000).frame())
	assert.Equal(t, upstreamNS, one(t, b.toUplink()).dstAddr)

	// A reload re-checks the flow the same way: it stays.
	b.setRules(clientAIP, "action=accept dst4=192.0.2.53/32")
	assert.Equal(t, 1, b.e.Counters().Flows)
	b.setRules(clientAIP, "action=accept dst4=10.139.1.1/32")
	assert.Equal(t, 0, b.e.Counters().Flows, "cut: the flow goes to 192.0.2.53")
	b.fromClient(clientAIP, dnsQuery(protoUDP, dnsIP, 5001).frame())
	assert.Empty(t, b.toUplink())
	assert.Equal(t, uint8(header.ICMPv4AdminProhibited), one(t, b.toClient(clientAIP)).icmpCode)
}

// checkQuotedQuery checks that the ICMP error d quotes client a's UDP query
// from sport to q port 53, with valid checksums.
func checkQuotedQuery(t *testing.T, d decoded, q netip.Addr, sport uint16) {
	t.Helper()
	quote := quoted(t, d)
	assert.Equal(t, clientAIP, addrFromTCPIP(quote.src))
	assert.Equal(t, q, addrFromTCPIP(quote.dst), "the quote is of the packet the client sent")
	assert.Equal(t, sport, quote.srcPort)
	assert.Equal(t, uint16(53), quote.dstPort)
	assert.True(t, quote.ip4.IsChecksumValid(), "quoted IPv4 header checksum")
	udp := header.UDP(quote.l4)
	xsum := header.PseudoHeaderChecksum(header.UDPProtocolNumber, quote.src, quote.dst, udp.Length())
	assert.Equal(t, uint16(0xffff), udp.CalculateChecksum(checksum.Checksum(udp.Payload(), xsum)), "quoted UDP checksum")
}

func TestICMPErrorsAboutARedirectedQueryQuoteTheClientsPacket(t *testing.T) {
	b := newBed(t, dnsConfig(upstreamNS))
	b.addClient("a", clientAIP, netip.Addr{}, "action=accept specialtarget=dns")
	query := dnsQuery(protoUDP, dnsIP, 5353)
	query.ttl = 5
	b.fromClient(clientAIP, query.frame())
	sent := one(t, b.toUplink())
	require.Equal(t, upstreamNS, sent.dstAddr)

	// Port unreachable from the DNS server itself: from Q, as Linux's NAT.
	unreach := ipPacket{srcMAC: sysnetMAC, dstMAC: uplinkMAC, src: upstreamNS, dst: uplinkIP, proto: protoICMPv4,
		icmpType: uint8(header.ICMPv4DstUnreachable), icmpCode: uint8(header.ICMPv4PortUnreachable), rawICMP: sent.network}
	b.fromUplink(unreach.frame())
	d := one(t, b.toClient(clientAIP)) // outer checksums checked from scratch
	assert.Equal(t, dnsIP, d.srcAddr, "the error comes from the address the client asked")
	assert.Equal(t, clientAIP, d.dstAddr)
	assert.Equal(t, uint8(header.ICMPv4DstUnreachable), d.icmpType)
	assert.Equal(t, uint8(header.ICMPv4PortUnreachable), d.icmpCode)
	checkQuotedQuery(t, d, dnsIP, 5353)

	// Time exceeded from a router on the way: its own source stays.
	router := addr("198.51.100.1")
	expired := unreach
	expired.src, expired.icmpType, expired.icmpCode = router, uint8(header.ICMPv4TimeExceeded), 0
	b.fromUplink(expired.frame())
	d = one(t, b.toClient(clientAIP))
	assert.Equal(t, router, d.srcAddr)
	checkQuotedQuery(t, d, dnsIP, 5353)

	// A short quote (IP header and 8 bytes) is translated too.
	expired.rawICMP = sent.network[:header.IPv4MinimumSize+header.UDPMinimumSize]
	b.fromUplink(expired.frame())
	d = one(t, b.toClient(clientAIP))
	quote := quoted(t, d)
	assert.Equal(t, dnsIP, addrFromTCPIP(quote.dst))
	assert.True(t, quote.ip4.IsChecksumValid())
}

func TestFragmentedRedirectedQueryAndAnswer(t *testing.T) {
	b := newBed(t, dnsConfig(upstreamNS))
	b.addClient("a", clientAIP, netip.Addr{}, "action=accept specialtarget=dns")
	query := dnsQuery(protoUDP, dnsIP, 5353)
	query.payload = bigPayload(3000)
	b.fromClient(clientAIP, fragmentFrame(query.frame(), 0x1234, 1480)...)
	sent := b.toUplink()
	require.Len(t, sent, 3)
	d := reassemble(t, sent) // every fragment to the same destination, checksums valid
	assert.Equal(t, upstreamNS, d.dstAddr)
	assert.Equal(t, uplinkIP, d.srcAddr)
	assert.Equal(t, query.payload, []byte(d.l4[header.UDPMinimumSize:]))

	answer := dnsAnswer(protoUDP, upstreamNS, d.srcPort)
	answer.payload = bigPayload(4000)[500:]
	b.fromUplink(fragmentFrame(answer.frame(), 0x9876, 1480)...)
	got := b.toClient(clientAIP)
	require.Len(t, got, 3)
	d = reassemble(t, got)
	assert.Equal(t, dnsIP, d.srcAddr)
	assert.Equal(t, clientAIP, d.dstAddr)
	assert.Equal(t, uint16(5353), d.dstPort)
	assert.Equal(t, answer.payload, []byte(d.l4[header.UDPMinimumSize:]))
}

func TestDNSRedirectsPairClientAndUplinkServers(t *testing.T) {
	cfg := Config{UplinkDNS: []netip.Addr{upstreamNS}}
	// Q defaults to Qubes' addresses, for the redirection and the rules.
	assert.Equal(t, []netip.Addr{dnsIP, dns2IP, upstreamNS}, cfg.RuleOptions(rules.IPv4, nil).DNSServers)
	assert.Equal(t, []dnsRedirect{{from: [16]byte{10, 139, 1, 1}, to: [16]byte{192, 0, 2, 53}}, {from: [16]byte{10, 139, 1, 2}, to: [16]byte{192, 0, 2, 53}}},
		cfg.dnsRedirects())
}
