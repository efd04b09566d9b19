package firewall

import (
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"

	"qfw/rules"
)

// icmpErrorKind is an ICMP error the firewall sends.
type icmpErrorKind uint8

const (
	errAdminProhibited icmpErrorKind = iota // the Linux agent's "reject"
	errHostProhibited                       // traffic to the firewall itself
	errTimeExceeded                         // TTL or hop limit reached 1
	errTooBig                               // fragmentation needed / packet too big
)

// icmpErrorCodes maps each kind to ICMPv4 and ICMPv6 type and code. IPv6
// has no host-prohibited; the Linux agent's ip6 rules use admin-prohibited.
var icmpErrorCodes = [...]struct{ type4, code4, type6, code6 uint8 }{
	errAdminProhibited: {uint8(header.ICMPv4DstUnreachable), uint8(header.ICMPv4AdminProhibited), uint8(header.ICMPv6DstUnreachable), uint8(header.ICMPv6Prohibited)},
	errHostProhibited:  {uint8(header.ICMPv4DstUnreachable), uint8(header.ICMPv4HostProhibited), uint8(header.ICMPv6DstUnreachable), uint8(header.ICMPv6Prohibited)},
	errTimeExceeded:    {uint8(header.ICMPv4TimeExceeded), uint8(header.ICMPv4TTLExceeded), uint8(header.ICMPv6TimeExceeded), uint8(header.ICMPv6HopLimitExceeded)},
	errTooBig:          {uint8(header.ICMPv4DstUnreachable), uint8(header.ICMPv4FragmentationNeeded), uint8(header.ICMPv6PacketTooBig), 0},
}

// An ICMP error quotes as much of the offending packet as fits in 576 bytes
// (IPv4, RFC 1812 4.3.2.3) or in the IPv6 minimum MTU (RFC 4443 2.4).
const (
	icmpv4ErrorMax = 576
	icmpv6ErrorMax = header.IPv6MinimumMTU
	replyTTL       = 64 // TTL of packets the firewall originates
)

// icmpv4Informational has bit n set for each ICMPv4 type n that Linux
// classes as informational (icmp_pointers in net/ipv4/icmp.c): echo reply
// and request, timestamp, information and address mask requests and
// replies. Every other type, unknown ones included, counts as an error.
const icmpv4Informational = 1<<header.ICMPv4EchoReply | 1<<header.ICMPv4Echo |
	1<<header.ICMPv4Timestamp | 1<<header.ICMPv4TimestampReply |
	1<<header.ICMPv4InfoRequest | 1<<header.ICMPv4InfoReply | 1<<17 | 1<<18 // address mask request, reply

// isICMPErrorMessage reports whether p is an ICMP message that no ICMP
// error may be sent about (RFC 1812 4.3.2.7, RFC 4443 2.4 (e)): an ICMPv6
// error (type below 128), or any ICMPv4 type but the informational ones,
// as Linux decides it.
func (p *packet) isICMPErrorMessage() bool {
	switch p.proto {
	case protoICMPv4:
		return p.icmpType >= 32 || icmpv4Informational>>p.icmpType&1 == 0
	case protoICMPv6:
		return header.ICMPv6Type(p.icmpType).IsErrorType()
	}
	return false
}

// icmpError sends an ICMP error about p back out of port to (to p's
// sender), from address src, within the rate limit. Errors are never sent
// about ICMP error messages, broadcast or multicast (RFC 1812 4.3.2.7).
// mtu is the next-hop MTU of errTooBig.
func (w *worker) icmpError(to *port, p *packet, limit *tokenBucket, src tcpip.Address, kind icmpErrorKind, mtu uint32) {
	if src.Len() == 0 || p.isICMPErrorMessage() || p.notRoutable() || !limit.allow(w.now, replyRate, replyBurst) {
		return
	}
	buf := w.scratchFrame()
	if buf == nil {
		return
	}
	codes := icmpErrorCodes[kind]
	const ethLen = header.EthernetMinimumSize
	var n int
	if p.family == rules.IPv4 {
		const hdrLen = header.IPv4MinimumSize + header.ICMPv4MinimumSize
		quote := p.network[:min(len(p.network), icmpv4ErrorMax-hdrLen)]
		n = ethLen + hdrLen + len(quote)
		ip := header.IPv4(buf[ethLen:n])
		ip.Encode(&header.IPv4Fields{TotalLength: uint16(n - ethLen), TTL: replyTTL, Protocol: uint8(header.ICMPv4ProtocolNumber), SrcAddr: src, DstAddr: p.src})
		ip.SetChecksum(^ip.CalculateChecksum())
		icmp := header.ICMPv4(ip.Payload())
		icmp.SetType(header.ICMPv4Type(codes.type4))
		icmp.SetCode(header.ICMPv4Code(codes.code4))
		icmp.SetIdent(0) // unused; errTooBig puts the MTU in the second half
		icmp.SetMTU(uint16(mtu))
		copy(icmp.Payload(), quote)
		icmp.SetChecksum(0)
		icmp.SetChecksum(^checksum.Checksum(icmp, 0))
	} else {
		const hdrLen = header.IPv6MinimumSize + header.ICMPv6ErrorHeaderSize
		quote := p.network[:min(len(p.network), icmpv6ErrorMax-hdrLen)]
		n = ethLen + hdrLen + len(quote)
		ip := header.IPv6(buf[ethLen:n])
		ip.Encode(&header.IPv6Fields{PayloadLength: uint16(n - ethLen - header.IPv6MinimumSize), TransportProtocol: header.ICMPv6ProtocolNumber, HopLimit: replyTTL, SrcAddr: src, DstAddr: p.src})
		icmp := header.ICMPv6(ip.Payload())
		icmp.SetType(header.ICMPv6Type(codes.type6))
		icmp.SetCode(header.ICMPv6Code(codes.code6))
		icmp.SetMTU(mtu)
		copy(icmp[header.ICMPv6ErrorHeaderSize:], quote)
		icmp.SetChecksum(header.ICMPv6Checksum(header.ICMPv6ChecksumParams{Header: icmp, Src: src, Dst: p.src}))
	}
	header.Ethernet(buf).Encode(&header.EthernetFields{SrcAddr: to.mac, DstAddr: p.eth.SourceAddress(), Type: p.eth.Type()})
	w.send(to, buf[:n])
}

// echoReplyInPlace turns the echo request p, addressed to the firewall,
// into its reply, sent back from mac, and returns the frame.
func (p *packet) echoReplyInPlace(mac *[header.EthernetAddressSize]byte) []byte {
	var peer [header.EthernetAddressSize]byte
	copy(peer[:], p.frame[header.EthernetAddressSize:])
	p.setEthernet(&peer, mac)
	src, dst := p.dst, p.src
	if p.family == rules.IPv4 {
		p.ip4.SetSourceAddress(src)
		p.ip4.SetDestinationAddress(dst)
		p.ip4.SetTTL(replyTTL)
		p.ip4.SetChecksum(0)
		p.ip4.SetChecksum(^p.ip4.CalculateChecksum())
		icmp := header.ICMPv4(p.l4)
		icmp.SetType(header.ICMPv4EchoReply)
		icmp.SetChecksum(0)
		icmp.SetChecksum(^checksum.Checksum(icmp, 0))
	} else {
		p.ip6.SetSourceAddress(src)
		p.ip6.SetDestinationAddress(dst)
		p.ip6.SetHopLimit(replyTTL)
		icmp := header.ICMPv6(p.l4)
		icmp.SetType(header.ICMPv6EchoReply)
		icmp.SetChecksum(header.ICMPv6Checksum(header.ICMPv6ChecksumParams{
			Header: icmp[:header.ICMPv6MinimumSize], Src: src, Dst: dst,
			PayloadCsum: checksum.Checksum(icmp[header.ICMPv6MinimumSize:], 0), PayloadLen: len(icmp) - header.ICMPv6MinimumSize,
		}))
	}
	return p.frame
}

// arpReplyInPlace turns the ARP request in frame into the reply that says
// the requested address is at mac, and returns the frame.
func arpReplyInPlace(frame []byte, mac [header.EthernetAddressSize]byte) []byte {
	arp := header.ARP(frame[header.EthernetMinimumSize:])
	var requesterMAC [header.EthernetAddressSize]byte
	var requesterIP, targetIP [header.IPv4AddressSize]byte
	copy(requesterMAC[:], arp.HardwareAddressSender())
	copy(requesterIP[:], arp.ProtocolAddressSender())
	copy(targetIP[:], arp.ProtocolAddressTarget())
	arp.SetOp(header.ARPReply)
	copy(arp.HardwareAddressSender(), mac[:])
	copy(arp.ProtocolAddressSender(), targetIP[:])
	copy(arp.HardwareAddressTarget(), requesterMAC[:])
	copy(arp.ProtocolAddressTarget(), requesterIP[:])
	copy(frame, requesterMAC[:])
	copy(frame[header.EthernetAddressSize:], mac[:])
	return frame[:header.EthernetMinimumSize+header.ARPSize]
}

// isNeighborSolicit reports whether p is an ICMPv6 neighbour solicitation.
func (p *packet) isNeighborSolicit() bool {
	return p.proto == protoICMPv6 && header.ICMPv6Type(p.icmpType) == header.ICMPv6NeighborSolicit
}

// neighborSolicit returns p's solicitation if it is well formed (RFC 4861
// 7.1.1: hop limit 255, code 0, a unicast target).
func (p *packet) neighborSolicit() (header.NDPNeighborSolicit, bool) {
	if p.ip6.HopLimit() != header.NDPHopLimit || p.icmpCode != 0 || len(p.l4) < header.ICMPv6NeighborSolicitMinimumSize {
		return nil, false
	}
	ns := header.NDPNeighborSolicit(header.ICMPv6(p.l4).MessageBody())
	if header.IsV6MulticastAddress(ns.TargetAddress()) {
		return nil, false
	}
	return ns, true
}

// sendNeighborAdvert answers the solicitation p out of port to: target is
// at to's MAC.
func (w *worker) sendNeighborAdvert(to *port, p *packet, target tcpip.Address, router bool) {
	buf := w.scratchFrame()
	if buf == nil {
		return
	}
	const (
		ipStart  = header.EthernetMinimumSize
		icmpLen  = header.ICMPv6NeighborAdvertMinimumSize + header.NDPLinkLayerAddressSize
		frameLen = ipStart + header.IPv6MinimumSize + icmpLen
	)
	buf = buf[:frameLen]
	clear(buf)
	header.Ethernet(buf).Encode(&header.EthernetFields{SrcAddr: to.mac, DstAddr: p.eth.SourceAddress(), Type: header.IPv6ProtocolNumber})
	ip := header.IPv6(buf[ipStart:])
	ip.Encode(&header.IPv6Fields{PayloadLength: icmpLen, TransportProtocol: header.ICMPv6ProtocolNumber, HopLimit: header.NDPHopLimit, SrcAddr: target, DstAddr: p.src})
	icmp := header.ICMPv6(ip.Payload())
	icmp.SetType(header.ICMPv6NeighborAdvert)
	na := header.NDPNeighborAdvert(icmp.MessageBody())
	na.SetSolicitedFlag(true)
	na.SetOverrideFlag(true)
	na.SetRouterFlag(router)
	na.SetTargetAddress(target)
	na.Options().Serialize(header.NDPOptionsSerializer{header.NDPTargetLinkLayerAddressOption(to.mac)})
	icmp.SetChecksum(header.ICMPv6Checksum(header.ICMPv6ChecksumParams{Header: icmp, Src: target, Dst: p.src}))
	w.send(to, buf)
}

// resetFrame is a TCP RST from the remote end of f to the client, with the
// sequence number the client expects next, so that it drops the connection
// at once.
func (c *client) resetFrame(f *flow) []byte {
	k := &f.orig
	addrLen := c.addr(k.family).Len()
	return encodeReset(make([]byte, maxResetFrameSize), k.family, c.mac, c.port.macBytes, tcpip.AddrFromSlice(k.remote[:addrLen]), c.addr(k.family),
		header.TCPFields{SrcPort: k.remotePort, DstPort: k.localPort, SeqNum: f.remoteNext, Flags: header.TCPFlagRst})
}

// sendReset answers a client's TCP segment that belongs to no flow with a
// RST from its destination, so that a connection cut by a rule change or
// lost with its flow fails at once instead of retransmitting into a void.
// Such a segment always carries an ACK (parse drops the flag combinations
// without one except SYN and RST, which never get here), so the RST's
// sequence number is that ACK (RFC 9293 3.10.7.1).
func (w *worker) sendReset(c *client, p *packet) {
	if p.tcpFlags&header.TCPFlagRst != 0 || !c.replyLimit.allow(w.now, replyRate, replyBurst) {
		return
	}
	buf := w.scratchFrame()
	if buf == nil {
		return
	}
	fields := header.TCPFields{SrcPort: p.dstPort, DstPort: p.srcPort, SeqNum: header.TCP(p.l4).AckNumber(), Flags: header.TCPFlagRst}
	var peer [header.EthernetAddressSize]byte
	copy(peer[:], p.eth.SourceAddress())
	w.send(w.in, encodeReset(buf, p.family, peer, w.in.macBytes, p.dst, p.src, fields))
}

// maxResetFrameSize is the size of the largest frame encodeReset writes.
const maxResetFrameSize = header.EthernetMinimumSize + header.IPv6MinimumSize + header.TCPMinimumSize

// encodeReset writes an Ethernet frame with a bare TCP segment (a RST) at
// the start of buf, which holds at least maxResetFrameSize bytes, and
// returns the frame.
func encodeReset(buf []byte, family rules.Family, ethDst, ethSrc [header.EthernetAddressSize]byte, src, dst tcpip.Address, fields header.TCPFields) []byte {
	ethType, ipLen := header.IPv4ProtocolNumber, header.IPv4MinimumSize
	if family == rules.IPv6 {
		ethType, ipLen = header.IPv6ProtocolNumber, header.IPv6MinimumSize
	}
	frame := buf[:header.EthernetMinimumSize+ipLen+header.TCPMinimumSize]
	clear(frame)
	header.Ethernet(frame).Encode(&header.EthernetFields{SrcAddr: tcpip.LinkAddress(ethSrc[:]), DstAddr: tcpip.LinkAddress(ethDst[:]), Type: ethType})
	ipStart := header.EthernetMinimumSize
	tcpStart := len(frame) - header.TCPMinimumSize
	if family == rules.IPv4 {
		ip := header.IPv4(frame[ipStart:])
		ip.Encode(&header.IPv4Fields{TotalLength: uint16(len(frame) - ipStart), TTL: replyTTL, Protocol: protoTCP, SrcAddr: src, DstAddr: dst})
		ip.SetChecksum(^ip.CalculateChecksum())
	} else {
		header.IPv6(frame[ipStart:]).Encode(&header.IPv6Fields{PayloadLength: header.TCPMinimumSize, TransportProtocol: header.TCPProtocolNumber, HopLimit: replyTTL, SrcAddr: src, DstAddr: dst})
	}
	tcp := header.TCP(frame[tcpStart:])
	fields.DataOffset = header.TCPMinimumSize
	tcp.Encode(&fields)
	tcp.SetChecksum(^tcp.CalculateChecksum(header.PseudoHeaderChecksum(header.TCPProtocolNumber, src, dst, header.TCPMinimumSize)))
	return frame
}
