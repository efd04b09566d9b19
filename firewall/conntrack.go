package firewall

import (
	"math/rand/v2"
	"net/netip"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"

	"qfw/rules"
)

// Flow timeouts are Linux's nf_conntrack defaults. An established TCP flow
// lives five days without traffic, as in Linux; the table stays bounded by
// Config.MaxFlows and each client's share, and a full share first gives up
// its expired and not yet answered flows (see makeRoom).
var flowTimeouts = [...]time.Duration{
	udpUnreplied:   30 * time.Second,
	udpReplied:     120 * time.Second,
	icmpEcho:       30 * time.Second,
	tcpSynSent:     120 * time.Second,
	tcpSynRecv:     60 * time.Second,
	tcpEstablished: 432000 * time.Second,
	tcpFinWait:     120 * time.Second,
	tcpTimeWait:    120 * time.Second,
	tcpClose:       10 * time.Second,
}

// flowState is where a flow is in its life. TCP states only move forward
// (a new SYN from the client on a closed flow starts a new flow).
type flowState uint8

const (
	udpUnreplied flowState = iota
	udpReplied
	icmpEcho
	tcpSynSent
	tcpSynRecv
	tcpEstablished
	tcpFinWait  // one side sent FIN
	tcpTimeWait // both sides sent FIN
	tcpClose    // RST seen
)

// Bounds on the work one packet can cause in the table.
const (
	natPortTries   = 32   // random NAT port picks before giving up
	natPortMin     = 1024 // NAT ports and ICMP ids are drawn from [natPortMin, 65535]
	reclaimScan    = 64   // flows of a client looked at to make room for a new one
	fullSweepEvery = int64(time.Second)
)

// flowKey identifies one direction of a flow. It is packed and free of
// pointers so that it hashes fast as a map key (as Tailscale's
// flowtrack.Tuple). IPv4 addresses use the first four bytes.
type flowKey struct {
	remote     [16]byte // the Internet side
	local      [16]byte // the client (orig) or our uplink address (reply)
	remotePort uint16
	localPort  uint16 // client port, or the NAT port; ICMP echo id
	proto      uint8
	family     rules.Family
}

// flow is one conntrack entry: a client's connection and its NAT binding.
type flow struct {
	orig, reply flowKey // orig as the client sends it, reply as the uplink returns it
	client      *client
	id          uint64     // unique among the flows the table ever held (fragment trains check it)
	rule        *ruleCount // the rule that accepted it, for byte counts
	delta       natDelta   // checksum change of the translation towards the uplink (source NAT and DNS redirection)
	expires     int64      // unix nanoseconds
	remoteNext  uint32     // the sequence number after the remote's last segment: what the client expects next
	state       flowState
	remoteSeen  bool // remoteNext is valid
	finClient   bool
	finRemote   bool
	inUse       bool
	// dnat: the destination is redirected too (DNS, Config.UplinkDNS):
	// orig.remote as the client sends it, reply.remote towards the uplink.
	dnat      bool
	slotLinks // in the client's flowList, or the free list (next only)
}

// conntrack is the fixed-size flow table. All of it is guarded by Engine.mu.
type conntrack struct {
	flows     []flow
	free      int32 // head of the free list, -1 when full
	used      int
	perClient int
	orig      map[flowKey]int32
	reply     map[flowKey]int32
	natRand   *rand.ChaCha8
	lastSweep int64
	lastID    uint64
}

// slotList is a client's list of slots in a fixed-size table (its flows
// or its fragment trains), oldest first, linked through the slots'
// slotLinks. All of it is guarded by Engine.mu.
type slotList struct {
	head, tail int32 // -1 when empty
	count      int
}

var emptySlotList = slotList{head: -1, tail: -1}

// slotLinks are a slot's neighbours in its slotList.
type slotLinks struct{ prev, next int32 }

// pushBack appends slot i; links gives a slot's slotLinks.
func (l *slotList) pushBack(i int32, links func(int32) *slotLinks) {
	*links(i) = slotLinks{prev: l.tail, next: -1}
	if l.tail >= 0 {
		links(l.tail).next = i
	} else {
		l.head = i
	}
	l.tail = i
	l.count++
}

// remove takes slot i out of the list.
func (l *slotList) remove(i int32, links func(int32) *slotLinks) {
	s := links(i)
	if s.prev >= 0 {
		links(s.prev).next = s.next
	} else {
		l.head = s.next
	}
	if s.next >= 0 {
		links(s.next).prev = s.prev
	} else {
		l.tail = s.prev
	}
	l.count--
}

func newConntrack(capacity, perClient int, seed [32]byte) *conntrack {
	t := &conntrack{
		flows:     make([]flow, capacity),
		perClient: perClient,
		orig:      make(map[flowKey]int32, capacity),
		reply:     make(map[flowKey]int32, capacity),
		natRand:   rand.NewChaCha8(seed),
		lastSweep: -fullSweepEvery,
	}
	for i := range t.flows {
		t.flows[i].next = int32(i + 1)
	}
	t.flows[capacity-1].next = -1
	return t
}

// lookup finds a live flow by key in orig or reply; an expired flow is
// removed and not returned.
func (t *conntrack) lookup(index map[flowKey]int32, k *flowKey, now int64) *flow {
	i, ok := index[*k]
	if !ok {
		return nil
	}
	f := &t.flows[i]
	if f.expires < now {
		t.remove(i)
		return nil
	}
	return f
}

// create adds a flow for client c with the given original key, NATed to
// natAddr (our uplink address of the family) and sent to remote (the
// original destination, or where a DNS redirection sends it). It returns
// nil when the client's share and the table are full or no free NAT port
// was found.
func (t *conntrack) create(c *client, orig *flowKey, natAddr, remote [16]byte, state flowState, now int64) *flow {
	if !t.makeRoom(c, now) {
		return nil
	}
	reply := flowKey{remote: remote, local: natAddr, remotePort: orig.remotePort, proto: orig.proto, family: orig.family}
	if !t.pickNATPort(&reply) {
		return nil
	}
	i := t.free
	f := &t.flows[i]
	t.free = f.next
	t.used++
	addrLen := c.addr(orig.family).Len()
	t.lastID++
	*f = flow{orig: *orig, reply: reply, client: c, id: t.lastID, state: state, inUse: true,
		delta: newNATDelta(orig.local[:addrLen], natAddr[:addrLen], orig.localPort, reply.localPort)}
	if remote != orig.remote {
		f.dnat = true
		f.delta.addr = checksum.Combine(f.delta.addr, addrDelta(orig.remote[:addrLen], remote[:addrLen]))
	}
	f.refresh(now)
	c.flowList.pushBack(i, t.links)
	t.orig[*orig] = i
	t.reply[reply] = i
	return f
}

// pickNATPort sets k.localPort to a random port (ICMP: identifier) that no
// other flow to the same remote endpoint uses.
func (t *conntrack) pickNATPort(k *flowKey) bool {
	for range natPortTries {
		k.localPort = uint16(natPortMin + t.natRand.Uint64()%(1<<16-natPortMin))
		if k.proto == protoICMPv4 || k.proto == protoICMPv6 {
			k.remotePort = k.localPort // echo replies carry the id in both places
		}
		if _, taken := t.reply[*k]; !taken {
			return true
		}
	}
	return false
}

// makeRoom makes sure that a slot is free and that c is below its share,
// reclaiming only c's own flows (one client cannot evict another's) and,
// at most once a second, expired flows of anyone.
func (t *conntrack) makeRoom(c *client, now int64) bool {
	if c.flowList.count >= t.perClient && !t.reclaim(c, now) {
		return false
	}
	if t.free >= 0 {
		return true
	}
	if t.reclaim(c, now) {
		return true
	}
	if now-t.lastSweep >= fullSweepEvery {
		t.lastSweep = now
		t.expire(now)
	}
	return t.free >= 0
}

// reclaim frees one of c's oldest flows: an expired one if any, else one
// that was never answered.
func (t *conntrack) reclaim(c *client, now int64) bool {
	victim := int32(-1)
	i := c.flowList.head
	for n := 0; i >= 0 && n < reclaimScan; n++ {
		f := &t.flows[i]
		if f.expires < now {
			victim = i
			break
		}
		if victim < 0 && (f.state == udpUnreplied || f.state == tcpSynSent || f.state >= tcpTimeWait) {
			victim = i
		}
		i = f.next
	}
	if victim < 0 {
		return false
	}
	t.remove(victim)
	return true
}

// remove frees flow i.
func (t *conntrack) remove(i int32) {
	f := &t.flows[i]
	f.client.flowList.remove(i, t.links)
	delete(t.orig, f.orig)
	delete(t.reply, f.reply)
	*f = flow{slotLinks: slotLinks{next: t.free}}
	t.free = i
	t.used--
}

// links gives flow i's slotLinks.
func (t *conntrack) links(i int32) *slotLinks { return &t.flows[i].slotLinks }

// expire removes every expired flow.
func (t *conntrack) expire(now int64) {
	for i := range t.flows {
		if t.flows[i].inUse && t.flows[i].expires < now {
			t.remove(int32(i))
		}
	}
}

// removeRemote removes every flow whose remote end has address a.
func (t *conntrack) removeRemote(a netip.Addr) {
	var remote [16]byte
	copy(remote[:], a.AsSlice())
	family := rules.FamilyOf(a)
	for i := range t.flows {
		if f := &t.flows[i]; f.inUse && f.orig.remote == remote && f.orig.family == family {
			t.remove(int32(i))
		}
	}
}

// removeClient removes all of c's flows.
func (t *conntrack) removeClient(c *client) {
	for c.flowList.head >= 0 {
		t.remove(c.flowList.head)
	}
}

// recheck applies a client's new rules of one family to its flows: those
// now rejected are removed, and for TCP flows the remote has answered a RST
// towards the client is returned, ready to be written to its link.
func (t *conntrack) recheck(c *client, family rules.Family, table *ruleTable, now int64) (resets [][]byte) {
	for i := c.flowList.head; i >= 0; {
		f := &t.flows[i]
		next := f.next
		if f.orig.family == family {
			verdict, count := table.check(f.ruleFlow())
			if verdict.Action == rules.Accept {
				f.rule = count
			} else {
				if f.orig.proto == protoTCP && f.remoteSeen && f.state < tcpClose {
					resets = append(resets, c.resetFrame(f))
				}
				t.remove(i)
			}
		}
		i = next
	}
	return resets
}

// ruleFlow is the flow as the client's rules see it.
func (f *flow) ruleFlow() rules.Flow {
	k := &f.orig
	// The destination is the redirected one: Linux's forward hook sees it
	// after the prerouting DNAT.
	rf := rules.Flow{Proto: k.proto, Src: keyAddr(k.local, k.family), Dst: keyAddr(f.reply.remote, k.family)}
	switch k.proto {
	case protoTCP, protoUDP:
		rf.SrcPort, rf.DstPort = k.localPort, k.remotePort
	case protoICMPv4:
		rf.ICMPType = uint8(header.ICMPv4Echo)
	case protoICMPv6:
		rf.ICMPType = uint8(header.ICMPv6EchoRequest)
	}
	return rf
}

func keyAddr(b [16]byte, family rules.Family) netip.Addr {
	if family == rules.IPv4 {
		return netip.AddrFrom4([4]byte(b[:4]))
	}
	return netip.AddrFrom16(b)
}

// refresh pushes the flow's expiry out by its state's timeout.
func (f *flow) refresh(now int64) {
	f.expires = now + int64(flowTimeouts[f.state])
}

// track updates the flow's state with a packet that belongs to it.
func (f *flow) track(p *packet, fromClient bool, now int64) {
	switch f.orig.proto {
	case protoTCP:
		f.trackTCP(p, fromClient)
	case protoUDP:
		if !fromClient {
			f.state = udpReplied
		}
	}
	f.refresh(now)
}

// segmentLength is the sequence space a TCP segment takes: its payload,
// and one for SYN and for FIN.
func segmentLength(p *packet) uint32 {
	tcp := header.TCP(p.l4)
	n := uint32(len(tcp) - int(tcp.DataOffset()))
	if p.tcpFlags&header.TCPFlagSyn != 0 {
		n++
	}
	if p.tcpFlags&header.TCPFlagFin != 0 {
		n++
	}
	return n
}

// trackTCP follows the handshake and teardown (without sequence window
// checks: the endpoints do those).
func (f *flow) trackTCP(p *packet, fromClient bool) {
	flags := p.tcpFlags
	if !fromClient {
		next := header.TCP(p.l4).SequenceNumber() + segmentLength(p)
		if !f.remoteSeen || int32(next-f.remoteNext) > 0 { // later in sequence space
			f.remoteNext, f.remoteSeen = next, true
		}
	}
	next := f.state
	switch {
	case flags&header.TCPFlagRst != 0:
		next = tcpClose
	case flags&header.TCPFlagFin != 0:
		if fromClient {
			f.finClient = true
		} else {
			f.finRemote = true
		}
		next = tcpFinWait
		if f.finClient && f.finRemote {
			next = tcpTimeWait
		}
	case !fromClient && flags&(header.TCPFlagSyn|header.TCPFlagAck) == header.TCPFlagSyn|header.TCPFlagAck:
		next = tcpSynRecv
	case fromClient && f.state == tcpSynRecv && flags&(header.TCPFlagSyn|header.TCPFlagAck) == header.TCPFlagAck:
		next = tcpEstablished
	}
	if next > f.state {
		f.state = next
	}
}
