package firewall

import (
	"net/netip"
	"sync/atomic"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"

	"qfw/rules"
)

// The error replies one client gets (ICMP rejects, time exceeded, too big,
// TCP resets) are limited to replyRate per second with bursts of
// replyBurst, as Linux limits ICMP errors.
const (
	replyRate  = 50
	replyBurst = 50
)

// client is one attached client qube.
type client struct {
	name         string
	ip4, ip6     netip.Addr
	addr4, addr6 tcpip.Address
	mac          [header.EthernetAddressSize]byte
	port         *port
	rules4       atomic.Pointer[ruleTable]
	rules6       atomic.Pointer[ruleTable]

	// Guarded by Engine.mu.
	flowList   slotList // the client's flows in conntrack.flows
	fragList   slotList // the client's fragment trains in fragTable.trains
	counters   ClientCounters
	replyLimit tokenBucket
	removed    bool
}

func newClient(cfg ClientConfig) *client {
	return &client{
		name:     cfg.Name,
		ip4:      cfg.IP4,
		ip6:      cfg.IP6,
		addr4:    tcpipAddr(cfg.IP4),
		addr6:    tcpipAddr(cfg.IP6),
		mac:      [header.EthernetAddressSize]byte(cfg.MAC),
		flowList: emptySlotList,
		fragList: emptySlotList,
	}
}

// rules is the client's rule slot of a family.
func (c *client) rules(f rules.Family) *atomic.Pointer[ruleTable] {
	if f == rules.IPv4 {
		return &c.rules4
	}
	return &c.rules6
}

// addr is the client's address of a family (empty if it has none).
func (c *client) addr(f rules.Family) tcpip.Address {
	if f == rules.IPv4 {
		return c.addr4
	}
	return c.addr6
}

// tokenBucket limits a rate of events; the zero value starts full.
type tokenBucket struct {
	last   int64 // unix nanoseconds of the last refill
	tokens int64 // events still allowed
	primed bool
}

// allow takes one token if there is one, refilling rate per second up to
// burst.
func (b *tokenBucket) allow(now int64, rate, burst int64) bool {
	if !b.primed {
		b.primed, b.tokens, b.last = true, burst, now
	}
	if refill := (now - b.last) * rate / int64(time.Second); refill > 0 {
		b.tokens = min(burst, b.tokens+refill)
		b.last = now
	}
	if b.tokens == 0 {
		return false
	}
	b.tokens--
	return true
}

// fromClient handles one frame from client c (pipeline step 2).
func (w *worker) fromClient(c *client, frame []byte) {
	if len(frame) >= header.EthernetMinimumSize && header.Ethernet(frame).Type() == header.ARPProtocolNumber {
		w.clientARP(c, frame)
		return
	}
	p := &w.pkt
	if !p.parse(frame) {
		c.counters.Dropped++ // malformed, unsafe fragment, unsupported protocol
		return
	}
	if p.isNeighborSolicit() {
		w.clientNeighborSolicit(c, p)
		return
	}
	if p.src != c.addr(p.family) {
		c.counters.Dropped++ // spoofed, or IPv6 from a client without IPv6
		return
	}
	if [header.EthernetAddressSize]byte(frame) != w.in.macBytes {
		c.counters.Dropped++ // broadcast or multicast frame: DHCP, mDNS, ...
		return
	}
	if p.frag == fragLater {
		w.clientFragment(c, p)
		return
	}
	e := w.engine
	if p.dst == e.clientGateway(p.family) || p.dst == e.uplinkAddr(p.family) {
		w.clientToGateway(c, p)
		return
	}
	// A router checks the TTL and the MTU before its forward filter.
	if !w.routerChecks(p, e.uplink.mtu, &c.replyLimit, e.clientGateway(p.family), &c.counters.Dropped) {
		return
	}
	key := p.flowKey(true)
	f := e.flows.lookup(e.flows.orig, &key, w.now)
	if f != nil && f.orig.proto == protoTCP && f.state >= tcpTimeWait && p.tcpFlags&(header.TCPFlagSyn|header.TCPFlagAck) == header.TCPFlagSyn {
		e.flows.remove(e.flows.orig[key]) // a new connection on a closed flow's ports
		f = nil
	}
	if f == nil {
		if f = w.newFlow(c, p, &key); f == nil {
			return
		}
	} else {
		f.track(p, true, w.now)
	}
	w.forwardToUplink(f, p)
}

// routerChecks reports whether p may be forwarded out of a link of the
// given MTU, as a router decides it: with TTL 1 it is answered with "time
// exceeded"; too big for the link, it is answered with "fragmentation
// needed" if it has DF set and counted in dropped. The errors go back out
// of w.in, from src, within limit.
func (w *worker) routerChecks(p *packet, mtu int, limit *tokenBucket, src tcpip.Address, dropped *uint64) bool {
	if p.ttl() <= 1 {
		w.icmpError(w.in, p, limit, src, errTimeExceeded, 0)
		return false
	}
	if len(p.network) > mtu {
		if p.dontFragment() {
			w.icmpError(w.in, p, limit, src, errTooBig, uint32(mtu))
		}
		*dropped++
		return false
	}
	return true
}

// clientARP answers a client's ARP request for any address but its own with
// the gateway MAC (as Linux proxy_arp and mirage do). The reply is built in
// place.
func (w *worker) clientARP(c *client, frame []byte) {
	arp := header.ARP(frame[header.EthernetMinimumSize:])
	if !arp.IsValid() || arp.Op() != header.ARPRequest ||
		tcpip.AddrFrom4Slice(arp.ProtocolAddressSender()) != c.addr4 ||
		tcpip.AddrFrom4Slice(arp.ProtocolAddressTarget()) == c.addr4 {
		c.counters.Dropped++
		return
	}
	w.send(w.in, arpReplyInPlace(frame, w.in.macBytes))
}

// clientNeighborSolicit answers a client's neighbour solicitation for any
// address but its own with the gateway MAC.
func (w *worker) clientNeighborSolicit(c *client, p *packet) {
	ns, ok := p.neighborSolicit()
	if !ok || c.addr6.Len() == 0 || ns.TargetAddress() == c.addr6 ||
		!(p.src == c.addr6 || header.IsV6LinkLocalUnicastAddress(p.src)) {
		c.counters.Dropped++
		return
	}
	w.sendNeighborAdvert(w.in, p, ns.TargetAddress(), ns.TargetAddress() == w.engine.clientGW6)
}

// dhcpClientPort: IPv4 UDP to this port of the gateway is dropped
// silently; everything else a client sends the gateway but ICMP is
// rejected (qubes-ipv4.nft's input chain: "iifgroup 2 udp dport 68 drop",
// then "iifgroup 2 reject with icmp host-prohibited"; qubes-ipv6.nft has no
// such exception).
const dhcpClientPort = 68

// clientToGateway handles packets addressed to the firewall itself: pings
// are answered, other ICMP and IPv4 UDP to port 68 are ignored and anything
// else is rejected with host-prohibited (IPv6: admin-prohibited), as the
// Linux input chains do for vifs.
func (w *worker) clientToGateway(c *client, p *packet) {
	switch {
	case p.isEcho(true) && p.frag == notFragment: // fragments are not reassembled: a fragmented ping goes unanswered
		w.send(w.in, p.echoReplyInPlace(&w.in.macBytes))
	case p.proto == protoICMPv4 || p.proto == protoICMPv6,
		p.family == rules.IPv4 && p.proto == protoUDP && p.dstPort == dhcpClientPort:
		c.counters.Dropped++
	default:
		w.icmpError(w.in, p, &c.replyLimit, p.dst, errHostProhibited, 0)
	}
}

// newFlow decides a packet without a flow (pipeline step 4) and returns the
// new flow, or nil when the packet was rejected or dropped.
func (w *worker) newFlow(c *client, p *packet, key *flowKey) *flow {
	e := w.engine
	if p.notRoutable() {
		c.counters.Dropped++
		return nil
	}
	if (p.proto == protoICMPv4 || p.proto == protoICMPv6) && !p.isEcho(true) {
		c.counters.Dropped++ // only echo requests start ICMP flows
		return nil
	}
	remote := e.redirectDNS(p, key)
	if e.clients[keyAddr(key.remote, key.family)] != nil || remote != key.remote && e.clients[keyAddr(remote, key.family)] != nil {
		c.counters.Dropped++ // client to client: never forwarded (Linux: oifgroup 2 drop)
		return nil
	}
	verdict, count := c.rules(p.family).Load().check(p.ruleFlow(keyAddr(remote, key.family)))
	natAddr := e.uplinkAddr(p.family)
	rejected := verdict.Action != rules.Accept || natAddr.Len() == 0
	if rejected {
		c.counters.Rejected++
		if count != nil {
			count.rejected++
		}
	}
	midConnection := p.proto == protoTCP && p.tcpFlags&(header.TCPFlagSyn|header.TCPFlagAck|header.TCPFlagRst) != header.TCPFlagSyn
	switch {
	case midConnection:
		// Its flow was cut or has expired: without the NAT binding the
		// connection cannot resume, so reset it.
		if !rejected {
			c.counters.Dropped++
		}
		w.sendReset(c, p)
		return nil
	case rejected:
		w.icmpError(w.in, p, &c.replyLimit, e.clientGateway(p.family), errAdminProhibited, 0)
		return nil
	}
	state := udpUnreplied
	switch p.proto {
	case protoTCP:
		state = tcpSynSent
	case protoICMPv4, protoICMPv6:
		state = icmpEcho
	}
	var nat [16]byte
	copy(nat[:], natAddr.AsSlice())
	f := e.flows.create(c, key, nat, remote, state, w.now)
	if f == nil {
		e.uplinkCounters.FlowTableFull++
		c.counters.Dropped++
		return nil
	}
	c.counters.Accepted++
	count.accepted++
	f.rule = count
	return f
}

// dnsPort is where qubes-setup-dnat-to-ns redirects queries (UDP and TCP).
const dnsPort = 53

// redirectDNS is the destination a new flow with key (of packet p) goes to:
// for IPv4 UDP and TCP to port 53 of a client DNS address that
// Config.UplinkDNS redirects, the uplink DNS server; else key.remote.
func (e *Engine) redirectDNS(p *packet, key *flowKey) [16]byte {
	if p.family == rules.IPv4 && (p.proto == protoUDP || p.proto == protoTCP) && p.dstPort == dnsPort {
		for i := range e.dnsRedirects {
			if r := &e.dnsRedirects[i]; r.from == key.remote {
				return r.to
			}
		}
	}
	return key.remote
}

// ruleFlow is the packet as the client's rules see it, going to dst: its
// destination after the DNS redirection, as Linux's forward hook sees it
// after the prerouting DNAT.
func (p *packet) ruleFlow(dst netip.Addr) rules.Flow {
	return rules.Flow{
		Proto:    p.proto,
		Src:      addrFromTCPIP(p.src),
		Dst:      dst,
		SrcPort:  p.srcPort,
		DstPort:  p.dstPort,
		ICMPType: p.icmpType,
	}
}

func addrFromTCPIP(a tcpip.Address) netip.Addr {
	ip, _ := netip.AddrFromSlice(a.AsSlice())
	return ip
}

// forwardToUplink translates a client's packet of flow f and queues it for
// the uplink (pipeline step 3, the fast path). A first fragment starts its
// train.
func (w *worker) forwardToUplink(f *flow, p *packet) {
	e := w.engine
	if p.frag == fragFirst && !w.startTrain(p, f, true) {
		return
	}
	f.countForwarded(p, true)
	p.decrementTTL()
	p.translate(true, e.uplinkAddr(p.family), f.reply.localPort, f.delta)
	if f.dnat { // the checksums took this change in f.delta
		p.dst = tcpip.AddrFrom4([4]byte(f.reply.remote[:4]))
		p.ip4.SetDestinationAddress(p.dst)
	}
	w.sendToUplink(p)
}

// countForwarded counts the forwarded packet p of flow f for its client
// (towards the uplink: Tx, else Rx) and for the rule that accepted f.
func (f *flow) countForwarded(p *packet, toUplink bool) {
	n := uint64(len(p.network))
	if toUplink {
		f.client.counters.TxPackets++
		f.client.counters.TxBytes += n
	} else {
		f.client.counters.RxPackets++
		f.client.counters.RxBytes += n
	}
	f.rule.bytes += n
}

// sendToUplink addresses the translated packet p to the uplink gateway and
// queues it, or holds it until the gateway's MAC is known.
func (w *worker) sendToUplink(p *packet) {
	e := w.engine
	nb := e.gatewayNeighbour(p.family)
	p.setEthernet(&nb.mac, &e.uplink.macBytes)
	if !nb.resolved {
		if nb.queued == 0 {
			// The first frame to wait asks right away rather than at
			// the next housekeeping tick.
			w.send(e.uplink, e.resolveRequest(p.family, nb.ip))
		}
		nb.enqueue(p.frame) // learnGateway fills in the destination
		return
	}
	w.send(e.uplink, p.frame)
}
