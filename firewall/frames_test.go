package firewall

import (
	"net"
	"net/netip"
	"testing"

	"github.com/stretchr/testify/require"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"

	"qfw/rules"
)

// Frame builders for tests, written with gvisor's header encoders.

var (
	clientMAC  = net.HardwareAddr{0x00, 0x16, 0x3e, 0x5e, 0x6c, 0x00}
	uplinkMAC  = net.HardwareAddr{0x00, 0x16, 0x3e, 0x5e, 0x6c, 0x07}
	sysnetMAC  = net.HardwareAddr{0xfe, 0xff, 0xff, 0xff, 0xff, 0xff} // sys-net's vif
	broadcast  = net.HardwareAddr{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}
	allNodesV6 = net.HardwareAddr{0x33, 0x33, 0, 0, 0, 1}
)

// ipPacket describes one IP packet in an Ethernet frame.
type ipPacket struct {
	srcMAC, dstMAC net.HardwareAddr
	src, dst       netip.Addr
	ttl            uint8 // 0 means 64
	df             bool
	fragOffset     uint16 // in 8-byte units
	moreFragments  bool
	proto          uint8
	sport, dport   uint16 // TCP, UDP
	flags          header.TCPFlags
	seq, ack       uint32
	icmpType       uint8
	icmpCode       uint8
	id             uint16 // ICMP echo identifier
	rawICMP        []byte // ICMP message after the 8-byte header (errors: the quote)
	mtu            uint32 // ICMP too big
	payload        []byte
}

func addr(s string) netip.Addr { return netip.MustParseAddr(s) }

func tcpipOf(a netip.Addr) tcpip.Address { return tcpip.AddrFromSlice(a.AsSlice()) }

// frame encodes the packet with correct checksums.
func (s ipPacket) frame() []byte {
	var l4 []byte
	src, dst := tcpipOf(s.src), tcpipOf(s.dst)
	switch s.proto {
	case protoTCP:
		l4 = make([]byte, header.TCPMinimumSize+len(s.payload))
		tcp := header.TCP(l4)
		tcp.Encode(&header.TCPFields{SrcPort: s.sport, DstPort: s.dport, SeqNum: s.seq, AckNum: s.ack, DataOffset: header.TCPMinimumSize, Flags: s.flags, WindowSize: 65535})
		copy(l4[header.TCPMinimumSize:], s.payload)
		tcp.SetChecksum(^tcp.CalculateChecksum(checksum.Checksum(s.payload, header.PseudoHeaderChecksum(header.TCPProtocolNumber, src, dst, uint16(len(l4))))))
	case protoUDP:
		l4 = make([]byte, header.UDPMinimumSize+len(s.payload))
		udp := header.UDP(l4)
		udp.Encode(&header.UDPFields{SrcPort: s.sport, DstPort: s.dport, Length: uint16(len(l4))})
		copy(l4[header.UDPMinimumSize:], s.payload)
		udp.SetChecksum(^udp.CalculateChecksum(checksum.Checksum(s.payload, header.PseudoHeaderChecksum(header.UDPProtocolNumber, src, dst, uint16(len(l4))))))
	case protoICMPv4, protoICMPv6:
		body := s.rawICMP
		if body == nil {
			body = s.payload
		}
		l4 = make([]byte, 8+len(body))
		l4[0], l4[1] = s.icmpType, s.icmpCode
		copy(l4[8:], body)
		if s.proto == protoICMPv4 {
			icmp := header.ICMPv4(l4)
			if s.rawICMP == nil {
				icmp.SetIdent(s.id)
				icmp.SetSequence(1)
			}
			if s.mtu != 0 {
				icmp.SetMTU(uint16(s.mtu))
			}
			icmp.SetChecksum(^checksum.Checksum(l4, 0))
		} else {
			icmp := header.ICMPv6(l4)
			if s.rawICMP == nil {
				icmp.SetIdent(s.id)
				icmp.SetSequence(1)
			}
			if s.mtu != 0 {
				icmp.SetMTU(s.mtu)
			}
			icmp.SetChecksum(header.ICMPv6Checksum(header.ICMPv6ChecksumParams{Header: icmp, Src: src, Dst: dst}))
		}
	default:
		l4 = s.payload
	}
	ttl := s.ttl
	if ttl == 0 {
		ttl = 64
	}
	var frame []byte
	if s.src.Is4() {
		frame = make([]byte, header.EthernetMinimumSize+header.IPv4MinimumSize+len(l4))
		ip := header.IPv4(frame[header.EthernetMinimumSize:])
		var flags uint8
		if s.df {
			flags |= header.IPv4FlagDontFragment
		}
		if s.moreFragments {
			flags |= header.IPv4FlagMoreFragments
		}
		ip.Encode(&header.IPv4Fields{TotalLength: uint16(len(frame) - header.EthernetMinimumSize), ID: 7, Flags: flags, FragmentOffset: s.fragOffset * 8, TTL: ttl, Protocol: s.proto, SrcAddr: src, DstAddr: dst})
		ip.SetChecksum(^ip.CalculateChecksum())
		copy(ip.Payload(), l4)
	} else {
		frame = make([]byte, header.EthernetMinimumSize+header.IPv6MinimumSize+len(l4))
		ip := header.IPv6(frame[header.EthernetMinimumSize:])
		ip.Encode(&header.IPv6Fields{PayloadLength: uint16(len(l4)), TransportProtocol: tcpip.TransportProtocolNumber(s.proto), HopLimit: ttl, SrcAddr: src, DstAddr: dst})
		copy(ip.Payload(), l4)
	}
	ethType := header.IPv4ProtocolNumber
	if s.src.Is6() {
		ethType = header.IPv6ProtocolNumber
	}
	header.Ethernet(frame).Encode(&header.EthernetFields{SrcAddr: tcpip.LinkAddress(s.srcMAC), DstAddr: tcpip.LinkAddress(s.dstMAC), Type: ethType})
	return frame
}

// arpFrame is an ARP packet from senderMAC/senderIP about targetIP.
func arpFrame(op header.ARPOp, ethDst, senderMAC net.HardwareAddr, senderIP, targetIP netip.Addr) []byte {
	frame := make([]byte, 60) // padded to Ethernet's minimum like a real NIC
	header.Ethernet(frame).Encode(&header.EthernetFields{SrcAddr: tcpip.LinkAddress(senderMAC), DstAddr: tcpip.LinkAddress(ethDst), Type: header.ARPProtocolNumber})
	arp := header.ARP(frame[header.EthernetMinimumSize:])
	arp.SetIPv4OverEthernet()
	arp.SetOp(op)
	copy(arp.HardwareAddressSender(), senderMAC)
	copy(arp.ProtocolAddressSender(), senderIP.AsSlice())
	copy(arp.ProtocolAddressTarget(), targetIP.AsSlice())
	return frame
}

// ndpFrame is a neighbour solicitation (NS) or advertisement for target
// with a link-layer address option carrying optMAC.
func ndpFrame(typ header.ICMPv6Type, srcMAC net.HardwareAddr, src, dst, target netip.Addr, optMAC net.HardwareAddr) []byte {
	body := make([]byte, header.NDPNSMinimumSize+header.NDPLinkLayerAddressSize)
	var opt header.NDPOption = header.NDPSourceLinkLayerAddressOption(optMAC)
	if typ == header.ICMPv6NeighborAdvert {
		opt = header.NDPTargetLinkLayerAddressOption(optMAC)
		header.NDPNeighborAdvert(body).SetTargetAddress(tcpipOf(target))
		header.NDPNeighborAdvert(body).SetSolicitedFlag(true)
	} else {
		header.NDPNeighborSolicit(body).SetTargetAddress(tcpipOf(target))
	}
	header.NDPOptions(body[header.NDPNSMinimumSize:]).Serialize(header.NDPOptionsSerializer{opt})
	ethDst := tcpip.LinkAddress(allNodesV6)
	if dst.IsMulticast() {
		ethDst = header.EthernetAddressFromMulticastIPv6Address(tcpipOf(dst))
	}
	// The ICMPv6 header's 4 type-specific bytes are the start of body.
	spec := ipPacket{srcMAC: srcMAC, dstMAC: net.HardwareAddr(ethDst), src: src, dst: dst, ttl: header.NDPHopLimit, proto: protoICMPv6, icmpType: uint8(typ), rawICMP: body[4:]}
	frame := spec.frame()
	icmp := header.ICMPv6(frame[header.EthernetMinimumSize+header.IPv6MinimumSize:])
	copy(icmp[4:8], body[:4])
	icmp.SetChecksum(header.ICMPv6Checksum(header.ICMPv6ChecksumParams{Header: icmp, Src: tcpipOf(src), Dst: tcpipOf(dst)}))
	return frame
}

// decoded is a frame the engine sent, parsed and with every checksum checked
// from scratch.
type decoded struct {
	packet
	srcAddr, dstAddr netip.Addr
}

func decode(t testing.TB, frame []byte) decoded {
	t.Helper()
	var d decoded
	require.True(t, d.parse(frame), "frame does not parse: % x", frame)
	d.srcAddr, d.dstAddr = addrFromTCPIP(d.src), addrFromTCPIP(d.dst)
	if d.family == rules.IPv4 {
		require.True(t, d.ip4.IsChecksumValid(), "IPv4 header checksum")
	}
	var pseudo uint16
	proto := tcpip.TransportProtocolNumber(d.proto)
	if d.proto != protoICMPv4 {
		pseudo = header.PseudoHeaderChecksum(proto, d.src, d.dst, uint16(len(d.l4)))
	}
	if d.proto == protoUDP && header.UDP(d.l4).Checksum() == 0 {
		return d
	}
	require.Equal(t, uint16(0xffff), checksum.Checksum(d.l4, pseudo), "%v checksum", proto)
	return d
}

// quoted parses the packet quoted in an ICMP error frame.
func quoted(t testing.TB, d decoded) packet {
	t.Helper()
	var q packet
	require.True(t, q.parseQuoted(&d.packet), "quoted packet")
	return q
}
