package firewall

import (
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"

	"qfw/rules"
)

// neighbourQueueLen frames per family wait for the uplink gateway's MAC;
// more are dropped until it is known.
const neighbourQueueLen = 8

// neighbour is the uplink gateway (sys-net) of one family: its address, its
// MAC once ARP or neighbour discovery told us, and the frames waiting for
// it. Guarded by Engine.mu.
type neighbour struct {
	ip       tcpip.Address // empty when the family has no uplink
	mac      [header.EthernetAddressSize]byte
	resolved bool
	queue    [][]byte // neighbourQueueLen preallocated frame buffers
	queued   int
}

func newNeighbour(ip tcpip.Address, frameSize int) neighbour {
	n := neighbour{ip: ip, queue: make([][]byte, neighbourQueueLen)}
	for i := range n.queue {
		n.queue[i] = make([]byte, 0, frameSize)
	}
	return n
}

// enqueue keeps a copy of frame until the gateway's MAC is known.
func (n *neighbour) enqueue(frame []byte) {
	if n.queued == len(n.queue) || len(frame) > cap(n.queue[n.queued]) {
		return
	}
	n.queue[n.queued] = append(n.queue[n.queued][:0], frame...)
	n.queued++
}

// gatewayNeighbour is the uplink gateway of a family.
func (e *Engine) gatewayNeighbour(f rules.Family) *neighbour {
	if f == rules.IPv4 {
		return &e.neighbours[0]
	}
	return &e.neighbours[1]
}

// uplinkAddr is our uplink address of a family (empty if none).
func (e *Engine) uplinkAddr(f rules.Family) tcpip.Address {
	if f == rules.IPv4 {
		return e.uplinkAddr4
	}
	return e.uplinkAddr6
}

// clientGateway is the address clients use as their gateway (empty if the
// family has none).
func (e *Engine) clientGateway(f rules.Family) tcpip.Address {
	if f == rules.IPv4 {
		return e.clientGW4
	}
	return e.clientGW6
}

// learnGateway records the gateway's MAC and queues what waited for it,
// to be written with the rest of w's batch once the engine's mutex is
// released. Caller holds e.mu. Nothing refills the queue buffers once the
// gateway is resolved (it never becomes unresolved again), so they may wait
// in w's batch until it is flushed.
func (w *worker) learnGateway(n *neighbour, mac []byte) {
	if !header.IsValidUnicastEthernetAddress(tcpip.LinkAddress(mac)) {
		return
	}
	n.mac, n.resolved = [header.EthernetAddressSize]byte(mac), true
	for _, f := range n.queue[:n.queued] {
		copy(f, n.mac[:])
		w.send(w.engine.uplink, f)
	}
	n.queued = 0
}

// resolveGateways asks for the MAC of every uplink gateway not yet known:
// ARP for IPv4, a neighbour solicitation for IPv6.
func (e *Engine) resolveGateways() {
	var frames [][]byte
	e.mu.Lock()
	for i, family := range [...]rules.Family{rules.IPv4, rules.IPv6} {
		if n := &e.neighbours[i]; n.ip.Len() != 0 && !n.resolved {
			frames = append(frames, e.resolveRequest(family, n.ip))
		}
	}
	e.mu.Unlock()
	if len(frames) == 0 {
		return
	}
	e.uplink.writeMu.Lock()
	_, err := e.uplink.link.Write(frames)
	e.uplink.writeMu.Unlock()
	if err != nil {
		e.log.Warn("asking for the uplink gateway's MAC failed", "err", err)
	}
}

// resolveRequest asks for target's MAC: ARP for IPv4, a neighbour
// solicitation for IPv6.
func (e *Engine) resolveRequest(family rules.Family, target tcpip.Address) []byte {
	if family == rules.IPv4 {
		return e.arpRequest(target)
	}
	return e.neighborSolicit(target)
}

// arpRequest asks who has target, from our uplink address.
func (e *Engine) arpRequest(target tcpip.Address) []byte {
	frame := make([]byte, header.EthernetMinimumSize+header.ARPSize)
	header.Ethernet(frame).Encode(&header.EthernetFields{SrcAddr: e.uplink.mac, DstAddr: header.EthernetBroadcastAddress, Type: header.ARPProtocolNumber})
	arp := header.ARP(frame[header.EthernetMinimumSize:])
	arp.SetIPv4OverEthernet()
	arp.SetOp(header.ARPRequest)
	copy(arp.HardwareAddressSender(), e.uplink.macBytes[:])
	copy(arp.ProtocolAddressSender(), e.uplinkAddr4.AsSlice())
	copy(arp.ProtocolAddressTarget(), target.AsSlice())
	return frame
}

// neighborSolicit asks for target's MAC, from our uplink IPv6 address.
func (e *Engine) neighborSolicit(target tcpip.Address) []byte {
	const (
		ipStart = header.EthernetMinimumSize
		icmpLen = header.ICMPv6NeighborSolicitMinimumSize + header.NDPLinkLayerAddressSize
	)
	frame := make([]byte, ipStart+header.IPv6MinimumSize+icmpLen)
	group := header.SolicitedNodeAddr(target)
	header.Ethernet(frame).Encode(&header.EthernetFields{SrcAddr: e.uplink.mac, DstAddr: header.EthernetAddressFromMulticastIPv6Address(group), Type: header.IPv6ProtocolNumber})
	ip := header.IPv6(frame[ipStart:])
	ip.Encode(&header.IPv6Fields{PayloadLength: icmpLen, TransportProtocol: header.ICMPv6ProtocolNumber, HopLimit: header.NDPHopLimit, SrcAddr: e.uplinkAddr6, DstAddr: group})
	icmp := header.ICMPv6(ip.Payload())
	icmp.SetType(header.ICMPv6NeighborSolicit)
	ns := header.NDPNeighborSolicit(icmp.MessageBody())
	ns.SetTargetAddress(target)
	ns.Options().Serialize(header.NDPOptionsSerializer{header.NDPSourceLinkLayerAddressOption(e.uplink.mac)})
	icmp.SetChecksum(header.ICMPv6Checksum(header.ICMPv6ChecksumParams{Header: icmp, Src: e.uplinkAddr6, Dst: group}))
	return frame
}

// ndpLinkAddress finds the source (NS) or target (NA) link-layer address
// option.
func ndpLinkAddress(opts header.NDPOptions) (tcpip.LinkAddress, bool) {
	it, err := opts.Iter(true)
	if err != nil {
		return "", false
	}
	for range len(opts) / header.NDPLinkLayerAddressSize { // every option takes at least 8 bytes
		opt, done, err := it.Next()
		if done || err != nil {
			return "", false
		}
		switch o := opt.(type) {
		case header.NDPSourceLinkLayerAddressOption:
			return o.EthernetAddress(), true
		case header.NDPTargetLinkLayerAddressOption:
			return o.EthernetAddress(), true
		}
	}
	return "", false
}
