package firewall

import (
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"

	"qfw/rules"
)

// Transport protocol numbers as packet.proto and flowKey.proto hold them.
const (
	protoTCP    = uint8(header.TCPProtocolNumber)
	protoUDP    = uint8(header.UDPProtocolNumber)
	protoICMPv4 = uint8(header.ICMPv4ProtocolNumber)
	protoICMPv6 = uint8(header.ICMPv6ProtocolNumber)
)

// packet is the parsed form of one IP frame: typed views into the frame's
// own bytes, filled once by parse and reused for every frame of a link.
type packet struct {
	frame   []byte // Ethernet header + IP packet, without link padding
	eth     header.Ethernet
	family  rules.Family
	ip4     header.IPv4 // set when family is IPv4
	ip6     header.IPv6 // set when family is IPv6
	network []byte      // the IP packet
	proto   uint8       // transport protocol (IPv6: the first next header)
	l4      []byte      // transport header and payload
	src     tcpip.Address
	dst     tcpip.Address

	srcPort, dstPort uint16 // TCP and UDP ports; ICMP echo identifier in both
	icmpType         uint8
	icmpCode         uint8
	tcpFlags         header.TCPFlags

	frag fragKind // IPv4 only: whether p is a fragment, and which
}

// fragKind says whether an IPv4 packet is a fragment (see fragments.go).
type fragKind uint8

const (
	notFragment fragKind = iota
	fragFirst            // offset 0, more fragments: carries the transport header
	fragLater            // offset > 0: no transport header, p.l4 is raw payload
)

// parse fills p from an Ethernet frame carrying IPv4 or IPv6 and reports
// whether the engine can handle it. It rejects, by policy:
//   - IPv4 with a bad header checksum or inconsistent lengths, with
//     malformed options or with a source route (see ipv4OptionsAcceptable);
//   - IPv4 fragments that cannot be forwarded safely without reassembly
//     (see parseFragment); the others are parsed, a first fragment with
//     its transport header, a later one with none (p.frag says which);
//   - IPv6 whose first next header is not TCP, UDP or ICMPv6 (extension
//     headers, including the fragment header, are not forwarded);
//   - transports other than TCP, UDP and ICMP, and truncated transport
//     headers;
//   - TCP segments with a combination of flags that no TCP sends (see
//     validTCPFlags).
func (p *packet) parse(frame []byte) bool {
	if len(frame) < header.EthernetMinimumSize {
		return false
	}
	p.eth = header.Ethernet(frame)
	payload := frame[header.EthernetMinimumSize:]
	switch p.eth.Type() {
	case header.IPv4ProtocolNumber:
		ip := header.IPv4(payload)
		if !ip.IsValid(len(payload)) || !ip.IsChecksumValid() {
			return false
		}
		ip = ip[:ip.TotalLength()]
		if ip.HeaderLength() > header.IPv4MinimumSize && !ipv4OptionsAcceptable(ip.Options()) {
			return false
		}
		p.family, p.ip4, p.ip6, p.network = rules.IPv4, ip, nil, ip
		p.src, p.dst = ip.SourceAddress(), ip.DestinationAddress()
		p.proto, p.l4 = ip.Protocol(), ip.Payload()
		p.frag = notFragment
		if ip.More() || ip.FragmentOffset() != 0 {
			p.frame = frame[:header.EthernetMinimumSize+len(p.network)]
			return p.parseFragment()
		}
	case header.IPv6ProtocolNumber:
		ip := header.IPv6(payload)
		if !ip.IsValid(len(payload)) {
			return false
		}
		ip = ip[:header.IPv6MinimumSize+int(ip.PayloadLength())]
		p.family, p.ip4, p.ip6, p.network, p.frag = rules.IPv6, nil, ip, ip, notFragment
		p.src, p.dst = ip.SourceAddress(), ip.DestinationAddress()
		p.proto, p.l4 = ip.NextHeader(), ip.Payload()
	default:
		return false
	}
	p.frame = frame[:header.EthernetMinimumSize+len(p.network)]
	return p.parseTransport()
}

// IPv4 source route options (RFC 791).
const (
	ipv4OptionLSRR = 131
	ipv4OptionSSRR = 137
)

// ipv4OptionsAcceptable reports whether IPv4 options are well formed and
// carry no source route. A source-routed packet goes on from the
// destination the rules checked to hosts they never saw, so Linux drops it
// (accept_source_route=0, systemd's default sysctl; RFC 7126 4.3.3, 4.4.3)
// and so does the firewall; malformed options make Linux drop the packet
// too.
func ipv4OptionsAcceptable(opts header.IPv4Options) bool {
	for i := 0; i < len(opts); {
		switch header.IPv4OptionType(opts[i]) {
		case header.IPv4OptionListEndType:
			return true
		case header.IPv4OptionNOPType:
			i++
			continue
		case ipv4OptionLSRR, ipv4OptionSSRR:
			return false
		}
		if i+1 >= len(opts) || opts[i+1] < 2 || int(opts[i+1]) > len(opts)-i {
			return false
		}
		i += int(opts[i+1])
	}
	return true
}

// parseTransport fills the transport fields from p.l4.
func (p *packet) parseTransport() bool {
	p.srcPort, p.dstPort, p.icmpType, p.icmpCode, p.tcpFlags = 0, 0, 0, 0, 0
	switch p.proto {
	case protoTCP:
		tcp := header.TCP(p.l4)
		if len(tcp) < header.TCPMinimumSize || int(tcp.DataOffset()) < header.TCPMinimumSize || int(tcp.DataOffset()) > len(tcp) {
			return false
		}
		p.srcPort, p.dstPort, p.tcpFlags = tcp.SourcePort(), tcp.DestinationPort(), tcp.Flags()
		if !validTCPFlags(p.tcpFlags) {
			return false
		}
	case protoUDP:
		udp := header.UDP(p.l4)
		switch {
		case len(udp) < header.UDPMinimumSize:
			return false
		case p.frag == fragFirst:
			// The rest of the datagram that the UDP length measures
			// follows in later fragments.
			if int(udp.Length()) <= len(udp) {
				return false
			}
		case int(udp.Length()) != len(udp):
			return false
		}
		p.srcPort, p.dstPort = udp.SourcePort(), udp.DestinationPort()
	case protoICMPv4:
		if p.family != rules.IPv4 || len(p.l4) < header.ICMPv4MinimumSize {
			return false
		}
		icmp := header.ICMPv4(p.l4)
		p.icmpType, p.icmpCode = uint8(icmp.Type()), uint8(icmp.Code())
		if icmp.Type() == header.ICMPv4Echo || icmp.Type() == header.ICMPv4EchoReply {
			p.srcPort, p.dstPort = icmp.Ident(), icmp.Ident()
		}
	case protoICMPv6:
		if p.family != rules.IPv6 || len(p.l4) < header.ICMPv6MinimumSize {
			return false
		}
		icmp := header.ICMPv6(p.l4)
		p.icmpType, p.icmpCode = uint8(icmp.Type()), uint8(icmp.Code())
		if icmp.Type() == header.ICMPv6EchoRequest || icmp.Type() == header.ICMPv6EchoReply {
			p.srcPort, p.dstPort = icmp.Ident(), icmp.Ident()
		}
	default:
		return false
	}
	return true
}

// validTCPFlagSets has bit n set for each combination n of FIN, SYN, RST,
// ACK and URG that Linux conntrack accepts (tcp_valid_flags in
// nf_conntrack_proto_tcp.c; PSH, ECE and CWR go with any of them). Every
// other combination (SYN+FIN, SYN+RST, FIN without ACK, no flags, ...) is
// "ct state invalid", which sys-firewall's forward and input chains drop.
const validTCPFlagSets = uint64(1)<<header.TCPFlagSyn |
	1<<(header.TCPFlagSyn|header.TCPFlagUrg) |
	1<<(header.TCPFlagSyn|header.TCPFlagAck) |
	1<<header.TCPFlagRst |
	1<<(header.TCPFlagRst|header.TCPFlagAck) |
	1<<(header.TCPFlagFin|header.TCPFlagAck) |
	1<<(header.TCPFlagFin|header.TCPFlagAck|header.TCPFlagUrg) |
	1<<header.TCPFlagAck |
	1<<(header.TCPFlagAck|header.TCPFlagUrg)

// validTCPFlags reports whether a segment's flags are a combination a TCP
// sends.
func validTCPFlags(flags header.TCPFlags) bool {
	return validTCPFlagSets>>(flags&^(header.TCPFlagPsh|header.TCPFlagEce|header.TCPFlagCwr))&1 != 0
}

// isEcho reports whether p is an ICMP echo request (want request) or reply.
func (p *packet) isEcho(request bool) bool {
	switch p.proto {
	case protoICMPv4:
		return header.ICMPv4Type(p.icmpType) == header.ICMPv4Echo && request ||
			header.ICMPv4Type(p.icmpType) == header.ICMPv4EchoReply && !request
	case protoICMPv6:
		return header.ICMPv6Type(p.icmpType) == header.ICMPv6EchoRequest && request ||
			header.ICMPv6Type(p.icmpType) == header.ICMPv6EchoReply && !request
	}
	return false
}

// isICMPError reports whether p is an ICMP error the firewall relays:
// unreachable (including fragmentation needed / packet too big), time
// exceeded and parameter problem.
func (p *packet) isICMPError() bool {
	switch p.proto {
	case protoICMPv4:
		switch header.ICMPv4Type(p.icmpType) {
		case header.ICMPv4DstUnreachable, header.ICMPv4TimeExceeded, header.ICMPv4ParamProblem:
			return true
		}
	case protoICMPv6:
		return header.ICMPv6Type(p.icmpType).IsErrorType()
	}
	return false
}

// ttl is the IPv4 TTL or the IPv6 hop limit.
func (p *packet) ttl() uint8 {
	if p.family == rules.IPv4 {
		return p.ip4.TTL()
	}
	return p.ip6.HopLimit()
}

// decrementTTL lowers the TTL (hop limit) by one as a router must, updating
// the IPv4 header checksum incrementally (RFC 1624: the TTL shares a 16-bit
// word with the protocol).
func (p *packet) decrementTTL() {
	if p.family == rules.IPv6 {
		p.ip6.SetHopLimit(p.ip6.HopLimit() - 1)
		return
	}
	old := uint16(p.ip4.TTL())<<8 | uint16(p.ip4.Protocol())
	p.ip4.SetTTL(p.ip4.TTL() - 1)
	xsum := checksum.Combine(^p.ip4.Checksum(), ^old)
	p.ip4.SetChecksum(^checksum.Combine(xsum, old-1<<8))
}

// dontFragment reports whether the packet may not be fragmented on the way
// (always for IPv6).
func (p *packet) dontFragment() bool {
	return p.family == rules.IPv6 || p.ip4.Flags()&header.IPv4FlagDontFragment != 0
}

// notRoutable reports whether p's destination is one a router never
// forwards to: broadcast, multicast, loopback, unspecified (IPv4: all of
// 0.0.0.0/8, "this network", which Linux drops as martian) or IPv6
// link-local.
func (p *packet) notRoutable() bool {
	if p.family == rules.IPv4 {
		return header.IsV4MulticastAddress(p.dst) || p.dst == header.IPv4Broadcast ||
			header.IsV4LoopbackAddress(p.dst) || p.dst.As4()[0] == 0
	}
	return header.IsV6MulticastAddress(p.dst) || header.IsV6LinkLocalUnicastAddress(p.dst) ||
		header.IsV6LoopbackAddress(p.dst) || p.dst == header.IPv6Any
}

// sourceNotUnicast reports whether p's source is not one host's own
// address: broadcast, multicast, loopback, unspecified or IPv6 link-local
// (a link-local source never leaves its link).
func (p *packet) sourceNotUnicast() bool {
	if p.family == rules.IPv4 {
		return header.IsV4MulticastAddress(p.src) || p.src == header.IPv4Broadcast ||
			header.IsV4LoopbackAddress(p.src) || p.src == header.IPv4Any
	}
	return header.IsV6MulticastAddress(p.src) || header.IsV6LinkLocalUnicastAddress(p.src) ||
		header.IsV6LoopbackAddress(p.src) || p.src == header.IPv6Any
}

// natDelta is what a flow's translation towards the uplink adds to the
// checksums, as one's complement differences (RFC 1624): the address change
// (IPv4 header, TCP/UDP/ICMPv6 pseudo-header) and the port or ICMP echo
// identifier change. header's ...WithChecksumUpdate helpers fold in each
// field on every packet; a flow's translation never changes, so its delta
// is computed once, when the flow is created.
type natDelta struct{ addr, port uint16 }

func newNATDelta(fromAddr, toAddr []byte, fromPort, toPort uint16) natDelta {
	return natDelta{addr: addrDelta(fromAddr, toAddr), port: checksum.Combine(toPort, ^fromPort)}
}

// addrDelta is the checksum change of replacing the address from with to.
// A flow whose translation changes both addresses (a redirected DNS query:
// source NAT and destination NAT) adds the two into natDelta.addr, which
// the IPv4 header and the pseudo-header take alike.
func addrDelta(from, to []byte) uint16 {
	return checksum.Combine(checksum.Checksum(to, 0), ^checksum.Checksum(from, 0))
}

// reverse is the delta of the translation back to the client.
func (d natDelta) reverse() natDelta { return natDelta{addr: ^d.addr, port: ^d.port} }

// updateChecksum adds deltas to a checksum field.
func updateChecksum(field uint16, deltas ...uint16) uint16 {
	xsum := ^field
	for _, d := range deltas {
		xsum = checksum.Combine(xsum, d)
	}
	return ^xsum
}

// translate replaces the source (or the destination) address and port
// (ICMP echo: identifier) of p with addr and port, whose checksum delta
// from the current ones is d.
func (p *packet) translate(source bool, addr tcpip.Address, port uint16, d natDelta) {
	switch p.proto {
	case protoTCP:
		tcp := header.TCP(p.l4)
		if len(tcp) >= header.TCPChecksumOffset+2 { // not so in a short ICMP quote
			tcp.SetChecksum(updateChecksum(tcp.Checksum(), d.addr, d.port))
		}
		if source {
			tcp.SetSourcePort(port)
		} else {
			tcp.SetDestinationPort(port)
		}
	case protoUDP:
		udp := header.UDP(p.l4)
		if xsum := udp.Checksum(); xsum != 0 { // zero: sent without checksum (IPv4)
			if xsum = updateChecksum(xsum, d.addr, d.port); xsum == 0 {
				xsum = 0xffff // RFC 768: a computed zero is sent as all ones
			}
			udp.SetChecksum(xsum)
		}
		if source {
			udp.SetSourcePort(port)
		} else {
			udp.SetDestinationPort(port)
		}
	case protoICMPv4:
		icmp := header.ICMPv4(p.l4) // no pseudo-header
		icmp.SetChecksum(updateChecksum(icmp.Checksum(), d.port))
		icmp.SetIdent(port)
	case protoICMPv6:
		icmp := header.ICMPv6(p.l4)
		icmp.SetChecksum(updateChecksum(icmp.Checksum(), d.addr, d.port))
		icmp.SetIdent(port)
	}
	switch {
	case p.family == rules.IPv4 && source:
		p.ip4.SetChecksum(updateChecksum(p.ip4.Checksum(), d.addr))
		p.ip4.SetSourceAddress(addr)
	case p.family == rules.IPv4:
		p.ip4.SetChecksum(updateChecksum(p.ip4.Checksum(), d.addr))
		p.ip4.SetDestinationAddress(addr)
	case source:
		p.ip6.SetSourceAddress(addr)
	default:
		p.ip6.SetDestinationAddress(addr)
	}
	if source {
		p.src, p.srcPort = addr, port
	} else {
		p.dst, p.dstPort = addr, port
	}
}

// setEthernet addresses the frame from src to dst.
func (p *packet) setEthernet(dst, src *[header.EthernetAddressSize]byte) {
	copy(p.frame[0:], dst[:])
	copy(p.frame[header.EthernetAddressSize:], src[:])
}

// flowKey is p's key as seen from the client (orig, fromClient) or as
// returned by the uplink (reply).
func (p *packet) flowKey(fromClient bool) flowKey {
	k := flowKey{proto: p.proto, family: p.family}
	if fromClient {
		copy(k.local[:], p.src.AsSlice())
		copy(k.remote[:], p.dst.AsSlice())
		k.localPort, k.remotePort = p.srcPort, p.dstPort
	} else {
		copy(k.local[:], p.dst.AsSlice())
		copy(k.remote[:], p.src.AsSlice())
		k.localPort, k.remotePort = p.dstPort, p.srcPort
	}
	return k
}
