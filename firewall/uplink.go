package firewall

import (
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"

	"qfw/rules"
)

// fromUplink handles one frame from sys-net (pipeline step 5): neighbour
// discovery, pings to us, packets of known flows, later fragments of known
// trains and ICMP errors about known flows. Everything else is dropped.
func (w *worker) fromUplink(frame []byte) {
	e := w.engine
	if len(frame) >= header.EthernetMinimumSize && header.Ethernet(frame).Type() == header.ARPProtocolNumber {
		w.uplinkARP(frame)
		return
	}
	p := &w.pkt
	if !p.parse(frame) {
		e.uplinkCounters.Dropped++
		return
	}
	if p.isNeighborSolicit() || p.isNeighborAdvert() {
		w.uplinkNDP(p)
		return
	}
	if our := e.uplinkAddr(p.family); our.Len() == 0 || p.dst != our || [header.EthernetAddressSize]byte(frame) != e.uplink.macBytes {
		e.uplinkCounters.Dropped++
		return
	}
	switch {
	case p.frag == fragLater:
		w.uplinkFragment(p)
	case p.isICMPError(): // never a fragment (packet.parseFragment)
		w.uplinkICMPError(p)
	case p.isEcho(true) && p.frag != notFragment:
		e.uplinkCounters.Dropped++ // fragments are not reassembled: a fragmented ping to us goes unanswered
	case p.isEcho(true):
		// Pings to the firewall itself are answered from both sides (the
		// issue's contract; Linux's IPv4 input chain would drop them from
		// sys-net). Echo requests never belong to a client's flow.
		w.send(e.uplink, p.echoReplyInPlace(&e.uplink.macBytes))
	default:
		key := p.flowKey(false)
		f := e.flows.lookup(e.flows.reply, &key, w.now)
		if f == nil {
			e.uplinkCounters.Dropped++
			return
		}
		f.track(p, false, w.now)
		w.forwardToClient(f, p)
	}
}

// forwardToClient translates a reply of flow f back to its client and
// queues it for the client's link (the fast path of this direction).
func (w *worker) forwardToClient(f *flow, p *packet) {
	e := w.engine
	c := f.client
	if !w.routerChecks(p, c.port.mtu, &e.uplinkICMPLimit, e.uplinkAddr(p.family), &e.uplinkCounters.Dropped) {
		return
	}
	if p.frag == fragFirst && !w.startTrain(p, f, false) {
		return
	}
	f.countForwarded(p, false)
	p.decrementTTL()
	p.translate(false, c.addr(p.family), f.orig.localPort, f.delta.reverse())
	if f.dnat { // the checksums took this change in f.delta
		p.src = tcpip.AddrFrom4([4]byte(f.orig.remote[:4]))
		p.ip4.SetSourceAddress(p.src)
	}
	p.setEthernet(&c.mac, &c.port.macBytes)
	w.send(c.port, p.frame)
}

// uplinkICMPError relays an ICMP error that quotes a packet of a known flow
// to its client, with the quoted packet translated back to what the client
// sent, so that traceroute and path MTU discovery work through the NAT.
func (w *worker) uplinkICMPError(p *packet) {
	e := w.engine
	var quoted packet
	if !quoted.parseQuoted(p) {
		e.uplinkCounters.Dropped++
		return
	}
	key := quoted.flowKey(true) // the quoted packet is one we sent: our address is its source
	f := e.flows.lookup(e.flows.reply, &key, w.now)
	// A router forwards no packet from a source that is not one host's
	// (nor, in IPv6, from a link-local one), none from one of our clients'
	// addresses (Linux: "saddr @downstream drop" on the uplink) and none
	// larger than the link it goes out of.
	if f == nil || p.ttl() <= 1 || p.sourceNotUnicast() || e.clients[addrFromTCPIP(p.src)] != nil ||
		len(p.network) > f.client.port.mtu {
		e.uplinkCounters.Dropped++
		return
	}
	c := f.client
	clientAddr := c.addr(p.family)
	quoted.translate(true, clientAddr, f.orig.localPort, f.delta.reverse()) // the quote is of a packet towards the uplink
	p.decrementTTL()
	if f.dnat {
		// A redirected DNS query: the quote goes back to the client DNS
		// address it was sent to (its checksums took this change in
		// f.delta), and so does the error's source when the DNS server
		// itself sent it (the reply direction's un-DNAT); an error from
		// a router on the way keeps its own source.
		orig := tcpip.AddrFrom4([4]byte(f.orig.remote[:4]))
		quoted.ip4.SetDestinationAddress(orig)
		if p.src == tcpip.AddrFrom4([4]byte(f.reply.remote[:4])) {
			p.ip4.SetSourceAddressWithChecksumUpdate(orig)
			p.src = orig
		}
	}
	if p.family == rules.IPv4 {
		p.ip4.SetDestinationAddressWithChecksumUpdate(clientAddr)
		icmp := header.ICMPv4(p.l4)
		icmp.SetChecksum(0)
		icmp.SetChecksum(^checksum.Checksum(icmp, 0))
	} else {
		p.ip6.SetDestinationAddress(clientAddr)
		icmp := header.ICMPv6(p.l4)
		icmp.SetChecksum(header.ICMPv6Checksum(header.ICMPv6ChecksumParams{
			Header: icmp[:header.ICMPv6MinimumSize], Src: p.src, Dst: clientAddr,
			PayloadCsum: checksum.Checksum(icmp[header.ICMPv6MinimumSize:], 0), PayloadLen: len(icmp) - header.ICMPv6MinimumSize,
		}))
	}
	c.counters.RxPackets++
	c.counters.RxBytes += uint64(len(p.network))
	p.setEthernet(&c.mac, &c.port.macBytes)
	w.send(c.port, p.frame)
}

// parseQuoted fills q from the packet quoted in the ICMP error outer: an IP
// header and at least the first 8 bytes of its transport header (ports,
// or the echo identifier), possibly truncated after that.
func (q *packet) parseQuoted(outer *packet) bool {
	*q = packet{family: outer.family}
	if outer.family == rules.IPv4 {
		ip := header.IPv4(header.ICMPv4(outer.l4).Payload())
		if len(ip) < header.IPv4MinimumSize || header.IPVersion(ip) != header.IPv4Version ||
			int(ip.HeaderLength()) < header.IPv4MinimumSize || int(ip.HeaderLength()) > len(ip) || ip.FragmentOffset() != 0 {
			return false
		}
		q.ip4, q.network, q.proto, q.l4 = ip, ip, ip.Protocol(), ip[ip.HeaderLength():]
		q.src, q.dst = ip.SourceAddress(), ip.DestinationAddress()
	} else {
		ip := header.IPv6(outer.l4[header.ICMPv6ErrorHeaderSize:])
		if len(ip) < header.IPv6MinimumSize || header.IPVersion(ip) != header.IPv6Version {
			return false
		}
		q.ip6, q.network, q.proto, q.l4 = ip, ip, ip.NextHeader(), ip[header.IPv6MinimumSize:]
		q.src, q.dst = ip.SourceAddress(), ip.DestinationAddress()
	}
	if len(q.l4) < header.ICMPv4MinimumSize { // 8 bytes: ports, or type, code, checksum, id
		return false
	}
	switch q.proto {
	case protoTCP, protoUDP:
		udp := header.UDP(q.l4) // TCP's ports sit where UDP's do
		q.srcPort, q.dstPort = udp.SourcePort(), udp.DestinationPort()
		return true
	case protoICMPv4, protoICMPv6:
		q.icmpType = q.l4[0]
		if !q.isEcho(true) || (q.proto == protoICMPv4) != (q.family == rules.IPv4) {
			return false
		}
		q.srcPort = header.ICMPv4(q.l4).Ident() // at the same offset in ICMPv6
		q.dstPort = q.srcPort
		return true
	}
	return false
}

// uplinkARP learns the gateway's MAC from any ARP packet it sends and
// answers requests for our uplink address.
func (w *worker) uplinkARP(frame []byte) {
	e := w.engine
	arp := header.ARP(frame[header.EthernetMinimumSize:])
	if !arp.IsValid() {
		e.uplinkCounters.Dropped++
		return
	}
	if gw := &e.neighbours[0]; tcpip.AddrFrom4Slice(arp.ProtocolAddressSender()) == gw.ip {
		w.learnGateway(gw, arp.HardwareAddressSender())
	}
	if arp.Op() == header.ARPRequest && tcpip.AddrFrom4Slice(arp.ProtocolAddressTarget()) == e.uplinkAddr4 {
		w.send(e.uplink, arpReplyInPlace(frame, e.uplink.macBytes))
	}
}

// isNeighborAdvert reports whether p is an ICMPv6 neighbour advertisement.
func (p *packet) isNeighborAdvert() bool {
	return p.proto == protoICMPv6 && header.ICMPv6Type(p.icmpType) == header.ICMPv6NeighborAdvert
}

// uplinkNDP is uplinkARP for IPv6: learn the gateway's MAC from its
// solicitations and advertisements, answer solicitations for our address.
func (w *worker) uplinkNDP(p *packet) {
	e := w.engine
	gw := &e.neighbours[1]
	if p.isNeighborSolicit() {
		ns, ok := p.neighborSolicit()
		if !ok || e.uplinkAddr6.Len() == 0 {
			e.uplinkCounters.Dropped++
			return
		}
		if mac, ok := ndpLinkAddress(ns.Options()); ok && p.src == gw.ip {
			w.learnGateway(gw, []byte(mac))
		}
		if ns.TargetAddress() == e.uplinkAddr6 && !p.src.Unspecified() {
			w.sendNeighborAdvert(e.uplink, p, e.uplinkAddr6, false)
		}
		return
	}
	if p.ip6.HopLimit() != header.NDPHopLimit || len(p.l4) < header.ICMPv6NeighborAdvertMinimumSize {
		e.uplinkCounters.Dropped++
		return
	}
	na := header.NDPNeighborAdvert(header.ICMPv6(p.l4).MessageBody())
	if mac, ok := ndpLinkAddress(na.Options()); ok && gw.ip.Len() != 0 && na.TargetAddress() == gw.ip {
		w.learnGateway(gw, []byte(mac))
	}
}
