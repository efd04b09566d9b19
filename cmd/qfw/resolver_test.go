package main

import (
	"context"
	"net/netip"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/net/dns/dnsmessage"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"

	"qfw/firewall"
	"qfw/rules"
)

var (
	dnsServer1 = netip.MustParseAddr("10.139.1.1")
	dnsServer2 = netip.MustParseAddr("10.139.1.2")
)

// fakeDNS plays the engine's side of the resolver's link: it reads the
// query frames and answers them as a server behind the uplink would.
type fakeDNS struct {
	t    *testing.T
	link *firewall.MemLink
}

// next returns the next query: which server it went to, from which port,
// its ID and question; it checks the frame on the way.
func (f *fakeDNS) next() (server netip.Addr, port uint16, id uint16, q dnsmessage.Question) {
	f.t.Helper()
	bufs, sizes := [][]byte{make([]byte, 2048)}, []int{0}
	_, err := f.link.Read(bufs, sizes)
	require.NoError(f.t, err)
	frame := bufs[0][:sizes[0]]
	eth := header.Ethernet(frame)
	require.Equal(f.t, tcpip.LinkAddress(firewall.GatewayMAC), eth.DestinationAddress())
	ip := header.IPv4(frame[header.EthernetMinimumSize:])
	require.True(f.t, ip.IsValid(len(ip)) && ip.IsChecksumValid(), "IPv4 header")
	require.Equal(f.t, tcpip.AddrFrom4(resolverIP.As4()), ip.SourceAddress())
	udp := header.UDP(ip.Payload())
	require.True(f.t, udp.IsChecksumValid(ip.SourceAddress(), ip.DestinationAddress(),
		checksum.Checksum(udp.Payload(), 0)), "UDP checksum")
	require.Equal(f.t, uint16(53), udp.DestinationPort())
	var p dnsmessage.Parser
	h, err := p.Start(udp.Payload())
	require.NoError(f.t, err)
	q, err = p.Question()
	require.NoError(f.t, err)
	server = netip.AddrFrom4(ip.DestinationAddress().As4())
	return server, udp.SourcePort(), h.ID, q
}

// answer sends a DNS message from server:53 to the resolver's port.
func (f *fakeDNS) answer(server netip.Addr, port uint16, msg []byte) {
	f.t.Helper()
	frame := udpFrame(server, port, msg) // same layout, swap addresses and ports
	ip := header.IPv4(frame[header.EthernetMinimumSize:])
	ip.SetSourceAddress(tcpip.AddrFrom4(server.As4()))
	ip.SetDestinationAddress(tcpip.AddrFrom4(resolverIP.As4()))
	udp := header.UDP(ip.Payload())
	udp.SetSourcePort(53)
	udp.SetDestinationPort(port)
	_, err := f.link.Write([][]byte{frame})
	require.NoError(f.t, err)
}

func reply(t *testing.T, id uint16, q dnsmessage.Question, rcode dnsmessage.RCode, addrs ...netip.Addr) []byte {
	t.Helper()
	b := dnsmessage.NewBuilder(nil, dnsmessage.Header{ID: id, Response: true, RCode: rcode})
	require.NoError(t, b.StartQuestions())
	require.NoError(t, b.Question(q))
	require.NoError(t, b.StartAnswers())
	rh := dnsmessage.ResourceHeader{Name: q.Name, Class: dnsmessage.ClassINET, TTL: 60}
	// A CNAME first, as resolvers often answer: it must be skipped.
	require.NoError(t, b.CNAMEResource(rh, dnsmessage.CNAMEResource{CNAME: dnsmessage.MustNewName("alias.test.")}))
	for _, a := range addrs {
		if a.Is4() {
			require.NoError(t, b.AResource(rh, dnsmessage.AResource{A: a.As4()}))
		} else {
			require.NoError(t, b.AAAAResource(rh, dnsmessage.AAAAResource{AAAA: a.As16()}))
		}
	}
	msg, err := b.Finish()
	require.NoError(t, err)
	return msg
}

func newTestResolver(t *testing.T) (*uplinkResolver, *fakeDNS) {
	ours, theirs := firewall.Pipe(resolverMAC, firewall.GatewayMAC, firewall.DefaultMTU)
	r := &uplinkResolver{link: ours, servers: []netip.Addr{dnsServer1, dnsServer2}, pending: map[uint16]chan []byte{}}
	go r.receive()
	t.Cleanup(func() { ours.Close(); theirs.Close() })
	return r, &fakeDNS{t: t, link: theirs}
}

type lookupResult struct {
	addrs []netip.Addr
	err   error
}

func lookupAsync(r *uplinkResolver, ctx context.Context, host string, family rules.Family) <-chan lookupResult {
	done := make(chan lookupResult, 1)
	go func() {
		addrs, err := r.lookup(ctx, host, family)
		done <- lookupResult{addrs, err}
	}()
	return done
}

func TestResolverAsksNextServerAndIgnoresForgeries(t *testing.T) {
	r, dns := newTestResolver(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	done := lookupAsync(r, ctx, "Example.Test", rules.IPv4)

	// The first server stays silent: the resolver tries the second.
	server, _, _, _ := dns.next()
	assert.Equal(t, dnsServer1, server)
	server, port, id, q := dns.next()
	assert.Equal(t, dnsServer2, server)
	assert.Equal(t, dnsmessage.TypeA, q.Type)
	assert.Equal(t, "Example.Test.", q.Name.String())

	dns.answer(server, port, reply(t, id+1, q, dnsmessage.RCodeSuccess, netip.MustParseAddr("192.0.2.66"))) // wrong ID
	other := q
	other.Name = dnsmessage.MustNewName("other.test.")
	dns.answer(server, port, reply(t, id, other, dnsmessage.RCodeSuccess, netip.MustParseAddr("192.0.2.77"))) // wrong question
	q.Name = dnsmessage.MustNewName("example.TEST.")                                                          // case differs: still ours
	dns.answer(server, port, reply(t, id, q, dnsmessage.RCodeSuccess, netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("192.0.2.2")))

	res := <-done
	require.NoError(t, res.err)
	assert.Equal(t, []netip.Addr{netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("192.0.2.2")}, res.addrs)
}

func TestResolverAAAAAndFailures(t *testing.T) {
	r, dns := newTestResolver(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()

	done := lookupAsync(r, ctx, "v6.test", rules.IPv6)
	server, port, id, q := dns.next()
	assert.Equal(t, dnsmessage.TypeAAAA, q.Type)
	dns.answer(server, port, reply(t, id, q, dnsmessage.RCodeSuccess, netip.MustParseAddr("2001:db8::1")))
	res := <-done
	require.NoError(t, res.err)
	assert.Equal(t, []netip.Addr{netip.MustParseAddr("2001:db8::1")}, res.addrs)

	done = lookupAsync(r, ctx, "nx.test", rules.IPv4)
	server, port, id, q = dns.next()
	dns.answer(server, port, reply(t, id, q, dnsmessage.RCodeNameError))
	res = <-done
	require.Error(t, res.err)
	assert.Contains(t, res.err.Error(), "nx.test.: no such host")

	done = lookupAsync(r, ctx, "empty.test", rules.IPv4)
	server, port, id, q = dns.next()
	dns.answer(server, port, reply(t, id, q, dnsmessage.RCodeSuccess))
	res = <-done
	require.Error(t, res.err)
	assert.Contains(t, res.err.Error(), "no TypeA record")
}

func TestResolverGivesUpAtDeadline(t *testing.T) {
	r, dns := newTestResolver(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*resolverTry)
	defer cancel()
	go func() { // a black hole: read and never answer
		for {
			bufs, sizes := [][]byte{make([]byte, 2048)}, []int{0}
			if _, err := dns.link.Read(bufs, sizes); err != nil {
				return
			}
		}
	}()
	_, err := r.lookup(ctx, "slow.test", rules.IPv4)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "no answer from [10.139.1.1 10.139.1.2]")
}

func TestResolverNeedsServers(t *testing.T) {
	r := &uplinkResolver{pending: map[uint16]chan []byte{}}
	_, err := r.lookup(context.Background(), "a.test", rules.IPv4)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "no DNS server")
}
