package main

import (
	"context"
	crand "crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"time"

	"golang.org/x/net/dns/dnsmessage"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"

	"qfw/firewall"
	"qfw/rules"
)

// The resolver is a hidden client of the engine, so that its queries take
// the path a sys-firewall's own lookups take: NAT to /qubes-ip, out of the
// uplink, to the DNS servers QubesDB names. Its address is link-local, which
// no Qubes client has.
var (
	resolverIP   = netip.MustParseAddr("169.254.53.53")
	resolverMAC  = net.HardwareAddr{0x02, 0x71, 0x66, 0x77, 0x00, 0x35}
	resolverName = "qfw-resolver"
)

// resolverTry is how long one query waits for its answer before the next
// server (or the next round) is asked.
const resolverTry = time.Second

// maxDNSAnswers bounds the addresses taken from one answer.
const maxDNSAnswers = 64

// answerQueue datagrams may wait per query, so that a few forged or stale
// ones do not crowd out the real answer.
const answerQueue = 16

// uplinkResolver looks names up through the engine.
type uplinkResolver struct {
	link    *firewall.MemLink // its end of the pipe to the engine
	servers []netip.Addr      // IPv4 DNS servers, in order of preference

	mu      sync.Mutex
	pending map[uint16]chan []byte // by UDP source port: the answer's payload
}

// attachResolver adds the resolver to the engine as a client that may only
// reach its DNS servers on UDP port 53. The servers are this VM's own IPv4
// ones (Config.UplinkDNS: /qubes-primary-dns, /qubes-secondary-dns, what
// setup-ip writes to a sys-firewall's resolv.conf), by default Qubes'
// 10.139.1.1 and .2.
func attachResolver(engine *firewall.Engine, servers []netip.Addr) (*uplinkResolver, error) {
	r := &uplinkResolver{pending: make(map[uint16]chan []byte)}
	tree := map[string]string{"policy": "drop"}
	for _, s := range servers {
		if s.Is4() {
			r.servers = append(r.servers, s)
		}
	}
	if len(r.servers) == 0 {
		r.servers = rules.DefaultDNSServers
	}
	for i, s := range r.servers {
		tree[fmt.Sprintf("%04d", i)] = "action=accept dst4=" + s.String() + "/32 proto=udp dstports=53-53"
	}
	ours, theirs := firewall.Pipe(resolverMAC, firewall.GatewayMAC, firewall.DefaultMTU)
	r.link = ours
	if err := engine.AddClient(firewall.ClientConfig{Name: resolverName, IP4: resolverIP, MAC: resolverMAC, Link: theirs}); err != nil {
		return nil, fmt.Errorf("dsthost resolver: %w", err)
	}
	rs := rules.ParseQubesDB(tree, rules.Options{Family: rules.IPv4})
	if rs.Blocked() {
		return nil, fmt.Errorf("dsthost resolver rules: %v", rs.Errors())
	}
	if err := engine.SetRules(resolverIP, rs); err != nil {
		return nil, fmt.Errorf("dsthost resolver: %w", err)
	}
	go r.receive()
	return r, nil
}

// receive hands each DNS answer to the lookup waiting on its port, until the
// engine closes the link.
func (r *uplinkResolver) receive() {
	bufs := [][]byte{make([]byte, header.EthernetMinimumSize+firewall.DefaultMTU)}
	sizes := []int{0}
	for {
		if _, err := r.link.Read(bufs, sizes); err != nil {
			return
		}
		port, payload, ok := dnsReply(bufs[0][:sizes[0]])
		if !ok {
			continue
		}
		r.mu.Lock()
		if ch := r.pending[port]; ch != nil {
			select {
			case ch <- append([]byte(nil), payload...):
			default: // the query is flooded: drop
			}
		}
		r.mu.Unlock()
	}
}

// dnsReply picks out a UDP datagram from port 53 to the resolver.
func dnsReply(frame []byte) (port uint16, payload []byte, ok bool) {
	if len(frame) < header.EthernetMinimumSize || header.Ethernet(frame).Type() != header.IPv4ProtocolNumber {
		return 0, nil, false
	}
	ip := header.IPv4(frame[header.EthernetMinimumSize:])
	if !ip.IsValid(len(ip)) || ip.TransportProtocol() != header.UDPProtocolNumber ||
		ip.DestinationAddress() != tcpip.AddrFrom4(resolverIP.As4()) || ip.More() || ip.FragmentOffset() != 0 {
		return 0, nil, false
	}
	udp := header.UDP(ip.Payload())
	if len(udp) < header.UDPMinimumSize || int(udp.Length()) > len(udp) || int(udp.Length()) < header.UDPMinimumSize ||
		udp.SourcePort() != 53 {
		return 0, nil, false
	}
	return udp.DestinationPort(), udp[header.UDPMinimumSize:udp.Length()], true
}

// lookup asks the servers in turn, round after round, until one answers or
// ctx ends. A name that does not exist is an answer.
func (r *uplinkResolver) lookup(ctx context.Context, host string, family rules.Family) ([]netip.Addr, error) {
	if len(r.servers) == 0 {
		return nil, errors.New("no DNS server")
	}
	qtype := dnsmessage.TypeA
	if family == rules.IPv6 {
		qtype = dnsmessage.TypeAAAA
	}
	name, err := dnsmessage.NewName(host + ".")
	if err != nil {
		return nil, fmt.Errorf("lookup %s: %w", host, err)
	}
	for ctx.Err() == nil {
		for _, server := range r.servers {
			addrs, err := r.query(ctx, server, name, qtype)
			if err == nil || !errors.Is(err, context.DeadlineExceeded) {
				return addrs, err
			}
		}
	}
	return nil, fmt.Errorf("lookup %s: no answer from %v: %w", host, r.servers, ctx.Err())
}

// query sends one question to one server and waits resolverTry for the
// answer; a timeout is context.DeadlineExceeded.
func (r *uplinkResolver) query(ctx context.Context, server netip.Addr, name dnsmessage.Name, qtype dnsmessage.Type) ([]netip.Addr, error) {
	var random [4]byte
	if _, err := crand.Read(random[:]); err != nil {
		return nil, err
	}
	id := binary.BigEndian.Uint16(random[:2])
	port := 1024 + binary.BigEndian.Uint16(random[2:])%(65535-1024)
	msg, err := dnsQueryMessage(id, name, qtype)
	if err != nil {
		return nil, err
	}
	answers := make(chan []byte, answerQueue)
	r.mu.Lock()
	if r.pending[port] != nil {
		r.mu.Unlock()
		return nil, context.DeadlineExceeded // port in use: count it as a try
	}
	r.pending[port] = answers
	r.mu.Unlock()
	defer func() {
		r.mu.Lock()
		delete(r.pending, port)
		r.mu.Unlock()
	}()

	if _, err := r.link.Write([][]byte{udpFrame(server, port, msg)}); err != nil {
		return nil, err
	}
	timer := time.NewTimer(resolverTry)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil, context.DeadlineExceeded
		case <-timer.C:
			return nil, context.DeadlineExceeded
		case reply := <-answers:
			addrs, err := parseDNSAnswer(reply, id, name, qtype)
			if errors.Is(err, errNotOurs) {
				continue // forged or stale: keep waiting for the real one
			}
			return addrs, err
		}
	}
}

// udpFrame is a datagram from the resolver to server:53, addressed to the
// engine's gateway MAC.
func udpFrame(server netip.Addr, port uint16, payload []byte) []byte {
	const ipStart = header.EthernetMinimumSize
	const udpStart = ipStart + header.IPv4MinimumSize
	frame := make([]byte, udpStart+header.UDPMinimumSize+len(payload))
	header.Ethernet(frame).Encode(&header.EthernetFields{
		SrcAddr: tcpip.LinkAddress(resolverMAC), DstAddr: tcpip.LinkAddress(firewall.GatewayMAC),
		Type: header.IPv4ProtocolNumber,
	})
	src, dst := tcpip.AddrFrom4(resolverIP.As4()), tcpip.AddrFrom4(server.As4())
	ip := header.IPv4(frame[ipStart:])
	ip.Encode(&header.IPv4Fields{
		TotalLength: uint16(len(frame) - ipStart), TTL: 64, Protocol: uint8(header.UDPProtocolNumber),
		SrcAddr: src, DstAddr: dst,
	})
	ip.SetChecksum(^ip.CalculateChecksum())
	udp := header.UDP(frame[udpStart:])
	udp.Encode(&header.UDPFields{SrcPort: port, DstPort: 53, Length: uint16(len(udp))})
	copy(udp.Payload(), payload)
	sum := header.PseudoHeaderChecksum(header.UDPProtocolNumber, src, dst, uint16(len(udp)))
	udp.SetChecksum(^udp.CalculateChecksum(checksum.Checksum(udp.Payload(), sum)))
	return frame
}

// dnsQueryMessage is a recursive query for one name and type.
func dnsQueryMessage(id uint16, name dnsmessage.Name, qtype dnsmessage.Type) ([]byte, error) {
	b := dnsmessage.NewBuilder(nil, dnsmessage.Header{ID: id, RecursionDesired: true})
	if err := b.StartQuestions(); err != nil {
		return nil, err
	}
	if err := b.Question(dnsmessage.Question{Name: name, Type: qtype, Class: dnsmessage.ClassINET}); err != nil {
		return nil, err
	}
	return b.Finish()
}

// errNotOurs: a datagram that does not answer our question.
var errNotOurs = errors.New("not an answer to the query")

// parseDNSAnswer takes the addresses of the asked type from an answer. An
// answer without any (NXDOMAIN, no such record) is an error, as
// getaddrinfo's is for the Linux agent.
func parseDNSAnswer(msg []byte, id uint16, name dnsmessage.Name, qtype dnsmessage.Type) ([]netip.Addr, error) {
	var p dnsmessage.Parser
	h, err := p.Start(msg)
	if err != nil || h.ID != id || !h.Response {
		return nil, errNotOurs
	}
	q, err := p.Question()
	if err != nil || q.Type != qtype || !equalFoldName(q.Name, name) {
		return nil, errNotOurs
	}
	switch h.RCode {
	case dnsmessage.RCodeSuccess:
	case dnsmessage.RCodeNameError:
		return nil, fmt.Errorf("lookup %s: no such host", name)
	default:
		return nil, fmt.Errorf("lookup %s: server answered %s", name, h.RCode)
	}
	if err := p.SkipAllQuestions(); err != nil {
		return nil, fmt.Errorf("lookup %s: malformed answer: %w", name, err)
	}
	var addrs []netip.Addr
	for len(addrs) < maxDNSAnswers {
		rh, err := p.AnswerHeader()
		if errors.Is(err, dnsmessage.ErrSectionDone) {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("lookup %s: malformed answer: %w", name, err)
		}
		switch {
		case rh.Type == dnsmessage.TypeA && qtype == dnsmessage.TypeA:
			a, err := p.AResource()
			if err != nil {
				return nil, fmt.Errorf("lookup %s: malformed answer: %w", name, err)
			}
			addrs = append(addrs, netip.AddrFrom4(a.A))
		case rh.Type == dnsmessage.TypeAAAA && qtype == dnsmessage.TypeAAAA:
			a, err := p.AAAAResource()
			if err != nil {
				return nil, fmt.Errorf("lookup %s: malformed answer: %w", name, err)
			}
			addrs = append(addrs, netip.AddrFrom16(a.AAAA))
		default:
			if err := p.SkipAnswer(); err != nil {
				return nil, fmt.Errorf("lookup %s: malformed answer: %w", name, err)
			}
		}
	}
	if len(addrs) == 0 {
		return nil, fmt.Errorf("lookup %s: no %s record", name, qtype)
	}
	return addrs, nil
}

// equalFoldName compares DNS names ignoring ASCII case.
func equalFoldName(a, b dnsmessage.Name) bool {
	if a.Length != b.Length {
		return false
	}
	for i := range int(a.Length) {
		x, y := a.Data[i], b.Data[i]
		if 'A' <= x && x <= 'Z' {
			x += 'a' - 'A'
		}
		if 'A' <= y && y <= 'Z' {
			y += 'a' - 'A'
		}
		if x != y {
			return false
		}
	}
	return true
}
