package firewall

import (
	"math"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
)

// IPv4 fragments are forwarded without reassembly.
//
// A first fragment (offset 0, more fragments) carries the transport
// header: it goes through the pipeline like any packet (rules for a new
// flow, conntrack, NAT with the incremental transport checksum update,
// which stays right because the checksum covers the whole datagram and NAT
// changes only an address and a port that sit in the first fragment).
// When it is forwarded, a fragment train remembers its (direction, source,
// destination, protocol, IP ID) and the flow it belongs to, for
// fragTrainTimeout (Linux's ipfrag_time). A later fragment (offset > 0)
// is forwarded only if its train is known, with its address translated as
// the flow's are (both addresses for a redirected DNS query, see
// Config.UplinkDNS; the IPv4 header checksum updated incrementally) and its
// TTL decremented; any other is dropped and counted. Fragments of a train
// that arrive before its first fragment are dropped, as are fragments
// addressed to the firewall itself (it reassembles nothing).
//
// packet.parse refuses what cannot be forwarded safely this way: fragments
// of protocols other than TCP, UDP and ICMP, fragmented ICMP messages other
// than echo requests and replies (an ICMP error's quote is translated,
// which needs the whole message), TCP first fragments shorter than a TCP
// header and TCP fragments at offset 8 (RFC 1858's tiny and overlapping
// fragment attacks on the flags), fragments that reach past 65535 bytes
// and fragments followed by more whose length is not a multiple of 8.
// ICMP errors quoting a later fragment are dropped (they quote no ports);
// those quoting a first fragment are relayed like any other. No ICMP
// error is sent about a later fragment (RFC 1812 4.3.2.7): one with TTL 1
// or larger than the outgoing link's MTU is dropped silently. The firewall
// never fragments: a first fragment or packet too big for the outgoing
// link is answered with "fragmentation needed" if it has DF set, else
// dropped.
//
// Limits: only the first fragment updates its flow's state and expiry; for
// a fragmented TCP segment from the remote, the sequence number the client
// expects next (used for the RST when new rules cut the connection) counts
// only the first fragment's payload.

// fragTrainTimeout is how long a train is remembered after its first
// fragment: Linux's net.ipv4.ipfrag_time.
const fragTrainTimeout = 30 * time.Second

// DefaultMaxFragTrains is the fragment train table's size when
// Config.MaxFragTrains is zero.
const DefaultMaxFragTrains = 1024

// fragKey identifies a train of IPv4 fragments as it arrives: from a
// client (source: the client) or from the uplink (destination: our
// address).
type fragKey struct {
	src, dst   [4]byte
	id         uint16
	proto      uint8
	fromClient bool
}

func (p *packet) fragKey(fromClient bool) fragKey {
	return fragKey{src: p.src.As4(), dst: p.dst.As4(), id: p.ip4.ID(), proto: p.proto, fromClient: fromClient}
}

// fragTrain is one entry of the fragment train table.
type fragTrain struct {
	key       fragKey
	flow      *flow  // in conntrack.flows, which never moves
	flowID    uint64 // flow.id when the train began: a reused slot does not match
	expires   int64
	owner     *client // whose share the train counts against: the flow's client
	inUse     bool
	slotLinks // in the owner's fragList, or the free list (next only)
}

// fragTable is the fixed-size fragment train table; each client holds at
// most perClient trains, and a client that needs room gives up its own
// oldest train, so that a flood of first fragments from one client (or
// from the remote end of one client's flow) displaces only that client's
// trains. All of it is guarded by Engine.mu.
type fragTable struct {
	trains    []fragTrain
	free      int32
	used      int
	perClient int
	index     map[fragKey]int32
	lastSweep int64
}

func newFragTable(capacity, perClient int) *fragTable {
	t := &fragTable{
		trains:    make([]fragTrain, capacity),
		perClient: perClient,
		index:     make(map[fragKey]int32, capacity),
		lastSweep: -fullSweepEvery,
	}
	for i := range t.trains {
		t.trains[i].next = int32(i + 1)
	}
	t.trains[capacity-1].next = -1
	return t
}

// add remembers that the train k belongs to flow f (of client f.client)
// until now+fragTrainTimeout. A train with the same key is replaced: from
// a client, the key holds the client's own address; from the uplink, only
// the remote host that sends both trains can make them collide. It reports
// false when there is no room: the table is full of other clients' live
// trains.
func (t *fragTable) add(k fragKey, f *flow, now int64) bool {
	if i, ok := t.index[k]; ok {
		t.remove(i)
	}
	c := f.client
	if c.fragList.count >= t.perClient {
		t.remove(c.fragList.head)
	}
	if t.free < 0 && now-t.lastSweep >= fullSweepEvery {
		t.lastSweep = now
		t.expire(now)
	}
	if t.free < 0 && c.fragList.head >= 0 {
		t.remove(c.fragList.head)
	}
	if t.free < 0 {
		return false
	}
	i := t.free
	tr := &t.trains[i]
	t.free = tr.next
	t.used++
	*tr = fragTrain{key: k, flow: f, flowID: f.id, expires: now + int64(fragTrainTimeout), owner: c, inUse: true}
	c.fragList.pushBack(i, t.links)
	t.index[k] = i
	return true
}

// flow returns the live flow of train k, or nil if the train is unknown,
// has expired or its flow has ended.
func (t *fragTable) flow(k fragKey, now int64) *flow {
	i, ok := t.index[k]
	if !ok {
		return nil
	}
	tr := &t.trains[i]
	if tr.expires < now || !tr.flow.inUse || tr.flow.id != tr.flowID {
		t.remove(i)
		return nil
	}
	if tr.flow.expires < now {
		return nil // conntrack removes the flow
	}
	return tr.flow
}

// remove frees train i.
func (t *fragTable) remove(i int32) {
	tr := &t.trains[i]
	tr.owner.fragList.remove(i, t.links)
	delete(t.index, tr.key)
	*tr = fragTrain{slotLinks: slotLinks{next: t.free}}
	t.free = i
	t.used--
}

// links gives train i's slotLinks.
func (t *fragTable) links(i int32) *slotLinks { return &t.trains[i].slotLinks }

// expire removes every expired train.
func (t *fragTable) expire(now int64) {
	for i := range t.trains {
		if t.trains[i].inUse && t.trains[i].expires < now {
			t.remove(int32(i))
		}
	}
}

// removeClient removes all of c's trains.
func (t *fragTable) removeClient(c *client) {
	for c.fragList.head >= 0 {
		t.remove(c.fragList.head)
	}
}

// parseFragment finishes parsing the IPv4 fragment p (its addresses,
// protocol and payload are set) and reports whether it may be forwarded
// (see the comment at the top of this file).
func (p *packet) parseFragment() bool {
	ip := p.ip4
	offset := int(ip.FragmentOffset())
	if offset+len(p.l4) > math.MaxUint16 || ip.More() && len(p.l4)%8 != 0 {
		return false
	}
	switch p.proto {
	case protoTCP, protoUDP, protoICMPv4:
	default:
		return false
	}
	if offset == 0 {
		p.frag = fragFirst
		return p.parseTransport() && (p.proto != protoICMPv4 || p.isEcho(true) || p.isEcho(false))
	}
	if p.proto == protoTCP && offset == 8 {
		return false // RFC 1858 3.2: it could overwrite the first fragment's flags
	}
	p.frag = fragLater
	p.srcPort, p.dstPort, p.icmpType, p.icmpCode, p.tcpFlags = 0, 0, 0, 0, 0
	return true
}

// clientFragment forwards a later fragment from client c (source and
// Ethernet destination already checked) if its train is known.
func (w *worker) clientFragment(c *client, p *packet) {
	e := w.engine
	if p.dst == e.clientGW4 || p.dst == e.uplinkAddr4 || p.ttl() <= 1 || len(p.network) > e.uplink.mtu {
		c.counters.Dropped++
		return
	}
	f := e.frags.flow(p.fragKey(true), w.now)
	if f == nil {
		c.counters.Dropped++
		return
	}
	f.countForwarded(p, true)
	p.decrementTTL()
	p.ip4.SetChecksum(updateChecksum(p.ip4.Checksum(), f.delta.addr))
	p.ip4.SetSourceAddress(e.uplinkAddr4)
	if f.dnat { // a redirected DNS query: f.delta.addr has this change too
		p.ip4.SetDestinationAddress(tcpip.AddrFrom4([4]byte(f.reply.remote[:4])))
	}
	w.sendToUplink(p)
}

// uplinkFragment forwards a later fragment from the uplink (addressed to
// us, checked) to the client of its train's flow.
func (w *worker) uplinkFragment(p *packet) {
	e := w.engine
	f := e.frags.flow(p.fragKey(false), w.now)
	if f == nil || p.ttl() <= 1 || len(p.network) > f.client.port.mtu {
		e.uplinkCounters.Dropped++
		return
	}
	f.countForwarded(p, false)
	c := f.client
	p.decrementTTL()
	p.ip4.SetChecksum(updateChecksum(p.ip4.Checksum(), f.delta.reverse().addr))
	p.ip4.SetDestinationAddress(c.addr4)
	if f.dnat {
		p.ip4.SetSourceAddress(tcpip.AddrFrom4([4]byte(f.orig.remote[:4])))
	}
	p.setEthernet(&c.mac, &c.port.macBytes)
	w.send(c.port, p.frame)
}

// startTrain remembers the train of the first fragment p of flow f, which
// is about to be forwarded. When the table has no room, the fragment is
// dropped (its train could not follow) and counted.
func (w *worker) startTrain(p *packet, f *flow, fromClient bool) bool {
	e := w.engine
	if e.frags.add(p.fragKey(fromClient), f, w.now) {
		return true
	}
	e.uplinkCounters.FragTableFull++
	if fromClient {
		f.client.counters.Dropped++
	} else {
		e.uplinkCounters.Dropped++
	}
	return false
}
